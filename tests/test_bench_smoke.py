"""Smoke test of the benchmark suite: ``python -m bench --tiny`` end to end.

Runs the smallest workload of each kind (MLP, scanned decoder) at rank 8 with
one timed round, and checks what does not depend on the machine: every peer
computes the same output as lora_jax, the JSON / markdown / PNG are written
with the machine's description, and XLA's FLOP counts (deterministic) put
lora_jax's train step level with the hand-written factored LoRA and below
the naive W + s·A·B one. No wall-clock time is asserted.
"""

import json

import pytest

from bench import __main__ as cli
from bench import goals


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  assert cli.main(["--tiny", "--ranks", "8", "--rounds", "1", "--out", str(out)]) == 0
  with open(out / "results.json") as f:
    return out, json.load(f)


@pytest.mark.slow  # python -m bench --tiny end to end
def test_writes_json_markdown_and_chart(run):
  out, data = run
  for key in ("platform", "device_kind", "cpu_count", "jax", "flax"):
    assert data["machine"][key] is not None
  assert {r["kind"] for r in data["results"]} == {"mlp", "decoder"}
  assert (out / "results.png").stat().st_size > 0
  assert "### Goals" in (out / "results.md").read_text()


@pytest.mark.slow  # python -m bench --tiny end to end
def test_peers_compute_the_same_output(run):
  _, data = run
  for res in data["results"]:
    expected = {"naive", "hand", "qwix"} | ({"nnx"} if res["kind"] == "mlp" else set())
    assert expected <= set(res["max_rel_diff"]), res["skipped"]
    for peer in expected:
      assert res["max_rel_diff"][peer] <= res["tolerance"], (res["workload"], peer)
    assert set(res["skipped"]) <= {"nnx"}


@pytest.mark.slow  # python -m bench --tiny end to end
def test_every_contender_was_measured(run):
  _, data = run
  for res in data["results"]:
    for name in cli.TINY_TRAIN:
      entry = res["train"][name]
      assert len(entry["time"]["times_s"]) == 1
      assert entry["flops"] > 0 and entry["opt_state_bytes"] >= 0
    for phase in ("prefill", "decode"):
      assert {"lora_jax", "merged", "hand"} <= set(res[phase])
    assert res["merge"]["memory"]["peak_bytes"] > 0
    assert {g["goal"] for g in res["goals"]} >= {"train wall / hand-written",
                                                 "merge / copy of the same bytes"}


@pytest.mark.slow  # python -m bench --tiny end to end
def test_flops_match_the_hand_written_lora(run):
  _, data = run
  for res in data["results"]:
    tr = res["train"]
    assert tr["lora_jax"]["flops"] <= 1.01 * tr["hand"]["flops"], res["workload"]
    assert tr["lora_jax"]["flops"] < tr["naive"]["flops"], res["workload"]
    assert tr["lora_jax"]["opt_state_bytes"] < tr["full"]["opt_state_bytes"]


def test_goal_rows_have_verdicts():
  row = goals._row("x", 1.0, 0.5)
  assert row["met"] is True
  assert goals._row("x", 1.0, 2.0)["met"] is False
  assert goals._row("x", 1.0, None)["met"] is None
