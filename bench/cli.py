"""The ``--help`` layout shared by the bench programs."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
  """Keeps the module docstring's layout and appends ``(default: X)`` to every
  option that takes a value. An option whose default is ``None`` (decided
  later, e.g. by the mode) states its default in its own help text."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.nargs == 0 or action.default is None or "(default:" in text:
      return text
    return super()._get_help_string(action)
