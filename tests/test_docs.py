"""The documentation site builds offline, warnings as errors, with every guide
in ``docs/guides/`` and the API reference generated from the docstrings.

The build is the command the README gives (``python -m sphinx -W -b html docs
docs/_build/html``), run in a subprocess into a temporary directory.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_docs_build_without_warnings(tmp_path):
  out = tmp_path / "html"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
       "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
  # every guide is built and reachable from the index (a glob toctree)
  index = (out / "index.html").read_text(encoding="utf-8")
  for page in sorted((DOCS / "guides").glob("*.md")):
    assert (out / "guides" / f"{page.stem}.html").exists(), page.name
    assert f"guides/{page.stem}.html" in index, f"{page.name} is not in the index's toctree"
  # the API reference comes from the docstrings, their >>> examples included
  api = (out / "api.html").read_text(encoding="utf-8")
  for name in ("lora_jax.lora_init", "lora_jax.LoraConfig", "lora_jax.merge",
               "lora_jax.interop.save_peft_adapter", "lora_jax.models.generate_cached"):
    assert f'id="{name}"' in api, f"{name} is not documented in api.html"
  assert api.count('class="doctest') >= 20, "the docstrings' examples are not rendered"
