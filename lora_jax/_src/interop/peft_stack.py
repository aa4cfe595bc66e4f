"""PEFT multi-adapter directories <-> a lora_jax stack of adapters.

``PeftModel.save_pretrained(d)`` of a model holding several adapters writes
the adapter named ``default`` to ``d`` itself and every other adapter ``n``
to ``d/n/`` (each an ordinary adapter directory). ``load_peft_stack`` reads
them all into one stack (``lj.stack_adapters``), ``default`` first, then the
subfolders by name; ``save_peft_stack`` writes a stack back in that layout.
"""

import os
from typing import Any, Callable, Sequence

from lora_jax._src import merge
from lora_jax._src.interop.names import NameMap
from lora_jax._src.interop.peft_files import ADAPTER_CONFIG, load_peft_adapter, save_peft_adapter
from lora_jax._src.stack import attach_stack, stack_adapters, unstack_adapters
from lora_jax._src.stack_checkpoint import _unstacked

DEFAULT = "default"


def peft_adapter_dirs(directory: str | os.PathLike) -> dict[str, str]:
  """``{adapter name: directory}`` of a PEFT (multi-)adapter save."""
  root = os.fspath(directory)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"load_peft_stack: no directory {root}")
  found = {}
  if os.path.isfile(os.path.join(root, ADAPTER_CONFIG)):
    found[DEFAULT] = root
  for name in sorted(os.listdir(root)):
    sub = os.path.join(root, name)
    if os.path.isfile(os.path.join(sub, ADAPTER_CONFIG)):
      found[name] = sub
  if not found:
    raise FileNotFoundError(
        f"load_peft_stack: {root} holds no PEFT adapter: expected {ADAPTER_CONFIG} "
        f"in it (the 'default' adapter) or in its adapter_name/ subfolders, found "
        f"{sorted(os.listdir(root))[:8]}")
  return found


def load_peft_stack(directory: str | os.PathLike, params: Any, name_map: NameMap, *,
                    names: Sequence[str] | None = None,
                    trace: Callable[[Any], Any] | None = None, dtype: Any = None,
                    ignore: Sequence[str] = ()) -> Any:
  """Load the adapters of a PEFT multi-adapter save into one stack on ``params``.

  Args:
    directory: what ``PeftModel.save_pretrained`` wrote for a model with
      several adapters: ``default`` in the directory, the others in
      ``adapter_name/`` subfolders.
    params: the base model's params.
    name_map: as for ``load_peft_adapter``.
    names: which adapters to load, in this order (default: all, ``default``
      first, then the subfolders sorted by name).
    trace, dtype, ignore: as for ``load_peft_adapter``.

  Returns:
    ``params`` with the stack attached (``StackedLora`` nodes); call the model
    with ``lj.lora(fn)(params, x, adapter_ids=ids)``; ids index ``names``.

  Example:
    >>> import jax, numpy as np, tempfile, os, lora_jax as lj
    >>> from lora_jax.interop import peft
    >>> rules = [(r"fc/kernel", "fc.weight")]
    >>> w = {"fc": {"kernel": np.ones((3, 2), np.float32)}}
    >>> d = tempfile.mkdtemp()
    >>> for i, sub in enumerate(["", "other"]):
    ...     p = lj.lora_init(jax.random.key(i), w, lj.LoraConfig(rank=1, targets=".*kernel"))
    ...     _ = peft.save_peft_adapter(os.path.join(d, sub), p, rules)
    >>> peft.load_peft_stack(d, w, rules)["fc"]["kernel"].names
    ('default', 'other')
  """
  found = peft_adapter_dirs(directory)
  names = list(found) if names is None else list(names)
  missing = [n for n in names if n not in found]
  if missing:
    raise FileNotFoundError(f"load_peft_stack: no adapter {missing} in {directory}; "
                            f"it holds {list(found)}")
  base = merge.base(_unstacked(params))
  adapters = []
  for n in names:
    try:
      lp = load_peft_adapter(found[n], base, name_map, trace=trace, dtype=dtype,
                             ignore=ignore)
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f"load_peft_stack: adapter {n!r} ({found[n]}): {e}") from e
    adapters.append(merge.adapter(lp))
  return attach_stack(base, stack_adapters(adapters, names=names))


def save_peft_stack(directory: str | os.PathLike, params: Any, name_map: NameMap,
                    **kwargs) -> list[str]:
  """Write each member of a stack as PEFT does: ``default`` (or the first
  member) in ``directory``, the others in ``directory/<name>/``; the
  directories written. ``kwargs`` go to ``save_peft_adapter``.

  Example:
    >>> import jax, numpy as np, os, tempfile, lora_jax as lj
    >>> from lora_jax.interop import peft
    >>> rules = [(r"fc/kernel", "fc.weight")]
    >>> w = {"fc": {"kernel": np.ones((3, 2), np.float32)}}
    >>> ads = [lj.adapter(lj.lora_init(jax.random.key(i), w,
    ...        lj.LoraConfig(rank=1, targets=".*kernel"))) for i in range(2)]
    >>> s = lj.attach(w, lj.stack_adapters(ads, names=["default", "b"]))
    >>> [os.path.basename(p) for p in peft.save_peft_stack(tempfile.mkdtemp(), s, rules)]
    ['', 'b']
  """
  base = merge.base(_unstacked(params))
  members = unstack_adapters(params)
  root = os.fspath(directory)
  written = []
  for i, (name, ad) in enumerate(members.items()):
    where = root if (name == DEFAULT or (i == 0 and DEFAULT not in members)) else (
        os.path.join(root, name))
    save_peft_adapter(where, merge.attach(base, ad), name_map, **kwargs)
    written.append(where if where != root else os.path.join(root, ""))
  return written
