"""Adapter checkpoints with Orbax: A, B, the fully trained leaves, and a JSON
description; nothing of the base model.

A checkpoint is an ordinary Orbax composite checkpoint with two items::

  <directory>/arrays/     StandardSave of {escaped path components...: {a, b} | {value}}
  <directory>/lora_jax/   JsonSave: format, version, config, and per path the
                          kind, roles, rank, scale, dropout, shapes and dtypes;
                          a sha256 digest of each field (format version 2)

so a ``CheckpointManager`` step directory written with ``adapter_args`` is the
same thing as a directory written by ``save_adapter``, and either loads with
``load_adapter(path_or_manager, base_params)`` and nothing else.

This module is the I/O layer: the format itself (``pack`` / ``unpack``) is
``checkpoint_format.py``, the checks of a description ``checkpoint_check.py``,
the atomic creation and replacement of a directory ``atomic_dir.py``. Loading
trusts nothing it reads: the description's fields, checksums and the stored
arrays' shapes are checked before any array is restored.
"""

import json
import os
import shutil

import orbax.checkpoint as ocp
from etils import epath

from lora_jax._src import atomic_dir, merge, stack_checkpoint, tree
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
    raise _exists(final, raced=True) from None


def save_adapter(directory, params: Params, step: int | None = None, config=None,
                 *, overwrite: bool = False) -> str:
  """Save the adapter of ``params``: A, B, trained leaves and a JSON description.

  The checkpoint is written to a temporary directory private to this call
  (beside the target) and moved into place when complete, so an interrupted
  save never leaves a checkpoint that loads wrong data: the previous one
  stays intact and loadable. Without ``overwrite`` the move succeeds only if
  nothing is at the target (Linux ``renameat2(RENAME_NOREPLACE)``): of
  several processes saving to one new path, exactly one succeeds and the
  others raise ``FileExistsError``. Overwriting swaps the directories
  atomically (``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, with
  the previous checkpoint kept at ``<directory>.lora_jax-old`` in between).
  An adapter whose checkpoint would be refused on loading (factors of a
  non-floating dtype, a scale <= 0, a dropout outside [0, 1)) is not saved.

  Args:
    directory: where to save, or an ``ocp.CheckpointManager`` (then ``step`` is
      required and the manager's options apply: ``max_to_keep``,
      ``save_interval_steps``...; the call blocks until the step is written).
    params: params holding LoraWeight / Trainable nodes (or ``lj.adapter(p)``).
    step: ``None`` saves into ``directory`` itself; an int saves into
      ``directory/<step>`` (Orbax's default step layout, so
      ``load_adapter(directory, base)`` finds the latest step).
    config: the ``LoraConfig``, recorded for reference (loading does not need it).
    overwrite: replace an existing checkpoint at the target directory.

  Returns:
    The path written (for a manager: the manager's directory).

  Raises:
    FileExistsError: the target exists (or another save created it first)
      and ``overwrite`` is False; nothing was written.
    ValueError: the params hold no adapter, or one that could not be loaded.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax._src.checkpoint import save_adapter, load_adapter
    >>> w = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> cfg = lj.LoraConfig(rank=2, alpha=4)
    >>> p = lj.lora_init(jax.random.key(0), w, cfg)
    >>> path = save_adapter(tempfile.mkdtemp() + "/run", p, config=cfg)
    >>> q = load_adapter(path, w)
    >>> q["dense"]["kernel"].scale, bool((q["dense"]["kernel"].a == p["dense"]["kernel"].a).all())
    (2.0, True)
  """
  if stack_checkpoint.holds_stack(params):
    if step is not None or isinstance(directory, ocp.CheckpointManager):
      raise ValueError("save_adapter: a stack of adapters (lj.stack_adapters) saves "
                       "to a directory, without step= or a CheckpointManager")
    return stack_checkpoint.save_stack(directory, params, overwrite=overwrite)
  if isinstance(directory, ocp.CheckpointManager):
    if step is None or overwrite:
      raise ValueError("save_adapter(manager, ...) needs step= and saves a new "
                       "step only (use manager.delete(step) to replace one)")
    directory.save(step, args=adapter_args(params, config, step))
    directory.wait_until_finished()
    return os.fspath(directory.directory)
  final = os.fspath(directory)
  final = os.path.abspath(final if step is None else os.path.join(final, str(step)))
  if os.path.exists(final) and not overwrite:
    raise _exists(final)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  atomic_dir.clean_stale(final)
  args = adapter_args(params, config, step)
  with atomic_dir.writing(final) as tmp:
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(tmp, args=args)
    publish(tmp, final, overwrite)
  shutil.rmtree(atomic_dir.previous(final), ignore_errors=True)  # an interrupted swap's
  return final


def _exists(final: str, raced: bool = False) -> FileExistsError:
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


def load_adapter(directory, base_params: Params, step: int | None = None) -> Params:
  """Load an adapter checkpoint onto ``base_params``.

  Needs nothing but the checkpoint and the base: paths, layouts, ranks and
  scales come from the checkpoint's description. Restored A / B are read
  straight into shardings derived from their base kernel's (each factor axis
  sharded like the kernel axis it stands for, the rank axis replicated; a
  kernel sharding that cannot be mapped gives replicated factors on its
  devices); trained leaves take the sharding of the leaf they replace.

  Args:
    directory: a checkpoint directory from ``save_adapter``, a directory of
      step subdirectories (the latest step is loaded unless ``step`` is given),
      or an ``ocp.CheckpointManager``.
    base_params: the base model's params (plain, or holding adapters: their
      base kernels are used, as ``lora_jax.base(params)``).
    step: which step to load; ``None`` loads the checkpoint itself or the latest step.

  Returns:
    ``base_params`` with LoraWeight / Trainable nodes, ready for ``lora(fn)``.

  Raises:
    FileNotFoundError: no checkpoint (or step) at ``directory``.
    ValueError: not a lora_jax checkpoint, a newer format version, a damaged
      or edited description (the file and the field), stored arrays that do
      not match it, or an adapter that does not fit the base (each path with
      both shapes).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax._src.checkpoint import save_adapter, load_adapter
    >>> w = {"kernel": jnp.ones((4, 3))}
    >>> p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="kernel"))
    >>> d = tempfile.mkdtemp()
    >>> for step in (10, 20):
    ...     _ = save_adapter(d, p, step=step)
    >>> sorted(os.listdir(d)), load_adapter(d, w)["kernel"].rank
    (['10', '20'], 2)
  """
  if step is None and stack_checkpoint.is_stack_dir(directory):
    return stack_checkpoint.load_stack(directory, base_params)
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
