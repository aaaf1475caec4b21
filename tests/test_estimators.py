"""The estimator API's gradient contract (docs/ARCHITECTURE.md, 'The estimator API'), pinned on random inputs.

Each loss's gradient with respect to its log-probability inputs must equal the formula exactly (float32 at
~1e-6), batched and unbatched, jitted and not; and stay finite with -inf entries and 1e4 spreads. The
expectations of the estimators are pinned by enumeration in test_toy.py.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from wsram_jax import estimators

SHAPES = (("unbatched", (5,)), ("batched", (3, 5)))
TOL = dict(rtol=1e-5, atol=1e-6)


def _log_probs(seed, shape, scale=2.0):
  """Three random `[..., M]` float32 arrays: log_p_a, log_p_y, log_q_a (numpy: no compilation)."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(scale * rng.normal(size=shape) - 3.0, jnp.float32) for _ in range(3))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _num_examples(shape):
  return int(np.prod(shape[:-1]))


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class LogWeightsTest(parameterized.TestCase):

  def test_log_importance_weights_is_eqn7(self):
    a, y, q = _log_probs(0, (3, 5))
    np.testing.assert_allclose(estimators.log_importance_weights(a, y, q), a + y - q, **TOL)

  def test_zero_joint_gets_zero_weight_even_when_q_is_zero(self):
    a = jnp.array([-jnp.inf, -1.0, -2.0])
    y = jnp.array([-1.0, -jnp.inf, -1.0])
    q = jnp.array([-jnp.inf, -1.0, -1.0])
    log_w = estimators.log_importance_weights(a, y, q)
    np.testing.assert_array_equal(log_w, [-jnp.inf, -jnp.inf, -2.0])
    grads = jax.jit(jax.grad(lambda *x: jnp.sum(jax.nn.softmax(estimators.log_importance_weights(*x))),
                             argnums=(0, 1, 2)))(a, y, q)
    for g in grads:
      self.assertTrue(np.all(np.isfinite(g)))

  def test_normalized_weights_softmax_over_last_axis(self):
    log_w = _normal(1, (3, 5))
    w = estimators.normalized_weights(log_w)
    np.testing.assert_allclose(w, _softmax(log_w), **TOL)
    np.testing.assert_allclose(w.sum(-1), 1.0, **TOL)

  @parameterized.parameters(1, 2, 5, 20)
  def test_ess_is_m_for_equal_weights(self, m):
    np.testing.assert_allclose(estimators.effective_sample_size(jnp.full((3, m), -7.5)), m, rtol=1e-6)

  def test_ess_is_one_for_one_hot(self):
    log_w = jnp.array([[-jnp.inf, 0.3, -jnp.inf, -jnp.inf], [5.0, -1e4, -1e4, -1e4]])
    np.testing.assert_allclose(estimators.effective_sample_size(log_w), 1.0, rtol=1e-6)

  def test_ess_matches_definition_and_is_in_range(self):
    log_w = 3.0 * _normal(2, (50, 5))
    ess = estimators.effective_sample_size(log_w)
    np.testing.assert_allclose(ess, 1.0 / np.sum(_softmax(log_w) ** 2, -1), rtol=1e-5)
    self.assertTrue(np.all(ess >= 1 - 1e-5) and np.all(ess <= 5 + 1e-5))

  def test_bound_is_log_mean_exp(self):
    log_w = _normal(3, (3, 5))
    expected = np.log(np.mean(np.exp(np.asarray(log_w, np.float64)), -1))
    np.testing.assert_allclose(estimators.log_marginal_bound(log_w), expected, **TOL)

  def test_bound_with_minus_inf_and_huge_spreads(self):
    log_w = jnp.array([[-jnp.inf, 0.0, -jnp.inf, 0.0], [1e4, 0.0, -1e4, 2.0]])
    bound = estimators.log_marginal_bound(log_w)
    np.testing.assert_allclose(bound, [np.log(2 / 4), 1e4 - np.log(4)], rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(estimators.log_marginal_bound(x))))(log_w)
    np.testing.assert_allclose(grad, [[0, 0.5, 0, 0.5], [1, 0, 0, 0]], atol=1e-6)

  def test_input_checks(self):
    with self.assertRaises(ValueError):
      estimators.log_marginal_bound(jnp.zeros(()))
    with self.assertRaises(AssertionError):
      estimators.log_importance_weights(jnp.zeros(3), jnp.zeros(4), jnp.zeros(3))
    with self.assertRaises(AssertionError):
      estimators.normalized_weights(jnp.zeros(3, jnp.int32))


def _wsram_expected(a, y, q, control_variates):
  """docs/ARCHITECTURE.md: the gradients of (loss_p, loss_q) w.r.t. (log_p_a, log_p_y, log_q_a)."""
  b = _num_examples(a.shape)
  m = a.shape[-1]
  w = _softmax(np.asarray(a, np.float64) + np.asarray(y) - np.asarray(q))
  r = _softmax(np.asarray(a, np.float64) - np.asarray(q))
  zero = np.zeros_like(w)
  if control_variates:
    return (-(w - r) / b, -w / b, zero), (zero, zero, -(w - 1.0 / m) / b)
  return (-w / b, -w / b, zero), (zero, zero, -w / b)


@functools.partial(jax.jit, static_argnames="control_variates")
def _wsram_values_and_grads(a, y, q, control_variates):
  """(loss_p, loss_q), d loss_p / d(a, y, q), d loss_q / d(a, y, q), jitted once per shape."""
  losses = functools.partial(estimators.wsram_losses, control_variates=control_variates)
  grad_p = jax.grad(lambda *x: losses(*x)[0], argnums=(0, 1, 2))(a, y, q)
  grad_q = jax.grad(lambda *x: losses(*x)[1], argnums=(0, 1, 2))(a, y, q)
  return losses(a, y, q), grad_p, grad_q


class WsramLossesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      *[(f"{name}_cv{cv}", shape, cv) for name, shape in SHAPES for cv in (False, True)])
  def test_gradient_contract(self, shape, control_variates):
    a, y, q = _log_probs(10, shape)
    losses = functools.partial(estimators.wsram_losses, control_variates=control_variates)
    grad_p = self.variant(jax.grad(lambda *x: losses(*x)[0], argnums=(0, 1, 2)))(a, y, q)
    grad_q = self.variant(jax.grad(lambda *x: losses(*x)[1], argnums=(0, 1, 2)))(a, y, q)
    expected_p, expected_q = _wsram_expected(a, y, q, control_variates)
    for got, want in zip(grad_p + grad_q, expected_p + expected_q):
      np.testing.assert_allclose(got, want, **TOL)

  @parameterized.parameters("unbiased", "as_printed")
  def test_p_baseline_forms(self, form):
    """The p-side coefficient r_m: p/(M q) (unbiased) or p/q (Eqn 16 as printed), instead of Eqn 18's."""
    a, y, q = _log_probs(11, (3, 4))
    b, m = 3, 4
    grad = jax.jit(jax.grad(lambda *x: estimators.wsram_losses(*x, control_variates=True, p_baseline=form)[0],
                            argnums=(0, 1, 2)))(a, y, q)
    w = _softmax(np.asarray(a, np.float64) + np.asarray(y) - np.asarray(q))
    r = np.exp(np.asarray(a, np.float64) - np.asarray(q)) / (m if form == "unbiased" else 1)
    np.testing.assert_allclose(grad[0], -(w - r) / b, **TOL)
    np.testing.assert_allclose(grad[1], -w / b, **TOL)
    np.testing.assert_allclose(grad[2], 0.0)
    with self.assertRaises(ValueError):
      estimators.wsram_losses(a, y, q, control_variates=True, p_baseline="normalised")

  def test_wake_q_on_the_inference_networks_own_density(self):
    """Samples from a proposal r (log_q_a) that is not q: loss_q trains q's own log-density (log_q_own), with
    the weights of r and the control-variate coefficient (q/r)_m self-normalised."""
    a, y, r = _log_probs(12, (3, 4))
    own = _log_probs(13, (3, 4))[0]
    b = 3
    grad = jax.jit(jax.grad(lambda q_a, q_own: estimators.wsram_losses(
        a, y, q_a, control_variates=True, log_q_own=q_own)[1], argnums=(0, 1)))(r, own)
    w = _softmax(np.asarray(a, np.float64) + np.asarray(y) - np.asarray(r))
    coeff = _softmax(np.asarray(own, np.float64) - np.asarray(r))
    np.testing.assert_allclose(grad[0], 0.0)
    np.testing.assert_allclose(grad[1], -(w - coeff) / b, **TOL)

  def test_two_leading_axes(self):
    a, y, q = _log_probs(14, (2, 3, 4))
    grad_p = jax.jit(jax.grad(lambda *x: estimators.wsram_losses(*x, control_variates=True)[0],
                              argnums=(0, 1, 2)))(a, y, q)
    for got, want in zip(grad_p, _wsram_expected(a, y, q, True)[0]):
      np.testing.assert_allclose(got, want, **TOL)
    grads = jax.jit(jax.grad(estimators.variational_loss, argnums=(0, 1)))(a, y, q[..., 0])
    np.testing.assert_allclose(grads[0], -(np.asarray(y) - np.asarray(q[..., :1])) / 24, **TOL)

  @parameterized.parameters(False, True)
  def test_values(self, control_variates):
    a, y, q = _log_probs(11, (2, 5))
    (loss_p, loss_q), _, _ = _wsram_values_and_grads(a, y, q, control_variates)
    log_w = a + y - q
    np.testing.assert_allclose(loss_p, -np.mean(estimators.log_marginal_bound(log_w)), **TOL)
    w = _softmax(log_w)
    np.testing.assert_allclose(loss_q, -np.mean(np.sum(w * np.asarray(q), -1)), **TOL)

  def test_prior_proposal_cv_baseline_is_one_over_m(self):
    a, y, _ = _log_probs(12, (2, 5))
    grads = jax.jit(jax.grad(lambda a, y: estimators.wsram_losses(
        a, y, jax.lax.stop_gradient(a), control_variates=True)[0], argnums=(0, 1)))(a, y)
    w = _softmax(np.asarray(a) + np.asarray(y) - np.asarray(a))
    np.testing.assert_allclose(grads[0], -(w - 1 / 5) / 2, **TOL)
    np.testing.assert_allclose(grads[1], -w / 2, **TOL)

  @parameterized.parameters(False, True)
  def test_minus_inf_entries_are_finite_and_follow_the_contract(self, control_variates):
    a, y, q = _log_probs(13, (2, 5))
    a = a.at[0, 1].set(-jnp.inf)
    y = y.at[0, 3].set(-jnp.inf).at[1, 0].set(-jnp.inf)
    values, grad_p, grad_q = _wsram_values_and_grads(a, y, q, control_variates)
    for x in values + grad_p + grad_q:
      self.assertTrue(np.all(np.isfinite(x)), x)
    expected_p, expected_q = _wsram_expected(a, y, q, control_variates)
    for got, want in zip(grad_p + grad_q, expected_p + expected_q):
      np.testing.assert_allclose(got, want, **TOL)

  @parameterized.parameters(False, True)
  def test_huge_spreads(self, control_variates):
    a, y, q = _log_probs(15, (2, 5))
    a = a.at[0].set(jnp.array([0.0, -1e4, 1e4, -3.0, 1.0]))
    y = y.at[0].set(jnp.array([-1.0, -2.0, -1e4, 0.0, 1e4]))
    q = q.at[0].set(jnp.array([1e4, 0.0, -5.0, 2.0, -1e4]))
    values, grad_p, grad_q = _wsram_values_and_grads(a, y, q, control_variates)
    expected_p, expected_q = _wsram_expected(a, y, q, control_variates)
    for got, want in zip(grad_p + grad_q, expected_p + expected_q):
      self.assertTrue(np.all(np.isfinite(got)))
      np.testing.assert_allclose(got, want, **TOL)
    self.assertTrue(all(np.isfinite(v) for v in values))


class VariationalLossTest(chex.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(
      ("unbatched_no_baseline", (5,), None), ("batched_no_baseline", (3, 5), None),
      ("scalar_baseline", (3, 5), ()), ("per_example_baseline", (3, 5), (3,)),
      ("per_sample_baseline", (3, 5), (3, 5)))
  def test_gradient_contract(self, shape, baseline_shape):
    a, y, _ = _log_probs(20, shape)
    if baseline_shape is None:
      baseline, b_full = 0.0, np.zeros(shape)
    else:
      baseline = _normal(21, baseline_shape) - 3.0
      b_full = np.broadcast_to(
          np.asarray(baseline)[..., None] if len(baseline_shape) == len(shape) - 1 else baseline, shape)
    grads = self.variant(jax.grad(estimators.variational_loss, argnums=(0, 1, 2)))(a, y, baseline)
    n = _num_examples(shape) * shape[-1]
    np.testing.assert_allclose(grads[0], -(np.asarray(y) - b_full) / n, **TOL)
    np.testing.assert_allclose(grads[1], np.full(shape, -1.0 / n), **TOL)
    np.testing.assert_array_equal(grads[2], np.zeros(np.shape(baseline)))

  def test_value_is_minus_mean_log_likelihood(self):
    a, y, _ = _log_probs(22, (3, 5))
    np.testing.assert_allclose(estimators.variational_loss(a, y, 1.0), -np.mean(y), **TOL)

  def test_importance_weighted_contract(self):
    # Samples from q: every term times v = p(a)/q(a), with no gradient into v (none reaches log_q_a).
    a, y, q = _log_probs(24, (3, 5))
    grads = jax.jit(jax.grad(lambda a, y, q: estimators.variational_loss(a, y, 0.5, log_q_a=q),
                             argnums=(0, 1, 2)))(a, y, q)
    v = np.exp(np.asarray(a) - np.asarray(q))
    np.testing.assert_allclose(grads[0], -v * (np.asarray(y) - 0.5) / 15, **TOL)
    np.testing.assert_allclose(grads[1], -v / 15, **TOL)
    np.testing.assert_array_equal(grads[2], np.zeros((3, 5)))
    np.testing.assert_allclose(estimators.variational_loss(a, y, 0.5, log_q_a=q), -np.mean(v * np.asarray(y)),
                               **TOL)

  def test_leave_one_out_baseline(self):
    y = jnp.array([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        estimators.leave_one_out_baseline(y), [[11 / 3, 10 / 3, 3.0, 2.0], [0, 0, 0, 0]], **TOL)
    a, y, _ = _log_probs(23, (3, 5))
    grads = jax.jit(jax.grad(lambda a, y: estimators.variational_loss(
        a, y, estimators.leave_one_out_baseline(y)), argnums=(0, 1)))(a, y)
    b = (np.sum(y, -1, keepdims=True) - y) / 4
    np.testing.assert_allclose(grads[0], -(np.asarray(y) - b) / 15, **TOL)
    np.testing.assert_allclose(grads[1], np.full((3, 5), -1 / 15), **TOL)
    with self.assertRaises(ValueError):
      estimators.leave_one_out_baseline(jnp.zeros((3, 1)))


def _vimco_signal(log_w):
  """L - L_{-m}, naively in float64."""
  log_w = np.asarray(log_w, np.float64)
  m = log_w.shape[-1]

  def bound(x):
    return np.log(np.mean(np.exp(x), -1))

  signal = np.zeros_like(log_w)
  for j in range(m):
    replaced = log_w.copy()
    replaced[..., j] = (np.sum(log_w, -1) - log_w[..., j]) / (m - 1)
    signal[..., j] = bound(log_w) - bound(replaced)
  return signal


class VimcoTest(chex.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(("unbatched", (4,)), ("batched", (3, 5)))
  def test_gradient_contract_with_proposal(self, shape):
    a, y, q = _log_probs(30, shape, scale=1.0)
    grads = self.variant(jax.grad(estimators.vimco_loss, argnums=(0, 1, 2)))(a, y, q)
    b = _num_examples(shape)
    log_w = np.asarray(a, np.float64) + np.asarray(y) - np.asarray(q)
    w = _softmax(log_w)
    np.testing.assert_allclose(grads[0], -w / b, **TOL)
    np.testing.assert_allclose(grads[1], -w / b, **TOL)
    np.testing.assert_allclose(grads[2], -(_vimco_signal(log_w) - w) / b, **TOL)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(("unbatched", (4,)), ("batched", (3, 5)))
  def test_gradient_contract_prior_proposal(self, shape):
    a, y, _ = _log_probs(31, shape, scale=1.0)
    grads = self.variant(jax.grad(estimators.vimco_loss, argnums=(0, 1)))(a, y)
    b = _num_examples(shape)
    np.testing.assert_allclose(grads[0], -_vimco_signal(y) / b, **TOL)
    np.testing.assert_allclose(grads[1], -_softmax(y) / b, **TOL)
    # log_q_a=None is the same as passing the prior's own log-probabilities.
    same = jax.jit(jax.grad(lambda a, y: estimators.vimco_loss(a, y, a), argnums=(0, 1)))(a, y)
    for got, want in zip(same, grads):
      np.testing.assert_allclose(got, want, **TOL)

  def test_value_and_minus_inf(self):
    a, y, q = _log_probs(32, (2, 3), scale=1.0)
    vimco = jax.jit(jax.value_and_grad(estimators.vimco_loss, argnums=(0, 1, 2)))
    np.testing.assert_allclose(vimco(a, y, q)[0], -np.mean(np.log(np.mean(np.exp(a + y - q), -1))), **TOL)
    y = y.at[0, 1].set(-jnp.inf)
    value, grads = vimco(a, y, q)
    self.assertTrue(np.isfinite(value))
    for g in grads:
      self.assertTrue(np.all(np.isfinite(g)), g)
    with self.assertRaises(ValueError):
      estimators.vimco_loss(a[..., :1], y[..., :1])


class SleepQLossTest(parameterized.TestCase):

  @parameterized.parameters((5,), (3, 5))
  def test_gradient(self, *shape):
    q = _normal(40, shape)
    np.testing.assert_allclose(estimators.sleep_q_loss(q), -np.mean(q), **TOL)
    np.testing.assert_allclose(jax.grad(estimators.sleep_q_loss)(q), np.full(shape, -1 / q.size), **TOL)
