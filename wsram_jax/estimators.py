r"""The estimator math of the Wake-Sleep Recurrent Attention Model (Ba et al., NIPS 2015, Section 4).

Every function here is pure and takes per-sample log-probabilities shaped `[..., M]`: M samples of a glimpse
sequence `a^m` on the last axis, any leading (batch) axes before it. Losses are to be minimised and are means
over the leading axes (B = their product). The caller computes, for each sample,

  log_p_a[m] = log p(a^m | I, theta)        the attention prior (the prediction network's policy),
  log_p_y[m] = log p(y | a^m, I, theta)     the classifier after the last glimpse,
  log_q_a[m] = log q(a^m | y, I, eta)       the proposal the samples were drawn from (the prior, or the
                                            inference network of Section 4.3),

with a stop-gradient on the sampled actions themselves: gradients reach theta and eta only through these
log-probabilities. Each loss is a *surrogate*: its gradient with respect to the log-probabilities is the
estimator below, its value is the quantity named in its docstring.

Objective (Eqn 1)
-----------------
  l = log p(y | I, theta) = log sum_a p(a | I, theta) p(y | a, I, theta).

VAR: the variational lower bound with the prior as q (Eqns 2-5) -> `variational_loss`
------------------------------------------------------------------------------------
  F = sum_a p(a | I) log p(y | a, I)                                                         (Eqn 3)
  dF/dtheta = E_p(a)[ d log p(y|a)/dtheta + log p(y|a) d log p(a)/dtheta ]                  (Eqn 4)
           ~= 1/M sum_m [ d log p(y|a^m) + (log p(y|a^m) - b) d log p(a^m) ],  a^m ~ p(a|I) (Eqn 5)
with a reward baseline b (Section 4.4; b = 0 is the plain Eqn 5). b must not depend on a^m for the estimate
to stay unbiased: a constant, a moving average of past rewards (`baselines.moving_average`), a learned
function of the image (`baselines.baseline_loss`), or the mean reward of the *other* samples
(`leave_one_out_baseline`). Hence `variational_loss` has

  d loss / d log_p_y[m] = -1 / (M B),    d loss / d log_p_a[m] = -(log_p_y[m] - b_m) / (M B),

and no gradient into the baseline. Samples drawn from another proposal q (heuristic (1) of Section 4.5, the
prior tempered) make Eqn 5 biased for dF/dtheta; with `log_q_a` each term is weighted by
v_m = p(a^m | I) / q(a^m), which removes that bias (importance sampling; `notebooks/estimator_math.ipynb`
measures both).

WS-RAM: importance-weighted gradient of l (Eqns 6-10, wake-p of reweighted wake-sleep) -> `wsram_losses`
-------------------------------------------------------------------------------------------------------
With a^m ~ q(a | y, I):
  w~_m = p(a^m | I) p(y | a^m, I) / q(a^m | y, I)           (Eqn 7; `log_importance_weights`)
  w_m  = w~_m / sum_i w~_i                                   (`normalized_weights`)
  dl/dtheta ~= sum_m w_m [ d log p(y|a^m)/dtheta + d log p(a^m)/dtheta ]                      (Eqn 8)
Eqn 8 is the gradient, with q and the samples held fixed, of the multi-sample bound
  E[ log 1/M sum_m w~_m ] <= log E[ w~ ] = l                  (Eqn 9; `log_marginal_bound`)
which is at least as tight as the variational bound F = E[log w~] of Eqn 2 (Eqn 10; the paper prints
log 1/M sum_m w~_m on both sides of that inequality: the middle term should read E[1/M sum_m log w~_m]).
When q does not depend on theta the expectation of Eqn 8 equals the gradient of the Eqn 9 bound exactly; with
the prior as proposal (q depends on theta) it drops the bound's score-function term and is instead a
self-normalised, consistent (bias O(1/M)) estimate of dl/dtheta in the form of Eqn 6. `vimco_loss` below is
the unbiased gradient of the bound itself.

Inference network (Eqns 11-14, wake-q)
--------------------------------------
  min_eta KL(p(a|y,I) || q(a|y,I,eta)) = const - sum_a p(a|y,I) log q(a|y,I,eta)             (Eqn 12)
  dKL/deta = -E_p(a|y,I)[ d log q(a|y,I)/deta ] ~= -sum_m w_m d log q(a^m|y,I)/deta            (Eqns 13, 14)
The paper prints Eqns 13, 14 and 17 without the minus sign (a typo: differentiating Eqn 12 gives it).
`loss_q` below follows the correctly signed form, so that *minimising* it moves q towards the posterior.

Control variates (Eqns 15-19)
-----------------------------
Both score functions have zero mean under the proposal (Eqn 15):
  E_q[ p(a)/q(a) d log p(a)/dtheta ] = 0,        E_q[ d log q(a)/deta ] = 0.
Subtracting the same-sample estimates of these, scaled as the reward baselines of Eqns 18 and 19,
  b_p(a^m) = r_m = (p(a^m)/q(a^m)) / sum_i (p(a^i)/q(a^i)) = softmax_m(log p(a^m) - log q(a^m))   (Eqn 18)
  b_q = 1/M                                                                                    (Eqn 19)
gives
  dl/dtheta   ~= sum_m w_m d log p(y|a^m) + sum_m (w_m - r_m) d log p(a^m)                  (Eqn 16 w/ Eqn 18)
  dKL/deta    ~= -sum_m (w_m - 1/M) d log q(a^m)                                              (Eqn 17)
Eqn 16 as printed subtracts the unnormalised ratio p(a^m)/q(a^m) (without a 1/M): that is an unbiased but
M-times-too-large control variate; Eqn 18 states the self-normalised baseline r_m, which is what the estimator
API (docs/ARCHITECTURE.md) specifies and what is implemented. With the prior as proposal r_m = 1/M and both
control variates leave the expectation exactly unchanged (the tests check this by enumeration). With q != prior,
r_m is a ratio estimate and the p-side control variate adds a bias that vanishes as M grows (O(1/M); e.g. at
M = 1 it cancels the whole log p(a) gradient since w_1 = r_1 = 1); the q-side one (1/M) is always exactly
unbiased.

Hence `wsram_losses` has, with w = normalized weights, r = softmax(log_p_a - log_q_a) (both stop-gradient):
  loss_p: d/d log_p_y[m] = -w_m/B;   d/d log_p_a[m] = -(w_m - r_m)/B with control variates, -w_m/B without;
          no gradient to log_q_a.                                                    (Eqns 8, 16, 18)
  loss_q: d/d log_q_a[m] = -(w_m - 1/M)/B with control variates, -w_m/B without;
          no gradient to log_p_a or log_p_y.                                         (Eqns 14, 17, 19)
With the prior as proposal, pass log_q_a = stop_gradient(log_p_a) and drop loss_q (there is no eta): loss_q's
gradient would otherwise flow into the prior.

Beyond the paper
----------------
* `vimco_loss`: VIMCO (Mnih & Rezende, 2016): the unbiased gradient of the Eqn 9 bound, with the score
  function of each sample baselined by the bound recomputed with that sample's log-weight replaced by the
  mean of the other log-weights (the geometric mean of the others' weights).
* `leave_one_out_baseline`: b_m = mean of log p(y|a^j) over j != m, a multi-sample baseline for VAR.
* `sleep_q_loss`: the sleep-phase q update of reweighted wake-sleep (Bornschein & Bengio, ICLR 2015).

Numerics
--------
Everything is computed in log space. Log-weights may differ by 1e4, and some (not all) of them may be -inf
(a sample with p(a) p(y|a) = 0): values and gradients stay finite. `log_q_a` must be finite where the joint is
(a sample drawn from q has q > 0). The variational objective needs finite log_p_y (F is -inf otherwise).
"""
from typing import Optional

import chex
import jax
import jax.numpy as jnp

Array = chex.Array


def _check_log_probs(*log_probs: Array) -> None:
  """Log-probabilities: equal shapes `[..., M]`, floating point."""
  chex.assert_type(list(log_probs), float)
  chex.assert_equal_shape(list(log_probs))
  if jnp.ndim(log_probs[0]) < 1:
    raise ValueError(f"log-probabilities need a sample axis [..., M]; got shape {jnp.shape(log_probs[0])}.")


def _zero_with_unit_gradient(x: Array) -> Array:
  """`x - stop_gradient(x)`: the value 0, the gradient 1 (0 where x is infinite, instead of nan)."""
  safe_x = jnp.where(jnp.isfinite(x), x, 0.0)
  return safe_x - jax.lax.stop_gradient(safe_x)


def _weighted(coefficient: Array, x: Array) -> Array:
  """`coefficient * x`, with 0 where the coefficient is 0 (so that 0 * -inf is 0, not nan)."""
  return jnp.where(coefficient == 0, 0.0, coefficient * x)


def _expand_to_samples(value: Array, log_probs: Array) -> Array:
  """Broadcasts a per-example value `[...]` (or anything broadcastable to `[..., M]`) against `[..., M]`."""
  value = jnp.asarray(value, dtype=log_probs.dtype)
  if value.ndim == log_probs.ndim - 1:
    value = value[..., None]
  return jnp.broadcast_to(value, log_probs.shape)


def log_importance_weights(log_p_a: Array, log_p_y: Array, log_q_a: Array) -> Array:
  """Log importance weights, Eqn 7: `log p(a|I) + log p(y|a,I) - log q(a|y,I)`.

  A sample with `p(a) p(y|a) = 0` gets log-weight -inf whatever `q(a)` is (no nan from -inf - -inf).

  Args:
    log_p_a: `[..., M]` log p(a^m | I, theta).
    log_p_y: `[..., M]` log p(y | a^m, I, theta).
    log_q_a: `[..., M]` log q(a^m | y, I, eta) of the proposal the samples came from.

  Returns:
    `[..., M]` log w~_m.
  """
  _check_log_probs(log_p_a, log_p_y, log_q_a)
  log_joint = log_p_a + log_p_y
  return jnp.where(log_joint == -jnp.inf, -jnp.inf, log_joint - log_q_a)


def normalized_weights(log_w: Array) -> Array:
  """Normalised importance weights `w_m = w~_m / sum_i w~_i` (Section 4.2): a softmax over the last axis M."""
  _check_log_probs(log_w)
  return jax.nn.softmax(log_w, axis=-1)


def effective_sample_size(log_w: Array) -> Array:
  """Effective sample size `1 / sum_m w_m^2` of normalised weights, in `[1, M]` (Section 5.1).

  Computed in log space as `exp(2 logsumexp(log w) - logsumexp(2 log w))`.

  Args:
    log_w: `[..., M]` (unnormalised) log importance weights.

  Returns:
    `[...]` the ESS of each example.
  """
  _check_log_probs(log_w)
  return jnp.exp(2.0 * jax.nn.logsumexp(log_w, axis=-1) - jax.nn.logsumexp(2.0 * log_w, axis=-1))


def log_marginal_bound(log_w: Array) -> Array:
  """The multi-sample lower bound on log p(y|I), Eqn 9: `log 1/M sum_m w~_m = logsumexp(log w) - log M`.

  Its gradient with respect to `log_w[m]` is the normalised weight `w_m`.

  Args:
    log_w: `[..., M]` log importance weights (not all -inf).

  Returns:
    `[...]` the bound's one-sample-set estimate, per example.
  """
  _check_log_probs(log_w)
  num_samples = log_w.shape[-1]
  return jax.nn.logsumexp(log_w, axis=-1) - jnp.log(num_samples).astype(log_w.dtype)


P_BASELINES = ("self_normalized", "unbiased", "as_printed")


def wsram_losses(
    log_p_a: Array, log_p_y: Array, log_q_a: Array, *, control_variates: bool,
    p_baseline: str = "self_normalized", log_q_own: Optional[Array] = None
) -> tuple[Array, Array]:
  """The WS-RAM wake-p and wake-q surrogate losses (Eqns 8, 14; with control variates Eqns 16-19).

  With `w = normalized_weights(log_importance_weights(...))` and `r = softmax(log_p_a - log_q_a)`, both
  under stop_gradient, and B the number of examples (product of the leading axes):

    loss_p: d/d log_p_y[m] = -w_m/B;
            d/d log_p_a[m] = -(w_m - r_m)/B with control variates (Eqn 16, baseline Eqn 18), -w_m/B without
            (Eqn 8); no gradient to log_q_a.
    loss_q: d/d log_q_a[m] = -(w_m - 1/M)/B with control variates (Eqn 17, baseline Eqn 19), -w_m/B without
            (Eqn 14, correctly signed: see the module docstring); no gradient to log_p_a or log_p_y.

  Values: loss_p is minus the mean Eqn 9 bound `log 1/M sum_m w~_m`; loss_q is the mean self-normalised
  estimate `-sum_m w_m log q(a^m|y,I)` of the cross-entropy from the posterior to q (KL(p||q) + H[p]).
  The control-variate terms change the gradients only, not the values.

  With the prior as proposal pass `log_q_a = jax.lax.stop_gradient(log_p_a)` (then r_m = 1/M) and use
  loss_p only.

  `p_baseline` chooses r_m, the coefficient of the p-side control variate (Eqn 15: E_q[p/q d log p] = 0, so
  any r_m proportional to p(a^m)/q(a^m) with a fixed factor leaves the expectation unchanged):
  ``self_normalized`` (default, the paper's Eqn 18) r_m = (p/q)_m / sum_i (p/q)_i, a ratio estimate, biased by
  O(1/M) when q is not the prior; ``unbiased`` r_m = p(a^m) / (M q(a^m)); ``as_printed`` r_m = p(a^m) / q(a^m),
  Eqn 16 as the paper prints it (unbiased, M times the unbiased coefficient). With the prior as proposal the
  first two are 1/M.

  The wake-q gradient is sum_m w_m d log q(a^m) with q's *own* density: when the samples come from a proposal
  r other than q itself (tempered, a mixture), pass q's own log-density as `log_q_own` (it then takes the place
  of `log_q_a` in loss_q, while the weights keep the proposal's density), and the q-side control variate's
  coefficient becomes (q/r)_m, self-normalised or divided by M as for the p side (1/M when r = q). By default
  `log_q_own = log_q_a` (q is the proposal).

  Args:
    log_p_a: `[..., M]` log p(a^m | I, theta).
    log_p_y: `[..., M]` log p(y | a^m, I, theta).
    log_q_a: `[..., M]` log q(a^m | y, I, eta), the proposal the samples were drawn from.
    control_variates: whether to subtract the baselines of Eqns 18 and 19.
    p_baseline: ``self_normalized``, ``unbiased`` or ``as_printed`` (above).
    log_q_own: `[..., M]` the inference network's own log q(a^m | y, I, eta), if the proposal is another
      distribution.

  Returns:
    `(loss_p, loss_q)`, scalars: loss_p updates theta, loss_q updates eta.
  """
  _check_log_probs(log_p_a, log_p_y, log_q_a)
  if p_baseline not in P_BASELINES:
    raise ValueError(f"p_baseline must be one of {P_BASELINES}, got {p_baseline!r}.")
  num_samples = log_p_a.shape[-1]

  # Eqn 8 is the gradient of the Eqn 9 bound with the proposal held fixed: d bound / d log p(a^m) =
  # d bound / d log p(y|a^m) = w_m.
  log_w_p = log_importance_weights(log_p_a, log_p_y, jax.lax.stop_gradient(log_q_a))
  bound = log_marginal_bound(log_w_p)
  if control_variates:
    # Eqns 15, 16, 18: the baseline r_m comes off log p(a^m)'s coefficient.
    log_ratio = jax.lax.stop_gradient(log_importance_weights(log_p_a, jnp.zeros_like(log_p_a), log_q_a))
    if p_baseline == "self_normalized":
      r = normalized_weights(log_ratio)
    elif p_baseline == "unbiased":
      r = jnp.exp(log_ratio - jnp.log(num_samples).astype(log_ratio.dtype))
    else:
      r = jnp.exp(log_ratio)
    bound = bound - jnp.sum(_weighted(r, _zero_with_unit_gradient(log_p_a)), axis=-1)
  loss_p = -jnp.mean(bound)

  # Eqns 12-14: -sum_m w_m log q(a^m); its gradient estimates dKL(p(a|y) || q)/d eta.
  log_q = log_q_a if log_q_own is None else log_q_own
  w = jax.lax.stop_gradient(normalized_weights(log_w_p))
  cross_entropy = -jnp.sum(_weighted(w, log_q), axis=-1)
  if control_variates:
    if log_q_own is None:  # Eqns 15, 17, 19: the baseline b_q = 1/M.
      cross_entropy = cross_entropy + jnp.sum(_zero_with_unit_gradient(log_q), axis=-1) / num_samples
    else:  # Samples from another proposal r: E_r[(q/r) d log q] = 0 gives b_q,m proportional to (q/r)_m.
      log_ratio_q = jax.lax.stop_gradient(log_q_own - log_q_a)
      b = (normalized_weights(log_ratio_q) if p_baseline == "self_normalized"
           else jnp.exp(log_ratio_q - jnp.log(num_samples).astype(log_ratio_q.dtype)))
      cross_entropy = cross_entropy + jnp.sum(_weighted(b, _zero_with_unit_gradient(log_q)), axis=-1)
  loss_q = jnp.mean(cross_entropy)
  return loss_p, loss_q


def variational_loss(log_p_a: Array, log_p_y: Array, baseline: Array = 0.0,
                     log_q_a: Optional[Array] = None) -> Array:
  """The VAR surrogate loss of Eqn 5, with a reward baseline (Section 4.4; [2] in the paper).

  Samples are from the prior, or, with `log_q_a`, from a proposal q (e.g. the tempered prior) whose terms get
  the importance weights v_m = p(a^m) / q(a^m) (not normalised). With B examples and M samples each:

    d/d log_p_y[m] = -v_m/(M B);   d/d log_p_a[m] = -v_m (log_p_y[m] - baseline_m)/(M B);
    no gradient into the baseline or the weights; v_m = 1 without `log_q_a`.

  The value is minus the Monte Carlo estimate of F (Eqn 3), `-mean_m v_m log p(y|a^m)`, whatever the baseline.

  Args:
    log_p_a: `[..., M]` log p(a^m | I, theta).
    log_p_y: `[..., M]` log p(y | a^m, I, theta) (finite).
    baseline: broadcastable to `[..., M]`, or per example `[...]`; 0 means no control variate. It must not
      depend on a^m (e.g. a moving average, a learned b(I), `leave_one_out_baseline(log_p_y)`).
    log_q_a: `[..., M]` log q(a^m), the density the samples were drawn from, or None when that is the prior
      (or when the samples are to be treated as the prior's, as the exploration heuristic does: biased).

  Returns:
    The scalar loss.
  """
  _check_log_probs(log_p_a, log_p_y)
  baseline = jax.lax.stop_gradient(_expand_to_samples(baseline, log_p_y))
  reward = jax.lax.stop_gradient(log_p_y - baseline)
  # Eqn 5: d log p(y|a^m) + (log p(y|a^m) - b) d log p(a^m).
  surrogate = log_p_y + _weighted(reward, _zero_with_unit_gradient(log_p_a))
  if log_q_a is not None:
    _check_log_probs(log_p_a, log_p_y, log_q_a)
    surrogate = _weighted(jax.lax.stop_gradient(jnp.exp(log_p_a - log_q_a)), surrogate)
  return -jnp.mean(surrogate)


def leave_one_out_baseline(log_p_y: Array) -> Array:
  """A multi-sample baseline for VAR: `b_m = 1/(M-1) sum_{j != m} log p(y|a^j)`.

  b_m does not depend on a^m, so `variational_loss(log_p_a, log_p_y, leave_one_out_baseline(log_p_y))` is
  still unbiased for dF/dtheta (Eqn 4). Needs M >= 2.

  Args:
    log_p_y: `[..., M]` rewards log p(y | a^m, I).

  Returns:
    `[..., M]` the baselines, under stop_gradient.
  """
  _check_log_probs(log_p_y)
  num_samples = log_p_y.shape[-1]
  if num_samples < 2:
    raise ValueError(f"a leave-one-out baseline needs at least 2 samples; got M = {num_samples}.")
  others = _leave_one_out(log_p_y, fill=0.0)
  return jax.lax.stop_gradient(jnp.sum(others, axis=-1) / (num_samples - 1))


def _leave_one_out(x: Array, fill) -> Array:
  """`[..., M] -> [..., M, M]`: row m is x with its m-th entry replaced by `fill` (broadcastable `[..., M, 1]`)."""
  num_samples = x.shape[-1]
  eye = jnp.eye(num_samples, dtype=bool)
  return jnp.where(eye, fill, x[..., None, :])


def vimco_loss(log_p_a: Array, log_p_y: Array, log_q_a: Optional[Array] = None) -> Array:
  """VIMCO (Mnih & Rezende, 2016): the unbiased gradient of the multi-sample bound of Eqn 9.

  With L = log 1/M sum_j w~_j and L_{-m} the same with log w~_m replaced by the mean of the other
  log-weights, `1/(M-1) sum_{j != m} log w~_j` (the log of their geometric mean),

    d/d log_p_y[m] = -w_m/B;   d/d log_p_a[m] = -w_m/B;
    d/d log_q_a[m] = -(L - L_{-m} - w_m)/B,

  i.e. dL/dphi ~= sum_m (L - L_{-m}) d log q(a^m)/dphi + sum_m w_m d log w~_m/dphi. The learning signals are
  under stop_gradient. With the prior as proposal (`log_q_a=None`, the same as passing `log_q_a=log_p_a`),
  log w~_m = log p(y|a^m) and the gradients are

    d/d log_p_y[m] = -w_m/B;   d/d log_p_a[m] = -(L - L_{-m})/B.

  In expectation over the samples these equal minus the exact gradient of E[L] (tests check it by
  enumeration). Note that VIMCO trains q to maximise the bound, not to minimise KL(p || q) as wake-q does.
  L - L_{-m} is +inf when sample m is the only one with non-zero weight and the others' geometric mean is 0
  (e.g. M = 2 with one -inf log-weight). Needs M >= 2.

  Args:
    log_p_a: `[..., M]` log p(a^m | I, theta).
    log_p_y: `[..., M]` log p(y | a^m, I, theta).
    log_q_a: `[..., M]` log q(a^m | y, I, eta), or None when the samples are from the prior.

  Returns:
    The scalar loss, whose value is minus the mean Eqn 9 bound.
  """
  if log_q_a is None:
    log_q_a = log_p_a
  _check_log_probs(log_p_a, log_p_y, log_q_a)
  num_samples = log_p_a.shape[-1]
  if num_samples < 2:
    raise ValueError(f"VIMCO needs at least 2 samples; got M = {num_samples}.")

  log_w = log_importance_weights(log_p_a, log_p_y, log_q_a)
  bound = log_marginal_bound(log_w)  # gradient w_m into log p(a^m), log p(y|a^m); -w_m into log q(a^m)

  # L_{-m}: log-weight m replaced by the mean of the others' log-weights.
  sg_log_w = jax.lax.stop_gradient(log_w)
  mean_of_others = jnp.sum(_leave_one_out(sg_log_w, fill=0.0), axis=-1) / (num_samples - 1)
  bound_without = log_marginal_bound(_leave_one_out(sg_log_w, fill=mean_of_others[..., :, None]))
  learning_signal = jax.lax.stop_gradient(bound[..., None] - bound_without)

  surrogate = bound + jnp.sum(_weighted(learning_signal, _zero_with_unit_gradient(log_q_a)), axis=-1)
  return -jnp.mean(surrogate)


def sleep_q_loss(log_q_a_of_model_samples: Array) -> Array:
  """The sleep-phase q update of reweighted wake-sleep (Bornschein & Bengio, 2015).

  Draw (a, y) from the model itself, a ~ p(a | I, theta) and y ~ p(y | a, I, theta), and evaluate the
  proposal on them with y as its label input (a teacher-forced rollout). Then

    E_{p(a,y|I)}[ -log q(a | y, I, eta) ] = E_{p(y|I)}[ KL(p(a|y,I) || q(a|y,I,eta)) ] + const,

  the same divergence as wake-q (Eqn 12) but with exact posterior samples in place of importance weights, at
  labels drawn from the model rather than the data. The loss is `-mean(log q)` over every axis, so
  d/d log_q[..., m] = -1/(M B).

  Args:
    log_q_a_of_model_samples: `[..., M]` log q(a^m | y^m, I, eta) for (a^m, y^m) drawn from the model.

  Returns:
    The scalar loss.
  """
  _check_log_probs(log_q_a_of_model_samples)
  return -jnp.mean(log_q_a_of_model_samples)
