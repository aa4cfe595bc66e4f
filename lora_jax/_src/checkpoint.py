"""Adapter checkpoints with Orbax: A, B, the fully trained leaves, and a JSON
description; nothing of the base model.

A checkpoint is an ordinary Orbax composite checkpoint with two items::

  <directory>/arrays/     StandardSave of {escaped path components...: {a, b} | {value}}
  <directory>/lora_jax/   JsonSave: format, version, config, and per path the
                          kind, roles, rank, scale, dropout, shapes and dtypes

so a ``CheckpointManager`` step directory written with ``adapter_args`` is the
same thing as a directory written by ``save_adapter``, and either loads with
``load_adapter(path_or_manager, base_params)`` and nothing else.
"""

import ctypes
import ctypes.util
import json
import os
import re
import shutil
import uuid
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax._src import merge, sharding, tree
from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, factor_shapes, is_node

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
ARRAYS = "arrays"  # Orbax item holding the arrays
INFO = "lora_jax"  # Orbax item holding the JSON description
_TMP = ".lora_jax-tmp-"  # sibling being written: <name>.lora_jax-tmp-<id>
_OLD = ".lora_jax-old"  # previous checkpoint during a non-atomic swap
_SAFE = re.compile(r"[A-Za-z0-9_]")


def _version() -> str:
  import lora_jax  # pylint: disable=import-outside-toplevel
  return lora_jax.__version__


# ---------------------------------------------------------------- pure part --


def escape(component: str) -> str:
  """An Orbax-safe key for one path component (injective).

  Letters, digits and ``_`` stay; every other byte becomes ``-XX`` (hex), and
  the empty component is ``-``. Orbax joins keys with ``.``, so ``.`` and ``/``
  must never reach it.

  Example:
    >>> escape("layers"), escape("0"), escape("a.b/c"), escape("")
    ('layers', '0', 'a-2Eb-2Fc', '-')
  """
  if not component:
    return "-"
  return "".join(c if _SAFE.fullmatch(c) else "".join(
      f"-{byte:02X}" for byte in c.encode()) for c in component)


def _spec(x) -> dict:
  return {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}


def _entry(x, kernel) -> tuple[dict, dict]:
  """(JSON description, arrays) of one adapter node."""
  if isinstance(x, Trainable):
    return {"kind": "trainable", "value": _spec(x.value)}, {"value": x.value}
  info = {"kind": "lora", "roles": x.roles, "rank": x.rank,
          "scale": float(x.scale), "dropout": float(x.dropout),
          "kernel": None if kernel is None else _spec(kernel),
          "a": _spec(x.a), "b": _spec(x.b)}
  return info, {"a": x.a, "b": x.b}


def _put(nested: dict, keys: list[str], value: dict) -> None:
  for k in keys[:-1]:
    nested = nested.setdefault(k, {})
  nested[keys[-1]] = value


def _check_prefix_free(keys: dict) -> None:
  """No node's key may be a prefix of another's (they would nest into each other)."""
  ordered = sorted((tuple(k), p) for p, k in keys.items())
  for (k1, p1), (k2, p2) in zip(ordered, ordered[1:]):
    if k2[:len(k1)] == k1:
      raise ValueError(f"save_adapter: adapter paths {p1!r} and {p2!r} nest into "
                       "each other; they cannot both be saved")


def pack(params: Params, config=None, step: int | None = None) -> tuple[dict, dict]:
  """Split params into ``(arrays, description)`` for an adapter checkpoint.

  Args:
    params: params holding LoraWeight / Trainable nodes, or an adapter dict
      from ``lora_jax.adapter``.
    config: optional ``LoraConfig``, recorded with ``config.to_dict()``.
    step: optional training step, recorded in the description.

  Returns:
    ``arrays``: a nested dict (Orbax-safe keys) of A, B and trained values;
    ``description``: a JSON-serialisable dict.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"layers": {"0": {"kernel": jnp.ones((4, 3))}}},
    ...                  lj.LoraConfig(rank=2))
    >>> arrays, info = pack(p)
    >>> jax.tree.map(jnp.shape, arrays), info["entries"]["layers/0/kernel"]["roles"]
    ({'layers': {'0': {'kernel': {'a': (4, 2), 'b': (2, 3)}}}}, 'io')
  """
  kernels = dict(tree.flatten(params, is_leaf=is_node)[0])
  arrays, entries, nbytes = {}, {}, 0
  for path, x in merge.adapter(params).items():
    w = getattr(kernels.get(path), "w", None)
    info, arr = _entry(x, w)
    info["key"] = [escape(c) for c in path.split("/")]
    _put(arrays, info["key"], arr)
    entries[path] = info
    nbytes += sum(int(v.size) * np.dtype(v.dtype).itemsize for v in arr.values())
  _check_prefix_free({p: e["key"] for p, e in entries.items()})
  if not entries:
    raise ValueError("save_adapter: the params hold no LoraWeight or Trainable "
                     "node; pass the params returned by lora_jax.lora_init")
  description = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "lora_jax_version": _version(), "step": step, "nbytes": nbytes,
      "config": None if config is None else config.to_dict(),
      "entries": entries}
  return arrays, json.loads(json.dumps(description, default=repr))


def _check_description(info: Any, where: str) -> None:
  if not isinstance(info, Mapping) or info.get("format") != FORMAT:
    raise ValueError(f"{where} is not a lora_jax adapter checkpoint: expected "
                     f"format {FORMAT!r} in its '{INFO}' item, found "
                     f"{dict(info).get('format') if isinstance(info, Mapping) else info!r}")
  version = info.get("format_version")
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise ValueError(
        f"{where} was written in lora_jax checkpoint format version {version} "
        f"(by lora_jax {info.get('lora_jax_version')}); this lora_jax "
        f"({_version()}) reads format versions <= {FORMAT_VERSION}. Upgrade lora_jax.")


def _fit_errors(entries: dict, leaves: dict) -> list[str]:
  """Every way the checkpoint's entries do not fit the base leaves."""
  errors = []
  for path, e in entries.items():
    if path not in leaves:
      errors.append(f"{path}: in the checkpoint, not in the base params")
      continue
    shape = tuple(np.shape(leaves[path]))
    if e["kind"] == "trainable":
      saved = tuple(e["value"]["shape"])
      if saved != shape:
        errors.append(f"{path}: trained leaf of shape {saved} in the checkpoint, "
                      f"the base leaf has shape {shape}")
      continue
    kernel = tuple(e["kernel"]["shape"]) if e.get("kernel") else None
    saved = {"a": tuple(e["a"]["shape"]), "b": tuple(e["b"]["shape"])}
    fits = len(e["roles"]) == len(shape) and dict(zip(
        ("a", "b"), factor_shapes(shape, e["roles"], e["rank"]))) == saved
    if not fits or (kernel is not None and kernel != shape):
      errors.append(f"{path}: the checkpoint's kernel has shape {kernel} (a "
                    f"{saved['a']}, b {saved['b']}, roles {e['roles']!r}), the "
                    f"base kernel has shape {shape}")
  return errors


def _replicated(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """Replicated on the devices (and mesh) of ``s``."""
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  if s.is_fully_replicated:
    return s
  devices = np.array(sorted(s.device_set, key=lambda d: d.id))
  return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)),
                                    jax.sharding.PartitionSpec())


def _factor_shardings(leaf, roles: str) -> tuple[Any, Any]:
  """Shardings of A and B for the base kernel ``leaf``.

  Derived from the kernel's sharding axis by axis (``sharding.factor_shardings``);
  replicated on the kernel's devices where that mapping does not apply.
  """
  s = getattr(leaf, "sharding", None)
  if s is None:
    return None, None
  derive = getattr(sharding, "factor_shardings", None)
  if derive is not None:
    try:
      return derive(s, roles)
    except (TypeError, ValueError):
      pass
  return _replicated(s), _replicated(s)


def _abstract(entries: dict, leaves: dict) -> dict:
  """The restore target: ShapeDtypeStructs with shardings from the base."""
  target = {}
  for path, e in entries.items():
    leaf = leaves[path]
    if e["kind"] == "trainable":
      shardings = {"value": getattr(leaf, "sharding", None)}
    else:
      shardings = dict(zip(("a", "b"), _factor_shardings(leaf, e["roles"])))
    arr = {n: jax.ShapeDtypeStruct(tuple(e[n]["shape"]), jax.numpy.dtype(e[n]["dtype"]),
                                   sharding=sh) for n, sh in shardings.items()}
    _put(target, e["key"], arr)
  return target


def _lookup(nested: dict, keys: list[str]) -> dict:
  for k in keys:
    nested = nested[k]
  return nested


def unpack(arrays: dict, description: dict, base_params: Params) -> Params:
  """Inverse of ``pack``: attach restored arrays to ``base_params``.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"kernel": jnp.ones((4, 3))}
    >>> p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="kernel"))
    >>> q = unpack(*pack(p), w)
    >>> bool((q["kernel"].a == p["kernel"].a).all()), q["kernel"].scale
    (True, 1.0)
  """
  leaves = dict(tree.flatten(base_params)[0])
  out = {}
  for path, e in description["entries"].items():
    arr = _lookup(arrays, e["key"])
    if e["kind"] == "trainable":
      out[path] = Trainable(arr["value"], None)
      continue
    a, b = arr["a"], arr["b"]
    if isinstance(leaves.get(path), jax.Array):  # no-op where restored in place
      a, b = sharding.place_factors(leaves[path], a, b, e["roles"])
    out[path] = LoraWeight(None, a, b, scale=e["scale"], roles=e["roles"],
                           dropout=e["dropout"])
  return merge.attach(base_params, out)


# ------------------------------------------------------------------ I/O part --


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


def _exchange(a: str, b: str) -> bool:
  """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(new: str, final: str) -> None:
  """Move the finished checkpoint ``new`` to ``final``, replacing any old one."""
  if not os.path.exists(final):
    os.rename(new, final)
  elif _exchange(new, final):
    shutil.rmtree(new)  # now holds the old checkpoint
  else:  # two renames; load_adapter points at <final>.lora_jax-old in the gap
    old = final + _OLD
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(new, final)
  shutil.rmtree(final + _OLD, ignore_errors=True)


def _clean_stale(final: str) -> None:
  parent, name = os.path.split(final)
  for entry in os.listdir(parent or "."):
    if entry.startswith(name + _TMP):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


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
  _clean_stale(final)
  args = adapter_args(params, config, step)
  tmp = final + _TMP + uuid.uuid4().hex[:8]
  ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(tmp, args=args)
  _swap_in(tmp, final)
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
    old = path + _OLD
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
  _check_description(info, where)
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
  _check_description(info, where)
  base_params = merge.base(base_params)
  leaves = dict(tree.flatten(base_params)[0])
  errors = _fit_errors(info["entries"], leaves)
  if errors:
    missing = any("not in the base params" in e for e in errors)
    raise ValueError(
        f"load_adapter: the checkpoint at {where} does not fit the base params:\n  "
        + "\n  ".join(errors)
        + (f"\nPaths that exist:{tree.some_paths(sorted(leaves))}" if missing else ""))
  target = _abstract(info["entries"], leaves)
  arrays = restore(ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(target)}))[ARRAYS]
  return unpack(arrays, info, base_params)
