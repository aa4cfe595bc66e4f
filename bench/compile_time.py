"""``python -m bench.compile_time``: what ``lora()`` adds to trace and compile time.

A decoder of ``--layers`` blocks (d = ``--d``, 4 heads, MLP ``2d``), written
in plain JAX, with LoRA rank ``--rank`` on q, k, v, o, up and down. Four
programs, each as ``jit(f)`` and as ``jit(lora(f))``:

* forward, unscanned (a Python loop over per-layer params) and scanned
  (``lax.scan`` over params stacked on a layer axis);
* train step (loss, grad, SGD update) of the same two: the full-parameter
  step for ``f``, the adapter-only step (``lj.split`` / ``lj.combine``) for
  ``lora(f)``.

A third program per row is the same model with LoRA written into its code
by hand (``x·stop_gradient(W) + s·(x·A)·B``, adapter-only step): the floor
for any factored LoRA, since it has the same extra matmuls; ``lora(f) ÷
hand`` is what the transform itself costs.

Each figure is the minimum over ``--reps`` rounds; within a round the plain
and the LoRA program are measured back to back, so both see the same machine
load. Every round builds new Python functions and a new ``jax.jit``, so no
trace or compile cache is reused. Trace is ``jit(...).trace(...)`` (for
``lora(f)`` it includes the interpreter); compile is ``.lower().compile()``.
``lora_init``'s trace is the time of ``lora_init(..., trace=...)`` (layout
inference by an abstract trace) minus ``lora_init`` with the layouts given.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp

import lora_jax as lj
from bench.cli import HelpFormatter

TARGETS = r".*(wq|wk|wv|wo|up|down)"
NAMES = ("wq", "wk", "wv", "wo", "up", "down")


def _params(key, layers, d, stacked):
  shapes = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d),
            "up": (d, 2 * d), "down": (2 * d, d)}
  keys = iter(jax.random.split(key, layers * len(shapes) + 1))

  def layer():
    out = {n: jax.random.normal(next(keys), s) / (s[0] ** 0.5) for n, s in shapes.items()}
    out["norm"] = jnp.ones((d,))
    return out
  per_layer = [layer() for _ in range(layers)]
  if stacked:
    return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}
  return {f"layer_{i}": p for i, p in enumerate(per_layer)}


def _mm(h, w, scale):
  """``h @ w``; for a hand-written LoRA (``w`` a dict) ``h·W + s·(h·A)·B``."""
  if not isinstance(w, dict):
    return h @ w
  return h @ jax.lax.stop_gradient(w["w"]) + ((h @ w["a"]) * scale) @ w["b"]


def _block(p, x, heads=4, scale=1.0):
  b, t, d = x.shape
  mm = lambda h, n: _mm(h, p[n], scale)
  h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["norm"][None, None]
  q, k, v = (jnp.reshape(mm(h, n), (b, t, heads, d // heads)) for n in ("wq", "wk", "wv"))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // heads) ** 0.5
  a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
  x = x + mm(a, "wo")
  return x + mm(jax.nn.gelu(mm(x, "up")), "down")


def _is_lw(n):
  return isinstance(n, lj.LoraWeight)


def hand_split(lparams):
  """The hand-written LoRA's params: (trainable (A, B) pairs, the rest)."""
  ab = jax.tree.map(lambda n: (n.a, n.b) if _is_lw(n) else None, lparams, is_leaf=_is_lw)
  rest = jax.tree.map(lambda n: n.w if _is_lw(n) else n, lparams, is_leaf=_is_lw)
  return ab, rest


def hand_combine(ab, rest):
  return jax.tree.map(lambda t, w: w if t is None else {"w": w, "a": t[0], "b": t[1]},
                      ab, rest, is_leaf=lambda t: t is None or isinstance(t, tuple))


def make_forward(stacked):
  """A new forward function (fresh Python objects: no cache is shared)."""
  if stacked:
    def forward(params, x):
      return jax.lax.scan(lambda x, p: (_block(p, x), None), x, params["layers"])[0]
  else:
    def forward(params, x):
      for name in sorted(params, key=lambda n: int(n.split("_")[1])):
        x = _block(params[name], x)
      return x
  return forward


def make_step(stacked, lora):
  forward = make_forward(stacked)
  if lora == "hand":
    def step(ab, rest, x):
      g = jax.grad(lambda t: jnp.mean(forward(hand_combine(t, rest), x) ** 2))(ab)
      return jax.tree.map(lambda p, g: p - 1e-3 * g, ab, g)
  elif lora:
    fwd = lj.lora(forward)

    def step(trainable, frozen, x):
      def loss(t):
        return jnp.mean(fwd(lj.combine(t, frozen), x) ** 2)
      g = jax.grad(loss)(trainable)
      return jax.tree.map(lambda p, g: p - 1e-3 * g, trainable, g)
  else:
    def step(params, x):
      g = jax.grad(lambda p: jnp.mean(forward(p, x) ** 2))(params)
      return jax.tree.map(lambda p, g: p - 1e-3 * g, params, g)
  return step


def _time(fn, args):
  t0 = time.perf_counter()
  traced = jax.jit(fn).trace(*args)
  t1 = time.perf_counter()
  traced.lower().compile()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1


def measure(layers, d, rank, reps, only=None):
  x = jnp.ones((2, 16, d))
  rows = []
  for stacked in (False, True):
    params = _params(jax.random.key(0), layers, d, stacked)
    layouts = {r".*layers/(wq|wk|wv|wo|up|down)": "sio"} if stacked else None
    config = lj.LoraConfig(rank=rank, targets=TARGETS, layouts=layouts)
    lparams = lj.lora_init(jax.random.key(1), params, config)
    trainable, frozen = lj.split(lparams)
    ab, rest = hand_split(lparams)
    hand = hand_combine(ab, rest)
    for kind in ("forward", "train step"):
      name = f"{'scanned' if stacked else 'unscanned'} {kind}"
      if only and only not in name:
        continue
      best = {w: [float("inf")] * 2 for w in ("plain", "lora", "hand")}
      for _ in range(reps):
        for which in ("plain", "lora", "hand"):
          if kind == "forward":
            f = make_forward(stacked)
            fn, args = {"plain": (f, (params, x)), "lora": (lj.lora(f), (lparams, x)),
                        "hand": (f, (hand, x))}[which]
          else:
            fn = make_step(stacked, {"plain": False, "lora": True, "hand": "hand"}[which])
            args = {"plain": (params, x), "lora": (trainable, frozen, x),
                    "hand": (ab, rest, x)}[which]
          t = _time(fn, args)
          best[which] = [min(a, b) for a, b in zip(best[which], t)]
      rows.append((name, best["plain"], best["lora"], best["hand"]))
  return rows


def init_trace_time(layers, d, rank, reps):
  """``lora_init``'s time with layouts read from a trace and with them given,
  for the scanned and the unscanned model: ``{model: (traced, given)}``."""
  x = jnp.ones((2, 16, d))
  out = {}
  for stacked in (False, True):
    params = _params(jax.random.key(0), layers, d, stacked)
    given = {r".*layers/(wq|wk|wv|wo|up|down)": "sio"} if stacked else {TARGETS: "io"}
    best = [float("inf")] * 2
    for rep in range(reps + 1):  # round 0 warms up (compiles the initializers)
      f = make_forward(stacked)
      for k, layouts in enumerate((None, given)):
        config = lj.LoraConfig(rank=rank, targets=TARGETS, layouts=layouts)
        t0 = time.perf_counter()
        res = lj.lora_init(jax.random.key(1), params, config,
                           trace=(lambda p: f(p, x)) if layouts is None else None)
        jax.block_until_ready(res)
        if rep:
          best[k] = min(best[k], time.perf_counter() - t0)
    out["scanned" if stacked else "unscanned"] = best
  return out


def table(rows) -> str:
  lines = ["| program | trace f | trace lora(f) | ratio | compile f | compile lora(f) | "
           "ratio | total ratio | hand LoRA total | lora(f) ÷ hand |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, (tp, cp), (tl, cl), (th, ch) in rows:
    lines.append(f"| {name} | {tp:.2f} s | {tl:.2f} s | {tl / tp:.2f} | {cp:.2f} s | "
                 f"{cl:.2f} s | {cl / cp:.2f} | {(tl + cl) / (tp + cp):.2f} | "
                 f"{th + ch:.2f} s | {(tl + cl) / (th + ch):.2f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.compile_time", description=__doc__,
                              formatter_class=HelpFormatter)
  p.add_argument("--layers", type=int, default=48, help="decoder layers")
  p.add_argument("--d", type=int, default=256, help="model width")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank on q/k/v/o/up/down")
  p.add_argument("--reps", type=int, default=3, help="rounds (the minimum is reported)")
  p.add_argument("--only", default=None,
                 help="substring of the program names to run (default: all four)")
  args = p.parse_args(argv)
  print(f"# jit(lora(f)) vs jit(f) and a hand-written LoRA: {args.layers} layers, d={args.d}, rank {args.rank} "
        f"on q/k/v/o/up/down; min of {args.reps}, interleaved; "
        f"{jax.devices()[0].platform}, load {os.getloadavg()[0]:.1f}")
  measure(1, 32, args.rank, 1, args.only)  # warm up JAX's own one-time costs
  print(table(measure(args.layers, args.d, args.rank, args.reps, args.only)))
  if not args.only:
    for model, (traced, given) in init_trace_time(args.layers, args.d, args.rank,
                                                  args.reps).items():
      print(f"\nlora_init, {model}: {traced:.2f} s with layouts read from a trace, "
            f"{given:.2f} s with them given (trace: {traced - given:.2f} s)")


if __name__ == "__main__":
  main()
