"""Adapter checkpoints with Orbax: A, B, the fully trained leaves, and a JSON
description; nothing of the base model.

A checkpoint is an ordinary Orbax composite checkpoint with two items::

  <directory>/arrays/     StandardSave of {escaped path components...: {a, b} | {value}}
  <directory>/lora_jax/   JsonSave: format, version, config, and per path the
                          kind, roles, rank, scale, dropout, shapes and dtypes

so a ``CheckpointManager`` step directory written with ``adapter_args`` is the
same thing as a directory written by ``save_adapter``, and either loads with
``load_adapter(path_or_manager, base_params)`` and nothing else.

This module is the I/O layer: the format itself (``pack`` / ``unpack``) is
``checkpoint_format.py``, the atomic replacement of a directory
``atomic_dir.py``.
"""

import os

import orbax.checkpoint as ocp

from lora_jax._src import atomic_dir, merge, tree
from lora_jax._src.checkpoint_format import (ARRAYS, INFO, check_description, fit_errors,
                                             pack, restore_target, unpack)
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
  return ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays),
                               INFO: ocp.args.JsonSave(description)})


def save_adapter(directory, params: Params, step: int | None = None, config=None,
                 *, overwrite: bool = False) -> str:
  """Save the adapter of ``params``: A, B, trained leaves and a JSON description.

  The checkpoint is written to a sibling temporary directory and moved into
  place when complete, so an interrupted save never leaves a checkpoint that
  loads wrong data: the previous one stays intact and loadable. Overwriting
  an existing checkpoint needs ``overwrite=True`` and swaps the directories
  atomically (Linux ``renameat2``; elsewhere two renames, with the previous
  checkpoint kept at ``<directory>.lora_jax-old`` in between).

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
    raise FileExistsError(f"save_adapter: {final} already exists; pass "
                          "overwrite=True to replace it (done atomically)")
  os.makedirs(os.path.dirname(final), exist_ok=True)
  atomic_dir.clean_stale(final)
  args = adapter_args(params, config, step)
  tmp = atomic_dir.temp_sibling(final)
  ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(tmp, args=args)
  atomic_dir.swap_in(tmp, final)
  return final


def _steps(path: str) -> list[int]:
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path)
                if n.isdigit() and os.path.isdir(os.path.join(path, n, INFO)))


def _describe_dir(path: str) -> str:
  names = sorted(os.listdir(path))[:8]
  return f"found {names}" if names else "found an empty directory"


def _resolve(directory, step: int | None):
  """``(restore(args), where)`` for a checkpoint directory or a manager."""
  if isinstance(directory, ocp.CheckpointManager):
    step = directory.latest_step() if step is None else step
    if step is None or step not in directory.all_steps():
      raise FileNotFoundError(f"load_adapter: no step {step} in the manager at "
                              f"{directory.directory}; steps: {list(directory.all_steps())}")
    return (lambda args: directory.restore(step, args=args),
            f"{directory.directory} (step {step})")
  path = os.path.abspath(os.fspath(directory))
  if not os.path.exists(path):
    old = atomic_dir.previous(path)
    hint = (f"; a save was interrupted while replacing it: the previous "
            f"checkpoint is intact at {old}") if os.path.isdir(old) else ""
    raise FileNotFoundError(f"load_adapter: no checkpoint at {path}{hint}")
  if step is not None or not os.path.isdir(os.path.join(path, INFO)):
    steps = _steps(path)
    if step is None and steps:
      step = steps[-1]
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"load_adapter: no step {step} under {path}; "
                                f"steps found: {steps}")
      path = os.path.join(path, str(step))
  if not os.path.isfile(os.path.join(path, INFO, "metadata")):
    raise ValueError(
        f"{path} is not a lora_jax adapter checkpoint: expected "
        f"'{INFO}/metadata' and '{ARRAYS}/' (written by save_adapter) or step "
        f"subdirectories holding them; {_describe_dir(path)}")
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  return lambda args: checkpointer.restore(path, args=args), path


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
  restore, where = _resolve(directory, step)
  info = restore(ocp.args.Composite(**{INFO: ocp.args.JsonRestore()}))[INFO]
  check_description(info, where)
  return info


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
    ValueError: not a lora_jax checkpoint, a newer format version, or an
      adapter that does not fit the base (each path with both shapes).

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
  restore, where = _resolve(directory, step)
  info = restore(ocp.args.Composite(**{INFO: ocp.args.JsonRestore()}))[INFO]
  check_description(info, where)
  base_params = merge.base(base_params)
  leaves = dict(tree.flatten(base_params, is_leaf=is_node)[0])  # a QuantizedWeight whole
  errors = fit_errors(info["entries"], leaves)
  if errors:
    missing = any("not in the base params" in e for e in errors)
    raise ValueError(
        f"load_adapter: the checkpoint at {where} does not fit the base params:\n  "
        + "\n  ".join(errors)
        + (f"\nPaths that exist:{tree.some_paths(sorted(leaves))}" if missing else ""))
  target = restore_target(info["entries"], leaves)
  arrays = restore(ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(target)}))[ARRAYS]
  return unpack(arrays, info, base_params)
