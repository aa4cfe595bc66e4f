"""What differs between the JAX releases lora_jax supports, in one place.

lora_jax reads jaxprs through ``jax.extend.core``, the part of JAX that moves
most between releases. Every read that differs between the supported
releases is written here, once, for the interpreter (``interpreter.py``); the
rules get each equation's params through ``Params`` (via ``run_rule``), so a
param a newer JAX renamed is reported here too, with no edit to the rules.

Supported: JAX ``OLDEST`` (the oldest release whose flax / optax / orbax
pairing installs, tested by CI's oldest-pins job, ``.ci/oldest.txt``)
through ``NEWEST_TESTED`` (the main suite). What differs (JAX 0.7.2, 0.8.3,
0.9.2 and 0.10.2 were compared):

- ``DropVar`` (an unused output): in ``jax.extend.core`` from JAX 0.10, in
  ``jax._src.core`` before.
- ``jaxprs_in_params``: likewise.
- ``Primitive.get_bind_params``: returns ``(subfuns, params)`` before JAX
  0.9, the params alone from 0.9 (``bind_params`` gives both shapes one).

A JAX older than ``OLDEST`` is refused at ``import lora_jax``. A newer one
runs; where the interpreter then meets an equation param or attribute it
does not know, its error names the JAX version and the tested range
(``JaxCompatError``).
"""

import re

import jax

OLDEST = "0.7.2"  # = pyproject's lower bound = .ci/oldest.txt's pin
NEWEST_TESTED = "0.10.2"  # the newest JAX the package index served when tested


def jax_version() -> str:
  """The installed JAX's version string (a seam the tests monkeypatch)."""
  return jax.__version__


def version_tuple(version: str) -> tuple[int, int, int]:
  """``"0.9.0.1"`` -> ``(0, 9, 0)``; ``"0.11.0.dev20261201"`` -> ``(0, 11, 0)``.

  >>> version_tuple("0.10.2"), version_tuple("0.11.0rc1")
  ((0, 10, 2), (0, 11, 0))
  """
  m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
  if m is None:
    raise ValueError(f"not a JAX version: {version!r} (expected e.g. '0.10.2')")
  return int(m[1]), int(m[2]), int(m[3] or 0)


def supported_range() -> str:
  """The JAX releases lora_jax is tested on, as a sentence fragment."""
  return f"JAX {OLDEST} to {NEWEST_TESTED}"


def check_jax_version(version: str | None = None) -> None:
  """Refuse a JAX older than ``OLDEST``, naming both versions and the fix.

  >>> check_jax_version("0.10.2")   # in range: nothing happens
  >>> check_jax_version("0.6.2")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ImportError: lora_jax needs JAX >= 0.7.2 (tested: JAX 0.7.2 to 0.10.2); found jax 0.6.2. ...
  """
  version = jax_version() if version is None else version
  if version_tuple(version) < version_tuple(OLDEST):
    raise ImportError(
        f"lora_jax needs JAX >= {OLDEST} (tested: {supported_range()}); found jax "
        f"{version}. Its interpreter reads jaxprs through jax.extend.core, which "
        f"older releases lay out differently. Fix: pip install -U 'jax>={OLDEST}' "
        "(with flax/optax/orbax-checkpoint releases that declare support for it).")


def untested_note(version: str | None = None) -> str:
  """A sentence for error messages when JAX is newer than tested, else ``""``."""
  version = jax_version() if version is None else version
  if version_tuple(version) <= version_tuple(NEWEST_TESTED):
    return ""
  return (f" Note: this is JAX {version}, newer than lora_jax is tested on "
          f"({supported_range()}); if JAX renamed a primitive or param, pin "
          f"jax=={NEWEST_TESTED} or report it with this message.")


check_jax_version()  # before anything reads JAX's internals

from jax.extend import core as jex_core  # noqa: E402

try:
  DropVar = jex_core.DropVar  # JAX >= 0.10
except AttributeError:
  from jax._src.core import DropVar  # noqa: F401  JAX 0.7 -- 0.9

try:
  jaxprs_in_params = jex_core.jaxprs_in_params  # JAX >= 0.10
except AttributeError:
  from jax._src.core import jaxprs_in_params  # noqa: F401  JAX 0.7 -- 0.9

Literal = jex_core.Literal
Var = jex_core.Var


def bind_params(eqn) -> tuple[tuple, dict]:
  """``(subfuns, params)`` to rebind ``eqn``'s primitive with.

  ``Primitive.get_bind_params`` returned ``(subfuns, params)`` before JAX 0.9
  (``subfuns`` empty for every primitive lora_jax meets) and returns the
  params alone since.
  """
  out = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(out, tuple):
    subfuns, params = out
    return tuple(subfuns), params
  return (), out


class JaxCompatError(RuntimeError):
  """The interpreter met a JAX internal it does not know (a param, an attribute)."""


class Params(dict):
  """An equation's params; a missing one raises ``JaxCompatError``, naming
  the primitive, the params there are, the JAX version and the tested range.
  (``.get`` with a default stays silent: those reads are optional.)"""

  def __init__(self, params, primitive: str):
    super().__init__(params)
    self.primitive = primitive

  def __missing__(self, key):
    raise JaxCompatError(
        f"lora: the `{self.primitive}` equation has no param {key!r} on JAX "
        f"{jax_version()} (it has: {', '.join(sorted(self))}); lora_jax is tested "
        f"with {supported_range()}, where it has. Install a tested JAX, or report "
        "this message.")


def checked(eqn):
  """``eqn`` with its params as ``Params`` (missing reads explain themselves)."""
  if isinstance(eqn.params, Params):
    return eqn
  return eqn.replace(params=Params(eqn.params, eqn.primitive.name))


def run_rule(rule, ctx, eqn, invals):
  """``rule(ctx, eqn, invals)``; on a JAX newer than tested, an attribute or
  key the rule reads and JAX no longer has is reported with the version."""
  try:
    return rule(ctx, checked(eqn), invals)
  except (AttributeError, KeyError) as e:
    note = untested_note()
    if not note:
      raise  # inside the tested range such an error is lora_jax's own bug
    raise JaxCompatError(
        f"lora: the rule for `{eqn.primitive.name}` failed reading JAX's "
        f"internals ({type(e).__name__}: {e}).{note}") from e
