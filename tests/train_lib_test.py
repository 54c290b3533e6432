"""Tests of the shared training pieces: schedule, decay mask, accumulation, NaN handling.

Gradient accumulation against one big batch is an equivalence test: float64, compared with
`equivalence.assert_close` (1e-9, relative to the compared magnitude; tests/equivalence.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxstar import train_lib
from tests.equivalence import assert_close, assert_far, x64


def _optim(**kw):
  return train_lib.OptimConfig(**{**dict(lr=1e-2, warmup_steps=4, schedule="cosine",
                                         end_lr_factor=0.1, weight_decay=0.1, clip_norm=1.0),
                                  **kw})


def test_schedule_warms_up_then_decays():
  sched = train_lib.learning_rate_schedule(_optim(), num_steps=20)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(4)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(20)), 1e-3, rtol=1e-5)
  with pytest.raises(ValueError, match="optim.schedule='step'"):
    train_lib.learning_rate_schedule(_optim(schedule="step"), 10)


def test_weight_decay_mask():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}
  assert train_lib.weight_decay_mask(params, "matrices") == {
      "dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
  assert train_lib.weight_decay_mask(params, "all_but_bias") == {
      "dense": {"kernel": True, "bias": False}, "norm": {"scale": True}}


def _linear_loss(params, batch, rng):
  del rng
  pred = batch["x"] @ params["w"]
  return jnp.mean((pred - batch["y"]) ** 2), {"rows": jnp.asarray(batch["x"].shape[0], pred.dtype)}


def test_gradient_accumulation_equals_one_big_batch():
  with x64():
    params = {"w": jax.random.normal(jax.random.key(0), (3, 2), jnp.float64)}
    batch = {"x": jax.random.normal(jax.random.key(1), (8, 3), jnp.float64),
             "y": jax.random.normal(jax.random.key(2), (8, 2), jnp.float64)}
    opt = optax.sgd(0.1)
    results = []
    for accum in (1, 4):
      step = jax.jit(train_lib.make_train_step(_linear_loss, opt, grad_accum=accum))
      state, metrics = step(train_lib.init_train_state(params, opt, 0), batch)
      results.append((np.asarray(state.params["w"]), np.asarray(metrics["loss"]),
                      float(metrics["rows"])))
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
      jax.jit(train_lib.make_train_step(_linear_loss, opt, grad_accum=3))(
          train_lib.init_train_state(params, opt, 0), batch)
  (w1, loss1, rows1), (w4, loss4, rows4) = results
  assert_close(w4, w1, "params")
  assert_close(loss4, loss1, "loss")
  # Live: 4 micro-batches of 2 rows really ran, and the update moved the params.
  assert (rows1, rows4) == (8.0, 2.0)
  assert_far(w1, np.asarray(params["w"]), err_msg="update")


def test_nonfinite_loss_stops_or_skips():
  params = {"w": jnp.ones((3, 2))}
  batch = {"x": jnp.full((4, 3), jnp.nan), "y": jnp.zeros((4, 2))}
  opt = optax.sgd(0.1)
  state = train_lib.init_train_state(params, opt, 0)
  new, metrics = jax.jit(train_lib.make_train_step(_linear_loss, opt, skip_nonfinite=True))(
      state, batch)
  np.testing.assert_array_equal(new.params["w"], params["w"])  # update skipped
  assert int(new.step) == 1 and int(metrics["skipped"]) == 1
  train_lib.check_finite(jax.device_get(metrics), 1, skip_nonfinite=True)
  with pytest.raises(train_lib.NonFiniteError, match="step 1: loss is nan"):
    train_lib.check_finite(jax.device_get(metrics), 1, skip_nonfinite=False)
