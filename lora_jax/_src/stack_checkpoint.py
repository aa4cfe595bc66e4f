"""Checkpoints of a stack of adapters: one ordinary adapter checkpoint per member.

Layout (written atomically, as ``save_adapter`` writes one adapter)::

  <directory>/lora_jax_stack.json   format, version, names, member dirs, and
                                    per member its ranks and scales
  <directory>/<i>/                  member i: an adapter checkpoint (Orbax;
                                    per-field checks and checksums)

so every member also loads on its own with ``load_adapter(directory/<i>, base)``
and exports to PEFT like any adapter. ``save_adapter`` / ``load_adapter``
dispatch here when the params hold a stack / the directory holds a stack;
the members are written and read by ``adapter_checkpoint.py``, the whole
published by its atomic (multi-process) save.
"""

import json
import os

import numpy as np

from lora_jax._src import adapter_checkpoint, merge, multihost, tree
from lora_jax._src.stack import (StackedLora, attach_stack, is_stack, stack_adapters,
                                 unstack_adapters)

FILE = "lora_jax_stack.json"
FORMAT, VERSION = "lora_jax_stack", 1


def holds_stack(params) -> bool:
  """True if ``params`` (or an adapter) holds a ``StackedLora``."""
  leaves, _ = tree.flatten(params, is_leaf=is_stack)
  return any(is_stack(x) for _, x in leaves)


def is_stack_dir(directory) -> bool:
  return isinstance(directory, (str, os.PathLike)) and os.path.isfile(
      os.path.join(os.fspath(directory), FILE))


def _summary(members: dict) -> dict:
  return {n: {p: {"rank": lw.rank, "scale": lw.scale} for p, lw in ad.items()}
          for n, ad in members.items()}


def save_stack(directory, params, *, overwrite: bool = False) -> str:
  """Save every member of the stack in ``params``; the path written.

  One atomic save (``adapter_checkpoint.save_atomically``, on one process or
  many) of a directory holding each member's adapter checkpoint.
  """
  members = unstack_adapters(params)
  args = [adapter_checkpoint.adapter_args(ad) for ad in members.values()]
  info = {"format": FORMAT, "version": VERSION, "names": list(members),
          "members": [str(i) for i in range(len(members))], "adapters": _summary(members)}
  lines = [f"{n}/{line}" for n, a in zip(members, args)
           for line in adapter_checkpoint.fingerprint(a)]

  def write_into(tmp: str) -> None:
    multihost.on_primary("save_adapter", lambda: os.makedirs(tmp))
    for i, a in enumerate(args):
      adapter_checkpoint.write(os.path.join(tmp, str(i)), a)

    def describe() -> None:
      with open(os.path.join(tmp, FILE), "w") as f:
        json.dump(info, f, indent=1)
    multihost.on_primary("save_adapter", describe)

  return adapter_checkpoint.save_atomically(os.fspath(directory), write_into,
                                            overwrite=overwrite, params_lines=lines)


def _read(path: str) -> dict:
  file = os.path.join(path, FILE)
  try:
    with open(file) as f:
      info = json.load(f)
  except ValueError as e:
    raise ValueError(f"{file}: the stack description is not valid JSON ({e}); the "
                     "file is damaged: save the stack again") from None
  problems = []
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    problems.append(f"format is {info.get('format') if isinstance(info, dict) else info!r}, "
                    f"expected {FORMAT!r}")
  elif info.get("version") != VERSION:
    problems.append(f"version is {info.get('version')!r}; this lora_jax reads {VERSION}")
  else:
    names, dirs = info.get("names"), info.get("members")
    if (not isinstance(names, list) or not names or len(set(map(str, names))) != len(names)
        or not all(isinstance(n, str) for n in names)):
      problems.append(f"names is {names!r}, expected a list of unique strings")
    elif not isinstance(dirs, list) or len(dirs) != len(names) or not all(
        isinstance(d, str) and d.isdigit() for d in dirs):
      problems.append(f"members is {dirs!r}, expected {len(names)} member directories")
    elif not isinstance(info.get("adapters"), dict) or set(info["adapters"]) != set(names):
      problems.append("adapters (each member's ranks and scales) does not list the names")
  if problems:
    raise ValueError(f"{file}: not a lora_jax stack description: {'; '.join(problems)}")
  return info


def load_stack(directory, base_params):
  """Load a stack saved by ``save_stack`` onto ``base_params``."""
  path = os.path.abspath(os.fspath(directory))
  info = _read(path)
  base = merge.base(_unstacked(base_params))
  members = []
  for name, d in zip(info["names"], info["members"]):
    ad = merge.adapter(adapter_checkpoint.load_one(os.path.join(path, d), base))
    want = info["adapters"][name]
    got = _summary({name: ad})[name]
    if _rounded(got) != _rounded(want):
      raise ValueError(f"{path}/{d}: member {name!r} holds ranks / scales {got}, the "
                       f"stack description ({FILE}) says {want}: the member directory "
                       "was replaced or edited; save the stack again")
    members.append(ad)
  return attach_stack(base, stack_adapters(members, names=info["names"]))


def _rounded(summary: dict) -> dict:
  return {p: (v["rank"], float(np.float32(v["scale"]))) for p, v in summary.items()}


def _unstacked(params):
  """``params`` with each StackedLora replaced by its base kernel."""
  import jax
  return jax.tree.map(lambda x: x.w if isinstance(x, StackedLora) else x, params,
                      is_leaf=is_stack)
