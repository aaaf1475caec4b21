r"""A stochastic attention model small enough to enumerate exactly: the test bed of the estimator math.

The "image" is a strip of K cells, each holding a feature vector (`image [K, D]`); one cell holds the object,
whose features point at its class, the others hold noise. The model takes N = 2 glimpses, each choosing one of
the K cells, so there are S = K^2 glimpse sequences `a = (a_1, a_2)`, indexed s = a_1 K + a_2
(`all_sequences`). For one image:

  prior           p(a | I, theta) = softmax(theta.prior_first)[a_1] softmax(theta.prior_next[a_1])[a_2]
  classifier      p(y | a, I, theta) = softmax((I[a_1] + I[a_2]) @ theta.readout + theta.bias)[y]
  inference net   q(a | y, I, eta) = softmax(eta.q_first[y])[a_1] softmax(eta.q_next[y, a_1])[a_2]

(the tables stand for the networks' outputs on this one image; q's table for label y can represent any
distribution over sequences, the exact posterior included: `posterior_proposal`).

Exact quantities, by enumerating the S sequences: log p(y|I) (Eqn 1, `log_marginal`) and its gradient, the
posterior p(a|y,I), the variational bound F (Eqn 3), the multi-sample bound E[log 1/M sum_m w~_m] (Eqn 9) by
enumerating all S^M M-tuples, and the expectation of any function of an M-tuple of sampled sequences
(`exact_expectation`, S^M terms: with K = 3 or 4 and M <= 3 that is a few thousand), or its Monte Carlo
estimate (`monte_carlo_expectation`) when that is too many. `estimator_moments` gives the exact (or Monte
Carlo) mean and variance of an estimator's parameter gradient for any loss of `estimators`.

All functions are pure and dtype-following: under `jax.enable_x64(True)` they compute in float64.
"""
import functools
import itertools
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Array = chex.Array
Params = dict[str, Array]
# loss_fn(log_p_a [M], log_p_y [M], log_q_a [M]) -> scalar loss, e.g. a lambda around an `estimators` loss.
LossFn = Callable[[Array, Array, Array], Array]

NUM_GLIMPSES = 2
PROPOSALS = ("prior", "q")


class ToyConfig(NamedTuple):
  """Sizes: K cells (locations), C classes, D features per cell."""
  num_locations: int = 4
  num_classes: int = 3
  num_features: int = 3

  @property
  def num_sequences(self) -> int:
    return self.num_locations**NUM_GLIMPSES


@functools.partial(jax.jit, static_argnames=("config", "object_location", "strength", "noise"))
def make_image(key: chex.PRNGKey, config: ToyConfig, label: int, *, object_location: Optional[int] = None,
               strength: float = 2.0, noise: float = 0.5) -> Array:
  """An image `[K, D]`: `strength * one_hot(label)` (plus noise) in the object's cell, noise elsewhere.

  Needs D >= C (feature c points at class c). The object's cell is random unless `object_location` is given.
  """
  if config.num_features < config.num_classes:
    raise ValueError("make_image needs num_features >= num_classes.")
  k, d = config.num_locations, config.num_features
  draws = jax.random.normal(key, (k * d + k,))  # one draw: cheap to compile
  image = noise * draws[:k * d].reshape(k, d)
  if object_location is None:
    object_location = jnp.argmax(draws[k * d:])  # uniform over the K cells
  features = strength * jax.nn.one_hot(label, d, dtype=image.dtype)
  return image.at[object_location].add(features)


@functools.partial(jax.jit, static_argnames=("config", "prior_scale", "readout_gain"))
def init_params(key: chex.PRNGKey, config: ToyConfig, *, prior_scale: float = 1.0,
                readout_gain: float = 1.5) -> tuple[Params, Params]:
  """Random `(theta, eta)`: prior logits ~ N(0, prior_scale^2), readout ~ gain * I + N(0, 0.3^2)."""
  k, c, d = config.num_locations, config.num_classes, config.num_features
  shapes = {"prior_first": (k,), "prior_next": (k, k), "readout": (d, c), "q_first": (c, k),
            "q_next": (c, k, k)}
  sizes = [int(np.prod(shape)) for shape in shapes.values()]
  draws = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])  # one draw
  z = {name: x.reshape(shape) for (name, shape), x in zip(shapes.items(), draws)}
  theta = {
      "prior_first": prior_scale * z["prior_first"],
      "prior_next": prior_scale * z["prior_next"],
      "readout": readout_gain * jnp.eye(d, c) + 0.3 * z["readout"],
      "bias": jnp.zeros((c,)),
  }
  eta = {"q_first": 0.5 * z["q_first"], "q_next": 0.5 * z["q_next"]}
  return theta, eta


def all_sequences(config: ToyConfig) -> Array:
  """`[S, 2]` int32: every glimpse sequence (a_1, a_2), row s = a_1 K + a_2."""
  k = config.num_locations
  s = jnp.arange(k * k)
  return jnp.stack([s // k, s % k], axis=-1).astype(jnp.int32)


@jax.jit
def log_prior(theta: Params, seqs: Array, temperature: float = 1.0) -> Array:
  """`[...]` log p(a | I, theta) for sequences `seqs [..., 2]`; with a `temperature` T, the prior tempered as
  heuristic (1) of Section 4.5 tempers it (each glimpse's logits divided by T)."""
  first = jax.nn.log_softmax(theta["prior_first"] / temperature)
  nxt = jax.nn.log_softmax(theta["prior_next"] / temperature, axis=-1)
  return first[seqs[..., 0]] + nxt[seqs[..., 0], seqs[..., 1]]


@jax.jit
def log_likelihood(theta: Params, image: Array, y: int, seqs: Array) -> Array:
  """`[...]` log p(y | a, I, theta) for sequences `seqs [..., 2]`."""
  glimpsed = image[seqs[..., 0]] + image[seqs[..., 1]]  # [..., D]
  logits = glimpsed @ theta["readout"] + theta["bias"]
  return jax.nn.log_softmax(logits, axis=-1)[..., y]


@jax.jit
def log_proposal(eta: Params, y: int, seqs: Array, temperature: float = 1.0) -> Array:
  """`[...]` log q(a | y, I, eta) for sequences `seqs [..., 2]` (tempered by `temperature` as `log_prior`)."""
  first = jax.nn.log_softmax(eta["q_first"][y] / temperature)
  nxt = jax.nn.log_softmax(eta["q_next"][y] / temperature, axis=-1)
  return first[seqs[..., 0]] + nxt[seqs[..., 0], seqs[..., 1]]


def _check_proposal(proposal: str) -> None:
  if proposal not in PROPOSALS:
    raise ValueError(f"proposal must be one of {PROPOSALS}; got {proposal!r}.")


def _proposal_log_prob(theta: Params, eta: Params, y: int, seqs: Array, proposal: str,
                       temperature: float = 1.0) -> Array:
  """`[...]` log-density of the sampling distribution (the prior or q(.|y), tempered by `temperature`)."""
  if proposal == "prior":
    return log_prior(theta, seqs, temperature)
  return log_proposal(eta, y, seqs, temperature)


@functools.partial(jax.jit, static_argnames=("proposal", "temperature"))
def log_probs(theta: Params, eta: Params, image: Array, y: int, seqs: Array,
              proposal: str = "q", temperature: float = 1.0) -> tuple[Array, Array, Array]:
  """`(log_p_a, log_p_y, log_q_a)`, each `[...]`, at sequences `seqs [..., 2]`: differentiable in theta, eta.

  With `proposal="prior"`, log_q_a is `stop_gradient(log_p_a)`: the proposal's density at the samples, with
  no parameter of its own (as `estimators.wsram_losses` expects; for `estimators.vimco_loss` pass None). A
  `temperature` other than 1 tempers the proposal (`log_prior`): log_q_a is then the tempered density (for the
  prior, under stop_gradient), log_p_a stays the prior's own.
  """
  _check_proposal(proposal)
  log_p_a = log_prior(theta, seqs)
  log_p_y = log_likelihood(theta, image, y, seqs)
  log_q_a = _proposal_log_prob(theta, eta, y, seqs, proposal, temperature)
  if proposal == "prior":
    log_q_a = jax.lax.stop_gradient(log_q_a)
  return log_p_a, log_p_y, log_q_a


@functools.partial(jax.jit, static_argnames=("config", "proposal", "temperature"))
def sequence_log_probs(theta: Params, eta: Params, image: Array, y: int, config: ToyConfig,
                       proposal: str = "q", temperature: float = 1.0) -> tuple[Array, Array, Array]:
  """`log_probs` at every sequence: three `[S]` tables."""
  return log_probs(theta, eta, image, y, all_sequences(config), proposal, temperature)


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "proposal"))
def sample(key: chex.PRNGKey, theta: Params, eta: Params, y: int, config: ToyConfig, num_samples: int,
           proposal: str = "q") -> Array:
  """`[M, 2]` glimpse sequences drawn independently from the proposal (the prior, or q(.|y))."""
  _check_proposal(proposal)
  seqs = all_sequences(config)
  logits = _proposal_log_prob(theta, eta, y, seqs, proposal)
  index = jax.random.categorical(key, jax.lax.stop_gradient(logits), shape=(num_samples,))
  return seqs[index]


def sample_log_probs(key: chex.PRNGKey, theta: Params, eta: Params, image: Array, y: int,
                     config: ToyConfig, num_samples: int,
                     proposal: str = "q") -> tuple[Array, tuple[Array, Array, Array]]:
  """Draws M sequences from the proposal: `(seqs [M, 2], (log_p_a, log_p_y, log_q_a) each [M])`.

  The log-probabilities are differentiable functions of (theta, eta); the samples carry no gradient.
  """
  seqs = sample(key, theta, eta, y, config, num_samples, proposal)
  return seqs, log_probs(theta, eta, image, y, seqs, proposal)


# Exact quantities.


@functools.partial(jax.jit, static_argnames=("config",))
def log_marginal(theta: Params, image: Array, y: int, config: ToyConfig) -> Array:
  """Exact `log p(y | I, theta) = log sum_a p(a|I) p(y|a,I)` (Eqn 1), by enumeration."""
  seqs = all_sequences(config)
  return jax.nn.logsumexp(log_prior(theta, seqs) + log_likelihood(theta, image, y, seqs))


@functools.partial(jax.jit, static_argnames=("config",))
def exact_gradient(theta: Params, image: Array, y: int, config: ToyConfig) -> Params:
  """Exact `d log p(y | I, theta) / d theta` (Eqns 1, 6)."""
  return jax.grad(log_marginal)(theta, image, y, config)


@functools.partial(jax.jit, static_argnames=("config",))
def posterior(theta: Params, image: Array, y: int, config: ToyConfig) -> Array:
  """Exact posterior `p(a | y, I, theta)` over the S sequences, `[S]` (reshape to `[K, K]` for (a_1, a_2))."""
  seqs = all_sequences(config)
  return jax.nn.softmax(log_prior(theta, seqs) + log_likelihood(theta, image, y, seqs))


@functools.partial(jax.jit, static_argnames=("config",))
def variational_objective(theta: Params, image: Array, y: int, config: ToyConfig) -> Array:
  """Exact `F = sum_a p(a|I) log p(y|a,I)` (Eqn 3), the VAR objective."""
  seqs = all_sequences(config)
  return jnp.sum(jnp.exp(log_prior(theta, seqs)) * log_likelihood(theta, image, y, seqs))


@functools.partial(jax.jit, static_argnames=("config",))
def kl_posterior_to_proposal(theta: Params, eta: Params, image: Array, y: int,
                             config: ToyConfig) -> Array:
  """Exact `KL(p(a|y,I,theta) || q(a|y,I,eta))` (Eqn 12), the wake-q objective."""
  seqs = all_sequences(config)
  log_post = jax.nn.log_softmax(log_prior(theta, seqs) + log_likelihood(theta, image, y, seqs))
  return jnp.sum(jnp.exp(log_post) * (log_post - log_proposal(eta, y, seqs)))


@functools.partial(jax.jit, static_argnames=("config",))
def posterior_proposal(theta: Params, eta: Params, image: Array, y: int, config: ToyConfig, *,
                       mix: float = 1.0) -> Params:
  """eta whose q(.|y) interpolates, conditional by conditional, from the prior (mix=0) to the posterior (1).

  `q(a_1|y) ∝ p(a_1)^(1-mix) p(a_1|y,I)^mix` and `q(a_2|a_1,y) ∝ p(a_2|a_1)^(1-mix) p(a_2|a_1,y,I)^mix`; with
  mix = 1 q(.|y) is the exact posterior p(a|y,I,theta). The tables for other labels are left as they are.
  """
  k = config.num_locations
  log_joint = (log_prior(theta, all_sequences(config))
               + log_likelihood(theta, image, y, all_sequences(config))).reshape(k, k)
  post_first = jax.nn.log_softmax(jax.nn.logsumexp(log_joint, axis=-1))
  post_next = jax.nn.log_softmax(log_joint, axis=-1)
  prior_first = jax.nn.log_softmax(theta["prior_first"])
  prior_next = jax.nn.log_softmax(theta["prior_next"], axis=-1)
  return {
      "q_first": eta["q_first"].at[y].set((1 - mix) * prior_first + mix * post_first),
      "q_next": eta["q_next"].at[y].set((1 - mix) * prior_next + mix * post_next),
  }


def tuple_indices(num_sequences: int, num_samples: int) -> np.ndarray:
  """`[S^M, M]` int32: every M-tuple of sequence indices."""
  grid = itertools.product(range(num_sequences), repeat=num_samples)
  return np.fromiter(itertools.chain.from_iterable(grid), dtype=np.int32).reshape(-1, num_samples)


@functools.partial(jax.jit, static_argnames=("fn", "num_samples"))
def exact_expectation(fn: Callable[[Array], Any], log_probs_of_sequences: Array, num_samples: int) -> Any:
  """`E[fn(idx)]` over idx = M sequence indices drawn i.i.d. from `softmax(log_probs_of_sequences)`.

  Sums over all S^M tuples, each weighted by its probability; fn maps `[M]` int indices to a pytree of
  arrays and is vmapped over the tuples.
  """
  log_p = jax.nn.log_softmax(log_probs_of_sequences)
  idx = jnp.asarray(tuple_indices(log_p.shape[0], num_samples))
  weights = jnp.exp(jnp.sum(log_p[idx], axis=-1))
  values = jax.vmap(fn)(idx)
  return jax.tree.map(lambda v: jnp.tensordot(weights.astype(v.dtype), v, axes=1), values)


@functools.partial(jax.jit, static_argnames=("fn", "num_samples", "num_replicates"))
def monte_carlo_expectation(fn: Callable[[Array], Any], log_probs_of_sequences: Array, num_samples: int,
                            key: chex.PRNGKey, num_replicates: int) -> Any:
  """Monte Carlo estimate of `exact_expectation`'s value from `num_replicates` sampled M-tuples."""
  idx = jax.random.categorical(key, log_probs_of_sequences, shape=(num_replicates, num_samples))
  return jax.tree.map(lambda v: jnp.mean(v, axis=0), jax.vmap(fn)(idx))


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "proposal"))
def multi_sample_bound(theta: Params, eta: Params, image: Array, y: int, config: ToyConfig,
                       num_samples: int, proposal: str = "q") -> Array:
  """Exact `E[log 1/M sum_m w~_m]` (Eqn 9) over a^1..a^M ~ proposal: differentiable in theta and eta.

  Enumerates all S^M tuples, so the sampling distribution's dependence on the parameters is differentiated
  too (the score-function terms): its gradient is what VIMCO estimates without bias.
  """
  log_p_a, log_p_y, log_q_a = sequence_log_probs(theta, eta, image, y, config, proposal)
  if proposal == "prior":
    log_q_a = log_p_a  # here the sampling distribution does depend on theta
  idx = jnp.asarray(tuple_indices(config.num_sequences, num_samples))
  tuple_log_prob = jnp.sum(log_q_a[idx], axis=-1)
  log_w = (log_p_a + log_p_y - log_q_a)[idx]
  bound = jax.nn.logsumexp(log_w, axis=-1) - jnp.log(num_samples)
  return jnp.sum(jnp.exp(tuple_log_prob) * bound)


# Estimator moments, fast: per-sequence Jacobians and the loss's coefficients on the log-probabilities.


@functools.partial(jax.jit, static_argnames=("loss_fn", "config", "proposal", "temperature"))
def estimator_gradients(loss_fn: LossFn, theta: Params, eta: Params, image: Array, y: int,
                        config: ToyConfig, idx: Array, proposal: str = "q",
                        temperature: float = 1.0) -> tuple[Array, Array]:
  """Gradients of `loss_fn` w.r.t. flat theta `[T, *L, P]` and flat eta `[T, *L, Q]` at T tuples `idx [T, M]`.

  The same numbers as `jax.grad` of `loss_fn(*log_probs(theta, eta, image, y, all_sequences[idx]))` for each
  tuple, computed through the chain rule: the loss's gradient with respect to its M log-probability inputs,
  scattered onto the S sequences, times the Jacobians `[S, P]` of the sequences' log-probabilities. loss_fn may
  return a scalar, or an array of L losses `[*L]` (several estimators on the same samples, one compilation).
  Flat parameters are in `jax.flatten_util.ravel_pytree` order.
  """
  _check_proposal(proposal)
  theta_flat, unravel_theta = ravel_pytree(theta)
  eta_flat, unravel_eta = ravel_pytree(eta)

  def tables(theta_flat, eta_flat):
    return sequence_log_probs(unravel_theta(theta_flat), unravel_eta(eta_flat), image, y, config, proposal,
                              temperature)

  log_p_a, log_p_y, log_q_a = tables(theta_flat, eta_flat)
  jac_p_a, jac_p_y = jax.jacfwd(lambda t: tables(t, eta_flat)[:2])(theta_flat)  # [S, P] each
  jac_q_a = jax.jacfwd(lambda e: tables(theta_flat, e)[2])(eta_flat)  # [S, Q]

  # d loss / d log-probability inputs, [T, *L, M] each.
  coefficients = jax.vmap(jax.jacrev(loss_fn, argnums=(0, 1, 2)))(log_p_a[idx], log_p_y[idx], log_q_a[idx])
  one_hot = jax.nn.one_hot(idx, config.num_sequences, dtype=log_p_a.dtype)  # [T, M, S]

  def chain(coefficient, jacobian):
    return jnp.einsum("t...m,tms,sp->t...p", coefficient, one_hot, jacobian)

  g_theta = chain(coefficients[0], jac_p_a) + chain(coefficients[1], jac_p_y)
  g_eta = chain(coefficients[2], jac_q_a)
  return g_theta, g_eta


class Moments(NamedTuple):
  """Mean and total variance (trace of the covariance) of a gradient estimator, theta and eta parts.

  `mean_theta [*L, P]`, `mean_eta [*L, Q]` are the expected gradients of the *loss* (flat, `ravel_pytree`
  order): compare them with minus the gradient of the objective. `var_theta [*L]`, `var_eta [*L]` are the sums
  over parameters of the per-parameter variances. `exact` says whether they come from enumerating every M-tuple
  (True) or from Monte Carlo. `*L` is the shape of loss_fn's output (empty for a scalar loss).
  """
  mean_theta: Array
  var_theta: Array
  mean_eta: Array
  var_eta: Array
  exact: bool


def _moments(loss_fn, theta, eta, image, y, config, proposal, temperature, idx, weights, ddof_scale):
  g_theta, g_eta = estimator_gradients(loss_fn, theta, eta, image, y, config, idx, proposal, temperature)

  def moments(g):
    mean = jnp.tensordot(weights, g, axes=1)
    var = ddof_scale * jnp.sum(jnp.tensordot(weights, (g - mean) ** 2, axes=1), axis=-1)
    return mean, var

  return moments(g_theta) + moments(g_eta)


def _sampling_log_probs(theta, eta, y, config, proposal, temperature=1.0):
  return jax.nn.log_softmax(_proposal_log_prob(theta, eta, y, all_sequences(config), proposal, temperature))


@functools.partial(jax.jit, static_argnames=("loss_fn", "config", "proposal", "temperature", "num_samples"))
def _exact_moments(loss_fn, theta, eta, image, y, config, proposal, temperature, num_samples):
  idx = jnp.asarray(tuple_indices(config.num_sequences, num_samples))
  log_p = _sampling_log_probs(theta, eta, y, config, proposal, temperature)
  weights = jnp.exp(jnp.sum(log_p[idx], axis=-1))
  return _moments(loss_fn, theta, eta, image, y, config, proposal, temperature, idx, weights, 1.0)


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "config", "proposal", "temperature", "num_samples", "num_replicates"))
def _monte_carlo_moments(loss_fn, theta, eta, image, y, config, proposal, temperature, num_samples, key,
                         num_replicates):
  log_p = _sampling_log_probs(theta, eta, y, config, proposal, temperature)
  idx = jax.random.categorical(key, log_p, shape=(num_replicates, num_samples))
  weights = jnp.full((num_replicates,), 1.0 / num_replicates, log_p.dtype)
  ddof_scale = num_replicates / (num_replicates - 1)
  return _moments(loss_fn, theta, eta, image, y, config, proposal, temperature, idx, weights, ddof_scale)


def estimator_moments(loss_fn: LossFn, theta: Params, eta: Params, image: Array, y: int,
                      config: ToyConfig, num_samples: int, proposal: str = "q", *,
                      temperature: float = 1.0, key: Optional[chex.PRNGKey] = None,
                      num_replicates: int = 20_000, max_tuples: int = 5_000) -> Moments:
  """Mean and variance of `loss_fn`'s parameter gradient over M samples from the proposal (tempered by
  `temperature`, as `log_probs`).

  Exact (every M-tuple, weighted by its probability) when S^M <= max_tuples; otherwise Monte Carlo over
  `num_replicates` tuples drawn with `key` (then the variance is the unbiased sample variance). loss_fn is a
  static argument of a jitted function: define it once and reuse it to avoid recompiling.
  """
  _check_proposal(proposal)
  if config.num_sequences**num_samples <= max_tuples:
    moments = _exact_moments(loss_fn, theta, eta, image, y, config, proposal, temperature, num_samples)
    return Moments(*moments, exact=True)
  if key is None:
    raise ValueError(f"S^M = {config.num_sequences**num_samples} tuples exceed max_tuples: pass a key.")
  moments = _monte_carlo_moments(
      loss_fn, theta, eta, image, y, config, proposal, temperature, num_samples, key, num_replicates)
  return Moments(*moments, exact=False)
