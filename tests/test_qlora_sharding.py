"""A QuantizedWeight on a mesh keeps its kernel's sharding (8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj


@pytest.fixture
def mesh():
  if len(jax.devices()) < 8:
    pytest.fail("conftest.py sets up 8 simulated CPU devices; found fewer")
  return jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _spec(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def test_codes_and_scales_follow_the_kernel_sharding(mesh):
  w = jax.random.normal(jax.random.key(0), (256, 64)) * 0.05          # (in, out)
  w = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
  q = lj.quantize({"k": w}, lj.QuantConfig(targets="k"))["k"]
  assert _spec(q.codes) == ("model", "data")        # (out, in/2): out on model, in on data
  assert _spec(q.absmax) == ("model", "data")
  assert _spec(q.absmax2) == (None,) and _spec(q.offset) == ()
  np.testing.assert_array_equal(q.dequantize(), lj.quantize(
      {"k": np.asarray(w)}, lj.QuantConfig(targets="k"))["k"].dequantize())


def test_stacked_kernel_and_factors_keep_the_layer_and_model_axes(mesh):
  w = jax.random.normal(jax.random.key(0), (4, 128, 64)) * 0.05        # (layers, in, out)
  w = jax.device_put(w, NamedSharding(mesh, P("data", None, "model")))
  q = lj.quantize({"k": w}, lj.QuantConfig(targets="k", layouts={"k": "sio"}))
  qk = q["k"]
  assert _spec(qk.codes) == ("data", "model", None)
  assert _spec(qk.absmax2) == ("data", None) and _spec(qk.offset) == ("data",)
  lp = lj.lora_init(jax.random.key(1), q, lj.LoraConfig(rank=2, targets="k"))
  assert _spec(lp["k"].a) == ("data", None, None)
  assert _spec(lp["k"].b) == ("data", None, "model")

  def f(p, x):
    h, _ = jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["k"])
    return h
  square = jax.device_put(jax.random.normal(jax.random.key(3), (4, 128, 128)) * 0.05,
                          NamedSharding(mesh, P("data", None, "model")))
  qs = lj.quantize({"k": square}, lj.QuantConfig(targets="k", layouts={"k": "sio"}))
  x = jax.random.normal(jax.random.key(4), (8, 128))
  np.testing.assert_allclose(jax.jit(lj.lora(f))(qs, x), f(lj.dequantize(qs), x),
                             rtol=1e-5, atol=1e-5)
