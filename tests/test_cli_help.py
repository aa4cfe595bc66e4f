"""Every example and bench program shows its real defaults in ``--help``: an
option that takes a value says ``(default: X)``, never ``(default: None)``."""

import argparse
import importlib
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_"))

BENCH = ["bench.__main__", "bench.compile_time", "bench.peft", "bench.pod_memory",
         "bench.qlora_memory", "bench.serving"]


class _Parsed(Exception):
  """Raised instead of parsing, carrying the parser that was built."""


def build_parser(module_name: str, monkeypatch) -> argparse.ArgumentParser:
  """The parser a program's ``main`` builds, caught before it parses anything."""
  def catch(self, *args, **kwargs):
    raise _Parsed(self)
  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
  module = importlib.import_module(module_name)
  with pytest.raises(_Parsed) as caught:
    getattr(module, "main")(["--help"])
  return caught.value.args[0]


@pytest.mark.parametrize("name", EXAMPLES + BENCH)
def test_help_shows_every_default(name, monkeypatch):
  p = build_parser(name, monkeypatch)
  text = p.format_help()
  assert "(default: None)" not in text, text
  formatter = p._get_formatter()
  missing = []
  for action in p._actions:
    if (not action.option_strings or action.nargs == 0  # positional, flags, --help
        or action.help == argparse.SUPPRESS):  # hidden (an internal flag)
      continue
    shown = formatter._expand_help(action) if action.help else ""
    if "(default: " not in shown or "(default: None)" in shown:
      missing.append(f"{action.option_strings[0]}: {shown!r}")
  assert not missing, f"{name} --help shows no real default for: {missing}"
