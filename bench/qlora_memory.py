"""``python -m bench.qlora_memory [--shape 8b|small] [--out DIR]``: QLoRA memory proxies.

Compiles (abstractly: ``jax.ShapeDtypeStruct`` inputs, nothing allocated) the
jitted, donated AdamW train step of a ``lora_jax.models.Llama`` — scanned and
rematerialized, bf16 params, batch 1 × T tokens — for full fine-tuning, LoRA
(r=16 on every q/k/v/o/gate/up/down projection) and QLoRA (the same adapters
on an NF4 base, block 64, double quantization; embeddings, norms and lm_head
stay bf16), and reads XLA's ``memory_analysis()``:

* argument bytes: params + optimizer state (exact on any backend);
* temporaries, and temporaries beyond those of the base model's forward pass
  (loss only, no gradient) compiled on the same backend: on CPU the forward
  alone holds large temporaries (XLA:CPU upcasts bf16 dots to f32), so the
  difference is what training adds;
* on a GPU, the compiled peak (arguments + outputs − aliased + temporaries).

Writes ``qlora-memory-<shape>-<platform>.md`` and ``.json`` into ``--out``.
The 8B shape takes minutes per compile on a CPU.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, init_params

from bench.cli import HelpFormatter

TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"
GiB = 2 ** 30

SHAPES = {
    # Llama-3-8B
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=8192, rope_theta=500000.0),
    # the same architecture, small enough to compile in seconds (tests use it)
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=512,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512),
}


def llama_config(shape: str) -> LlamaConfig:
  return LlamaConfig(**SHAPES[shape], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                     scan_layers=True, remat=True)


def loss_fn(logits, ids):
  """Next-token cross-entropy in float32."""
  logits = logits[:, :-1].astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


HEAD = r"lm_head/kernel"
VARIANTS = ("full", "lora", "qlora", "qlora+head")
# the base model's forward pass (loss, no gradient) each variant is compared with
FORWARD_OF = {"full": "forward", "lora": "forward", "qlora": "forward-nf4",
              "qlora+head": "forward-nf4+head"}


def abstract_params(cfg: LlamaConfig, variant: str, rank: int = 16):
  """Shapes of the params of ``variant``: "full", "lora", "qlora" (NF4
  projections), "qlora+head" (lm_head NF4 too), "forward", "forward-nf4",
  "forward-nf4+head" (the bases alone)."""
  params = init_params(cfg, abstract=True)
  targets = [TARGETS, HEAD] if variant.endswith("+head") else TARGETS
  qconfig = lj.QuantConfig(kind="nf4", block_size=64, double_quant=True, targets=targets,
                           layouts={r"layers/.*": "sio"})
  lconfig = lj.LoraConfig(rank=rank, alpha=2 * rank, targets=TARGETS,
                          layouts={r"layers/.*": "sio"})

  def build(p):
    if "nf4" in variant or "qlora" in variant:
      p = lj.quantize(p, qconfig)
    if "lora" in variant:
      p = lj.lora_init(jax.random.key(0), p, lconfig)
    return p
  return params if variant in ("full", "forward") else jax.eval_shape(build, params)


def step_fn(model: Llama, variant: str, tx):
  """``(params, opt_state, ids) -> (params, opt_state, loss)`` for ``variant``."""
  apply = lambda p, ids: model.apply({"params": p}, ids)
  if variant != "full":
    apply = lj.lora(apply)
  loss = lambda p, ids: loss_fn(apply(p, ids), ids)

  def step(params, opt_state, ids):
    value, grads = jax.value_and_grad(loss, allow_int=True)(params, ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return step


def measure(shape: str, tokens: int, variants=VARIANTS) -> dict:
  cfg = llama_config(shape)
  model = Llama(cfg)
  ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
  out = {}
  fwd = jax.jit(lj.lora(lambda p, ids: loss_fn(model.apply({"params": p}, ids), ids)))
  for base in sorted({FORWARD_OF[v] for v in variants}):
    out[base] = _memory(fwd.lower(abstract_params(cfg, base), ids).compile())
  for variant in variants:
    t0 = time.perf_counter()
    params = abstract_params(cfg, variant)
    adamw = optax.adamw(1e-4)
    tx = adamw if variant == "full" else lj.optimizer(adamw, params)
    opt_state = jax.eval_shape(tx.init, params)
    step = jax.jit(step_fn(model, variant, tx), donate_argnums=(0, 1))
    m = _memory(step.lower(params, opt_state, ids).compile())
    m["params_bytes"] = _bytes(params)
    m["opt_state_bytes"] = _bytes(opt_state)
    record(out, variant, m, t0)
    print(f"{variant}: {m}", file=sys.stderr, flush=True)
  return out


def record(out: dict, variant: str, m: dict, t0: float) -> None:
  """``out[variant] = m``, with its temporaries beyond its forward pass's
  (already in ``out``) and the seconds since ``t0`` (compiling included)."""
  m["temp_beyond_forward"] = (m["temp_size_in_bytes"]
                              - out[FORWARD_OF[variant]]["temp_size_in_bytes"])
  m["compile_seconds"] = round(time.perf_counter() - t0, 1)
  out[variant] = m


def _bytes(tree) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _memory(c) -> dict:
  m = c.memory_analysis()
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "alias_size_in_bytes", "temp_size_in_bytes")}
  out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                       - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def markdown(shape: str, tokens: int, res: dict, platform: str) -> str:
  gib = lambda b: f"{b / GiB:.2f}"
  lines = [f"QLoRA memory proxies: Llama `{shape}` shape, batch 1 × {tokens} tokens, "
           f"scanned + remat, bf16, AdamW, r=16 on every projection; XLA "
           f"`memory_analysis()` of the donated train step on {platform} (GiB). "
           "qlora: NF4 projections (block 64, double quant); qlora+head: lm_head NF4 "
           "too; embeddings and norms bf16. 'Beyond its forward' subtracts the "
           "temporaries of the same base's forward pass (loss only): bf16 for full and "
           "lora, the NF4 base for qlora.", "",
           "| variant | params | optimizer state | arguments | temporaries | "
           "its forward's temporaries | beyond its forward | compiled peak |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for v in VARIANTS:
    if v in res:
      m, f = res[v], res[FORWARD_OF[v]]
      lines.append(f"| {v} | {gib(m['params_bytes'])} | {gib(m['opt_state_bytes'])} | "
                   f"{gib(m['argument_size_in_bytes'])} | {gib(m['temp_size_in_bytes'])} | "
                   f"{gib(f['temp_size_in_bytes'])} | {gib(m['temp_beyond_forward'])} | "
                   f"{gib(m['peak_bytes'])} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bench.qlora_memory", description=__doc__,
                              formatter_class=HelpFormatter)
  p.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="model shape")
  p.add_argument("--tokens", type=int, default=2048, help="sequence length (batch 1)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                 help="directory for the .md and .json (default: bench/results)")
  args = p.parse_args(argv)
  platform = jax.devices()[0].platform
  res = measure(args.shape, args.tokens)
  md = markdown(args.shape, args.tokens, res, platform)
  print(md)
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"qlora-memory-{args.shape}-{platform}")
  with open(base + ".md", "w") as f:
    f.write(md)
  with open(base + ".json", "w") as f:
    json.dump({"shape": args.shape, "tokens": args.tokens, "platform": platform,
               "config": SHAPES[args.shape], "results": res}, f, indent=1)
  print(f"wrote {base}.md and .json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
