"""examples/multi_adapter_serving.py: one mixed batch served with a stack of four
adapters and the base; every row equals its adapter (or the base) run alone."""

import os
import pathlib
import re
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
import multi_adapter_serving as mas  # noqa: E402


def test_help_lists_every_flag_with_help_text(monkeypatch, capsys):
  made = []

  def spy(*args, **kwargs):
    made.append(_common.parser(*args, **kwargs))
    return made[-1]
  monkeypatch.setattr(mas, "parser", spy)
  with pytest.raises(SystemExit) as exc:
    mas.main(["--help"])
  assert exc.value.code == 0
  assert "--fast" in capsys.readouterr().out
  missing = [a.option_strings[0] for a in made[-1]._actions if a.option_strings and not a.help]
  assert not missing, f"flags without help text: {missing}"


@pytest.mark.slow  # runs the example end to end
def test_mixed_batch_rows_equal_each_adapter_alone(tmp_path, capsys):
  r = mas.main(["--fast", "--quiet", "--out", str(tmp_path)])
  rows = r["rows"]
  assert [row["id"] for row in rows] == r["ids"]
  assert {row["adapter"] for row in rows} == set(mas.TASKS) | {"base"}
  for i, row in enumerate(rows):
    # the row of the mixed batch: the same tokens as its adapter (or the base) alone
    np.testing.assert_array_equal(row["tokens"], row["alone"], err_msg=f"row {i}")
    assert row["same_as_alone"]
  # the adapters act: rows with the same word prompt differ by adapter
  outputs = {row["adapter"]: row["output"] for row in rows}
  assert len(set(outputs.values())) >= 4, outputs
  printed = capsys.readouterr().out
  assert "adapter" in printed and "prompt" in printed and "output" in printed
  check_printed_rates(printed)
  assert set(r["throughput"]) == {"base model", "one adapter (unstacked)", "1 distinct",
                                  "2 distinct", "4 distinct"}
  assert all(v > 0 for v in r["throughput"].values())
  assert os.path.getsize(r["png"]) > 0
  # training lowered every task's loss
  for name, losses in r["losses"].items():
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), name


def check_printed_rates(printed: str) -> None:
  """Every printed throughput is a median of per-round rates: positive, and
  within 10x of the others (a difference of medians once printed 4e10 tokens/s)."""
  table = printed.split("generation throughput")[1].split("trained in")[0]
  rates = {name: float(v.replace(",", "")) for name, v in re.findall(
      r"^\s*(base model|one adapter \(unstacked\)|\d distinct)\s+([\d,.]+)\s*$", table, re.M)}
  assert len(rates) == 5, table
  assert min(rates.values()) > 0, rates
  assert max(rates.values()) < 10 * min(rates.values()), rates
