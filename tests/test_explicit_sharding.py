"""LoRA on an explicit-axes mesh (issue 15, ``AxisType.Explicit``): 8 CPU devices.

On an explicit mesh every array's type carries its sharding, and an op whose
output sharding is ambiguous must be told it. The models here are written as
a user writes them for such a mesh: the row-parallel matmul names its
``out_sharding`` (Linen: ``dot_general=partial(lax.dot_general,
out_sharding=...)``; NNX: ``Linear(...)(x, out_sharding=...)``). lora_jax
must then train, merge and save exactly as on one device.
"""

import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax._src.sharding import lora_shardings
from test_sharding import all_gathers

D, F, R, L = 16, 64, 4, 2
SPECS = {"up": {"kernel": P(None, "model"), "bias": P("model")},
         "down": {"kernel": P("model", None), "bias": P()}}


@pytest.fixture
def mesh():
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def row_dot(row_out):
  """Linen's dot_general for a row-parallel kernel: names the output sharding."""
  return jax.lax.dot_general if row_out is None else functools.partial(
      jax.lax.dot_general, out_sharding=row_out)


class MLP(nn.Module):
  """'up' column-parallel, 'down' row-parallel (contracts the 'model' axis)."""
  act: str = "relu"
  row_out: P | None = None

  @nn.compact
  def __call__(self, x):
    h = getattr(nn, self.act)(nn.Dense(F, name="up")(x))
    return nn.Dense(D, name="down", dot_general=row_dot(self.row_out))(h)


class Block(nn.Module):
  row_out: P | None = None

  @nn.compact
  def __call__(self, x, _):
    return x + MLP("silu", self.row_out)(x), None


class Scanned(nn.Module):
  row_out: P | None = None

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=L)
    return scan(self.row_out, name="layers")(x, None)[0]


SCANNED_SPECS = {"layers": {"MLP_0": jax.tree.map(
    lambda s: P(None, *s), SPECS, is_leaf=lambda x: isinstance(x, P))}}


def placed(model, specs, mesh):
  params = model.clone(row_out=None).init(jax.random.key(0), jnp.ones((2, D)))["params"]
  return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                             is_leaf=lambda x: isinstance(x, P)))


def bumped(lp):
  """B != 0, so ΔW != 0 (a fresh adapter has B = 0)."""
  def bump(x):
    if isinstance(x, lj.LoraWeight):
      return x.replace(b=x.b + 0.05 * jnp.ones_like(x.b))
    return x
  return jax.tree.map(bump, lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


def data(mesh=None, n=16):
  x = jax.random.normal(jax.random.key(7), (n, D))
  y = jax.random.normal(jax.random.key(8), (n, D))
  if mesh is None:
    return x, y
  return tuple(jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))


def make_step(apply, tx, rng=None):
  def loss(p, x, y):
    kw = {} if rng is None else {"lora_rng": rng}
    return jnp.mean((apply({"params": p}, x, **kw) - y) ** 2)

  def step(p, opt, x, y):
    val, g = jax.value_and_grad(loss)(p, x, y)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, val
  return step


def factors(tree):
  return {jax.tree_util.keystr(k) + f: getattr(x, f)
          for k, x in jax.tree_util.tree_flatten_with_path(
              tree, is_leaf=lambda x: isinstance(x, lj.LoraWeight))[0]
          if isinstance(x, lj.LoraWeight) for f in ("a", "b")}


def train_both(mesh, model, ref_model, specs, config, steps=2, rng=None):
  """Train on the explicit mesh and on one device; return both params + the step."""
  with jax.set_mesh(mesh):
    lp = bumped(lj.lora_init(jax.random.key(1), placed(model, specs, mesh), config))
    tx = lj.optimizer(optax.adam(1e-2), lp)
    step = jax.jit(make_step(lj.lora(model.apply), tx, rng))
    p, o = lp, tx.init(lp)
    x, y = data(mesh)
    losses = []
    for _ in range(steps):
      p, o, val = step(p, o, x, y)
      losses.append(val)
  p1 = jax.device_get(lp)
  o1 = tx.init(p1)
  one = jax.jit(make_step(lj.lora(ref_model.apply), tx, rng))
  x1, y1 = data()
  for k in range(steps):
    p1, o1, val = one(p1, o1, x1, y1)
    np.testing.assert_allclose(losses[k], val, rtol=1e-5)
  return lp, p, p1


def check_same(p_mesh, p_one, lp):
  """Factors equal one device's and keep what lora_shardings says."""
  shardings = factors(lora_shardings(lp))
  one = factors(p_one)
  for path, x in factors(p_mesh).items():
    np.testing.assert_allclose(x, one[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert x.sharding.is_equivalent_to(shardings[path], x.ndim), (path, x.sharding)


# -------------------------------------------------------------- training

@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_linen_tensor_parallel_train_step_matches_one_device(mesh, act):
  lp, p, p1 = train_both(mesh, MLP(act, P("data", None)), MLP(act), SPECS,
                         lj.LoraConfig(rank=R))
  check_same(p, p1, lp)
  assert p["up"]["kernel"].b.sharding.spec == P(None, "model")
  assert p["down"]["kernel"].a.sharding.spec == P("model", None)
  np.testing.assert_array_equal(p["down"]["kernel"].w, lp["down"]["kernel"].w)


def test_scanned_layers_train_like_one_device(mesh):
  lp, p, p1 = train_both(mesh, Scanned(P("data", None)), Scanned(), SCANNED_SPECS,
                         lj.LoraConfig(rank=R, layouts={"layers/.*kernel": "sio"}))
  check_same(p, p1, lp)
  assert p["layers"]["MLP_0"]["down"]["kernel"].a.sharding.spec == P(None, "model", None)


def test_lora_dropout_trains_like_one_device(mesh):
  lp, p, p1 = train_both(mesh, MLP("relu", P("data", None)), MLP("relu"), SPECS,
                         lj.LoraConfig(rank=R, dropout=0.25), rng=jax.random.key(3))
  check_same(p, p1, lp)


def test_dora_trains_like_one_device(mesh):
  lp, p, p1 = train_both(mesh, MLP("relu", P("data", None)), MLP("relu"), SPECS,
                         lj.LoraConfig(rank=R, dora=True))
  check_same(p, p1, lp)


# -------------------------------------------------------------- HLO check

def test_lora_branch_gathers_no_kernel(mesh):
  model = MLP("relu", P("data", None))
  with jax.set_mesh(mesh):
    params = placed(model, SPECS, mesh)
    lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=R))
    x, y = data(mesh)
    tx = lj.optimizer(optax.adam(1e-2), lp)
    hlo = jax.jit(make_step(lj.lora(model.apply), tx)).lower(
        lp, tx.init(lp), x, y).compile().as_text()
    full_tx = optax.adam(1e-2)
    full = jax.jit(make_step(model.apply, full_tx)).lower(
        params, full_tx.init(params), x, y).compile().as_text()
  gathered = all_gathers(hlo)
  assert all(np.prod(s) < D * F for s in gathered), gathered
  assert len(gathered) <= len(all_gathers(full)), (gathered, all_gathers(full))
  assert "all-reduce" in hlo and "num_partitions=8" in hlo


# ------------------------------------------------------------ merge, save

def test_donated_merge_keeps_each_kernel_sharding(mesh):
  with jax.set_mesh(mesh):
    lp = bumped(lj.lora_init(jax.random.key(1), placed(MLP(), SPECS, mesh),
                             lj.LoraConfig(rank=R)))
    expected = lj.merge(jax.device_get(lp))
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      merged = jax.jit(lj.merge, donate_argnums=0)(lp)
  assert lp["up"]["kernel"].w.is_deleted()
  for name in ("up", "down"):
    k = merged[name]["kernel"]
    assert k.sharding.spec == SPECS[name]["kernel"], (name, k.sharding)
    np.testing.assert_allclose(k, expected[name]["kernel"], rtol=1e-6, atol=1e-7)


def test_save_and_load_on_an_explicit_mesh(mesh, tmp_path):
  with jax.set_mesh(mesh):
    params = placed(MLP(), SPECS, mesh)
    lp = bumped(lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=R)))
    lj.save_adapter(str(tmp_path / "a"), lp)
    back = lj.load_adapter(str(tmp_path / "a"), params)
  expected = factors(lora_shardings(lp))
  for path, x in factors(back).items():
    np.testing.assert_array_equal(x, factors(lp)[path])
    assert x.sharding.is_equivalent_to(expected[path], x.ndim), path


# ------------------------------------------------------------------- NNX

class NnxMLP(nnx.Module):
  def __init__(self, rngs, row_out=None):
    init = lambda names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
    self.up = nnx.Linear(D, F, kernel_init=init((None, "model")), rngs=rngs)
    self.down = nnx.Linear(F, D, kernel_init=init(("model", None)), rngs=rngs)
    self.row_out = row_out

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)), out_sharding=self.row_out)


def test_nnx_tensor_parallel_train_step_matches_one_device(mesh):
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0), P("data", None)))
    lp = bumped(lj.lora_init(jax.random.key(1), state,
                             lj.LoraConfig(rank=R, targets=r".*kernel")))
    up = lp["up"]["kernel"].get_raw_value()
    assert up.w.sharding.spec == P(None, "model") and up.b.sharding.spec == P(None, "model")
    apply = lj.lora(lambda st, x: nnx.merge(graphdef, st)(x))
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(apply(p, x) ** 2)))
    g = grad(lp, data(mesh)[0])
    ref_graphdef = nnx.split(NnxMLP(nnx.Rngs(0)))[0]  # no out_sharding: one device
  ref = lj.lora(lambda st, x: nnx.merge(ref_graphdef, st)(x))
  g_one = jax.jit(jax.grad(lambda p, x: jnp.mean(ref(p, x) ** 2)))(
      jax.device_get(lp), data()[0])
  spec = lora_shardings(lp)
  for name in ("up", "down"):
    for f in ("a", "b"):
      got = getattr(g[name]["kernel"].get_raw_value(), f)
      np.testing.assert_allclose(got, getattr(g_one[name]["kernel"].get_raw_value(), f),
                                 rtol=1e-5, atol=1e-6)
      want = getattr(spec[name]["kernel"].get_raw_value(), f)
      assert got.sharding.spec == want, (name, f, got.sharding, want)


# ------------------------------------------------------------------ stacks

def test_stack_with_adapter_ids_matches_one_device(mesh):
  model = MLP("relu", P("data", None))
  with jax.set_mesh(mesh):
    params = placed(model, SPECS, mesh)
    adapters = [lj.adapter(bumped(lj.lora_init(jax.random.key(k), params,
                                               lj.LoraConfig(rank=R)))) for k in (1, 2)]
    stacked = lj.attach(params, lj.stack_adapters(adapters))
    ids = jax.device_put(jnp.array([0, 1, -1, 1] * 4, jnp.int32), NamedSharding(mesh, P("data")))
    x = data(mesh)[0]
    f = jax.jit(lambda p, x, ids: lj.lora(model.apply)({"params": p}, x, adapter_ids=ids))
    y = f(stacked, x, ids)
    g = jax.jit(jax.grad(lambda p, x, ids: jnp.sum(
        lj.lora(model.apply)({"params": p}, x, adapter_ids=ids) ** 2), argnums=1))(
            stacked, x, ids)
  one = jax.device_get(stacked)
  ref = lj.lora(MLP("relu").apply)
  y1 = ref({"params": one}, data()[0], adapter_ids=np.asarray(ids))
  g1 = jax.grad(lambda x: jnp.sum(ref({"params": one}, x, adapter_ids=np.asarray(ids)) ** 2))(
      data()[0])
  np.testing.assert_allclose(y, y1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-5)
  assert y.sharding.spec == P("data", None)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="does not run on an explicit-axes mesh"):
    lj.lora(model.apply, stack_strategy="onehot")({"params": stacked}, x, adapter_ids=ids)


# ------------------------------------------------------------------ QLoRA

def qlora_fn(row_out):
  def f(p, x):
    h = jax.nn.silu(x @ p["up"])
    return jnp.einsum("bf,fd->bd", h, p["down"], out_sharding=row_out)
  return f


@pytest.mark.parametrize("kind, double_quant", [("nf4", True), ("int8", False),
                                                ("int4", False)])
def test_qlora_train_step_matches_one_device(mesh, kind, double_quant):
  ws = {"up": jax.random.normal(jax.random.key(0), (D * 4, F)) * 0.05,
        "down": jax.random.normal(jax.random.key(1), (F, D * 4)) * 0.05}
  qcfg = lj.QuantConfig(targets=".*", kind=kind, double_quant=double_quant)
  cfg = lj.LoraConfig(rank=R, targets=".*")
  specs = {"up": P(None, "model"), "down": P("model", None)}
  with jax.set_mesh(mesh):
    placed_ws = {k: jax.device_put(w, NamedSharding(mesh, specs[k])) for k, w in ws.items()}
    q = lj.quantize(placed_ws, qcfg)
    assert q["up"].codes.sharding.spec == P("model", None)       # (out, in/2)
    lp = bumped(lj.lora_init(jax.random.key(2), q, cfg))
    x = jax.device_put(jax.random.normal(jax.random.key(3), (16, D * 4)),
                       NamedSharding(mesh, P("data")))
    loss = lambda p, x: jnp.mean(lj.lora(qlora_fn(P("data", None)))(p, x) ** 2)
    compiled = jax.jit(jax.grad(loss, allow_int=True)).lower(lp, x).compile()
    g, hlo = compiled(lp, x), compiled.as_text()
  q1 = lj.quantize(ws, qcfg)
  for k in ws:  # the codes do not depend on the mesh
    np.testing.assert_array_equal(q1[k].codes, q[k].codes)
  lp1 = jax.device_get(lp)
  g1 = jax.grad(lambda p, x: jnp.mean(lj.lora(qlora_fn(None))(p, x) ** 2), allow_int=True)(
      lp1, np.asarray(x))
  want = factors(lora_shardings(lp))
  got, one = factors(g), factors(g1)
  for path, v in got.items():
    np.testing.assert_allclose(v, one[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert v.sharding.is_equivalent_to(want[path], v.ndim), (path, v.sharding)
  assert want["['up']b"].spec == P(None, "model")
  assert all(np.prod(s) < D * 4 * F // 2 for s in all_gathers(hlo)), all_gathers(hlo)
  merged = lj.merge(lp)
  np.testing.assert_allclose(merged["down"], lj.merge(lp1)["down"], rtol=1e-5, atol=1e-6)
  assert merged["down"].sharding.spec == P("model", None)


# ------------------------------------------------- bundled Llama and Mixtral

TP_RULES = [(r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", (None, "model")),
            (r".*(o_proj|down_proj)/kernel", ("model", None)),
            (r"lm_head/kernel", (None, "model")),
            (r".*experts/gate_up_proj", (None, "model", None)),  # (E, 2 ff, d)
            (r".*experts/down_proj", (None, None, "model"))]      # (E, d, ff)


def tp_specs(params):
  def spec(path, x):
    p = jax.tree_util.keystr(path, simple=True, separator="/")
    for pattern, axes in TP_RULES:
      if re.fullmatch(pattern, p):
        return P(*((None,) * (x.ndim - len(axes)) + axes))
    return P()
  return jax.tree_util.tree_map_with_path(spec, params)


def any_mesh(kind):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)


def tp_run(mesh, params, config, apply, ids, extra=None):
  """Grads (and ``extra``'s output) on the mesh and on one device."""
  loss = lambda p, ids: jnp.mean(apply(p, ids) ** 2)
  grad = jax.grad(loss, allow_int=True)
  with jax.set_mesh(mesh):
    placed_p = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s),
                                                   tp_specs(params)))
    lp = bumped(lj.lora_init(jax.random.key(2), placed_p, config))
    ids_m = jax.device_put(ids, NamedSharding(mesh, P("data")))
    with warnings.catch_warnings():
      warnings.simplefilter("error", lj.LoraFallbackWarning)
      g = jax.jit(grad)(lp, ids_m)
      more = extra(lp, ids_m) if extra else None
  lp1 = jax.device_get(lp)
  g1 = jax.jit(grad)(lp1, ids)
  want = factors(lora_shardings(lp))
  got, one = factors(g), factors(g1)
  for path, v in got.items():
    np.testing.assert_allclose(v, one[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert v.sharding.is_equivalent_to(want[path], v.ndim), (path, v.sharding)
  return more, (extra(lp1, ids) if extra else None)


@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_llama_tensor_parallel_trains_and_generates(kind):
  from lora_jax.models import Llama, LlamaConfig, generate_cached, init_cache, init_params
  cfg = LlamaConfig.tiny(scan_layers=True)
  model = Llama(cfg)
  apply = lambda p, ids, **kw: lj.lora(model.apply)({"params": p}, ids, **kw)
  make_cache = functools.partial(init_cache, cfg)
  gen = lambda p, ids: generate_cached(apply, p, ids, 2, make_cache=make_cache)
  ids = jax.random.randint(jax.random.key(1), (4, 6), 0, cfg.vocab_size)
  mesh = any_mesh(kind)
  with jax.set_mesh(mesh):
    params = init_params(cfg)  # compiled for this mesh (a cached init is per mesh)
  tokens, tokens1 = tp_run(mesh, jax.device_get(params),
                           lj.LoraConfig(rank=R, layouts={"layers/.*kernel": "sio"}),
                           apply, ids, gen)
  np.testing.assert_array_equal(tokens, tokens1)


def test_mixtral_tensor_parallel_trains():
  """Explicit axes (auto meshes run the same model code, checked for the Llama)."""
  kind = AxisType.Explicit
  from lora_jax.models import Mixtral, MixtralConfig, init_moe_params
  cfg = MixtralConfig.tiny()
  model = Mixtral(cfg)
  apply = lambda p, ids: lj.lora(model.apply)({"params": p}, ids)
  ids = jax.random.randint(jax.random.key(1), (4, 6), 0, cfg.vocab_size)
  tp_run(any_mesh(kind), init_moe_params(cfg),
         lj.LoraConfig(rank=R, targets=".*(kernel|proj)", layouts={".*experts/.*": "soi"}),
         apply, ids)


def test_init_params_under_two_meshes():
  from lora_jax.models import LlamaConfig, init_params
  cfg = LlamaConfig.tiny(vocab_size=96)
  for kind in (AxisType.Explicit, AxisType.Auto):  # a second mesh, a second init
    with jax.set_mesh(any_mesh(kind)):
      assert init_params(cfg)["lm_head"]["kernel"].shape == (32, 96)


# --------------------------------------------------------------- bad input

def test_a_mesh_that_does_not_divide_a_kernel_axis_is_named(mesh):
  abstract = jax.eval_shape(lambda: lj.lora_init(
      jax.random.key(0), {"k": jnp.ones((30, 16))}, lj.LoraConfig(rank=2, targets="k")))
  with pytest.raises(ValueError, match=r"at k: kernel of shape \(30, 16\) has axis 0 "
                     r"\(size 30\) split over mesh axes \('model',\) of total size 4"):
    lora_shardings(abstract, base={"k": NamedSharding(mesh, P("model", None))})


def test_qlora_and_stack_save_load_and_donated_merge(mesh, tmp_path):
  with jax.set_mesh(mesh):
    ws = {"up": jax.device_put(jax.random.normal(jax.random.key(0), (D * 4, F)) * 0.05,
                               NamedSharding(mesh, P(None, "model")))}
    q = lj.quantize(ws, lj.QuantConfig(targets=".*"))
    lp = bumped(lj.lora_init(jax.random.key(2), q, lj.LoraConfig(rank=R, targets=".*")))
    lj.save_adapter(str(tmp_path / "q"), lp)
    saved_b = np.asarray(lp["up"].b)
    back = lj.load_adapter(str(tmp_path / "q"), q)
    stack = lj.stack_adapters([lj.adapter(lj.lora_init(
        jax.random.key(k), ws, lj.LoraConfig(rank=R, targets=".*"))) for k in (1, 2)])
    lj.save_adapter(str(tmp_path / "s"), stack)
    stack_back = lj.load_adapter(str(tmp_path / "s"), ws)
    expected = lj.merge(jax.device_get(lp))["up"]
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      merged = jax.jit(lj.merge, donate_argnums=0)(lp)["up"]
  np.testing.assert_array_equal(back["up"].b, saved_b)
  assert back["up"].b.sharding.spec == P(None, "model")
  assert stack_back["up"].b.sharding.spec == P(None, None, "model")
  np.testing.assert_array_equal(stack_back["up"].b, stack["up"].b)
  assert merged.sharding.spec == P(None, "model")
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
