"""Token generation for any ``(params, ids) -> logits`` function: ``generate``."""

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


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
    >>> from lora_jax.models import Llama, LlamaConfig, init_params
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
