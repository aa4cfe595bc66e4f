"""Stack strategies (gather, onehot, segments): exact on every layer kind,
chosen by a cost model, and forced ones that do not fit are clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import stack_strategies as ss
from test_stack import KINDS, _batch, _three

# 12 rows, 3 adapters: segments tiles of 2 rows, groups of 3-4 rows, two -1 rows
IDS = np.array([0, 2, -1, 1, 0, -1, 2, 2, 0, 1, 1, 0], np.int32)


def _case(kind):
  fn, params, args, ads = _three(kind)
  return fn, params, _batch(args, len(IDS)), ads


@pytest.mark.parametrize("strategy", ["onehot", "segments"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_strategy_rows_equal_each_adapter_alone(kind, strategy):
  fn, params, args, ads = _case(kind)
  stacked = lj.attach(params, lj.stack_adapters(ads))
  run = lj.lora(fn, strict=True, stack_strategy=strategy)
  with ss.recording() as log:
    mixed = jax.jit(run)(stacked, *args, adapter_ids=jnp.asarray(IDS))
  assert log and {c["strategy"] for c in log} == {strategy}, log
  alone = {k: fn(params, *args) if k == -1 else
           lj.lora(fn)(lj.attach(params, ads[k]), *args) for k in set(IDS.tolist())}
  for i, k in enumerate(IDS):
    for m, a in zip(jax.tree.leaves(mixed), jax.tree.leaves(alone[k])):
      if k == -1:  # the base: the branch adds exact zeros
        np.testing.assert_array_equal(np.asarray(m[i]), np.asarray(a[i]))
      else:
        np.testing.assert_allclose(np.asarray(m[i]), np.asarray(a[i]),
                                   rtol=1e-5, atol=1e-6)
