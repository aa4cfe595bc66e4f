"""The Flax Linen Llama-style decoder: ``LlamaConfig``, its layers, ``Llama``, ``init_params``.

RMSNorm, rotary embeddings (HF's ``rotate_half`` convention), grouped-query
attention with a causal mask and a SwiGLU MLP, with Hugging Face's parameter
names (see ``lora_jax.models.llama``).
"""

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from lora_jax._src import explicit
from lora_jax._src.einsum import fold_matmul

Array = jax.Array
_INIT = nn.initializers.normal(0.02)  # HF's initializer_range


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-style decoder (HF ``LlamaConfig`` names).

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width ``d``.
    intermediate_size: SwiGLU hidden width.
    num_hidden_layers: number of decoder blocks ``L``.
    num_attention_heads: query heads.
    num_key_value_heads: key/value heads (grouped-query attention when fewer
      than the query heads; must divide them).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: rotary base.
    max_position_embeddings: longest sequence (used by ``generate`` checks).
    tie_word_embeddings: logits use the embedding matrix (no ``lm_head``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    scan_layers: stack the blocks with ``nn.scan`` (leading layer axis).
    remat: rematerialize each block in the backward pass.
    head_dim: per-head width; ``hidden_size // num_attention_heads`` if None.
    attention_bias: q/k/v/o projections have biases.
    mlp_bias: gate/up/down projections have biases.
    sliding_window: Mistral's local attention: a token attends to at most the
      last ``sliding_window`` positions (itself included); None: all earlier
      positions (Llama).

  Example:
    >>> cfg = LlamaConfig.tiny(scan_layers=True)
    >>> cfg.num_hidden_layers, cfg.head_size, cfg.scan_layers
    (2, 8, True)
  """

  vocab_size: int = 128
  hidden_size: int = 32
  intermediate_size: int = 64
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 256
  tie_word_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False
  head_dim: int | None = None
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None

  def __post_init__(self):
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"LlamaConfig: sliding_window={self.sliding_window} must be "
                       ">= 1 (or None for full causal attention)")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"LlamaConfig: num_attention_heads={self.num_attention_heads} must be "
          f"a multiple of num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; set head_dim")
    if self.head_size % 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_size} must be even for RoPE")

  @property
  def head_size(self) -> int:
    """The per-head width actually used."""
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def tiny(cls, **overrides) -> "LlamaConfig":
    """A 2-layer, d=32 config with GQA (4 query / 2 kv heads) for tests."""
    return cls(**overrides)

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> "LlamaConfig":
    """Build from a ``transformers`` Llama / Mistral config or its ``config.json`` dict.

    Every field that changes what the model computes is either honoured
    (``head_dim``, ``attention_bias``, ``mlp_bias``, ``tie_word_embeddings``,
    ``rope_theta``, Mistral's ``sliding_window``, ...) or refused by name:
    another ``model_type``, ``hidden_act`` other than SiLU, rope scaling
    (``rope_type`` other than ``default``, ``partial_rotary_factor``),
    ``attention_dropout``, per-layer ``layer_types``.

    Args:
      hf_config: a transformers config object or a plain dict.
      **overrides: fields to set (``dtype``, ``scan_layers``, ...).

    Returns:
      A ``LlamaConfig``.

    Raises:
      NotImplementedError: naming every field (and value) the Flax model
        does not implement.

    Example:
      >>> cfg = LlamaConfig.from_hf({"vocab_size": 64, "hidden_size": 32,
      ...     "intermediate_size": 64, "num_hidden_layers": 1,
      ...     "num_attention_heads": 4, "num_key_value_heads": 1,
      ...     "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
      >>> cfg.rope_theta, cfg.num_key_value_heads
      (500000.0, 1)
      >>> LlamaConfig.from_hf({"model_type": "qwen2"})
      Traceback (most recent call last):
      ...
      NotImplementedError: LlamaConfig.from_hf: the Flax Llama does not implement this config:
        model_type='qwen2': only 'llama' and 'mistral' are supported
    """
    if not isinstance(hf_config, Mapping) and not hasattr(hf_config, "to_dict"):
      raise TypeError("LlamaConfig.from_hf: expected a transformers config or a dict; "
                      f"got {type(hf_config).__name__}")
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    problems = _unsupported_hf_fields(d)
    if problems:
      raise NotImplementedError(
          "LlamaConfig.from_hf: the Flax Llama does not implement this config:\n  "
          + "\n  ".join(problems))
    _check_hf_sizes(d)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    heads = d["num_attention_heads"]
    window = d.get("sliding_window") if d.get("model_type") == "mistral" else None
    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        head_dim=d.get("head_dim"),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        sliding_window=None if window is None else int(window))
    fields.update(overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict:
    """A ``config.json`` dict that ``transformers.LlamaConfig`` reads.

    Example:
      >>> LlamaConfig.tiny().to_hf_dict()["model_type"]
      'llama'
    """
    if self.sliding_window is not None and (self.attention_bias or self.mlp_bias):
      raise ValueError("LlamaConfig.to_hf_dict: transformers has no model with both "
                       "sliding_window (Mistral) and attention_bias / mlp_bias")
    kind = "llama" if self.sliding_window is None else "mistral"
    extra = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
    return {
        "architectures": [f"{kind.capitalize()}ForCausalLM"], "model_type": kind, **extra,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_size, "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias,
        "torch_dtype": jnp.dtype(self.param_dtype).name,
    }


_HF_MODEL_TYPES = ("llama", "mistral")
_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def _check_hf_sizes(d: Mapping[str, Any]) -> None:
  """The size fields must be present positive integers."""
  bad = [f"{k}: missing" if k not in d else f"{k}={d[k]!r}: expected a positive integer"
         for k in _HF_SIZES
         if not (isinstance(d.get(k), int) and not isinstance(d.get(k), bool) and d[k] > 0)]
  if bad:
    raise ValueError("LlamaConfig.from_hf: invalid config fields:\n  " + "\n  ".join(bad))


def _unsupported_hf_fields(d: Mapping[str, Any]) -> list[str]:
  """``field=value: why`` for each HF config field the Flax Llama does not implement."""
  problems = []
  kind = d.get("model_type", "llama")
  if kind not in _HF_MODEL_TYPES:
    problems.append(f"model_type={kind!r}: only 'llama' and 'mistral' are supported")
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    problems.append(f"rope_type={rope_type!r}: only 'default' rotary embeddings "
                    "(no rope scaling) are supported")
  for where in (rope, d):
    if where.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
      problems.append(f"partial_rotary_factor={where['partial_rotary_factor']!r}: "
                      "only full-width rotary embeddings are supported")
      break
  if d.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={d['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
  if d.get("attention_dropout") not in (None, 0, 0.0):
    problems.append(f"attention_dropout={d['attention_dropout']!r}: the Flax Llama "
                    "has no attention dropout (set it to 0.0)")
  if d.get("layer_types") and any(t != "full_attention" for t in d["layer_types"]):
    problems.append(f"layer_types={d['layer_types']!r}: per-layer attention kinds "
                    "are not supported")
  if d.get("sliding_window") is not None and kind != "mistral":
    problems.append(f"sliding_window={d['sliding_window']!r} with model_type={kind!r}: "
                    "sliding windows are read only for model_type 'mistral'")
  if kind == "mistral":
    problems += [f"{k}={d[k]!r} with model_type='mistral': transformers' Mistral has "
                 "no such biases" for k in ("attention_bias", "mlp_bias") if d.get(k)]
  return problems


def rotary(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding of ``x`` (B, T, heads, hd) at ``positions`` (B, T).

  HF's convention: the two halves of the head are the rotated pairs
  (``rotate_half``), frequencies ``theta ** (-2k / hd)``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 3, 2, 4))
    >>> y = rotary(x, jnp.arange(3)[None], 10000.0)
    >>> y.shape, bool(jnp.allclose(y[:, 0], x[:, 0]))
    ((1, 3, 2, 4), True)
  """
  hd = x.shape[-1]
  inv = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
  freqs = (positions.astype(jnp.float32)[..., None] * inv[None, None, :])[:, :, None, :]
  cos, sin = jnp.cos(freqs).astype(x.dtype), jnp.sin(freqs).astype(x.dtype)
  # HF's x * [cos, cos] + [-x2, x1] * [sin, sin], one half at a time: the
  # same products and sums, without the full-width cos/sin and rotated copies
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _dense(cfg: LlamaConfig, features: int, bias: bool, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, kernel_init=_INIT, name=name,
                  dot_general=_token_matmul)


def _token_matmul(x, kernel, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None):
  """``Dense``'s ``x · kernel`` with ``x``'s leading (token) axes folded into one.

  The same product, as a 2-D matmul: the weight gradient of a ``(B, T, d)``
  dot makes XLA:CPU transpose the full-size ``(B, T, out)`` cotangent in a
  slow strided loop, the 2-D form's is a plain matmul (``bench/peft.py``:
  this cut the full fine-tuning step). On an explicit mesh the batch axis'
  sharding is named instead (``explicit.dot_general``).
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if (explicit.spec_of(x) is not None or out_sharding is not None or lb or rb
      or tuple(lc) != (x.ndim - 1,) or tuple(rc) != (0,) or x.ndim <= 2):
    return explicit.dot_general(x, kernel, dimension_numbers, precision,
                                preferred_element_type, out_sharding)
  return fold_matmul(x, kernel, 1, precision=precision,
                     preferred_element_type=preferred_element_type)


def _norm(cfg: LlamaConfig, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=cfg.rms_norm_eps, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name=name)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary embeddings."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               kv_cache: tuple[Array, Array] | None = None, layer: Array | int = 0):
    """Attention output ``(B, T, d)``; with ``kv_cache`` also the updated cache.

    Args:
      x: ``(B, T, d)`` inputs.
      positions: ``(B, T)`` rotary positions.
      mask: ``(B, T, T)``, or ``(B, T, S)`` over the cache slots with a cache.
      kv_cache: the whole model's ``(k, v)``, each ``(B, L, S, kv_heads,
        head_dim)`` (``init_cache``): this layer's new keys and values are
        written at ``[:, layer, positions]`` in place (no copy of the rest of
        the cache) and the queries attend over that layer's ``S`` slots
        (``mask`` hides the unfilled ones).
      layer: this block's index into the cache's layer axis (traced under
        ``nn.scan``).

    Returns:
      The output, or ``(output, (k, v))`` when ``kv_cache`` is given.
    """
    cfg = self.config
    b, t, _ = x.shape
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    bias = cfg.attention_bias
    q = explicit.reshape(_dense(cfg, h * hd, bias, "q_proj")(x), (b, t, h, hd))
    k = explicit.reshape(_dense(cfg, kv * hd, bias, "k_proj")(x), (b, t, kv, hd))
    v = explicit.reshape(_dense(cfg, kv * hd, bias, "v_proj")(x), (b, t, kv, hd))
    q = explicit.reshape(rotary(q, positions, cfg.rope_theta), (b, t, kv, h // kv, hd))
    k = rotary(k, positions, cfg.rope_theta)
    if kv_cache is not None:
      kv_cache = _write_cache(kv_cache, k, v, positions, layer)
      k, v = (lax.dynamic_index_in_dim(c, layer, 1, keepdims=False) for c in kv_cache)
    out = explicit.reshape(_attend(q, k, v, mask), (b, t, h * hd))
    out = _dense(cfg, cfg.hidden_size, bias, "o_proj")(out)
    return out if kv_cache is None else (out, kv_cache)


@jax.checkpoint
def _attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Softmax attention of grouped queries ``(B, T, kv, r, hd)`` over ``(B, S,
  kv, hd)`` keys/values: query head ``g·r + i`` attends with kv head ``g``
  (HF's ``repeat_kv``).

  Rematerialized: the backward pass recomputes the ``(B, heads, T, S)``
  scores from ``q``, ``k`` and the mask instead of keeping three of them
  per layer (the masked scores, their exponentials, the probabilities),
  as torch's fused attention keeps only its inputs and output.
  """
  b, t, g, r, hd = q.shape
  s = k.shape[1]
  # heads-major, each kv head's r query heads as one (r·T)-row matrix: the
  # batched matmuls then contract the contiguous head_dim axis, and the
  # layout copies move whole head_dim rows (1.7% of bench.peft's big step)
  q = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, g, r * t, hd)
  k, v = (jnp.transpose(z, (0, 2, 1, 3)) for z in (k, v))
  scores = jnp.einsum("bgqd,bgsd->bgqs", q, k) * jnp.asarray(hd ** -0.5, q.dtype)
  mask = jnp.broadcast_to(mask[:, None, None], (b, 1, r, t, s)).reshape(b, 1, r * t, s)
  scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgqs,bgsd->bgqd", probs, v).reshape(b, g, r, t, hd)
  return jnp.transpose(out, (0, 3, 1, 2, 4))


@jax.checkpoint
def _swiglu(gate: Array, up: Array) -> Array:
  """``silu(gate) * up``, rematerialized: the backward pass recomputes the
  SiLU from ``gate`` (elementwise, cheap) instead of keeping its
  intermediates, so a layer keeps ``gate``, ``up`` and the product."""
  return nn.silu(gate) * up


def _write_cache(kv_cache: tuple[Array, Array], k: Array, v: Array,
                 positions: Array, layer: Array | int) -> tuple[Array, Array]:
  """Row ``b``'s token ``t`` goes to ``[b, layer, positions[b, t]]`` (out of range: dropped)."""
  def write(kv_cache, k, v, positions, layer):
    rows = jnp.arange(k.shape[0])[:, None]
    return tuple(c.at[rows, layer, positions].set(x.astype(c.dtype), mode="drop")
                 for c, x in zip(kv_cache, (k, v)))
  return explicit.typed_like(write, *kv_cache)(kv_cache, k, v, positions, layer)


class LlamaMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
    up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
    return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(_swiglu(gate, up))


class LlamaBlock(nn.Module):
  """Pre-norm decoder block; returns ``(x, kv_cache)`` so it can be scanned.

  ``kv_cache`` is None without a cache, else the whole cache with this
  layer's (``layer``) slots updated (see ``LlamaAttention``).
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array,
               kv_cache: tuple[Array, Array] | None = None, layer: Array | int = 0):
    cfg = self.config
    h = _norm(cfg, "input_layernorm")(x)
    attn = LlamaAttention(cfg, name="self_attn")(h, positions, mask, kv_cache, layer)
    if kv_cache is not None:
      attn, kv_cache = attn
    x = x + attn
    h = _norm(cfg, "post_attention_layernorm")(x)
    return x + LlamaMLP(cfg, name="mlp")(h), kv_cache


class Llama(nn.Module):
  """Llama-style causal language model: ``(B, T)`` token ids -> ``(B, T, V)`` logits.

  With ``cache=`` (from ``init_cache``) the call is one step of KV-cached
  decoding and returns ``(logits, cache)``: the keys and values of the ``T``
  new tokens are written at cache slot ``positions`` (slot ``s`` holds the
  token at position ``s``), and each query attends over the cache slots at or
  before its position (within ``sliding_window``, if set). A prefill is a call
  with the whole prompt; each decode step a call with ``(B, 1)`` ids at the
  next position. ``lora_jax.models.generate_cached`` drives this loop.

  Attributes:
    config: a ``LlamaConfig``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = Llama(LlamaConfig.tiny())
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> params["layers_0"]["self_attn"]["q_proj"]["kernel"].shape
    (32, 32)
    >>> model.apply({"params": params}, ids).shape
    (1, 5, 128)
    >>> cache = init_cache(model.config, batch_size=1, max_length=8)
    >>> logits, cache = model.apply({"params": params}, ids, cache=cache)  # prefill
    >>> step, cache = model.apply({"params": params}, ids[:, :1], cache=cache,
    ...                           positions=jnp.array([[5]]))            # decode
    >>> logits.shape, step.shape, cache["k"].shape
    ((1, 5, 128), (1, 1, 128), (1, 2, 8, 2, 8))
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids: Array, positions: Array | None = None,
               attention_mask: Array | None = None, cache: dict | None = None):
    """Logits for ``input_ids``; with ``cache``, ``(logits, updated cache)``.

    Args:
      input_ids: ``(B, T)`` integer token ids.
      positions: ``(B, T)`` rotary positions (and, with a cache, the slots the
        tokens are written to); ``arange(T)`` if None.
      attention_mask: ``(B, T)``, 1 for tokens to attend to, 0 for padding;
        only without a cache.
      cache: ``{"k", "v"}`` arrays ``(B, L, S, kv_heads, head_dim)`` from
        ``init_cache``; every array has the batch axis first.

    Returns:
      ``(B, T, vocab_size)`` logits in ``config.dtype``; with ``cache``, the
      tuple ``(logits, cache)``.
    """
    cfg = self.config
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if cache is None:
      mask = jnp.broadcast_to(_causal_mask(t, cfg.sliding_window), (b, t, t))
      if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    else:
      _check_cache(cfg, cache, input_ids.shape, attention_mask)
      mask = _cache_mask(positions, cache["k"].shape[2], cfg.sliding_window)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, embedding_init=_INIT,
                     name="embed_tokens")
    x = embed(input_ids) if explicit.spec_of(input_ids) is None else explicit.lookup(
        embed.embedding.astype(cfg.dtype), input_ids)  # explicit axes: rows like ids
    block = nn.remat(LlamaBlock) if cfg.remat else LlamaBlock
    if cfg.scan_layers and cache is None:
      stack = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast),
                      length=cfg.num_hidden_layers)
      x, _ = stack(cfg, name="layers")(x, positions, mask)
    elif cfg.scan_layers:
      # The whole cache rides in the carry and each layer updates its own
      # slots in place: scanning the cache's layer axis as xs/ys instead would
      # copy (and transpose) every layer's cache at each decode step.
      def layer_step(mdl, carry, i):
        x, kv = carry
        return mdl(x, positions, mask, kv, i), None
      stack = nn.scan(layer_step, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=cfg.num_hidden_layers)
      (x, (k, v)), _ = stack(block(cfg, name="layers"), (x, (cache["k"], cache["v"])),
                             jnp.arange(cfg.num_hidden_layers))
      cache = {"k": k, "v": v}
    else:
      kv = None if cache is None else (cache["k"], cache["v"])
      for i in range(cfg.num_hidden_layers):
        x, kv = block(cfg, name=f"layers_{i}")(x, positions, mask, kv, i)
      if cache is not None:
        cache = {"k": kv[0], "v": kv[1]}
    x = _norm(cfg, "norm")(x)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(cfg, cfg.vocab_size, False, "lm_head")(x)
    return logits if cache is None else (logits, cache)


def init_cache(config: LlamaConfig, batch_size: int, max_length: int,
               dtype: Any = None) -> dict:
  """An empty KV cache for ``Llama(config)``: ``{"k", "v"}`` zeros.

  Each array is ``(batch_size, num_hidden_layers, max_length, kv_heads,
  head_dim)`` (batch axis first, for scanned and unscanned layers alike);
  ``max_length`` must cover the prompt and every generated token. Pass it as
  ``Llama.__call__``'s ``cache=``.

  Args:
    config: the model's ``LlamaConfig``.
    batch_size: ``B``.
    max_length: ``S``, the number of cache slots (positions ``0 .. S-1``).
    dtype: the cache dtype; ``config.dtype`` if None.

  Returns:
    ``{"k": zeros, "v": zeros}``.

  Example:
    >>> init_cache(LlamaConfig.tiny(), 3, 16)["v"].shape
    (3, 2, 16, 2, 8)
  """
  if batch_size < 1 or max_length < 1:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_length={max_length} "
                     "must both be >= 1")
  shape = (batch_size, config.num_hidden_layers, max_length,
           config.num_key_value_heads, config.head_size)
  zeros = jnp.zeros(shape, config.dtype if dtype is None else dtype)
  return {"k": zeros, "v": zeros}


def _check_cache(cfg: LlamaConfig, cache: Any, ids_shape: tuple[int, int],
                 attention_mask: Array | None) -> None:
  """The cache is ``init_cache(cfg, B, S)``-shaped with ``S >= T``; no attention_mask."""
  fix = "build it with lora_jax.models.init_cache(config, batch_size, max_length)"
  if not isinstance(cache, Mapping) or set(cache) != {"k", "v"}:
    found = sorted(cache) if isinstance(cache, Mapping) else type(cache).__name__
    raise ValueError(f"Llama: cache must be a dict with keys 'k' and 'v'; got {found}; {fix}")
  b, t = ids_shape
  want = (b, cfg.num_hidden_layers, None, cfg.num_key_value_heads, cfg.head_size)
  for name in ("k", "v"):
    shape = tuple(cache[name].shape)
    if len(shape) != 5 or any(w not in (None, s) for w, s in zip(want, shape)):
      raise ValueError(
          f"Llama: cache['{name}'] has shape {shape}; expected (batch={b}, "
          f"layers={want[1]}, max_length, kv_heads={want[3]}, head_dim={want[4]}); {fix}")
  if cache["k"].shape != cache["v"].shape:
    raise ValueError(f"Llama: cache['k'] {tuple(cache['k'].shape)} and cache['v'] "
                     f"{tuple(cache['v'].shape)} differ; {fix}")
  if t > cache["k"].shape[2]:
    raise ValueError(f"Llama: {t} input tokens do not fit a cache of max_length="
                     f"{cache['k'].shape[2]}; {fix} with a larger max_length")
  if attention_mask is not None:
    raise ValueError("Llama: attention_mask is not supported with cache=; cached "
                     "decoding attends to every filled slot at or before each position")


def _cache_mask(positions: Array, length: int, window: int | None) -> Array:
  """``(B, T, S)``: the query at position p sees slot s when s <= p (and p - s < window)."""
  p, s = positions[:, :, None], jnp.arange(length)[None, None, :]
  return (s <= p) if window is None else (s <= p) & (p - s < window)


def _causal_mask(t: int, window: int | None) -> Array:
  """``(T, T)``: query i sees key j when j <= i (and i - j < window)."""
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  return (j <= i) if window is None else (j <= i) & (i - j < window)


def init_params(config: LlamaConfig, key: Array | None = None, *,
                abstract: bool = False):
  """Random params for ``Llama(config)`` (or their shapes with ``abstract``).

  Example:
    >>> shapes = init_params(LlamaConfig.tiny(scan_layers=True), abstract=True)
    >>> shapes["layers"]["mlp"]["down_proj"]["kernel"].shape
    (2, 64, 32)
  """
  return random_params(Llama, config, key, abstract)


def random_params(model_cls, config, key: Array | None, abstract: bool):
  """``model_cls(config).init`` on one token, jitted once per config."""
  key = jax.random.key(0) if key is None else key
  init = _init_fn(model_cls, config, jax.sharding.get_abstract_mesh())  # one per mesh
  return jax.eval_shape(init, key) if abstract else init(key)


@functools.lru_cache(maxsize=16)
def _init_fn(model_cls, config, mesh):
  del mesh  # a cache key: a jitted init traced under one mesh fails under another
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.jit(lambda k: model_cls(config).init(k, ids)["params"])
