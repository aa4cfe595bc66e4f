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

Run:  python examples/sharded_training.py            (8 simulated CPU devices, mesh 2x4; about 30 s)
      python examples/sharded_training.py --mesh 1,8
      python examples/sharded_training.py --accelerator --mesh 1,4
"""

import os
import re
import sys
import warnings

from _common import figure_path, parser, progress, table


def parse(argv=None):
  p = parser(__doc__.splitlines()[0])
  p.add_argument("--mesh", default="2,4",
                 help="mesh shape 'data,model' (product = number of devices used)")
  p.add_argument("--accelerator", action="store_true",
                 help="use the real devices JAX finds instead of simulated CPU devices")
  p.add_argument("--steps", type=int, default=200, help="training steps")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank")
  p.add_argument("--batch", type=int, default=16, help="sequences per step")
  p.add_argument("--seq", type=int, default=16, help="tokens per sequence")
  p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
  args = p.parse_args(argv)
  if args.fast:
    args.steps = min(args.steps, 40)
  return args


def _use_simulated_devices(n: int) -> None:
  """Ask XLA for ``n`` host devices; only effective before JAX is imported."""
  if "jax" in sys.modules:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def path_str(path) -> str:
  """'layers/self_attn/q_proj/kernel' for a JAX key path."""
  import jax
  return jax.tree_util.keystr(path, simple=True, separator="/")


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

  def spec(path, x):
    p = path_str(path)
    for pattern, axes in TP_RULES:
      if re.fullmatch(pattern, p):
        return P(*((None,) * (x.ndim - len(axes)) + axes))
    return P()
  return jax.tree_util.tree_map_with_path(spec, params)


AXIS_NAMES = {"s": "layer", "i": "in", "o": "out"}


def split_words(x, axis_names, mesh_shape) -> str:
  """How ``x`` is divided over the mesh, e.g. 'out / 4' or 'whole'."""
  spec = tuple(x.sharding.spec) + (None,) * x.ndim
  parts = [f"{name} / {mesh_shape[ax]}" for name, ax in zip(axis_names, spec) if ax]
  return ", ".join(parts) or "whole"


def sharding_table(lparams, mesh_shape) -> str:
  """Every adapted kernel: its shape and how the kernel, A and B are divided."""
  import jax
  import lora_jax as lj
  rows = []
  for path, x in jax.tree_util.tree_leaves_with_path(
      lparams, is_leaf=lambda v: isinstance(v, lj.LoraWeight)):
    if not isinstance(x, lj.LoraWeight):
      continue
    path = path_str(path)
    names = [AXIS_NAMES[r] for r in x.roles]
    stack = [n for n in names if n == "layer"]
    in_names = [n for n in names if n == "in"]
    out_names = [n for n in names if n == "out"]
    rows.append((path, " x ".join(map(str, x.w.shape)),
                 split_words(x.w, names, mesh_shape),
                 split_words(x.a, stack + in_names + ["rank"], mesh_shape),
                 split_words(x.b, stack + ["rank"] + out_names, mesh_shape)))
  return table(("adapted kernel", "shape", "kernel split", "A split", "B split"), rows)


def plot(losses, path):
  from _common import pyplot, save_figure
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.plot(losses, lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats / token)")
  ax.set_title("LoRA on a (data, model) device mesh")
  save_figure(fig, path)


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
  from lora_jax.models import Llama, LlamaConfig, init_params

  n = shape[0] * shape[1]
  if len(jax.devices()) < n:
    raise SystemExit(f"--mesh {args.mesh} needs {n} devices; JAX sees "
                     f"{len(jax.devices())} ({jax.devices()[0].platform})")
  mesh = jax.make_mesh(shape, ("data", "model"), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  where = "simulated CPU devices" if not args.accelerator else f"{jax.devices()[0].platform} devices"
  print(f"mesh: {shape[0]} x {shape[1]} = {n} {where}. Each batch is split {shape[0]} ways "
        f"('data'); each weight matrix {shape[1]} ways ('model', tensor parallelism).")

  cfg = LlamaConfig.tiny(scan_layers=True)
  model = Llama(cfg)
  key = jax.random.key(args.seed)
  params = init_params(cfg, key)
  params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s),
                                               param_specs(params, P)))
  ids = jnp.zeros((1, args.seq), jnp.int32)
  lcfg = lj.LoraConfig(rank=args.rank, alpha=2 * args.rank,
                       targets=r".*((q|k|v|o|gate|up|down)_proj|lm_head)/kernel")
  lparams = lj.lora_init(jax.random.fold_in(key, 1), params, lcfg,
                         trace=lambda p: model.apply({"params": p}, ids))
  print("\nHow each adapted kernel and its adapter (A, B) are divided over the mesh "
        "('out / 4': the output axis is cut in 4 parts, one per device; 'whole': "
        "every device holds a full copy):")
  print(sharding_table(lparams, dict(mesh.shape)))
  print(lj.summary(lparams).line())

  tx = optax.adam(args.lr)  # plain optax on the trainable half
  apply = lj.lora(model.apply)
  shardings = lj.lora_shardings(lparams)
  t_shardings, f_shardings = lj.split(shardings)  # the halves' shardings
  data = NamedSharding(mesh, P("data"))

  def loss_fn(p, tokens):
    logits = apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def accuracy(p, tokens):
    logits = apply({"params": p}, tokens[:, :-1])
    return (logits.argmax(-1) == tokens[:, 1:]).mean()

  held_out = jax.device_put(synthetic_batch(jax.random.fold_in(key, 7), 64, args.seq,
                                            cfg.vocab_size), data)
  acc_before = float(accuracy(lparams, held_out))

  trainable, frozen = lj.split(lparams)  # A, B | the base: an input of the step only
  opt_state = jax.jit(tx.init)(trainable)  # Adam moments sharded like A and B
  opt_shardings = jax.tree.map(  # the step counter replicated over the mesh
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
      else NamedSharding(mesh, P()), opt_state)
  opt_state = jax.device_put(opt_state, opt_shardings)
  step = jax.jit(lj.train_step(loss_fn, tx, jit=False),
                 in_shardings=(t_shardings, opt_shardings, f_shardings, data),
                 out_shardings=(t_shardings, opt_shardings, None), donate_argnums=(0, 1))
  losses = []
  bar = progress(range(args.steps), "train (A, B only)", args.quiet)
  for i in bar:
    tokens = jax.device_put(synthetic_batch(jax.random.fold_in(key, 100 + i), args.batch,
                                            args.seq, cfg.vocab_size), data)
    trainable, opt_state, loss = step(trainable, opt_state, frozen, tokens)
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  lparams = lj.combine(trainable, frozen)
  acc_after = float(accuracy(lparams, held_out))

  a_q = lparams["layers"]["self_attn"]["q_proj"]["kernel"]
  q_specs = {"q_a_spec": tuple(a_q.a.sharding.spec), "q_b_spec": tuple(a_q.b.sharding.spec)}
  merge = jax.jit(lj.merge, donate_argnums=0)
  with warnings.catch_warnings():  # A and B have no output to alias
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    merge_mem = merge.lower(lparams).compile().memory_analysis()
    merged = merge(lparams)
  q = merged["layers"]["self_attn"]["q_proj"]["kernel"]
  merged_acc = float(jax.jit(lambda p, t: (model.apply({"params": p}, t[:, :-1]).argmax(-1)
                                            == t[:, 1:]).mean())(merged, held_out))

  print("\nThe task: continue sequences that count up by 1, 2 or 3 (mod "
        f"{cfg.vocab_size}); the base model is random, only the adapters train.")
  marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
  print(table(("step", "training loss"), [(k + 1, f"{losses[k]:.3f}") for k in marks]))
  print()
  print(table(("model", "next-token accuracy on 64 new sequences"),
              [("before training (B = 0: the base)", f"{acc_before:.3f}"),
               ("after LoRA training", f"{acc_after:.3f}"),
               ("merged (lj.merge, in place)", f"{merged_acc:.3f}")]))
  print(f"\nThe merge ran in place (buffers donated): the merged q_proj kernel "
        f"{' x '.join(map(str, q.shape))} is still divided as "
        f"'{split_words(q, ['layer', 'in', 'out'], dict(mesh.shape))}', and it needed "
        f"{merge_mem.temp_size_in_bytes:,} bytes of scratch memory.")
  png = figure_path(args.out, "sharded_training_loss.png")
  plot(losses, png)
  print(f"wrote {png}")
  return {"mesh": dict(mesh.shape), "losses": losses, **q_specs,
          "merged_q_spec": tuple(q.sharding.spec), "acc_before": acc_before,
          "acc_after": acc_after, "merged_acc": merged_acc, "png": png,
          "merge_temp_bytes": int(merge_mem.temp_size_in_bytes)}


if __name__ == "__main__":
  main(sys.argv[1:])
