"""One process of the 2-process checks of tests/test_multihost.py (run by its launcher).

Usage: multihost_worker.py OUT --coordinator-address ... --num-processes 2
--process-id i --cpu-devices 4. Saves every checkpoint kind from both
processes, checks the bad inputs, writes OUT/report-<i>.json, and at the end
hangs inside a save (process 0 writes OUT/hanging) for the test to kill.
"""

import json
import os
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import multihost_training  # noqa: E402  (its connect(): jax.distributed.initialize)

KERNEL = (8, 16)
RULES = [(r"dense/kernel", "dense.weight")]


def main():
  out = pathlib.Path(sys.argv[1])
  args = multihost_training.parse(sys.argv[2:])
  multihost_training.connect(args)
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec as P

  import lora_jax as lj
  from lora_jax._src import multihost
  from lora_jax.interop import peft

  me = jax.process_index()
  report = {}
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  w = np.arange(np.prod(KERNEL), dtype=np.float32).reshape(KERNEL) / 100
  base = {"dense": {"kernel": jax.make_array_from_callback(
      KERNEL, NamedSharding(mesh, P("data", "model")), lambda i: w[i])},
          "norm": jax.device_put(np.ones(KERNEL[1], np.float32), NamedSharding(mesh, P()))}
  cfg = lj.LoraConfig(rank=2, targets="dense/kernel")

  def adapter(seed):  # a trained-looking adapter: b nonzero
    p = lj.lora_init(jax.random.key(seed), base, cfg)
    lw = p["dense"]["kernel"]
    return {**p, "dense": {"kernel": lw.replace(b=lw.b + 0.5 + seed)}}

  def whole(p):  # the adapter's arrays, gathered (numpy)
    return [np.asarray(x) for x in jax.tree.leaves(multihost.gather(lj.adapter(p)))]

  def same(p, q):
    return all(np.array_equal(x, y) for x, y in zip(whole(p), whole(q)))

  def error(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {e}"
    return "no error"

  p1, p2 = adapter(1), adapter(2)
  report["factor_shardings"] = [str(p1["dense"]["kernel"].a.sharding.spec),
                                str(p1["dense"]["kernel"].b.sharding.spec)]
  # a directory, overwrite both ways
  a = str(out / "a")
  t = time.perf_counter()
  report["save_path"] = lj.save_adapter(a, p1)
  report["save_s"] = time.perf_counter() - t
  t = time.perf_counter()
  back = lj.load_adapter(a, base)
  report["load_s"] = time.perf_counter() - t
  report["load_equal"] = same(back, p1)
  report["load_shardings"] = [str(back["dense"]["kernel"].a.sharding.spec),
                              str(back["dense"]["kernel"].b.sharding.spec)]
  report["exists"] = error(lambda: lj.save_adapter(a, p2))
  report["after_exists_equal"] = same(lj.load_adapter(a, base), p1)
  lj.save_adapter(a, p2, overwrite=True)
  report["overwrite_equal"] = same(lj.load_adapter(a, base), p2)
  report["listing"] = sorted(os.listdir(out))
  # a racing writer creates the target while this save writes
  from lora_jax._src import adapter_checkpoint
  orig_write = adapter_checkpoint.write

  def write_then_race(path, args_):
    orig_write(path, args_)
    if me == 0:
      os.makedirs(os.path.join(out, "raced", "other"))
  adapter_checkpoint.write = write_then_race
  report["raced"] = error(lambda: lj.save_adapter(out / "raced", p1))
  adapter_checkpoint.write = orig_write
  report["raced_listing"] = sorted(os.listdir(out / "raced"))
  # a CheckpointManager
  mngr = ocp.CheckpointManager(out / "m")
  lj.save_adapter(mngr, p1, step=3)
  report["manager_equal"] = same(lj.load_adapter(mngr, base), p1)
  # a stack, overwrite both ways; an eager stacked call with ids over both processes
  stack = lj.attach(base, lj.stack_adapters([lj.adapter(p1), lj.adapter(p2)],
                                            names=["one", "two"]))
  s = str(out / "s")
  lj.save_adapter(s, stack)
  report["stack_exists"] = error(lambda: lj.save_adapter(s, stack))
  lj.save_adapter(s, stack, overwrite=True)
  sback = lj.load_adapter(s, base)
  report["stack_equal"] = all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(multihost.gather(sback["dense"]["kernel"])),
      jax.tree.leaves(multihost.gather(stack["dense"]["kernel"]))))
  ids = np.array([0, 1, -1, 1, 0, 1, 1, 0], np.int32)
  ids_g = jax.make_array_from_callback((8,), NamedSharding(mesh, P("data")), lambda i: ids[i])
  x = np.linspace(-1, 1, 8 * KERNEL[0], dtype=np.float32).reshape(8, KERNEL[0])
  x_g = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")), lambda i: x[i])
  fn = lambda p, v: v @ p["dense"]["kernel"]
  y = lj.lora(fn)(sback, x_g, adapter_ids=ids_g)
  report["eager_ids_out"] = multihost.gather(y).tolist()
  # onto host-local (numpy) base params: no mesh to read the factors into
  report["numpy_base"] = error(lambda: lj.load_adapter(a, {"dense": {"kernel": w}}))
  # exports: PEFT adapter, PEFT stack
  report["peft"] = peft.save_peft_adapter(out / "peft", p2, RULES)
  report["peft_stack"] = peft.save_peft_stack(out / "peft_stack", stack, RULES)
  np.savez(out / f"expected-{me}.npz", *whole(p2))
  # bad input: different directories, different params (host-local, no mesh)
  report["different_dirs"] = error(lambda: lj.save_adapter(out / f"dir{me}", p1))
  local = lj.lora_init(jax.random.key(0), {"k": np.ones((4, 3), np.float32)},
                       lj.LoraConfig(rank=1 + me, targets="k"))
  report["different_params"] = error(lambda: lj.save_adapter(out / "local", local))
  report["bad_listing"] = sorted(os.listdir(out))
  # a process that does not call the save: the other waits LORA_JAX_SYNC_TIMEOUT
  os.environ[multihost.TIMEOUT_ENV] = "3"
  if me == 0:
    t = time.perf_counter()
    report["missing_process"] = error(lambda: lj.save_adapter(out / "lonely", p1))
    report["missing_process_s"] = time.perf_counter() - t
  else:
    next(multihost._counter)  # pylint: disable=protected-access  (skipped it on purpose)
  os.environ[multihost.TIMEOUT_ENV] = "120"
  multihost.barrier("test")
  with open(out / f"report-{me}.json", "w") as f:
    json.dump(report, f, indent=1)
  multihost.barrier("test")
  # last: a save of p1 over p2 that hangs once process 0 wrote its part; the test kills both
  json_handler = ocp.handlers.JsonCheckpointHandler
  orig = json_handler.async_save

  async def stuck(self, *a, **kw):
    result = await orig(self, *a, **kw)
    if me == 0:
      (out / "hanging").write_text("writing")
    time.sleep(600)
    return result
  json_handler.async_save = stuck
  lj.save_adapter(a, p1, overwrite=True)


if __name__ == "__main__":
  try:
    main()
  except BaseException:
    traceback.print_exc()
    sys.stdout.flush()
    raise
