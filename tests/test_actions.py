"""The action distribution: samples agree with log_prob, entropy, temperature, mixtures, mode."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsram_jax import actions

NUM = 20000  # Monte Carlo samples; standard errors below are computed from it.
# Jitted once per input shape: op-by-op dispatch would compile every primitive separately.
log_prob = jax.jit(actions.log_prob)


def _dist():
  return actions.single(jnp.asarray([0.3, -0.5]), jnp.log(jnp.asarray([0.2, 0.4])), jnp.asarray([0.0, 1.0, -1.0]))


def _mixture(alpha=0.3):
  a = actions.single(jnp.asarray([-0.6, 0.6]), jnp.log(0.1), jnp.asarray([3.0, 0.0, 0.0]))
  b = actions.single(jnp.asarray([0.5, -0.2]), jnp.log(0.2), jnp.asarray([0.0, 0.0, 3.0]))
  return actions.mixture([a, b], [alpha, 1 - alpha]), a, b


def _samples(dist, key=0):
  d = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (NUM,) + x.shape), dist)
  return jax.jit(actions.sample)(jax.random.key(key), d)


def test_shapes_and_dtypes():
  dims = chex.Dimensions(B=4, K=1, S=3)
  dist = actions.single(jnp.zeros((4, 2)), jnp.log(0.1), jnp.zeros((4, 3)))
  chex.assert_shape(dist.mix_logits, dims["BK"])
  chex.assert_shape(dist.loc_mean, dims["BK"] + (2,))
  chex.assert_shape(dist.loc_log_std, dims["BK"] + (2,))
  chex.assert_shape(dist.scale_logits, dims["BKS"])
  a = actions.sample(jax.random.key(0), dist)
  chex.assert_shape(a.loc, (4, 2))
  chex.assert_shape(a.scale, (4,))
  chex.assert_type([a.loc, a.scale], [jnp.float32, jnp.int32])
  chex.assert_shape(actions.log_prob(dist, a), (4,))
  chex.assert_shape(actions.entropy(dist), (4,))
  assert actions.num_components(dist) == 1 and actions.num_scales(dist) == 3


def test_log_prob_matches_formula():
  dist = _dist()
  a = actions.Action(loc=jnp.asarray([0.1, 0.2]), scale=jnp.asarray(1))
  std = np.asarray([0.2, 0.4])
  z = (np.asarray([0.1, 0.2]) - np.asarray([0.3, -0.5])) / std
  loc_lp = np.sum(-0.5 * z**2 - np.log(std) - 0.5 * np.log(2 * np.pi))
  logits = np.asarray([0.0, 1.0, -1.0])
  scale_lp = logits[1] - np.log(np.exp(logits).sum())
  np.testing.assert_allclose(actions.log_prob(dist, a), loc_lp + scale_lp, rtol=1e-6)


def test_log_prob_scores_unclipped_location():
  dist = _dist()
  inside = actions.log_prob(dist, actions.Action(jnp.asarray([1.0, 0.0]), jnp.asarray(0)))
  outside = actions.log_prob(dist, actions.Action(jnp.asarray([1.5, 0.0]), jnp.asarray(0)))
  assert outside < inside


def test_sample_histograms_agree_with_distribution():
  dist = _dist()
  a = _samples(dist)
  freq = np.bincount(np.asarray(a.scale), minlength=3) / NUM
  probs = np.asarray(jax.nn.softmax(dist.scale_logits[0]))
  np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / NUM))
  loc = np.asarray(a.loc)
  std = np.asarray([0.2, 0.4])
  assert np.all(np.abs(loc.mean(0) - [0.3, -0.5]) < 4 * std / np.sqrt(NUM))
  np.testing.assert_allclose(loc.std(0), std, rtol=0.03)


def test_sample_has_no_gradient():
  def f(mean):
    return actions.sample(jax.random.key(0), actions.single(mean, 0.0, jnp.zeros(2))).loc.sum()
  np.testing.assert_array_equal(jax.grad(f)(jnp.zeros(2)), 0.0)


def test_mixture_samples_and_log_prob():
  alpha = 0.3
  mix, a, b = _mixture(alpha)
  chex.assert_shape(mix.mix_logits, (2,))
  np.testing.assert_allclose(jax.nn.softmax(mix.mix_logits), [alpha, 1 - alpha], rtol=1e-6)
  s = _samples(mix, key=1)
  from_a = np.asarray(s.loc[:, 0] < 0)  # the components are 5+ std apart along y
  np.testing.assert_allclose(from_a.mean(), alpha, atol=4 * np.sqrt(alpha * (1 - alpha) / NUM))
  # Within each component, the scale follows that component's logits.
  np.testing.assert_allclose(np.mean(np.asarray(s.scale)[from_a] == 0), jax.nn.softmax(a.scale_logits[0])[0],
                             atol=0.02)
  np.testing.assert_allclose(np.mean(np.asarray(s.scale)[~from_a] == 2), jax.nn.softmax(b.scale_logits[0])[2],
                             atol=0.02)
  # log_prob is the logaddexp of the weighted components.
  lp = log_prob(mix, s)
  manual = jnp.logaddexp(math.log(alpha) + log_prob(a, s), math.log(1 - alpha) + log_prob(b, s))
  np.testing.assert_allclose(lp, manual, rtol=1e-5, atol=1e-5)
  # Marginals.
  np.testing.assert_allclose(actions.scale_probs(mix),
                             alpha * jax.nn.softmax(a.scale_logits[0]) + (1 - alpha) * jax.nn.softmax(
                                 b.scale_logits[0]), rtol=1e-6)
  np.testing.assert_allclose(actions.mean_location(mix), alpha * a.loc_mean[0] + (1 - alpha) * b.loc_mean[0],
                             rtol=1e-6)


def test_mixture_with_zero_weight_is_the_other_part():
  mix, a, _ = _mixture(1.0)
  s = _samples(a, key=2)
  np.testing.assert_allclose(log_prob(mix, s), log_prob(a, s), rtol=1e-6, atol=1e-6)


def test_entropy_matches_monte_carlo():
  dist = _dist()
  s = _samples(dist, key=3)
  neg_lp = -np.asarray(log_prob(dist, s))
  np.testing.assert_allclose(actions.entropy(dist), neg_lp.mean(), atol=4 * neg_lp.std() / np.sqrt(NUM))


def test_entropy_of_mixture_raises():
  mix, _, _ = _mixture()
  with pytest.raises(ValueError, match="one component"):
    actions.entropy(mix)


def test_temperature():
  dist = _dist()
  np.testing.assert_allclose(actions.temper(dist, 1.0).loc_log_std, dist.loc_log_std, atol=1e-7)
  hot = actions.temper(dist, 4.0)
  np.testing.assert_allclose(jnp.exp(hot.loc_log_std), 2.0 * jnp.exp(dist.loc_log_std), rtol=1e-6)
  p = jax.nn.softmax(dist.scale_logits)
  np.testing.assert_allclose(jax.nn.softmax(hot.scale_logits), p**0.25 / jnp.sum(p**0.25), rtol=1e-5)
  np.testing.assert_array_equal(hot.loc_mean, dist.loc_mean)
  assert actions.entropy(hot) > actions.entropy(dist) > actions.entropy(actions.temper(dist, 0.25))
  s = _samples(hot, key=4)
  np.testing.assert_allclose(np.asarray(s.loc).std(0), [0.4, 0.8], rtol=0.03)
  # Mixture weights are unchanged by temperature.
  mix, _, _ = _mixture(0.3)
  np.testing.assert_allclose(actions.temper(mix, 3.0).mix_logits, mix.mix_logits)


def test_mode():
  dist = _dist()
  m = actions.mode(dist)
  np.testing.assert_allclose(m.loc, [0.3, -0.5])
  assert int(m.scale) == 1
  mix, a, b = _mixture(0.3)  # b is the more probable component
  m = actions.mode(mix)
  np.testing.assert_allclose(m.loc, b.loc_mean[0])
  assert int(m.scale) == 2


def test_batched_functions_under_vmap_and_jit():
  dist = actions.single(jnp.zeros((3, 5, 2)), jnp.zeros((3, 5, 2)), jnp.zeros((3, 5, 4)))
  keys = jax.random.split(jax.random.key(0), 3)
  a = jax.jit(jax.vmap(actions.sample))(keys, dist)
  chex.assert_shape([a.loc, a.scale], [(3, 5, 2), (3, 5)])
  lp = jax.jit(jax.vmap(actions.log_prob))(dist, a)
  np.testing.assert_allclose(lp, actions.log_prob(dist, a), rtol=1e-6)
