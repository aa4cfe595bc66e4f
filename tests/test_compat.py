"""The supported JAX range: refused below it, named in errors above it, and
the one module where versions differ (``_src/compat.py``) reading real jaxprs."""

import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
from lora_jax._src import compat, interpreter

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _lora_matmul():
  params = {"w": jnp.ones((4, 3))}
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=2, targets="w"))
  return (lambda p, x: x @ p["w"]), lp, jnp.ones((2, 4))


@pytest.mark.parametrize("old", ["0.6.2", "0.7.1", "0.4.38"])
def test_older_jax_is_refused_naming_both_versions(old):
  with pytest.raises(ImportError) as e:
    compat.check_jax_version(old)
  msg = str(e.value)
  assert f"found jax {old}" in msg
  assert f"JAX >= {compat.OLDEST}" in msg and compat.NEWEST_TESTED in msg
  assert "pip install -U 'jax>=" in msg


@pytest.mark.parametrize("ok", [compat.OLDEST, "0.9.0.1", compat.NEWEST_TESTED,
                                "0.11.0.dev20261201", "1.0.0"])
def test_supported_and_newer_jax_import(ok):
  compat.check_jax_version(ok)  # no error: a newer JAX runs


def test_import_lora_jax_on_an_old_jax_fails_first_with_the_versions():
  """The check runs before anything reads JAX's internals: the user sees it,
  not an AttributeError from deep in the interpreter."""
  code = "import jax; jax.__version__ = '0.6.2'; import lora_jax"
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("ImportError: lora_jax needs JAX >= 0.7.2"), proc.stderr[-2000:]
  assert "found jax 0.6.2" in last


def test_a_missing_param_names_the_primitive_the_version_and_the_range(monkeypatch):
  monkeypatch.setattr(compat, "jax_version", lambda: "0.11.0")
  eqn = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((2, 3)), jnp.ones((3, 4))).eqns[0]
  params = compat.checked(eqn).params
  assert params.get("renamed_in_0_11") is None  # optional reads stay silent
  with pytest.raises(compat.JaxCompatError) as e:
    params["renamed_in_0_11"]
  msg = str(e.value)
  for part in ("`dot_general`", "'renamed_in_0_11'", "JAX 0.11.0", "dimension_numbers",
               f"JAX {compat.OLDEST} to {compat.NEWEST_TESTED}"):
    assert part in msg, (part, msg)


def _rule_reading(read):
  def rule(ctx, eqn, invals):
    read(eqn)
    raise AssertionError("unreachable: the read above fails")
  return rule


def test_a_rule_reading_a_renamed_param_fails_clearly(monkeypatch):
  fn, lp, x = _lora_matmul()
  monkeypatch.setitem(interpreter.RULES, "dot_general",
                      _rule_reading(lambda eqn: eqn.params["lhs_contracting"]))
  with pytest.raises(compat.JaxCompatError, match=r"`dot_general` equation has no param "
                     r"'lhs_contracting' on JAX .* \(it has: dimension_numbers"):
    lj.lora(fn)(lp, x)


def test_a_changed_attribute_on_a_newer_jax_names_the_version(monkeypatch):
  fn, lp, x = _lora_matmul()
  bad = _rule_reading(lambda eqn: eqn.params["dimension_numbers"].lhs_contracting)
  monkeypatch.setitem(interpreter.RULES, "dot_general", bad)
  monkeypatch.setattr(compat, "jax_version", lambda: "0.11.0")
  with pytest.raises(compat.JaxCompatError) as e:
    lj.lora(fn)(lp, x)
  msg = str(e.value)
  assert "rule for `dot_general`" in msg and "AttributeError" in msg
  assert "JAX 0.11.0, newer than" in msg and compat.NEWEST_TESTED in msg
  assert isinstance(e.value.__cause__, AttributeError)
  # inside the tested range the same error is lora_jax's own bug: raised as is
  monkeypatch.setattr(compat, "jax_version", lambda: compat.NEWEST_TESTED)
  with pytest.raises(AttributeError):
    lj.lora(fn)(lp, x)


@pytest.mark.parametrize("version,noted", [("0.11.0", True), (compat.NEWEST_TESTED, False)])
def test_a_primitive_without_a_rule_names_the_version_only_when_untested(
    monkeypatch, version, noted):
  monkeypatch.setattr(compat, "jax_version", lambda: version)
  params = {"w": jnp.ones((4, 3))}
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=2, targets="w"))
  with pytest.raises(NotImplementedError) as e:
    lj.lora(lambda p: lax.cumsum(p["w"], axis=0), strict=True)(lp)
  assert ("newer than lora_jax is tested on" in str(e.value)) == noted
  assert "`cumsum` has no factored rule" in str(e.value)


def test_dropvar_is_jax_own_class():
  """``compat.DropVar`` is JAX's class on this version (0.10 moved it to
  ``jax.extend.core``). JAX 0.7 -- 0.9 mark an unused output, like the
  sorted keys below, with one; 0.10's ``make_jaxpr`` leaves a plain ``Var``."""
  from jax._src import core
  assert compat.DropVar is core.DropVar
  closed = jax.make_jaxpr(lambda k, v: lax.sort((k, v), num_keys=1)[1])(
      jnp.arange(3.0), jnp.arange(3.0))
  used = closed.eqns[0].outvars[1]
  assert used in closed.jaxpr.outvars and not isinstance(used, compat.DropVar)


def test_a_dropped_output_next_to_a_lazy_kernel():
  """The write-back skips a dropped output (JAX < 0.10 failed here)."""
  params = {"w": jnp.arange(12.0).reshape(4, 3)}
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=2, targets="w"))

  def fn(p, k):
    return lax.sort((k, p["w"][:, 0]), num_keys=1)[1]
  k = jnp.array([3.0, 1.0, 2.0, 0.0])
  with pytest.warns(lj.LoraFallbackWarning):
    np.testing.assert_array_equal(lj.lora(fn)(lp, k), fn(lj.merge(lp), k))


def test_bind_params_takes_both_return_shapes():
  eqn = jax.make_jaxpr(jnp.sin)(1.0).eqns[0]
  assert compat.bind_params(eqn) == ((), dict(eqn.params))
  old = types.SimpleNamespace(  # JAX < 0.9: get_bind_params -> (subfuns, params)
      primitive=types.SimpleNamespace(get_bind_params=lambda p: ([], p)), params={"a": 1})
  assert compat.bind_params(old) == ((), {"a": 1})


def test_jaxprs_in_params_finds_a_jit_body():
  closed = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x))(1.0)
  subs = [s for e in closed.eqns for s in compat.jaxprs_in_params(e.params)]
  assert [e.primitive.name for s in subs for e in s.eqns] == ["sin"]


def _pins(text, pattern):
  return dict(re.findall(pattern, text, re.M))


def test_lower_bounds_are_what_the_oldest_job_installs():
  """pyproject's lower bounds = .ci/oldest.txt's exact pins = compat.OLDEST."""
  pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
  deps = pyproject[pyproject.index("dependencies = ["):pyproject.index("[project.optional")]
  lower = _pins(deps, r'^\s*"([\w-]+)>=([\d.]+)')
  oldest = _pins((ROOT / ".ci" / "oldest.txt").read_text(encoding="utf-8"),
                 r"^([\w-]+)==([\d.]+)")
  assert lower["jax"] == oldest["jax"] == oldest["jaxlib"] == compat.OLDEST
  for name in ("flax", "optax", "orbax-checkpoint", "chex"):
    assert lower[name] == oldest[name], name
  assert not re.search(r'"jax>=[\d.]+,\s*<', deps), "JAX's upper bound is left open"
