"""bench/pod_memory.py on the small Llama shape: per-device bytes are sharded.

The deterministic proxy (XLA ``memory_analysis()`` of an abstract compile) is
asserted; no time is.
"""

import jax.numpy as jnp

from bench import pod_memory as pm, qlora_memory as qm


def test_per_device_arguments_are_the_sharded_params_and_adapter_state():
  res = pm.measure("small", (2, 4), 64, variants=("lora",))
  cfg = qm.llama_config("small")
  params = qm.abstract_params(cfg, "lora")
  frozen = qm._bytes(qm.abstract_params(cfg, "forward"))
  lora = res["lora"]
  # the bf16 base is split 8 ways (every kernel over both mesh axes, the norms whole)
  assert lora["argument_size_in_bytes"] < frozen / 4, (lora, frozen)
  assert res["forward"]["argument_size_in_bytes"] < frozen / 4
  assert lora["alias_size_in_bytes"] > 0          # donated: updated in place
  assert qm._bytes(params) > frozen and jnp.dtype(cfg.param_dtype) == jnp.bfloat16
