"""LoRA on a (data, model) device mesh: a tensor-parallel Llama, trained with adapters.

The model is the Flax Llama of ``lora_jax.models`` (tiny config, layers stacked
with ``nn.scan``), its kernels sharded Megatron-style over the mesh's
``model`` axis: q/k/v/gate/up column-parallel (out axis), o/down row-parallel
(in axis), lm_head on its vocab axis; the batch is split over ``data``.

1. Put the base params on the mesh (``jax.device_put`` with NamedShardings).
2. ``lj.lora_init`` creates every adapter already sharded like its kernel:
   A takes the kernel's in-axes sharding, B its out-axes sharding, the rank
   axis is replicated and the stacked layer axis keeps its own sharding.
3. ``lora_shardings`` gives the whole tree's shardings for ``jax.jit``'s
   ``in_shardings`` / ``out_shardings``; the step trains A and B only.
4. ``lj.merge`` under ``jax.jit(..., donate_argnums=0)`` folds the adapters in
   place, each kernel keeping its sharding.

Without ``--accelerator`` the mesh is made of simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``, set before JAX is
imported); with it, the real devices JAX finds (GPUs, TPU cores).

Run:  python examples/sharded_training.py            (8 simulated CPU devices, mesh 2x4)
      python examples/sharded_training.py --mesh 1,8
      python examples/sharded_training.py --accelerator --mesh 1,4
"""

import os
import re
import sys
import warnings

from _common import parser, progress, table


def parse(argv=None):
  p = parser(__doc__.splitlines()[0])
  p.add_argument("--mesh", default="2,4",
                 help="mesh shape 'data,model' (product = number of devices used)")
  p.add_argument("--accelerator", action="store_true",
                 help="use the real devices JAX finds instead of simulated CPU devices")
  p.add_argument("--steps", type=int, default=60, help="training steps")
  p.add_argument("--rank", type=int, default=4, help="LoRA rank")
  p.add_argument("--batch", type=int, default=16, help="sequences per step")
  p.add_argument("--seq", type=int, default=16, help="tokens per sequence")
  p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
  args = p.parse_args(argv)
  if args.fast:
    args.steps = min(args.steps, 6)
  return args


def _use_simulated_devices(n: int) -> None:
  """Ask XLA for ``n`` host devices; only effective before JAX is imported."""
  if "jax" in sys.modules:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


# Megatron-style tensor parallelism for the Llama params, by path.
# Kernels with a leading layer axis (scan_layers) get None for it.
TP_RULES = [
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", (None, "model")),
    (r".*(o_proj|down_proj)/kernel", ("model", None)),
    (r"lm_head/kernel", (None, "model")),
]


def param_specs(params, P):
  """A PartitionSpec per leaf from TP_RULES (others replicated)."""
  import jax
  from lora_jax._src import tree

  def spec(path, x):
    p = tree.path_str(path)
    for pattern, axes in TP_RULES:
      if re.fullmatch(pattern, p):
        return P(*((None,) * (x.ndim - len(axes)) + axes))
    return P()
  return jax.tree_util.tree_map_with_path(spec, params)


def sharding_table(lparams) -> str:
  """path, shape, spec for every array of the LoRA params."""
  import jax
  from lora_jax._src import tree
  rows = []
  for path, x in tree.flatten(lparams)[0]:
    spec = x.sharding.spec if hasattr(x.sharding, "spec") else x.sharding
    rows.append((path, "x".join(map(str, x.shape)), str(spec)))
  del jax
  return table(("path", "shape", "sharding spec"), rows)


def synthetic_batch(key, batch: int, seq: int, vocab: int):
  """Sequences counting up by a per-sequence stride: next token is learnable."""
  import jax
  import jax.numpy as jnp
  k1, k2 = jax.random.split(key)
  start = jax.random.randint(k1, (batch, 1), 0, vocab)
  stride = jax.random.randint(k2, (batch, 1), 1, 4)
  return (start + stride * jnp.arange(seq + 1)[None, :]) % vocab


def main(argv=None) -> dict:
  args = parse(argv)
  shape = tuple(int(s) for s in args.mesh.split(","))
  if len(shape) != 2:
    raise SystemExit(f"--mesh wants 'data,model', got {args.mesh!r}")
  if not args.accelerator:
    _use_simulated_devices(shape[0] * shape[1])

  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import lora_jax as lj
  from lora_jax._src.sharding import lora_shardings
  from lora_jax.models import Llama, LlamaConfig, init_params

  n = shape[0] * shape[1]
  if len(jax.devices()) < n:
    raise SystemExit(f"--mesh {args.mesh} needs {n} devices; JAX sees "
                     f"{len(jax.devices())} ({jax.devices()[0].platform})")
  mesh = jax.make_mesh(shape, ("data", "model"), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  print(f"mesh {dict(mesh.shape)} on {n} {jax.devices()[0].platform} devices")

  cfg = LlamaConfig.tiny(scan_layers=True)
  model = Llama(cfg)
  key = jax.random.key(args.seed)
  params = init_params(cfg, key)
  params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s),
                                               param_specs(params, P)))
  ids = jnp.zeros((1, args.seq), jnp.int32)
  lcfg = lj.LoraConfig(rank=args.rank, alpha=2 * args.rank,
                       targets=r".*(q|k|v|o|gate|up|down)_proj/kernel")
  lparams = lj.lora_init(jax.random.fold_in(key, 1), params, lcfg,
                         trace=lambda p: model.apply({"params": p}, ids))
  print(sharding_table(lparams))
  print(lj.summary(lparams).line())

  tx = lj.optimizer(optax.adam(args.lr), lparams)
  apply = lj.lora(model.apply)
  shardings = lora_shardings(lparams)
  data = NamedSharding(mesh, P("data"))

  def loss_fn(p, tokens):
    logits = apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(p, opt, tokens):
    loss, g = jax.value_and_grad(loss_fn)(p, tokens)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  opt_state = jax.jit(tx.init)(lparams)  # Adam moments sharded like A and B
  opt_shardings = jax.tree.map(  # the step counter replicated over the mesh
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
      else NamedSharding(mesh, P()), opt_state)
  opt_state = jax.device_put(opt_state, opt_shardings)
  step = jax.jit(step, in_shardings=(shardings, opt_shardings, data),
                 out_shardings=(shardings, opt_shardings, None), donate_argnums=(0, 1))
  losses = []
  bar = progress(range(args.steps), "train", args.quiet)
  for i in bar:
    tokens = jax.device_put(synthetic_batch(jax.random.fold_in(key, 100 + i), args.batch,
                                            args.seq, cfg.vocab_size), data)
    lparams, opt_state, loss = step(lparams, opt_state, tokens)
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")

  a_q = lparams["layers"]["self_attn"]["q_proj"]["kernel"]
  q_specs = {"q_a_spec": tuple(a_q.a.sharding.spec), "q_b_spec": tuple(a_q.b.sharding.spec)}
  merge = jax.jit(lj.merge, donate_argnums=0)
  with warnings.catch_warnings():  # A and B have no output to alias
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    merge_mem = merge.lower(lparams).compile().memory_analysis()
    merged = merge(lparams)
  q = merged["layers"]["self_attn"]["q_proj"]["kernel"]
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged q_proj kernel "
        f"{q.shape} sharded {q.sharding.spec}; donated merge temp bytes "
        f"{merge_mem.temp_size_in_bytes} (aliased {merge_mem.alias_size_in_bytes})")
  return {"mesh": dict(mesh.shape), "losses": losses, **q_specs,
          "merged_q_spec": tuple(q.sharding.spec),
          "merge_temp_bytes": int(merge_mem.temp_size_in_bytes)}


if __name__ == "__main__":
  main()
