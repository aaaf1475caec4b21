"""Reward baselines for VAR: the moving average's init, decay and debias semantics, and the learned one's loss."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from wsram_jax import baselines


def _run(transform, batches):
  """Feeds the batches through update; returns the values it hands out (one per batch) and the final state."""
  state = transform.init()
  values = []
  for batch in batches:
    value, state = transform.update(jnp.asarray(batch, jnp.float32), state)
    values.append(float(value))
  return values, state


class MovingAverageTest(parameterized.TestCase):

  def test_no_baseline_is_zero(self):
    values, state = _run(baselines.no_baseline(), [[1.0, 2.0], [3.0, 4.0]])
    self.assertEqual(values, [0.0, 0.0])
    self.assertEqual(state, baselines.NoBaselineState())

  @parameterized.parameters(True, False)
  def test_init_value_before_any_batch(self, debias):
    transform = baselines.moving_average(0.9, init_value=-2.3, debias=debias)
    values, _ = _run(transform, [[5.0, 7.0]])
    np.testing.assert_allclose(values, [-2.3], rtol=1e-6)

  def test_decay_semantics_without_debias(self):
    transform = baselines.moving_average(0.9, init_value=1.0, debias=False)
    values, state = _run(transform, [[2.0, 4.0], [0.0, 2.0], [5.0, 5.0]])
    a1 = 0.9 * 1.0 + 0.1 * 3.0
    a2 = 0.9 * a1 + 0.1 * 1.0
    # Each batch gets the average of the batches *before* it.
    np.testing.assert_allclose(values, [1.0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(state.average, 0.9 * a2 + 0.1 * 5.0, rtol=1e-6)
    self.assertEqual(int(state.count), 3)

  def test_debias_gives_the_decayed_mean_of_past_batches(self):
    transform = baselines.moving_average(0.5, init_value=10.0, debias=True)
    values, _ = _run(transform, [[1.0], [3.0], [0.0]])
    np.testing.assert_allclose(values, [10.0, 1.0, (0.5 * 1.0 + 3.0) / 1.5], rtol=1e-6)

  @parameterized.parameters(True, False)
  def test_converges_to_the_mean_of_a_stream(self, debias):
    transform = baselines.moving_average(0.9, init_value=0.0, debias=debias)
    rewards = -1.7 + 0.5 * np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)

    @jax.jit
    def run(rewards):
      def step(state, batch):
        value, state = transform.update(batch, state)
        return state, value
      return jax.lax.scan(step, transform.init(), rewards)

    state, values = run(rewards)
    self.assertLess(abs(float(values[-1]) + 1.7), 0.1)
    if debias:  # A constant stream: exact from the first batch on.
      _, constant = run(jnp.full((5, 3), -1.7))
      np.testing.assert_allclose(constant[1:], -1.7, rtol=1e-5)
    self.assertEqual(int(state.count), 300)

  def test_decay_must_be_in_range(self):
    with self.assertRaises(ValueError):
      baselines.moving_average(1.0)


class BaselineLossTest(parameterized.TestCase):

  def test_value_and_gradients(self):
    pred = jnp.array([0.5, -1.0, 2.0])
    target = jnp.array([[1.0, 0.0], [-1.0, -3.0], [2.0, 2.0]])
    loss, grads = jax.value_and_grad(baselines.baseline_loss, argnums=(0, 1))(pred, target)
    diff = np.asarray(pred)[:, None] - np.asarray(target)
    np.testing.assert_allclose(loss, 0.5 * np.mean(diff**2), rtol=1e-6)
    np.testing.assert_allclose(grads[0], diff.sum(-1) / 6, rtol=1e-6)
    np.testing.assert_array_equal(grads[1], np.zeros((3, 2)))  # stop_gradient on the target

  def test_per_sample_prediction(self):
    pred = jnp.array([[0.0, 1.0]])
    target = jnp.array([[1.0, 1.0]])
    np.testing.assert_allclose(baselines.baseline_loss(pred, target), 0.25, rtol=1e-6)
