"""examples/qlora_llama.py: NF4 and bf16 bases fine-tune alike; errors per layer; PNG."""

import os
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import qlora_llama  # noqa: E402


def test_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as exc:
    qlora_llama.main(["--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  assert "--fast" in out and "--block-size" in out and "NF4" in out


@pytest.mark.slow  # runs the example end to end
def test_fast_run_compares_nf4_and_bf16_bases(tmp_path):
  res = qlora_llama.main(["--fast", "--quiet", "--out", str(tmp_path)])
  assert os.path.getsize(res["png"]) > 0
  assert set(res["errors"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj"}
  for per_layer in res["errors"].values():
    assert len(per_layer) == 2 and all(0.03 < e < 0.2 for e in per_layer)
  for name in ("bf16", "nf4"):
    losses = res["losses"][name]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])       # the adapters learn
  assert abs(res["final"]["nf4"] - res["final"]["bf16"]) < 0.1
