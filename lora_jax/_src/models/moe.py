"""A Mixtral-style mixture-of-experts decoder (Flax Linen), experts on ``ragged_dot``.

The attention, norms and embeddings are the Llama ones (``llama.py``); each
block's MLP is a sparse MoE layer as in ``transformers``' ``MixtralForCausalLM``:
a linear router, softmax over the experts, top-k, the k weights renormalized
to sum to 1, and SwiGLU experts. The experts are stored as HF stores them
(``gate_up_proj`` ``(E, 2·ff, d)``, ``down_proj`` ``(E, d, ff)``, torch's
``(out, in)`` per expert) and computed with ``jax.lax.ragged_dot_general``
after sorting the (token, choice) pairs by expert, so ``lora()`` adapts them
with one factored adapter per expert.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src import explicit
from lora_jax._src.models.llama import (LlamaAttention, LlamaConfig, _causal_mask, _dense,
                                        _norm, random_params)

Array = jax.Array
_INIT = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
  """Hyper-parameters of a Mixtral-style MoE decoder (HF ``MixtralConfig`` names).

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width ``d``.
    intermediate_size: each expert's SwiGLU hidden width ``ff``.
    num_hidden_layers: number of decoder blocks.
    num_attention_heads: query heads.
    num_key_value_heads: key/value heads (grouped-query attention).
    num_local_experts: experts per block ``E``.
    num_experts_per_tok: experts each token is routed to (top-k).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: rotary base.
    max_position_embeddings: longest sequence.
    sliding_window: local attention window, None for full causal attention.
    tie_word_embeddings: logits use the embedding matrix (no ``lm_head``).
    head_dim: per-head width; ``hidden_size // num_attention_heads`` if None.
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Example:
    >>> cfg = MixtralConfig.tiny()
    >>> cfg.num_local_experts, cfg.num_experts_per_tok
    (4, 2)
  """

  vocab_size: int = 128
  hidden_size: int = 32
  intermediate_size: int = 48
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  num_local_experts: int = 4
  num_experts_per_tok: int = 2
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 256
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  head_dim: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
      raise ValueError(f"MixtralConfig: num_experts_per_tok={self.num_experts_per_tok} "
                       f"must be in 1..num_local_experts={self.num_local_experts}")

  @classmethod
  def tiny(cls, **overrides) -> "MixtralConfig":
    """A 2-layer, d=32, 4-expert top-2 config for tests."""
    return cls(**overrides)

  def replace(self, **changes) -> "MixtralConfig":
    return dataclasses.replace(self, **changes)

  def attention_config(self) -> LlamaConfig:
    """The ``LlamaConfig`` its attention, norms and embeddings are built from."""
    return LlamaConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, dtype=self.dtype,
        param_dtype=self.param_dtype, head_dim=self.head_dim,
        sliding_window=self.sliding_window)

  def to_hf_dict(self) -> dict:
    """A ``config.json`` dict that ``transformers.MixtralConfig`` reads.

    Example:
      >>> MixtralConfig.tiny().to_hf_dict()["model_type"]
      'mixtral'
    """
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.attention_config().head_size, "hidden_act": "silu",
        "num_local_experts": self.num_local_experts,
        "num_experts_per_tok": self.num_experts_per_tok,
        "router_jitter_noise": 0.0, "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "max_position_embeddings": self.max_position_embeddings,
        "sliding_window": self.sliding_window,
        "tie_word_embeddings": self.tie_word_embeddings,
        "torch_dtype": jnp.dtype(self.param_dtype).name,
    }


_GROUPED = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),  # x (m, in) · W[g] (out, in)
    lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))


def grouped_linear(x: Array, w: Array, group_sizes: Array) -> Array:
  """Rows of ``x`` sorted by expert times their expert's torch-layout weight.

  Args:
    x: ``(m, in)``, rows grouped by expert (``group_sizes[e]`` rows for
      expert ``e``, in expert order).
    w: ``(E, out, in)``, torch ``Linear`` layout per expert (HF's experts).
    group_sizes: ``(E,)`` int32, summing to ``m``.

  Returns:
    ``(m, out)``: row ``j`` of group ``e`` is ``x[j] @ w[e].T``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
    >>> grouped_linear(jnp.ones((3, 2)), w, jnp.array([1, 2], jnp.int32)).tolist()
    [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
  """
  out = explicit.rows_by_cols(x, w, 1)
  if out is None:
    return lax.ragged_dot_general(x, w, group_sizes, _GROUPED)
  # explicit axes: JAX's ragged_dot cannot contract a sharded axis there; the
  # compiler shards it in auto axes, the result typed (rows, out) as above
  return explicit.in_auto_axes(functools.partial(lax.ragged_dot_general,
                                                 ragged_dot_dimension_numbers=_GROUPED),
                               out.spec)(x, w, group_sizes)


def route(logits: Array, k: int) -> tuple[Array, Array]:
  """Mixtral's router: softmax in float32, top-k, weights renormalized to sum to 1.

  Example:
    >>> w, idx = route(jnp.array([[0.0, 1.0, 2.0]]), 2)
    >>> idx.tolist(), round(float(w.sum()), 6)
    ([[2, 1]], 1.0)
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, index = lax.top_k(probs, k)
  return weights / weights.sum(-1, keepdims=True), index


class MixtralExperts(nn.Module):
  """``E`` SwiGLU experts over (token, choice) pairs, grouped with ``ragged_dot``."""

  config: MixtralConfig

  @nn.compact
  def __call__(self, x: Array, weights: Array, index: Array) -> Array:
    """``Σ_k weights[t, k] · expert_{index[t, k]}(x[t])`` for ``x`` ``(N, d)``."""
    cfg = self.config
    e, d, ff = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    gate_up = self.param("gate_up_proj", _INIT, (e, 2 * ff, d), cfg.param_dtype)
    down = self.param("down_proj", _INIT, (e, d, ff), cfg.param_dtype)
    rows = x  # explicit axes: the routing sorts all tokens, so it sees them whole
    x, weights, index = (explicit.replicated(a) for a in (x, weights, index))
    k = index.shape[-1]
    flat = index.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # (token, choice) pairs by expert
    token = order // k
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = grouped_linear(x[token].astype(cfg.dtype), gate_up.astype(cfg.dtype), sizes)
    h = nn.silu(h[:, :ff]) * h[:, ff:]
    out = grouped_linear(h, down.astype(cfg.dtype), sizes)
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return explicit.rows_like(jnp.zeros_like(x).at[token].add(out.astype(x.dtype)), rows)


class MixtralSparseMoe(nn.Module):
  """Router (``gate``, a bias-free Dense to ``E`` logits) + ``MixtralExperts``."""

  config: MixtralConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    b, t, d = x.shape
    h = x.reshape(b * t, d)
    logits = nn.Dense(cfg.num_local_experts, use_bias=False, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, kernel_init=_INIT, name="gate")(h)
    weights, index = route(logits, cfg.num_experts_per_tok)
    return MixtralExperts(cfg, name="experts")(h, weights, index).reshape(b, t, d)


class MixtralBlock(nn.Module):
  """Pre-norm decoder block: Llama attention, then the sparse MoE MLP."""

  config: MixtralConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    acfg = self.config.attention_config()
    h = _norm(acfg, "input_layernorm")(x)
    x = x + LlamaAttention(acfg, name="self_attn")(h, positions, mask)
    h = _norm(acfg, "post_attention_layernorm")(x)
    return x + MixtralSparseMoe(self.config, name="mlp")(h)


class Mixtral(nn.Module):
  """Mixtral-style MoE causal LM: ``(B, T)`` token ids -> ``(B, T, V)`` logits.

  Parameter paths follow HF's module names (``layers_0/mlp/experts/gate_up_proj``,
  ``layers_0/mlp/gate/kernel``, ...); see ``mixtral_rules``.

  Example:
    >>> import jax.numpy as jnp
    >>> cfg = MixtralConfig.tiny()
    >>> params = init_moe_params(cfg)
    >>> params["layers_0"]["mlp"]["experts"]["gate_up_proj"].shape   # (E, 2 ff, d)
    (4, 96, 32)
    >>> Mixtral(cfg).apply({"params": params}, jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 128)
  """

  config: MixtralConfig

  @nn.compact
  def __call__(self, input_ids: Array, positions: Array | None = None,
               attention_mask: Array | None = None) -> Array:
    """``(B, T, vocab_size)`` logits; ``attention_mask`` ``(B, T)`` hides padding."""
    cfg, acfg = self.config, self.config.attention_config()
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(_causal_mask(t, cfg.sliding_window), (b, t, t))
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, embedding_init=_INIT,
                     name="embed_tokens")
    x = embed(input_ids) if explicit.spec_of(input_ids) is None else explicit.lookup(
        embed.embedding.astype(cfg.dtype), input_ids)  # explicit axes: rows like ids
    for i in range(cfg.num_hidden_layers):
      x = MixtralBlock(cfg, name=f"layers_{i}")(x, positions, mask)
    x = _norm(acfg, "norm")(x)
    if cfg.tie_word_embeddings:
      return embed.attend(x)
    return _dense(acfg, cfg.vocab_size, False, "lm_head")(x)


def init_moe_params(config: MixtralConfig, key: Array | None = None, *,
                    abstract: bool = False):
  """Random params for ``Mixtral(config)`` (or their shapes with ``abstract``).

  Example:
    >>> shapes = init_moe_params(MixtralConfig.tiny(), abstract=True)
    >>> shapes["layers_1"]["mlp"]["experts"]["down_proj"].shape   # (E, d, ff)
    (4, 32, 48)
  """
  return random_params(Mixtral, config, key, abstract)
