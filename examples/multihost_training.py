"""LoRA on several JAX processes (jax.distributed): one program, run once per host.

JAX's multi-controller runtime runs the same program in every process (one per
host on a TPU pod or a GPU cluster); together they see one global device mesh.
lora_jax adds nothing to that runtime: params are global ``jax.Array``s, the
train step is an ordinary ``jax.jit``, and the saves are called by every
process, which is what Orbax expects:

1. ``jax.distributed.initialize(...)`` connects the processes (on Cloud TPU with
   no arguments: it finds the pod slice itself).
2. The base params go on a (data, model) mesh over all processes' devices
   (tensor-parallel Llama: q/k/v/gate/up split on their output axis, o/down on
   their input axis); ``lj.lora_init`` creates each adapter sharded like its
   kernel; every process feeds only the rows of the batch its devices hold.
3. ``lj.save_adapter`` (every process calls it; each writes its shards, process
   0 publishes the checkpoint), ``lj.load_adapter`` (onto the same mesh, or
   later onto any mesh or a single process), ``lj.merge``, and the exports
   ``save_peft_adapter`` / ``save_hf_llama`` (the tensors are gathered whole,
   process 0 writes the files).

Run:
  python examples/multihost_training.py --num-processes 2
      tries it on one machine: 2 local processes x 4 simulated CPU devices
      (this script starts both and prints process 0's output; about 90 s on a
      busy 2-core machine).
  python examples/multihost_training.py --coordinator-address host0:1234 \\
      --num-processes 4 --process-id $RANK
      a cluster: the same command on every host, each with its own id
      (0 on the host at the coordinator address).
  python examples/multihost_training.py
      Cloud TPU (run on every host of the slice; also SLURM, Open MPI):
      jax.distributed.initialize() detects the cluster.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

from _common import parser, progress, table

TP_RULES = (  # Megatron-style tensor parallelism, by the kernel's path
    ("q_proj", (None, "model")), ("k_proj", (None, "model")), ("v_proj", (None, "model")),
    ("gate_proj", (None, "model")), ("up_proj", (None, "model")),
    ("o_proj", ("model", None)), ("down_proj", ("model", None)),
    ("lm_head", (None, "model")))
TARGETS = r".*((q|k|v|o|gate|up|down)_proj)/kernel"


def parse(argv=None):
  p = parser(__doc__.splitlines()[0], out="out/multihost",
             out_help="directory for the checkpoint and the exported files")
  p.add_argument("--num-processes", type=int, default=None,
                 help="number of processes; alone, starts that many local copies of "
                      "this script (on one machine, simulated CPU devices) (default: unset: "
                      "jax.distributed detects it)")
  p.add_argument("--process-id", type=int, default=None,
                 help="this process's id in [0, num-processes) (a cluster) (default: unset: "
                      "jax.distributed detects it)")
  p.add_argument("--coordinator-address", default=None,
                 help="host:port of process 0 (a cluster); none: jax.distributed "
                      "detects the cluster (Cloud TPU, SLURM, Open MPI) (default: unset)")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="simulated CPU devices per process (0: the real devices); the "
                      "local launcher uses 4")
  p.add_argument("--mesh", default=None,
                 help="mesh shape 'data,model' (default: processes, devices per process)")
  p.add_argument("--steps", type=int, default=30, help="training steps")
  p.add_argument("--rank", type=int, default=4, help="LoRA rank")
  p.add_argument("--batch", type=int, default=8, help="sequences per step (global)")
  p.add_argument("--seq", type=int, default=16, help="tokens per sequence")
  p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
  p.add_argument("--timeout", type=int, default=600,
                 help="seconds before the local launcher kills its processes")
  args = p.parse_args(argv)
  if args.fast:
    args.steps = min(args.steps, 3)
  return args


# --- the local launcher (``--num-processes N`` alone) ---

def free_port() -> int:
  """A TCP port nothing listens on now (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def spawn(script: str, argv: list[str], num_processes: int, cpu_devices: int,
          logs: str, env: dict | None = None) -> list[subprocess.Popen]:
  """Start ``num_processes`` copies of ``script`` as one jax.distributed program.

  Each gets ``--coordinator-address localhost:<free port> --num-processes N
  --process-id i --cpu-devices K``; process 0 writes to this stdout, the
  others to ``logs/process<i>.log``; ``env`` adds environment variables.
  """
  address = f"localhost:{free_port()}"
  env = dict(os.environ, **(env or {}), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={cpu_devices}")
  procs = []
  for i in range(num_processes):
    out = None if i == 0 else open(os.path.join(logs, f"process{i}.log"), "w")
    procs.append(subprocess.Popen(
        [sys.executable, script, *argv, "--coordinator-address", address,
         "--num-processes", str(num_processes), "--process-id", str(i),
         "--cpu-devices", str(cpu_devices)], env=env, stdout=out, stderr=out))
    if out is not None:
      out.close()
  return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
  """Wait for every process; the exit codes.

  If one fails, or ``timeout`` seconds pass, the others are killed (by PID):
  they would wait for it in a collective.
  """
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
      p.wait()
  return [p.returncode for p in procs]


def launch(args, argv) -> dict:
  """Run this script as ``args.num_processes`` local processes; process 0's results."""
  cpu = args.cpu_devices or 4
  pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
  logs = tempfile.mkdtemp(prefix="multihost-logs-")
  print(f"starting {args.num_processes} processes x {cpu} simulated CPU devices "
        f"(other processes' logs: {logs})", flush=True)
  codes = wait(spawn(os.path.abspath(__file__), list(argv), args.num_processes, cpu, logs),
               args.timeout)
  if any(codes):
    for i in range(1, len(codes)):
      with open(os.path.join(logs, f"process{i}.log")) as f:
        print(f"--- process {i} (exit {codes[i]}), last lines:\n" + "".join(f.readlines()[-15:]))
    raise SystemExit(f"the processes exited with {codes}")
  with open(os.path.join(args.out, "result.json")) as f:
    return json.load(f)


# --- the program every process runs ---

def connect(args) -> None:
  """``jax.distributed.initialize`` from the flags (nothing given: autodetect)."""
  if args.cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=" \
                                f"{args.cpu_devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  if args.cpu_devices:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # across processes
  try:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)
  except (ValueError, RuntimeError) as e:
    raise SystemExit(f"jax.distributed.initialize failed ({e}).\nTo try this on one "
                     "machine: --num-processes 2") from e


def param_specs(params, P):
  """A PartitionSpec per leaf from TP_RULES (others replicated)."""
  import jax

  def spec(path, x):
    names = jax.tree_util.keystr(path, simple=True, separator="/")
    for module, axes in TP_RULES:
      if f"{module}/kernel" in names:
        return P(*((None,) * (x.ndim - len(axes)) + axes))
    return P()
  return jax.tree_util.tree_map_with_path(spec, params)


def batch(step: int, size: int, seq: int, vocab: int):
  """The global batch of ``step`` (numpy): sequences counting up by a stride."""
  import numpy as np
  rng = np.random.default_rng(step)
  start = rng.integers(0, vocab, (size, 1))
  stride = rng.integers(1, 4, (size, 1))
  return ((start + stride * np.arange(seq + 1)[None]) % vocab).astype(np.int32)


def setup(args, mesh):
  """(model, config, base params on the mesh, LoRA params, data sharding)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import lora_jax as lj
  from lora_jax.models import Llama, LlamaConfig, init_params

  cfg = LlamaConfig.tiny(scan_layers=True, num_hidden_layers=1 if args.fast else 2)
  model = Llama(cfg)
  key = jax.random.key(args.seed)
  shapes = init_params(cfg, abstract=True)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(shapes, P))
  # Every process computes the same init; out_shardings keeps only its shards.
  base = jax.jit(lambda k: init_params(cfg, k), out_shardings=shardings)(key)
  ids = jax.numpy.zeros((1, args.seq), jax.numpy.int32)
  lcfg = lj.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS)
  lparams = lj.lora_init(jax.random.fold_in(key, 1), base, lcfg,
                         trace=lambda p: model.apply({"params": p}, ids))
  return model, cfg, base, lparams, NamedSharding(mesh, P("data"))


def global_batch(step, args, vocab, sharding):
  """The batch of ``step`` as a global array: each process supplies only its rows."""
  import jax
  shape = (args.batch, args.seq + 1)
  rows = [idx[0].indices(shape[0]) for idx in
          sharding.addressable_devices_indices_map(shape).values()]
  lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)  # this process's rows
  tokens = batch(step, args.batch, args.seq, vocab)[lo:hi]  # a real loader reads only these
  return jax.make_array_from_process_local_data(sharding, tokens, shape)


def train(args, model, lparams, data, vocab, quiet=True):
  """``args.steps`` Adam steps on the LoRA factors; (params, losses).

  ``lparams`` is donated (its buffers are reused): take the base kernels from
  the result (``lj.base``) if needed.
  """
  import jax
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  import lora_jax as lj

  tx = lj.optimizer(optax.adam(args.lr), lparams)
  apply = lj.lora(model.apply)

  def loss_fn(p, tokens):
    logits = apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(p, opt, tokens):
    loss, g = jax.value_and_grad(loss_fn)(p, tokens)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  # Fixed in/out shardings: one compilation, the params stay where they are.
  shardings = lj.lora_shardings(lparams)
  opt = jax.jit(tx.init)(lparams)  # Adam moments sharded like A and B
  replicated = NamedSharding(data.mesh, P())
  opt_shardings = jax.tree.map(
      lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, opt)
  opt = jax.device_put(opt, opt_shardings)
  step = jax.jit(step, in_shardings=(shardings, opt_shardings, data),
                 out_shardings=(shardings, opt_shardings, replicated), donate_argnums=(0, 1))
  losses = []
  for i in progress(range(args.steps), "train", quiet):
    lparams, opt, loss = step(lparams, opt, global_batch(i, args, vocab, data))
    losses.append(float(loss))  # a replicated scalar: readable on every process
  return lparams, losses


def timed(fn, *a, **kw):
  t = time.perf_counter()
  out = fn(*a, **kw)
  return out, time.perf_counter() - t


def run(args) -> dict:
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  import lora_jax as lj
  from lora_jax.interop import peft
  from lora_jax.models import llama_name_map, save_hf_llama

  me, n = jax.process_index(), jax.process_count()
  shape = (tuple(int(s) for s in args.mesh.split(",")) if args.mesh
           else (n, jax.local_device_count()))
  mesh = jax.make_mesh(shape, ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  say = print if me == 0 else (lambda *a, **k: None)
  say(f"{n} processes, {jax.device_count()} devices ({jax.local_device_count()} per "
      f"process, {jax.devices()[0].platform}); mesh data x model = {shape[0]} x {shape[1]}")

  model, cfg, base, lparams, data = setup(args, mesh)
  (lparams, losses), t_train = timed(train, args, model, lparams, data, cfg.vocab_size,
                                     args.quiet or me != 0)
  base = lj.base(lparams)  # the step donated the old buffers
  out = os.path.abspath(args.out)
  ckpt = os.path.join(out, "adapter")
  times = {"train": t_train}
  # Every process calls each save; each writes its shards, process 0 publishes.
  _, times["save_adapter"] = timed(lj.save_adapter, ckpt, lparams, overwrite=True)
  back, times["load_adapter"] = timed(lj.load_adapter, ckpt, base)
  same = all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(lj.adapter(back)),
                                                  jax.tree.leaves(lj.adapter(lparams))))
  _, times["save_peft_adapter"] = timed(peft.save_peft_adapter, os.path.join(out, "peft"),
                                        lparams, llama_name_map())
  merged, times["merge"] = timed(jax.jit(lj.merge, donate_argnums=0), back)
  _, times["save_hf_llama"] = timed(save_hf_llama, merged, cfg, os.path.join(out, "hf"))
  tokens = global_batch(10_000, args, cfg.vocab_size, data)
  logits = jax.jit(model.apply)({"params": merged}, tokens[:, :-1])
  logits = multihost_utils.process_allgather(logits, tiled=True)  # whole, on every process

  say("\nloss by step:")
  say(table(("step", "loss"), [(i, f"{v:.4f}") for i, v in enumerate(losses)
                               if i % max(1, len(losses) // 8) == 0 or i == len(losses) - 1]))
  say("\nevery process called each of these:")
  say(table(("what", "seconds"), [(k, f"{v:.2f}") for k, v in times.items()]))
  say(f"\nadapter reloaded bit-exact: {same}; files in {out}: "
      f"{sorted(os.listdir(out)) if me == 0 else ''}")
  result = {"processes": n, "mesh": list(shape), "losses": losses, "reloaded_equal": same,
            "times": times, "logits_sum": float(np.sum(logits, dtype=np.float64)),
            "out": out}
  if me == 0:
    np.save(os.path.join(out, "logits.npy"), logits)
    with open(os.path.join(out, "result.json"), "w") as f:
      json.dump(result, f, indent=1)
  return result


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  if args.num_processes and args.process_id is None and args.coordinator_address is None:
    return launch(args, argv)
  connect(args)
  return run(args)


if __name__ == "__main__":
  main()
