"""The estimators' expectations and variances, exactly, on the enumerable toy attention model.

Every M-tuple of the toy's S = 9 glimpse sequences is enumerated and weighted by its probability, in float64,
so expectations are compared at ~1e-10, not within Monte Carlo error. What is pinned:
  * the toy itself: log p(y|I), the posterior, Fisher's identity, the sampler, the fast gradient path;
  * prior proposal: control variates leave the WS-RAM expectation exactly unchanged and lower the variance;
  * WS-RAM approaches the exact d log p(y|I) / d theta as M grows, and equals it for every M when q is the
    exact posterior (then w_m = 1/M);
  * VAR (no baseline, a constant one, leave-one-out) is unbiased for dF/dtheta (Eqn 3); under a tempered prior
    (heuristic (1)) it is biased, unless each sample is weighted by p(a)/p_T(a);
  * VIMCO, and WS-RAM with a theta-independent q, are unbiased for the gradient of the Eqn 9 bound;
  * the q-side control variate (Eqn 17) is unbiased; the p-side one (Eqn 18) is biased when q != prior;
  * the sleep-phase q loss is unbiased for E_y KL(p(a|y) || q(a|y)).
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.flatten_util import ravel_pytree

from wsram_jax import estimators, toy

CONFIG = toy.ToyConfig(num_locations=3, num_classes=3, num_features=3)
LABEL = 1
EXACT = dict(rtol=1e-9, atol=1e-10)

# Estimators bundled per proposal, so that one compilation per M serves many tests (index with the names).
PRIOR_NAMES = ("var", "var_const", "wsram", "wsram_cv", "var_loo", "vimco")
Q_NAMES = ("wsram_p", "wsram_q", "wsram_p_cv", "wsram_q_cv", "wsram_p_cv_unbiased", "wsram_p_cv_printed", "vimco")


def prior_losses(log_p_a, log_p_y, log_q_a):
  losses = [estimators.variational_loss(log_p_a, log_p_y),
            estimators.variational_loss(log_p_a, log_p_y, -1.0),
            estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=False)[0],
            estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=True)[0]]
  if log_p_a.shape[-1] >= 2:
    losses += [estimators.variational_loss(log_p_a, log_p_y, estimators.leave_one_out_baseline(log_p_y)),
               estimators.vimco_loss(log_p_a, log_p_y)]
  return jnp.stack(losses)


def q_losses(log_p_a, log_p_y, log_q_a):
  losses = [*estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=False),
            *estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=True),
            estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=True, p_baseline="unbiased")[0],
            estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=True, p_baseline="as_printed")[0]]
  if log_p_a.shape[-1] >= 2:
    losses.append(estimators.vimco_loss(log_p_a, log_p_y, log_q_a))
  return jnp.stack(losses)


@functools.lru_cache(maxsize=None)
def _model():
  """theta, a q halfway (log-linearly) between the prior and the posterior, the exact-posterior q, image."""
  with jax.enable_x64(True):
    theta, eta = toy.init_params(jax.random.PRNGKey(0), CONFIG)
    image = toy.make_image(jax.random.PRNGKey(100), CONFIG, LABEL)
    eta_half = toy.posterior_proposal(theta, eta, image, LABEL, CONFIG, mix=0.5)
    eta_post = toy.posterior_proposal(theta, eta, image, LABEL, CONFIG, mix=1.0)
  return theta, {"half": eta_half, "posterior": eta_post}, image


@functools.lru_cache(maxsize=None)
def _moments(proposal, num_samples, eta_name="half"):
  """Exact moments of the bundled estimators: dict name -> (mean_theta, var_theta, mean_eta, var_eta)."""
  theta, etas, image = _model()
  bundle, names = (prior_losses, PRIOR_NAMES) if proposal == "prior" else (q_losses, Q_NAMES)
  with jax.enable_x64(True):
    m = toy.estimator_moments(bundle, theta, etas[eta_name], image, LABEL, CONFIG, num_samples, proposal)
  assert m.exact
  return {name: tuple(np.asarray(x[i]) for x in m[:4]) for i, name in enumerate(names[:len(m.var_theta)])}


@functools.lru_cache(maxsize=None)
def _bound(proposal, num_samples):
  """The exact Eqn 9 bound E[log 1/M sum w~] and its gradients (flat theta, flat eta), with the half q."""
  theta, etas, image = _model()
  with jax.enable_x64(True):
    value, (g_theta, g_eta) = jax.value_and_grad(toy.multi_sample_bound, argnums=(0, 1))(
        theta, etas["half"], image, LABEL, CONFIG, num_samples, proposal)
  return float(value), _flat(g_theta), _flat(g_eta)


def _flat(tree):
  return ravel_pytree(tree)[0]


def _scalar_loss(log_p_a, log_p_y, log_q_a):
  """Every log-probability input gets a gradient: a check of the toy's fast gradient path."""
  loss_p, loss_q = estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=True)
  return loss_p + 2.0 * loss_q + 0.5 * estimators.variational_loss(log_p_a, log_p_y, -1.0)


class ToyModelTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.enable_x64(True))
    self.theta, etas, self.image = _model()
    self.eta = etas["half"]

  def test_log_marginal_posterior_and_fisher_identity(self):
    seqs = toy.all_sequences(CONFIG)
    self.assertEqual(seqs.shape, (9, 2))
    log_joint = np.asarray(
        toy.log_prior(self.theta, seqs) + toy.log_likelihood(self.theta, self.image, LABEL, seqs))
    log_py = toy.log_marginal(self.theta, self.image, LABEL, CONFIG)
    np.testing.assert_allclose(log_py, np.log(np.sum(np.exp(log_joint))), **EXACT)
    post = toy.posterior(self.theta, self.image, LABEL, CONFIG)
    np.testing.assert_allclose(post, np.exp(log_joint - float(log_py)), **EXACT)
    # Fisher's identity (Eqn 6): d log p(y) = E_posterior[d log p(y, a)].
    jac = jax.jit(jax.jacrev(
        lambda t: toy.log_prior(t, seqs) + toy.log_likelihood(t, self.image, LABEL, seqs)))(self.theta)
    fisher = jax.tree.map(lambda j: np.tensordot(post, j, axes=1), jac)
    np.testing.assert_allclose(
        _flat(fisher), _flat(toy.exact_gradient(self.theta, self.image, LABEL, CONFIG)), **EXACT)
    self.assertLess(toy.variational_objective(self.theta, self.image, LABEL, CONFIG), log_py)

  def test_posterior_proposal_is_the_posterior(self):
    eta_post = _model()[1]["posterior"]
    q = jnp.exp(toy.log_proposal(eta_post, LABEL, toy.all_sequences(CONFIG)))
    np.testing.assert_allclose(q, toy.posterior(self.theta, self.image, LABEL, CONFIG), **EXACT)
    self.assertLess(toy.kl_posterior_to_proposal(self.theta, eta_post, self.image, LABEL, CONFIG), 1e-12)

  def test_sampler(self):
    key = jax.random.PRNGKey(5)
    seqs, (log_p_a, log_p_y, log_q_a) = toy.sample_log_probs(
        key, self.theta, self.eta, self.image, LABEL, CONFIG, 20_000, "q")
    self.assertEqual(seqs.shape, (20_000, 2))
    again, _ = toy.sample_log_probs(key, self.theta, self.eta, self.image, LABEL, CONFIG, 20_000, "q")
    np.testing.assert_array_equal(seqs, again)
    index = np.asarray(seqs[:, 0] * 3 + seqs[:, 1])
    tables = toy.sequence_log_probs(self.theta, self.eta, self.image, LABEL, CONFIG, "q")
    for got, table in zip((log_p_a, log_p_y, log_q_a), tables):
      np.testing.assert_allclose(got, np.asarray(table)[index], **EXACT)
    # Frequencies follow q.
    np.testing.assert_allclose(np.bincount(index, minlength=9) / 20_000, np.exp(tables[2]), atol=0.015)
    seqs = seqs[:4]

    # Differentiable in (theta, eta); with the prior as proposal log_q_a carries no gradient.
    @jax.jit
    def grads(theta, eta):
      total = lambda t, e, p: sum(  # noqa: E731
          jnp.sum(x) for x in toy.log_probs(t, e, self.image, LABEL, seqs, p))
      return (jax.grad(total, argnums=(0, 1))(theta, eta, "q"),
              jax.grad(total, argnums=(0, 1))(theta, eta, "prior"))

    (g_theta, g_eta), (_, g_eta_prior) = grads(self.theta, self.eta)
    self.assertGreater(np.abs(_flat(g_theta)).sum(), 0)
    self.assertGreater(np.abs(_flat(g_eta)).sum(), 0)
    self.assertEqual(np.abs(_flat(g_eta_prior)).sum(), 0)

  def test_fast_gradients_match_jax_grad(self):
    """The fast path (Jacobians times the loss's coefficients) that estimator_moments uses is jax.grad.

    (The prior-proposal path is pinned too, by the exact tests of ExpectationTest.)
    """
    proposal = "q"
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 9, size=(6, 3)), jnp.int32)
    g_theta, g_eta = toy.estimator_gradients(
        _scalar_loss, self.theta, self.eta, self.image, LABEL, CONFIG, idx, proposal)

    def direct(i):
      seqs = toy.all_sequences(CONFIG)[i]
      grads = jax.grad(lambda t, e: _scalar_loss(*toy.log_probs(t, e, self.image, LABEL, seqs, proposal)),
                       argnums=(0, 1))(self.theta, self.eta)
      return _flat(grads[0]), _flat(grads[1])

    want_theta, want_eta = jax.jit(jax.vmap(direct))(idx)
    np.testing.assert_allclose(g_theta, want_theta, **EXACT)
    np.testing.assert_allclose(g_eta, want_eta, **EXACT)

  def test_exact_and_monte_carlo_expectations_agree(self):
    log_p = toy.log_prior(self.theta, toy.all_sequences(CONFIG))
    log_w = toy.log_likelihood(self.theta, self.image, LABEL, toy.all_sequences(CONFIG))
    ess = lambda i: estimators.effective_sample_size(log_w[i])  # noqa: E731
    exact = toy.exact_expectation(ess, log_p, 3)
    mc = toy.monte_carlo_expectation(ess, log_p, 3, jax.random.PRNGKey(7), 20_000)
    np.testing.assert_allclose(mc, exact, rtol=0.01)
    self.assertTrue(1.0 < exact < 3.0)

  def test_bounds_are_ordered(self):
    """F = E[log w~] (M = 1, prior proposal) <= E[log mean_M w~] increasing in M <= log p(y) (Eqns 9, 10)."""
    log_p_a, log_p_y, _ = (np.asarray(t) for t in toy.sequence_log_probs(
        self.theta, self.eta, self.image, LABEL, CONFIG, "prior"))
    bounds = []
    for m in (1, 2, 3):  # by enumeration in numpy, as a check of toy.multi_sample_bound
      idx = toy.tuple_indices(9, m)
      bounds.append(np.sum(np.exp(log_p_a[idx].sum(-1)) * np.log(np.mean(np.exp(log_p_y[idx]), -1))))
    np.testing.assert_allclose(bounds[0], toy.variational_objective(self.theta, self.image, LABEL, CONFIG),
                               **EXACT)
    for m in (2, 3):
      np.testing.assert_allclose(_bound("prior", m)[0], bounds[m - 1], **EXACT)
    log_py = toy.log_marginal(self.theta, self.image, LABEL, CONFIG)
    self.assertTrue(bounds[0] < bounds[1] < bounds[2] < log_py, (bounds, log_py))


class ExpectationTest(chex.TestCase):
  """Exact expectations and variances of the estimators' parameter gradients (all M-tuples enumerated)."""

  def setUp(self):
    super().setUp()
    self.enterContext(jax.enable_x64(True))
    self.theta, etas, self.image = _model()
    self.eta = etas["half"]
    self.grad_log_py = _flat(toy.exact_gradient(self.theta, self.image, LABEL, CONFIG))

  @parameterized.parameters(1, 2, 3)
  def test_prior_proposal_control_variates_same_expectation_lower_variance(self, m):
    moments = _moments("prior", m)
    mean, var = moments["wsram"][:2]
    mean_cv, var_cv = moments["wsram_cv"][:2]
    np.testing.assert_allclose(mean_cv, mean, **EXACT)
    self.assertLess(var_cv, 0.8 * var)

  def test_wsram_bias_decreases_with_m(self):
    for proposal, name in (("prior", "wsram"), ("prior", "wsram_cv"), ("q", "wsram_p"), ("q", "wsram_p_cv")):
      bias = [np.linalg.norm(_moments(proposal, m)[name][0] + self.grad_log_py) for m in (1, 2, 3)]
      self.assertTrue(bias[0] > bias[1] > bias[2] > 0, (proposal, name, bias))
    # The q halfway to the posterior beats the prior.
    for m in (1, 2, 3):
      self.assertLess(np.linalg.norm(_moments("q", m)["wsram_p"][0] + self.grad_log_py),
                      np.linalg.norm(_moments("prior", m)["wsram"][0] + self.grad_log_py))

  @parameterized.parameters(1, 2, 3)
  def test_wsram_exact_when_q_is_the_posterior(self, m):
    eta_post = _model()[1]["posterior"]
    # Then w~ = p(a) p(y|a) / p(a|y) = p(y) for every sample, so w_m = 1/M on every M-tuple.
    log_p_a, log_p_y, log_q_a = toy.sequence_log_probs(
        self.theta, eta_post, self.image, LABEL, CONFIG, "q")
    log_w = estimators.log_importance_weights(log_p_a, log_p_y, log_q_a)
    np.testing.assert_allclose(log_w, toy.log_marginal(self.theta, self.image, LABEL, CONFIG), **EXACT)
    idx = jnp.asarray(toy.tuple_indices(9, m))
    np.testing.assert_allclose(estimators.normalized_weights(log_w[idx]), 1.0 / m, **EXACT)
    moments = _moments("q", m, "posterior")
    np.testing.assert_allclose(moments["wsram_p"][0], -self.grad_log_py, **EXACT)
    # (Not so with the p-side control variate: r_m = softmax(log p(a) - log q(a)) != 1/M; see below.)

  @parameterized.parameters(1, 2, 3)
  def test_var_is_unbiased_for_grad_f(self, m):
    grad_f = _flat(jax.grad(toy.variational_objective)(self.theta, self.image, LABEL, CONFIG))
    moments = _moments("prior", m)
    for name in ("var", "var_const", "var_loo")[:3 if m >= 2 else 2]:
      np.testing.assert_allclose(moments[name][0], -grad_f, **EXACT)

  @parameterized.parameters(1, 2)
  def test_var_under_a_tempered_prior_is_biased_unless_importance_weighted(self, m):
    """Heuristic (1) for VAR: samples from the prior tempered at T, the loss treating them as the prior's
    (biased for dF/dtheta), or weighting each by p(a)/p_T(a) (`log_q_a`: unbiased)."""
    grad_f = _flat(jax.grad(toy.variational_objective)(self.theta, self.image, LABEL, CONFIG))

    def losses(log_p_a, log_p_y, log_q_a):
      return jnp.stack([estimators.variational_loss(log_p_a, log_p_y, -1.0),
                        estimators.variational_loss(log_p_a, log_p_y, -1.0, log_q_a=log_q_a)])

    tempered = toy.estimator_moments(losses, self.theta, self.eta, self.image, LABEL, CONFIG, m, "prior",
                                     temperature=2.0)
    self.assertTrue(tempered.exact)
    self.assertGreater(np.linalg.norm(tempered.mean_theta[0] + grad_f), 1e-2)
    np.testing.assert_allclose(tempered.mean_theta[1], -grad_f, **EXACT)
    # At T = 1 the weights are 1: the two losses are the same estimator.
    untempered = toy.estimator_moments(losses, self.theta, self.eta, self.image, LABEL, CONFIG, m, "prior")
    np.testing.assert_allclose(untempered.mean_theta[1], untempered.mean_theta[0], **EXACT)
    np.testing.assert_allclose(untempered.var_theta[1], untempered.var_theta[0], **EXACT)

  @parameterized.parameters(2, 3)
  def test_vimco_is_unbiased_for_the_bound(self, m):
    np.testing.assert_allclose(_moments("prior", m)["vimco"][0], -_bound("prior", m)[1], **EXACT)
    _, g_theta, g_eta = _bound("q", m)
    np.testing.assert_allclose(_moments("q", m)["vimco"][0], -g_theta, **EXACT)
    np.testing.assert_allclose(_moments("q", m)["vimco"][2], -g_eta, **EXACT)

  @parameterized.parameters(2, 3)
  def test_wsram_with_fixed_q_is_unbiased_for_the_bound(self, m):
    """With q independent of theta, E[Eqn 8] = d/dtheta E_q[log 1/M sum w~] exactly."""
    np.testing.assert_allclose(_moments("q", m)["wsram_p"][0], -_bound("q", m)[1], **EXACT)

  @parameterized.parameters(1, 2, 3)
  def test_q_side_control_variate_is_unbiased_p_side_is_not(self, m):
    moments = _moments("q", m)
    np.testing.assert_allclose(moments["wsram_q_cv"][2], moments["wsram_q"][2], **EXACT)
    self.assertLess(moments["wsram_q_cv"][3], moments["wsram_q"][3] + 1e-12)
    # Eqn 18's self-normalised baseline r_m is a ratio estimate: with q != prior it shifts the expectation
    # (by O(1/M)); at M = 1 it removes the log p(a) gradient altogether (w_1 = r_1 = 1).
    gap = [np.linalg.norm(_moments("q", k)["wsram_p_cv"][0] - _moments("q", k)["wsram_p"][0])
           for k in (1, 2, 3)]
    self.assertTrue(gap[0] > gap[1] > gap[2] > 1e-3, gap)
    # The unbiased forms of the p-side control variate (p/(M q), and Eqn 16 as printed, p/q) leave the
    # expectation exactly where it is.
    for form in ("wsram_p_cv_unbiased", "wsram_p_cv_printed"):
      np.testing.assert_allclose(moments[form][0], moments["wsram_p"][0], **EXACT)

  def test_wake_q_bias_decreases_with_m(self):
    grad_kl = _flat(jax.grad(toy.kl_posterior_to_proposal, argnums=1)(
        self.theta, self.eta, self.image, LABEL, CONFIG))
    bias = [np.linalg.norm(_moments("q", m)["wsram_q"][2] - grad_kl) for m in (1, 2, 3)]
    self.assertTrue(bias[0] > bias[1] > bias[2], bias)
    # At M = 1 the weight is 1 and the expected gradient is E_q[-d log q] = 0.
    np.testing.assert_allclose(bias[0], np.linalg.norm(grad_kl), **EXACT)

  def test_sleep_q_loss_is_unbiased_for_expected_kl(self):
    seqs = toy.all_sequences(CONFIG)
    labels = jnp.arange(3)

    @jax.jit
    def expected_and_exact(theta, eta):
      def expected_kl(eta):
        log_py = jax.vmap(lambda c: toy.log_marginal(theta, self.image, c, CONFIG))(labels)
        kls = jax.vmap(lambda c: toy.kl_posterior_to_proposal(theta, eta, self.image, c, CONFIG))(labels)
        return jnp.sum(jnp.exp(log_py) * kls)

      # Every (a, y) the model can dream, weighted by p(a) p(y|a), one sample (M = 1) each.
      def sleep_gradient(s, c):
        return _flat(jax.grad(lambda e: estimators.sleep_q_loss(toy.log_proposal(e, c, s[None])))(eta))

      joint = jnp.exp(toy.log_prior(theta, seqs)[:, None]
                      + jax.vmap(lambda c: toy.log_likelihood(theta, self.image, c, seqs), out_axes=1)(labels))
      grads = jax.vmap(lambda s: jax.vmap(lambda c: sleep_gradient(s, c))(labels))(seqs)  # [S, C, Q]
      return jnp.einsum("sc,scq->q", joint, grads), _flat(jax.grad(expected_kl)(eta))

    expected, exact = expected_and_exact(self.theta, self.eta)
    np.testing.assert_allclose(expected, exact, **EXACT)
