"""Remat, cond, while and scan with adapted kernels inside them.

Each is re-emitted through its public API (``jax.checkpoint``,
``lax.switch``, ``lax.while_loop``, ``lax.scan``) with its body interpreted,
and a kernel that comes out of it stays lazy where the program only passes
it on:

* ``checkpoint`` (``jax.checkpoint``, ``nnx.remat``): the body's outputs are
  returned as they are, lazy kernels included (a lazy value is a pytree);
* ``cond`` / ``switch``: an output that every branch forwards from the same
  operand is that operand;
* ``while``: a carry the body passes on unchanged is a loop constant;
* ``scan``: likewise a carry passed on unchanged, and an output the body
  forwards from a scanned kernel (``nnx.scan`` returning the layers' state)
  is that kernel, whole.

Any other kernel that leaves a body (a kernel carried and changed, a view of
it returned from a branch) is formed as ``W + ΔW``: warned about, or refused
with ``strict=True``, so no merged kernel is ever formed silently.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from lora_jax._src import interpreter
from lora_jax._src.interpreter import concrete, eval_jaxpr, is_lazy
from lora_jax._src.interpreter import _Lazy


def forwarded(jaxpr) -> list:
  """For each output of ``jaxpr``: the index of the input it is, or None."""
  pos = {v: k for k, v in enumerate(jaxpr.invars)}
  return [pos.get(v) if isinstance(v, jex_core.Var) else None for v in jaxpr.outvars]


def _remat(ctx, eqn, invals):
  p = eqn.params

  def body(*args):
    return eval_jaxpr(p["jaxpr"], (), args, ctx)  # lazy outputs are pytrees
  return list(jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals))


def _cond(ctx, eqn, invals):
  index, ops = invals[0], invals[1:]
  branches = eqn.params["branches"]
  fwd = [forwarded(br.jaxpr) for br in branches]
  lifted = {}
  for i in range(len(eqn.outvars)):
    ks = {f[i] for f in fwd}
    k = ks.pop() if len(ks) == 1 else None
    if k is not None and is_lazy(ops[k]):
      lifted[i] = ops[k]

  def branch(closed):
    def run(*args):
      outs = eval_jaxpr(closed.jaxpr, closed.consts, args, ctx)
      rest = [o for i, o in enumerate(outs) if i not in lifted]
      return concrete(rest, ctx, eqn, "a `cond` branch")
    return run
  res = iter(lax.switch(index, [branch(br) for br in branches], *ops))
  return [lifted[i] if i in lifted else next(res) for i in range(len(eqn.outvars))]


def _split_invariant(init, fwd, offset):
  """Lazy carries the body passes on unchanged (out i is in ``offset + i``)."""
  inv = {i for i, x in enumerate(init) if is_lazy(x) and fwd[i] == offset + i}
  loop = [i for i in range(len(init)) if i not in inv]

  def full(carry):
    it = iter(carry)
    return [init[i] if i in inv else next(it) for i in range(len(init))]
  return loop, full


def _while(ctx, eqn, invals):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cc, bc, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
  loop, full = _split_invariant(init, forwarded(bj.jaxpr), bn)
  start = concrete([init[i] for i in loop], ctx, eqn, "into a `while` loop's carry")

  def cond(carry):
    return eval_jaxpr(cj.jaxpr, cj.consts, list(cc) + full(carry), ctx)[0]

  def body(carry):
    outs = eval_jaxpr(bj.jaxpr, bj.consts, list(bc) + full(carry), ctx)
    return tuple(concrete([outs[i] for i in loop], ctx, eqn, "a `while` loop's body"))
  return full(lax.while_loop(cond, body, tuple(start)))


def _scan_slices(v: _Lazy):
  """Split a lazy xs operand into (scanned parts, rebuild-one-slice).

  A factor holding V's axis 0 at its front is scanned along it; one holding it
  behind another axis (a stack of adapters: ``(N, layers, ...)``) stays whole
  and each step indexes its layer, so no transposed copy of the stack is made
  per call; a factor without it is the same at every step.
  """
  def shift(dims):
    return [d - 1 if isinstance(d, int) else d for d in dims]

  def lead(x, dims):
    """``(scanned, whole, axis to index, dims of one slice)``."""
    if 0 not in dims:
      return None, x, None, shift(dims)
    k = dims.index(0)
    rest = shift([d for d in dims if d != 0])
    return (x, None, None, rest) if k == 0 else (None, x, k, rest)

  a_xs, a_whole, a_axis, a_dims = lead(v.a, v.a_dims)
  b_xs, b_whole, b_axis, b_dims = lead(v.b, v.b_dims)

  def pick(x_i, whole, axis, i):
    if x_i is not None:
      return x_i
    return whole if axis is None else lax.dynamic_index_in_dim(whole, i, axis, False)

  def rebuild(parts, i):
    w, a_i, b_i = parts
    return v.replace(w=w, a=pick(a_i, a_whole, a_axis, i),
                     b=pick(b_i, b_whole, b_axis, i), a_dims=a_dims, b_dims=b_dims)
  rebuild.needs_step = a_axis is not None or b_axis is not None
  return (v.w, a_xs, b_xs), rebuild


def _scan(ctx, eqn, invals):
  p = eqn.params
  nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  body_jaxpr = p["jaxpr"]
  fwd = forwarded(body_jaxpr.jaxpr)
  loop, full = _split_invariant(init, fwd, nc)
  ys_kept = {}  # ys the body forwards from a scanned kernel: that kernel, whole
  for j, k in enumerate(fwd[ncarry:]):
    if k is not None and k >= nc + ncarry and is_lazy(xs[k - nc - ncarry]):
      ys_kept[j] = xs[k - nc - ncarry]
  sliced, rebuilds = [], []
  for x in xs:
    if is_lazy(x):
      parts, rebuild = _scan_slices(x)
      sliced.append(parts)
      rebuilds.append(rebuild)
    else:
      sliced.append(x)
      rebuilds.append(None)
  keys = None
  if ctx.rng is not None:
    keys = jax.random.split(ctx.next_key(), length)
  # xs: step i sees i (reverse too), for a factor indexed per step (a stack)
  needs = any(rb is not None and rb.needs_step for rb in rebuilds)
  steps = jnp.arange(length, dtype=jnp.int32) if needs else None

  def body(carry, x_key_step):
    xs_i, key, i = x_key_step
    vals = [rb(x, i) if rb else x for rb, x in zip(rebuilds, xs_i)]
    sub = ctx.child(key) if key is not None else ctx
    outs = eval_jaxpr(body_jaxpr.jaxpr, body_jaxpr.consts,
                      list(consts) + full(carry) + vals, sub)
    new = concrete([outs[i] for i in loop], sub, eqn, "a `scan`'s carry")
    ys = [y for j, y in enumerate(outs[ncarry:]) if j not in ys_kept]
    return new, concrete(ys, sub, eqn, "a `scan`'s outputs")

  start = concrete([init[i] for i in loop], ctx, eqn, "into a `scan`'s carry")
  carry, ys = lax.scan(body, start, (sliced, keys, steps), length=length,
                       reverse=p["reverse"], unroll=p["unroll"])
  ys = iter(ys)
  n_ys = len(eqn.outvars) - ncarry
  return full(carry) + [ys_kept[j] if j in ys_kept else next(ys) for j in range(n_ys)]


interpreter.register(["remat2", "checkpoint"], _remat, dora=True)
interpreter.register("cond", _cond, dora=True)
interpreter.register("while", _while, dora=True)
interpreter.register("scan", _scan, dora=True)
