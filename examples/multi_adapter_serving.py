"""Serve four LoRA adapters, and the base, in one batch of a byte-level Llama.

What it does (default: under ~2 minutes on 2 CPU cores; ``--fast``: seconds):

1. Base. The tiny byte-level Llama of ``examples/llama_lora.py`` (2 scanned
   layers, d=64, vocab 256 = bytes) is trained from random init, all
   weights, to echo a word: lines ``"rabbit>rabbit\\n"`` for the lowercase
   words of ``examples/data/alice_ch1.txt``.
2. Adapters. Four rank-8 adapters on every q/k/v/o/gate/up/down projection,
   each trained (A, B only) on its own task over the same format:
   ``upper`` (``rabbit>RABBIT``), ``reverse`` (``rabbit>tibbar``), ``twice``
   (``rabbit>rabbitrabbit``) and ``dashes`` (``rabbit>r-a-b-b-i-t``).
3. Serving. ``lj.stack_adapters`` puts the four into one stack; ONE batch
   whose rows name their adapter (``adapter_ids``; ``-1``: the base alone)
   runs through ``lora_jax.models.generate_cached`` (KV cache, greedy,
   compiled once). Each row's tokens are checked against that adapter run
   alone, and printed as a table (adapter, prompt, output). The served
   words are held out of training (five-letter words, so every prompt has
   the same length): what a tiny model trained for seconds makes of a word
   it never saw.
4. Throughput. Generated tokens / s (one prefill, then one decode step per
   new token) of a batch whose rows use 1, 2 or 4 distinct adapters (and of
   the base alone, and of one ordinary adapter): each round times every
   contender once, interleaved, and gives it a rate; the median of those
   per-round rates is printed and plotted to ``<out>/multi_adapter_serving.png``.
   The per-row factors are gathered (``x·A[id]``, then ``·B[id]``): the
   work does not grow with the number of distinct adapters.

Run:  python examples/multi_adapter_serving.py
      python examples/multi_adapter_serving.py --fast    # seconds (the test uses it)
"""

import functools
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj
from lora_jax.models import Llama, generate_cached, init_cache, init_params

from _common import Timer, figure_path, parser, progress, pyplot, save_figure, table
from llama_lora import (TARGETS, TEXT, ByteTokenizer, make_loss, make_step, read_text,
                        tiny_config)

TASKS = {
    "upper": str.upper,
    "reverse": lambda w: w[::-1],
    "twice": lambda w: w + w,
    "dashes": lambda w: "-".join(w),
}
SERVE_LEN = 5       # served (held-out) words have this many letters
NEWLINE = ord("\n")


# --- data ----------------------------------------------------------------------

def split_words(text: str, seed: int, n_serve: int) -> tuple[list[str], list[str]]:
  """``(train words, served words)``: lowercase words of 3-7 letters; the served
  ones (``SERVE_LEN`` letters) are held out of training."""
  words = sorted(set(re.findall(r"\b[a-z]{3,7}\b", text)))
  rng = np.random.default_rng(seed)
  five = [w for w in words if len(w) == SERVE_LEN]
  served = [five[i] for i in rng.choice(len(five), n_serve, replace=False)]
  return [w for w in words if w not in served], served


def line(word: str, fn) -> str:
  return f"{word}>{fn(word)}\n"


def task_batch(words, fn, rng: np.random.Generator, size: int, length: int) -> np.ndarray:
  """``(size, length + 1)`` byte windows of concatenated task lines, each row
  starting at a line start."""
  tok = ByteTokenizer()
  rows = []
  for _ in range(size):
    text = "\n"
    while len(text) < length + 1:
      text += line(words[rng.integers(len(words))], fn)
    rows.append(tok.encode(text[:length + 1]))
  return np.stack(rows)


def prompt_ids(word: str) -> np.ndarray:
  return ByteTokenizer().encode(f"\n{word}>")


# --- training ------------------------------------------------------------------------

def train(step, params, tx, words, fn, steps, args, desc, seed):
  """``steps`` of ``step`` (``make_step``) on one task; ``(params, losses)``."""
  opt_state, losses = tx.init(params), []
  rng = np.random.default_rng(seed)
  bar = progress(range(steps), desc, args.quiet)
  for _ in bar:
    batch = task_batch(words, fn, rng, args.batch_size, args.seq_len)
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
  return params, losses


def train_adapters(model, params, words, args) -> tuple[dict, dict]:
  """``({task: adapter}, {task: losses})``: one LoRA adapter per task."""
  apply = lambda p, ids: model.apply({"params": p}, ids)
  lconfig = lj.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
  probe = jnp.zeros((1, 8), jnp.int32)
  tx = optax.adamw(args.lr)  # plain optax on the trainable half (A, B)
  lora_step = lj.train_step(make_loss(lj.lora(apply)), tx)  # one compiled step for all four
  adapters, losses = {}, {}
  for k, (name, fn) in enumerate(TASKS.items()):
    lparams = lj.lora_init(jax.random.key(args.seed + 10 + k), params, lconfig,
                           trace=lambda p: apply(p, probe))
    trainable, frozen = lj.split(lparams)  # the base: an input of the step only
    step = lambda t, opt_state, batch, frozen=frozen: lora_step(t, opt_state, frozen, batch)
    trainable, losses[name] = train(step, trainable, tx, words, fn, args.steps, args,
                                    f"adapter {name!r} (A, B only)", args.seed + 100 + k)
    adapters[name] = lj.adapter(lj.combine(trainable, frozen))
  return adapters, losses


# --- serving -------------------------------------------------------------------------

def serve(apply, params, prompts, ids, new_tokens, make_cache):
  """Greedy continuations of a batch; row i uses adapter ``ids[i]`` (-1: base)."""
  kw = {} if ids is None else {"adapter_ids": jnp.asarray(ids, jnp.int32)}
  return np.asarray(generate_cached(apply, params, jnp.asarray(prompts), new_tokens,
                                    make_cache=make_cache, **kw))


def until_newline(ids) -> str:
  ids = list(ids)
  ids = ids[:ids.index(NEWLINE)] if NEWLINE in ids else ids
  return ByteTokenizer().decode(ids)


def mixed_batch(apply, params, stack, names, words, ids, new_tokens, make_cache):
  """Serve one mixed batch; compare every row with its adapter run alone."""
  prompts = np.stack([prompt_ids(w) for w in words])
  mixed = serve(apply, lj.attach(params, stack), prompts, ids, new_tokens, make_cache)
  members = lj.unstack_adapters(stack)
  rows = []
  for i, (word, k) in enumerate(zip(words, ids)):
    p = params if k == -1 else lj.attach(params, members[names[k]])
    alone = serve(apply, p, prompts[i:i + 1], None, new_tokens, make_cache)[0]
    rows.append(dict(adapter="base" if k == -1 else names[k], id=int(k), prompt=f"{word}>",
                     output=until_newline(mixed[i, prompts.shape[1]:]),
                     expected=TASKS[names[k]](word) if k != -1 else word,
                     tokens=mixed[i], alone=alone,
                     same_as_alone=bool(np.array_equal(mixed[i], alone))))
  return rows


def throughput(apply, params, stack, adapters, args, make_cache, words) -> dict:
  """Generated tokens / s for 1, 2, 4 distinct adapters in the batch (and base, single).

  Each round times one ``generate_cached`` call (prefill + N new tokens) per
  contender, interleaved; its rate is batch × N / that time. The median of the
  per-round rates is returned: every rate is a positive number of tokens over a
  measured time (no difference of two timings, which load can drive to zero).
  """
  b, n = args.serve_batch, args.serve_tokens
  prompts = jnp.asarray(np.stack([prompt_ids(words[i % len(words)]) for i in range(b)]))
  names = list(adapters)
  contenders = {"base model": (params, None),
                "one adapter (unstacked)": (lj.attach(params, adapters[names[0]]), None)}
  for d in (1, 2, 4):
    contenders[f"{d} distinct"] = (
        lj.attach(params, stack), jnp.arange(b, dtype=jnp.int32) % d)

  def run(name, tokens):
    p, ids = contenders[name]
    kw = {} if ids is None else {"adapter_ids": ids}
    return generate_cached(apply, p, prompts, tokens, make_cache=make_cache, **kw)

  rates = {c: [] for c in contenders}
  for c in contenders:  # compile
    jax.block_until_ready(run(c, n))
  keys = list(rates)
  for r in progress(range(args.rounds), "throughput rounds", args.quiet):
    for c in keys[r % len(keys):] + keys[:r % len(keys)]:
      t0 = time.perf_counter()
      jax.block_until_ready(run(c, n))
      rates[c].append(b * n / (time.perf_counter() - t0))
  return {c: float(np.median(v)) for c, v in rates.items()}


def plot(tps: dict, batch: int, path: str) -> None:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  xs = [1, 2, 4]
  ax.plot(xs, [tps[f"{d} distinct"] for d in xs], "o-", label="stack, adapter_ids")
  ax.axhline(tps["base model"], color="gray", ls="--", lw=0.8, label="base model")
  ax.axhline(tps["one adapter (unstacked)"], color="C1", ls=":", lw=1.0,
             label="one adapter (unstacked)")
  ax.set_xticks(xs)
  ax.set_ylim(0, None)
  ax.set_xlabel("distinct adapters in the batch")
  ax.set_ylabel("generated tokens / s")
  ax.set_title(f"one batch of {batch} rows, KV-cached greedy generation")
  ax.legend(loc="lower right")
  save_figure(fig, path)


# --- main ------------------------------------------------------------------------

def make_parser():
  p = parser(__doc__.split("\n")[0], out="out",
             out_help="directory for multi_adapter_serving.png")
  p.add_argument("--pretrain-steps", type=int, default=None,
                 help="steps of the base's (all weights) echo training "
                      "(default: 800; 120 with --fast)")
  p.add_argument("--steps", type=int, default=None,
                 help="LoRA steps per adapter (default: 300; 40 with --fast)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
  p.add_argument("--lr", type=float, default=1e-2, help="LoRA learning rate (adamw)")
  p.add_argument("--pretrain-lr", type=float, default=3e-3,
                 help="learning rate of the base's training (adamw)")
  p.add_argument("--batch-size", type=int, default=16, help="training windows per step")
  p.add_argument("--seq-len", type=int, default=48, help="tokens per training window")
  p.add_argument("--serve-batch", type=int, default=32,
                 help="rows of the batch timed for the throughput plot (8 with --fast)")
  p.add_argument("--serve-tokens", type=int, default=32,
                 help="new tokens per row in the throughput runs (6 with --fast)")
  p.add_argument("--rounds", type=int, default=5,
                 help="timed rounds per throughput figure (medians; 3 with --fast)")
  return p


def main(argv=None) -> dict:
  args = make_parser().parse_args(argv)
  if args.pretrain_steps is None:
    args.pretrain_steps = 120 if args.fast else 800
  if args.steps is None:
    args.steps = 40 if args.fast else 300
  if args.fast:
    args.serve_batch, args.serve_tokens, args.rounds = 8, 6, 3
  words, served = split_words(read_text(TEXT), args.seed, 8)
  config = tiny_config(args.fast)
  model = Llama(config)
  apply = lambda p, ids: model.apply({"params": p}, ids)

  with Timer() as t_train:
    params = init_params(config, jax.random.key(args.seed))
    tx = optax.adamw(args.pretrain_lr)
    params, base_losses = train(make_step(apply, tx), params, tx, words,
                                lambda w: w, args.pretrain_steps, args,
                                "base: echo (all weights)", args.seed)
    adapters, losses = train_adapters(model, params, words, args)
  names = list(adapters)
  stack = lj.stack_adapters([adapters[n] for n in names], names=names)

  run = lj.lora(model.apply)
  cached = lambda p, ids, **kw: run({"params": p}, ids, **kw)
  make_cache = functools.partial(init_cache, config)
  ids = [0, 1, 2, 3, -1, 2, 0, 3]
  new_tokens = 2 * SERVE_LEN + 2
  rows = mixed_batch(cached, params, stack, names, served, ids, new_tokens, make_cache)
  print(f"\none batch, {len(rows)} rows, {len(names)} adapters + the base "
        f"(adapter_ids={ids}); held-out words, greedy:")
  print(table(("row", "adapter", "prompt", "output", "task's answer", "= alone"),
              [(i, r["adapter"], r["prompt"], r["output"], r["expected"],
                "yes" if r["same_as_alone"] else "NO") for i, r in enumerate(rows)]))

  with Timer() as t_thr:
    tps = throughput(cached, params, stack, adapters, args, make_cache, served)
  print(f"\ngeneration throughput, batch of {args.serve_batch} rows, {args.serve_tokens} new "
        f"tokens each, one prefill + decode (tokens / s; median of {args.rounds} rounds' "
        "rates; a shared CPU, so noisy):")
  print(table(("batch", "tokens / s"), [(k, f"{v:,.0f}") for k, v in tps.items()]))
  png = figure_path(args.out, "multi_adapter_serving.png")
  plot(tps, args.serve_batch, png)
  print(f"\ntrained in {t_train.seconds:.1f} s, timed in {t_thr.seconds:.1f} s; wrote {png}")
  return dict(rows=rows, ids=ids, names=names, served=served, throughput=tps, png=png,
              base_losses=base_losses, losses=losses, config=config)


if __name__ == "__main__":
  main(sys.argv[1:])
