"""A rank-1 LoRA recovers a rank-1 shift of a linear model's weights.

The experiment of a blog post that explains LoRA "in a very minimal torch
example" (written with torch for R), in JAX:

1. Simulate y = X·θ with θ ∈ R^(1001×1000), X ∈ R^(10000×1001) Gaussian.
2. Pretrain a full-rank linear model (no bias) with Adam, batch 128, 100 epochs.
3. Shift the task: θ2 = θ + 1 (a matrix of ones is rank 1), new X2, y2 = X2·θ2.
4. Train a rank-1 LoRA (alpha 1, A ~ N(0, 1), B = 0, as in the post) on the
   frozen model, same optimizer and epochs.
5. ΔW = scale·A·B (``lj.delta``) should be a matrix of ones; merging it
   (``lj.merge``) gives a plain linear model that fits the new data.

The post's figures: LoRA loss 0.0013 after 100 epochs; ΔW[:5, :5] ≈ 1.000.

Run:  python examples/low_rank_shift.py       (about 1.5 minutes on 2 CPU cores)
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

from _common import Timer, figure_path, parser, progress, pyplot, save_figure, table


def apply(params, x):
  """The model: a linear layer without bias, ``x @ kernel``."""
  return x @ params["kernel"]


def mse(params, x, y, fn=apply):
  return jnp.mean((fn(params, x) - y) ** 2)


def make_epoch(fn, tx, batch_size: int):
  """One jitted epoch: a ``lax.scan`` of Adam steps over shuffled batches.

  ``params`` is the trainable half and ``frozen`` the rest (``lj.split``; for
  full training ``frozen`` is None): only the trainable half is
  differentiated and updated (``lj.train_step``)."""
  step = lj.train_step(lambda p, x, y: mse(p, x, y, fn), tx, jit=False)

  @jax.jit
  def epoch(params, opt_state, frozen, x, y, key):
    n = x.shape[0] // batch_size * batch_size
    order = jax.random.permutation(key, x.shape[0])[:n].reshape(-1, batch_size)
    (params, opt_state), losses = jax.lax.scan(
        lambda c, idx: (lambda t, s, l: ((t, s), l))(*step(*c, frozen, x[idx], y[idx])),
        (params, opt_state), order)
    return params, opt_state, losses.mean()
  return epoch


def train(fn, params, x, y, tx, epochs, batch_size, key, desc, quiet):
  """``epochs`` epochs; returns params, per-epoch mean batch loss, full-data
  loss every 10 epochs (the post's printout). LoRA params are split, so the
  frozen kernel is never differentiated; ``tx`` sees the trainable half."""
  lora = any(isinstance(v, lj.LoraWeight) for v in jax.tree.leaves(
      params, is_leaf=lambda v: isinstance(v, lj.LoraWeight)))
  params, frozen = lj.split(params) if lora else (params, jax.tree.map(lambda _: None, params))
  epoch = make_epoch(fn, tx, batch_size)
  full = jax.jit(lambda p: mse(lj.combine(p, frozen) if lora else p, x, y, fn))
  opt_state = tx.init(params)
  curve, checkpoints = [], []
  bar = progress(range(1, epochs + 1), desc, quiet)
  for e in bar:
    params, opt_state, loss = epoch(params, opt_state, frozen, x, y,
                                    jax.random.fold_in(key, e))
    curve.append(float(loss))
    bar.set_postfix(loss=f"{curve[-1]:.4g}")
    if e % 10 == 0 or e == epochs:
      checkpoints.append((e, float(full(params))))
  return (lj.combine(params, frozen) if lora else params), np.array(curve), checkpoints


def plot(pre_curve, lora_curve, path):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  ax.semilogy(np.arange(1, len(pre_curve) + 1), pre_curve, label="pretraining (full rank, θ)")
  ax.semilogy(np.arange(1, len(lora_curve) + 1), lora_curve, label="rank-1 LoRA (θ + 1)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("training MSE (mean over the epoch's batches)")
  ax.set_title("A rank-1 LoRA learns the shift θ → θ + 1")
  ax.legend()
  save_figure(fig, path)


def main(argv=None) -> dict:
  p = parser(__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=10000, help="examples per task")
  p.add_argument("--d-in", type=int, default=1001, help="input features (rows of θ)")
  p.add_argument("--d-out", type=int, default=1000, help="outputs (columns of θ)")
  p.add_argument("--epochs", type=int, default=100, help="epochs for each phase")
  p.add_argument("--batch-size", type=int, default=128, help="examples per step")
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
  p.add_argument("--rank", type=int, default=1, help="LoRA rank (the shift is rank 1)")
  args = p.parse_args(argv)
  if args.fast:
    args.n, args.d_in, args.d_out, args.epochs, args.lr = 2000, 101, 100, 40, 1e-2

  k_theta, k_x, k_x2, k_init, k_lora, k_pre, k_ft = jax.random.split(
      jax.random.key(args.seed), 7)
  theta = jax.random.normal(k_theta, (args.d_in, args.d_out))
  x = jax.random.normal(k_x, (args.n, args.d_in))
  y = x @ theta

  # 1. Pretrain (torch's nn_linear init: U(-1/sqrt(in), 1/sqrt(in))).
  bound = 1 / np.sqrt(args.d_in)
  params = {"kernel": jax.random.uniform(k_init, (args.d_in, args.d_out),
                                         minval=-bound, maxval=bound)}
  with Timer() as t_pre:
    params, pre_curve, pre_log = train(apply, params, x, y, optax.adam(args.lr),
                                       args.epochs, args.batch_size, k_pre,
                                       "pretrain full rank", args.quiet)

  # 2. The shifted task.
  theta2 = theta + 1
  x2 = jax.random.normal(k_x2, (args.n, args.d_in))
  y2 = x2 @ theta2
  shifted_before = float(mse(params, x2, y2))

  # 3. Rank-1 LoRA, initialised as in the post: A ~ N(0, 1), B = 0, alpha = 1.
  config = lj.LoraConfig(rank=args.rank, alpha=1.0, init="gaussian", targets="kernel")
  lparams = lj.lora_init(k_lora, params, config)
  print(lj.summary(lparams).line())
  with Timer() as t_lora:
    lparams, lora_curve, lora_log = train(
        lj.lora(apply), lparams, x2, y2, optax.adam(args.lr),
        args.epochs, args.batch_size, k_ft, f"rank-{args.rank} LoRA", args.quiet)

  delta = np.asarray(lj.delta(lparams["kernel"]))
  merged = lj.merge(lparams)
  merged_loss = float(mse(merged, x2, y2))

  print("\nfull-data MSE every 10 epochs")
  rows = [(e, f"{a:.6g}", f"{b:.6g}") for (e, a), (_, b) in zip(pre_log, lora_log)]
  print(table(("epoch", "pretrain (θ)", f"LoRA r={args.rank} (θ+1)"), rows))
  print(f"\npretrained model on the shifted data: MSE {shifted_before:.6g}")
  print("ΔW = lj.delta(lparams['kernel'])[:5, :5]:")
  print(np.array2string(delta[:5, :5], precision=4, floatmode="fixed"))
  err = np.abs(delta - 1)
  print(f"|ΔW - 1|: mean {err.mean():.2e}, max {err.max():.2e}")
  print(f"merged model (lj.merge) on the shifted data: MSE {merged_loss:.6g}  "
        "(the post: 0.0013)")
  print(f"time: pretraining {t_pre.seconds:.1f} s, LoRA {t_lora.seconds:.1f} s")

  png = figure_path(args.out, "low_rank_shift_loss.png")
  plot(pre_curve, lora_curve, png)
  print(f"wrote {png}")
  return dict(delta=delta, delta_err_mean=float(err.mean()), delta_err_max=float(err.max()),
              pretrain_loss=pre_log[-1][1], shifted_before=shifted_before,
              lora_loss=lora_log[-1][1], merged_loss=merged_loss,
              pre_curve=pre_curve, lora_curve=lora_curve,
              seconds_pretrain=t_pre.seconds, seconds_lora=t_lora.seconds, png=png)


if __name__ == "__main__":
  main(sys.argv[1:])
