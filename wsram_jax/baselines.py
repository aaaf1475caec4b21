"""Reward baselines for the VAR estimator (Eqn 5; Section 4.4): control variates b with `E[b d log p(a)] = 0`.

The VAR gradient `1/M sum_m [d log p(y|a^m) + (log p(y|a^m) - b) d log p(a^m)]` stays unbiased for any b that
does not depend on the sample a^m; a b close to E[log p(y|a) | I] lowers its variance. Three kinds:

* none: b = 0 (`no_baseline`, or pass 0 to `estimators.variational_loss`);
* a running average of past rewards, as a stateful transform in the optax style (`moving_average`): a
  NamedTuple of pure functions `init() -> state` and `update(rewards, state) -> (value, state)`. The value
  returned is the average *before* this batch, so it is independent of this batch's samples;
* a learned, input-dependent b(I) (a network head), trained by `baseline_loss` to regress the reward.

`estimators.leave_one_out_baseline` gives a fourth, multi-sample one.
"""
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = chex.Array


class BaselineTransform(NamedTuple):
  """A stateful baseline as pure functions.

  init: `() -> state`.
  update: `(rewards [...], state) -> (value, new_state)`: value is the scalar baseline to use for this batch
    (computed from earlier batches only), new_state includes this batch's rewards.
  """
  init: Callable[[], chex.ArrayTree]
  update: Callable[[Array, chex.ArrayTree], tuple[Array, chex.ArrayTree]]


class NoBaselineState(NamedTuple):
  """No state."""


def no_baseline() -> BaselineTransform:
  """b = 0: the plain Eqn 5 estimator."""

  def init():
    return NoBaselineState()

  def update(rewards, state):
    del rewards
    return jnp.zeros(()), state

  return BaselineTransform(init, update)


class MovingAverageState(NamedTuple):
  """`average`: the exponential moving average (without bias correction); `count`: batches seen."""
  average: Array
  count: Array


def moving_average(decay: float = 0.99, *, init_value: float = 0.0,
                   debias: bool = True) -> BaselineTransform:
  """An exponential moving average of the mean reward of each batch.

  After batches with mean rewards `x_1..x_k`, the average is `a_k = decay a_{k-1} + (1 - decay) x_k` with
  `a_0 = init_value`. With `debias` (as in Adam) the value is `(a_k - decay^k a_0) / (1 - decay^k)`, the
  weighted mean of the rewards seen so far with weights `decay^(k-i)`, which does not lean towards
  `init_value`; before any batch the value is `init_value` either way. `update` returns the value *before*
  this batch, so the baseline never depends on the samples it is used with.

  Args:
    decay: in [0, 1): the weight of the past; 0 uses the previous batch's mean.
    init_value: the average before any batch (e.g. log(1/num_classes) for classification rewards).
    debias: correct the average for its initial value.

  Returns:
    A `BaselineTransform`.
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1); got {decay}.")

  def value(state: MovingAverageState) -> Array:
    if not debias:
      return state.average
    decay_k = jnp.asarray(decay, state.average.dtype) ** state.count
    corrected = (state.average - decay_k * init_value) / jnp.maximum(1.0 - decay_k, 1e-12)
    return jnp.where(state.count > 0, corrected, state.average)

  def init() -> MovingAverageState:
    return MovingAverageState(average=jnp.asarray(init_value, jnp.float32), count=jnp.zeros((), jnp.int32))

  def update(rewards: Array, state: MovingAverageState) -> tuple[Array, MovingAverageState]:
    chex.assert_type(rewards, float)
    batch_mean = jnp.mean(jax.lax.stop_gradient(rewards)).astype(state.average.dtype)
    new_state = MovingAverageState(
        average=decay * state.average + (1.0 - decay) * batch_mean, count=state.count + 1)
    return value(state), new_state

  return BaselineTransform(init, update)


def baseline_loss(baseline_pred: Array, target: Array) -> Array:
  """Regression loss of a learned baseline b(I): `mean 1/2 (b - stop_gradient(target))^2`.

  d loss / d baseline_pred = (baseline_pred - target) / n over the n broadcast elements; no gradient to the
  target (the reward log p(y|a^m), whose gradient belongs to the estimator).

  Args:
    baseline_pred: `[...]` per example, or `[..., M]` per sample.
    target: `[..., M]` rewards (or the same shape as baseline_pred).

  Returns:
    The scalar loss.
  """
  chex.assert_type([baseline_pred, target], float)
  target = jax.lax.stop_gradient(target)
  if baseline_pred.ndim == target.ndim - 1:
    baseline_pred = baseline_pred[..., None]
  return 0.5 * jnp.mean((baseline_pred - target) ** 2)
