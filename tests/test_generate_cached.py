"""KV-cached generation: ``Llama(cache=...)``, ``init_cache`` and ``generate_cached``.

The reference is the uncached ``generate``: same tokens greedy and sampled
(same key), same eos handling, with scanned and unscanned layers, GQA,
sliding windows and LoRA adapters through ``lj.lora``.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import (Llama, LlamaConfig, generate, generate_cached, init_cache,
                             init_params)

TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"


def _setup(**cfg_kw):
  cfg = LlamaConfig.tiny(**cfg_kw)
  model = Llama(cfg)
  params = init_params(cfg, jax.random.key(1))
  prompt = jax.random.randint(jax.random.key(2), (3, 5), 0, cfg.vocab_size)
  return cfg, model, params, prompt


def _lora_params(model, params, prompt, seed=3):
  """Adapters on every projection, with B != 0 so they change the tokens."""
  lp = lj.lora_init(jax.random.key(seed), params, lj.LoraConfig(rank=4, targets=TARGETS),
                    trace=lambda p: model.apply({"params": p}, prompt))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda n: n.replace(b=rng.normal(0, 0.5, n.b.shape).astype(np.float32))
      if isinstance(n, lj.LoraWeight) else n,
      lp, is_leaf=lambda n: isinstance(n, lj.LoraWeight))


def _applies(model, adapted: bool):
  """(uncached, cached) apply functions, through ``lj.lora`` when ``adapted``."""
  fn = lj.lora(model.apply) if adapted else model.apply
  return (lambda p, ids: fn({"params": p}, ids),
          lambda p, ids, **kw: fn({"params": p}, ids, **kw))


@pytest.mark.parametrize("cfg_kw", [
    dict(sliding_window=3), dict(scan_layers=True),
    dict(scan_layers=True, sliding_window=4, remat=True, num_key_value_heads=1),
], ids=["layers_i-window", "scanned", "scanned-window-remat-mqa"])
def test_greedy_equals_uncached(cfg_kw):
  cfg, model, params, prompt = _setup(**cfg_kw)
  make_cache = functools.partial(init_cache, cfg)
  lparams = _lora_params(model, params, prompt)
  outs = {}
  for adapted, p in ((False, params), (True, lparams)):
    uncached, cached = _applies(model, adapted)
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no LoraFallbackWarning on the cache path
      want = generate(uncached, p, prompt, 9)
      got = generate_cached(cached, p, prompt, 9, make_cache=make_cache)
    np.testing.assert_array_equal(got, want)
    outs[adapted] = got
  assert not np.array_equal(outs[True], outs[False])  # the adapters act on the tokens
  if cfg.sliding_window:  # the 14-token sequences outgrow the window: it matters
    nowin = Llama(cfg.replace(sliding_window=None))
    full = generate(lambda p, ids: nowin.apply({"params": p}, ids), params, prompt, 9)
    assert not np.array_equal(outs[False], full)


def test_sampling_with_the_same_key_equals_uncached():
  cfg, model, params, prompt = _setup(scan_layers=True)
  lparams = _lora_params(model, params, prompt)
  uncached, cached = _applies(model, adapted=True)
  make_cache = functools.partial(init_cache, cfg)
  for seed, temperature, top_k in ((0, 1.0, None), (1, 0.7, 10)):
    key = jax.random.key(seed)
    want = generate(uncached, lparams, prompt, 8, key=key, temperature=temperature,
                    top_k=top_k)
    got = generate_cached(cached, lparams, prompt, 8, make_cache=make_cache, key=key,
                          temperature=temperature, top_k=top_k)
    np.testing.assert_array_equal(got, want)
  other = generate_cached(cached, lparams, prompt, 8, make_cache=make_cache,
                          key=jax.random.key(5), temperature=1.0)
  assert not np.array_equal(other, got)


def test_eos_pads_finished_rows_like_uncached():
  cfg, model, params, prompt = _setup()
  uncached, cached = _applies(model, adapted=False)
  make_cache = functools.partial(init_cache, cfg)
  free = generate(uncached, params, prompt, 8)
  eos = int(free[0, 7])  # row 0's third new token
  want = generate(uncached, params, prompt, 8, eos_id=eos, pad_id=127)
  got = generate_cached(cached, params, prompt, 8, make_cache=make_cache, eos_id=eos,
                        pad_id=127)
  np.testing.assert_array_equal(got, want)
  first = int(np.argmax(np.asarray(want[0, 5:]) == eos))
  assert (np.asarray(got[0, 5 + first + 1:]) == 127).all()
  # One row: the loop stops at eos; the rest of the buffer is padding.
  one = generate_cached(cached, params, prompt[:1], 8, make_cache=make_cache, eos_id=eos,
                        pad_id=127)
  np.testing.assert_array_equal(one, want[:1])


def test_prefill_and_decode_compile_once_per_shape():
  cfg, model, params, prompt = _setup(scan_layers=True)
  traces = {"prefill": 0, "decode": 0}

  def cached(p, ids, *, cache, positions, shift):
    traces["decode" if ids.shape[1] == 1 else "prefill"] += 1
    logits, cache = lj.lora(model.apply)({"params": p}, ids, cache=cache,
                                         positions=positions)
    # A per-example input, as adapter_ids will be: row i prefers token shift[i].
    return logits + 100.0 * jax.nn.one_hot(shift, cfg.vocab_size)[:, None], cache

  make_cache = functools.partial(init_cache, cfg)
  for seed in range(3):  # new adapter values, prompt, key, temperature, per-row inputs
    lparams = _lora_params(model, params, prompt, seed=seed)
    prompt = jax.random.randint(jax.random.key(10 + seed), (3, 5), 0, cfg.vocab_size)
    shift = jnp.array([seed, 7, 9 + seed])
    out = generate_cached(cached, lparams, prompt, 4, make_cache=make_cache,
                          key=jax.random.key(seed), temperature=0.5 + seed, shift=shift)
    np.testing.assert_array_equal(out[:, 5:], np.repeat(shift[:, None], 4, axis=1))
  assert traces == {"prefill": 1, "decode": 1}
  generate_cached(cached, lparams, prompt[:, :4], 4, make_cache=make_cache,
                  shift=shift)  # a new prompt length and greedy: one more of each
  assert traces == {"prefill": 2, "decode": 2}


def test_llama_cache_call_matches_full_forward():
  cfg, model, params, prompt = _setup(sliding_window=3)
  ids = jnp.concatenate([prompt, prompt[:, ::-1]], axis=1)  # (3, 10)
  apply = jax.jit(lambda ids, **kw: model.apply({"params": params}, ids, **kw))
  want = apply(ids)
  first, cache = apply(ids[:, :6], cache=init_cache(cfg, 3, 12))
  pos = jnp.broadcast_to(jnp.arange(6, 10), (3, 4))
  second, cache = apply(ids[:, 6:], cache=cache, positions=pos)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), want,
                             atol=1e-5, rtol=1e-5)
  assert not np.asarray(cache["k"][:, :, 10:]).any()  # unused slots stay empty


def test_errors():
  cfg, model, params, prompt = _setup()
  _, cached = _applies(model, adapted=False)
  make_cache = functools.partial(init_cache, cfg)
  with pytest.raises(ValueError, match=r"temperature > 0 samples; pass key="):
    generate_cached(cached, params, prompt, 2, make_cache=make_cache, temperature=0.7)
  with pytest.raises(ValueError, match=r"temperature=-1.0 must be >= 0"):
    generate_cached(cached, params, prompt, 2, make_cache=make_cache, temperature=-1.0,
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"max_new_tokens=-1 must be an int >= 0"):
    generate_cached(cached, params, prompt, -1, make_cache=make_cache)
  with pytest.raises(ValueError, match=r"prompt has shape \(5,\); expected \(batch"):
    generate_cached(cached, params, prompt[0], 2, make_cache=make_cache)
  np.testing.assert_array_equal(
      generate_cached(cached, params, prompt, 0, make_cache=make_cache), prompt)
  apply = lambda **kw: model.apply({"params": params}, prompt, **kw)
  with pytest.raises(ValueError, match=r"cache\['k'\] has shape \(2, 2, 8, 2, 8\); "
                     r"expected \(batch=3, layers=2, max_length, kv_heads=2, head_dim=8\)"
                     r"; build it with lora_jax.models.init_cache"):
    apply(cache=init_cache(cfg, 2, 8))
  with pytest.raises(ValueError, match=r"5 input tokens do not fit a cache of "
                     r"max_length=4; .* with a larger max_length"):
    apply(cache=init_cache(cfg, 3, 4))
  with pytest.raises(ValueError, match=r"cache must be a dict with keys 'k' and 'v'; "
                     r"got \['k'\]"):
    apply(cache={"k": init_cache(cfg, 3, 8)["k"]})
  with pytest.raises(ValueError, match=r"attention_mask is not supported with cache="):
    apply(cache=init_cache(cfg, 3, 8), attention_mask=jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r"batch_size=0 and max_length=8 must both be >= 1"):
    init_cache(cfg, 0, 8)


@pytest.mark.parametrize("scan", [True, False])
def test_decode_step_updates_the_cache_in_place(scan):
  """A decode step writes its new slots into the (donated) cache in place:
  its temporaries stay below one layer-stack of the cache, whatever the depth
  (a scan over the cache's layer axis as xs/ys would copy all of it)."""
  cfg = LlamaConfig.tiny(scan_layers=scan, num_hidden_layers=8)
  model = Llama(cfg)
  params = init_params(cfg, jax.random.key(0))
  cache = init_cache(cfg, 4, 256)
  step = jax.jit(lambda p, t, c, pos: model.apply({"params": p}, t, cache=c, positions=pos),
                 donate_argnums=2)
  mem = step.lower(params, jnp.zeros((4, 1), jnp.int32), cache,
                   jnp.full((4, 1), 5)).compile().memory_analysis()
  assert mem.alias_size_in_bytes == 2 * cache["k"].nbytes  # k and v: updated in place
  assert mem.temp_size_in_bytes < cache["k"].nbytes / 2, (mem.temp_size_in_bytes,
                                                          cache["k"].nbytes)
