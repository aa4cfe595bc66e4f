"""The README's claims a new user meets first: its runnable code blocks run as
written, every other Python block is labelled a sketch, it names no missing
file, and ``import lora_jax`` stays light."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARK = "<!-- runnable -->"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.S)


def python_blocks():
  """(the line before the block, the code) for every ```python block."""
  return [(m["before"], m["code"]) for m in BLOCK.finditer(README)]


RUNNABLE = [code for before, code in python_blocks() if before.strip() == MARK]


def run(code: str, cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_the_first_python_block_is_runnable():
  assert len(RUNNABLE) >= 2  # the whole program (Linen) and the NNX one
  assert python_blocks()[0][0].strip() == MARK


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_runnable_block_runs_as_written(index, tmp_path):
  proc = run(RUNNABLE[index], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
  assert losses, proc.stdout
  if len(losses) > 1:
    assert losses[-1] < losses[0] / 10  # the adapters learned something


def test_other_python_blocks_say_they_are_sketches():
  """A block that is not run must be labelled in the sentence before it."""
  unlabelled = []
  for m in BLOCK.finditer(README):
    if m["before"].strip() == MARK:
      continue
    intro = README[max(0, m.start() - 400):m.start() + len(m["before"]) + 1]
    if "sketch" not in intro.lower():
      unlabelled.append(m["code"].splitlines()[0])
  assert not unlabelled, f"python blocks neither runnable nor labelled a sketch: {unlabelled}"


def test_readme_names_only_files_that_exist():
  for path in set(re.findall(r"`((?:examples|tests|bench)/[\w./{},-]+\.(?:py|md|json))`",
                             README)):
    for p in re.sub(r"\{(.*?)\}", lambda m: m[1].split(",")[0], path).split():
      assert (ROOT / p).exists(), f"README names {p}, which is not in the repository"
  for script in set(re.findall(r"python (examples/\w+\.py)", README)):
    assert (ROOT / script).exists(), script
  assert "DESIGN.md" not in README
  assert not re.search(r"\bseed \d{3}\b", README), "internal seed numbers in the README"
  assert "✘" not in README, "goal marks belong in bench/ output"


@pytest.mark.parametrize("module", ["lora_jax", "lora_jax.interop", "lora_jax.models"])
def test_import_is_light(module, tmp_path):
  heavy = ("torch", "transformers", "peft", "safetensors", "matplotlib", "sklearn")
  code = (f"import sys, {module}; "
          f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
  proc = run(code, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]", f"import {module} loaded {proc.stdout.strip()}"
