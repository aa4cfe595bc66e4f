"""No generated output is committed: what the examples, the README's programs,
the benchmarks' charts and the docs build write is ignored by git, and no
tracked file matches an ignore pattern."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def git(*args) -> str:
  return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                        check=True).stdout


@pytest.fixture(scope="module")
def checkout():
  if shutil.which("git") is None or not (ROOT / ".git").exists():
    pytest.skip("not a git checkout (e.g. an unpacked sdist): nothing is tracked")


def test_generated_paths_are_ignored(checkout):
  for path in ("out/x.png", "examples/out/x.png", "ckpt/adapter/x", "docs/_build/html/index.html",
               "bench/results/results.png"):
    proc = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


def test_no_tracked_file_is_ignored(checkout):
  tracked_but_ignored = git("ls-files", "-ci", "--exclude-standard").split()
  assert not tracked_but_ignored, f"generated files are committed: {tracked_but_ignored}"
