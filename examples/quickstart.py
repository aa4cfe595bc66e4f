"""Quickstart: fix a classifier's weak digit with a rank-1 LoRA, in JAX.

The MNIST experiment of Sean Song's blog post "Using LoRA for efficient
fine-tuning: Fundamental principles" (5 Feb 2024; PyTorch: an MLP
784-1000-2000-10, rank-1 LoRA on all three linear layers, fine-tuned on
digit 9 for 100 batches: digit-9 errors 116 -> 6), run on the 8x8
handwritten digits bundled with scikit-learn (no download), so the MLP is
64-1000-2000-10.

1. Pretrain the MLP briefly on data where one digit (9) is rare, so the
   model is weak on it.
2. Add rank-1 adapters to every Dense kernel (``lj.lora_init``), train only
   them (``lj.train_step``) on that digit's training examples alone.
3. Check what LoRA promises: with adapters off (``lj.base``) the predictions
   are exactly the original ones and the base kernels are bit-identical;
   merged weights (``lj.merge``) predict like the adapted model; the adapter
   saved with Orbax (``lj.save_adapter``) and loaded back onto the base
   (``lj.load_adapter``) predicts the same.

Run:  python examples/quickstart.py          (10-21 s on 2 shared CPU cores)
"""

import os
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lora_jax as lj

from _common import batches, figure_path, parser, progress, pyplot, save_figure, table


class MLP(nn.Module):
  """ReLU MLP: the blog post's network with 64 inputs."""

  hidden: tuple = (1000, 2000)

  @nn.compact
  def __call__(self, x):
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(10)(x)


def load_data(seed: int, digit: int, keep: float):
  """Digits split 50/50; the pretraining set keeps only ``keep`` of ``digit``."""
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0 - 0.3).astype(np.float32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=0.5, stratify=y, random_state=seed)
  rng = np.random.default_rng(seed)
  rare = np.flatnonzero(y_tr == digit)
  dropped = rng.permutation(rare)[int(round(keep * len(rare))):]
  pre = np.setdiff1d(np.arange(len(y_tr)), dropped)
  return (x_tr[pre], y_tr[pre]), (x_tr[rare], y_tr[rare]), (x_te, y_te)


def make_loss(apply):
  """The cross-entropy of ``apply(params, x)``."""
  def loss_fn(params, x, y):
    logits = apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def make_train_step(apply, tx):
  """A jitted Adam step on the cross-entropy of ``apply(params, x)`` (every weight trains)."""
  loss_fn = make_loss(apply)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def train(step, params, opt_state, x, y, steps, batch_size, rng, desc, quiet):
  """``steps`` minibatch steps with a tqdm bar showing the running loss."""
  bar = progress(batches(rng, len(y), batch_size, steps), desc, quiet, total=steps)
  total = 0.0
  for k, idx in enumerate(bar, 1):
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
    total += float(loss)
    bar.set_postfix(loss=f"{total / k:.3f}")
  return params, opt_state


def errors_per_digit(pred, y):
  return np.bincount(y[pred != y], minlength=10)


def save_and_reload(directory, lparams, params, config):
  """Save the adapter with Orbax, load it onto the base params; size on disk."""
  path = lj.save_adapter(directory, lparams, config=config, overwrite=True)
  size = sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())
  return lj.load_adapter(path, params), path, size


def plot(before, after, digit, rank, path):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  k = np.arange(10)
  ax.bar(k - 0.2, before, 0.4, label="pretrained (= LoRA off)")
  ax.bar(k + 0.2, after, 0.4, label=f"rank-{rank} LoRA on digit {digit}")
  ax.set_xticks(k)
  ax.set_xlabel("digit")
  ax.set_ylabel("test errors")
  ax.set_title(f"Errors per digit before / after LoRA fine-tuning on digit {digit}")
  ax.legend()
  save_figure(fig, path)


def main(argv=None) -> dict:
  p = parser(__doc__.split("\n")[0])
  p.add_argument("--digit", type=int, default=9, help="the digit to fix")
  p.add_argument("--rank", type=int, default=1, help="LoRA rank (the blog post used 1)")
  p.add_argument("--keep", type=float, default=0.05,
                 help="fraction of --digit's examples kept for pretraining")
  p.add_argument("--hidden", type=int, nargs=2, default=(1000, 2000),
                 help="hidden sizes of the MLP")
  p.add_argument("--pretrain-epochs", type=int, default=3,
                 help="pretraining epochs (batches of 10, every weight trains)")
  p.add_argument("--lora-steps", type=int, default=50,
                 help="fine-tuning batches of 10 (the blog post used 100 on MNIST)")
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (both phases)")
  args = p.parse_args(argv)
  if args.fast:
    args.hidden, args.lora_steps = (128, 256), 60

  (x_pre, y_pre), (x_ft, y_ft), (x_te, y_te) = load_data(args.seed, args.digit, args.keep)
  print(f"digits: {len(y_pre)} pretraining examples ({np.sum(y_pre == args.digit)} "
        f"of them {args.digit}s), {len(y_ft)} {args.digit}s for fine-tuning, "
        f"{len(y_te)} test examples")

  # 1. Pretrain: every parameter trains.
  model = MLP(tuple(args.hidden))
  key_model, key_lora = jax.random.split(jax.random.key(args.seed))
  params = model.init(key_model, x_pre[:1])
  tx = optax.adam(args.lr)
  step = make_train_step(model.apply, tx)
  steps = args.pretrain_epochs * len(y_pre) // 10
  params, _ = train(step, params, tx.init(params), x_pre, y_pre, steps, 10,
                    np.random.default_rng(args.seed), "pretrain", args.quiet)

  predict = jax.jit(model.apply)
  logits_orig = np.asarray(predict(params, x_te))
  before = errors_per_digit(logits_orig.argmax(-1), y_te)

  # 2. LoRA: rank-r adapters on every Dense kernel; only A and B train.
  config = lj.LoraConfig(rank=args.rank)
  lparams = lj.lora_init(key_lora, params, config)
  print(lj.summary(lparams))
  trainable, frozen = lj.split(lparams)  # A, B | the frozen kernels and biases
  tx = optax.adam(args.lr)                # plain optax: it sees A and B only
  predict_lora = jax.jit(lj.lora(model.apply))
  lora_step = lj.train_step(make_loss(lj.lora(model.apply)), tx)  # frozen: an input only
  step = lambda t, opt_state, x, y: lora_step(t, opt_state, frozen, x, y)
  trainable, _ = train(step, trainable, tx.init(trainable), x_ft, y_ft, args.lora_steps, 10,
                       np.random.default_rng(args.seed + 1), f"LoRA on digit {args.digit}",
                       args.quiet)
  lparams = lj.combine(trainable, frozen)
  logits_lora = np.asarray(predict_lora(lparams, x_te))
  after = errors_per_digit(logits_lora.argmax(-1), y_te)

  # 3. What LoRA promises.
  logits_off = np.asarray(predict(lj.base(lparams), x_te))
  base_identical = all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lj.base(lparams)),
                                           jax.tree.leaves(params)))
  logits_merged = np.asarray(predict(lj.merge(lparams), x_te))
  reloaded, ckpt_path, ckpt_bytes = save_and_reload(
      os.path.join(args.out, "quickstart_adapter"), lparams, params, config)
  logits_reloaded = np.asarray(predict_lora(reloaded, x_te))
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

  totals = np.bincount(y_te, minlength=10)
  rows = [(d, totals[d], before[d], after[d]) for d in range(10)]
  rows.append(("all", totals.sum(), before.sum(), after.sum()))
  print("\ntest errors per digit")
  print(table(("digit", "examples", "pretrained", f"LoRA r={args.rank}"), rows))
  acc = lambda e: 1 - e.sum() / len(y_te)
  print(f"accuracy: pretrained {acc(before):.3f}, LoRA {acc(after):.3f}")

  merged_diff = float(np.abs(logits_merged - logits_lora).max())
  reload_diff = float(np.abs(logits_reloaded - logits_lora).max())
  checks = [
      ("adapters off (lj.base): logits == original logits, bit for bit",
       bool(np.array_equal(logits_off, logits_orig))),
      ("base kernels and biases bit-identical to the pretrained ones", base_identical),
      (f"merged (lj.merge) predicts like LoRA (max |logit diff| {merged_diff:.1e})",
       bool(np.array_equal(logits_merged.argmax(-1), logits_lora.argmax(-1)))),
      (f"adapter saved with Orbax ({ckpt_bytes / 1024:.0f} KiB on disk; the base params "
       f"are {base_bytes / 2**20:.1f} MiB) and loaded onto the base predicts the same "
       f"(max |logit diff| {reload_diff:.1e})",
       bool(np.array_equal(logits_reloaded.argmax(-1), logits_lora.argmax(-1)))),
  ]
  print()
  for what, ok in checks:
    print(f"[{'ok' if ok else 'FAILED'}] {what}")

  png = figure_path(args.out, "quickstart_errors.png")
  plot(before, after, args.digit, args.rank, png)
  print(f"\nwrote {png} and the adapter checkpoint {ckpt_path}")
  return dict(
      errors_before=before, errors_after=after, digit=args.digit,
      summary=lj.summary(lparams),
      logits_orig=logits_orig, logits_off=logits_off, logits_lora=logits_lora,
      logits_merged=logits_merged, logits_reloaded=logits_reloaded,
      base_identical=base_identical, checkpoint=ckpt_path, checkpoint_bytes=ckpt_bytes,
      png=png)


if __name__ == "__main__":
  main(sys.argv[1:])
