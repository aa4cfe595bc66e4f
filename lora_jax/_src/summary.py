"""summary: trainable / total parameter counts, PEFT's line and a table."""

import dataclasses

import numpy as np

from lora_jax._src import tree
from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, is_node, node_problems


@dataclasses.dataclass(frozen=True)
class Summary:
  """Parameter counts of LoRA params; ``str()`` renders the table."""

  trainable: int
  total: int
  rows: tuple  # (path, kernel shape, roles, rank, scale, adapter params)

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable / max(self.total, 1)

  def line(self) -> str:
    return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}")

  def __str__(self) -> str:
    head = ("path", "kernel", "roles", "rank", "scale", "params")
    body = [(p, str(s), r, str(k), f"{c:g}", f"{n:,}") for p, s, r, k, c, n in self.rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]
    return "\n".join(lines + [self.line()])


def summary(params: Params) -> Summary:
  """Count trainable and total parameters, with a row per adapted kernel.

  Total counts the base parameters plus the adapters' (as PEFT does);
  trainable counts A, B and the leaves trained in full.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((784, 10))},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> lj.summary(p).line()
    'trainable params: 794 || all params: 8,634 || trainable%: 9.1962'
  """
  trainable = total = 0
  rows = []
  leaves = tree.flatten(params, is_leaf=is_node)[0]
  problems = [e for path, x in leaves for e in node_problems(path, x, ("w", "a", "b", "value"))]
  if problems:
    raise ValueError("summary: the params hold LoRA nodes that cannot be counted:\n  "
                     + "\n  ".join(problems))
  for path, x in leaves:
    if isinstance(x, LoraWeight):
      n = int(np.size(x.a) + np.size(x.b))
      trainable += n
      total += n + int(np.size(x.w))
      rows.append((path, tuple(x.w.shape), x.roles, x.rank, x.scale, n))
    elif isinstance(x, Trainable):
      trainable += int(np.size(x.value))
      total += int(np.size(x.value))
    else:
      total += int(np.size(x))
  return Summary(trainable, total, tuple(rows))
