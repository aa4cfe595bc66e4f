"""Measuring: interleaved wall time, XLA cost / memory analysis, compile time.

Timing is noisy on a shared machine, so contenders are never timed one after
another: each round runs one step of every contender, in a rotated order, and
the figure is the median over rounds (with min and max). Ratios are taken
between contenders of the same run.
"""

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def machine() -> dict:
  """What ran the benchmark."""
  import flax
  import optax
  dev = jax.devices()[0]
  info = {
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
      "flax": flax.__version__,
      "optax": optax.__version__,
  }
  try:
    import qwix
    info["qwix"] = getattr(qwix, "__version__", "installed")
  except ImportError:
    info["qwix"] = None
  return info


def _jaxlib_version():
  import jaxlib
  return jaxlib.__version__


def block(x):
  return jax.block_until_ready(x)


def interleaved(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict:
  """Time each zero-argument callable ``rounds`` times, interleaved.

  Returns ``{name: {"median_s", "min_s", "max_s", "times_s"}}``.
  """
  for _ in range(warmup):
    for fn in steps.values():
      block(fn())
  names = list(steps)
  times = {n: [] for n in names}
  for i in range(rounds):
    k = i % len(names)
    for n in names[k:] + names[:k]:
      t0 = time.perf_counter()
      block(steps[n]())
      times[n].append(time.perf_counter() - t0)
  return {n: summarize(t) for n, t in times.items()}


def summarize(t: list[float]) -> dict:
  return {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
          "times_s": list(t)}


class Looped:
  """A step ``state -> (state, aux)`` run on its own, donated state."""

  def __init__(self, step, state, *args):
    self.step, self.state, self.args = step, state, args

  def __call__(self):
    self.state, aux = self.step(self.state, *self.args)
    return aux


def compiled(fn, *args, **jit_kw):
  """``(compiled executable, seconds to trace + lower + compile)``."""
  t0 = time.perf_counter()
  c = jax.jit(fn, **jit_kw).lower(*args).compile()
  return c, time.perf_counter() - t0


def compile_seconds(make_fn: Callable[[], Callable], args, repeats: int = 3) -> dict:
  """Median trace + lower + compile time of a fresh ``jax.jit(make_fn())``."""
  return summarize([compiled(make_fn(), *args)[1] for _ in range(repeats)])


def flops(c) -> float:
  ca = c.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan")))


def bytes_accessed(c) -> float:
  ca = c.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("bytes accessed", float("nan")))


def memory(c) -> dict:
  """XLA's compiled memory figures; ``peak`` = arguments + outputs − aliased + temp."""
  m = c.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes") if hasattr(m, k)}
  out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                       - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def device_peak_bytes() -> int | None:
  """``peak_bytes_in_use`` of the first device (GPU / TPU), None on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def copy_tree(tree):
  """A fresh copy of every array (so that donation never frees a shared buffer)."""
  return jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, tree)
