"""Smoke test of ``python -m bench.serving --toy``: every contender is timed, the
ratios and goal rows are there, and the .md / .json are written. No times asserted."""

import json

import pytest

from bench import serving


@pytest.mark.slow  # python -m bench.serving --toy end to end
def test_toy_run_writes_results(tmp_path):
  assert serving.main(["--toy", "--out", str(tmp_path)]) == 0
  [md] = tmp_path.glob("serving-toy-*.md")
  [js] = tmp_path.glob("serving-toy-*.json")
  data = json.loads(js.read_text())
  names = {"base", "single", "merged"} | {
      f"{s}-{n}" for n in data["ns"] for s in ("mixed", "gather", "onehot", "segments")} | {
      f"loop-{n}" for n in data["ns"] if n > 1}
  for phase in ("prefill", "decode"):
    assert set(data["phases"][phase]) == names
    assert all(v["tokens_per_s"] > 0 and len(v["times_s"]) == data["rounds"]
               for v in data["phases"][phase].values())
  assert "decode: mixed-2 / loop-2" in data["ratios"]
  assert data["concat"]["concat_over_separate"] > 0
  for phase in ("prefill", "decode"):
    cost = data[f"{phase}_cost"]
    gather = [cost[f"gather-{n}"]["flops"] for n in data["ns"]]
    assert max(gather) <= 1.05 * min(gather)  # gather: FLOPs do not grow with N
    assert all(sum(c[phase].values()) > 0 and set(c[phase]) <= {"gather", "onehot", "segments"}
               for c in data["choices"].values())
    assert all(cost[f"{s}-{n}"]["bytes_accessed"] > 0 for n in data["ns"]
               for s in ("mixed", "onehot", "segments"))
  text = md.read_text()
  assert "| goal |" in text and "auto chose" in text and "x·[W | A]" in text and data["machine"]["platform"] in text
