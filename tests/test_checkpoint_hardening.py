"""Adapter checkpoints under tampering, damage and concurrent writers.

Every bad file must give an error naming the file, the field, what was
expected and what was found; two writers racing to create one checkpoint must
give exactly one checkpoint and one FileExistsError.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import atomic_dir
from lora_jax._src.checkpoint import load_adapter, read_description, save_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"dense": {"kernel": jnp.arange(32.0).reshape(8, 4)}, "norm": jnp.ones(4),
        "other": {"kernel": jnp.ones((4, 6))}}
KERNEL = "entries['dense/kernel']"


def _config(rank=2, targets=r".*kernel"):
  return lj.LoraConfig(rank=rank, alpha=4, targets=targets, trainable="norm")


def _adapter(rank=2, targets=r".*kernel", seed=0):
  p = lj.lora_init(jax.random.key(seed), BASE, _config(rank, targets))
  return jax.tree.map(lambda x: x + 1.0, p)  # nonzero B, changed norm


def _meta(path):
  return os.path.join(path, "lora_jax", "metadata")


def _edit(path, change):
  """Apply ``change`` to the checkpoint's parsed JSON description, in place."""
  with open(_meta(path)) as f:
    info = json.load(f)
  change(info)
  with open(_meta(path), "w") as f:
    json.dump(info, f)


def _error(path, *parts, exc=ValueError):
  with pytest.raises(exc) as e:
    load_adapter(path, BASE)
  msg = str(e.value)
  for part in parts:
    assert part in msg, f"{part!r} not in:\n{msg}"
  return msg


@pytest.fixture
def ckpt(tmp_path):
  return save_adapter(tmp_path / "c", _adapter(), config=_config())


def _set(*keys_value):
  *keys, value = keys_value
  def change(info):
    node = info
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = value
  return change


# Edits that leave the description valid: only the checksum can tell.
@pytest.mark.parametrize("field,value,shown", [
    ("scale", 3.0, "3.0"), ("dropout", 0.5, "0.5")])
def test_edited_value_fails_its_checksum(ckpt, field, value, shown):
  _edit(ckpt, _set("entries", "dense/kernel", field, value))
  _error(ckpt, _meta(ckpt), f"field {KERNEL}.{field}: expected the value it was saved "
         "with (sha256 ", f"found {shown}", "edited after save_adapter wrote it")
  with pytest.raises(ValueError, match=f"{field}: expected the value it was saved"):
    read_description(ckpt)


def test_edited_config_and_step_fail_their_checksums(ckpt):
  _edit(ckpt, _set("config", "alpha", 8))
  _error(ckpt, _meta(ckpt), "field config: expected the value it was saved with")
  _edit(ckpt, _set("config", "alpha", 4))
  load_adapter(ckpt, BASE)
  _edit(ckpt, _set("step", 7))
  _error(ckpt, _meta(ckpt), "field step: expected the value it was saved with",
         "found 7")


# Edits that make the description invalid: named by the field checks.
@pytest.mark.parametrize("change,parts", [
    (_set("entries", "dense/kernel", "a", "dtype", "int8"),
     [f"field {KERNEL}.a.dtype: expected a floating dtype", "found 'int8' (a string)"]),
    (_set("entries", "dense/kernel", "b", "dtype", "float33"),
     [f"field {KERNEL}.b.dtype: expected a floating dtype", "found 'float33'"]),
    (_set("entries", "norm", "value", "dtype", "object"),
     ["field entries['norm'].value.dtype: expected a numeric dtype", "found 'object'"]),
    (_set("entries", "dense/kernel", "scale", -2.0),
     [f"field {KERNEL}.scale: expected a finite number > 0, found -2.0"]),
    (_set("entries", "dense/kernel", "scale", "2"),
     [f"field {KERNEL}.scale: expected a finite number > 0, found '2' (a string)"]),
    (_set("entries", "dense/kernel", "dropout", 1.5),
     [f"field {KERNEL}.dropout: expected a number in [0, 1), found 1.5"]),
    (_set("entries", "dense/kernel", "rank", True),
     [f"field {KERNEL}.rank: expected an integer >= 1, found True (a boolean)"]),
    (_set("entries", "dense/kernel", "roles", "oi"),
     [f"field {KERNEL}.a.shape: expected [4, 2] (kernel [8, 4], roles 'oi', rank 2), "
      "found [8, 2]"]),
    (_set("entries", "dense/kernel", "roles", "ix"),
     [f"field {KERNEL}.roles: expected a string of 's', 'i', 'o'", "found 'ix'"]),
    (_set("entries", "dense/kernel", "a", "shape", [8, 2, 1]),
     [f"field {KERNEL}.a.shape: expected 2 axes (stack + in + rank for roles 'io'), "
      "found [8, 2, 1]"]),
    (_set("entries", "dense/kernel", "b", "shape", [2, 5]),
     [f"field {KERNEL}.b.shape: expected [2, 4] (kernel [8, 4], roles 'io', rank 2), "
      "found [2, 5]"]),
    (_set("entries", "dense/kernel", "kernel", "shape", [8, 4, 1]),
     [f"field {KERNEL}.kernel.shape: expected 2 axes (roles 'io'), found [8, 4, 1]"]),
    (_set("entries", "dense/kernel", "key", ["other", "kernel"]),
     [f"field {KERNEL}.key: expected ['dense', 'kernel'] (the escaped path)"]),
    (_set("entries", "dense/kernel", "kind", "full"),
     [f"field {KERNEL}.kind: expected 'lora' or 'trainable', found 'full'"]),
    (_set("entries", "dense/kernel", "bias", 1),
     [f"field {KERNEL}.bias: expected no such field (the fields are ["]),
    (_set("entries", ["dense/kernel"]),
     ["field entries: expected a non-empty JSON object {param path: entry}, found "
      "['dense/kernel'] (a list)"]),
    (_set("entries", {}), ["field entries: expected a non-empty JSON object"]),
    (_set("format_version", "2"),
     ["field format_version: expected an integer from 1 to 2, found '2' (a string)"]),
    (_set("format_version", 2.0),
     ["field format_version: expected an integer from 1 to 2, found 2.0"]),
    (_set("format", "something.else"),
     ["field format: expected 'lora_jax.adapter', found 'something.else' (a string) "
      "(not a lora_jax adapter checkpoint)"]),
    (_set("nbytes", 1), ["field nbytes: expected 192 (the bytes of the arrays the "
                         "entries describe), found 1"]),
    (_set("step", -1), ["field step: expected an integer >= 0, found -1"]),
    (_set("checksums", "sha256", "entries['dense/kernel'].scale", "0" * 16),
     [f"field {KERNEL}.scale: expected the value it was saved with (sha256 '0000"]),
    (_set("checksums", {}), ["field checksums.sha256: expected a value, found nothing"]),
])
def test_invalid_field_is_named(ckpt, change, parts):
  _edit(ckpt, change)
  msg = _error(ckpt, _meta(ckpt) + ": field ", *parts)
  assert "Upgrade" not in msg


@pytest.mark.parametrize("keys", [("entries", "dense/kernel", "scale"), ("entries",),
                                  ("entries", "norm", "value", "shape"),
                                  ("format_version",), ("checksums",)])
def test_missing_field_is_named(ckpt, keys):
  def drop(info):
    node = info
    for k in keys[:-1]:
      node = node[k]
    del node[keys[-1]]
  _edit(ckpt, drop)
  name = {("entries", "dense/kernel", "scale"): f"{KERNEL}.scale",
          ("entries", "norm", "value", "shape"): "entries['norm'].value.shape"}.get(keys, keys[0])
  _error(ckpt, f"{_meta(ckpt)}: field {name}: expected ", "found nothing (the field is missing)")


def test_added_entry_has_no_checksum(tmp_path, ckpt):
  small = save_adapter(tmp_path / "small", _adapter(targets="dense/kernel"))
  with open(_meta(ckpt)) as f:
    other = json.load(f)["entries"]["other/kernel"]
  def add(info):
    info["entries"]["other/kernel"] = other
    info["nbytes"] += 4 * (4 * 2 + 2 * 6)
  _edit(small, add)
  _error(small, _meta(small), "field entries['other/kernel'].a: expected no such "
         "field (it has no checksum: added after saving)")


@pytest.mark.parametrize("content", [b"", b"\x00\xffgarbage", b"{\"format\": \"lora_jax.ad",
                                     b"[1, 2]"])
def test_garbage_or_truncated_description(ckpt, content):
  with open(_meta(ckpt), "rb") as f:
    original = f.read()
  with open(_meta(ckpt), "wb") as f:
    f.write(content if content else original[:len(original) // 2])
  if content == b"[1, 2]":
    _error(ckpt, f"{_meta(ckpt)}: field (top level): expected a JSON object, found "
           "[1, 2] (a list)")
  else:
    _error(ckpt, f"{_meta(ckpt)}: the adapter description is not valid JSON (",
           "expected the JSON object save_adapter writes, found ", "damaged or truncated")


def test_previous_format_version_still_loads(ckpt):
  want = load_adapter(ckpt, BASE)
  def to_v1(info):
    del info["checksums"]
    info["format_version"] = 1
  _edit(ckpt, to_v1)
  got = load_adapter(ckpt, BASE)
  for path, w in lj.adapter(want).items():
    for x, y in zip(jax.tree.leaves(w), jax.tree.leaves(lj.adapter(got)[path])):
      np.testing.assert_array_equal(x, y)
  assert read_description(ckpt)["format_version"] == 1
  # version 1 has no checksums, but still every check that does not need them
  _edit(ckpt, _set("entries", "dense/kernel", "a", "dtype", "int8"))
  _error(ckpt, f"field {KERNEL}.a.dtype: expected a floating dtype")


def test_description_not_matching_the_arrays(tmp_path, ckpt):
  """A genuine description beside other arrays (or a consistent version-1 edit)."""
  bigger = save_adapter(tmp_path / "r3", _adapter(rank=3))
  shutil.copy(_meta(bigger), _meta(ckpt))
  msg = _error(ckpt, os.path.join(ckpt, "arrays") + ": the stored arrays do not match "
               "the description:",
               f"{KERNEL}.a: the description says shape [8, 3] float32, the stored "
               "array has shape [8, 2] float32",
               "entries['other/kernel'].b: the description says shape [3, 6] float32, "
               "the stored array has shape [2, 6] float32")
  assert msg.count("the description says") == 4  # one error lists them all
  only_dense = save_adapter(tmp_path / "d", _adapter(targets="dense/kernel"))
  shutil.copy(_meta(ckpt), _meta(only_dense))  # rank 3, lists other/kernel too
  _error(only_dense, "entries['other/kernel'].a: no array stored under key 'other.kernel.a'")


def test_deleted_or_damaged_arrays(tmp_path, ckpt):
  shutil.rmtree(os.path.join(ckpt, "arrays"))
  _error(ckpt, f"{ckpt}: the checkpoint has no 'arrays/' directory",
         "expected 'lora_jax/' and 'arrays/' as save_adapter writes them",
         "found ['_CHECKPOINT_METADATA', 'commit_success.txt', 'lora_jax']")
  other = save_adapter(tmp_path / "o", _adapter())
  for d, _, files in os.walk(os.path.join(other, "arrays")):
    for f in files:
      if f != "_METADATA" and "manifest" not in f:
        open(os.path.join(d, f), "wb").close()  # truncate the data files
  _error(other, os.path.join(other, "arrays") + ": ", "The checkpoint is damaged")


def test_not_a_checkpoint_directory(tmp_path):
  (tmp_path / "file").write_text("x")
  _error(tmp_path / "file", f"{tmp_path / 'file'} is a file, not a lora_jax adapter "
         "checkpoint: expected the directory save_adapter writes")
  _error(tmp_path / "nowhere", f"no checkpoint at {tmp_path / 'nowhere'}",
         exc=FileNotFoundError)


def test_base_with_other_shapes_lists_every_path(ckpt):
  wrong = {"dense": {"kernel": jnp.ones((8, 5))}, "norm": jnp.ones(3),
           "other": {"kernel": jnp.ones((4, 6))}}
  with pytest.raises(ValueError) as e:
    load_adapter(ckpt, wrong)
  msg = str(e.value)
  assert f"the checkpoint at {ckpt} does not fit the base params" in msg
  assert "dense/kernel: the checkpoint's kernel has shape (8, 4)" in msg
  assert "base kernel has shape (8, 5)" in msg
  assert "norm: trained leaf of shape (4,) in the checkpoint, the base leaf has shape (3,)" in msg


def test_save_refuses_an_adapter_it_could_not_load(tmp_path):
  p = _adapter()
  lw = p["dense"]["kernel"]
  # LoraWeight's constructor refuses these too; a node rebuilt through
  # tree_unflatten (as JAX transformations do) is not checked, save_adapter is.
  def rebuilt(a=lw.a, scale=lw.scale, dropout=lw.dropout):
    return lj.LoraWeight.tree_unflatten((scale, lw.roles, dropout), (lw.w, a, lw.b))
  for bad, part in ((rebuilt(a=lw.a.astype(jnp.int8)), ".a.dtype: expected a floating"),
                    (rebuilt(scale=0.0), ".scale: expected a finite number > 0"),
                    (rebuilt(dropout=1.0), ".dropout: expected a number in [0, 1)")):
    q = {**p, "dense": {"kernel": bad}}
    with pytest.raises(ValueError) as e:
      save_adapter(tmp_path / "bad", q)
    assert f"save_adapter: field {KERNEL}{part}" in str(e.value)
    assert "Fix the adapter before saving it" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == []


# --- concurrent writers ---

_WRITER = textwrap.dedent("""
    import pathlib, sys, time
    import jax, jax.numpy as jnp, orbax.checkpoint as ocp, lora_jax as lj
    from lora_jax._src.checkpoint import save_adapter
    root, me, n, trials = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    def wait_for(paths):
      while not all(p.exists() for p in paths):
        time.sleep(0.002)
    save = ocp.Checkpointer.save
    def save_then_wait(self, directory, *args, **kwargs):  # every writer has written
      save(self, directory, *args, **kwargs)                # before any moves it in
      (root / f"written-{trial}-{me}").touch()
      wait_for([root / f"written-{trial}-{k}" for k in range(n)])
    ocp.Checkpointer.save = save_then_wait
    base = {"kernel": jnp.ones((16, 8))}
    p = lj.lora_init(jax.random.key(me), base, lj.LoraConfig(rank=2, targets="kernel"))
    p = jax.tree.map(lambda x: jnp.full_like(x, me + 1.0), p)  # b (and a) hold me + 1
    (root / f"ready-{me}").touch()
    for trial in range(trials):
      wait_for([root / f"go-{trial}"])
      try:
        save_adapter(root / f"ckpt{trial}", p)
        result = "ok"
      except Exception as e:
        result = f"{type(e).__name__}: {e}"
      (root / f"result-{trial}-{me}").write_text(result)
""")


def test_concurrent_create_exactly_one_wins(tmp_path):
  n, trials = 3, 3
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  children = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(k),
                                str(n), str(trials)], cwd=REPO, env=env)
              for k in range(n)]
  try:
    def wait_for(names):
      while not all((tmp_path / name).exists() for name in names):
        assert all(c.poll() is None for c in children), "a writer died"
        time.sleep(0.01)
    wait_for([f"ready-{k}" for k in range(n)])
    for trial in range(trials):
      (tmp_path / f"go-{trial}").touch()
      wait_for([f"result-{trial}-{k}" for k in range(n)])
      results = [(tmp_path / f"result-{trial}-{k}").read_text() for k in range(n)]
      winners = [k for k, r in enumerate(results) if r == "ok"]
      assert len(winners) == 1, results
      path = str(tmp_path / f"ckpt{trial}")
      for k, r in enumerate(results):
        if k != winners[0]:
          assert r.startswith(f"FileExistsError: save_adapter: {path} already exists "
                              "(another save created it while this one was writing); "
                              "nothing was written. Pass overwrite=True"), r
      q = load_adapter(path, {"kernel": jnp.ones((16, 8))})
      np.testing.assert_array_equal(q["kernel"].b, jnp.full((2, 8), winners[0] + 1.0))
      np.testing.assert_array_equal(q["kernel"].a, jnp.full((16, 2), winners[0] + 1.0))
  except BaseException:
    for c in children:
      c.kill()
    raise
  finally:
    for c in children:
      c.wait(timeout=120)
  assert [c.returncode for c in children] == [0] * n
  assert not [name for name in os.listdir(tmp_path) if ".lora_jax-tmp-" in name]


def test_cleanup_spares_a_live_writers_directory(tmp_path):
  final = str(tmp_path / "c")
  with atomic_dir.writing(final) as new:
    os.mkdir(new)
    stale = tmp_path / "c.lora_jax-tmp-deadwriter"  # left by a killed writer: unlocked
    stale.mkdir()
    atomic_dir.clean_stale(final)
    assert os.path.isdir(new) and not stale.exists()
    atomic_dir.create(new, final)
    os.mkdir(new)
    with pytest.raises(FileExistsError):
      atomic_dir.create(new, final)
  assert os.listdir(tmp_path) == ["c"]


def test_without_flock_saves_and_leaves_temporaries(tmp_path, monkeypatch):
  """Where flock is missing, nothing is cleaned: no writer can tell who is alive."""
  monkeypatch.setattr(atomic_dir, "fcntl", None)
  stale = tmp_path / "c.lora_jax-tmp-unknown"
  stale.mkdir()
  path = save_adapter(tmp_path / "c", _adapter())
  load_adapter(path, BASE)
  assert sorted(os.listdir(tmp_path)) == ["c", "c.lora_jax-tmp-unknown"]


def test_manager_step_errors_name_the_step_file(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  mngr = ocp.CheckpointManager(tmp_path / "m")
  save_adapter(mngr, _adapter(), step=3)
  step_dir = str(tmp_path / "m" / "3")
  _edit(step_dir, _set("entries", "dense/kernel", "scale", 9.0))
  with pytest.raises(ValueError) as e:
    load_adapter(mngr, BASE)
  assert f"{_meta(step_dir)}: field {KERNEL}.scale: expected the value it was saved" in str(e.value)
  mngr.close()
