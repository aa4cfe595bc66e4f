"""The QLoRA memory proxy on a small Llama shape: NF4 argument bytes scale as expected."""

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from bench import qlora_memory as qm
from lora_jax.models import Llama


def _bytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_nf4_argument_bytes_scale_with_the_quantized_kernels():
  cfg = qm.llama_config("small")
  full = qm.abstract_params(cfg, "full")
  q = qm.abstract_params(cfg, "qlora")
  is_kernel = lambda path: "layers" in path and "proj" in path
  flat_full = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(full)}
  n_kernel = sum(x.size for p, x in flat_full.items() if is_kernel(p))
  other = sum(x.size * 2 for p, x in flat_full.items() if not is_kernel(p))   # bf16
  quantized = [x.w for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
               if isinstance(x, lj.LoraWeight)]
  assert len(quantized) == 7 and all(isinstance(w, lj.QuantizedWeight) for w in quantized)
  qbytes = sum(_bytes(w) for w in quantized)
  assert 8 * qbytes / n_kernel <= 4.13               # NF4 + double-quantized scales
  factors = sum(_bytes((x.a, x.b)) for x in jax.tree.leaves(
      q, is_leaf=lambda x: isinstance(x, lj.LoraWeight)) if isinstance(x, lj.LoraWeight))
  assert _bytes(q) == qbytes + other + factors
  # what XLA counts as arguments of the QLoRA forward is exactly that
  model = Llama(cfg)
  ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  fwd = jax.jit(lj.lora(lambda p, ids: model.apply({"params": p}, ids)))
  args = fwd.lower(q, ids).compile().memory_analysis().argument_size_in_bytes
  assert args == _bytes(q) + 16 * 4
  np.testing.assert_allclose(qbytes / (2 * n_kernel), 4.127 / 16, rtol=0.01)
