"""How a mixed batch meets a stack of adapters: one strategy per kernel.

Row ``i`` of a batch served by a stack (``lj.lora(fn)(params, x,
adapter_ids=ids)``) needs ``s[k]·(x_i·A[k])·B[k]`` with ``k = ids[i]``. Three
exact ways to compute it for all rows at once:

* ``gather``: each row gathers its own factors ``A[ids]``, ``B[ids]`` and runs
  a batched skinny product (BGMV). FLOPs do not grow with N, but every call
  writes and reads ``rows·r·(d_in + d_out)`` gathered factors, and the
  products are per-row matrix-vector products.
* ``onehot``: ``x·A_all`` with every adapter's ``A`` side by side (rank
  ``N·r``), each row's ``N·r`` columns masked to its adapter's ``r`` (times its
  scale), then ``·B_all``. Each adapter is read once and both products are
  plain GEMMs; FLOPs grow with ``N·r``.
* ``segments``: rows sorted by adapter once per call (shared by every layer),
  cut into fixed tiles of ``T`` rows of one adapter each (at most
  ``rows/T + N`` tiles), each tile multiplied by its adapter's ``A`` and ``B``
  (one batched GEMM over the tiles), and the rows put back in order (SGMV).

``choose`` picks one per kernel from static shapes (rows, tokens, N, r,
d_in, d_out, dtype, backend) with the cost model documented at
``estimate``; ``lj.lora(fn, stack_strategy=...)`` forces one.

-1 rows (the base alone) add exact zeros in every strategy; an id out of range
that was not seen before tracing makes its row NaN.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from lora_jax._src import factor_ops
from lora_jax._src.interpreter import ADAPTER, _Lazy, bind

STRATEGIES = ("auto", "gather", "onehot", "segments")
ADAPTER_LETTER = "R"  # the adapter axis in einsum subscripts (rules' letters skip it)

# onehot's (tokens, N·r) intermediate may take at most this many bytes; a
# forced onehot beyond it is refused, ``auto`` never picks it
ONEHOT_MAX_BYTES = 1 << 30


# ------------------------------------------------------------ the cost model

@dataclasses.dataclass(frozen=True)
class Backend:
  """Machine constants of the cost model (see ``estimate``)."""
  bandwidth: float       # bytes / s, streaming reads and writes
  gemm: float            # FLOP / s of a well-shaped matmul
  matvec: float          # FLOP / s of per-row (batched matrix-vector) products
  gather_penalty: float  # factor on per-row gathered factor bytes
  op: float              # seconds of fixed cost per extra XLA op (gather, permute)


BACKENDS = {
    # a 2-core x86 CPU under load, calibrated on bench.serving's quick and
    # wide models (docs/guides/serving_strategies.md)
    "cpu": Backend(bandwidth=2e10, gemm=5e10, matvec=3e9, gather_penalty=1.0, op=5e-5),
    # H100-class: HBM ~3 TB/s, tensor cores; a per-row gather of weight
    # matrices is uncoalesced and runs far below bandwidth (not measured here)
    "gpu": Backend(bandwidth=2.5e12, gemm=4e14, matvec=2e12, gather_penalty=4.0, op=5e-6),
    # TPU: a per-row gather of weight matrices is the slowest choice of all
    # (no fast dynamic gather into the MXU): onehot / segments win (not measured here)
    "tpu": Backend(bandwidth=1.2e12, gemm=2e14, matvec=2e11, gather_penalty=16.0, op=5e-6),
}


@dataclasses.dataclass(frozen=True)
class Shape:
  """A kernel's static shapes as the cost model sees them."""
  rows: int      # examples (adapter_ids entries)
  tokens: int    # rows of the matmul (examples x sequence / pixels)
  n: int         # adapters in the stack
  rank: int      # the stack's padded rank
  d_in: int
  d_out: int
  itemsize: int  # bytes per factor element


def tile_rows(rows: int, n: int) -> int:
  """Examples per segments tile: ``rows // N``, at least 1.

  The padding is at most ``N·(T - 1)`` slots, under ``rows``.
  """
  return max(1, rows // n)


def num_tiles(rows: int, n: int, tile: int) -> int:
  """A static bound on the tiles: ``Σ ceil(c_k / T) ≤ (rows + G·(T-1)) / T``."""
  g = min(n, rows)
  return max(1, min(rows, (rows + g * (tile - 1)) // tile))


def estimate(s: Shape, backend: str = "cpu") -> dict:
  """Seconds each strategy is expected to add for one kernel's LoRA branch.

  With ``f = r·(d_in + d_out)·itemsize`` the bytes of one adapter's factors
  and ``flops_1 = 2·tokens·r·(d_in + d_out)`` the branch's FLOPs with one
  adapter per row:

  * gather: writes and reads each row's factors (``2·rows·f·penalty``
    bytes) in two extra ops, and runs ``flops_1`` as per-row products, at the
    ``matvec`` rate when a row is one token (decode), ``matvec·tokens/rows``
    (capped at ``gemm``) otherwise.
  * onehot: reads every adapter once (``N·f``) and writes and reads the
    masked ``(tokens, N·r)`` float32 intermediate; ``N·flops_1`` at the
    ``gemm`` rate, no extra op.
  * segments: gathers each tile's factors (``2·tiles·f``) and moves x and z
    into and out of tile order (read and written:
    ``4·tokens·(d_in + d_out)·itemsize``) in six extra ops (take, fill,
    factor gathers, unsort); ``flops_1·slots/rows`` as per-tile GEMMs
    (``matvec`` rate times the tile's tokens, capped at ``gemm``).
  """
  b = BACKENDS.get(backend, BACKENDS["gpu"])
  f = s.rank * (s.d_in + s.d_out) * s.itemsize
  flops_1 = 2.0 * s.tokens * s.rank * (s.d_in + s.d_out)
  per_row = max(1, s.tokens // max(1, s.rows))
  tile = tile_rows(s.rows, s.n)
  tiles = num_tiles(s.rows, s.n, tile)
  rate = lambda tokens: min(b.gemm, b.matvec * tokens)
  moved = 4.0 * s.tokens * (s.d_in + s.d_out) * s.itemsize
  return {
      "gather": 2 * b.op + 2 * s.rows * f * b.gather_penalty / b.bandwidth
                + flops_1 / rate(per_row),
      "onehot": (s.n * f + 2.0 * s.tokens * s.n * s.rank * 4) / b.bandwidth
                + s.n * flops_1 / b.gemm,
      "segments": 6 * b.op + (2 * tiles * f + moved) / b.bandwidth
                  + flops_1 * tiles * tile / s.rows / rate(per_row * tile),
  }


def onehot_bytes(s: Shape) -> int:
  """Bytes of onehot's ``(tokens, N·r)`` float32 intermediate."""
  return s.tokens * s.n * s.rank * 4


def choose(s: Shape, backend: str = "cpu", segments: bool = True) -> str:
  """The strategy ``estimate`` expects fastest (onehot only within its memory
  limit, segments only where it fits)."""
  est = estimate(s, backend)
  if onehot_bytes(s) > ONEHOT_MAX_BYTES:
    est.pop("onehot")
  if not segments:
    est.pop("segments")
  return min(est, key=est.get)


# -------------------------------------------------------- per-call state

class CallState:
  """One call's stack state: the ids, the forced strategy, and the sort.

  The segments layout (rows sorted by adapter, tile slots) is computed once
  per call, here, at the top level of the trace, and shared by every layer
  (scan bodies included: their child contexts hold this same object). Under
  ``jit`` it is dead code, removed by XLA, when no kernel picks segments.
  """

  def __init__(self, ids, n: int, strategy: str, backend: str):
    from lora_jax._src import explicit
    self.ids, self.n, self.strategy, self.backend = ids, n, strategy, backend
    self.layout = None
    if explicit.explicit_sharding(ids) is not None:
      # explicit mesh axes: the per-row gather is the strategy that keeps the
      # batch's sharding in its types (a sort over a sharded axis is refused)
      if strategy not in ("auto", "gather"):
        raise ValueError(
            f"lora: stack_strategy={strategy!r} does not run on an explicit-axes mesh "
            f"(adapter_ids are sharded {explicit.explicit_sharding(ids).spec}); use "
            "stack_strategy='gather' or 'auto' (which picks gather there), or a mesh "
            "with AxisType.Auto axes.")
      self.strategy = "gather"
    if self.strategy in ("auto", "segments"):
      self.layout = Layout.build(ids, n, tile_rows(ids.shape[0], n))


@dataclasses.dataclass
class Layout:
  """Rows in tile order: ``slot[i]`` is row i's place among ``tiles·T`` slots.

  ``src[j]`` is the row in slot j (``rows`` for an empty slot), ``tile_ids``
  each tile's adapter, ``bad`` the rows whose id is out of range.
  """
  tile: int
  tiles: int
  slot: jax.Array
  src: jax.Array
  tile_ids: jax.Array
  bad: jax.Array

  @classmethod
  def build(cls, ids, n: int, tile: int) -> "Layout":
    rows = ids.shape[0]
    tiles = num_tiles(rows, n, tile)
    valid = (ids >= 0) & (ids < n)
    key = jnp.where(valid, ids, n).astype(jnp.int32)  # -1 / bad rows sort last
    order = jnp.argsort(key, stable=True)
    counts = jnp.zeros((n + 1,), jnp.int32).at[key].add(1)[:n]
    per = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(per)
    first_slot = (tile_end - per) * tile
    group_start = jnp.cumsum(counts) - counts
    ks = key[order]
    kc = jnp.clip(ks, 0, n - 1)
    slot_sorted = jnp.where(ks < n, first_slot[kc] + jnp.arange(rows) - group_start[kc],
                            tiles * tile)
    slot = jnp.zeros((rows,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
    src = jnp.full((tiles * tile,), rows, jnp.int32).at[slot].set(
        jnp.arange(rows, dtype=jnp.int32), mode="drop")
    tile_ids = jnp.clip(jnp.searchsorted(tile_end, jnp.arange(tiles), side="right"),
                        0, n - 1)
    return cls(tile, tiles, slot, src, tile_ids, ~valid & (ids != -1))

  def to_tiles(self, x, axis: int = 0):
    """``x`` (rows at ``axis``) -> (tiles, T, ...) with rows moved to the front."""
    x = jnp.moveaxis(x, axis, 0)
    xp = jnp.take(x, self.src, axis=0, mode="fill", fill_value=0)
    return xp.reshape((self.tiles, self.tile) + x.shape[1:])

  def from_tiles(self, z, axis: int = 0):
    """(tiles, T, ...) back to rows at ``axis``; -1 rows 0, bad rows NaN."""
    z = z.reshape((self.tiles * self.tile,) + z.shape[2:])
    y = jnp.take(z, self.slot, axis=0, mode="fill", fill_value=0)
    bad = self.bad.reshape((-1,) + (1,) * (y.ndim - 1))
    y = jnp.where(bad, jnp.asarray(jnp.nan, y.dtype), y)
    return jnp.moveaxis(y, 0, axis)


# ------------------------------------------------------------- the choice

_RECORD: list | None = None


@contextlib.contextmanager
def recording():
  """Collect every stacked kernel's choice made while tracing (for reports).

  Yields a list of dicts ``{path, kernel, strategy, shape, estimate}``.
  """
  global _RECORD
  prev, _RECORD = _RECORD, []
  try:
    yield _RECORD
  finally:
    _RECORD = prev


def pick(ctx, v: _Lazy, kernel: str, rows: int, tokens: int, d_in: int, d_out: int,
         segments_fits: str | None = None) -> str:
  """This kernel's strategy: the forced one (checked), or the cost model's.

  ``rows``: the input's row count (must be one per adapter id);
  ``segments_fits``: None, or why segments cannot serve this kernel.
  """
  factor_ops.row_ids(ctx, v, rows)  # one row per id, or an error naming the kernel
  state = ctx.stack
  s = Shape(rows=rows, tokens=tokens, n=v.a.shape[v.a_dims.index(ADAPTER)],
            rank=v.a.shape[v.a_dims.index(None)], d_in=d_in, d_out=d_out,
            itemsize=jnp.dtype(v.a.dtype).itemsize)
  how = state.strategy
  if how == "auto":
    how = choose(s, state.backend, segments=not segments_fits)
  elif how == "onehot" and onehot_bytes(s) > ONEHOT_MAX_BYTES:
    raise ValueError(
        f"lora: {v.path} ({kernel}): stack_strategy='onehot' needs a (tokens, N·r) = "
        f"({tokens}, {s.n}·{s.rank}) intermediate of {onehot_bytes(s) / 2**20:,.0f} MiB, "
        f"over the limit of {ONEHOT_MAX_BYTES / 2**20:,.0f} MiB "
        "(lora_jax._src.stack_strategies.ONEHOT_MAX_BYTES). Use "
        "stack_strategy='segments' or 'gather' (their memory does not grow with N), "
        "or 'auto'.")
  elif how == "segments" and segments_fits:
    raise ValueError(
        f"lora: {v.path} ({kernel}): stack_strategy='segments' cannot serve this "
        f"kernel: {segments_fits}. Use stack_strategy='onehot' or 'gather' (they "
        "fit here), or 'auto'.")
  if _RECORD is not None:
    _RECORD.append({"path": v.path, "kernel": kernel, "strategy": how,
                    "shape": dataclasses.asdict(s), "estimate": estimate(s, state.backend)})
  return how


def check_strategy(strategy) -> str:
  if strategy not in STRATEGIES:
    raise ValueError(f"lora: stack_strategy must be one of {STRATEGIES}, got {strategy!r}")
  return strategy


# ----------------------------------------------------------- shared pieces

def row_coef(ctx, v: _Lazy, rows: int):
  """onehot's mask: (rows, N), row i's scale in column ids[i], 0 elsewhere.

  -1 rows are all zeros (the base alone); a row whose id is out of range
  gets NaN in one column, which poisons its output.
  """
  k, scale = factor_ops.row_ids(ctx, v, rows)
  n = v.a.shape[v.a_dims.index(ADAPTER)]
  hit = k[:, None] == jnp.arange(n)[None, :]
  return jnp.where(hit, scale[:, None], 0.0)


def place(c, subs: str, c_subs: str):
  """``c`` (axes ``c_subs``) broadcast to an array with subscripts ``subs``."""
  order = sorted(c_subs, key=subs.index)
  c = jnp.transpose(c, [c_subs.index(l) for l in order])
  return c.reshape([c.shape[order.index(l)] if l in order else 1 for l in subs])


def merged(v: _Lazy) -> _Lazy:
  """The stack as one adapter of rank ``N·r`` (adapter axis folded into the rank)."""
  def fold(x, dims):
    ka, kr = dims.index(ADAPTER), dims.index(None)
    rest = [k for k in range(x.ndim) if k != ka]
    pos = rest.index(kr)
    x = jnp.transpose(x, rest[:pos] + [ka] + rest[pos:])  # adapter just before rank
    shape = list(x.shape)
    shape[pos:pos + 2] = [shape[pos] * shape[pos + 1]]  # column n·r + j: adapter n
    return x.reshape(shape), [dims[k] for k in rest]
  a, a_dims = fold(v.a, v.a_dims)
  b, b_dims = fold(v.b, v.b_dims)
  return v.replace(a=a, b=b, a_dims=a_dims, b_dims=b_dims, scale=1.0)


def _coef_nr(ctx, v: _Lazy, rows: int):
  """onehot's mask per merged rank column: (rows, N·r)."""
  r = v.a.shape[v.a_dims.index(None)]
  c = row_coef(ctx, v, rows)
  return jnp.repeat(c, r, axis=1)


def _member(v: _Lazy, a, b) -> _Lazy:
  return v.replace(a=a, b=b, a_dims=[d for d in v.a_dims if d != ADAPTER],
                   b_dims=[d for d in v.b_dims if d != ADAPTER])


def _per_tile(v: _Lazy, layout: Layout):
  """Each tile's factors and scale."""
  a = jnp.take(v.a, layout.tile_ids, axis=v.a_dims.index(ADAPTER))
  b = jnp.take(v.b, layout.tile_ids, axis=v.b_dims.index(ADAPTER))
  return a, b, jnp.take(v.scale, layout.tile_ids)


# ------------------------------------------------------------ dot_general

def dot(how, ctx, v: _Lazy, x, xs, f1s1, f2s2, t_sub, out, prec, pref):
  """The LoRA term of a stacked matmul; x's axis 0 is the rows.

  ``f1``/``f2`` are the factor met first / second with subscripts ``s1``/``s2``
  in which the adapter axis is ``ADAPTER_LETTER``; ``t_sub`` the
  intermediate's subscripts (it holds the adapter letter), ``out`` the result's.
  """
  (f1, s1), (f2, s2) = f1s1, f2s2
  s1, s2, t_sub, out = "".join(s1), "".join(s2), "".join(t_sub), "".join(out)
  xsub = "".join(xs)
  L = ADAPTER_LETTER
  if how == "onehot":
    t = jnp.einsum(f"{xsub},{s1}->{t_sub}", x, f1, precision=prec,
                   preferred_element_type=pref)
    t = t * place(row_coef(ctx, v, x.shape[0]).astype(t.dtype), t_sub, xs[0] + L)
    return jnp.einsum(f"{t_sub},{s2}->{out}", t, f2, precision=prec,
                      preferred_element_type=pref)
  lay = ctx.stack.layout
  q = next(l for l in reversed("abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQSTUVWXYZ")
           if l not in xsub + s1 + s2 + out)
  f1t = jnp.take(f1, lay.tile_ids, axis=s1.index(L))
  f2t = jnp.take(f2, lay.tile_ids, axis=s2.index(L))
  scale = jnp.take(v.scale, lay.tile_ids)
  s1, s2 = s1.replace(L, q), s2.replace(L, q)
  tt = q + t_sub.replace(L, "")
  xt = lay.to_tiles(x)  # (tiles, T, ...)
  t = jnp.einsum(f"{q}{xsub},{s1}->{tt}", xt, f1t, precision=prec,
                 preferred_element_type=pref)
  t = t * scale.astype(t.dtype).reshape((-1,) + (1,) * (t.ndim - 1))
  z = jnp.einsum(f"{tt},{s2}->{q}{xs[0]}{out.replace(xs[0], '')}", t, f2t,
                 precision=prec, preferred_element_type=pref)
  z = lay.from_tiles(z)  # rows first, then out without the rows
  return jnp.moveaxis(z, 0, out.index(xs[0]))


# ------------------------------------------------------------------- conv

def conv(how, ctx, eqn, x, v: _Lazy):
  """The LoRA term of a stacked conv (``x``: the dropped-out input)."""
  dn = eqn.params["dimension_numbers"]
  bx, bo, co = dn.lhs_spec[0], dn.out_spec[0], dn.out_spec[1]
  out_axis = dn.rhs_spec[0]
  if ([d for d in v.b_dims if isinstance(d, int)] != [out_axis] or sorted(
      d for d in v.a_dims if isinstance(d, int)) != [d for d in range(v.ndim) if d != out_axis]):
    raise NotImplementedError(f"lora: {v.path}: a stacked conv kernel with layout "
                              f"{v.a_dims} has no factored rule")
  if how == "onehot":
    m = merged(v)
    k = factor_ops.a_as_kernel(m, dn.rhs_spec[0])
    z = bind(eqn, [x, k])[0]
    z = z * place(_coef_nr(ctx, v, x.shape[bx]).astype(z.dtype), _subs(z.ndim),
                  _subs(z.ndim)[bo] + _subs(z.ndim)[co])
    return factor_ops.rank_to(z, co, m)
  lay = ctx.stack.layout
  a_t, b_t, s_t = _per_tile(v, lay)

  def branch(x_t, a_i, b_i, s_i):
    m = _member(v, a_i, b_i)
    z = bind(eqn, [jnp.moveaxis(x_t, 0, bx), factor_ops.a_as_kernel(m, dn.rhs_spec[0])])[0]
    z = z * s_i.astype(z.dtype)
    return jnp.moveaxis(factor_ops.rank_to(z, co, m), bo, 0)
  z = jax.vmap(branch)(lay.to_tiles(x, bx), a_t, b_t, s_t)
  return lay.from_tiles(z, bo)


def _subs(ndim: int) -> str:
  return "abcdefghijklmnopqstuvwxyz"[:ndim]


# ----------------------------------------------------------------- lookup

def lookup(how, ctx, eqn, v: _Lazy, idx, out_axis: int, z_axis: int):
  """The LoRA term of a stacked embedding lookup (rows: idx's axis 0)."""
  if idx.ndim < 2 or 0 in eqn.params["dimension_numbers"].offset_dims:
    raise factor_ops.not_rows(v, f"the lookup's indices have shape {idx.shape}")
  if how == "onehot":
    m = merged(v)
    sizes = list(eqn.params["slice_sizes"])
    sizes[out_axis] = m.a.shape[m.a_dims.index(None)]
    z = eqn.primitive.bind(factor_ops.a_as_kernel(m, out_axis), idx,
                           **dict(eqn.params, slice_sizes=tuple(sizes)))
    subs = _subs(z.ndim)
    z = z * place(_coef_nr(ctx, v, idx.shape[0]).astype(z.dtype), subs,
                  subs[0] + subs[z_axis])
    return factor_ops.rank_to(z, z_axis, m)
  # segments: each row's A rows are looked up in place (no copy of a
  # vocab-sized factor); the rank -> out product runs per tile
  lay = ctx.stack.layout
  z, _, _ = factor_ops.stacked_gather_a(v, out_axis, idx, eqn, ctx)
  _, b_t, s_t = _per_tile(v, lay)
  zt = lay.to_tiles(z)  # (tiles, T, ..., r at z_axis + 1)
  zt = zt * s_t.astype(zt.dtype).reshape((-1,) + (1,) * (zt.ndim - 1))
  zt = jnp.moveaxis(zt, z_axis + 1, -1)
  bt = jnp.transpose(b_t, [v.b_dims.index(ADAPTER), v.b_dims.index(None),
                           v.b_dims.index(out_axis)])  # (tiles, r, out)
  y = jnp.einsum("q...r,qro->q...o", zt, bt)
  y = jnp.moveaxis(y, -1, z_axis + 1)
  return lay.from_tiles(y)


__all__ = ["STRATEGIES", "choose", "estimate", "recording"]
