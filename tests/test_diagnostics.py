"""Gradient variance (Figure 2, middle) and ESS summaries (Figure 2, right)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from wsram_jax import diagnostics

PARAMS = {"theta": {"w": jnp.zeros((3, 4)), "b": jnp.zeros((2,))}, "eta": {"v": jnp.zeros((5,))}}
MU = {"theta": {"w": jnp.full((3, 4), 0.5), "b": jnp.array([1.0, -2.0])}, "eta": {"v": jnp.full((5,), 3.0)}}
SIGMA = {"theta": {"w": jnp.full((3, 4), 2.0), "b": jnp.array([1.0, 0.5])},
         "eta": {"v": jnp.array([0.1, 0.2, 0.3, 0.4, 0.5])}}


def noisy_grad_fn(params, batch, key):
  """grads = mu + sigma * noise: per-parameter variance sigma^2, mean mu."""
  del params
  leaves, treedef = jax.tree.flatten(MU)
  keys = jax.random.split(key, len(leaves))
  sigmas = jax.tree.leaves(SIGMA)
  return jax.tree.unflatten(treedef, [m + batch * s * jax.random.normal(k, m.shape)
                                      for m, s, k in zip(leaves, sigmas, keys)])


def _analytic(group):
  trees = [MU[group], SIGMA[group]] if group != "all" else [MU, SIGMA]
  mu, sigma = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in trees)
  return np.mean(sigma**2), np.sum(sigma**2) / np.sum(mu**2), np.sum(mu**2)


@functools.partial(jax.jit, static_argnames=("grad_fn", "num_estimates", "labels"))
def _variance(grad_fn, params, batch, key, num_estimates, labels=None):
  return diagnostics.gradient_variance(grad_fn, params, batch, key, num_estimates=num_estimates,
                                       labels=labels)


def _group_of_top_key(params):
  return {name: name for name in params}


class GradientVarianceTest(parameterized.TestCase):

  def test_matches_the_analytic_variance(self):
    labels = {"theta": "theta", "eta": "eta"}  # a prefix of the params' structure
    metrics = diagnostics.gradient_variance(noisy_grad_fn, PARAMS, 1.0, jax.random.PRNGKey(0),
                                            num_estimates=4000, labels=labels)
    self.assertEqual(set(metrics), {f"{k}/{g}" for k in ("grad_var", "grad_var_normalized",
                                                        "grad_mean_sq_norm") for g in ("all", "theta", "eta")})
    for group in ("all", "theta", "eta"):
      var, normalized, mean_sq = _analytic(group)
      np.testing.assert_allclose(metrics[f"grad_var/{group}"], var, rtol=0.05)
      np.testing.assert_allclose(metrics[f"grad_var_normalized/{group}"], normalized, rtol=0.05)
      np.testing.assert_allclose(metrics[f"grad_mean_sq_norm/{group}"], mean_sq, rtol=0.05)

  def test_deterministic_given_the_key_and_labels_forms_agree(self):
    key = jax.random.PRNGKey(1)
    full_labels = jax.tree.map(lambda _: "theta", PARAMS)
    full_labels["eta"] = jax.tree.map(lambda _: "eta", PARAMS["eta"])
    first = _variance(noisy_grad_fn, PARAMS, 1.0, key, 16, labels=_group_of_top_key)
    again = _variance(noisy_grad_fn, PARAMS, 1.0, key, 16, labels=_group_of_top_key)
    full = diagnostics.gradient_variance(noisy_grad_fn, PARAMS, 1.0, key, num_estimates=16,
                                         labels=full_labels)
    for name in first:
      np.testing.assert_array_equal(first[name], again[name])
      np.testing.assert_allclose(first[name], full[name], rtol=1e-5)
    other = _variance(noisy_grad_fn, PARAMS, 1.0, jax.random.PRNGKey(2), 16, labels=_group_of_top_key)
    self.assertNotEqual(float(other["grad_var/all"]), float(first["grad_var/all"]))
    # The groups' variances, weighted by their sizes, add up to the total.
    sizes = {"theta": 14, "eta": 5}
    total = sum(sizes[g] * first[f"grad_var/{g}"] for g in sizes) / 19
    np.testing.assert_allclose(first["grad_var/all"], total, rtol=1e-5)

  def test_summary_of_given_estimates_is_the_variance_of_those_estimates(self):
    grads = {"theta": {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])}, "eta": {"v": jnp.array([[0.0], [2.0]])}}
    metrics = diagnostics.gradient_summary(grads, labels=_group_of_top_key)
    # Per parameter (ddof 1): w -> 2, 8; v -> 2. Means: w -> 2, 4; v -> 1.
    np.testing.assert_allclose(metrics["grad_var/theta"], 5.0)
    np.testing.assert_allclose(metrics["grad_var_normalized/theta"], 10.0 / 20.0)
    np.testing.assert_allclose(metrics["grad_var/all"], 12.0 / 3)
    np.testing.assert_allclose(metrics["grad_mean_sq_norm/eta"], 1.0)
    with self.assertRaisesRegex(ValueError, "K >= 2"):
      diagnostics.gradient_summary({"w": jnp.zeros((1, 3))})

  def test_zero_for_a_deterministic_estimator(self):
    metrics = _variance(noisy_grad_fn, PARAMS, 0.0, jax.random.PRNGKey(3), 16)
    self.assertEqual(set(metrics), {"grad_var/all", "grad_var_normalized/all", "grad_mean_sq_norm/all"})
    self.assertEqual(float(metrics["grad_var/all"]), 0.0)
    self.assertEqual(float(metrics["grad_var_normalized/all"]), 0.0)

  def test_needs_two_estimates(self):
    with self.assertRaises(ValueError):
      diagnostics.gradient_variance(noisy_grad_fn, PARAMS, 1.0, jax.random.PRNGKey(0), num_estimates=1)


class EssSummaryTest(parameterized.TestCase):

  def test_summary(self):
    log_w = jnp.array([[0.0, 0.0, 0.0, 0.0],  # ESS 4
                       [0.0, -jnp.inf, -jnp.inf, -jnp.inf],  # ESS 1
                       [0.0, 0.0, -jnp.inf, -jnp.inf]])  # ESS 2
    s = diagnostics.ess_summary(log_w)
    np.testing.assert_allclose(s["ess/mean"], 7 / 3, rtol=1e-6)
    np.testing.assert_allclose(s["ess/min"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(s["ess/max"], 4.0, rtol=1e-6)
    np.testing.assert_allclose(s["ess/mean_fraction"], 7 / 12, rtol=1e-6)
    np.testing.assert_allclose(s["ess/frac_low"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(s["ess/max_weight"], (0.25 + 1 + 0.5) / 3, rtol=1e-6)
