"""LoRA on a device mesh (issue 6): 8 simulated CPU devices (see conftest.py).

Meshes: (8,) with axis 'model', and (2, 4) with axes ('data', 'model').
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax._src import checkpoint as ckpt
from lora_jax._src.sharding import factor_shardings, factor_specs, lora_shardings

MESHES = {"8": ((8,), ("model",)), "2x4": ((2, 4), ("data", "model"))}
D, F, R = 32, 128, 4  # kernels (32, 128) and (128, 32): 16 KiB each in f32


def make_mesh(name):
  shape, axes = MESHES[name]
  return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def batch_spec(mesh):
  return P("data") if "data" in mesh.axis_names else P()


def same(sharding, expected: P, ndim: int) -> bool:
  return sharding.is_equivalent_to(NamedSharding(sharding.mesh, expected), ndim)


class MLP(nn.Module):
  """Tensor-parallel pair: 'up' column-parallel, 'down' row-parallel."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(F, name="up")(x))
    return nn.Dense(D, name="down")(h)


TP_SPECS = {"up": {"kernel": P(None, "model"), "bias": P("model")},
            "down": {"kernel": P("model", None), "bias": P()}}


def tp_params(mesh):
  params = MLP().init(jax.random.key(0), jnp.ones((1, D)))["params"]
  return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), TP_SPECS))


def with_nonzero_b(lp):
  """Give B a value so ΔW != 0 (a fresh adapter has B = 0)."""
  def bump(x):
    if isinstance(x, lj.LoraWeight):
      return x.replace(b=x.b + 0.05 * jnp.arange(x.b.size, dtype=x.b.dtype).reshape(x.b.shape) / x.b.size)
    return x
  return jax.tree.map(bump, lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


# ----------------------------------------------------------- spec derivation

@pytest.mark.parametrize("spec, roles, a, b", [
    (P(None, "model"), "io", P(None, None), P(None, "model")),
    (P("model", None), "io", P("model", None), P(None, None)),
    (P("data", None, "model"), "sio", P("data", None, None), P("data", None, "model")),
    (P(None, "model", None), "ioo", P(None, None), P(None, "model", None)),
    (P("model", None, None), "iio", P("model", None, None), P(None, None)),
    (P(("data", "model")), "io", P(("data", "model"), None), P(None, None)),
    (P(), "iiio", P(None, None, None, None), P(None, None)),
    (P("embed", "mlp"), "io", P("embed", None), P(None, "mlp")),  # logical names
])
def test_factor_specs(spec, roles, a, b):
  assert factor_specs(spec, roles) == (a, b)


def test_factor_specs_rejects_a_spec_longer_than_the_kernel():
  with pytest.raises(ValueError, match="3 entries.*'io' has 2 axes"):
    factor_specs(P(None, None, "model"), "io")


def test_factor_shardings_kinds():
  mesh = make_mesh("2x4")
  sa, sb = factor_shardings(NamedSharding(mesh, P("data", None, "model")), "sio")
  assert (sa.spec, sb.spec, sa.mesh) == (P("data", None, None), P("data", None, "model"), mesh)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  assert factor_shardings(dev, "io") == (dev, dev)
  assert factor_shardings(None, "io") == (None, None)
  with pytest.raises(TypeError, match="NamedSharding"):
    factor_shardings("model", "io")


# ------------------------------------------------------ lora_init placement

@pytest.mark.parametrize("mesh_name", MESHES)
def test_lora_init_places_factors_like_their_kernel(mesh_name):
  mesh = make_mesh(mesh_name)
  lp = lj.lora_init(jax.random.key(1), tp_params(mesh), lj.LoraConfig(rank=R))
  up, down = lp["up"]["kernel"], lp["down"]["kernel"]
  assert same(up.a.sharding, P(None, None), 2) and same(up.b.sharding, P(None, "model"), 2)
  assert same(down.a.sharding, P("model", None), 2) and same(down.b.sharding, P(None, None), 2)
  assert up.w.sharding.spec == P(None, "model")  # the kernel itself is not moved
  assert lora_shardings(lp)["up"]["kernel"].b == up.b.sharding


def test_stacked_layer_axis_keeps_its_sharding():
  mesh = make_mesh("2x4")
  w = jax.device_put(jnp.ones((2, D, F)), NamedSharding(mesh, P("data", None, "model")))
  lp = lj.lora_init(jax.random.key(0), {"k": w},
                    lj.LoraConfig(rank=R, targets="k", layouts={"k": "sio"}))
  assert same(lp["k"].a.sharding, P("data", None, None), 3)
  assert same(lp["k"].b.sharding, P("data", None, "model"), 3)


def test_single_device_kernel_keeps_its_factors_on_its_device():
  dev = jax.devices()[5]
  w = jax.device_put(jnp.ones((D, F)), dev)
  lw = lj.lora_init(jax.random.key(0), {"k": w}, lj.LoraConfig(rank=R, targets="k"))["k"]
  assert lw.a.devices() == {dev} and lw.b.devices() == {dev}


def test_lora_init_under_jit_with_out_shardings():
  mesh = make_mesh("2x4")
  params = tp_params(mesh)
  cfg = lj.LoraConfig(rank=R)
  init = lambda p: lj.lora_init(jax.random.key(1), p, cfg)
  shardings = lora_shardings(jax.eval_shape(init, params), base=params)
  lp = jax.jit(init, out_shardings=shardings)(params)
  eager = lj.lora_init(jax.random.key(1), params, cfg)
  assert lp["down"]["kernel"].a.sharding == shardings["down"]["kernel"].a
  np.testing.assert_array_equal(lp["down"]["kernel"].a, eager["down"]["kernel"].a)


# ------------------------------------------------- Flax logical partitioning

class LogicalMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = lambda names: nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
    h = nn.relu(nn.Dense(F, kernel_init=init(("embed", "mlp")), name="up")(x))
    return nn.Dense(D, kernel_init=init(("mlp", "embed")), name="down")(h)


RULES = (("batch", "data"), ("embed", None), ("mlp", "model"))


def test_linen_logical_specs_map_to_adapter_specs():
  mesh = make_mesh("2x4")
  boxed = LogicalMLP().init(jax.random.key(0), jnp.ones((1, D)))["params"]
  logical = nn.get_partition_spec(boxed)
  params = jax.device_put(nn.unbox(boxed), nn.logical_to_mesh_sharding(logical, mesh, RULES))
  abstract = jax.eval_shape(lambda p: lj.lora_init(jax.random.key(1), p, lj.LoraConfig(rank=R)),
                            params)
  specs = lora_shardings(abstract, base=logical)
  assert specs["up"]["kernel"].a == P("embed", None) and specs["up"]["kernel"].b == P(None, "mlp")
  assert specs["down"]["kernel"].a == P("mlp", None) and specs["up"]["bias"] == P()
  mesh_s = nn.logical_to_mesh_sharding(specs, mesh, RULES)
  assert mesh_s["down"]["kernel"].a.spec == P("model", None)
  # ... and they agree with what lora_init did to the placed, unboxed params.
  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=R))
  for name in ("up", "down"):
    for f in ("a", "b"):
      got = getattr(lp[name]["kernel"], f).sharding
      assert got.is_equivalent_to(getattr(mesh_s[name]["kernel"], f), 2), (name, f)


def test_linen_boxed_params_read_specs_from_the_boxes():
  """lora_init on nn.Partitioned params puts the LoraWeight inside the box;
  lora_shardings reads the kernel's names from it (nn.get_partition_spec would
  give a and b the kernel's spec unchanged)."""
  mesh = make_mesh("2x4")
  m, x = LogicalMLP(), jnp.ones((4, D))
  boxed = m.init(jax.random.key(0), x)["params"]
  lp = lj.lora_init(jax.random.key(1), boxed, lj.LoraConfig(rank=R))
  specs = lora_shardings(lp)
  assert isinstance(specs["up"]["kernel"], nn.LogicallyPartitioned)
  assert specs["up"]["kernel"].value.b == P(None, "mlp")
  shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
  placed = jax.device_put(lp, shardings)
  assert same(placed["down"]["kernel"].value.a.sharding, P("model", None), 2)
  y = jax.jit(lj.lora(m.apply))({"params": placed}, x)
  np.testing.assert_allclose(y, m.apply({"params": boxed}, x), rtol=1e-5, atol=1e-6)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    init = lambda names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
    self.up = nnx.Linear(D, F, kernel_init=init((None, "model")), rngs=rngs)
    self.down = nnx.Linear(F, D, kernel_init=init(("model", None)), rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


def test_nnx_sharded_state_trains_like_one_device():
  mesh = make_mesh("2x4")
  with jax.set_mesh(mesh):
    model = NnxMLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  lp = lj.lora_init(jax.random.key(1), state, lj.LoraConfig(rank=R, targets=r".*kernel"))
  up = lp["up"]["kernel"].get_raw_value()
  assert same(up.w.sharding, P(None, "model"), 2) and same(up.b.sharding, P(None, "model"), 2)
  specs = lora_shardings(lp)
  assert specs["down"]["kernel"].get_raw_value().a == P("model", None)
  assert specs["down"]["kernel"].get_raw_value().b == P(None, None)

  apply = lj.lora(lambda st, x: nnx.merge(graphdef, st)(x))
  loss = lambda p, x: jnp.mean(apply(p, x) ** 2)
  x = jax.random.normal(jax.random.key(2), (8, D))
  lp = with_nonzero_b(lp)
  grad = jax.jit(jax.grad(loss))
  g_mesh = grad(lp, jax.device_put(x, NamedSharding(mesh, P("data"))))
  g_one = grad(jax.device_get(lp), x)
  a_mesh = g_mesh["down"]["kernel"].get_raw_value().a
  assert same(a_mesh.sharding, P("model", None), 2)
  np.testing.assert_allclose(a_mesh, g_one["down"]["kernel"].get_raw_value().a,
                             rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ training on a mesh

def lora_step(apply, tx):
  def loss(p, x, y):
    return jnp.mean((apply({"params": p}, x) - y) ** 2)

  def step(p, opt, x, y):
    val, g = jax.value_and_grad(loss)(p, x, y)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, val
  return step


def batch(n=16):
  return (jax.random.normal(jax.random.key(7), (n, D)),
          jax.random.normal(jax.random.key(8), (n, D)))


@pytest.mark.parametrize("mesh_name", MESHES)
def test_train_step_on_mesh_matches_one_device(mesh_name):
  mesh = make_mesh(mesh_name)
  lp = with_nonzero_b(lj.lora_init(jax.random.key(1), tp_params(mesh), lj.LoraConfig(rank=R)))
  tx = lj.optimizer(optax.adam(1e-2), lp)
  shardings = lora_shardings(lp)
  step = jax.jit(lora_step(lj.lora(MLP().apply), tx),
                 in_shardings=(shardings, None, NamedSharding(mesh, batch_spec(mesh)), None),
                 out_shardings=(shardings, None, None))
  x, y = batch()
  p_mesh, o_mesh = lp, tx.init(lp)
  p_one, o_one = jax.device_get(lp), tx.init(jax.device_get(lp))
  one = jax.jit(lora_step(lj.lora(MLP().apply), tx))
  for _ in range(3):
    p_mesh, o_mesh, l_mesh = step(p_mesh, o_mesh, x, y)
    p_one, o_one, l_one = one(p_one, o_one, x, y)
    np.testing.assert_allclose(l_mesh, l_one, rtol=1e-5)
  for name in ("up", "down"):
    for f in ("a", "b"):
      np.testing.assert_allclose(getattr(p_mesh[name]["kernel"], f),
                                 getattr(p_one[name]["kernel"], f), rtol=1e-4, atol=1e-6)
      assert getattr(p_mesh[name]["kernel"], f).sharding == getattr(shardings[name]["kernel"], f)
  np.testing.assert_array_equal(p_mesh["up"]["kernel"].w, lp["up"]["kernel"].w)


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of the all-gathers in compiled (per-device) HLO text."""
  shapes = []
  for m in re.finditer(r"= \(?([a-z0-9]+\[[0-9,]*\][^ ]*)\)? all-gather(?:-start)?\(", hlo):
    for dims in re.findall(r"\[([0-9,]*)\]", m.group(1)):
      shapes.append(tuple(int(d) for d in dims.split(",") if d))
  return shapes


@pytest.mark.parametrize("mesh_name", MESHES)
def test_tensor_parallel_lora_step_gathers_no_kernel(mesh_name):
  mesh = make_mesh(mesh_name)
  params = tp_params(mesh)
  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=R))
  x, y = (jax.device_put(v, NamedSharding(mesh, batch_spec(mesh))) for v in batch())

  tx = lj.optimizer(optax.adam(1e-2), lp)
  lora_hlo = jax.jit(lora_step(lj.lora(MLP().apply), tx)).lower(
      lp, tx.init(lp), x, y).compile().as_text()
  full_tx = optax.adam(1e-2)
  full_hlo = jax.jit(lora_step(MLP().apply, full_tx)).lower(
      params, full_tx.init(params), x, y).compile().as_text()

  kernel_size = D * F
  lora_ag, full_ag = all_gathers(lora_hlo), all_gathers(full_hlo)
  assert all(np.prod(s) < kernel_size for s in lora_ag), lora_ag
  assert len(lora_ag) <= len(full_ag), (lora_ag, full_ag)
  # The HLO really is partitioned: the row-parallel matmuls reduce over 'model'.
  assert "all-reduce" in lora_hlo and "num_partitions=8" in lora_hlo


def test_all_gather_detector_sees_a_kernel_gather():
  """Control for the test above: gathering a sharded kernel is detected."""
  mesh = make_mesh("2x4")
  w = tp_params(mesh)["up"]["kernel"]
  gather = jax.jit(lambda w: w * 2.0, out_shardings=NamedSharding(mesh, P()))
  assert (D, F) in all_gathers(gather.lower(w).compile().as_text())


# ------------------------------------------------------------------ merge

@pytest.mark.parametrize("mesh_name", MESHES)
def test_merge_keeps_kernel_shardings(mesh_name):
  mesh = make_mesh(mesh_name)
  lp = with_nonzero_b(lj.lora_init(jax.random.key(1), tp_params(mesh), lj.LoraConfig(rank=R)))
  expected = jax.device_get(lj.merge(jax.device_get(lp)))
  for merged in (lj.merge(lp), jax.jit(lj.merge)(lp)):
    for name, spec in (("up", P(None, "model")), ("down", P("model", None))):
      assert same(merged[name]["kernel"].sharding, spec, 2), (name, merged[name]["kernel"].sharding)
      np.testing.assert_allclose(merged[name]["kernel"], expected[name]["kernel"], rtol=1e-6, atol=1e-7)
    assert same(merged["up"]["bias"].sharding, P("model"), 1)


def test_donated_merge_needs_no_second_copy():
  mesh = make_mesh("2x4")
  layers = 6
  params = {f"l{i}": {"kernel": jnp.full((D, F), 0.5)} for i in range(layers)}
  params = jax.device_put(params, NamedSharding(mesh, P(None, "model")))
  lp = with_nonzero_b(lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=R)))
  expected = jax.device_get(lj.merge(jax.device_get(lp)))
  merge = jax.jit(lj.merge, donate_argnums=0)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    compiled = merge.lower(lp).compile()
    stats = compiled.memory_analysis()
    merged = merge(lp)
  one_copy = layers * D * F * 4 // 4  # bytes of the kernels on one device ('model' = 4)
  assert stats.alias_size_in_bytes >= one_copy  # the kernels are folded in place ...
  assert stats.temp_size_in_bytes <= one_copy // 8, (stats.temp_size_in_bytes, one_copy)  # ... no ΔW copy
  assert lp["l0"]["kernel"].w.is_deleted()
  assert same(merged["l3"]["kernel"].sharding, P(None, "model"), 2)
  np.testing.assert_allclose(merged["l3"]["kernel"], expected["l3"]["kernel"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- checkpoints

def test_adapter_checkpoint_restores_onto_another_mesh(tmp_path):
  lp = with_nonzero_b(lj.lora_init(jax.random.key(1), tp_params(make_mesh("8")),
                                   lj.LoraConfig(rank=R)))
  ckpt.save_adapter(str(tmp_path / "adapter"), lp)
  new_base = tp_params(make_mesh("2x4"))
  back = ckpt.load_adapter(str(tmp_path / "adapter"), new_base)
  for name in ("up", "down"):
    lw, old = back[name]["kernel"], lp[name]["kernel"]
    sa, sb = factor_shardings(new_base[name]["kernel"].sharding, "io")
    assert lw.a.sharding.is_equivalent_to(sa, 2) and lw.b.sharding.is_equivalent_to(sb, 2)
    assert lw.a.sharding.mesh.shape == {"data": 2, "model": 4}
    np.testing.assert_array_equal(lw.a, old.a)
    np.testing.assert_array_equal(lw.b, old.b)
    assert lw.w is new_base[name]["kernel"]


def test_sharding_constraint_on_a_kernel_constrains_its_factors():
  """A model that constrains its kernel (e.g. Flax unboxing under a mesh)."""
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  w = jax.random.normal(jax.random.key(0), (16, 32))
  lp = lj.lora_init(jax.random.key(1), {"w": w}, lj.LoraConfig(rank=4, targets="w"))
  lp["w"] = lp["w"].replace(b=jnp.ones_like(lp["w"].b))

  def f(p, x):
    k = jax.lax.with_sharding_constraint(p["w"], NamedSharding(mesh, P(None, "model")))
    return x @ k

  x = jnp.ones((8, 16))
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.LoraFallbackWarning)
    y = jax.jit(lj.lora(f))(lp, x)
  np.testing.assert_allclose(y, x @ lj.merge(lp)["w"], rtol=1e-5, atol=1e-5)
  text = jax.jit(lj.lora(f)).lower(lp, x).as_text()
  # b (r, out) is constrained on its out axis like the kernel, a (in, r) not at all
  assert '[{}, {"model"}]> : tensor<4x32xf32>' in text
  assert '[{}, {}]> : tensor<16x4xf32>' in text
