"""Adapter checkpoints: round trips, steps, CheckpointManager, sharding, killed saves, errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax._src import atomic_dir
from lora_jax._src.checkpoint import adapter_args, load_adapter, read_description, save_adapter
from lora_jax._src.checkpoint_format import escape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base():
  k = jax.random.split(jax.random.key(0), 3)
  return {"params": {
      "enc": {"kernel": jax.random.normal(k[0], (8, 6), jnp.bfloat16),
              "bias": jnp.zeros(6, jnp.bfloat16)},
      "stack": {"kernel": jax.random.normal(k[1], (3, 6, 4))},
      "head": {"kernel": jax.random.normal(k[2], (4, 2)), "bias": jnp.zeros(2)}}}


CONFIG = lj.LoraConfig(rank=2, alpha=6, rank_pattern={r".*/head/kernel": 1},
                       dropout=0.1, trainable=r".*/head/bias",
                       layouts={r".*/stack/kernel": "sio"})


def _trained(params, seed=1):
  """Params with nonzero B and a changed trained leaf, as after some training."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  def train(x):
    if isinstance(x, lj.LoraWeight):
      b = jax.random.normal(next(keys), x.b.shape, jnp.float32).astype(x.b.dtype)
      return x.replace(b=b)
    if isinstance(x, lj.Trainable):
      return lj.Trainable(x.value + seed, x.base)
    return x
  return jax.tree.map(train, params, is_leaf=lambda x: isinstance(x, (lj.LoraWeight, lj.Trainable)))


def _assert_same_adapter(got, want):
  ga, wa = lj.adapter(got), lj.adapter(want)
  assert list(ga) == list(wa)
  for path, w in wa.items():
    g = ga[path]
    assert type(g) is type(w), path
    names = ("value",) if isinstance(w, lj.Trainable) else ("a", "b")
    for n in names:
      x, y = np.asarray(getattr(g, n)), np.asarray(getattr(w, n))
      assert x.dtype == y.dtype and x.shape == y.shape, (path, n)
      assert x.tobytes() == y.tobytes(), (path, n)  # bit-exact
    if isinstance(w, lj.LoraWeight):
      assert (g.scale, g.roles, g.dropout) == (w.scale, w.roles, w.dropout), path
  base_got, base_want = lj.base(got), lj.base(want)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), base_got, base_want)


@pytest.fixture
def trained():
  base = _base()
  return base, _trained(lj.lora_init(jax.random.key(1), base, CONFIG))


def test_round_trip_bit_exact(tmp_path, trained):
  base, p = trained
  path = save_adapter(tmp_path / "ckpt", p, config=CONFIG)
  q = load_adapter(path, base)
  _assert_same_adapter(q, p)
  assert q["params"]["enc"]["kernel"].a.dtype == jnp.bfloat16
  assert q["params"]["stack"]["kernel"].roles == "sio"
  assert q["params"]["head"]["kernel"].scale == 6.0
  assert q["params"]["enc"]["kernel"].w is base["params"]["enc"]["kernel"]
  x = jnp.ones((1, 8), jnp.bfloat16)
  apply = lambda p, x: x @ p["params"]["enc"]["kernel"]
  np.testing.assert_array_equal(lj.lora(apply)(q, x), lj.lora(apply)(p, x))
  info = read_description(path)
  assert info["format_version"] == 2 and info["lora_jax_version"] == lj.__version__
  assert info["config"]["alpha"] == 6 and info["config"]["rank_pattern"] == {r".*/head/kernel": 1}
  e = info["entries"]["params/stack/kernel"]
  assert e["kernel"] == {"shape": [3, 6, 4], "dtype": "float32"}
  assert (e["rank"], e["scale"], e["dropout"], e["b"]["shape"]) == (2, 3.0, 0.1, [3, 2, 4])
  assert info["entries"]["params/head/bias"]["kind"] == "trainable"


def test_on_disk_holds_only_the_adapter(tmp_path):
  base = {"layers": {str(i): {"kernel": jnp.ones((256, 256))} for i in range(4)}}
  p = _trained(lj.lora_init(jax.random.key(0), base, lj.LoraConfig(rank=8)))
  path = save_adapter(tmp_path / "c", p)
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  factors = sum(x.nbytes for x in jax.tree.leaves(lj.adapter(p)))
  full = sum(x.nbytes for x in jax.tree.leaves(base))
  assert read_description(path)["nbytes"] == factors
  # random factors barely compress; the base (16x the factors) is not there
  assert 0.8 * factors <= on_disk < factors + full // 4


def test_save_adapter_view_and_no_adapter(tmp_path, trained):
  base, p = trained
  q = load_adapter(save_adapter(tmp_path / "v", lj.adapter(p)), base)
  _assert_same_adapter(q, p)
  with pytest.raises(ValueError, match="no LoraWeight or Trainable"):
    save_adapter(tmp_path / "none", base)


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([_Block(rngs) for _ in range(2)])
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer.linear(x)
    return self.out(x)


def test_nnx_state_round_trip(tmp_path):
  graphdef, state = nnx.split(_Net(nnx.Rngs(0)))
  p = _trained(lj.lora_init(jax.random.key(0), state, lj.LoraConfig(rank=2)))
  assert "layers/0/linear/kernel" in lj.adapter(p)
  q = load_adapter(save_adapter(tmp_path / "nnx", p), state)
  _assert_same_adapter(q, p)
  x = jnp.ones((2, 4))
  run = lambda s, x: nnx.merge(graphdef, s)(x)
  np.testing.assert_array_equal(lj.lora(run)(q, x), lj.lora(run)(p, x))


def test_odd_path_characters(tmp_path):
  keys = ["a.b", "a-2Eb", "sp ace", "ü", "", "0", "x/y"]
  base = {k: {"kernel": jnp.full((3, 2), i, jnp.float32)} for i, k in enumerate(keys)}
  p = _trained(lj.lora_init(jax.random.key(0), base, lj.LoraConfig(rank=1)))
  assert len({escape(k) for k in keys}) == len(keys)
  _assert_same_adapter(load_adapter(save_adapter(tmp_path / "odd", p), base), p)


def test_steps_latest_and_explicit(tmp_path):
  base = _base()
  p0 = lj.lora_init(jax.random.key(1), base, CONFIG)
  versions = {s: _trained(p0, seed=s) for s in (1, 5, 3)}
  for s, p in versions.items():
    assert save_adapter(tmp_path, p, step=s) == str(tmp_path / str(s))
  _assert_same_adapter(load_adapter(tmp_path, base), versions[5])
  _assert_same_adapter(load_adapter(tmp_path, base, step=3), versions[3])
  assert read_description(tmp_path)["step"] == 5
  with pytest.raises(FileNotFoundError, match=r"no step 4 .*steps found: \[1, 3, 5\]"):
    load_adapter(tmp_path, base, step=4)


def test_checkpoint_manager_max_to_keep(tmp_path, trained):
  base, p0 = trained
  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  versions = {s: _trained(p0, seed=s) for s in range(4)}
  for s in range(3):
    save_adapter(mngr, versions[s], step=s)
  opt_state = {"mu": jnp.arange(3.0)}  # another item in the same step
  mngr.save(3, args=ocp.args.Composite(**adapter_args(versions[3], CONFIG, step=3),
                                       opt_state=ocp.args.StandardSave(opt_state)))
  mngr.wait_until_finished()
  assert list(mngr.all_steps()) == [2, 3]
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]
  _assert_same_adapter(load_adapter(mngr, base), versions[3])
  _assert_same_adapter(load_adapter(mngr, base, step=2), versions[2])
  _assert_same_adapter(load_adapter(tmp_path, base), versions[3])  # plain path too
  restored = mngr.restore(3, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(opt_state)))
  np.testing.assert_array_equal(restored["opt_state"]["mu"], opt_state["mu"])
  with pytest.raises(FileNotFoundError, match="no step 0"):
    load_adapter(mngr, base, step=0)
  with pytest.raises(ValueError, match="needs step="):
    save_adapter(mngr, p0)
  mngr.close()


def test_sharded_restore(tmp_path):
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  base = {"dense": {"kernel": jnp.arange(32.0).reshape(8, 4)}, "norm": jnp.ones(4)}
  p = _trained(lj.lora_init(jax.random.key(0), base,
                            lj.LoraConfig(rank=2, trainable="norm")))
  path = save_adapter(tmp_path / "s", p)
  sharded = {"dense": {"kernel": jax.device_put(base["dense"]["kernel"],
                                                NamedSharding(mesh, P("data", "model")))},
             "norm": jax.device_put(base["norm"], NamedSharding(mesh, P("model")))}
  q = load_adapter(path, sharded)
  _assert_same_adapter(q, p)
  lw = q["dense"]["kernel"]
  assert lw.a.sharding == NamedSharding(mesh, P("data", None))  # a: (in, r)
  assert lw.b.sharding == NamedSharding(mesh, P(None, "model"))  # b: (r, out)
  assert lw.w.sharding.spec == P("data", "model")
  assert q["norm"].value.sharding == sharded["norm"].sharding
  y = jax.jit(lj.lora(lambda p, x: x @ p["dense"]["kernel"]))(q, jnp.ones((2, 8)))
  np.testing.assert_allclose(y, lj.lora(lambda p, x: x @ p["dense"]["kernel"])(p, jnp.ones((2, 8))),
                             rtol=1e-6)


def test_overwrite_is_explicit_and_replaces(tmp_path, trained):
  base, p = trained
  path = save_adapter(tmp_path / "c", p)
  newer = _trained(p, seed=7)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_adapter(path, newer)
  _assert_same_adapter(load_adapter(path, base), p)
  save_adapter(path, newer, overwrite=True)
  _assert_same_adapter(load_adapter(path, base), newer)
  assert sorted(os.listdir(tmp_path)) == ["c"]  # no temporaries left


def test_swap_without_renameat2(tmp_path, trained, monkeypatch):
  base, p = trained
  path = save_adapter(tmp_path / "c", p)
  monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
  newer = _trained(p, seed=7)
  save_adapter(path, newer, overwrite=True)
  _assert_same_adapter(load_adapter(path, base), newer)
  assert sorted(os.listdir(tmp_path)) == ["c"]
  rename = os.rename
  def crash_before_new(src, dst):  # dies between moving the old one out and the new one in
    if os.fspath(dst) == path:
      raise KeyboardInterrupt
    rename(src, dst)
  monkeypatch.setattr(os, "rename", crash_before_new)
  with pytest.raises(KeyboardInterrupt):
    save_adapter(path, p, overwrite=True)
  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(FileNotFoundError, match=r"interrupted.*intact at .*c\.lora_jax-old"):
    load_adapter(path, base)
  _assert_same_adapter(load_adapter(path + ".lora_jax-old", base), newer)
  save_adapter(path, p)
  _assert_same_adapter(load_adapter(path, base), p)
  assert sorted(os.listdir(tmp_path)) == ["c"]


_CHILD = textwrap.dedent("""
    import pathlib, sys, time
    import jax, jax.numpy as jnp, orbax.checkpoint as ocp, lora_jax as lj
    from lora_jax._src.checkpoint import save_adapter
    marker = pathlib.Path(sys.argv[2])
    Json = ocp.handlers.JsonCheckpointHandler
    orig = Json.async_save
    async def stuck(self, *args, **kwargs):  # the write starts, then hangs
      out = await orig(self, *args, **kwargs)
      marker.write_text("writing")
      time.sleep(600)
      return out
    Json.async_save = stuck
    base = {"kernel": jnp.ones((64, 32))}
    p = lj.lora_init(jax.random.key(9), base, lj.LoraConfig(rank=4, targets="kernel"))
    p = jax.tree.map(lambda x: x + 5, p)
    save_adapter(sys.argv[1], p, overwrite=True)
""")


def test_killed_save_leaves_previous_checkpoint(tmp_path):
  base = {"kernel": jnp.ones((64, 32))}
  p = _trained(lj.lora_init(jax.random.key(0), base, lj.LoraConfig(rank=4, targets="kernel")))
  path = save_adapter(tmp_path / "c", p)
  marker = tmp_path / "marker"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  child = subprocess.Popen([sys.executable, "-c", _CHILD, path, str(marker)], cwd=REPO, env=env)
  try:
    while not marker.exists():
      assert child.poll() is None, "the child save ended before it was killed"
      time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
  finally:
    child.wait()
  assert child.returncode == -signal.SIGKILL
  partial = [n for n in os.listdir(tmp_path) if n.startswith("c.lora_jax-tmp-")]
  assert partial, "the kill should land while the new checkpoint is being written"
  _assert_same_adapter(load_adapter(path, base), p)
  newer = _trained(p, seed=3)
  save_adapter(path, newer, overwrite=True)  # the next save cleans up
  _assert_same_adapter(load_adapter(path, base), newer)
  assert sorted(os.listdir(tmp_path)) == ["c", "marker"]


def test_shape_mismatch_and_missing_kernel(tmp_path, trained):
  base, p = trained
  path = save_adapter(tmp_path / "c", p)
  wrong = jax.tree.map(lambda x: x, base)
  wrong["params"]["enc"]["kernel"] = jnp.ones((16, 6), jnp.bfloat16)
  del wrong["params"]["head"]
  with pytest.raises(ValueError) as e:
    load_adapter(path, wrong)
  msg = str(e.value)
  assert "params/enc/kernel: the checkpoint's kernel has shape (8, 6)" in msg
  assert "base kernel has shape (16, 6)" in msg
  assert "params/head/kernel: in the checkpoint, not in the base params" in msg
  assert "params/head/bias: in the checkpoint, not in the base params" in msg
  assert "Paths that exist:" in msg and "params/stack/kernel" in msg


def test_not_a_checkpoint_wrong_path_newer_version(tmp_path, trained):
  base, p = trained
  with pytest.raises(FileNotFoundError, match="no checkpoint at .*nowhere"):
    load_adapter(tmp_path / "nowhere", base)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "model.safetensors").write_text("x")
  with pytest.raises(ValueError, match=r"not a lora_jax adapter checkpoint: expected "
                     r"'lora_jax/metadata'.*found \['model.safetensors'\]"):
    load_adapter(tmp_path / "junk", base)
  plain = ocp.StandardCheckpointer()  # an Orbax checkpoint, but not an adapter
  plain.save(tmp_path / "orbax", {"w": jnp.ones(2)})
  plain.wait_until_finished()
  with pytest.raises(ValueError, match="not a lora_jax adapter checkpoint"):
    load_adapter(tmp_path / "orbax", base)
  path = save_adapter(tmp_path / "new", p)
  meta = os.path.join(path, "lora_jax", "metadata")
  info = json.load(open(meta))
  info["format_version"], info["lora_jax_version"] = 99, "9.0"
  json.dump(info, open(meta, "w"))
  with pytest.raises(ValueError, match=r"format version 99 \(by lora_jax 9.0\).*versions 1 to 2"):
    load_adapter(path, base)
