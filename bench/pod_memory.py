"""``python -m bench.pod_memory [--shapes 8b,70b] [--meshes 2x4,8x8]``: per-device memory at pod scale.

Per-device bytes of the donated AdamW train step of a Llama-3-8B-shaped and a
Llama-3-70B-shaped ``lora_jax.models.Llama`` (scanned + remat, bf16) for full
fine-tuning, LoRA (r=16 on every q/k/v/o/gate/up/down projection) and QLoRA
(the same adapters on an NF4 base, block 64, double quant), on simulated CPU
device meshes ``(fsdp, model)``: kernels split Megatron-style over ``model``
and FSDP-style over ``fsdp`` (column-parallel ``(d, out)``: ``P('fsdp',
'model')``, row-parallel ``(in, d)``: ``P('model', 'fsdp')``, embedding
``P('model', 'fsdp')``, lm_head ``P('fsdp', 'model')``; LoRA factors as
``lj.lora_shardings`` derives them, NF4 codes as ``lj.quantize`` places them),
the batch (one 2048-token sequence per ``fsdp`` rank) over ``fsdp``.

Everything is compiled abstractly: ``jax.jit(step).lower(ShapeDtypeStructs
with shardings).compile()``, no array is allocated, and XLA's
``memory_analysis()`` of the SPMD-partitioned program gives per-device
arguments (params + optimizer state, exact on any backend), temporaries and
the compiled peak (arguments + outputs − aliased + temporaries).

The CPU caveat: XLA:CPU upcasts bf16 matmuls to float32, so the temporaries
are overstated against a GPU/TPU. Each step is therefore listed next to the
temporaries of its base model's forward pass (loss only, no gradient; the NF4
base for QLoRA) compiled on the same mesh and backend: "beyond forward" is
what training adds. The fit columns judge two estimates against 16/24/80 GB
per device: the CPU peak (an upper bound) and arguments + temporaries beyond
the forward pass + the forward's temporaries halved (bf16 instead of f32
activations), marked "yes" if both fit, "no" if neither, "maybe" otherwise.

Writes ``pod-memory-<platform>.md`` and ``.json`` into ``--out``.
"""

import os

_DEVICES = 64
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import lora_jax as lj  # noqa: E402
from bench import qlora_memory as qm  # noqa: E402
from bench.cli import HelpFormatter  # noqa: E402
from lora_jax._src import quant_sharding  # noqa: E402
from lora_jax._src.quant import is_quantized  # noqa: E402
from lora_jax._src.sharding import factor_specs  # noqa: E402
from lora_jax.models import Llama, LlamaConfig  # noqa: E402

GB = 10 ** 9
SHAPES = dict(qm.SHAPES)
SHAPES["70b"] = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                     num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                     max_position_embeddings=8192, rope_theta=500000.0)
VARIANTS = ("full", "lora", "qlora")
FORWARD_OF = {"full": "forward", "lora": "forward", "qlora": "forward-nf4"}
# (regex on the param path, (spec of the kernel's last two axes))
RULES = [(r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", ("fsdp", "model")),
         (r".*(o_proj|down_proj)/kernel", ("model", "fsdp")),
         (r"embed_tokens/embedding", ("model", "fsdp")),
         (r"lm_head/kernel", ("fsdp", "model"))]


def kernel_spec(path: str, ndim: int) -> tuple:
  for pattern, axes in RULES:
    if re.fullmatch(pattern, path):
      return (None,) * (ndim - len(axes)) + axes
  return (None,) * ndim


def fitted(mesh, spec, shape) -> NamedSharding:
  """``spec`` with any axis its mesh size does not divide replicated."""
  sizes = dict(mesh.shape)
  out = []
  for n, e in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    ways = int(np.prod([sizes[a] for a in ((e,) if isinstance(e, str) else e or ())]))
    out.append(e if n % ways == 0 else None)
  return NamedSharding(mesh, P(*out))


def _quantized_shardings(mesh, q, spec):
  specs = quant_sharding.specs(q, spec)
  leaves = [None if x is None else fitted(mesh, s, x.shape)
            for x, s in zip((q.codes, q.absmax, q.absmax2, q.offset), specs)]
  return type(q)(*leaves, kind=q.kind, block_size=q.block_size, inner_shape=q.inner_shape,
                 inner_roles=q.inner_roles, dtype=q.dtype)


def param_shardings(mesh, params):
  """A sharding tree for abstract (LoRA / NF4) Llama params (see the module doc)."""
  def one(path, x):
    p = jax.tree_util.keystr(path, simple=True, separator="/")
    if isinstance(x, lj.LoraWeight):
      spec = kernel_spec(p, x.w.ndim)
      sa, sb = factor_specs(P(*spec), x.roles)
      w = (_quantized_shardings(mesh, x.w, spec) if is_quantized(x.w)
           else fitted(mesh, spec, x.w.shape))
      return x.replace(w=w, a=fitted(mesh, sa, x.a.shape), b=fitted(mesh, sb, x.b.shape))
    if is_quantized(x):
      return _quantized_shardings(mesh, x, kernel_spec(p, x.ndim))
    return fitted(mesh, kernel_spec(p, x.ndim), x.shape)
  is_leaf = lambda x: isinstance(x, lj.LoraWeight) or is_quantized(x)
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_leaf)


def opt_shardings(mesh, state, params):
  """Each optimizer-state leaf sharded like the param whose path ends its own
  (Adam's ``mu``/``nu`` mirror the params), anything else replicated."""
  flat = {jax.tree_util.keystr(k, simple=True, separator="/"): x
          for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def one(path, x):
    p = jax.tree_util.keystr(path, simple=True, separator="/")
    best = max((q for q in flat if p.endswith("/" + q) and flat[q].shape == x.shape),
               key=len, default=None)
    return flat[best].sharding if best else NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, state)


def typed(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def measure(shape: str, mesh_shape: tuple, tokens: int, variants=VARIANTS) -> dict:
  n = int(np.prod(mesh_shape))
  mesh = jax.make_mesh(mesh_shape, ("fsdp", "model"), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cfg = LlamaConfig(**SHAPES[shape], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                    scan_layers=True, remat=True)
  model = Llama(cfg)
  ids = jax.ShapeDtypeStruct((mesh_shape[0], tokens), jnp.int32,
                             sharding=NamedSharding(mesh, P("fsdp")))
  out = {}
  fwd = jax.jit(lj.lora(lambda p, ids: qm.loss_fn(model.apply({"params": p}, ids), ids)))
  for base in sorted({FORWARD_OF[v] for v in variants}):
    t0 = time.perf_counter()
    params = qm.abstract_params(cfg, base)
    out[base] = qm._memory(fwd.lower(typed(params, param_shardings(mesh, params)),
                                     ids).compile())
    out[base]["compile_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{shape} {mesh_shape} {base}: {out[base]}", file=sys.stderr, flush=True)
  for variant in variants:
    t0 = time.perf_counter()
    params = qm.abstract_params(cfg, variant)
    ps = param_shardings(mesh, params)
    params = typed(params, ps)
    adamw = optax.adamw(1e-4)
    tx = adamw if variant == "full" else lj.optimizer(adamw, params)
    abstract_state = jax.eval_shape(tx.init, params)
    os_ = opt_shardings(mesh, abstract_state, params)
    opt_state = typed(abstract_state, os_)
    step = jax.jit(qm.step_fn(model, variant, tx), donate_argnums=(0, 1),
                   out_shardings=(ps, os_, None))
    m = qm._memory(step.lower(params, opt_state, ids).compile())
    qm.record(out, variant, m, t0)
    print(f"{shape} {mesh_shape} {variant}: {m}", file=sys.stderr, flush=True)
  return out


def estimates(m: dict, fwd: dict) -> tuple[int, int]:
  """(CPU peak, bf16 estimate): see the module doc."""
  low = (m["peak_bytes"] - m["temp_size_in_bytes"] + m["temp_beyond_forward"]
         + fwd["temp_size_in_bytes"] // 2)
  return m["peak_bytes"], low


def fits(m: dict, fwd: dict, budget_gb: int) -> str:
  high, low = estimates(m, fwd)
  b = budget_gb * GB
  return "yes" if high <= b else "no" if low > b else "maybe"


def markdown(results: dict, tokens: int, platform: str) -> str:
  gb = lambda b: f"{b / GB:.1f}"
  lines = [f"Per-device memory of the donated AdamW train step (GB = 1e9 bytes), "
           f"XLA `memory_analysis()` of abstractly compiled SPMD programs on simulated "
           f"{platform} devices. Llama shapes, scanned + remat, bf16, r=16 on every "
           f"projection; mesh (fsdp, model); batch: one {tokens}-token sequence per "
           "fsdp rank. 'args' = params + optimizer state per device (exact); 'temp' = "
           "XLA:CPU temporaries (bf16 dots upcast to f32: overstated); 'fwd temp' = "
           "the base model's forward pass on the same mesh; 'est.' = args + (temp - "
           "fwd temp) + fwd temp / 2. Fit: 'yes' if the CPU peak fits, 'no' if even "
           "the estimate does not, 'maybe' between.", "",
           "| model | mesh (fsdp×model) | variant | args | temp | fwd temp | CPU peak | "
           "est. | 16 GB | 24 GB | 80 GB |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
  for key, res in results.items():
    shape, mesh = key.split(" ")
    for v in VARIANTS:
      if v not in res:
        continue
      m, f = res[v], res[FORWARD_OF[v]]
      high, low = estimates(m, f)
      lines.append(f"| {shape} | {mesh} | {v} | {gb(m['argument_size_in_bytes'])} | "
                   f"{gb(m['temp_size_in_bytes'])} | {gb(f['temp_size_in_bytes'])} | "
                   f"{gb(high)} | {gb(low)} | " +
                   " | ".join(fits(m, f, b) for b in (16, 24, 80)) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m bench.pod_memory", description=__doc__,
                              formatter_class=HelpFormatter)
  p.add_argument("--shapes", default="8b,70b", help="comma-separated: " + ",".join(SHAPES))
  p.add_argument("--meshes", default="2x4,8x8",
                 help="comma-separated (fsdp)x(model) meshes, at most 64 devices")
  p.add_argument("--tokens", type=int, default=2048, help="sequence length")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="comma-separated train steps to compile")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                 help="directory for the .md and .json")
  args = p.parse_args(argv)
  platform = jax.devices()[0].platform
  variants = tuple(args.variants.split(","))
  results = {}
  for shape in args.shapes.split(","):
    for mesh in args.meshes.split(","):
      mesh_shape = tuple(int(k) for k in mesh.split("x"))
      results[f"{shape} {mesh}"] = measure(shape, mesh_shape, args.tokens, variants)
  md = markdown(results, args.tokens, platform)
  print(md)
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"pod-memory-{platform}")
  with open(base + ".md", "w") as f:
    f.write(md)
  with open(base + ".json", "w") as f:
    json.dump({"tokens": args.tokens, "platform": platform, "rules": RULES,
               "shapes": {s: SHAPES[s] for s in args.shapes.split(",")},
               "results": results}, f, indent=1)
  print(f"wrote {base}.md and .json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
