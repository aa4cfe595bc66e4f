"""LoRA on a Flax NNX model with dropout: adapt a digit classifier to mirrored digits.

NNX modules that use randomness (``nnx.Dropout``, attention dropout) keep
their RNG state in the model: ``nnx.split(model)`` returns uint32
``RngCount`` and ``RngKey`` leaves next to the weights, and ``jax.grad`` over
that whole state fails. The NNX way: split the weights out with
``nnx.split(model, nnx.Param, ...)``, put the adapters on them, and call the
model through a pure function that merges the pieces back.

1. Model: a small NNX transformer classifier (``nnx.MultiHeadAttention`` with
   attention dropout, ``nnx.Dropout`` after the MLP). Each 8x8 image of
   scikit-learn's bundled handwritten digits (no download) is read as a
   sequence of 8 rows of 8 pixels.
2. Pretrain every weight on upright digits.
3. New task: the same digits mirrored left to right. The pretrained model is
   poor at them; rank-4 LoRA adapters on every ``nnx.Linear`` kernel
   (``lj.lora_init`` on the ``nnx.Param`` state) are trained on mirrored
   digits with dropout active (the RNG state advances every step), and only
   the adapters train (``lj.train_step``).
4. Merge (``lj.merge``) into plain weights, save the adapter with Orbax
   (``lj.save_adapter``) and load it back onto the base (``lj.load_adapter``).

Run:  python examples/nnx_lora.py        (10-30 s on 2 shared CPU cores)
"""

import os
import sys

import jax
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lora_jax as lj

from _common import batches, figure_path, parser, progress, pyplot, save_figure, table


class Classifier(nnx.Module):
  """Rows of an image as tokens -> one transformer block -> 10 logits."""

  def __init__(self, width: int, heads: int, dropout: float, rngs: nnx.Rngs):
    self.embed = nnx.Linear(8, width, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (8, width)))
    self.attn = nnx.MultiHeadAttention(
        num_heads=heads, in_features=width, dropout_rate=dropout,
        deterministic=False, decode=False, rngs=rngs)
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):  # x: (batch, 8 rows, 8 pixels)
    h = self.embed(x) + self.pos[None]
    h = h + self.attn(self.norm1(h))
    h = h + self.drop(self.down(nnx.gelu(self.up(self.norm2(h)))))
    return self.head(h.mean(axis=1))


def make_forward(graphdef):
  """The model as a pure function of (weights, RNG state, images)."""
  def forward(params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return model(x), nnx.state(model, nnx.RngState)   # logits, advanced RNG state
  return forward


def make_predict(graphdef):
  """The model with dropout off (``model.eval()``), as a pure function."""
  def predict(params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model.eval()
    return model(x)
  return predict


def make_loss(apply):
  """The cross-entropy, with the advanced RNG state as aux."""
  def loss_fn(params, rest, x, y):
    logits, rest = apply(params, rest, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), rest
  return loss_fn


def make_step(apply, tx):
  """A jitted step training every weight; returns the advanced RNG state with the params."""
  loss_fn = make_loss(apply)

  @jax.jit
  def step(params, rest, opt_state, x, y):
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss
  return step


def train(step, params, rest, opt_state, data, steps, rng, desc, quiet):
  """``steps`` minibatch steps of 32 with a tqdm bar; the loss of every step."""
  x, y = data
  bar = progress(batches(rng, len(y), 32, steps), desc, quiet, total=steps)
  losses = []
  for idx in bar:
    params, rest, opt_state, loss = step(params, rest, opt_state, x[idx], y[idx])
    losses.append(float(loss))
    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
  return params, rest, losses


def load_data(seed: int):
  """Digits as (n, 8 rows, 8 pixels) in [0, 1], split 50/50, stratified."""
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8)
  return train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)


def mirror(x):
  return x[:, :, ::-1].copy()


def rng_count(rest) -> int:
  """The dropout stream's call counter (advances once per dropout call)."""
  counts = [int(v) for p, v in jax.tree_util.tree_leaves_with_path(rest)
            if "count" in jax.tree_util.keystr(p)]
  return max(counts)


def plot(pre_losses, lora_losses, path):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.plot(pre_losses, lw=0.8, label="pretraining, all weights (upright digits)")
  ax.plot(np.arange(len(lora_losses)) + len(pre_losses), lora_losses, lw=0.8,
          label="LoRA, adapters only (mirrored digits)")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (cross-entropy)")
  ax.set_yscale("log")
  ax.legend()
  save_figure(fig, path)


def main(argv=None) -> dict:
  p = parser(__doc__.split("\n")[0])
  p.add_argument("--rank", type=int, default=4, help="LoRA rank")
  p.add_argument("--width", type=int, default=64, help="model width")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument("--dropout", type=float, default=0.1,
                 help="dropout rate of the attention weights and after the MLP")
  p.add_argument("--pretrain-steps", type=int, default=600,
                 help="pretraining steps (batches of 32, upright digits, all weights)")
  p.add_argument("--lora-steps", type=int, default=400,
                 help="LoRA steps (batches of 32, mirrored digits, adapters only)")
  p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
  args = p.parse_args(argv)
  if args.fast:
    args.width, args.pretrain_steps, args.lora_steps = 32, 150, 100

  x_tr, x_te, y_tr, y_te = load_data(args.seed)
  print(f"digits: {len(y_tr)} training and {len(y_te)} test images, 8 rows of 8 pixels each")

  # The model and its state: weights (nnx.Param) apart from the RNG state.
  model = Classifier(args.width, args.heads, args.dropout,
                     nnx.Rngs(params=args.seed, dropout=args.seed + 1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = make_forward(graphdef)
  predict = jax.jit(make_predict(graphdef))
  predict_lora = jax.jit(lj.lora(make_predict(graphdef)))
  accuracy = lambda p, x: float(np.mean(np.asarray(predict(p, rest, x)).argmax(-1) == y_te))

  # 1. Pretrain every weight on upright digits.
  tx = optax.adam(args.lr)
  params, rest, pre_losses = train(
      make_step(forward, tx), params, rest, tx.init(params), (x_tr, y_tr),
      args.pretrain_steps, np.random.default_rng(args.seed), "pretrain", args.quiet)

  # 2. LoRA on every nnx.Linear kernel; only the adapters train, dropout on.
  config = lj.LoraConfig(rank=args.rank, alpha=2 * args.rank,
                         targets=r".*(embed|attn/.*|up|down|head)/kernel")
  x_probe = x_tr[:1]
  lparams = lj.lora_init(jax.random.key(args.seed + 2), params, config,
                         trace=lambda p: forward(p, rest, x_probe)[0])
  print(lj.summary(lparams))
  apply = lj.lora(forward)
  trainable, frozen = lj.split(lparams)  # A, B | the frozen weights (an input of the step)
  tx = optax.adam(args.lr)                # plain optax on the trainable half
  lora_step = lj.train_step(make_loss(apply), tx, has_aux=True)

  def step(t, rest, opt_state, x, y):
    t, opt_state, (loss, rest) = lora_step(t, opt_state, frozen, rest, x, y)
    return t, rest, opt_state, loss
  count_before = rng_count(rest)
  trainable, rest, lora_losses = train(
      step, trainable, rest, tx.init(trainable), (mirror(x_tr), y_tr),
      args.lora_steps, np.random.default_rng(args.seed + 3), "LoRA (mirrored digits)",
      args.quiet)
  lparams = lj.combine(trainable, frozen)
  count_after = rng_count(rest)

  # 3. Merge, save, load.
  merged = lj.merge(lparams)
  path = lj.save_adapter(os.path.join(args.out, "nnx_adapter"), lparams, config=config,
                         overwrite=True)
  reloaded = lj.load_adapter(path, params)

  x_mirror = mirror(x_te)
  rows = [("pretrained", accuracy(params, x_te), accuracy(params, x_mirror)),
          (f"LoRA r={args.rank}, merged", accuracy(merged, x_te), accuracy(merged, x_mirror))]
  print("\ntest accuracy")
  print(table(("model", "upright digits", "mirrored digits"),
              [(n, f"{a:.3f}", f"{b:.3f}") for n, a, b in rows]))

  logits_lora = np.asarray(predict_lora(lparams, rest, x_mirror))
  logits_merged = np.asarray(predict(merged, rest, x_mirror))
  logits_reloaded = np.asarray(predict_lora(reloaded, rest, x_mirror))
  logits_off = np.asarray(predict(lj.base(lparams), rest, x_mirror))
  logits_orig = np.asarray(predict(params, rest, x_mirror))
  merged_diff = float(np.abs(logits_merged - logits_lora).max())
  checks = [
      (f"dropout was active while training: the dropout RNG counter went from "
       f"{count_before} to {count_after}", count_after > count_before),
      ("adapters off (lj.base): the pretrained model's logits",
       bool(np.array_equal(logits_off, logits_orig))),
      (f"merged (lj.merge) predicts like LoRA (max |logit diff| {merged_diff:.1e})",
       bool(np.array_equal(logits_merged.argmax(-1), logits_lora.argmax(-1)))),
      ("adapter saved with Orbax and loaded onto the base: the same logits",
       bool(np.array_equal(logits_reloaded, logits_lora))),
  ]
  print()
  for what, ok in checks:
    print(f"[{'ok' if ok else 'FAILED'}] {what}")

  png = figure_path(args.out, "nnx_lora_loss.png")
  plot(pre_losses, lora_losses, png)
  print(f"\nwrote {png} and the adapter checkpoint {path}")
  return dict(
      rows=rows, pre_losses=pre_losses, lora_losses=lora_losses,
      rng_count_before=count_before, rng_count_after=count_after,
      logits_lora=logits_lora, logits_merged=logits_merged, logits_reloaded=logits_reloaded,
      logits_off=logits_off, logits_orig=logits_orig, summary=lj.summary(lparams),
      checkpoint=path, png=png)


if __name__ == "__main__":
  main(sys.argv[1:])
