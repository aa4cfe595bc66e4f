"""Workloads (model + sizes) and the measurements taken on one of them.

``run(spec, rank, rounds)`` builds every contender on the same weights and
inputs, checks the LoRA peers' outputs against lora_jax's, then measures, all
in one process and interleaved: the train step (wall, XLA FLOPs, compiled
memory, optimizer state), the forward pass (prefill and decode, unmerged vs
merged), ``merge`` vs a copy of the same bytes, and compile times.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from bench import measure, models, peers

SCALE = 2.0      # alpha = 2·rank
TOLERANCE = 2e-4  # max |y_peer − y_lora_jax| / max |y_lora_jax|, float32


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  kind: str            # "mlp", "decoder" (bench/models.py) or "llama" (lora_jax.models)
  d: int
  layers: int
  tokens: int          # prefill / train batch: tokens (mlp) or batch × seq (decoder)
  seq: int = 1         # decoder sequence length
  heads: int = 4
  ffn: int = 0
  vocab: int = 0
  decode_batch: int = 8


def specs(mode: str) -> list[Spec]:
  """The workloads of a mode: ``tiny`` (smoke test), ``quick`` or ``full``."""
  if mode == "tiny":
    return [Spec("mlp-d64", "mlp", 64, 1, 64),
            Spec("decoder-d64", "decoder", 64, 2, 64, seq=16, heads=4, ffn=128, vocab=128)]
  if mode == "quick":
    return [Spec("mlp-d1024", "mlp", 1024, 1, 2048),
            Spec("decoder-d256", "decoder", 256, 2, 2048, seq=256, heads=4, ffn=768, vocab=512),
            Spec("llama-d256", "llama", 256, 2, 2048, seq=256, heads=4, ffn=768, vocab=512)]
  return [Spec("mlp-d1024", "mlp", 1024, 3, 2048),
          Spec("mlp-d2048", "mlp", 2048, 3, 2048),
          Spec("decoder-d512", "decoder", 512, 4, 2048, seq=512, heads=8, ffn=1536, vocab=2048),
          Spec("llama-d512", "llama", 512, 4, 2048, seq=512, heads=8, ffn=1536, vocab=2048)]


# ------------------------------------------------------------------- models

def _decoder_cfg(spec: Spec, rank: int = 0, unroll=1) -> models.DecoderConfig:
  return models.DecoderConfig(vocab=spec.vocab, d=spec.d, heads=spec.heads, ffn=spec.ffn,
                              layers=spec.layers, rank=rank, scale=SCALE, unroll=unroll)


def _llama(spec: Spec):
  from lora_jax.models import Llama, LlamaConfig
  return Llama(LlamaConfig(
      vocab_size=spec.vocab, hidden_size=spec.d, intermediate_size=spec.ffn,
      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
      num_key_value_heads=spec.heads, max_position_embeddings=max(spec.seq, 256),
      scan_layers=True))


def build_models(spec: Spec, rank: int, unroll=1):
  """(base model, hand-written LoRA model or None)."""
  if spec.kind == "llama":
    return _llama(spec), None  # lora_jax.models.llama has no hand-written LoRA twin
  if spec.kind == "mlp":
    return models.MLP(spec.d, spec.layers), models.MLP(spec.d, spec.layers, rank, SCALE)
  return (models.Decoder(_decoder_cfg(spec, 0, unroll)),
          models.Decoder(_decoder_cfg(spec, rank, unroll)))


def inputs(spec: Spec, key):
  """(prefill / train inputs, train targets, decode inputs)."""
  k1, k2, k3 = jax.random.split(key, 3)
  if spec.kind == "mlp":
    x = jax.random.normal(k1, (spec.tokens, spec.d))
    return x, jax.random.normal(k2, (spec.tokens, spec.d)), jax.random.normal(
        k3, (spec.decode_batch, spec.d))
  toks = jax.random.randint(k1, (spec.tokens // spec.seq, spec.seq + 1), 0, spec.vocab)
  dec = jax.random.randint(k3, (spec.decode_batch, 1), 0, spec.vocab)
  return toks[:, :-1], toks[:, 1:], dec


def loss_fn(spec: Spec):
  if spec.kind == "mlp":
    return lambda y, t: jnp.mean((y - t) ** 2)
  return lambda y, t: optax.softmax_cross_entropy_with_integer_labels(y, t).mean()


def lora_config(spec: Spec, rank: int) -> lj.LoraConfig:
  layouts = {r"layers/.*/kernel": "sio"} if spec.kind != "mlp" else None
  return lj.LoraConfig(rank=rank, alpha=SCALE * rank, targets=r".*kernel", layouts=layouts)


def contenders(spec: Spec, rank: int, params, lp, x, unroll=1) -> list[peers.Contender]:
  base, hand = build_models(spec, rank, unroll)
  hand_c = peers.hand(hand, lp) if hand is not None else peers.Contender(
      "hand", skipped="no hand-written LoRA twin of lora_jax.models.Llama (see decoder-*)")
  return [peers.full(base, params), peers.frozen(base, params),
          peers.lora_jax(base, lp), peers.naive(base, lp), hand_c,
          peers.nnx_lora(spec.kind, lp, spec.d, spec.layers, rank, SCALE),
          peers.qwix_lora(base, lp, rank, SCALE, x)]


def train_step(c: peers.Contender, loss):
  """``step(state, x, t, frozen=None)``; ``frozen`` is lj.split's frozen half
  for a ``split`` contender (lj.train_step), None for the others."""
  if c.split:
    inner = lj.train_step(lambda p, x, t: loss(c.forward(p, x), t), c.tx, jit=False)

    def split_step(state, x, t, frozen=None):
      trainable, opt, value = inner(*state, frozen, x, t)
      return (trainable, opt), value
    return split_step

  def step(state, x, t, frozen=None):
    del frozen
    params, opt = state
    value, grads = jax.value_and_grad(lambda p: loss(c.forward(p, x), t))(params)
    updates, opt = c.tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), opt), value
  return step


# ------------------------------------------------------------- FLOP floors

def linear_shapes(spec: Spec) -> list[tuple[int, int]]:
  if spec.kind == "mlp":
    return [(spec.d, spec.d)] * (spec.layers + 1)
  return models.decoder_linear_shapes(_decoder_cfg(spec))


def flop_floor(spec: Spec, rank: int) -> dict:
  """Analytic train-step FLOPs: full FT, and the LoRA floor.

  LoRA floor = forward + activation-gradient matmuls of the linear layers
  (2/3 of full FT's 6·params·tokens) + attention (forward and backward,
  12·batch·seq²·d per layer) + the adapters' own 6·r·(in + out) per token.
  """
  shapes = linear_shapes(spec)
  t = spec.tokens
  full_lin = sum(6 * i * o * t for i, o in shapes)
  attn = 0
  if spec.kind != "mlp":
    attn = 12 * (spec.tokens // spec.seq) * spec.seq ** 2 * spec.d * spec.layers
  adapters = sum(6 * rank * (i + o) * t for i, o in shapes)
  return {"full_ft": full_lin + attn, "lora_floor": full_lin * 2 // 3 + attn + adapters,
          "attention": attn, "adapters": adapters}


# --------------------------------------------------------------- measuring

def check_outputs(cs, x) -> dict:
  """max |y − y_lora_jax| / max |y_lora_jax| of every LoRA peer's forward."""
  ours = next(c for c in cs if c.name == "lora_jax")
  ref = jax.jit(ours.forward)(ours.params, x)
  scale = float(jnp.max(jnp.abs(ref)))
  out = {}
  for c in cs:
    if c.name in peers.LORA_PEERS and not c.skipped:
      y = jax.jit(c.forward)(c.params, x)
      out[c.name] = float(jnp.max(jnp.abs(y - ref))) / scale
      if not out[c.name] <= TOLERANCE:
        c.skipped = f"output differs from lora_jax's: rel. diff {out[c.name]:.2e} > {TOLERANCE}"
  return out


def _halves(c: peers.Contender, params):
  """(what the step differentiates, its frozen input)."""
  return lj.split(params) if c.split else (params, None)


def measure_train(cs, spec, x, t, rounds, flop_cs=None, only=None) -> dict:
  """Wall time (interleaved, donated state), FLOPs, memory, optimizer state."""
  loss = loss_fn(spec)
  res, loops = {}, {}
  for c in cs:
    if c.skipped or (only and c.name not in only):
      continue
    params, frozen = _halves(c, measure.copy_tree(c.params))
    state = (params, c.tx.init(params))
    comp, secs = measure.compiled(train_step(c, loss), state, x, t, frozen, donate_argnums=0)
    res[c.name] = {"compile_s": secs, "flops": measure.flops(comp),
                   "memory": measure.memory(comp),
                   "opt_state_bytes": measure.tree_bytes(state[1])}
    loops[c.name] = measure.Looped(comp, state, x, t, frozen)
  for c in flop_cs or []:  # unrolled twins: XLA counts a while body once
    if c.name in res:
      params, frozen = _halves(c, c.params)
      state = (params, c.tx.init(params))
      comp = jax.jit(train_step(c, loss)).lower(state, x, t, frozen).compile()
      res[c.name]["flops"] = measure.flops(comp)
  times = measure.interleaved(loops, rounds)
  for n, tm in times.items():
    res[n]["time"] = tm
  if jax.devices()[0].platform != "cpu":
    res["device_peak_bytes"] = measure.device_peak_bytes()
  return res


def measure_forward(cs, merged, x, rounds) -> dict:
  """Unmerged forwards of every LoRA contender and the merged model's."""
  fns = {}
  for c in cs:
    if c.name in peers.LORA_PEERS and not c.skipped:
      f = jax.jit(c.forward)
      fns[c.name] = (lambda f=f, p=c.params: f(p, x))
  full = next(c for c in cs if c.name == "full")
  f = jax.jit(full.forward)
  fns["merged"] = lambda: f(merged, x)
  return measure.interleaved(fns, rounds)


def measure_merge(lp, rounds) -> dict:
  """``jax.jit(lj.merge, donate_argnums=0)`` vs a copy of the kernels it writes."""
  kernels = [x.w for x in jax.tree.leaves(lp, is_leaf=lj._src.weight.is_node)
             if isinstance(x, lj.LoraWeight)]
  merge, _ = measure.compiled(lj.merge, lp, donate_argnums=0)
  copy, _ = measure.compiled(lambda ks: [jnp.copy(k) for k in ks], kernels)
  adapter = lj.adapter(lp)
  holder = {"p": measure.copy_tree(lp)}

  def do_merge():
    merged = merge(holder["p"])
    holder["p"] = lj.attach(merged, adapter)  # no device work: a fresh input
    return merged
  times = measure.interleaved({"merge": do_merge, "copy": lambda: copy(kernels)}, rounds)
  largest = max(kernels, key=lambda k: k.size)
  stack = largest.shape[0] if largest.ndim == 3 else 1
  return {"time": times["merge"], "copy_time": times["copy"],
          "memory": measure.memory(merge),
          "kernel_bytes": measure.tree_bytes(kernels),
          "largest_kernel_bytes": measure.tree_bytes(largest),
          "largest_layer_kernel_bytes": measure.tree_bytes(largest) // stack}


def measure_compile(spec, base, params, lp, x, t, repeats) -> dict:
  fwd = lambda: (lambda p, x: base.apply({"params": p}, x))
  return {"lora_forward": measure.compile_seconds(lambda: lj.lora(fwd()), (lp, x), repeats),
          "base_forward": measure.compile_seconds(fwd, (params, x), repeats)}


def run(spec: Spec, rank: int, rounds: int, compile_repeats: int = 3, exact_flops: bool = True,
        train_only=None, log=print) -> dict:
  """All measurements of one workload at one rank (see the module docstring).

  ``exact_flops``: count the decoder's FLOPs on a fully unrolled twin of each
  train step (XLA's cost analysis counts a scan body once); off, the scanned
  step's own count is kept (cheaper; the smoke test). ``train_only``: names
  of the contenders whose train step is measured (all when None).
  """
  key = jax.random.key(0)
  x, t, x_dec = inputs(spec, key)
  base, _ = build_models(spec, rank)
  params = base.init(jax.random.key(1), x)["params"]
  lp = peers.randomize_b(jax.random.key(3),
                         lj.lora_init(jax.random.key(2), params, lora_config(spec, rank)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # qwix / nnx chatter
    cs = contenders(spec, rank, params, lp, x)
    flop_cs = (contenders(spec, rank, params, lp, x, unroll=True)
               if spec.kind == "decoder" and exact_flops else None)
  out = {"workload": spec.name, "kind": spec.kind, "rank": rank,
         "spec": dataclasses.asdict(spec), "scale": SCALE, "tolerance": TOLERANCE,
         "dtype": "float32",
         # XLA's cost analysis counts a scan body once: exact only when unrolled
         "exact_flops": spec.kind == "mlp" or (spec.kind == "decoder" and exact_flops)}
  log(f"[{spec.name} r={rank}] checking peers' outputs")
  out["max_rel_diff"] = check_outputs(cs, x)
  out["skipped"] = {c.name: c.skipped for c in cs if c.skipped}
  log(f"[{spec.name} r={rank}] train steps")
  out["train"] = measure_train(cs, spec, x, t, rounds, flop_cs, train_only)
  out["flop_floor"] = flop_floor(spec, rank)
  merged = jax.jit(lj.merge)(lp)
  log(f"[{spec.name} r={rank}] forward (prefill, decode)")
  out["prefill"] = measure_forward(cs, merged, x, rounds)
  out["decode"] = measure_forward(cs, merged, x_dec, rounds)
  log(f"[{spec.name} r={rank}] merge, compile")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # A and B are donated but not reused
    out["merge"] = measure_merge(lp, rounds)
  out["compile"] = measure_compile(spec, base, params, lp, x, t, compile_repeats)
  return out
