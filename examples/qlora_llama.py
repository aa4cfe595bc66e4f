"""QLoRA vs LoRA: the tiny Llama of llama_lora.py fine-tuned on an NF4 base and on a bf16 base.

What it does (under a minute on 2 CPU cores; seconds with --fast):

1. Base model. The tiny byte-level Llama of ``examples/llama_lora.py`` (2
   scanned layers) is pretrained, all weights, on the first half of
   ``examples/data/alice_ch1.txt``, then cast to bfloat16: the bf16 base.
2. NF4 base. ``lj.quantize`` stores every q/k/v/o/gate/up/down projection in
   NF4 (blocks of 64 along the input axis, 32 with --fast; double-quantized
   scales, bitsandbytes' format), dequantized to bf16 inside each matmul by
   ``lj.lora``; embeddings, norms and lm_head stay bf16. The quantization
   error of every projection in every layer is printed
   (``||W_nf4 - W|| / ||W||``).
3. Fine-tuning. The same rank-8 adapters, the same seed, batches and steps on
   the second half, once on each base (``lj.train_step`` with
   ``optax.adamw``: only A and B are differentiated and updated; the NF4
   codes sit in the frozen half, an input of the step, and stay as they are).
4. Report. Training losses and the final held-in losses side by side, the
   per-layer quantization errors, and a PNG (``out/qlora_llama/qlora_llama.png``).

What to expect (measured with the defaults on CPU): NF4 moves each projection
by ~9% (relative Frobenius, 0.090-0.097 per layer); over 200 steps the two
runs' losses track each other step by step, ending at 0.51 nats/byte on the
NF4 base and 0.53 on the bf16 base (from 4.41 / 4.45 for the bases alone):
at this scale the 4-bit base costs nothing the adapters cannot absorb.

Run:  python examples/qlora_llama.py [--steps 300] [--fast]
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.models import Llama, init_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Timer, figure_path, parser, progress, pyplot, save_figure, table  # noqa: E402
import llama_lora  # noqa: E402

TARGETS = llama_lora.TARGETS


def make_step(apply, tx):
  """A jitted step on the trainable half; the NF4 codes sit in the frozen half,
  an input of the step that is never differentiated."""
  def loss_fn(params, batch):
    logits = apply(params, batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  return lj.train_step(loss_fn, tx)


def layer_errors(params, qparams) -> dict:
  """``{projection: [relative Frobenius error of layer 0, layer 1, ...]}``."""
  out = {}
  name = lambda path: "/".join(str(k.key) for k in path)
  flat = {name(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  for path, q in jax.tree_util.tree_leaves_with_path(
      qparams, is_leaf=lambda x: isinstance(x, lj.QuantizedWeight)):
    path = name(path)
    if isinstance(q, lj.QuantizedWeight):
      w = flat[path].astype(jnp.float32)
      d = q.dequantize(jnp.float32) - w
      axes = tuple(range(1, w.ndim))
      rel = jnp.sqrt(jnp.sum(d * d, axes) / jnp.sum(w * w, axes))
      out[path.split("/")[-2]] = [float(x) for x in rel]
  return out


def finetune(name, apply, base_params, tokens, args, trace):
  """LoRA on ``base_params``: ``(lparams, losses)``."""
  lconfig = lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=TARGETS)
  lparams = lj.lora_init(jax.random.key(args.seed + 1), base_params, lconfig, trace=trace)
  trainable, frozen = lj.split(lparams)  # A, B | codes, scales, norms, embeddings
  tx = optax.adamw(args.lr)               # plain optax on the trainable half
  opt_state, step, losses = tx.init(trainable), make_step(lj.lora(apply), tx), []
  bar = progress(range(1, args.steps + 1), f"LoRA on the {name} base", args.quiet)
  for k in bar:
    batch = llama_lora.batch_at(tokens, k, args.seed, 1, args.batch_size, args.seq_len)
    trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  return lj.combine(trainable, frozen), losses


def held_in_loss(apply, lparams, tokens, seq_len) -> float:
  w = jnp.asarray(llama_lora.windows(tokens, seq_len))
  logits = jax.jit(lj.lora(apply))(lparams, w[:, :-1]).astype(jnp.float32)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean())


def plot(curves: dict, errors: dict, path: str) -> None:
  plt = pyplot()
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  for name, losses in curves.items():
    ax0.plot(np.arange(1, len(losses) + 1), losses, label=name)
  ax0.set(xlabel="LoRA step", ylabel="training loss (nats / byte)",
          title="LoRA on an NF4 base vs a bf16 base")
  ax0.legend()
  names = sorted(errors)
  layers = len(next(iter(errors.values())))
  width = 0.8 / layers
  for layer in range(layers):
    ax1.bar(np.arange(len(names)) + layer * width, [errors[n][layer] for n in names],
            width, label=f"layer {layer}")
  ax1.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30)
  ax1.set(ylabel="||W_nf4 - W|| / ||W||", title="NF4 quantization error")
  ax1.legend(loc="lower right")
  save_figure(fig, path)


def make_parser():
  p = parser(__doc__.split("\n")[0], out=os.path.join("out", "qlora_llama"),
             out_help="directory for the PNG")
  p.add_argument("--steps", type=int, default=None, help="LoRA steps on each base (default: 200; "
                                                         "30 with --fast)")
  p.add_argument("--pretrain-steps", type=int, default=None,
                 help="full fine-tuning steps of the tiny base (default: 400; 80 with --fast)")
  p.add_argument("--pretrain-lr", type=float, default=3e-3, help="pretraining learning rate")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank")
  p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
  p.add_argument("--lr", type=float, default=5e-3, help="LoRA learning rate (adamw)")
  p.add_argument("--block-size", type=int, default=None,
                 help="NF4 block size along the input axis (default: 64; 32 with --fast, "
                      "whose width is 32)")
  p.add_argument("--batch-size", type=int, default=16, help="windows per step")
  p.add_argument("--seq-len", type=int, default=64, help="tokens per window")
  p.add_argument("--text", default=llama_lora.TEXT, help="UTF-8 text file ('#' lines skipped)")
  return p


def main(argv=None) -> dict:
  args = make_parser().parse_args(argv)
  if args.fast:
    args.seq_len, args.batch_size = 32, 8
  args.steps = args.steps or (30 if args.fast else 200)
  args.pretrain_steps = args.pretrain_steps or (80 if args.fast else 400)
  args.block_size = args.block_size or (32 if args.fast else 64)
  text_a, text_b = llama_lora.halves(llama_lora.read_text(args.text))
  tok = llama_lora.ByteTokenizer()
  tok_a, tok_b = tok.encode(text_a), tok.encode(text_b)

  config = llama_lora.tiny_config(args.fast)
  model = Llama(config)
  apply32 = lambda p, ids: model.apply({"params": p}, ids)
  with Timer() as t_base:
    params, pre = llama_lora.pretrain(apply32, init_params(config, jax.random.key(args.seed)),
                                      tok_a, args)
  bf16 = config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model16 = Llama(bf16)
  apply = lambda p, ids: model16.apply({"params": p}, ids)
  base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  probe = jnp.zeros((1, 8), jnp.int32)
  trace = lambda p: apply(p, probe)
  qconfig = lj.QuantConfig(kind="nf4", block_size=args.block_size, double_quant=True,
                           targets=TARGETS, compute_dtype=jnp.bfloat16)
  nf4 = lj.quantize(base16, qconfig, trace=trace)
  errors = layer_errors(base16, nf4)
  kernel_bytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  print(f"base: tiny Llama pretrained {args.pretrain_steps} steps ({t_base.seconds:.1f} s), "
        f"loss {np.mean(pre[-10:]):.3f}; bf16 params {kernel_bytes(base16):,} B, "
        f"with NF4 projections {kernel_bytes(nf4):,} B")
  print("\nNF4 quantization error ||W_nf4 - W|| / ||W|| per layer")
  print(table(["projection"] + [f"layer {k}" for k in range(config.num_hidden_layers)],
              [[n] + [f"{e:.4f}" for e in errors[n]] for n in sorted(errors)]))

  curves, finals = {}, {}
  for name, base in (("bf16", base16), ("nf4", nf4)):
    lparams, curves[name] = finetune(name, apply, base, tok_b, args, trace)
    finals[name] = held_in_loss(apply, lparams, tok_b, args.seq_len)
  base_loss = {name: held_in_loss(apply, base, tok_b, args.seq_len)
               for name, base in (("bf16", base16), ("nf4", nf4))}
  rows = [[n, f"{base_loss[n]:.3f}", f"{np.mean(curves[n][:5]):.3f}",
           f"{np.mean(curves[n][-5:]):.3f}", f"{finals[n]:.3f}"] for n in curves]
  print(f"\nLoRA r={args.rank}, {args.steps} steps on the second half, same seed and batches")
  print(table(["base", "base loss", "train start", "train end (last 5)", "final loss"], rows))
  png = figure_path(args.out, "qlora_llama.png")
  plot(curves, errors, png)
  print(f"\nwrote {png}")
  return dict(losses=curves, final=finals, base_loss=base_loss, errors=errors, png=png)


if __name__ == "__main__":
  main()
