"""``python -m bench.serving [--quick | --wide | --toy] [--out DIR]``: many adapters, one batch.

Throughput (tokens / s) of one batch of ``B`` rows whose rows use ``N``
distinct LoRA adapters (``lj.stack_adapters`` + ``adapter_ids``, row ``i``
uses adapter ``i mod N``), for N = 1, 4, 16, 64, on a scanned
``lora_jax.models.Llama`` with r=8 adapters on every q/k/v/o/gate/up/down
projection, in two phases:

* prefill: the ``(B, P)`` prompt into an empty KV cache (``B·P`` tokens);
* decode: one ``(B, 1)`` step against a cache holding the prompt (``B``
  tokens).

Contenders, all jitted and timed interleaved (``bench.measure.interleaved``;
throughputs are medians of per-round rates, and each ratio is the median
over rounds of the two contenders' rates in the same round):

* ``base``: the model without adapters;
* ``single``: one ordinary (unstacked) adapter for every row, ``lj.lora``;
* ``merged``: that adapter merged into W (``lj.merge``);
* ``mixed-N``: the stack of N adapters, ``adapter_ids`` per row, the
  strategy per kernel chosen by the cost model (``stack_strategy="auto"``);
* ``gather-N``, ``onehot-N``, ``segments-N``: the same with one strategy
  forced for every kernel (``lj.lora(fn, stack_strategy=...)``), so the
  crossovers between them are visible, and XLA's FLOPs and bytes of each;
* ``loop-N``: PEFT-style: the batch cut into N per-adapter sub-batches of
  ``B / N`` rows, each run through the single-adapter model in turn (one
  jitted call per sub-batch, as PEFT's ``adapter_names`` loop runs one
  sub-batch per adapter).

Also a kernel-level check of one concatenated matmul ``x·[W | A]`` (x read
once) against the two separate ``x·W`` and ``x·A`` the transform emits.

Writes ``serving-<mode>-<platform>.md`` and ``.json`` into ``--out``.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax._src import stack_strategies
from lora_jax.models import (Llama, LlamaConfig, generate, generate_cached, init_cache,
                             init_params)

from bench import measure
from bench.cli import HelpFormatter

TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"

MODES = {
    # d=128, 4 layers, batch 64 x 32-token prompts: a few minutes on 2 loaded cores
    "quick": dict(config=dict(vocab_size=512, hidden_size=128, intermediate_size=384,
                              num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256),
                  batch=64, prompt=32, rank=8, ns=(1, 4, 16, 64), rounds=25,
                  gen=dict(batch=4, prompt=32, new_tokens=(64, 256))),
    "full": dict(config=dict(vocab_size=1024, hidden_size=256, intermediate_size=768,
                             num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=512),
                 batch=64, prompt=64, rank=8, ns=(1, 4, 16, 64), rounds=9,
                 gen=dict(batch=4, prompt=32, new_tokens=(64, 256))),
    # LLM proportions (ff = 2.75 d, head 128): the batch's gathered factors,
    # B·r·(d_in + d_out), are 0.7-1x a kernel's d_in·d_out (5-8x in "quick";
    # 0.3-0.5x for an 8B model at B = 64, r = 16); minutes on 2 cores
    "wide": dict(config=dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                             num_hidden_layers=2, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=256),
                 batch=64, prompt=16, rank=8, ns=(1, 4, 16, 64), rounds=7,
                 gen=dict(batch=4, prompt=32, new_tokens=(64,))),
    # seconds: the smoke test
    "toy": dict(config={}, batch=2, prompt=4, rank=2, ns=(1, 2), rounds=1,
                gen=dict(batch=2, prompt=4, new_tokens=(4,))),
}


def adapters(params, model, n: int, rank: int, seed: int = 0):
  """``n`` adapters with random (nonzero) A and B on every projection."""
  trace = lambda p: model.apply({"params": p}, jnp.ones((1, 2), jnp.int32))
  out = []
  for k in range(n):
    lp = lj.lora_init(jax.random.key(seed + k), params,
                      lj.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS), trace=trace)
    rng = np.random.default_rng(seed + k)
    lp = jax.tree.map(lambda x: x.replace(b=jnp.asarray(
        rng.normal(0, 0.02, x.b.shape), x.b.dtype)) if isinstance(x, lj.LoraWeight) else x,
        lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
    out.append(lj.adapter(lp))
  return out


STRATEGIES = ("gather", "onehot", "segments")


def _phases(model, strategy: str = "auto"):
  """Jitted ``prefill(p, ids, cache, **kw)`` and ``decode(p, tok, cache, pos, **kw)``."""
  run = lj.lora(model.apply, stack_strategy=strategy)

  @jax.jit
  def prefill(p, ids, cache, adapter_ids=None):
    kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    logits, cache = run({"params": p}, ids, cache=cache, **kw)
    return logits[:, -1], cache

  @jax.jit
  def decode(p, tok, cache, positions, adapter_ids=None):
    kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    logits, cache = run({"params": p}, tok, cache=cache, positions=positions, **kw)
    return logits[:, -1], cache
  return prefill, decode


def measure_serving(mode: str, rounds: int | None = None, log=print) -> dict:
  m = MODES[mode]
  cfg = LlamaConfig(**m["config"], scan_layers=True)
  b, p, rank, ns = m["batch"], m["prompt"], m["rank"], m["ns"]
  rounds = rounds or m["rounds"]
  model = Llama(cfg)
  params = init_params(cfg, jax.random.key(0))
  ads = adapters(params, model, max(ns), rank)
  single = lj.attach(params, ads[0])
  merged = lj.merge(single)
  prefill, decode = _phases(model)
  prompt = jax.random.randint(jax.random.key(1), (b, p), 0, cfg.vocab_size)
  empty = init_cache(cfg, b, p + 8)
  _, filled = prefill(params, prompt, empty)        # a cache holding the prompt
  tok = prompt[:, -1:]
  pos = jnp.full((b, 1), p, jnp.int32)
  stacks = {n: lj.attach(params, lj.stack_adapters(ads[:n])) for n in ns}
  ids = {n: jnp.arange(b, dtype=jnp.int32) % n for n in ns}

  def sub(tree, rows):
    return jax.tree.map(lambda x: x[rows], tree)

  def loop(n, phase):
    """PEFT-style: one single-adapter call per adapter's sub-batch."""
    groups = [np.flatnonzero(np.asarray(ids[n]) == k) for k in range(n)]
    plist = [lj.attach(params, ads[k]) for k in range(n)]
    if phase == "prefill":
      parts = [(prompt[g], sub(empty, g)) for g in groups]
      return lambda: [prefill(pk, x, c) for pk, (x, c) in zip(plist, parts)]
    parts = [(tok[g], sub(filled, g), pos[g]) for g in groups]
    return lambda: [decode(pk, x, c, q) for pk, (x, c, q) in zip(plist, parts)]

  forced = {st: _phases(model, st) for st in STRATEGIES}
  choices = {}
  for n in ns:  # what the cost model picks, per kernel, while tracing "auto"
    with stack_strategies.recording() as log_p:
      prefill.lower(stacks[n], prompt, empty, ids[n])
    with stack_strategies.recording() as log_d:
      decode.lower(stacks[n], tok, filled, pos, ids[n])
    choices[n] = {"prefill": _summary(log_p), "decode": _summary(log_d)}

  calls = {
      "prefill": dict(base=lambda: prefill(params, prompt, empty),
                      single=lambda: prefill(single, prompt, empty),
                      merged=lambda: prefill(merged, prompt, empty)),
      "decode": dict(base=lambda: decode(params, tok, filled, pos),
                     single=lambda: decode(single, tok, filled, pos),
                     merged=lambda: decode(merged, tok, filled, pos)),
  }
  for n in ns:
    calls["prefill"][f"mixed-{n}"] = functools.partial(
        lambda n: prefill(stacks[n], prompt, empty, ids[n]), n)
    calls["decode"][f"mixed-{n}"] = functools.partial(
        lambda n: decode(stacks[n], tok, filled, pos, ids[n]), n)
    for st, (pf, dc) in forced.items():
      calls["prefill"][f"{st}-{n}"] = functools.partial(
          lambda n, pf: pf(stacks[n], prompt, empty, ids[n]), n, pf)
      calls["decode"][f"{st}-{n}"] = functools.partial(
          lambda n, dc: dc(stacks[n], tok, filled, pos, ids[n]), n, dc)
    if n > 1:
      calls["prefill"][f"loop-{n}"] = loop(n, "prefill")
      calls["decode"][f"loop-{n}"] = loop(n, "decode")

  out = {"mode": mode, "config": m["config"], "batch": b, "prompt": p, "rank": rank,
         "ns": list(ns), "rounds": rounds, "choices": choices, "phases": {}}
  for phase, steps in calls.items():
    t0 = time.perf_counter()
    times = measure.interleaved(steps, rounds)
    tokens = b * p if phase == "prefill" else b
    out["phases"][phase] = {name: {"tokens_per_s": _median_rate(tokens, t["times_s"]), **t}
                            for name, t in times.items()}
    log(f"{phase}: {len(steps)} contenders x {rounds} rounds in "
        f"{time.perf_counter() - t0:.0f} s")
  fns = {"prefill": (prefill, lambda *a: (prompt, empty) + a),
         "decode": (decode, lambda *a: (tok, filled, pos) + a)}
  for phase, (fn, args) in fns.items():
    cases = [("single", fn, (single,) + args())]
    for n in ns:
      cases.append((f"mixed-{n}", fn, (stacks[n],) + args(ids[n])))
      cases += [(f"{st}-{n}", forced[st][phase == "decode"], (stacks[n],) + args(ids[n]))
                for st in STRATEGIES]
    out[f"{phase}_cost"] = {name: cost(f.lower(*a).compile()) for name, f, a in cases}
  out["cached"] = cached_vs_uncached(model, params, m["gen"], max(3, rounds // 5))
  out["concat"] = concat_matmul(b * p, cfg.hidden_size, cfg.intermediate_size, rank, rounds)
  out["ratios"] = ratios(out)
  return out


def cached_vs_uncached(model, params, gen: dict, rounds: int) -> dict:
  """``generate_cached`` vs ``generate`` (no cache): time per call, same tokens."""
  b, p = gen["batch"], gen["prompt"]
  prompt = jax.random.randint(jax.random.key(4), (b, p), 0, model.config.vocab_size)
  cached = lambda q, ids, **kw: model.apply({"params": q}, ids, **kw)
  plain = lambda q, ids: model.apply({"params": q}, ids)
  make_cache = functools.partial(init_cache, model.config)
  out = {"batch": b, "prompt": p, "new_tokens": {}}
  for n in gen["new_tokens"]:
    run_plain = jax.jit(lambda q, ids, n=n: generate(plain, q, ids, n))
    run_cached = lambda n=n: generate_cached(cached, params, prompt, n, make_cache=make_cache)
    np.testing.assert_array_equal(run_cached(), run_plain(params, prompt))
    t = measure.interleaved({"cached": run_cached,
                             "uncached": lambda f=run_plain: f(params, prompt)}, rounds)
    out["new_tokens"][n] = {**t, "speedup": _per_round(t, "uncached", "cached")}
  return out


def cost(c) -> dict:
  """XLA's FLOPs and bytes accessed of a compiled program (deterministic)."""
  return {"flops": measure.flops(c), "bytes_accessed": measure.bytes_accessed(c)}


def concat_matmul(rows: int, d_in: int, d_out: int, rank: int, rounds: int) -> dict:
  """``x·W`` + ``(x·A)·B`` as two matmuls reading x twice vs one ``x·[W | A]``."""
  k = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(k[0], (rows, d_in))
  w = jax.random.normal(k[1], (d_in, d_out))
  a = jax.random.normal(k[2], (d_in, rank))
  bb = jax.random.normal(k[3], (rank, d_out))
  wa = jnp.concatenate([w, a], axis=1)          # built once, as a stored layout would be
  separate = jax.jit(lambda x: x @ w + (x @ a) @ bb)
  concat = jax.jit(lambda x: (lambda y: y[:, :d_out] + y[:, d_out:] @ bb)(x @ wa))
  np.testing.assert_allclose(separate(x), concat(x), rtol=2e-4, atol=2e-3)
  t = measure.interleaved({"separate": lambda: separate(x), "concat": lambda: concat(x)},
                          max(rounds, 5) * 3)
  return {"shape": [rows, d_in, d_out, rank], **t,
          "concat_over_separate": _per_round(t, "concat", "separate")}


def _per_round(t: dict, a: str, b: str) -> float:
  """The median over rounds of ``time(a) / time(b)`` measured in the same round."""
  return float(np.median(np.asarray(t[a]["times_s"]) / np.asarray(t[b]["times_s"])))


def _summary(log: list) -> dict:
  """``{strategy: number of kernels}`` from a ``stack_strategies.recording`` log."""
  out = {}
  for c in log:
    out[c["strategy"]] = out.get(c["strategy"], 0) + 1
  return out


def _median_rate(tokens: int, times_s: list) -> float:
  """The median of the per-round rates (tokens / s of each round)."""
  return float(np.median([tokens / t for t in times_s]))


def ratios(out: dict) -> dict:
  """Throughput ratios (higher is better for the first-named contender), each
  the median over rounds of the two rates measured in the same round."""
  r = {}
  for phase, res in out["phases"].items():
    thr = lambda a, b: float(np.median(np.asarray(res[b]["times_s"])
                                       / np.asarray(res[a]["times_s"])))
    for n in out["ns"]:
      r[f"{phase}: mixed-{n} / single"] = thr(f"mixed-{n}", "single")
      r[f"{phase}: mixed-{n} / base"] = thr(f"mixed-{n}", "base")
      r[f"{phase}: mixed-{n} / gather-{n}"] = thr(f"mixed-{n}", f"gather-{n}")
      for st in STRATEGIES:
        r[f"{phase}: {st}-{n} / single"] = thr(f"{st}-{n}", "single")
      if n > 1:
        r[f"{phase}: mixed-{n} / loop-{n}"] = thr(f"mixed-{n}", f"loop-{n}")
    r[f"{phase}: single / base"] = thr("single", "base")
    r[f"{phase}: unmerged single / merged (time)"] = thr("merged", "single")
  return r


def goals(ns) -> list[tuple[str, float]]:
  """``(ratio name, target)``: issue 19's decode and prefill goals.

  Decode with N distinct adapters / one unstacked adapter: >= 0.95 at N = 1,
  >= 0.90 at N <= 4, >= 0.85 at N = 16, never below gather at N = 64;
  prefill >= 0.90 at N = 16 (the largest N in toy mode).
  """
  big = 16 if 16 in ns else max(ns)
  out = []
  for n in ns:
    if n == 1:
      out.append((f"decode: mixed-{n} / single", 0.95))
    elif n <= 4:
      out.append((f"decode: mixed-{n} / single", 0.90))
    elif n == 16:
      out.append((f"decode: mixed-{n} / single", 0.85))
    else:
      out.append((f"decode: mixed-{n} / gather-{n}", 1.0))
  out.append((f"prefill: mixed-{big} / single", 0.90))
  return out


def markdown(out: dict, machine: dict) -> str:
  cfg = out["config"]
  lines = [f"Serving many adapters in one batch ({out['mode']}): scanned Llama "
           f"d={cfg.get('hidden_size', 32)}, {cfg.get('num_hidden_layers', 2)} layers, "
           f"batch {out['batch']} x {out['prompt']}-token prompts, r={out['rank']} on every "
           f"projection; {machine['platform']} / {machine['device_kind']}, "
           f"{machine['cpu_count']} CPUs (shared, loaded), jax {machine['jax']}; load "
           f"before / after: {out.get('load', '?')}; medians of per-round rates over "
           f"{out['rounds']} interleaved rounds. Throughput in tokens / s "
           "(prefill: B·P tokens per call; decode: B tokens per step).", "",
           "| contender | prefill tok/s | decode tok/s |", "| --- | ---: | ---: |"]
  ph = out["phases"]
  for name in ph["prefill"]:
    lines.append(f"| {name} | {ph['prefill'][name]['tokens_per_s']:,.0f} | "
                 f"{ph['decode'][name]['tokens_per_s']:,.0f} |")
  lines += ["", "| ratio (throughput) | value |", "| --- | ---: |"]
  lines += [f"| {k} | {v:.2f} |" for k, v in out["ratios"].items()]
  lines += ["", "| goal | target | value | met |", "| --- | ---: | ---: | --- |"]
  for name, target in goals(out["ns"]):
    v = out["ratios"][name]
    lines.append(f"| {name} | >= {target} | {v:.3f} | {'yes' if v >= target else 'no'} |")
  lines += ["", "Per strategy: time per call (ms, median) and throughput relative to the "
            "single adapter (median of per-round ratios); `auto` is the cost model's "
            "choice (kernels per strategy).", "",
            "| phase | N | auto chose | auto | gather | onehot | segments |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
  for phase in ("prefill", "decode"):
    for n in out["ns"]:
      cell = lambda name: (f"{ph[phase][name]['median_s'] * 1e3:.2f} ms "
                           f"({out['ratios'][f'{phase}: {name} / single']:.2f})")
      chose = ", ".join(f"{k}×{v}" for k, v in out["choices"][n][phase].items())
      lines.append(f"| {phase} | {n} | {chose} | {cell(f'mixed-{n}')} | "
                   + " | ".join(cell(f"{st}-{n}") for st in STRATEGIES) + " |")
  for phase in ("prefill", "decode"):
    lines += ["", f"XLA cost analysis of one {phase} call (deterministic): FLOPs and bytes "
              "accessed relative to the single (unstacked) adapter's.", "",
              f"| {phase} | FLOPs | bytes accessed |", "| --- | ---: | ---: |"]
    dc = out[f"{phase}_cost"]
    for name, c in dc.items():
      lines.append(f"| {name} | {c['flops'] / dc['single']['flops']:.3f} | "
                   f"{c['bytes_accessed'] / dc['single']['bytes_accessed']:.3f} |")
  g = out["cached"]
  lines += ["", f"KV-cached generation (`generate_cached`) vs `generate` without a cache, "
            f"batch {g['batch']}, {g['prompt']}-token prompt, same tokens (checked): "
            + "; ".join(f"{n} new tokens {r['speedup']:.1f}x faster "
                        f"({r['cached']['median_s'] * 1e3:.0f} ms vs "
                        f"{r['uncached']['median_s'] * 1e3:.0f} ms)"
                        for n, r in g["new_tokens"].items()) + "."]
  c = out["concat"]
  rows, d_in, d_out, rank = c["shape"]
  lines += ["", f"One concatenated matmul x·[W | A] vs x·W and x·A separately "
            f"(x {rows}x{d_in}, W {d_in}x{d_out}, r={rank}): concat / separate time = "
            f"{c['concat_over_separate']:.2f} (median {c['concat']['median_s'] * 1e3:.2f} ms "
            f"vs {c['separate']['median_s'] * 1e3:.2f} ms)."]
  return "\n".join(lines) + "\n"


def _load() -> str:
  try:
    return f"{os.getloadavg()[0]:.1f}"
  except OSError:
    return "?"


def parse(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                              formatter_class=HelpFormatter)
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                    help="d=128, 4 layers, batch 64 x 32 tokens: minutes on 2 CPU cores")
  mode.add_argument("--wide", action="store_const", dest="mode", const="wide",
                    help="d=1024, 2 layers, batch 64 x 16 tokens (LLM proportions)")
  mode.add_argument("--toy", action="store_const", dest="mode", const="toy",
                    help="toy sizes, seconds (the smoke test)")
  p.set_defaults(mode="full")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per contender (default: the mode's: 25 quick, 9 full, 7 wide, 1 toy)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                 help="folder for the .md and .json (default: bench/results)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse(argv)
  machine = measure.machine()
  t0 = time.perf_counter()
  load0 = _load()
  out = measure_serving(args.mode, args.rounds,
                        log=lambda s: print(f"{time.perf_counter() - t0:6.1f}s {s}",
                                            file=sys.stderr, flush=True))
  out["load"] = f"{load0} / {_load()} (1-min load average)"
  md = markdown(out, machine)
  print(md)
  os.makedirs(args.out, exist_ok=True)
  cpus = f"-{machine['cpu_count']}core" if machine["platform"] == "cpu" else ""
  base = os.path.join(args.out, f"serving-{args.mode}-{machine['platform']}{cpus}")
  with open(base + ".md", "w") as f:
    f.write(md)
  with open(base + ".json", "w") as f:
    json.dump({"machine": machine, **out}, f, indent=1)
  print(f"wrote {base}.md and .json in {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
