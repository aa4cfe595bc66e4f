"""Small helpers shared by the examples: CLI flags, progress bars, tables, plots."""

import argparse
import os
import pathlib
import time

import numpy as np
from tqdm.auto import tqdm


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends ``(default: X)`` to every option that takes a value. An option
  whose default is ``None`` (decided later, e.g. by ``--fast``) states its
  default in its own help text."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.nargs == 0 or action.default is None or "(default:" in text:
      return text
    return super()._get_help_string(action)


def parser(description: str, out: str = "out",
           out_help: str = "directory for the PNG figures") -> argparse.ArgumentParser:
  """An ArgumentParser with the flags every example takes."""
  p = argparse.ArgumentParser(
      description=description,
      formatter_class=HelpFormatter)
  p.add_argument("--out", default=out, help=out_help)
  p.add_argument("--seed", type=int, default=0, help="PRNG seed")
  p.add_argument("--fast", action="store_true",
                 help="tiny sizes and few steps (seconds; used by the tests)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  return p


def progress(iterable, desc: str, quiet: bool = False, **kw):
  """A tqdm bar over ``iterable`` (off with ``--quiet``)."""
  return tqdm(iterable, desc=desc, disable=quiet, leave=True, dynamic_ncols=True, **kw)


def table(headers, rows) -> str:
  """Render rows as an aligned plain-text table."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
  fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
  return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])]
                   + [fmt(r) for r in cells[1:]])


def figure_path(out: str, name: str) -> str:
  """``out/name``, creating ``out``."""
  pathlib.Path(out).mkdir(parents=True, exist_ok=True)
  return os.path.join(out, name)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str) -> None:
  """Lay out ``fig``, write it to ``path`` as a 120-dpi PNG and close it."""
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)


class Timer:
  """``with Timer() as t: ...``; then ``t.seconds``."""

  def __enter__(self):
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start


def batches(rng: np.random.Generator, n: int, batch_size: int, steps: int):
  """``steps`` index arrays of ``batch_size``, reshuffling every epoch."""
  order = np.empty(0, dtype=np.int64)
  for _ in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:batch_size], order[batch_size:]
    yield idx
