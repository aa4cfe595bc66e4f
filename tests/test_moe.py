"""MoE experts: the ragged_dot rule, expert-stacked einsums, the Flax Mixtral vs transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import lora_jax as lj
from lora_jax._src import compat
from lora_jax.models import (Mixtral, MixtralConfig, init_moe_params, load_hf_mixtral,
                             to_hf_mixtral_state_dict)

E, DIN, DOUT, R = 3, 4, 5, 2
SIZES = jnp.array([2, 0, 5], jnp.int32)  # an empty expert too
_HF_DN = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                       lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))


def _random_b(lp, key=3):
  """Give every adapter a non-zero B, so ΔW is visible."""
  def fill(x):
    if isinstance(x, lj.LoraWeight):
      return x.replace(b=jax.random.normal(jax.random.key(key), x.b.shape, x.b.dtype))
    return x
  return jax.tree.map(fill, lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


# Each case: (model fn, kernel shape, the roles layout inference must find).
CASES = {
    "ragged_dot (E, in, out)": (lambda p, x: lax.ragged_dot(x, p["w"], SIZES),
                                (E, DIN, DOUT), "sio"),
    "ragged_dot_general torch (E, out, in)": (
        lambda p, x: lax.ragged_dot_general(x, p["w"], SIZES, _HF_DN), (E, DOUT, DIN), "soi"),
    "expert-stacked einsum": (lambda p, x: jnp.einsum("ecd,edf->ecf", x.reshape(E, -1, DIN)[:, :2],
                                                      p["w"]), (E, DIN, DOUT), "sio"),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_expert_rule_is_factored_and_exact(case, jit):
  f, shape, roles = CASES[case]
  x = jax.random.normal(jax.random.key(1), (7 if "ragged" in case else 6, DIN))
  p = {"w": jax.random.normal(jax.random.key(2), shape)}
  lp = lj.lora_init(jax.random.key(0), p, lj.LoraConfig(rank=R, targets="w"),
                    trace=lambda q: f(q, x))
  assert lp["w"].roles == roles
  a_shape = (E, DIN, R)
  assert lp["w"].a.shape == a_shape and lp["w"].b.shape == (E, R, DOUT)
  lp = _random_b(lp)
  g = lj.lora(f, strict=True)  # strict: no fallback to W + ΔW anywhere
  g = jax.jit(g) if jit else g
  np.testing.assert_allclose(g(lp, x), f(lj.merge(lp), x), atol=1e-5, rtol=1e-5)

  # gradients for A, B equal those of the materialized reference W + s·A·B
  def ref(a, b):
    return jnp.sum(f(lj.merge({"w": lp["w"].replace(a=a, b=b)}), x) ** 2)

  def fact(a, b):
    return jnp.sum(g({"w": lp["w"].replace(a=a, b=b)}, x) ** 2)
  want = jax.grad(ref, argnums=(0, 1))(lp["w"].a, lp["w"].b)
  got = jax.grad(fact, argnums=(0, 1))(lp["w"].a, lp["w"].b)
  for w_, g_ in zip(want, got):
    np.testing.assert_allclose(g_, w_, atol=1e-4, rtol=1e-4)


def test_ragged_rule_uses_each_rows_own_expert():
  """Only expert 1's adapter is non-zero: rows of other experts are unchanged."""
  f, shape, _ = CASES["ragged_dot (E, in, out)"]
  sizes = jnp.array([2, 3, 2], jnp.int32)
  f = lambda p, x: lax.ragged_dot(x, p["w"], sizes)
  x = jax.random.normal(jax.random.key(1), (7, DIN))
  p = {"w": jax.random.normal(jax.random.key(2), shape)}
  lp = lj.lora_init(jax.random.key(0), p, lj.LoraConfig(rank=R, targets="w", layouts={"w": "sio"}))
  b = jnp.zeros(lp["w"].b.shape).at[1].set(1.0)
  y = lj.lora(f, strict=True)({"w": lp["w"].replace(b=b)}, x)
  base = f(p, x)
  np.testing.assert_array_equal(y[:2], base[:2])
  np.testing.assert_array_equal(y[5:], base[5:])
  assert not np.allclose(y[2:5], base[2:5])


# ------------------------------------------------------------------- Mixtral

def _hf_model(cfg):
  import torch
  import transformers
  hf = {k: v for k, v in cfg.to_hf_dict().items()
        if k not in ("architectures", "model_type", "torch_dtype")}
  torch.manual_seed(0)
  hf_cfg = transformers.MixtralConfig(**hf, initializer_range=0.2,
                                      attn_implementation="eager")
  return transformers.MixtralForCausalLM(hf_cfg).eval()


def _ids(cfg, shape=(2, 9)):
  return np.random.default_rng(0).integers(0, cfg.vocab_size, shape)


def test_mixtral_logits_match_transformers():
  import torch
  cfg = MixtralConfig.tiny()
  model = _hf_model(cfg)
  sd = model.state_dict()
  params = load_hf_mixtral(sd, cfg)
  ids = _ids(cfg)
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  out = np.asarray(Mixtral(cfg).apply({"params": params}, jnp.asarray(ids)))
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  back = to_hf_mixtral_state_dict(params, cfg)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy())


def _lora_mixtral(cfg, rank=4, targets=r".*experts/.*"):
  params = init_moe_params(cfg)
  ids = jnp.asarray(_ids(cfg))
  apply = lambda p, i: Mixtral(cfg).apply({"params": p}, i)
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=rank, targets=targets),
                    trace=lambda p: apply(p, ids))
  return params, _random_b(lp), apply, ids


def test_mixtral_expert_adapters_are_factored():
  cfg = MixtralConfig.tiny(num_hidden_layers=1)
  _, lp, apply, ids = _lora_mixtral(cfg)
  gu = lp["layers_0"]["mlp"]["experts"]["gate_up_proj"]
  assert gu.roles == "soi" and gu.a.shape == (4, 32, 4) and gu.b.shape == (4, 4, 96)
  f = lj.lora(apply, strict=True)
  np.testing.assert_allclose(f(lp, ids), apply(lj.merge(lp), ids), atol=1e-5)

  def loss(p):
    return jnp.mean(f(p, ids) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(lp)
  expert_shapes = {(4, 96, 32), (4, 32, 48)}
  products = _product_shapes(jaxpr.jaxpr)
  assert products and not products & expert_shapes  # no ΔW, no dL/dW of an expert stack


def _product_shapes(jaxpr):
  """Output shapes of every product / sum in ``jaxpr`` and its sub-jaxprs."""
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "ragged_dot_general", "add", "add_any", "mul"):
      out |= {tuple(v.aval.shape) for v in eqn.outvars}
    for sub in compat.jaxprs_in_params(eqn.params):
      out |= _product_shapes(sub)
  return out


def _train_step_flops(loss, params, tx):
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step).lower(params, tx.init(params)).compile().cost_analysis()["flops"]


def test_mixtral_lora_train_step_costs_less_than_full_finetuning():
  cfg = MixtralConfig.tiny(num_hidden_layers=1)
  params, lp, apply, ids = _lora_mixtral(cfg, rank=4)

  def loss_of(f):
    def loss(p):
      logits = f(p, ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    return loss
  full = _train_step_flops(loss_of(apply), params, optax.adam(1e-3))
  lora = _train_step_flops(loss_of(lj.lora(apply, strict=True)), lp,
                           lj.optimizer(optax.adam(1e-3), lp))
  assert lora < 0.8 * full, (lora, full)  # measured 0.58 (XLA CPU cost_analysis)


def test_mixtral_expert_adapter_checkpoint_round_trip(tmp_path):
  cfg = MixtralConfig.tiny(num_hidden_layers=1)
  params, lp, apply, ids = _lora_mixtral(cfg)
  lj.save_adapter(tmp_path / "ad", lp)
  back = lj.load_adapter(tmp_path / "ad", params)
  gu = back["layers_0"]["mlp"]["experts"]["gate_up_proj"]
  assert gu.roles == "soi" and gu.a.shape == (4, 32, 4)
  np.testing.assert_array_equal(lj.lora(apply)(back, ids), lj.lora(apply)(lp, ids))
