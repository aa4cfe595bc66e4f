"""One adapter checkpoint: its write, its atomic publish, its read.

The one place of the save protocol, on one process and on many
(``jax.distributed``): ``save_atomically`` runs a writer into a temporary
directory beside the target and publishes it (``atomic_dir``); the single
adapter writer (``save_one``) and the stack writer (``stack_checkpoint``)
both go through it. ``checkpoint.py`` is the public front (``save_adapter``,
``load_adapter``) that dispatches to the two.

With several processes every process calls the save (Orbax writes each
process's shards of the global arrays): the processes first agree on the
target and the params' structure (``multihost.agree``: a clear error on
every process, never a hang), process 0 alone checks the target, makes the
temporary directory and tells the others its path; all write there through
Orbax; process 0 alone publishes it (or fails, and all raise its error); all
wait for each other before returning. A kill of any process midway leaves
the previous checkpoint in place; the next save removes the dead writer's
temporary directory.
"""

import contextlib
import json
import os
import shutil
from typing import Callable

import orbax.checkpoint as ocp
from etils import epath

from lora_jax._src import atomic_dir, merge, multihost, tree
from lora_jax._src.checkpoint_check import check_arrays, check_description, seal
from lora_jax._src.checkpoint_format import (ARRAYS, INFO, fit_errors, pack, restore_target,
                                             unpack)
from lora_jax._src.types import Params
from lora_jax._src.weight import is_node


def adapter_args(params: Params, config=None, step: int | None = None) -> ocp.args.Composite:
  """Orbax save args for an adapter: hand them to a ``CheckpointManager``.

  The manager must be created without ``item_names`` / ``item_handlers`` (a
  plain ``ocp.CheckpointManager(directory, options=...)``). Other items can be
  saved in the same step: ``ocp.args.Composite(**adapter_args(p),
  opt_state=ocp.args.StandardSave(opt_state))``; ``load_adapter`` ignores them.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, orbax.checkpoint as ocp, lora_jax as lj
    >>> from lora_jax._src.checkpoint import adapter_args, load_adapter
    >>> w = {"kernel": jnp.ones((4, 3))}
    >>> p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="kernel"))
    >>> mngr = ocp.CheckpointManager(tempfile.mkdtemp(),
    ...     options=ocp.CheckpointManagerOptions(max_to_keep=2))
    >>> for step in range(4):                       # a training loop's periodic save
    ...     _ = mngr.save(step, args=adapter_args(p, step=step))
    >>> mngr.wait_until_finished(); mngr.all_steps()
    [2, 3]
    >>> load_adapter(mngr, w)["kernel"].rank         # the latest step
    2
  """
  arrays, description = pack(params, config, step)
  description = seal(description)
  return ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays),
                               INFO: ocp.args.JsonSave(description)})


def publish(tmp: str, final: str, overwrite: bool) -> None:
  """Move a complete checkpoint ``tmp`` to ``final``: swapped in atomically
  with ``overwrite``, else created only if nothing is there (a racing writer
  that got there first is a ``FileExistsError``)."""
  if overwrite:
    atomic_dir.swap_in(tmp, final)
    return
  try:
    atomic_dir.create(tmp, final)
  except FileExistsError:
    raise exists_error(final, raced=True) from None


def write(path: str, args: ocp.args.Composite) -> None:
  """Write an adapter checkpoint (``adapter_args``) to the new directory ``path``.

  No atomicity of its own (Orbax's temporary directory aside): call it inside
  ``save_atomically``. With several processes, every process calls it.
  """
  ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(path, args=args)


def fingerprint(args: ocp.args.Composite) -> list[str]:
  """What every process must save alike: a line per adapter path, the config, the step."""
  info = args[INFO].item
  lines = [f"{p}: " + json.dumps({k: v for k, v in e.items() if k != "key"}, sort_keys=True)
           for p, e in info["entries"].items()]
  return lines + [f"config: {json.dumps(info['config'], sort_keys=True)}",
                  f"step: {info['step']}"]


def save_atomically(final: str, write_into: Callable[[str], None], *, overwrite: bool,
                    params_lines: list[str], what: str = "save_adapter") -> str:
  """Write a checkpoint with ``write_into(tmp)`` and move it to ``final`` atomically.

  The protocol (see the module docstring): agree, process 0 prepares the
  temporary directory, all write, process 0 publishes, all wait.
  ``params_lines`` describe the params (``fingerprint``); the processes must
  pass equal ones.
  """
  final = os.path.abspath(final)
  multihost.agree(what, {"directory": final, "overwrite": bool(overwrite),
                         "params": params_lines})
  with contextlib.ExitStack() as owned:  # process 0's temporary directory

    def prepare() -> str:
      if os.path.exists(final) and not overwrite:
        raise exists_error(final)
      os.makedirs(os.path.dirname(final), exist_ok=True)
      atomic_dir.clean_stale(final)
      return owned.enter_context(atomic_dir.writing(final))

    tmp = multihost.on_primary(what, prepare)
    write_into(tmp)
    multihost.on_primary(what, lambda: publish(tmp, final, overwrite))
  if multihost.is_primary():
    shutil.rmtree(atomic_dir.previous(final), ignore_errors=True)  # an interrupted swap's
  multihost.barrier(what)
  return final


def save_one(directory, params: Params, step: int | None = None, config=None,
             *, overwrite: bool = False) -> str:
  """``save_adapter`` for params holding one adapter (not a stack)."""
  args = adapter_args(params, config, step)  # refuses an adapter that would not load
  if isinstance(directory, ocp.CheckpointManager):
    if step is None or overwrite:
      raise ValueError("save_adapter(manager, ...) needs step= and saves a new "
                       "step only (use manager.delete(step) to replace one)")
    multihost.agree("save_adapter", {"directory": os.fspath(directory.directory),
                                     "step": step, "params": fingerprint(args)})
    directory.save(step, args=args)
    directory.wait_until_finished()
    multihost.barrier("save_adapter")
    return os.fspath(directory.directory)
  final = os.fspath(directory)
  final = final if step is None else os.path.join(final, str(step))
  return save_atomically(final, lambda tmp: write(tmp, args), overwrite=overwrite,
                         params_lines=fingerprint(args))


def exists_error(final: str, raced: bool = False) -> FileExistsError:
  when = " (another save created it while this one was writing)" if raced else ""
  return FileExistsError(f"save_adapter: {final} already exists{when}; nothing was "
                         "written. Pass overwrite=True to replace it (done atomically) "
                         "or save to another path")


def _steps(path: str) -> list[int]:
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path)
                if n.isdigit() and os.path.isdir(os.path.join(path, n, INFO)))


def _describe_dir(path: str) -> str:
  names = sorted(os.listdir(path))[:8]
  return f"found {names}" if names else "found an empty directory"


def _manager_step(mngr: ocp.CheckpointManager, step: int | None) -> str:
  """The directory of ``step`` (latest if None) of a CheckpointManager."""
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"load_adapter: no step {step} in the manager at "
                            f"{mngr.directory}; steps: {list(mngr.all_steps())}")
  find = getattr(mngr, "_get_read_step_directory", None)  # honours step_name_format
  if find is not None:
    return os.fspath(find(step, epath.Path(mngr.directory)))
  return os.path.join(os.fspath(mngr.directory), str(step))


def _resolve(directory, step: int | None) -> str:
  """The checkpoint directory for a path, a directory of steps, or a manager."""
  if isinstance(directory, ocp.CheckpointManager):
    path = _manager_step(directory, step)
  else:
    path = os.path.abspath(os.fspath(directory))
    if not os.path.exists(path):
      old = atomic_dir.previous(path)
      hint = (f"; a save was interrupted while replacing it: the previous "
              f"checkpoint is intact at {old}") if os.path.isdir(old) else ""
      raise FileNotFoundError(f"load_adapter: no checkpoint at {path}{hint}")
    if not os.path.isdir(path):
      raise ValueError(f"{path} is a file, not a lora_jax adapter checkpoint: expected "
                       f"the directory save_adapter writes ('{INFO}/metadata' and "
                       f"'{ARRAYS}/')")
    if step is not None or not os.path.isdir(os.path.join(path, INFO)):
      path = _step_dir(path, step)
  if not os.path.isfile(os.path.join(path, INFO, "metadata")):
    raise ValueError(
        f"{path} is not a lora_jax adapter checkpoint: expected "
        f"'{INFO}/metadata' and '{ARRAYS}/' (written by save_adapter) or step "
        f"subdirectories holding them; {_describe_dir(path)}")
  if not os.path.isdir(os.path.join(path, ARRAYS)):
    raise ValueError(
        f"{path}: the checkpoint has no '{ARRAYS}/' directory (its A, B and trained "
        f"values); expected '{INFO}/' and '{ARRAYS}/' as save_adapter writes them, "
        f"{_describe_dir(path)}. The checkpoint is incomplete: save the adapter again.")
  return path


def _step_dir(path: str, step: int | None) -> str:
  """``path/<step>`` (the latest step if None), or ``path`` when it has no steps."""
  steps = _steps(path)
  if step is None and steps:
    step = steps[-1]
  if step is None:
    return path
  if step not in steps:
    raise FileNotFoundError(f"load_adapter: no step {step} under {path}; "
                            f"steps found: {steps}")
  return os.path.join(path, str(step))


def _read_description(path: str) -> dict:
  """The checked JSON description of the checkpoint directory ``path``."""
  file = os.path.join(path, INFO, "metadata")
  with open(file, "rb") as f:
    raw = f.read()
  try:
    info = json.loads(raw)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(
        f"{file}: the adapter description is not valid JSON ({e}); expected the "
        f"JSON object save_adapter writes, found {len(raw)} bytes starting "
        f"{raw[:40]!r}. The file is damaged or truncated: restore it or save the "
        "adapter again.") from None
  check_description(info, file)
  return info


def _cause(e: Exception) -> str:
  """An Orbax / TensorStore error, short: its type and first 300 characters."""
  text = str(e).split(" [tensorstore_spec=")[0]
  return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _read_arrays(path: str, info: dict, leaves: dict) -> dict:
  """The arrays of the checkpoint at ``path``, checked against ``info`` first."""
  where = os.path.join(path, ARRAYS)
  handler = ocp.StandardCheckpointHandler()
  try:
    stored = handler.metadata(epath.Path(where)).tree
  except Exception as e:  # Orbax raises many kinds; each means a damaged item
    raise ValueError(f"{where}: cannot read the stored arrays' metadata "
                     f"({_cause(e)}); expected the Orbax item save_adapter "
                     "writes. The checkpoint is damaged: save the adapter again.") from e
  check_arrays(info["entries"], stored, where)
  target = restore_target(info["entries"], leaves)
  args = ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(target)})
  try:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(path, args=args)[ARRAYS]
  except Exception as e:
    raise ValueError(f"{where}: reading the arrays failed ({_cause(e)}). "
                     "The checkpoint is damaged: save the adapter again.") from e


def read_description(directory, step: int | None = None) -> dict:
  """The JSON description of a checkpoint (paths, ranks, shapes, config).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax._src.checkpoint import save_adapter, read_description
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=2, targets="kernel"))
    >>> info = read_description(save_adapter(tempfile.mkdtemp() + "/a", p))
    >>> info["entries"]["kernel"]["a"]
    {'shape': [4, 2], 'dtype': 'float32'}
  """
  return _read_description(_resolve(directory, step))



def load_one(directory, base_params: Params, step: int | None = None) -> Params:
  """``load_adapter`` of one adapter (not a stack)."""
  path = _resolve(directory, step)
  info = _read_description(path)
  base_params = merge.base(base_params)
  leaves = dict(tree.flatten(base_params, is_leaf=is_node)[0])  # a QuantizedWeight whole
  errors = fit_errors(info["entries"], leaves)
  if errors:
    missing = any("not in the base params" in e for e in errors)
    raise ValueError(
        f"load_adapter: the checkpoint at {path} does not fit the base params:\n  "
        + "\n  ".join(errors)
        + (f"\nPaths that exist:{tree.some_paths(sorted(leaves))}" if missing else ""))
  return unpack(_read_arrays(path, info, leaves), info, base_params)
