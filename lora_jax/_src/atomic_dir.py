"""Replace a directory atomically: write a temporary sibling, then swap it in.

``temp_sibling(final)`` names the directory to write (``<final>.lora_jax-tmp-<id>``);
``swap_in(tmp, final)`` moves it into place, exchanging it with an existing
``final`` in one step where Linux ``renameat2(RENAME_EXCHANGE)`` is available
and with two renames elsewhere (the previous directory waits at
``previous(final)`` in between). ``clean_stale(final)`` removes temporaries
left by interrupted writes.
"""

import ctypes
import ctypes.util
import os
import shutil
import uuid

_TMP = ".lora_jax-tmp-"  # sibling being written: <name>.lora_jax-tmp-<id>
_OLD = ".lora_jax-old"  # previous checkpoint during a non-atomic swap


def temp_sibling(final: str) -> str:
  """A fresh temporary path beside ``final`` (same filesystem, so renames are atomic)."""
  return final + _TMP + uuid.uuid4().hex[:8]


def previous(final: str) -> str:
  """Where the old ``final`` waits during a non-atomic (two-rename) swap."""
  return final + _OLD


def _exchange(a: str, b: str) -> bool:
  """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(new: str, final: str) -> None:
  """Move the finished directory ``new`` to ``final``, replacing any old one."""
  if not os.path.exists(final):
    os.rename(new, final)
  elif _exchange(new, final):
    shutil.rmtree(new)  # now holds the old checkpoint
  else:  # two renames; the old one waits at previous(final) in the gap
    old = previous(final)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(new, final)
  shutil.rmtree(previous(final), ignore_errors=True)


def clean_stale(final: str) -> None:
  """Remove the temporaries of earlier, interrupted writes of ``final``."""
  parent, name = os.path.split(final)
  for entry in os.listdir(parent or "."):
    if entry.startswith(name + _TMP):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
