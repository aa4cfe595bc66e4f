"""The README's and the documentation's claims a new user meets first: their
runnable code blocks run as written, every other Python block is labelled a
sketch, they name no missing file and link to no missing page, and
``import lora_jax`` stays light.

Pages are collected by glob (``README.md`` and ``docs/**/*.md``), so a new
page under ``docs/`` is checked without touching this file. A block is
runnable when the line ``<!-- runnable -->`` stands right before its
```python fence; it then runs as written in a fresh subprocess (keep such
blocks fast: seconds).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")
    if "_build" not in p.relative_to(ROOT / "docs").parts)
TEXT = {page: (ROOT / page).read_text(encoding="utf-8") for page in PAGES}
README = TEXT["README.md"]
MARK = "<!-- runnable -->"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.S)


def python_blocks(page: str):
  """(the line before the block, the code) for every ```python block of a page."""
  return [(m["before"], m["code"]) for m in BLOCK.finditer(TEXT[page])]


RUNNABLE = [(page, k, code) for page in PAGES
            for k, (before, code) in enumerate(b for b in python_blocks(page)
                                                if b[0].strip() == MARK)]


def run(code: str, cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_the_first_python_block_is_runnable():
  assert python_blocks("README.md")[0][0].strip() == MARK  # the whole program (Linen)
  pages = {page for page, _, _ in RUNNABLE}
  assert {"README.md", "docs/guides/nnx.md", "docs/guides/qlora.md"} <= pages, pages


@pytest.mark.parametrize("page,index,code", RUNNABLE,
                         ids=[f"{page}-{k}" for page, k, _ in RUNNABLE])
def test_runnable_block_runs_as_written(page, index, code, tmp_path):
  proc = run(code, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  if page == "README.md":  # the whole program trains: its printed loss falls
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) > 1, proc.stdout
    assert losses[-1] < losses[0] / 10  # the adapters learned something


@pytest.mark.parametrize("page", PAGES)
def test_other_python_blocks_say_they_are_sketches(page):
  """A block that is not run must be labelled in the sentence before it."""
  text, unlabelled = TEXT[page], []
  for m in BLOCK.finditer(text):
    if m["before"].strip() == MARK:
      continue
    intro = text[max(0, m.start() - 400):m.start() + len(m["before"]) + 1]
    if "sketch" not in intro.lower():
      unlabelled.append(m["code"].splitlines()[0])
  assert not unlabelled, f"{page}: python blocks neither runnable nor labelled a sketch: {unlabelled}"


OTHER_BLOCK = re.compile(r"\n```(?!python\n)(?P<lang>[a-z]+)\n", re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if p.startswith("docs")])
def test_other_code_blocks_in_the_docs_say_they_are_sketches(page):
  """Shell commands and output in the documentation are not run by a test:
  the sentence before each says it is a sketch."""
  text, unlabelled = TEXT[page], []
  for m in OTHER_BLOCK.finditer(text):
    if "sketch" not in text[max(0, m.start() - 400):m.start()].lower():
      unlabelled.append(text[m.end():].splitlines()[0])
  assert not unlabelled, f"{page}: code blocks neither run nor labelled a sketch: {unlabelled}"


@pytest.mark.parametrize("page", PAGES)
def test_pages_name_only_files_that_exist(page):
  text = TEXT[page]
  for path in set(re.findall(r"`((?:examples|tests|bench)/[\w./{},-]+\.(?:py|md|json))`", text)):
    for p in re.sub(r"\{(.*?)\}", lambda m: m[1].split(",")[0], path).split():
      assert (ROOT / p).exists(), f"{page} names {p}, which is not in the repository"
  for script in set(re.findall(r"python (examples/\w+\.py)", text)):
    assert (ROOT / script).exists(), f"{page}: {script}"
  assert "DESIGN.md" not in text
  assert not re.search(r"\bseed \d{3}\b", text), f"{page}: internal seed numbers"
  assert "✘" not in text, f"{page}: goal marks belong in bench/ output"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_reach_a_file(page):
  """[text](target) links inside the repository point to files that exist."""
  base = (ROOT / page).parent
  for target in re.findall(r"\]\(([^)\s]+)\)", TEXT[page]):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    path = target.split("#")[0]
    assert (base / path).exists(), f"{page} links to {target}, which does not exist"


def test_readme_is_a_map_of_the_docs():
  """Every guide is listed in the README's map, so no page is out of sight."""
  section = README.split("## Where to go next", 1)[1]
  guides = sorted(p.name for p in (ROOT / "docs" / "guides").glob("*.md"))
  missing = [g for g in guides if f"(docs/guides/{g})" not in section]
  assert not missing, f"docs/guides pages missing from the README's map: {missing}"


@pytest.mark.parametrize("module", ["lora_jax", "lora_jax.interop", "lora_jax.models"])
def test_import_is_light(module, tmp_path):
  heavy = ("torch", "transformers", "peft", "safetensors", "matplotlib", "sklearn")
  code = (f"import sys, {module}; "
          f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
  proc = run(code, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]", f"import {module} loaded {proc.stdout.strip()}"
