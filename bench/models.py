"""The benchmark models: an MLP stack and a decoder with scanned layers.

Both are Linen modules built from one ``Linear`` layer that calls
``jax.lax.dot_general`` (so qwix, which intercepts that function, sees every
matmul). ``Linear(rank=r)`` is the hand-written factored LoRA layer,
``x·stop_gradient(W) + s·((x·A)·B)`` (the branch as 2-D matmuls over the
flattened tokens, the fastest form on XLA:CPU): the same model with LoRA written into
its code, the floor a transform is measured against. ``NnxMLP`` is the MLP in
Flax NNX, with ``nnx.LoRALinear`` layers when ``rank > 0``.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

_DN = lambda x: (((x.ndim - 1,), (0,)), ((), ()))  # contract x's last axis with W's first


def _tokens(x, w):
  """``x @ w`` as one 2-D matmul over the flattened leading axes: its weight
  gradient is then a plain matmul on XLA:CPU (a 3-D dot's transposes the
  cotangent in a slow strided loop; see ``lora_jax/_src/einsum.py``)."""
  x2 = x.reshape(-1, x.shape[-1])
  y = jax.lax.dot_general(x2, w, _DN(x2))
  return y.reshape(*x.shape[:-1], w.shape[-1])


class Linear(nn.Module):
  """``x @ kernel (+ bias)``; with ``rank > 0`` plus ``scale·(x @ lora_a) @ lora_b``."""

  features: int
  use_bias: bool = False
  rank: int = 0
  scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    d_in = x.shape[-1]
    w = self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features))
    if self.rank:
      w = jax.lax.stop_gradient(w)
    y = jax.lax.dot_general(x, w, _DN(x))
    if self.rank:
      a = self.param("lora_a", nn.initializers.lecun_normal(), (d_in, self.rank))
      b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
      t = _tokens(x, a) * jnp.asarray(self.scale, x.dtype)
      y = y + _tokens(t, b)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,))
      y = y + bias[(None,) * (y.ndim - 1)]
    return y


class MLP(nn.Module):
  """``layers`` × (Linear d→d, bias, gelu), then a Linear d→d readout."""

  d: int
  layers: int
  rank: int = 0
  scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    for _ in range(self.layers):
      x = jax.nn.gelu(Linear(self.d, True, self.rank, self.scale)(x))
    return Linear(self.d, True, self.rank, self.scale)(x)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab: int = 1024
  d: int = 512
  heads: int = 8
  ffn: int = 1024
  layers: int = 2
  rank: int = 0          # > 0: hand-written LoRA in every Linear
  scale: float = 1.0
  unroll: bool | int = 1  # scan unroll; True for exact XLA FLOP counts


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    s = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    s = s[(None,) * (x.ndim - 1)]
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s


class Block(nn.Module):
  """Pre-norm causal self-attention + SwiGLU MLP (Llama-like)."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, h, _):
    c = self.cfg
    lin = lambda n, name: Linear(n, False, c.rank, c.scale, name=name)
    bsz, seq, d = h.shape
    x = RMSNorm(name="attn_norm")(h)
    split = lambda t: t.reshape(bsz, seq, c.heads, d // c.heads)
    q, k, v = (split(lin(d, n)(x)) for n in ("q", "k", "v"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // c.heads).astype(h.dtype)
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    p = jax.nn.softmax(jnp.where(mask[None, None], s, jnp.finfo(s.dtype).min), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(bsz, seq, d)
    h = h + lin(d, "o")(o)
    x = RMSNorm(name="mlp_norm")(h)
    g = jax.nn.silu(lin(c.ffn, "gate")(x)) * lin(c.ffn, "up")(x)
    return h + lin(d, "down")(g), None


class Decoder(nn.Module):
  """Embedding, ``nn.scan`` over ``layers`` Blocks, final norm, lm head."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.cfg
    h = nn.Embed(c.vocab, c.d, name="embed")(tokens)
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=c.layers, unroll=c.unroll)
    h, _ = stack(c, name="layers")(h, None)
    h = RMSNorm(name="final_norm")(h)
    return Linear(c.vocab, False, c.rank, c.scale, name="lm_head")(h)


class NnxMLP(nnx.Module):
  """The MLP in Flax NNX; ``rank > 0`` uses ``nnx.LoRALinear`` (no scale: fold it into B)."""

  def __init__(self, d: int, layers: int, rank: int, rngs: nnx.Rngs):
    def layer():
      if rank:
        return nnx.LoRALinear(d, d, lora_rank=rank, rngs=rngs)
      return nnx.Linear(d, d, rngs=rngs)
    self.layers = nnx.List([layer() for _ in range(layers + 1)])

  def __call__(self, x):
    for lin in self.layers[:-1]:
      x = jax.nn.gelu(lin(x))
    return self.layers[-1](x)


def decoder_linear_params(cfg: DecoderConfig) -> int:
  """Kernel entries of all linear layers (for the analytic FLOP floor)."""
  per_layer = 4 * cfg.d * cfg.d + 3 * cfg.d * cfg.ffn
  return cfg.layers * per_layer + cfg.d * cfg.vocab


def decoder_linear_shapes(cfg: DecoderConfig) -> list[tuple[int, int]]:
  """(in, out) of every adapted kernel, one entry per layer instance."""
  per = [(cfg.d, cfg.d)] * 4 + [(cfg.d, cfg.ffn)] * 2 + [(cfg.ffn, cfg.d)]
  return per * cfg.layers + [(cfg.d, cfg.vocab)]
