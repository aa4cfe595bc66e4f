"""Token generation: ``generate`` (uncached) and ``generate_cached`` (KV cache)."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lora_jax._src import explicit

Array = jax.Array


def _sample(logits: Array, key: Array, temperature: float | Array, top_k: int | None,
            greedy: bool) -> Array:
  """Argmax, or a draw from ``softmax(logits / temperature)`` (top-k filtered)."""
  if greedy:
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
  ``generate_cached`` returns the same tokens with a KV cache.

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
    tok = _sample(logits, sub, temperature, top_k, temperature == 0.0).astype(ids.dtype)
    tok = jnp.where(done, jnp.asarray(pad_id, ids.dtype), tok)
    if eos_id is not None:
      done = done | (tok == eos_id)
    ids = jax.lax.dynamic_update_slice_in_dim(ids, tok[:, None], t, axis=1)
    return ids, done, key

  ids, _, _ = jax.lax.fori_loop(p, p + max_new_tokens, step, (ids, done, key))
  return ids


def generate_cached(apply_fn: Callable[..., tuple[Array, Any]], params: Any,
                    prompt: Array, max_new_tokens: int, *,
                    make_cache: Callable[[int, int], Any], key: Array | None = None,
                    temperature: float = 0.0, top_k: int | None = None,
                    eos_id: int | None = None, pad_id: int = 0,
                    **apply_kwargs) -> Array:
  """``generate`` with a KV cache: one prefill, then one token per decode step.

  The prompt runs once (prefill) and fills the cache; each later step runs
  the model on the one new token per row. The tokens are the uncached
  ``generate``'s (same argmax; with the same ``key``, the same samples: one
  ``jax.random.split`` per new token, in the same order), and ``eos_id`` /
  ``pad_id`` work the same way; the decode loop stops early once every row
  has emitted ``eos_id``. Cost grows as ``N · (P + N)`` instead of
  ``N · (P + N)²``.

  Prefill and the decode loop are each ``jax.jit``-compiled once per
  ``(B, P, N)``, per ``apply_fn`` and ``make_cache`` object (pass the same
  objects each call: a new lambda compiles anew), per ``top_k``, ``eos_id``,
  ``pad_id``, whether ``temperature`` is 0, and the non-array
  ``apply_kwargs``. New params, prompts, keys, ``temperature`` values and
  array ``apply_kwargs`` reuse the compiled programs.

  Args:
    apply_fn: ``(params, ids, *, cache, positions, **apply_kwargs) ->
      (logits, cache)``: ``ids`` and ``positions`` are ``(B, T)``, logits
      ``(B, T, V)``. For the bundled Llama:
      ``lambda p, ids, **kw: model.apply({"params": p}, ids, **kw)``; with
      adapters wrap ``model.apply`` in ``lora_jax.lora``.
    params: whatever ``apply_fn`` takes.
    prompt: ``(B, P)`` token ids (all rows the same length).
    max_new_tokens: ``N``, a static int.
    make_cache: ``(batch_size, max_length) -> cache``, an empty cache with
      ``P + N`` slots, e.g. ``functools.partial(init_cache, config)``.
    key: PRNG key; required when ``temperature > 0``.
    temperature: 0 picks the argmax; otherwise a traced value.
    top_k: static; sample among the ``top_k`` largest logits.
    eos_id: once a row emits it, the row continues with ``pad_id``.
    pad_id: filler for finished rows.
    **apply_kwargs: passed to every ``apply_fn`` call unchanged (e.g. a
      per-example ``adapter_ids`` array; the batch axis leads every input).
      Arrays are traced; other values are static and must be hashable.

  Returns:
    ``(B, P + N)`` token ids: the prompt and its continuation.

  Example:
    >>> import functools, jax.numpy as jnp
    >>> from lora_jax.models import Llama, LlamaConfig, generate, init_cache, init_params
    >>> cfg = LlamaConfig.tiny()
    >>> model, params = Llama(cfg), init_params(cfg)
    >>> apply = lambda p, ids, **kw: model.apply({"params": p}, ids, **kw)
    >>> make_cache = functools.partial(init_cache, cfg)
    >>> prompt = jnp.array([[1, 2, 3]])
    >>> out = generate_cached(apply, params, prompt, 4, make_cache=make_cache)
    >>> out.shape
    (1, 7)
    >>> uncached = lambda p, ids: model.apply({"params": p}, ids)
    >>> bool((out == generate(uncached, params, prompt, 4)).all())
    True
  """
  if temperature > 0 and key is None:
    raise ValueError("generate_cached: temperature > 0 samples; pass key=jax.random.key(...)")
  if temperature < 0:
    raise ValueError(f"generate_cached: temperature={temperature} must be >= 0 (0: greedy)")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"generate_cached: max_new_tokens={max_new_tokens!r} must be an int >= 0")
  if jnp.ndim(prompt) != 2:
    raise ValueError(f"generate_cached: prompt has shape {jnp.shape(prompt)}; expected "
                     "(batch, prompt_length) token ids")
  if max_new_tokens == 0:
    return jnp.asarray(prompt)
  arrays = {k: v for k, v in apply_kwargs.items() if not _is_static(v)}
  static = dict(apply_fn=apply_fn, make_cache=make_cache, max_new_tokens=max_new_tokens,
                greedy=temperature == 0.0, top_k=top_k, eos_id=eos_id, pad_id=pad_id,
                static_kwargs=tuple(sorted((k, v) for k, v in apply_kwargs.items()
                                           if _is_static(v))))
  key = jax.random.key(0) if key is None else key
  temperature = jnp.asarray(temperature, jnp.float32)
  state = _prefill(params, prompt, key, temperature, arrays, **static)
  return _decode(params, prompt, state, temperature, arrays, **static)


def _is_static(x: Any) -> bool:
  return x is None or isinstance(x, (bool, int, float, str))


_STATIC = ("apply_fn", "make_cache", "max_new_tokens", "greedy", "top_k", "eos_id",
           "pad_id", "static_kwargs")


def _step(tok_logits, done, key, temperature, greedy, top_k, eos_id, pad_id, dtype):
  """Sample one token per row (one key split), pad finished rows, update ``done``."""
  key, sub = jax.random.split(key)
  tok = _sample(tok_logits, sub, temperature, top_k, greedy).astype(dtype)
  tok = jnp.where(done, jnp.asarray(pad_id, dtype), tok)
  if eos_id is not None:
    done = done | (tok == eos_id)
  return tok, done, key


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(params, prompt, key, temperature, arrays, *, apply_fn, make_cache,
             max_new_tokens, greedy, top_k, eos_id, pad_id, static_kwargs):
  """Run the prompt into a fresh cache; sample the first new token."""
  b, p = prompt.shape
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  logits, cache = apply_fn(params, prompt, cache=make_cache(b, p + max_new_tokens),
                           positions=positions, **arrays, **dict(static_kwargs))
  done = explicit.rows_like(jnp.zeros((b,), bool), prompt)  # explicit axes: rows split
  tok, done, key = _step(logits[:, -1], done, key, temperature,
                         greedy, top_k, eos_id, pad_id, prompt.dtype)
  return tok, done, key, cache


@functools.partial(jax.jit, static_argnames=_STATIC)
def _decode(params, prompt, state, temperature, arrays, *, apply_fn, make_cache,
            max_new_tokens, greedy, top_k, eos_id, pad_id, static_kwargs):
  """Decode tokens 1 .. N-1, one ``(B, 1)`` model call each; ``(B, P + N)`` ids out."""
  del make_cache
  tok, done, key, cache = state
  b, p = prompt.shape
  out = explicit.rows_like(jnp.full((b, max_new_tokens), pad_id, prompt.dtype), prompt)
  out = out.at[:, 0].set(tok)

  def cond(carry):
    i, _, done, _, _ = carry
    more = i < max_new_tokens
    return more if eos_id is None else more & ~done.all()

  def body(carry):
    i, out, done, key, cache = carry
    prev = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
    positions = jnp.broadcast_to(p + i - 1, (b, 1))
    logits, cache = apply_fn(params, prev, cache=cache, positions=positions,
                             **arrays, **dict(static_kwargs))
    tok, done, key = _step(logits[:, 0], done, key, temperature, greedy, top_k,
                           eos_id, pad_id, out.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
    return i + 1, out, done, key, cache

  _, out, _, _, _ = jax.lax.while_loop(cond, body, (1, out, done, key, cache))
  return jnp.concatenate([prompt, out], axis=1)
