"""Agreement between the processes of a multi-process JAX program.

Under ``jax.distributed`` every process runs the same program, so a save is
called once per process. What must happen once (choosing a temporary
directory, moving it into place, writing a safetensors file) happens on
process 0 (``on_primary``); the others learn its result, or its error, and
raise the same. Before that, ``agree`` checks that every process passed the
same arguments (directory, params structure), so a mistake is an error on
every process rather than collectives that wait for each other forever.

The exchanges go through ``jax.distributed``'s coordination service (its
key-value store and barriers, as Orbax's own multi-process code does), and
every wait is bounded: a process that never arrives (it did not call the
save, or it died) is a ``TimeoutError`` on the others after ``timeout_s()``
seconds (``LORA_JAX_SYNC_TIMEOUT``, default 300). With one process each
function here is a no-op (``on_primary`` just calls its function).

The processes must call these functions in the same order: each call takes
the next number of a per-process counter, and the keys carry it.
"""

import itertools
import json
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

TIMEOUT_ENV = "LORA_JAX_SYNC_TIMEOUT"
_DEFAULT_TIMEOUT_S = 300.0
_ADAPTER_FIELDS = ("a", "b", "m", "value")  # a LoraWeight's / Trainable's own arrays
_counter = itertools.count()
_mine: list[str] = []  # keys this process set since its last barrier
# Errors of process 0 that the others raise as the same type.
_ERRORS = {e.__name__: e for e in (FileExistsError, FileNotFoundError, NotADirectoryError,
                                   PermissionError, OSError, ValueError, TypeError,
                                   KeyError, TimeoutError)}


def timeout_s() -> float:
  """Seconds a process waits for the others (``LORA_JAX_SYNC_TIMEOUT``, default 300)."""
  raw = os.environ.get(TIMEOUT_ENV)
  if raw is None:
    return _DEFAULT_TIMEOUT_S
  try:
    value = float(raw)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
  return value


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_primary() -> bool:
  """True on process 0 (the one that writes), and always with one process."""
  return jax.process_index() == 0


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
        f"lora_jax: this program runs {jax.process_count()} JAX processes but "
        "jax.distributed's client is not initialized; saving from several processes "
        "needs jax.distributed.initialize() (as Orbax does)")
  return client


def _key(what: str) -> str:
  return f"lora_jax/{next(_counter)}/{what}"


def _set(key: str, value: str) -> None:
  _client().key_value_set(key, value)
  _mine.append(key)


def _get(key: str, what: str, process: int) -> str:
  t = timeout_s()
  try:
    return _client().blocking_key_value_get(key, int(t * 1000))
  except Exception as e:  # JaxRuntimeError DEADLINE_EXCEEDED, or the service is gone
    raise TimeoutError(
        f"{what}: process {jax.process_index()} waited {t:g} s for process {process}, "
        f"which did not get there ({type(e).__name__}: {str(e)[:200]}). Every process "
        f"must call {what} with the same arguments; if one is slow, raise "
        f"{TIMEOUT_ENV} (seconds)") from e


def barrier(what: str) -> None:
  """Wait (bounded) until every process gets here."""
  if not is_multiprocess():
    return
  t = timeout_s()
  try:
    _client().wait_at_barrier(_key(what), int(t * 1000))
  except Exception as e:
    raise TimeoutError(
        f"{what}: process {jax.process_index()} waited {t:g} s at the end for the "
        f"other processes, and some did not get there ({type(e).__name__}: "
        f"{str(e)[:200]}). Every process must call {what}") from e
  client = _client()  # every process has read what this one set
  while _mine:
    client.key_value_delete(_mine.pop())


def _differences(field: str, mine: Any, theirs: Any, k: int) -> str:
  if isinstance(mine, list) and isinstance(theirs, list):
    a, b = set(mine), set(theirs)
    parts = [f"only on process 0: {sorted(a - b)[:4]}" if a - b else "",
             f"only on process {k}: {sorted(b - a)[:4]}" if b - a else ""]
    if not any(parts):
      parts = [f"the same {len(mine)} items in another order"]
    return f"{field} differ ({'; '.join(p for p in parts if p)})"
  return f"{field}: process 0 passes {mine!r}, process {k} passes {theirs!r}"


def agree(what: str, values: dict[str, Any]) -> None:
  """Raise on every process unless every process passes equal ``values``.

  Args:
    what: the caller, for messages (``"save_adapter"``).
    values: JSON-serialisable; lists are compared as lists and reported as
      the items only one side has.

  Raises:
    ValueError: the processes passed different values (names the field and
      the processes), on every process alike.
    TimeoutError: some process did not call ``what`` within ``timeout_s()``.
  """
  if not is_multiprocess():
    return
  key = _key(what)
  _set(f"{key}/{jax.process_index()}", json.dumps(values, sort_keys=True))
  seen = [json.loads(_get(f"{key}/{k}", what, k)) for k in range(jax.process_count())]
  problems = [_differences(f, seen[0][f], other.get(f), k)
              for k, other in enumerate(seen) for f in values
              if k and other.get(f) != seen[0][f]]
  if problems:
    raise ValueError(
        f"{what}: the {len(seen)} processes passed different arguments: "
        + "; ".join(problems[:4])
        + f". Every process must call {what} with the same directory and the same "
        "params (the global arrays of one model)")


def on_primary(what: str, fn: Callable[[], Any]) -> Any:
  """``fn()`` run on process 0; its (JSON-serialisable) result on every process.

  An exception in ``fn`` is raised on process 0 and, as the same type with
  the same message, on the others.
  """
  if not is_multiprocess():
    return fn()
  key = _key(what)
  if is_primary():
    try:
      result = fn()
    except BaseException as e:
      _set(key, json.dumps({"error": type(e).__name__, "message": str(e)}))
      raise
    _set(key, json.dumps({"ok": result}))
    return result
  got = json.loads(_get(key, what, 0))
  if "error" in got:
    kind = _ERRORS.get(got["error"])
    if kind is None:
      raise RuntimeError(f"{what} failed on process 0: {got['error']}: {got['message']}")
    raise kind(got["message"])
  return got["ok"]


def summary(tree: Any) -> list[str]:
  """One line per leaf of ``tree``: its path, dtype and shape (for ``agree``).

  Example:
    >>> import jax.numpy as jnp
    >>> summary({"w": jnp.ones((2, 3)), "n": None, "s": 1.5})
    ["['s']: float", "['w']: float32[2, 3]"]
  """
  lines = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      desc = f"{np.dtype(x.dtype).name}{list(np.shape(x))}"
    else:
      desc = type(x).__name__
    lines.append(f"{jax.tree_util.keystr(path)}: {desc}")
  return lines


def gather(tree: Any) -> Any:
  """``tree`` with every array spread over several processes gathered whole.

  Each such array becomes a numpy array holding all of it, on every process
  (``multihost_utils.process_allgather``, a collective: every process must
  call this on the same structure). Other leaves are left as they are.
  """
  if not is_multiprocess():
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def whole(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return x
  return jax.tree.map(whole, tree)


def gather_adapter(params: Any) -> Any:
  """``params`` with the adapters' own arrays gathered whole (``gather``).

  Only LoraWeight's ``a``, ``b``, ``m`` and Trainable's ``value`` are gathered;
  base kernels stay where they are (an export needs only their shapes).
  """
  if not is_multiprocess():
    return params
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  own = [isinstance(p[-1], jax.tree_util.GetAttrKey) and p[-1].name in _ADAPTER_FIELDS
         if p else False for p, _ in leaves]
  return jax.tree_util.tree_unflatten(
      treedef, [gather(x) if mine else x for (_, x), mine in zip(leaves, own)])


def gathered(what: str, directory: Any, tree: Any,
             whole: Callable[[Any], Any] = gather) -> Any:
  """``whole(tree)`` once every process passed the same ``directory`` and structure.

  The first half of a multi-process file export: every process calls it
  (``agree``, then the collective gather); then each packs the tensors, so a
  bad input raises on every process alike, and ``write_once`` writes them.
  """
  if not is_multiprocess():
    return tree
  agree(what, {"directory": os.path.abspath(os.fspath(directory)),
               "params": summary(tree)})
  return whole(tree)


def write_once(what: str, write: Callable[[], Sequence[Any]]) -> list[str]:
  """Run ``write`` on process 0 only; every process gets the paths it wrote.

  The second half of a multi-process export (see ``gathered``); all processes
  wait for the files before returning. With one process: ``write()``.
  """
  written = on_primary(what, lambda: [os.fspath(f) for f in write()])
  barrier(what)
  return written
