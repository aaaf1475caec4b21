"""Section 4.5's exploration heuristics: coverage is 0 at full coverage and grows with collapse."""
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from wsram_jax import exploration

B, M, N, S = 4, 2, 3, 3


def _spread_locations():
  """Location means at the corners of the canvas: per-coordinate variance 1 (above the 1/3 cap)."""
  corners = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]], np.float32)
  return jnp.asarray(np.broadcast_to(corners[:, None, None, :], (B, M, N, 2)))


def _uniform_scales():
  return jnp.full((B, M, N, S), 1.0 / S)


class CoverageTest(parameterized.TestCase):

  def test_zero_at_full_coverage(self):
    loss = exploration.coverage_regularizer(_uniform_scales(), _spread_locations())
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)

  def test_examples_may_specialise_as_long_as_the_batch_marginal_is_uniform(self):
    one_hot = jax.nn.one_hot(jnp.arange(B * M * N) % S, S).reshape(B, M, N, S)
    np.testing.assert_allclose(
        exploration.coverage_regularizer(one_hot, _spread_locations()), 0.0, atol=1e-6)

  def test_collapse_to_one_scale_costs_log_s(self):
    one_scale = jax.nn.one_hot(jnp.zeros((B, M, N), jnp.int32), S)
    loss = exploration.coverage_regularizer(one_scale, _spread_locations(), scale_weight=2.0)
    np.testing.assert_allclose(loss, 2.0 * np.log(S), rtol=1e-6)
    partial = jnp.broadcast_to(jnp.array([0.6, 0.3, 0.1]), (B, M, N, S))
    partial_loss = exploration.coverage_regularizer(partial, _spread_locations(), scale_weight=2.0)
    self.assertTrue(0.0 < partial_loss < loss)

  def test_collapse_to_one_location_costs_the_location_weight(self):
    same = jnp.full((B, M, N, 2), 0.3)
    loss = exploration.coverage_regularizer(_uniform_scales(), same, location_weight=0.5)
    np.testing.assert_allclose(loss, 0.5, rtol=1e-6)

  def test_gradients_follow_the_formula(self):
    rng = np.random.default_rng(0)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, M, N, S)), jnp.float32))
    locs = jnp.asarray(0.3 * rng.normal(size=(B, M, N, 2)), jnp.float32)  # variance below the cap
    locs = locs.at[..., 1].multiply(10.0)  # the second coordinate's variance above the cap
    cap = 1.0 / 3.0
    g_probs, g_locs = jax.grad(
        lambda p, l: exploration.coverage_regularizer(p, l, scale_weight=1.5, location_weight=0.7),
        argnums=(0, 1))(probs, locs)
    count = B * M * N
    marginal = np.asarray(probs).reshape(-1, S).mean(0)
    np.testing.assert_allclose(
        g_probs, np.broadcast_to(1.5 * (np.log(marginal) + 1) / count, (B, M, N, S)), rtol=1e-5)
    x = np.asarray(locs)[..., 0]
    self.assertLess(x.var(), cap)
    self.assertGreater(np.asarray(locs)[..., 1].var(), cap)
    np.testing.assert_allclose(g_locs[..., 0], -0.7 / 2 / cap * 2 * (x - x.mean()) / count, rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_array_equal(g_locs[..., 1], 0.0)  # flat above the cap


class EntropyBonusTest(parameterized.TestCase):

  def test_value_and_gradient(self):
    entropy = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 4)), jnp.float32)
    loss, grad = jax.value_and_grad(lambda e: exploration.entropy_bonus(e, weight=0.1))(entropy)
    np.testing.assert_allclose(loss, -0.1 * np.mean(entropy), rtol=1e-6)
    np.testing.assert_allclose(grad, np.full((3, 4), -0.1 / 12), rtol=1e-6)
