"""LoRA fine-tuning of a Flax Llama on a text, with resumable Orbax checkpoints.

What it does (default: a tiny random-init Llama, byte-level tokens, under a
minute on 2 CPU cores):

1. Base model. A tiny Llama (2 scanned layers, d=64, vocab 256 = bytes) is
   pretrained from random init, all weights trained, on the FIRST half of
   ``examples/data/alice_ch1.txt`` (the opening of "Alice's Adventures in
   Wonderland", public domain) and saved in Hugging Face format to
   ``<out>/base`` (``save_hf_llama``); a later run loads it from there.
   With ``--hf-dir`` a real Hugging Face Llama is loaded instead and not
   pretrained.
2. LoRA. Rank-8 adapters on every q/k/v/o/gate/up/down projection of the
   scanned stack (``lj.lora_init(..., trace=...)``, one adapter per layer), and
   only they train (``lj.train_step``, ``optax.adamw``) on the SECOND half of the
   text. Every ``--save-every`` steps an ``orbax.checkpoint.CheckpointManager``
   (``--max-to-keep``) saves the adapter (``lj.adapter_args``), the optimizer
   state, and the loss history. Stopped midway (Ctrl-C, a crash), the same
   command resumes from the latest step ("resumed from step K") and continues
   exactly as an uninterrupted run would (the batches are a function of the
   step); after a finished run, a larger ``--steps`` trains on.
3. Report. Greedy samples (``lora_jax.models.generate`` with ``lj.lora``)
   before and after, a table of losses, a PNG of the loss curves, and the
   adapter exported in PEFT format (``lora_jax.interop.peft``) for
   ``peft.PeftModel.from_pretrained`` on the base in ``<out>/base``.

What to expect: the tiny base memorises the first half (loss ~0.2 nats per
byte there, ~4.4 on the second half, which it never saw); the adapters, which
train 13% as many parameters as the model has (it is tiny), bring the second
half down to ~0.4 while the base weights stay bit-identical. The losses are
measured on the text the adapters train on (a few KB: this is learning, i.e.
memorising, a passage, not generalisation), and the adapted model loses much
of the first half (~0.2 -> ~2.7): adapters steer the whole model.

Run:  python examples/llama_lora.py                # stopped midway (Ctrl-C)? run it again: resumes
      python examples/llama_lora.py --steps 600    # after a full run: trains on to step 600
"""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import lora_jax as lj
from lora_jax.models import (Llama, LlamaConfig, generate, init_params, llama_name_map,
                             load_hf_llama, save_hf_llama)

from _common import Timer, figure_path, parser, progress, pyplot, save_figure, table

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "alice_ch1.txt")
TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


# --- data ----------------------------------------------------------------------

def read_text(path: str) -> str:
  """The text of ``path`` without its ``#`` header lines."""
  with open(path, encoding="utf-8") as f:
    return "".join(line for line in f if not line.startswith("#"))


def halves(text: str) -> tuple[str, str]:
  """Split at the paragraph break nearest the middle."""
  breaks = [i for i in range(len(text)) if text.startswith("\n\n", i)]
  cut = min(breaks, key=lambda i: abs(i - len(text) // 2)) + 2 if breaks else len(text) // 2
  return text[:cut], text[cut:]


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255."""

  name = "byte-level (ids 0-255)"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face tokenizer found next to the weights (``--hf-dir``)."""

  def __init__(self, directory: str):
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    self.tok = AutoTokenizer.from_pretrained(directory)
    self.name = f"{type(self.tok).__name__} from {directory}"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], np.int32)

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids])


def windows(tokens: np.ndarray, length: int) -> np.ndarray:
  """Non-overlapping ``(n, length + 1)`` windows (inputs and next-token targets)."""
  n = (len(tokens) - 1) // length
  return np.stack([tokens[k * length:k * length + length + 1] for k in range(n)])


def batch_at(tokens: np.ndarray, step: int, seed: int, phase: int, size: int,
             length: int) -> np.ndarray:
  """Random windows for ``step``: a pure function of the step, so a resumed
  run sees the same batches as an uninterrupted one."""
  rng = np.random.default_rng([seed, phase, step])
  starts = rng.integers(0, len(tokens) - length - 1, size)
  return np.stack([tokens[s:s + length + 1] for s in starts])


# --- model -------------------------------------------------------------------------

def tiny_config(fast: bool) -> LlamaConfig:
  width = 32 if fast else 64
  return LlamaConfig.tiny(vocab_size=256, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, scan_layers=True)


def make_loss(apply):
  """The next-token cross-entropy of ``apply(params, ids)``."""
  def loss_fn(params, batch):
    logits = apply(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
  return loss_fn


def make_step(apply, tx):
  """A jitted optimizer step on the next-token cross-entropy, every weight trained."""
  loss_fn = make_loss(apply)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def pretrain(apply, params, tokens, args):
  """Full fine-tuning of every weight (the base model's 'pretraining')."""
  tx = optax.adamw(args.pretrain_lr)
  step = make_step(apply, tx)
  opt_state, losses = tx.init(params), []
  bar = progress(range(args.pretrain_steps), "pretrain base (all weights)", args.quiet)
  for k in bar:
    batch = batch_at(tokens, k, args.seed, 0, args.batch_size, args.seq_len)
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  return params, losses


def base_model(args, text_a: str):
  """``(config, params, tokenizer, base_dir, pretrain_losses, note)``."""
  if args.hf_dir:
    config, params = load_hf_llama(args.hf_dir, scan_layers=True)
    found = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(args.hf_dir, f))]
    tokenizer = HFTokenizer(args.hf_dir) if found else ByteTokenizer()
    if not found and config.vocab_size < 256:
      raise ValueError(f"--hf-dir {args.hf_dir}: no tokenizer file ({TOKENIZER_FILES}) and "
                       f"vocab_size {config.vocab_size} < 256, so byte-level ids do not fit")
    return config, params, tokenizer, os.path.abspath(args.hf_dir), [], (
        f"loaded the Hugging Face Llama in {args.hf_dir} (not pretrained here)")
  config, tokenizer = tiny_config(args.fast), ByteTokenizer()
  base_dir = os.path.abspath(os.path.join(args.out, "base"))
  history = os.path.join(base_dir, "pretrain_losses.json")
  if os.path.exists(os.path.join(base_dir, "config.json")):
    config, params = load_hf_llama(base_dir, scan_layers=True)
    with open(history) as f:
      losses = json.load(f)
    return config, params, tokenizer, base_dir, losses, (
        f"loaded the tiny base pretrained by an earlier run from {base_dir}")
  model = Llama(config)
  apply = lambda p, ids: model.apply({"params": p}, ids)
  params = init_params(config, jax.random.key(args.seed))
  params, losses = pretrain(apply, params, tokenizer.encode(text_a), args)
  save_hf_llama(params, config, base_dir)
  with open(history, "w") as f:
    json.dump(losses, f)
  return config, params, tokenizer, base_dir, losses, (
      f"pretrained a random-init tiny Llama ({sum(x.size for x in jax.tree.leaves(params)):,} "
      f"params) for {args.pretrain_steps} steps, all weights, on the first half; saved to {base_dir}")


# --- checkpoints -------------------------------------------------------------------

def manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))


def save(mngr, step, lparams, opt_state, losses, config):
  """Adapter (lj.adapter_args) + optimizer state + loss history, one step."""
  mngr.save(step, args=ocp.args.Composite(
      **lj.adapter_args(lparams, config, step),
      opt_state=ocp.args.StandardSave(opt_state),
      # A copy: the save runs in the background while training appends to `losses`.
      history=ocp.args.JsonSave({"losses": list(losses)})))


def restore(mngr, params, opt_state_like):
  """``(step, lparams, opt_state, losses)`` from the latest step."""
  step = mngr.latest_step()
  lparams = lj.load_adapter(mngr, params, step=step)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state_like)
  items = mngr.restore(step, args=ocp.args.Composite(
      opt_state=ocp.args.StandardRestore(target), history=ocp.args.JsonRestore()))
  return step, lparams, items["opt_state"], list(items["history"]["losses"])


# --- report ------------------------------------------------------------------------

def samples(gen, params, tokenizer, prompts):
  """Decoded greedy continuations ``gen(params, ids)`` of equal-length prompts."""
  ids = np.asarray(gen(params, jnp.asarray(np.stack(prompts))))
  return [tokenizer.decode(row[len(p):]) for row, p in zip(ids, prompts)]


def report(pre_losses, losses, rank, evals, base_identical, prompts, before, after):
  """Print the loss tables and the greedy samples."""
  k = min(10, len(losses))
  rows = []
  if pre_losses:
    rows.append(("base, all weights (first half)", len(pre_losses),
                 f"{mean(pre_losses[:10]):.3f}", f"{mean(pre_losses[-10:]):.3f}"))
  rows.append((f"LoRA r={rank}, A/B only (second half)", len(losses),
               f"{mean(losses[:k]):.3f}", f"{mean(losses[-k:]):.3f}"))
  print("\ntraining loss, nats per token (mean of the first / last 10 steps)")
  print(table(("phase", "steps", "start", "end"), rows))
  print("\nevaluation loss on every window of each half")
  print(table(("model", "first half", "second half (LoRA's text)"),
              [("base (adapters off)", *(f"{x:.3f}" for x in evals["base"])),
               ("base + LoRA", *(f"{x:.3f}" for x in evals["lora"]))]))
  (ba, bb), (la, lb) = evals["base"], evals["lora"]
  print(f"LoRA took the loss on the text it trained on from {bb:.2f} to {lb:.2f}; on the "
        f"first half it went from {ba:.2f} to {la:.2f}. Base weights after training "
        f"(lj.base) bit-identical to the loaded base: {base_identical}.")
  print("\ngreedy samples (prompt | continuation)")
  for name, prompt, b, a in zip(("first half", "second half"), prompts, before, after):
    print(f"[{name}] prompt: {prompt!r}")
    print(f"    before: {b!r}")
    print(f"    after:  {a!r}")


def plot(pre_losses, lora_losses, resumed, path):
  plt = pyplot()
  fig, axes = plt.subplots(1, 2 if pre_losses else 1, figsize=(10 if pre_losses else 6, 3.6),
                           squeeze=False, sharey=True)
  axes = axes[0]
  if pre_losses:
    axes[0].plot(np.arange(1, len(pre_losses) + 1), pre_losses, lw=0.8)
    axes[0].set_title("base: all weights, first half")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("train loss (nats / token)")
  ax = axes[-1]
  ax.plot(np.arange(1, len(lora_losses) + 1), lora_losses, lw=0.8, color="C1")
  if resumed:
    ax.axvline(resumed, color="gray", ls="--", lw=0.8, label=f"resumed at step {resumed}")
    ax.legend()
  ax.set_title("LoRA (A, B only), second half")
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (nats / token)")
  save_figure(fig, path)


def export_peft(lparams, config, directory, base_dir):
  """PEFT export via lora_jax.interop.peft, when that module is installed."""
  try:
    from lora_jax.interop.peft import save_peft_adapter  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"\nPEFT export skipped: lora_jax.interop.peft.save_peft_adapter is not "
          f"available ({e}).")
    return None
  save_peft_adapter(directory, lparams, llama_name_map(config), base_model_name_or_path=base_dir)
  return directory


def evaluate(apply, models: dict, windows_a, windows_b) -> dict:
  """{name: (loss on the first half, loss on the second half)}, every window."""
  both = jnp.asarray(np.concatenate([windows_a, windows_b]))
  per_window = jax.jit(lambda p, w: optax.softmax_cross_entropy_with_integer_labels(
      apply(p, w[:, :-1]), w[:, 1:]).mean(-1))
  out = {}
  for name, params in models.items():
    losses = np.asarray(per_window(params, both))
    out[name] = (mean(losses[:len(windows_a)]), mean(losses[len(windows_a):]))
  return out


def adam_count(opt_state) -> int:
  """The step count held by the adam state (restored with the checkpoint)."""
  counts = [x for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
            if jax.tree_util.keystr(path).endswith(".count")]
  return int(max(counts)) if counts else -1


def mean(xs) -> float:
  return float(np.mean(xs)) if len(xs) else float("nan")


# --- main --------------------------------------------------------------------------

def make_parser():
  p = parser(__doc__.split("\n")[0], out=os.path.join("out", "llama_lora"),
             out_help="run directory: base/, checkpoints/ (a re-run resumes from them), "
                      "peft_adapter/, PNG")
  p.description = (
      "LoRA fine-tuning of the Flax Llama in lora_jax.models on a public-domain text, "
      "with resumable Orbax checkpoints. Byte-level tokens (ids 0-255) unless --hf-dir "
      "holds a tokenizer file (tokenizer.json or tokenizer.model), then that tokenizer "
      "(transformers.AutoTokenizer) is used. --out holds: base/ (the tiny pretrained "
      "base, Hugging Face format), checkpoints/ (Orbax CheckpointManager steps), "
      "peft_adapter/, llama_lora_loss.png.")
  p.add_argument("--steps", type=int, default=None,
                 help="total LoRA steps; a re-run with the same --out "
                      "resumes from its latest checkpoint and trains up to this step "
                      "(default: 300; 40 with --fast)")
  p.add_argument("--save-every", type=int, default=None,
                 help="checkpoint every N LoRA steps and at the last "
                      "(default: 50; 10 with --fast)")
  p.add_argument("--max-to-keep", type=int, default=3, help="checkpoint steps kept")
  p.add_argument("--pretrain-steps", type=int, default=400,
                 help="full fine-tuning steps of the tiny random-init base")
  p.add_argument("--hf-dir", default=None,
                 help="a local Hugging Face Llama directory (config.json + safetensors) "
                      "to adapt instead of the tiny base; its tokenizer is used if it "
                      "has tokenizer.json / tokenizer.model, else byte-level ids (default: none, "
                      "the tiny byte-level base trained here)")
  p.add_argument("--text", default=TEXT, help="UTF-8 text file ('#' lines skipped)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank")
  p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
  p.add_argument("--lr", type=float, default=5e-3, help="LoRA learning rate (adamw)")
  p.add_argument("--pretrain-lr", type=float, default=3e-3,
                 help="learning rate of the tiny base's pretraining (adamw)")
  p.add_argument("--batch-size", type=int, default=16, help="windows per step")
  p.add_argument("--seq-len", type=int, default=64, help="tokens per window")
  p.add_argument("--gen-tokens", type=int, default=80, help="tokens per greedy sample")
  return p


def require_safetensors() -> None:
  """The base is saved in Hugging Face format (safetensors): say how to get it."""
  if importlib.util.find_spec("safetensors") is None:
    raise SystemExit(
        "examples/llama_lora.py saves the base model in Hugging Face format, which needs "
        "the safetensors package (not installed). Install it with the example's extra: "
        "pip install -e \".[llama-example]\" (this also brings torch, transformers and "
        "peft, to load the exported adapter with PEFT), or just: pip install safetensors")


def main(argv=None) -> dict:
  args = make_parser().parse_args(argv)
  require_safetensors()
  if args.fast:
    args.pretrain_steps, args.seq_len, args.batch_size, args.gen_tokens = 150, 32, 8, 24
  if args.steps is None:
    args.steps = 40 if args.fast else 300
  if args.save_every is None:
    args.save_every = 10 if args.fast else 50
  os.makedirs(args.out, exist_ok=True)
  text_a, text_b = halves(read_text(args.text))

  with Timer() as t_base:
    config, params, tokenizer, base_dir, pre_losses, note = base_model(args, text_a)
  print(f"base: {note}")
  print(f"tokens: {tokenizer.name}")
  tok_a, tok_b = tokenizer.encode(text_a), tokenizer.encode(text_b)
  model = Llama(config)
  apply = lambda p, ids: model.apply({"params": p}, ids)
  lora_apply = lj.lora(apply)

  # LoRA on every projection of the scanned stack: the trace reads each
  # kernel's roles ("sio": layers, in, out) from how the model uses it.
  lconfig = lj.LoraConfig(rank=args.rank, alpha=args.alpha, targets=TARGETS)
  probe = jnp.zeros((1, 8), jnp.int32)
  lparams = lj.lora_init(jax.random.key(args.seed + 1), params, lconfig,
                         trace=lambda p: apply(p, probe))
  print(lj.summary(lparams).line())
  trainable, frozen = lj.split(lparams)  # A, B | base weights: an input of the step only
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; lparams0 keeps its own
  tx = optax.adamw(args.lr)               # plain optax on the trainable half
  opt_state = tx.init(trainable)
  step_fn = lj.train_step(make_loss(lora_apply), tx)
  lparams0 = lparams  # B = 0: exactly the base model (kept for "before" figures)

  n = min(args.seq_len // 2, 24)
  prompts = [tok_a[:n], tok_b[:n]]
  gen = jax.jit(lambda p, ids: generate(lora_apply, p, ids, args.gen_tokens))
  before = samples(gen, lparams, tokenizer, prompts)  # B = 0: the base model's

  mngr = manager(os.path.join(args.out, "checkpoints"), args.max_to_keep)
  start, losses, resumed = 0, [], mngr.latest_step() is not None
  if resumed:
    start, lparams, opt_state, losses = restore(mngr, params, opt_state)
    trainable, frozen = lj.split(lparams)
    print(f"resumed from step {start}")
  if start >= args.steps:
    print(f"the checkpoint in {mngr.directory} is at step {start}, and --steps is "
          f"{args.steps}: nothing left to train. To train on, pass a larger --steps "
          f"(e.g. --steps {start + args.steps}); to start over, use another --out.")

  with Timer() as t_lora:
    bar = progress(range(start + 1, args.steps + 1), "LoRA (A, B only)", args.quiet,
                   total=max(args.steps - start, 0))
    try:
      for k in bar:
        batch = batch_at(tok_b, k, args.seed, 1, args.batch_size, args.seq_len)
        trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if k % args.save_every == 0 or k == args.steps:
          save(mngr, k, lj.combine(trainable, frozen), opt_state, losses, lconfig)
    except KeyboardInterrupt:
      mngr.wait_until_finished()  # a save in flight completes
      bar.close()
      raise SystemExit(
          f"\ninterrupted at step {len(losses)}; the latest checkpoint is step "
          f"{mngr.latest_step()} in {mngr.directory}. Run the same command again "
          f"to resume from it.") from None
    mngr.wait_until_finished()
  lparams = lj.combine(trainable, frozen)
  steps_kept = list(mngr.all_steps())

  evals = evaluate(lora_apply, {"base": lparams0, "lora": lparams},
                   windows(tok_a, args.seq_len), windows(tok_b, args.seq_len))
  after = samples(gen, lparams, tokenizer, prompts)

  base_identical = all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(lj.base(lparams)), jax.tree.leaves(params)))
  report(pre_losses, losses, args.rank, evals, base_identical,
         [tokenizer.decode(p) for p in prompts], before, after)

  png = figure_path(args.out, "llama_lora_loss.png")
  plot(pre_losses, losses, start, png)
  peft_dir = export_peft(lparams, config, os.path.abspath(os.path.join(args.out, "peft_adapter")),
                         base_dir)
  print(f"\nLoRA: {len(losses)} steps in all, {max(args.steps - start, 0)} this run "
        f"({t_lora.seconds:.1f} s); base: {t_base.seconds:.1f} s")
  print(f"wrote {png}, checkpoints {mngr.directory} (steps {steps_kept})"
        + (f", PEFT adapter {peft_dir}" if peft_dir else ""))
  mngr.close()
  return dict(
      pretrain_losses=pre_losses, losses=losses, resumed_step=start if resumed else None,
      final_step=max(start, args.steps), optimizer_count=adam_count(opt_state), eval=evals,
      base_identical=base_identical,
      samples_before=before, samples_after=after, prompts=[tokenizer.decode(p) for p in prompts],
      checkpoints=str(mngr.directory), steps_kept=steps_kept, max_to_keep=args.max_to_keep,
      base_dir=base_dir, peft_dir=peft_dir, png=png, config=config, lora_config=lconfig,
      lparams=lparams, seq_len=args.seq_len)


if __name__ == "__main__":
  main(sys.argv[1:])
