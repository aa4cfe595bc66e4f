"""Create or replace a directory atomically, with writers that cannot collide.

A writer gets a private temporary directory beside the target
(``writing(final)``: ``<final>.lora_jax-tmp-<random>``, made by
``tempfile.mkdtemp`` and locked with ``flock`` while the writer lives), writes
``<tmp>/new``, and then either

* ``create(new, final)``: moves it to ``final`` only if ``final`` does not
  exist, in one step (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere
  ``rename``, which refuses a non-empty target), so of two writers exactly one
  wins and the other gets ``FileExistsError``; or
* ``swap_in(new, final)``: replaces ``final``, exchanging the two in one step
  where ``renameat2(RENAME_EXCHANGE)`` is available and with two renames
  elsewhere (the previous directory waits at ``previous(final)`` in between).

``clean_stale(final)`` removes only temporaries whose writer is gone (their
lock is free), never another live writer's.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from typing import Iterator

try:
  import fcntl
except ImportError:  # Windows: no flock; clean_stale then leaves every temporary alone
  fcntl = None

_TMP = ".lora_jax-tmp-"  # a writer's private directory: <name>.lora_jax-tmp-<random>
_OLD = ".lora_jax-old"  # previous checkpoint during a non-atomic swap
_AT_FDCWD, _NOREPLACE, _EXCHANGE = -100, 1, 2


def previous(final: str) -> str:
  """Where the old ``final`` waits during a non-atomic (two-rename) swap."""
  return final + _OLD


def _lock(path: str, block: bool) -> int | None:
  """An fd holding ``flock(LOCK_EX)`` on directory ``path``; None if held elsewhere.

  Where flock is missing (Windows) or refused by the filesystem, a writer goes
  on unlocked (-1) and a cleaner never finds the lock free (None).
  """
  if fcntl is None:
    return -1 if block else None
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
  except OSError as e:  # held elsewhere, or a filesystem without locks (ENOLCK)
    os.close(fd)
    return -1 if block and not isinstance(e, BlockingIOError) else None
  return fd


@contextlib.contextmanager
def writing(final: str) -> Iterator[str]:
  """A private, locked temporary directory beside ``final``; yields ``<tmp>/new``.

  The directory and whatever is left in it are removed on exit. A writer
  killed midway leaves it behind, unlocked, for ``clean_stale``.
  """
  parent, name = os.path.split(final)
  while True:
    tmp = tempfile.mkdtemp(prefix=name + _TMP, dir=parent)
    fd = _lock(tmp, block=True)
    if os.path.isdir(tmp):  # else a cleaner took it between mkdtemp and the lock
      break
    _unlock(fd)
  try:
    yield os.path.join(tmp, "new")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    _unlock(fd)


def _unlock(fd: int) -> None:
  if fd >= 0:
    os.close(fd)


def _rename2(src: str, dst: str, flags: int) -> int:
  """Linux renameat2: 0 on success, else the errno (ENOSYS where unavailable)."""
  try:
    fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return errno.ENOSYS
  if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
    return 0
  return ctypes.get_errno()


def _exchange(a: str, b: str) -> bool:
  """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  return _rename2(a, b, _EXCHANGE) == 0


def create(new: str, final: str) -> None:
  """Move directory ``new`` to ``final`` if nothing is there, else FileExistsError."""
  err = _rename2(new, final, _NOREPLACE)
  if err in (errno.ENOSYS, errno.EINVAL):  # no renameat2 here, or not on this filesystem
    try:  # rename(2) refuses a non-empty target directory
      os.rename(new, final)
      err = 0
    except OSError as e:
      err = e.errno
  if err in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
    raise FileExistsError(errno.EEXIST, "already exists", final)
  if err:
    raise OSError(err, os.strerror(err), final)


def swap_in(new: str, final: str) -> None:
  """Move the finished directory ``new`` to ``final``, replacing any old one."""
  try:
    create(new, final)
    return
  except FileExistsError:
    pass
  if _exchange(new, final):
    shutil.rmtree(new)  # now holds the old checkpoint
  else:  # two renames; the old one waits at previous(final) in the gap
    old = previous(final)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(new, final)


def clean_stale(final: str) -> None:
  """Remove the temporaries of writers of ``final`` that are gone (killed midway)."""
  parent, name = os.path.split(final)
  for entry in os.listdir(parent or "."):
    path = os.path.join(parent, entry)
    if not entry.startswith(name + _TMP) or not os.path.isdir(path):
      continue
    try:
      fd = _lock(path, block=False)
    except OSError:  # removed meanwhile
      continue
    if fd is not None:  # nobody holds it: its writer died
      shutil.rmtree(path, ignore_errors=True)
      _unlock(fd)
