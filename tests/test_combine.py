"""combine_adapters: exactness (cat, svd, one adapter x 1.0), PEFT's
add_weighted_adapter as the reference for its methods, DARE's masks, unmerge,
and the errors for bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lora_jax as lj
import layer_cases
from layer_cases import hand_delta, is_lw, randomize_b
from lora_jax._src import combine as combine_src
from lora_jax._src import merge_rules
from lora_jax._src.interop.peft_unpack import unpack_peft

LAYOUTS = ["dense", "dense_general", "einsum", "conv", "embed", "nn_scan", "nnx_scan"]


@functools.lru_cache(maxsize=None)
def case(name):
  """The layer cases, built once per module (they are not modified)."""
  return layer_cases.case(name)


def _adapters(name, configs, seed=0):
  """Full LoRA params of case ``name``, one per config, with random non-zero B."""
  fn, params, args, _, trace = case(name)
  out = []
  for i, cfg in enumerate(configs):
    lp = lj.lora_init(jax.random.key(seed + 10 * i), params, cfg, trace=trace)
    out.append(randomize_b(lp, seed=seed + 10 * i + 1))
  return params, out


def _config(name, **kw):
  return dataclasses.replace(case(name)[3], **kw)


def _w_shape(x):
  """w's shape from the factors and roles (works without w)."""
  n = x.roles.count("s")
  stack, ins, outs = list(x.a.shape[:n]), list(x.a.shape[n:-1]), list(x.b.shape[n + 1:])
  return tuple(stack.pop(0) if r == "s" else ins.pop(0) if r == "i" else outs.pop(0)
               for r in x.roles)


def _delta_of(x):
  return hand_delta(_w_shape(x), x.roles, np.asarray(x.a, np.float64),
                    np.asarray(x.b, np.float64), x.scale)


def _all_deltas(ad):
  return {p: _delta_of(x) for p, x in lj.adapter(ad).items() if is_lw(x)}


def _close(got, want, rtol):
  err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
  assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


# ------------------------------------------------------- one adapter x 1.0

CONFIGS = {
    "plain": dict(rank=3, alpha=6),
    "rslora": dict(rank=4, alpha=8, rslora=True),
    "patterns": dict(rank=4, alpha=4, rank_pattern={".*Dense_0.*": 2},
                     alpha_pattern={".*Dense_1.*": 7}),
}


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_one_adapter_with_weight_one_is_itself(kind, method):
  _, (lp,) = _adapters("dense", [lj.LoraConfig(**CONFIGS[kind])])
  ad = lj.adapter(lp)
  kw = {"density": 0.5} if method in ("ties", "dare_ties", "dare_linear") else {}
  out = lj.combine_adapters([ad], [1.0], method=method, **kw)
  assert set(out) == set(ad)
  for path, x in ad.items():
    got, want = np.asarray(lj.delta(out[path])), np.asarray(lj.delta(x))
    if method == "svd":
      _close(got, want, 1e-5)
    else:  # the adapter's own factors and scale: bit for bit
      np.testing.assert_array_equal(got, want)
      assert out[path].scale == x.scale and out[path].rank == x.rank


# ------------------------------------------------------------- cat and svd

@pytest.mark.parametrize("name", LAYOUTS)
def test_cat_is_the_weighted_sum_of_deltas(name):
  cfg = case(name)[3]
  other = _config(name, rank=cfg.rank + 1, alpha=5.0, rslora=True)
  params, lps = _adapters(name, [cfg, other, cfg])
  weights = [0.7, -1.3, 0.25]
  out = lj.combine_adapters(lps, weights, method="cat")
  want = {p: sum(w * d[p] for w, d in zip(weights, map(_all_deltas, lps)))
          for p in _all_deltas(lps[0])}
  got = _all_deltas(out)
  for p in want:
    assert lj.adapter(out)[p].rank == sum(lj.adapter(lp)[p].rank for lp in lps)
    _close(got[p], want[p], 2e-6)


def _numpy_truncated_svd(d, w_shape, roles, rank):
  """Per stacked layer: the rank-``rank`` truncation of ΔW in (in, out) form."""
  s = [k for k, r in enumerate(roles) if r == "s"]
  i = [k for k, r in enumerate(roles) if r == "i"]
  o = [k for k, r in enumerate(roles) if r == "o"]
  perm = s + i + o
  size = lambda ks: int(np.prod([w_shape[k] for k in ks]))
  m = np.transpose(d, perm).reshape(size(s), size(i), size(o))
  u, sv, vt = np.linalg.svd(m, full_matrices=False)
  r = min(rank, m.shape[1], m.shape[2])
  t = (u[..., :r] * sv[..., None, :r]) @ vt[..., :r, :]
  return np.transpose(t.reshape([w_shape[k] for k in perm]), np.argsort(perm))


@pytest.mark.parametrize("name", LAYOUTS)
def test_svd_is_numpys_truncated_svd_of_the_sum(name):
  cfg = case(name)[3]
  params, lps = _adapters(name, [cfg, _config(name, rank=cfg.rank + 1, alpha=3.0)])
  weights = [0.6, 0.9]
  deltas = list(map(_all_deltas, lps))
  for rank in (None, 1, 99):  # default: the largest input rank; 99: capped
    out = lj.combine_adapters(lps, weights, method="svd", rank=rank)
    for p, x in lj.adapter(out).items():
      summed = sum(w * d[p] for w, d in zip(weights, deltas))
      r = rank or max(lj.adapter(lp)[p].rank for lp in lps)
      want = _numpy_truncated_svd(summed, _w_shape(x), x.roles, r)
      _close(_delta_of(x), want, 2e-5)
      a, b = combine_src._matrices(x)
      assert x.rank == min(r, a.shape[1], b.shape[2])


@pytest.mark.parametrize("name", ["dense", "conv", "nn_scan"])
@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties"])
def test_unmerge_of_a_combined_adapter_restores_the_base(name, method):
  cfg = case(name)[3]
  params, lps = _adapters(name, [cfg, cfg])
  kw = {"density": 0.6} if method == "ties" else {}
  combined = lj.combine_adapters([lj.adapter(lp) for lp in lps], [0.5, 1.5], method=method, **kw)
  merged = lj.merge(lj.attach(params, combined))
  assert max(float(jnp.abs(x - y).max()) for x, y in
             zip(jax.tree.leaves(merged), jax.tree.leaves(params))) > 1e-2
  back = lj.unmerge(merged, combined)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-5)


def test_full_params_in_full_params_out():
  cfg = case("dense")[3]
  params, lps = _adapters("dense", [cfg, cfg])
  out = lj.combine_adapters(lps, [1.0, 1.0], method="cat")
  assert jax.tree.structure(out, is_leaf=is_lw) == jax.tree.structure(lps[0], is_leaf=is_lw)
  for x, y in zip(jax.tree.leaves(lj.base(out)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)


def test_combined_adapter_saves_and_loads_like_any_adapter(tmp_path):
  cfg = case("dense")[3]
  params, lps = _adapters("dense", [cfg, _config("dense", rank=2, rslora=True)])
  combined = lj.combine_adapters([lj.adapter(lp) for lp in lps], [0.5, 0.5], method="cat")
  lj.save_adapter(tmp_path / "ckpt", combined)
  loaded = lj.adapter(lj.load_adapter(tmp_path / "ckpt", params))
  for path, x in combined.items():
    np.testing.assert_array_equal(lj.delta(loaded[path]), lj.delta(x))


def test_trainable_leaves_combine_as_task_vectors():
  cfg = lj.LoraConfig(rank=2, targets=".*Dense_0/kernel", trainable=".*Dense_1/bias")
  params, lps = _adapters("dense", [cfg, cfg])
  path = [p for p, x in lj.adapter(lps[0]).items() if isinstance(x, lj.Trainable)][0]
  base_value = _find(params, path)
  lps = [_set_trainable(lp, jnp.full_like(base_value, v)) for lp, v in zip(lps, (1.0, 3.0))]
  out = lj.combine_adapters(lps, [0.5, 0.25], method="cat")
  want = base_value + 0.5 * (1.0 - base_value) + 0.25 * (3.0 - base_value)
  np.testing.assert_allclose(lj.adapter(out)[path].value, want, rtol=1e-6)
  with pytest.raises(ValueError, match=f"{path} is trained in full"):
    lj.combine_adapters([lj.adapter(lp) for lp in lps], [0.5, 0.5], method="cat")


def _set_trainable(lp, value):
  return jax.tree.map(lambda x: lj.Trainable(value, x.base) if isinstance(x, lj.Trainable) else x,
                      lp, is_leaf=lambda x: isinstance(x, (lj.LoraWeight, lj.Trainable)))


def _find(params, path):
  from lora_jax._src import tree
  return dict(tree.flatten(params)[0])[path]


# ------------------------------------------------------- PEFT as reference

class _Net(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.emb = torch.nn.Embedding(20, 16)
    self.fc1 = torch.nn.Linear(16, 24)
    self.fc2 = torch.nn.Linear(24, 12)


NAMES = [(r"emb/embedding", "emb.weight"), (r"fc1/kernel", "fc1.weight"),
         (r"fc2/kernel", "fc2.weight")]
TORCH = {"emb/embedding": "emb", "fc1/kernel": "fc1", "fc2/kernel": "fc2"}


def _peft_model(configs):
  """A PEFT model holding one adapter per config, with random non-zero factors."""
  torch.manual_seed(0)
  net = _Net()
  pm = peft.get_peft_model(net, peft.LoraConfig(**configs[0]), adapter_name="a0")
  for i, cfg in enumerate(configs[1:], 1):
    pm.add_adapter(f"a{i}", peft.LoraConfig(**cfg))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.normal_(0, 0.5)
  params = {k.split("/")[0]: {k.split("/")[1]: _torch_kernel(net, m)} for k, m in TORCH.items()}
  return pm, params


def _torch_kernel(net, module):
  layer = getattr(net, module)
  w = getattr(layer, "base_layer", layer).weight.detach().numpy()
  return jnp.asarray(w if module == "emb" else w.T)


def _as_lora_jax(pm, params, name):
  tensors = {k: v.detach().numpy() for k, v in
             peft.get_peft_model_state_dict(pm, adapter_name=name).items()}
  return unpack_peft(pm.peft_config[name].to_dict(), tensors, params, NAMES)


def _peft_delta(pm, module, name):
  """PEFT's own ΔW of one module, in lora_jax's (in, out) layout."""
  layer = getattr(pm.base_model.model, module)
  d = layer.get_delta_weight(name).detach().numpy().astype(np.float64)
  return d if module == "emb" else d.T


PEFT_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=["emb", "fc1", "fc2"]),
    dict(r=4, lora_alpha=3, target_modules=["emb", "fc1", "fc2"], alpha_pattern={"fc2": 11}),
    dict(r=4, lora_alpha=4, target_modules=["emb", "fc1", "fc2"]),
]
PEFT_METHODS = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"rank": 3}),
    ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}), ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4}), ("dare_linear", {"density": 1.0}),
    ("dare_ties", {"density": 1.0}), ("dare_ties_svd", {"density": 1.0}),
    ("dare_linear_svd", {"density": 1.0}),
]


def _peft_and_ours(configs):
  pm, params = _peft_model(configs)
  ours = [lj.adapter(_as_lora_jax(pm, params, f"a{i}")) for i in range(len(configs))]
  for i in range(len(configs)):  # the import is right: our ΔW is PEFT's
    for path, module in TORCH.items():
      _close(_delta_of(ours[i][path]), _peft_delta(pm, module, f"a{i}"), 1e-6)
  return pm, ours


@pytest.fixture(scope="module")
def peft_three():
  """Three adapters with different scales (alphas 8, 3, 4 and an alpha_pattern)."""
  return _peft_and_ours(PEFT_CONFIGS)


@pytest.fixture(scope="module")
def peft_same_scale():
  """Three adapters sharing one scale: lora_jax keeps it on the result."""
  return _peft_and_ours([PEFT_CONFIGS[0]] * 3)


@pytest.mark.filterwarnings("ignore:The density")  # PEFT's, for density=1.0
@pytest.mark.parametrize("method,kw", PEFT_METHODS,
                         ids=[f"{m}-{'-'.join(map(str, kw.values()))}" for m, kw in PEFT_METHODS])
def test_equals_peft_add_weighted_adapter(peft_three, method, kw):
  _check_against_peft(peft_three, method, kw)


@pytest.mark.parametrize("method,kw", [("linear", {}), ("ties", {"density": 0.5}),
                                       ("cat", {}), ("magnitude_prune", {"density": 0.5})])
def test_equals_peft_when_scales_are_shared(peft_same_scale, method, kw):
  _check_against_peft(peft_same_scale, method, kw)


def _check_against_peft(pm_ours, method, kw):
  pm, ours = pm_ours
  weights = [0.8, -0.4, 1.3]
  name = f"{method}_{len(pm.peft_config)}"
  pkw = dict(kw)
  if "rank" in pkw:
    pkw["svd_rank"] = pkw.pop("rank")
  pm.add_weighted_adapter(["a0", "a1", "a2"], weights, name, combination_type=method, **pkw)
  out = lj.combine_adapters(ours, weights, method=method, **kw)
  for path, module in TORCH.items():
    _close(_delta_of(out[path]), _peft_delta(pm, module, name), 2e-5)


def test_linear_is_not_the_weighted_sum_for_several_adapters(peft_three):
  """PEFT's "linear" (which we keep) has cross terms a_i @ b_j; cat is exact."""
  _, ours = peft_three
  weights = [0.8, -0.4, 1.3]
  lin = lj.combine_adapters(ours, weights, method="linear")
  cat = lj.combine_adapters(ours, weights, method="cat")
  for path in TORCH:
    want = sum(w * _delta_of(a[path]) for w, a in zip(weights, ours))
    _close(_delta_of(cat[path]), want, 2e-6)
    err = np.abs(_delta_of(lin[path]) - want).max() / np.abs(want).max()
    assert err > 0.1


def test_rslora_single_adapter_is_itself_where_peft_rescales():
  cfg = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["fc1", "fc2"])
  pm, params = _peft_model([cfg])
  ours = lj.adapter(_as_lora_jax(pm, params, "a0"))
  out = lj.combine_adapters([ours], [1.0], method="linear")
  for path in ("fc1/kernel", "fc2/kernel"):
    np.testing.assert_array_equal(lj.delta(out[path]), lj.delta(ours[path]))
    _close(_delta_of(out[path]), _peft_delta(pm, TORCH[path], "a0"), 1e-6)


# -------------------------------------------------------------------- DARE

def _factor_adapters(n=3, shape=(40, 30), rank=8):
  keys = jax.random.split(jax.random.key(5), 2 * n)
  return [{"k": lj.LoraWeight(None, jax.random.normal(keys[2 * i], (shape[0], rank)),
                              jax.random.normal(keys[2 * i + 1], (rank, shape[1])),
                              scale=0.5 + i, roles="io")} for i in range(n)]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_a_numpy_reference_with_the_same_masks(method):
  ads = _factor_adapters()
  weights, density = [0.5, 1.0, -0.7], 0.3
  out = lj.combine_adapters(ads, weights, method=method, density=density, seed=7)["k"]
  # scales 0.5, 1.5, 2.5 differ: folded in, result scale 1
  assert out.scale == 1.0
  c = [w * x["k"].scale for w, x in zip(weights, ads)]
  wa = [np.sign(v) * np.sqrt(abs(v)) for v in c]
  wb = [np.sqrt(abs(v)) for v in c]
  for part, name, ws in ((0, "a", wa), (1, "b", wb)):
    keys = combine_src._keys(7, "k", part, len(ads))
    ts = np.stack([np.asarray(getattr(x["k"], name), np.float64) for x in ads])
    masks = np.stack([np.asarray(merge_rules.dare_mask(k, ts.shape[1:], density)) for k in keys])
    assert abs(masks.mean() - density) < 0.03  # 3 x 960 or 720 Bernoulli draws
    t = ts * masks / density
    weighted = t * np.reshape(ws, (-1, 1, 1))
    if method == "dare_linear":
      want = weighted.sum(0)
    else:
      sign = np.sign(t)
      keep = sign == np.where(t.sum(0) >= 0, 1, -1)
      want = (weighted * keep).sum(0) / np.maximum(keep.sum(0), 1)
    np.testing.assert_allclose(getattr(out, name), want, rtol=2e-6, atol=1e-6)


def test_dare_is_deterministic_for_a_seed():
  ads = _factor_adapters()
  run = lambda seed: lj.combine_adapters(ads, [1, 1, 1], method="dare_ties",
                                         density=0.5, seed=seed)["k"]
  np.testing.assert_array_equal(run(3).a, run(3).a)
  np.testing.assert_array_equal(run(jax.random.key(3)).a, run(jax.random.key(3)).a)
  assert not np.array_equal(run(3).a, run(4).a)


# -------------------------------------------------------------- bad input

def _two(ranks=(2, 2)):
  cfgs = [lj.LoraConfig(rank=r, targets=".*kernel") for r in ranks]
  return _adapters("dense", cfgs)[1]


def test_weights_of_the_wrong_length():
  with pytest.raises(ValueError, match="got 3 weights for 2 adapters; pass one weight per adapter"):
    lj.combine_adapters(_two(), [1.0, 1.0, 1.0])


def test_linear_with_unequal_ranks_names_adapter_path_and_fix():
  with pytest.raises(ValueError, match=r"adapter 1 has rank 3 at params/Dense_0/kernel, "
                     r"adapter 0 has rank 2.*method='cat'.*method='svd'"):
    lj.combine_adapters(_two((2, 3)), [0.5, 0.5], method="linear")
  with pytest.raises(ValueError, match="'ties'.*adapter 1 has rank 3"):
    lj.combine_adapters(_two((2, 3)), [0.5, 0.5], method="ties", density=0.5)
  assert lj.combine_adapters(_two((2, 3)), [0.5, 0.5], method="cat")


def test_different_targets_name_the_adapter_and_paths():
  a0 = lj.adapter(_two()[0])
  a1 = {p: x for p, x in a0.items() if "Dense_1" not in p}
  with pytest.raises(ValueError, match=r"adapter 1 does not adapt the same kernels as "
                     r"adapter 0; it lacks:\n  params/Dense_1/kernel"):
    lj.combine_adapters([a0, a1], [1, 1])


def test_full_params_on_different_base_weights_are_refused():
  lps = _two()
  other = jax.tree.map(lambda x: x.replace(w=x.w + 1.0) if is_lw(x) else x, lps[1], is_leaf=is_lw)
  with pytest.raises(ValueError, match=r"adapter 1 at params/Dense_0/kernel: its base "
                     r"kernel differs from adapter 0's"):
    lj.combine_adapters([lps[0], other], [1, 1], method="cat")
  views = [lj.adapter(lps[0]), lj.adapter(other)]  # views carry no base: nothing to compare
  assert lj.combine_adapters(views, [1, 1], method="cat")


def test_different_bases_name_the_adapter_and_path():
  a0 = lj.adapter(_two()[0])
  x = a0["params/Dense_0/kernel"]
  a1 = dict(a0, **{"params/Dense_0/kernel": x.replace(a=jnp.zeros((5, x.rank)))})
  with pytest.raises(ValueError, match=r"adapter 1 at params/Dense_0/kernel: .* but "
                     r"adapter 0 has .*different base models"):
    lj.combine_adapters([a0, a1], [1, 1], method="cat")


@pytest.mark.parametrize("kw,match", [
    (dict(method="nope"), "unknown method='nope'"),
    (dict(method="ties"), r"method='ties'\) needs density="),
    (dict(method="dare_ties", density=0.0), r"density must be a number in \(0, 1\]"),
    (dict(method="ties", density=1.5), r"density must be a number in \[0, 1\]"),
    (dict(method="linear", rank=2), "rank= applies to the SVD methods"),
    (dict(method="cat", density=0.5), "density= applies to"),
    (dict(method="svd", rank=0), "rank must be a positive int"),
    (dict(method="ties", density=0.5, majority_sign_method="max"), "majority_sign_method"),
])
def test_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    lj.combine_adapters(_two(), [1.0, 1.0], **kw)


def test_adapters_must_be_a_list():
  with pytest.raises(TypeError, match="non-empty list of adapters"):
    lj.combine_adapters(lj.adapter(_two()[0]), [1.0])
  with pytest.raises(TypeError, match="non-empty list"):
    lj.combine_adapters([], [])
