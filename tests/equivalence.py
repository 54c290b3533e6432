"""Float64 equivalence checks for the tests (style.md item 10): one context, one tolerance.

An equivalence test computes the same maths two ways (parallel thoughts vs naive insertion,
sharded vs unsharded, chunked vs unchunked, KV cache vs full forward, jaxstar vs transformers,
...). In float32 the two differ by rounding that depends on summation order, which another CPU
or XLA version may change, so a fixed float32 tolerance is a coin that can land either way. In
float64 that rounding is ~1e-13 relative here, while a real discrepancy shows at 1e-7 or more, so
one tight tolerance separates them on any machine:

  |actual - desired| <= RTOL * |desired| + RTOL * max|desired|     (elementwise, RTOL = 1e-9)

The absolute part is scaled to the largest magnitude compared, so small entries of a large
array (a gradient that is almost zero) are held to the array's scale, not to their own.

Everything compared (params, inputs and jitted functions) must be created inside `with x64():`:
an array made outside is float32, and a function jitted outside is cached for float32.
`assert_close` refuses anything but float64, so a float32 leak cannot pass silently.
"""
from __future__ import annotations

import jax
import numpy as np

RTOL = 1e-9  # fixed up front; a failure at this level is a discrepancy to explain, not loosen
F64 = dict(dtype="float64", param_dtype="float64")  # ModelConfig overrides of a float64 model


def x64():
  """Context manager: JAX with 64-bit types (float64 arrays, float64 jit traces)."""
  return jax.enable_x64(True)


def _scale(desired: np.ndarray) -> float:
  return float(np.max(np.abs(desired))) if desired.size else 0.0


def assert_close(actual, desired, err_msg: str = "") -> None:
  """float64 `actual` equals `desired` to RTOL, relative to each entry and to max|desired|."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  for name, x in (("actual", actual), ("desired", desired)):
    assert x.dtype == np.float64, (f"{err_msg}: {name} is {x.dtype}, not float64: create it "
                                   "inside equivalence.x64()")
  np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=RTOL * _scale(desired),
                             err_msg=err_msg)


def assert_tree_close(actual, desired, err_msg: str = "") -> None:
  """`assert_close` leaf by leaf (each leaf at its own scale); trees must have equal structure."""
  leaves = jax.tree_util.tree_leaves_with_path(desired)
  assert jax.tree.structure(actual) == jax.tree.structure(desired), err_msg
  for (path, want), got in zip(leaves, jax.tree.leaves(actual)):
    assert_close(got, want, f"{err_msg}{jax.tree_util.keystr(path)}")


def assert_far(actual, desired, factor: float = 1e3, err_msg: str = "") -> None:
  """The liveness check: `actual` differs from `desired` by more than `factor` times the
  tolerance of `assert_close`, so a comparison of this kind can fail, and by a wide margin."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  diff = float(np.max(np.abs(actual - desired)))
  bound = factor * RTOL * _scale(desired)
  assert diff > bound, f"{err_msg}: max difference {diff:.3g} <= {bound:.3g}: not a live check"
