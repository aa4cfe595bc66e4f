"""Two JAX processes x 4 simulated CPU devices (jax.distributed on localhost, gloo).

Launched the way users try it (``examples/multihost_training.py``'s launcher:
a free port, bounded waits, children killed by their PIDs), and compared with
this process (8 simulated devices, one process):

* the example (``--fast``): its train steps equal the one-process run on the
  same (2, 4) mesh; its checkpoint, saved from both processes, loads here; the
  merged model's logits match; its PEFT and HF exports are byte-for-byte the
  files one process writes from the same params.
* ``multihost_worker.py``: every save form from both processes (directory,
  overwrite both ways, a racing writer, a CheckpointManager, a stack, PEFT
  stack exports), a stacked call with ``adapter_ids`` spread over both
  processes, and the bad inputs (different directories, different params, a
  process that never calls the save: errors on every process, no hang); last,
  both processes are killed in the middle of an overwriting save and the
  previous checkpoint still loads here bit for bit.
"""

import filecmp
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

import multihost_training as mt  # noqa: E402

LIMIT_S = 240  # per launch; the launches take ~20-40 s on a quiet 2-core machine


def _logs(logs: str) -> str:
  text = []
  for name in sorted(os.listdir(logs)):
    with open(os.path.join(logs, name)) as f:
      text.append(f"--- {name}:\n" + "".join(f.readlines()[-25:]))
  return "\n".join(text)


def _mesh():
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _finish(procs, logs, until=None):
  """Wait for a launch (or, with ``until``, for that file, then kill it); exit codes."""
  deadline = time.monotonic() + LIMIT_S
  try:
    while until is not None and not until.exists():
      assert all(p.poll() is None for p in procs), f"a process ended\n{_logs(logs)}"
      assert time.monotonic() < deadline, f"the processes took too long\n{_logs(logs)}"
      time.sleep(0.05)
  finally:
    codes = mt.wait(procs, max(0.0, deadline - time.monotonic()) if until is None else 0)
  return codes


def _launch_all(tmp_path_factory):
  """Both 2-process launches, run side by side, and the one-process reference run.

  The example (``--fast``) and the worker start together; while they run,
  this process trains the same model on its own 8 devices.
  """
  ex_out, wk_out = tmp_path_factory.mktemp("example"), tmp_path_factory.mktemp("worker")
  ex_logs, wk_logs = (str(tmp_path_factory.mktemp(n)) for n in ("example-logs", "worker-logs"))
  argv = ["--fast", "--quiet", "--out", str(ex_out), "--num-processes", "2"]
  ex = mt.spawn(mt.__file__, argv, 2, 4, ex_logs, env={"LORA_JAX_SYNC_TIMEOUT": "60"})
  try:
    wk = mt.spawn(str(HERE / "multihost_worker.py"), [str(wk_out)], 2, 4, wk_logs)
  except BaseException:
    mt.wait(ex, 0)
    raise
  try:
    args = mt.parse(argv)
    model, cfg, _, lparams, data = mt.setup(args, _mesh())
    trained, losses = mt.train(args, model, lparams, data, cfg.vocab_size)
  finally:
    ex_codes = _finish(ex, ex_logs)
    wk_codes = _finish(wk, wk_logs, until=wk_out / "hanging")  # then killed by PID
  assert ex_codes == [0, 0], f"exit codes {ex_codes}\n{_logs(ex_logs)}"
  assert wk_codes == [-9, -9], f"exit codes {wk_codes}\n{_logs(wk_logs)}"
  reports = [json.loads((wk_out / f"report-{i}.json").read_text()) for i in range(2)]
  return {"args": args, "out": ex_out, "model": model, "cfg": cfg, "data": data,
          "base": lj.base(trained), "losses": losses, "worker": wk_out, "reports": reports}


def test_example_help(capsys):
  with pytest.raises(SystemExit) as e:
    mt.parse(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--num-processes", "--process-id", "--coordinator-address", "--fast"):
    assert flag in text


def _training_equals_one_process(runs):
  result = json.loads((runs["out"] / "result.json").read_text())
  assert result["processes"] == 2 and result["mesh"] == [2, 4]
  assert result["reloaded_equal"]
  np.testing.assert_allclose(result["losses"], runs["losses"], rtol=1e-5)


def _checkpoint_loads_in_one_process_and_exports_equal(runs, tmp_path):
  from lora_jax.interop import peft
  from lora_jax.models import llama_name_map, save_hf_llama
  out, cfg, base = runs["out"], runs["cfg"], runs["base"]
  back = lj.load_adapter(out / "adapter", base)  # written by 2 processes, read by 1
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(lj.adapter(back)))
  peft.save_peft_adapter(tmp_path / "peft", back, llama_name_map())
  merged = jax.jit(lj.merge)(back)
  save_hf_llama(merged, cfg, tmp_path / "hf")
  for d in ("peft", "hf"):
    names = sorted(os.listdir(out / d))
    assert names == sorted(os.listdir(tmp_path / d)) and names
    match, mismatch, errors = filecmp.cmpfiles(out / d, tmp_path / d, names, shallow=False)
    assert (mismatch, errors) == ([], []), d
  tokens = mt.global_batch(10_000, runs["args"], cfg.vocab_size, runs["data"])
  logits = jax.jit(runs["model"].apply)({"params": merged}, tokens[:, :-1])
  np.testing.assert_allclose(np.load(out / "logits.npy"), logits, rtol=1e-5, atol=1e-6)
  # and onto other meshes, or no mesh at all
  for shape in ((1, 8), (8, 1)):
    mesh = jax.make_mesh(shape, ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    on = jax.device_put(base, jax.tree.map(lambda x: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*x.sharding.spec)), base))
    for x, y in zip(jax.tree.leaves(lj.adapter(lj.load_adapter(out / "adapter", on))),
                    jax.tree.leaves(lj.adapter(back))):
      np.testing.assert_array_equal(x, y)
  host = jax.tree.map(np.asarray, base)
  for x, y in zip(jax.tree.leaves(lj.adapter(lj.load_adapter(out / "adapter", host))),
                  jax.tree.leaves(lj.adapter(back))):
    np.testing.assert_array_equal(x, y)


def _base():
  w = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100
  return {"dense": {"kernel": jnp.asarray(w)}, "norm": jnp.ones(16)}


def _every_save_form_from_two_processes(runs):
  out, reports = runs["worker"], runs["reports"]
  for r in reports:  # each process saw the same outcome
    assert r["factor_shardings"] == ["P('data', None)", "P(None, 'model')"]
    assert r["load_shardings"] == r["factor_shardings"]
    assert r["save_path"] == str(out / "a")
    assert r["load_equal"] and r["after_exists_equal"] and r["overwrite_equal"]
    assert r["exists"].startswith(f"FileExistsError: save_adapter: {out / 'a'} already exists;")
    assert r["listing"] == ["a"]  # one checkpoint, no temporaries
    assert r["raced"].startswith(f"FileExistsError: save_adapter: {out / 'raced'} already "
                                 "exists (another save created it while this one was writing)")
    assert r["raced_listing"] == ["other"]  # the other writer's, untouched
    assert r["manager_equal"] and r["stack_equal"]
    assert r["stack_exists"].startswith("FileExistsError")
    assert r["numpy_base"] == "no error"
  assert reports[0]["peft"] == reports[1]["peft"]
  assert reports[0]["eager_ids_out"] == reports[1]["eager_ids_out"]
  listing = sorted(os.listdir(out))
  assert not [n for n in listing if n.startswith(("dir", "local", "lonely"))], listing


def _stack_and_ids_over_two_processes_match_one(runs, tmp_path):
  from lora_jax.interop import peft
  out, reports = runs["worker"], runs["reports"]
  stack = lj.load_adapter(out / "s", _base())
  ids = jnp.asarray([0, 1, -1, 1, 0, 1, 1, 0])
  x = np.linspace(-1, 1, 8 * 8, dtype=np.float32).reshape(8, 8)
  y = lj.lora(lambda p, v: v @ p["dense"]["kernel"])(stack, x, adapter_ids=ids)
  np.testing.assert_allclose(reports[0]["eager_ids_out"], y, rtol=1e-6)
  rules = [(r"dense/kernel", "dense.weight")]
  peft.save_peft_stack(tmp_path, stack, rules)
  peft.save_peft_adapter(tmp_path / "one", lj.load_adapter(out / "s" / "1", _base()), rules)
  for mine, theirs in ((tmp_path, out / "peft_stack"), (tmp_path / "two", out / "peft_stack" / "two"),
                       (tmp_path / "one", out / "peft")):
    names = ["adapter_config.json", "adapter_model.safetensors"]
    assert filecmp.cmpfiles(mine, theirs, names, shallow=False)[0] == names


def _bad_input_fails_on_every_process(runs):
  out, reports = runs["worker"], runs["reports"]
  for me, r in enumerate(reports):
    assert r["different_dirs"] == (
        "ValueError: save_adapter: the 2 processes passed different arguments: directory: "
        f"process 0 passes '{out / 'dir0'}', process 1 passes '{out / 'dir1'}'. Every process "
        "must call save_adapter with the same directory and the same params (the global "
        "arrays of one model)")
    assert r["different_params"].startswith(
        "ValueError: save_adapter: the 2 processes passed different arguments: params differ "
        "(only on process 0: ['k: {")
    assert '"rank": 1' in r["different_params"] and '"rank": 2' in r["different_params"]
  assert reports[0]["missing_process"].startswith(
      "TimeoutError: save_adapter: process 0 waited 3 s for process 1, which did not get there")
  assert 3 <= reports[0]["missing_process_s"] < 30


def _killed_save_leaves_the_previous_checkpoint(runs):
  out = runs["worker"]
  assert [n for n in os.listdir(out) if n.startswith("a.lora_jax-tmp-")], \
      "the kill should land while the new checkpoint is being written"
  expected = np.load(out / "expected-0.npz")
  got = jax.tree.leaves(lj.adapter(lj.load_adapter(out / "a", _base())))
  assert len(got) == len(expected.files)
  for k, x in enumerate(got):  # the checkpoint before the killed save, bit for bit
    np.testing.assert_array_equal(x, expected[f"arr_{k}"])
  p = lj.load_adapter(out / "a", _base())
  lj.save_adapter(out / "a", p, overwrite=True)  # cleans the dead writers' directory
  assert not [n for n in os.listdir(out) if ".lora_jax-tmp-" in n]


def test_two_processes_against_one(tmp_path_factory, tmp_path):
  """One test, so that pytest-xdist runs the launches once (a module fixture would
  run once per xdist worker)."""
  runs = _launch_all(tmp_path_factory)
  _training_equals_one_process(runs)
  _checkpoint_loads_in_one_process_and_exports_equal(runs, tmp_path / "one")
  _every_save_form_from_two_processes(runs)
  _stack_and_ids_over_two_processes_match_one(runs, tmp_path / "stack")
  _bad_input_fails_on_every_process(runs)
  _killed_save_leaves_the_previous_checkpoint(runs)
