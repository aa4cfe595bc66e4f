"""A compact Flax Linen Llama-style decoder that matches Hugging Face's Llama.

RMSNorm, rotary embeddings (HF's ``rotate_half`` convention, ``rope_theta``),
grouped-query attention with a causal mask, a SwiGLU MLP and a tied or untied
``lm_head``. Parameter names mirror Hugging Face's, so the PyTorch name map is
a handful of rules (``llama_name_map``)::

  embed_tokens/embedding                      model.embed_tokens.weight
  layers_{i}/self_attn/{q,k,v,o}_proj/kernel  model.layers.{i}.self_attn.q_proj.weight
  layers_{i}/mlp/{gate,up,down}_proj/kernel   model.layers.{i}.mlp.gate_proj.weight
  layers_{i}/input_layernorm/scale            model.layers.{i}.input_layernorm.weight
  layers_{i}/post_attention_layernorm/scale   model.layers.{i}.post_attention_layernorm.weight
  norm/scale                                  model.norm.weight
  lm_head/kernel                              lm_head.weight

With ``scan_layers=True`` the blocks are stacked with ``nn.scan``: a single
``layers/...`` subtree whose leaves carry a leading layer axis (a q_proj
kernel is ``(L, d, heads * head_dim)``). Kernels are plain ``nn.Dense``
``(in, out)`` matrices, the transpose of torch's ``Linear.weight``.

This module does not import torch; ``load_hf_llama`` reads safetensors with
``safetensors.numpy``.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.interop import torch as _interop

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

  def __post_init__(self):
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
    """Build from a ``transformers.LlamaConfig`` or its ``config.json`` dict.

    Args:
      hf_config: a transformers config object or a plain dict.
      **overrides: fields to set (``dtype``, ``scan_layers``, ...).

    Returns:
      A ``LlamaConfig``.

    Raises:
      NotImplementedError: for a rope scaling type other than ``default``
        or an activation other than SiLU.

    Example:
      >>> cfg = LlamaConfig.from_hf({"vocab_size": 64, "hidden_size": 32,
      ...     "intermediate_size": 64, "num_hidden_layers": 1,
      ...     "num_attention_heads": 4, "num_key_value_heads": 1,
      ...     "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
      >>> cfg.rope_theta, cfg.num_key_value_heads
      (500000.0, 1)
    """
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise NotImplementedError(
          f"LlamaConfig.from_hf: rope_type {rope_type!r} is not supported "
          "(only 'default' rotary embeddings)")
    if d.get("hidden_act", "silu") != "silu":
      raise NotImplementedError(
          f"LlamaConfig.from_hf: hidden_act {d['hidden_act']!r} is not supported")
    heads = d["num_attention_heads"]
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
        mlp_bias=bool(d.get("mlp_bias", False)))
    fields.update(overrides)
    return cls(**fields)

  def to_hf_dict(self) -> dict:
    """A ``config.json`` dict that ``transformers.LlamaConfig`` reads.

    Example:
      >>> LlamaConfig.tiny().to_hf_dict()["model_type"]
      'llama'
    """
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
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
  freqs = positions.astype(jnp.float32)[..., None] * inv[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _dense(cfg: LlamaConfig, features: int, bias: bool, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, kernel_init=_INIT, name=name)


def _norm(cfg: LlamaConfig, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=cfg.rms_norm_eps, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, name=name)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with rotary embeddings."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array) -> Array:
    cfg = self.config
    b, t, _ = x.shape
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    bias = cfg.attention_bias
    q = _dense(cfg, h * hd, bias, "q_proj")(x).reshape(b, t, h, hd)
    k = _dense(cfg, kv * hd, bias, "k_proj")(x).reshape(b, t, kv, hd)
    v = _dense(cfg, kv * hd, bias, "v_proj")(x).reshape(b, t, kv, hd)
    q = rotary(q, positions, cfg.rope_theta).reshape(b, t, kv, h // kv, hd)
    k = rotary(k, positions, cfg.rope_theta)
    # query head g * (h // kv) + r attends with kv head g (HF's repeat_kv).
    scores = jnp.einsum("btgrd,bsgd->bgrts", q, k) * jnp.asarray(hd ** -0.5, q.dtype)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h * hd)
    return _dense(cfg, cfg.hidden_size, bias, "o_proj")(out)


class LlamaMLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
    up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
    return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
  """Pre-norm decoder block; returns ``(x, None)`` so it can be scanned."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array):
    cfg = self.config
    h = _norm(cfg, "input_layernorm")(x)
    x = x + LlamaAttention(cfg, name="self_attn")(h, positions, mask)
    h = _norm(cfg, "post_attention_layernorm")(x)
    return x + LlamaMLP(cfg, name="mlp")(h), None


class Llama(nn.Module):
  """Llama-style causal language model: ``(B, T)`` token ids -> ``(B, T, V)`` logits.

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
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids: Array, positions: Array | None = None,
               attention_mask: Array | None = None) -> Array:
    """Logits for ``input_ids``.

    Args:
      input_ids: ``(B, T)`` integer token ids.
      positions: ``(B, T)`` rotary positions; ``arange(T)`` if None.
      attention_mask: ``(B, T)``, 1 for tokens to attend to, 0 for padding.

    Returns:
      ``(B, T, vocab_size)`` logits in ``config.dtype``.
    """
    cfg = self.config
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, embedding_init=_INIT,
                     name="embed_tokens")
    x = embed(input_ids)
    block = nn.remat(LlamaBlock) if cfg.remat else LlamaBlock
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast),
                      length=cfg.num_hidden_layers)
      x, _ = stack(cfg, name="layers")(x, positions, mask)
    else:
      for i in range(cfg.num_hidden_layers):
        x, _ = block(cfg, name=f"layers_{i}")(x, positions, mask)
    x = _norm(cfg, "norm")(x)
    if cfg.tie_word_embeddings:
      return embed.attend(x)
    return _dense(cfg, cfg.vocab_size, False, "lm_head")(x)


def init_params(config: LlamaConfig, key: Array | None = None, *,
                abstract: bool = False):
  """Random params for ``Llama(config)`` (or their shapes with ``abstract``).

  Example:
    >>> shapes = init_params(LlamaConfig.tiny(scan_layers=True), abstract=True)
    >>> shapes["layers"]["mlp"]["down_proj"]["kernel"].shape
    (2, 64, 32)
  """
  key = jax.random.key(0) if key is None else key
  init = _init_fn(config)
  return jax.eval_shape(init, key) if abstract else init(key)


@functools.lru_cache(maxsize=16)
def _init_fn(config: LlamaConfig):
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.jit(lambda k: Llama(config).init(k, ids)["params"])


def _sample(logits: Array, key: Array, temperature: float, top_k: int | None) -> Array:
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)


def generate(apply_fn: Callable[[Any, Array], Array], params: Any,
             prompt: Array, max_new_tokens: int, *, key: Array | None = None,
             temperature: float = 0.0, top_k: int | None = None,
             eos_id: int | None = None, pad_id: int = 0) -> Array:
  """Greedy (``temperature=0``) or sampled continuation of ``prompt``.

  No KV cache: each step reruns the model on a fixed ``(B, P + N)`` buffer
  (the causal mask hides the unfilled tail), so shapes are static and the
  loop is one ``lax.fori_loop``; it traces once and runs under ``jax.jit``.
  Fine for small models and examples; cost grows as ``N · (P + N)²``.

  Args:
    apply_fn: ``(params, ids) -> logits``, e.g.
      ``lambda p, ids: model.apply({"params": p}, ids)`` or, with adapters,
      ``lambda p, ids: lora_jax.lora(model.apply)({"params": p}, ids)``.
    params: whatever ``apply_fn`` takes.
    prompt: ``(B, P)`` token ids (all rows the same length).
    max_new_tokens: ``N``, a static int.
    key: PRNG key; required when ``temperature > 0``.
    temperature: static; 0 picks the argmax.
    top_k: static; sample among the ``top_k`` largest logits.
    eos_id: once a row emits it, the row continues with ``pad_id``.
    pad_id: filler for the unfilled buffer and finished rows.

  Returns:
    ``(B, P + N)`` token ids: the prompt and its continuation.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = Llama(LlamaConfig.tiny())
    >>> params = init_params(model.config)
    >>> apply = lambda p, ids: model.apply({"params": p}, ids)
    >>> generate(apply, params, jnp.array([[1, 2, 3]]), 4).shape
    (1, 7)
  """
  if temperature > 0 and key is None:
    raise ValueError("generate: temperature > 0 samples; pass key=jax.random.key(...)")
  b, p = prompt.shape
  ids = jnp.pad(prompt, ((0, 0), (0, max_new_tokens)), constant_values=pad_id)
  key = jax.random.key(0) if key is None else key
  done = jnp.zeros((b,), bool)

  def step(t, carry):
    ids, done, key = carry
    key, sub = jax.random.split(key)
    logits = jax.lax.dynamic_index_in_dim(apply_fn(params, ids), t - 1, 1, False)
    tok = _sample(logits, sub, temperature, top_k).astype(ids.dtype)
    tok = jnp.where(done, jnp.asarray(pad_id, ids.dtype), tok)
    if eos_id is not None:
      done = done | (tok == eos_id)
    ids = jax.lax.dynamic_update_slice_in_dim(ids, tok[:, None], t, axis=1)
    return ids, done, key

  ids, _, _ = jax.lax.fori_loop(p, p + max_new_tokens, step, (ids, done, key))
  return ids


# --- Hugging Face interop ---------------------------------------------------

_LAYER_RULES = (
    (r"self_attn/(q|k|v|o)_proj/kernel", r"self_attn.\1_proj.weight"),
    (r"self_attn/(q|k|v|o)_proj/bias", r"self_attn.\1_proj.bias"),
    (r"mlp/(gate|up|down)_proj/kernel", r"mlp.\1_proj.weight"),
    (r"mlp/(gate|up|down)_proj/bias", r"mlp.\1_proj.bias"),
    (r"(input_layernorm|post_attention_layernorm)/scale", r"\1.weight"),
)


def llama_rules(prefix: str = "model.") -> list[tuple[str, str]]:
  """The (regex, replacement) rules from Flax ``Llama`` paths to HF keys.

  They cover both layouts: ``layers_(\\d+)/...`` maps to
  ``model.layers.\\1....`` and the scanned ``layers/...`` to
  ``model.layers.{layer}....`` (one torch tensor per layer). An optional
  leading ``params/`` is accepted. ``prefix`` is what precedes ``layers``,
  ``embed_tokens`` and ``norm`` in the torch keys (HF: ``"model."``).

  Example:
    >>> from lora_jax.interop import as_name_map
    >>> m = as_name_map(llama_rules())
    >>> m("layers_3/mlp/up_proj/kernel"), m("layers/norm/scale")
    ('model.layers.3.mlp.up_proj.weight', None)
    >>> m("layers/self_attn/q_proj/kernel")
    'model.layers.{layer}.self_attn.q_proj.weight'
  """
  p = prefix.replace("\\", "\\\\")
  rules = [(r"(?:params/)?embed_tokens/embedding", p + "embed_tokens.weight"),
           (r"(?:params/)?norm/scale", p + "norm.weight"),
           (r"(?:params/)?lm_head/kernel", "lm_head.weight")]
  for pat, rep in _LAYER_RULES:
    rules.append((r"(?:params/)?layers_(\d+)/" + pat,
                  p + r"layers.\g<1>." + rep.replace("\\1", "\\2")))
    rules.append((r"(?:params/)?layers/" + pat, p + "layers.{layer}." + rep))
  return rules


def llama_name_map(config: LlamaConfig | None = None) -> Callable[[str], str | None]:
  """Flax ``Llama`` path -> HF ``LlamaForCausalLM`` state-dict key.

  The same map serves both ``scan_layers`` settings (see ``llama_rules``);
  ``config`` is accepted for symmetry and future variants.

  Example:
    >>> llama_name_map()("layers_0/self_attn/k_proj/kernel")
    'model.layers.0.self_attn.k_proj.weight'
  """
  del config
  return _interop.as_name_map(llama_rules())


def _tied_ignore(config: LlamaConfig) -> tuple[str, ...]:
  # A tied HF model's state_dict() still lists lm_head.weight (the same tensor).
  return (r"lm_head\.weight",) if config.tie_word_embeddings else ()


def load_hf_llama(source: str | os.PathLike | Mapping[str, Any],
                  config: LlamaConfig | None = None, *, strict: bool = True,
                  **overrides):
  """Load a Hugging Face Llama checkpoint into ``(LlamaConfig, params)``.

  Args:
    source: a local HF model directory (``config.json`` + ``model.safetensors``
      or a sharded ``model.safetensors.index.json``), a weights file, or a
      state dict of torch tensors / numpy arrays.
    config: the ``LlamaConfig``; read from ``config.json`` when None (then
      ``source`` must be a directory).
    strict: raise on missing / unexpected / mis-shaped keys (one error).
    **overrides: ``LlamaConfig`` fields to change (``scan_layers=True``,
      ``dtype=jnp.bfloat16`` for compute, ``param_dtype=jnp.bfloat16``: the
      weights are cast to ``param_dtype``).

  Returns:
    ``(config, params)`` with ``params`` for ``Llama(config).apply({"params": params}, ids)``.

  Example:
    >>> import numpy as np
    >>> cfg = LlamaConfig.tiny(num_hidden_layers=1)
    >>> sd = to_hf_state_dict(init_params(cfg), cfg)
    >>> cfg2, params = load_hf_llama(sd, cfg.replace(scan_layers=True))
    >>> params["layers"]["self_attn"]["q_proj"]["kernel"].shape
    (1, 32, 32)
  """
  if config is None:
    if isinstance(source, Mapping):
      raise ValueError("load_hf_llama: pass config= when loading from a state dict")
    path = os.fspath(source)
    cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path),
                            "config.json")
    if not os.path.exists(cfg_file):
      raise FileNotFoundError(f"load_hf_llama: no config.json next to {path}; "
                              "pass config=LlamaConfig(...)")
    with open(cfg_file) as f:
      config = LlamaConfig.from_hf(json.load(f), **overrides)
  elif overrides:
    config = config.replace(**overrides)
  state = source if isinstance(source, Mapping) else _interop.read_state_dict(source)
  params = _interop.unpack_state_dict(
      state, init_params(config, abstract=True), llama_name_map(config), strict=strict,
      ignore=_tied_ignore(config))
  return config, params


def to_hf_state_dict(params: Any, config: LlamaConfig, *,
                     dtype: Any = None) -> dict[str, np.ndarray]:
  """Flax ``Llama`` params -> HF ``LlamaForCausalLM`` state dict (numpy).

  Merge LoRA adapters first (``lora_jax.merge``). A tied model has no
  ``lm_head.weight`` entry, as in HF's own files.

  Example:
    >>> cfg = LlamaConfig.tiny(num_hidden_layers=1)
    >>> sd = to_hf_state_dict(init_params(cfg), cfg)
    >>> sd["model.layers.0.self_attn.k_proj.weight"].shape   # (kv * hd, d)
    (16, 32)
  """
  return _interop.pack_state_dict(params, llama_name_map(config), dtype=dtype)


def save_hf_llama(params: Any, config: LlamaConfig, directory: str | os.PathLike,
                  *, dtype: Any = None, max_shard_size: int | None = None) -> list[str]:
  """Write ``config.json`` + safetensors that ``LlamaForCausalLM.from_pretrained`` loads.

  Returns:
    The paths written.

  Example:
    >>> import tempfile, os
    >>> cfg = LlamaConfig.tiny(num_hidden_layers=1)
    >>> d = tempfile.mkdtemp()
    >>> sorted(os.path.basename(p) for p in save_hf_llama(init_params(cfg), cfg, d))
    ['config.json', 'model.safetensors']
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  hf = config.to_hf_dict()
  if dtype is not None:
    hf["torch_dtype"] = jnp.dtype(dtype).name
  cfg_path = os.path.join(directory, "config.json")
  with open(cfg_path, "w") as f:
    json.dump(hf, f, indent=2)
  state = to_hf_state_dict(params, config, dtype=dtype)
  return [cfg_path] + _interop.write_state_dict(state, directory,
                                                max_shard_size=max_shard_size)
