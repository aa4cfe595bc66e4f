"""``bench/peft.py``'s measurement paths: the JAX contenders' fresh-process RSS
counts no torch, and the step it times is the one it builds."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_jax_config_is_the_hf_config_without_transformers():
  """The JAX contenders build their Flax config from plain fields (importing
  transformers' config pulls in torch, ~290 MiB of the RSS measured), and
  those fields are the HF model's."""
  from bench import peft as bp
  from lora_jax.models import LlamaConfig
  for shape in bp.SHAPES:
    ours = LlamaConfig.from_hf(bp.hf_config_dict(shape))
    assert ours.head_dim is None  # transformers writes the derived head_dim out
    assert ours.replace(head_dim=ours.head_size) == LlamaConfig.from_hf(
        bp.hf_config(shape).to_dict())


@pytest.mark.slow  # a fresh process builds, compiles and steps the small model
def test_rss_of_a_jax_contender_is_measured_without_torch():
  """``--rss-one lora_jax`` runs steps in a process that never imports torch
  (asserted inside) and reports its peak RSS with XLA's temporaries."""
  out = subprocess.run(
      [sys.executable, "-m", "bench.peft", "--rss-one", "lora_jax", "--shapes", "small",
       "--rss-steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["name"] == "lora_jax" and got["peak_rss_mib"] > 0
  assert got["xla"]["temp_bytes"] > 0 and got["xla"]["output_bytes"] < 2**20 * 8
