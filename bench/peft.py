"""``python -m bench.peft``: lora_jax's LoRA step against PEFT's, on one HF Llama.

One ``transformers.LlamaForCausalLM`` (float32, random init) per shape, and
five ways to train it, all from the same weights and the same initial
adapter, on the same batches, timed in one process, interleaved (each round
runs one step of every contender, in a rotated order; medians):

* ``peft``          PEFT LoRA (r = 8, alpha = 16, all 7 projections), eager torch;
* ``peft_compile``  the same model under ``torch.compile``;
* ``lora_jax``      ``lj.train_step`` on ``lj.split``'s trainable half, the
                    model ``lora_jax.models.Llama`` loaded with ``load_hf_llama``
                    and the adapter loaded from PEFT's own save;
* ``jax_full``      full fine-tuning of the same Flax model (jitted, donated);
* ``torch_full``    full fine-tuning of the HF model, eager torch.

Every contender uses AdamW (lr 1e-4, betas 0.9 / 0.999, eps 1e-8, decoupled
weight decay 1e-4) and the next-token cross-entropy of ``ids[:, 1:]`` given
``ids[:, :-1]``. Torch gets ``--threads`` intra-op threads; XLA:CPU's thread
pool is the machine's cores (the default: ``--threads`` defaults to that).
The first step's losses are checked equal across the contenders (1e-4).

``--rss`` also runs each contender alone in a fresh process at each shape
and reports its peak resident memory over steady-state steps: the process
builds the model (JAX contenders import no torch and build the Flax model
directly), runs two steps (compiling), resets the kernel's peak counter
(``/proc/self/clear_refs``), runs ``--rss-steps`` more and reads ``VmHWM``.
XLA's compiled temporaries (``memory_analysis()``) of the JAX steps are
reported beside it.

The machine is usually shared: the load (``os.getloadavg``) before and after
is printed with the table, and ratios are only taken within one run. On a
loaded machine torch's OpenMP threads collapse (spin-waiting barriers: a
2-thread PEFT step measured 10x slower than XLA's under a load of 20 on 2
cores), so give both runtimes one core: ``taskset -c 0 python -m bench.peft
--threads 1`` (XLA:CPU sizes its pool from the process's CPU affinity).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.cli import HelpFormatter

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"
RANK, ALPHA, LR, WD = 8, 16, 1e-4, 1e-4
SHAPES = {
    "small": dict(hf=dict(vocab_size=1024, hidden_size=256, intermediate_size=688,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
                  batch=8, seq=128),
    "big": dict(hf=dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8),
                batch=4, seq=256),
}
NAMES = ("peft", "peft_compile", "lora_jax", "jax_full", "torch_full")
JAX_NAMES = ("lora_jax", "jax_full")


def hf_config_dict(shape: str) -> dict:
  """The HF ``LlamaConfig`` fields of ``shape`` (no transformers import)."""
  return dict(model_type="llama", **SHAPES[shape]["hf"], rms_norm_eps=1e-6,
              max_position_embeddings=1024, tie_word_embeddings=False)


def hf_config(shape: str):
  import transformers
  return transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(shape).items()
                                     if k != "model_type"})


def batches(shape: str, n: int, seed: int = 0) -> np.ndarray:
  s = SHAPES[shape]
  rng = np.random.default_rng(seed)
  return rng.integers(0, s["hf"]["vocab_size"], (n, s["batch"], s["seq"] + 1))


# ------------------------------------------------------------------ torch

def hf_model(shape: str, seed: int = 0):
  import torch
  import transformers
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(hf_config(shape)).float().train()


def peft_model(base, seed: int = 1):
  import peft
  import torch
  torch.manual_seed(seed)  # the same A for every PEFT copy
  cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PROJ, lora_dropout=0.0)
  return peft.get_peft_model(copy.deepcopy(base), cfg)


def torch_step(model, compiled: bool = False):
  """``step(ids) -> loss``: forward, backward, AdamW on the params that need grads."""
  import torch
  import torch.nn.functional as F
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
  fwd = torch.compile(model) if compiled else model

  def step(ids):
    ids = torch.as_tensor(ids)
    logits = fwd(input_ids=ids[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
  return step


# -------------------------------------------------------------------- jax

def _loss(cfg, lora: bool):
  import jax.numpy as jnp
  import optax
  import lora_jax as lj
  from lora_jax.models import Llama
  apply = Llama(cfg).apply
  apply = lj.lora(apply) if lora else apply

  def loss(params, ids):
    logits = apply({"params": params}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), ids[:, 1:]).mean()
  return loss


def _adamw():
  import optax
  return optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)


class JaxStep:
  """A jitted, donated step with its own state: ``self(ids) -> loss``."""

  def __init__(self, cfg, params, lora: bool):
    import jax
    import optax
    import lora_jax as lj
    tx = _adamw()
    loss = _loss(cfg, lora)
    if lora:
      self.train, self.frozen = lj.split(params)
      step = lj.train_step(loss, tx)
    else:
      self.train, self.frozen = params, None

      def full(p, opt_state, frozen, ids):
        value, g = jax.value_and_grad(loss)(p, ids)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value
      step = jax.jit(full, donate_argnums=(0, 1))
    self.opt = tx.init(self.train)
    self.step = step

  def compiled(self, ids):
    return self.step.lower(self.train, self.opt, self.frozen, ids).compile()

  def __call__(self, ids):
    self.train, self.opt, value = self.step(self.train, self.opt, self.frozen, ids)
    return float(value)


def jax_params(shape: str, base_sd=None, adapter_dir=None, scan: bool = True):
  """``(cfg, params)``: from an HF state dict (and a PEFT adapter), or random."""
  import jax
  import lora_jax as lj
  from lora_jax.models import LlamaConfig, init_params, llama_name_map, load_hf_llama
  cfg = LlamaConfig.from_hf(hf_config_dict(shape), scan_layers=scan)
  if base_sd is None:
    params = init_params(cfg)
  else:
    cfg, params = load_hf_llama(base_sd, cfg)
  if adapter_dir is not None:
    from lora_jax.interop import peft as lj_peft
    return cfg, params, lj_peft.load_peft_adapter(adapter_dir, params, llama_name_map(cfg))
  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=RANK, alpha=ALPHA,
                                                              targets=TARGETS),
                    trace=lambda p: _loss(cfg, False)(p, batches(shape, 1)[0]))
  return cfg, params, lp


# ---------------------------------------------------------------- running

def build(shape: str, names=NAMES) -> dict:
  """``{name: step(ids) -> loss}`` from one HF model and one PEFT adapter."""
  import torch
  torch.set_num_threads(ARGS.threads)
  base = hf_model(shape)
  steps = {}
  pm = peft_model(base)
  if any(n in names for n in JAX_NAMES):
    import jax
    import jax.numpy as jnp
    sd = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
      pm.save_pretrained(d)
      cfg, params, lp = jax_params(shape, sd, d, scan=ARGS.scan)
    if "lora_jax" in names:
      steps["lora_jax"] = JaxStep(cfg, lp, lora=True)
    if "jax_full" in names:  # its own copy: it donates, and lora_jax's frozen half shares W
      steps["jax_full"] = JaxStep(cfg, jax.tree.map(jnp.copy, params), lora=False)
  if "peft" in names:
    steps["peft"] = torch_step(pm)
  if "peft_compile" in names:
    steps["peft_compile"] = torch_step(peft_model(base), compiled=True)
  if "torch_full" in names:
    steps["torch_full"] = torch_step(copy.deepcopy(base))
  return {n: steps[n] for n in names if n in steps}


def time_shape(shape: str, rounds: int) -> dict:
  ids = batches(shape, rounds + 2)
  t0 = time.perf_counter()
  steps = build(shape)
  first = {}
  for n, s in steps.items():  # step 0: compiles; the losses must agree
    t = time.perf_counter()
    first[n] = s(ids[0])
    print(f"  {shape} {n}: first step (with compile) {time.perf_counter() - t:.1f} s, "
          f"loss {first[n]:.6f}", file=sys.stderr, flush=True)
  spread = max(first.values()) - min(first.values())
  xla = {n: _xla(steps[n], ids[0]) for n in JAX_NAMES if n in steps}
  load0 = os.getloadavg()
  times = {n: [] for n in steps}
  names = list(steps)
  for r in range(rounds):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      t = time.perf_counter()
      steps[n](ids[1 + r])
      times[n].append(time.perf_counter() - t)
  return {"shape": shape, "config": SHAPES[shape], "first_loss": first,
          "first_loss_spread": spread, "xla": xla, "load_before": load0,
          "load_after": os.getloadavg(), "build_s": time.perf_counter() - t0,
          "ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
          "ms_min": {n: 1e3 * min(t) for n, t in times.items()},
          "ms_all": {n: [1e3 * x for x in t] for n, t in times.items()}}


def _xla(step: "JaxStep", ids) -> dict:
  c = step.compiled(ids)
  m = c.memory_analysis()
  ca = c.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
          "flops": float(ca.get("flops", float("nan")))}


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def rss_one(shape: str, name: str, steps: int) -> dict:
  """Peak RSS of ``name``'s steady-state steps, in this (fresh) process."""
  ids = batches(shape, steps + 2)
  if name in JAX_NAMES:  # no torch in this process
    cfg, params, lp = jax_params(shape, scan=ARGS.scan)
    step = JaxStep(cfg, lp if name == "lora_jax" else params, lora=name == "lora_jax")
    del params, lp
    assert "torch" not in sys.modules, "a JAX contender's RSS would count torch"
  else:
    step = build(shape, (name,))[name]
  for i in range(2):
    step(ids[i])
  rss_before = _status_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
  for i in range(steps):
    step(ids[2 + i])
  out = {"name": name, "shape": shape, "rss_after_first_steps_mib": rss_before / 1024,
         "peak_rss_mib": _status_kib("VmHWM") / 1024}
  if name in JAX_NAMES:
    out["xla"] = _xla(step, ids[0])
  return out


def rss_all(shape: str) -> dict:
  out = {}
  for name in NAMES:
    cmd = [sys.executable, "-m", "bench.peft", "--rss-one", name, "--shapes", shape,
           "--threads", str(ARGS.threads), "--rss-steps", str(ARGS.rss_steps)]
    cmd += ["--scan"] if ARGS.scan else []  # --hugetlb: the environment is inherited
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
      out[name] = {"error": proc.stderr[-800:]}
    else:
      out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  rss {shape} {name}: {out[name].get('peak_rss_mib', 'error')}",
          file=sys.stderr, flush=True)
  return out


# ----------------------------------------------------------------- report

def table(results: list[dict]) -> str:
  head = ("| shape | PEFT eager | PEFT + torch.compile | lora_jax LoRA | lora_jax full FT "
          "| torch full FT | LoRA ÷ PEFT | LoRA ÷ PEFT+compile | LoRA ÷ full (jax) "
          "| LoRA ÷ full (torch/PEFT) | load (1 min, before → after) |\n" + "| --- " * 11 + "|")
  rows = []
  for r in results:
    ms = r["ms"]
    g = lambda n: ms.get(n, float("nan"))
    rows.append(
        f"| {_shape(r['shape'])} | {g('peft'):.0f} | {g('peft_compile'):.0f} | "
        f"{g('lora_jax'):.0f} | {g('jax_full'):.0f} | {g('torch_full'):.0f} | "
        f"{g('lora_jax') / g('peft'):.2f} | {g('lora_jax') / g('peft_compile'):.2f} | "
        f"{g('lora_jax') / g('jax_full'):.2f} | {g('peft') / g('torch_full'):.2f} | "
        f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |")
  return head + "\n" + "\n".join(rows)


def rss_table(rss: dict, results: list[dict]) -> str:
  lines = ["| shape | variant | peak RSS, steady state (MiB) | XLA temporaries (MiB) |",
           "| --- | --- | --- | --- |"]
  for shape, per in rss.items():
    for name, r in per.items():
      xla = r.get("xla", {})
      temp = f"{xla['temp_bytes'] / 2**20:.0f}" if xla else ""
      peak = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "error"
      lines.append(f"| {_shape(shape)} | {name} | {peak} | {temp} |")
  return "\n".join(lines)


def _shape(shape: str) -> str:
  s = SHAPES[shape]
  h = s["hf"]
  return (f"{shape}: hidden {h['hidden_size']}, {h['num_hidden_layers']} layers, ff "
          f"{h['intermediate_size']}, {s['batch']}×{s['seq']}")


def parse(argv=None):
  p = argparse.ArgumentParser(prog="python -m bench.peft", description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--shapes", nargs="+", default=["small", "big"], choices=sorted(SHAPES),
                 help="model shapes to run")
  p.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each)")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="torch intra-op threads (XLA:CPU uses the machine's cores)")
  p.add_argument("--scan", action="store_true",
                 help="scan the Flax model's layers (nn.scan; default: unrolled, like "
                      "the HF model: measured faster on XLA:CPU at 4 layers)")
  p.add_argument("--hugetlb", action="store_true",
                 help="rerun under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (torch and XLA "
                      "alike): malloc asks for transparent huge pages, so XLA's per-step "
                      "temporaries fault in 2 MiB pages, not 4 KiB ones")
  p.add_argument("--rss", action="store_true",
                 help="also measure each contender's peak RSS in a fresh process")
  p.add_argument("--rss-steps", type=int, default=3, help="steady-state steps for --rss")
  p.add_argument("--rss-one", default=None, choices=NAMES, help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                 help="folder for peft-cpu[-hugetlb][-scan].json / .md")
  return p.parse_args(argv)


ARGS = None
HUGETLB = "glibc.malloc.hugetlb=1"


def main(argv=None) -> int:
  global ARGS
  ARGS = parse(argv)
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if ARGS.hugetlb and HUGETLB not in tunables:  # glibc reads tunables at start-up only
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGETLB]))}
    args = sys.argv[1:] if argv is None else list(argv)
    os.execve(sys.executable, [sys.executable, "-m", "bench.peft", *args], env)
  if ARGS.rss_one:
    print(json.dumps(rss_one(ARGS.shapes[0], ARGS.rss_one, ARGS.rss_steps)))
    return 0
  results = []
  for shape in ARGS.shapes:
    print(f"[{shape}] building and compiling", file=sys.stderr, flush=True)
    results.append(time_shape(shape, ARGS.rounds))
    print(table(results[-1:]), flush=True)
  rss = {shape: rss_all(shape) for shape in ARGS.shapes} if ARGS.rss else {}
  md = [f"# lora_jax vs PEFT, one HF Llama, float32, r={RANK} on all 7 projections, AdamW",
        "", f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable by this process: "
        f"XLA:CPU's pool), torch threads {ARGS.threads}, scan_layers {ARGS.scan}, "
        f"{ARGS.rounds} interleaved rounds, median step (ms), malloc "
        f"{'with ' + HUGETLB if ARGS.hugetlb else 'glibc defaults'}. Shared machine: "
        "see the load column.", "", table(results)]
  for r in results:
    x = r["xla"]
    md += ["", f"{_shape(r['shape'])}: first-step losses agree within "
           f"{r['first_loss_spread']:.1e}; XLA temporaries: "
           + ", ".join(f"{n} {v['temp_bytes'] / 2**20:.0f} MiB" for n, v in x.items())
           + "; XLA FLOPs per step: "
           + ", ".join(f"{n} {v['flops'] / 1e9:.2f} G" for n, v in x.items())]
  if rss:
    md += ["", "Peak RSS (fresh process per variant, steady-state steps):", "",
           rss_table(rss, results)]
  text = "\n".join(md)
  print(text)
  os.makedirs(ARGS.out, exist_ok=True)
  stem = os.path.join(ARGS.out, "peft-cpu" + "-hugetlb" * ARGS.hugetlb + "-scan" * ARGS.scan)
  with open(stem + ".json", "w") as f:
    json.dump({"results": results, "rss": rss, "args": vars(ARGS)}, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
