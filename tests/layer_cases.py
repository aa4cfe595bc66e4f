"""Models of every layer kind lora_jax adapts, and a hand-written ΔW reference.

Each case gives ``(fn, params, args, config, trace)``: ``fn(params, *args)``
runs the model; ``trace`` settles the kernels' layouts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lora_jax as lj

KEY = jax.random.key(0)


def is_lw(x):
  return isinstance(x, lj.LoraWeight)


def randomize_b(params, seed=1):
  """Non-zero B everywhere, so the adapters do something."""
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_lw)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x.replace(b=0.5 * jax.random.normal(k, x.b.shape, x.b.dtype)) if is_lw(x) else x
      for x, k in zip(leaves, keys)])


def hand_delta(w_shape, roles, a, b, scale, xp=np):
  """ΔW written out by hand: move axes to (stack, in, out), per-layer A @ B."""
  s = [d for d, r in enumerate(roles) if r == "s"]
  i = [d for d, r in enumerate(roles) if r == "i"]
  o = [d for d, r in enumerate(roles) if r == "o"]
  ns = int(np.prod([w_shape[d] for d in s]))
  ni = int(np.prod([w_shape[d] for d in i]))
  no = int(np.prod([w_shape[d] for d in o]))
  rank = a.shape[-1]
  a3 = xp.reshape(a, (ns, ni, rank))
  b3 = xp.reshape(b, (ns, rank, no))
  d3 = xp.stack([a3[k] @ b3[k] for k in range(ns)])  # (ns, ni, no)
  perm = s + i + o
  moved = xp.reshape(d3, tuple(w_shape[d] for d in perm))
  inv = [perm.index(d) for d in range(len(roles))]
  return scale * xp.transpose(moved, inv)


def hand_merge(params, xp=jnp):
  """Plain params with W + ΔW from ``hand_delta`` (independent of lj.merge)."""
  def fold(x):
    if is_lw(x):
      return x.w + hand_delta(x.w.shape, x.roles, x.a, x.b, x.scale, xp).astype(x.w.dtype)
    return x
  return jax.tree.map(fold, params, is_leaf=is_lw)


# --------------------------------------------------------------------- models

class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(24)(x))
    return nn.Dense(5)(x)


class _Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((2, 4), name="query")(x)              # (d, h, hd): "ioo"
    k = nn.DenseGeneral((2, 4), name="key")(x)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    v = nn.DenseGeneral((2, 4), name="value")(x)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    return nn.DenseGeneral(8, axis=(-2, -1), name="out")(o)   # (h, hd, d): "iio"


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(6, (3, 3), padding="SAME")(nn.Conv(4, (3, 3))(x))


class _Embed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(12, 8)
    h = nn.Dense(8)(emb(ids))
    return emb.attend(h)  # tied output layer: the same LoraWeight, contracted on "o"


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(x))), None


class _Scanned(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block) if self.remat else _Block
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=3)
    return stack(name="layers")(x, None)[0]


class _NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Einsum("bd,dk->bk", (16, 4), rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


class _NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class _NnxScanned(nnx.Module):
  """Layers stacked with nnx.vmap and run with nnx.scan."""

  def __init__(self):
    make = nnx.vmap(lambda key: _NnxBlock(nnx.Rngs(key)), in_axes=0, out_axes=0)
    self.blocks = make(jax.random.split(KEY, 3))

  def __call__(self, x):
    body = nnx.scan(lambda h, block: block(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    return body(x, self.blocks)


def _linen(module, *inputs):
  params = module.init(KEY, *inputs)
  return module.apply, params, inputs


def _scan_fn(p, x):
  def body(h, layer):
    return jnp.tanh(h @ layer["w"]), None
  return jax.lax.scan(body, x, p)[0]


def _einsum_fn(p, x):
  return jnp.einsum("btd,dhk->bthk", x, p["w"]), jnp.einsum("bd,od->bo", x[:, 0], p["t"])


def case(name):
  """Build one case: (fn, params, args, config, trace)."""
  x8 = jax.random.normal(jax.random.key(1), (2, 3, 8))
  if name == "dense":
    fn, params, args = _linen(_Mlp(), x8[:, 0])
    config = lj.LoraConfig(rank=3, alpha=6)
  elif name == "dense_general":
    fn, params, args = _linen(_Attn(), x8)
    config = lj.LoraConfig(rank=2, targets=".*/(query|value|out)/kernel")
  elif name == "einsum":
    params = {"w": jax.random.normal(KEY, (8, 2, 4)), "t": jax.random.normal(KEY, (6, 8))}
    fn, args = _einsum_fn, (x8,)
    config = lj.LoraConfig(rank=2, targets="w|t")
  elif name == "conv":
    fn, params, args = _linen(_Conv(), jax.random.normal(KEY, (2, 7, 7, 3)))
    config = lj.LoraConfig(rank=2, rslora=True, alpha=4)
  elif name == "embed":
    fn, params, args = _linen(_Embed(), jnp.array([[0, 3, 11], [5, 5, 1]]))
    config = lj.LoraConfig(rank=2, targets=".*(embedding|kernel)")
  elif name in ("nn_scan", "nn_scan_remat"):
    fn, params, args = _linen(_Scanned(remat=name.endswith("remat")), x8)
    config = lj.LoraConfig(rank=2, rank_pattern={".*Dense_1.*": 1})
  elif name == "lax_scan":
    params = {"w": 0.3 * jax.random.normal(KEY, (4, 8, 8))}
    fn, args = _scan_fn, (x8[:, 0],)
    config = lj.LoraConfig(rank=2, targets="w")
  elif name in ("nnx", "nnx_scan"):
    net = _NnxNet(nnx.Rngs(0)) if name == "nnx" else _NnxScanned()
    graphdef, params = nnx.split(net)
    fn = lambda state, x: nnx.merge(graphdef, state)(x)
    args = (x8[:, 0],)
    config = lj.LoraConfig(rank=2, targets=".*/kernel")
  else:
    raise ValueError(name)
  trace = lambda p: fn(p, *args)
  return fn, params, args, config, trace


CASES = ("dense", "dense_general", "einsum", "conv", "embed", "nn_scan",
         "nn_scan_remat", "lax_scan", "nnx", "nnx_scan")

EXPECTED_ROLES = {
    "dense": {"io"}, "dense_general": {"ioo", "iio"}, "einsum": {"ioo", "oi"},
    "conv": {"iiio"}, "embed": {"io"}, "nn_scan": {"sio"}, "nn_scan_remat": {"sio"},
    "lax_scan": {"sio"}, "nnx": {"io"}, "nnx_scan": {"sio"},
}
