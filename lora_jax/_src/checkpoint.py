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

This module is the public front: ``save_adapter`` / ``load_adapter`` dispatch
to the one-adapter writer and reader (``adapter_checkpoint.py``, which also
holds the atomic, multi-process save protocol) or to the stack's
(``stack_checkpoint.py``, over the same protocol). The format itself
(``pack`` / ``unpack``) is ``checkpoint_format.py``, the checks of a
description ``checkpoint_check.py``, the atomic creation and replacement of
a directory ``atomic_dir.py``. Loading trusts nothing it reads: the
description's fields, checksums and the stored arrays' shapes are checked
before any array is restored.
"""

import os  # noqa: F401  (the examples below use it)

import orbax.checkpoint as ocp

from lora_jax._src import adapter_checkpoint, stack_checkpoint
from lora_jax._src.adapter_checkpoint import adapter_args as adapter_args
from lora_jax._src.adapter_checkpoint import read_description as read_description
from lora_jax._src.types import Params


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

  With several processes (``jax.distributed``) every process calls it, with
  the same directory and the same params (global arrays): each process
  writes its shards of the factors through Orbax, process 0 alone moves the
  checkpoint into place, and every call returns once it is there. The
  guarantees above hold as on one process. Processes that pass different
  directories or params all raise ``ValueError``; a process that never calls
  it makes the others raise ``TimeoutError`` after ``LORA_JAX_SYNC_TIMEOUT``
  seconds (default 300) instead of waiting forever.

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
    ValueError: the params hold no adapter, or one that could not be loaded;
      or (several processes) the processes passed different arguments.
    TimeoutError: (several processes) some process did not call it in time.

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
  return adapter_checkpoint.save_one(directory, params, step, config, overwrite=overwrite)


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
  return adapter_checkpoint.load_one(directory, base_params, step)
