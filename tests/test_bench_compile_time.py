"""Smoke test of ``python -m bench.compile_time`` at toy size: the three
programs it times compute the same thing, and it prints its table. No
wall-clock time is asserted."""

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from bench import compile_time as ct


def test_lora_and_hand_written_programs_agree():
  x = jnp.linspace(-1, 1, 2 * 16 * 32).reshape(2, 16, 32)
  for stacked in (False, True):
    params = ct._params(jax.random.key(0), 2, 32, stacked)
    layouts = {r".*layers/(wq|wk|wv|wo|up|down)": "sio"} if stacked else None
    lp = lj.lora_init(jax.random.key(1), params,
                      lj.LoraConfig(rank=4, targets=ct.TARGETS, layouts=layouts))
    lp = jax.tree.map(lambda n: n.replace(b=n.b + 0.05) if isinstance(n, lj.LoraWeight) else n,
                      lp, is_leaf=lambda n: isinstance(n, lj.LoraWeight))
    f = ct.make_forward(stacked)
    got = lj.lora(f, strict=True)(lp, x)
    np.testing.assert_allclose(got, f(ct.hand_combine(*ct.hand_split(lp)), x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, f(lj.merge(lp), x), rtol=1e-4, atol=1e-4)
    ab, rest = ct.hand_split(lp)
    t, fr = lj.split(lp)
    new_lora = ct.make_step(stacked, True)(t, fr, x)
    new_hand = ct.make_step(stacked, "hand")(ab, rest, x)
    got = ct.hand_split(lj.combine(new_lora, fr))[0]  # the updated (A, B) pairs
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(new_hand), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_prints_the_table(capsys):  # one scanned layer: a few seconds
  ct.main(["--layers", "1", "--d", "32", "--reps", "1", "--only", "scanned forward"])
  out = capsys.readouterr().out
  assert "| scanned forward |" in out and "lora(f) ÷ hand" in out
