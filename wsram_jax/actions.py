"""The glimpse action distribution: location Gaussian x scale Categorical, as a mixture of K such components.

An action ``a = (loc, scale)`` has a location ``loc = (y, x)`` in R^2 and a scale in ``0..S-1`` (paper Sec. 5.1:
"a Gaussian random variable for the location and an independent multinomial random variable for the scale").
The prior p(a_n | a_<n, I) and the inference network q(a_n | y, a_<n, I) are single components (K = 1); the
defensive mixture ``alpha q + (1 - alpha) p`` (Le et al. 2019) has K = 2. Component k has density

    N(loc; loc_mean[k], diag(exp(loc_log_std[k])**2)) * softmax(scale_logits[k])[scale]

and the mixture ``sum_k softmax(mix_logits)[k] * component_k``.

Everything is a plain pytree of arrays (`ActionDist`, `Action` are NamedTuples) so it passes through `vmap`,
`scan` and `jit`; functions broadcast over any leading axes ``[...]``.

Samples are stop-gradient'ed: gradients reach the parameters only through `log_prob` (score-function estimators).
`log_prob` scores the sampled, unclipped location; glimpse extraction clips it to ``[-1, 1]`` separately.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Action", "ActionDist", "Noise", "single", "mixture", "num_components", "num_scales", "draw_noise",
    "sample_from_noise", "sample", "log_prob",
    "sample_and_log_prob", "entropy", "temper", "mode", "scale_probs", "mean_location", "stop_gradient",
]

_LOG_2PI = math.log(2.0 * math.pi)


class Action(NamedTuple):
  """One glimpse action (or a batch of them).

  Attributes:
    loc: ``[..., 2]`` float32, ``(y, x)``; unclipped as sampled.
    scale: ``[...]`` int32 in ``0..S-1``.
  """
  loc: jax.Array
  scale: jax.Array


class ActionDist(NamedTuple):
  """Parameters of a K-component mixture of (diagonal Gaussian location) x (Categorical scale).

  Attributes:
    mix_logits: ``[..., K]`` unnormalised log mixture weights (zeros for K = 1).
    loc_mean: ``[..., K, 2]`` location means.
    loc_log_std: ``[..., K, 2]`` log standard deviations of the location.
    scale_logits: ``[..., K, S]`` unnormalised log scale probabilities.
  """
  mix_logits: jax.Array
  loc_mean: jax.Array
  loc_log_std: jax.Array
  scale_logits: jax.Array


def single(loc_mean: jax.Array, loc_log_std: jax.Array, scale_logits: jax.Array) -> ActionDist:
  """A one-component (K = 1) distribution from ``loc_mean [..., 2]``, ``loc_log_std`` (broadcast to
  ``[..., 2]``) and ``scale_logits [..., S]``."""
  loc_mean = jnp.asarray(loc_mean, jnp.float32)
  loc_log_std = jnp.broadcast_to(jnp.asarray(loc_log_std, jnp.float32), loc_mean.shape)
  scale_logits = jnp.asarray(scale_logits, jnp.float32)
  return ActionDist(
      mix_logits=jnp.zeros(loc_mean.shape[:-1] + (1,), jnp.float32),
      loc_mean=loc_mean[..., None, :],
      loc_log_std=loc_log_std[..., None, :],
      scale_logits=scale_logits[..., None, :],
  )


def mixture(dists: list[ActionDist] | tuple[ActionDist, ...], weights) -> ActionDist:
  """The mixture ``sum_i weights[i] * dists[i]``, concatenating their components along K.

  Args:
    dists: distributions with equal leading shapes and S; component counts may differ.
    weights: one non-negative weight per distribution (floats or arrays broadcastable to the leading shape);
      they should sum to 1. A zero weight gives that part's components ``-inf`` mixture logits.

  Returns:
    An `ActionDist` with ``K = sum_i K_i`` and ``mix_logits = log weights[i] + log_softmax(dists[i].mix_logits)``.
  """
  if len(dists) != len(weights):
    raise ValueError(f"mixture: {len(dists)} distributions but {len(weights)} weights.")
  mix = [jnp.log(jnp.asarray(wt, jnp.float32))[..., None] + jax.nn.log_softmax(d.mix_logits, axis=-1)
         for d, wt in zip(dists, weights)]
  lead = jnp.broadcast_shapes(*[m.shape[:-1] for m in mix])
  mix = [jnp.broadcast_to(m, lead + m.shape[-1:]) for m in mix]
  return ActionDist(
      mix_logits=jnp.concatenate(mix, axis=-1),
      loc_mean=jnp.concatenate([d.loc_mean for d in dists], axis=-2),
      loc_log_std=jnp.concatenate([d.loc_log_std for d in dists], axis=-2),
      scale_logits=jnp.concatenate([d.scale_logits for d in dists], axis=-2),
  )


def num_components(dist: ActionDist) -> int:
  """K (static)."""
  return dist.mix_logits.shape[-1]


def num_scales(dist: ActionDist) -> int:
  """S (static)."""
  return dist.scale_logits.shape[-1]


def stop_gradient(dist: ActionDist) -> ActionDist:
  """The same distribution with every parameter stop-gradient'ed."""
  return jax.tree_util.tree_map(jax.lax.stop_gradient, dist)


def _take_component(x: jax.Array, k: jax.Array) -> jax.Array:
  """``x [..., K, D]``, ``k [...]`` int -> ``x[..., k, :]`` of shape ``[..., D]``."""
  return jnp.take_along_axis(x, k[..., None, None], axis=-2)[..., 0, :]


class Noise(NamedTuple):
  """The randomness of one draw per leading index, drawn up front so that a loop samples without a PRNG.

  Attributes:
    normal: ``[..., 2]`` standard normal, for the location.
    uniform: ``[..., 2]`` in [0, 1): ``[..., 0]`` picks the scale, ``[..., 1]`` the mixture component (inverse CDF).
  """
  normal: jax.Array
  uniform: jax.Array


def draw_noise(key: jax.Array, shape: tuple[int, ...] = ()) -> Noise:
  """`Noise` for ``shape`` draws (e.g. ``(M, N)`` for every glimpse of M trajectories) in one PRNG call.

  One ``[..., 4]`` uniform draw: two values become the uniforms, two the normals through the inverse CDF
  ``sqrt(2) erfinv(2u - 1)`` (what `jax.random.normal` does with its own uniform draw). On the CPU every PRNG call
  is a loop in the compiled program, so one call instead of three (split, normal, uniform) saves time and compile
  time.
  """
  u = jax.random.uniform(key, tuple(shape) + (4,), jnp.float32)
  lo = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
  normal = jnp.sqrt(jnp.float32(2.0)) * jax.scipy.special.erfinv(jnp.maximum(2.0 * u[..., :2] - 1.0, lo))
  return Noise(normal=normal, uniform=u[..., 2:])


def _inverse_cdf(logits: jax.Array, u: jax.Array) -> jax.Array:
  """Categorical draw ``[...]`` int32 from ``logits [..., K]`` and ``u [...]`` uniform in [0, 1)."""
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  return jnp.sum(u[..., None] >= cdf[..., :-1], axis=-1).astype(jnp.int32)


def sample_from_noise(dist: ActionDist, noise: Noise) -> Action:
  """The action that `noise` selects from ``dist`` (a deterministic, stop-gradient'ed function of both).

  A component is chosen by inverse CDF of ``softmax(mix_logits)`` at ``noise.uniform[..., 1]`` (skipped for
  K = 1), then ``loc = mean + std * noise.normal`` and the scale by inverse CDF at ``noise.uniform[..., 0]``.
  """
  if num_components(dist) == 1:
    mean, log_std, logits = dist.loc_mean[..., 0, :], dist.loc_log_std[..., 0, :], dist.scale_logits[..., 0, :]
  else:
    comp = _inverse_cdf(dist.mix_logits, noise.uniform[..., 1])
    mean = _take_component(dist.loc_mean, comp)
    log_std = _take_component(dist.loc_log_std, comp)
    logits = _take_component(dist.scale_logits, comp)
  loc = mean + jnp.exp(log_std) * noise.normal
  scale = _inverse_cdf(logits, noise.uniform[..., 0])
  return jax.lax.stop_gradient(Action(loc=loc.astype(jnp.float32), scale=scale))


def sample(key: jax.Array, dist: ActionDist) -> Action:
  """Draws one action per leading index: ``Action(loc [..., 2], scale [...])``, stop-gradient'ed.

  For K > 1 a component is drawn from ``softmax(mix_logits)`` first, then location and scale from it.
  Equal to ``sample_from_noise(dist, draw_noise(key, leading_shape))``.
  """
  shape = jnp.broadcast_shapes(dist.mix_logits.shape[:-1], dist.loc_mean.shape[:-2], dist.scale_logits.shape[:-2])
  return sample_from_noise(dist, draw_noise(key, shape))


def _component_log_prob(dist: ActionDist, action: Action) -> jax.Array:
  """``[..., K]``: log density of each component at ``action`` (location density times scale mass)."""
  loc = jnp.asarray(action.loc, jnp.float32)[..., None, :]  # [..., 1, 2]
  z = (loc - dist.loc_mean) * jnp.exp(-dist.loc_log_std)
  loc_lp = jnp.sum(-0.5 * jnp.square(z) - dist.loc_log_std - 0.5 * _LOG_2PI, axis=-1)  # [..., K]
  scale_lp = jax.nn.log_softmax(dist.scale_logits, axis=-1)  # [..., K, S]
  onehot = jax.nn.one_hot(action.scale, scale_lp.shape[-1], dtype=scale_lp.dtype)[..., None, :]  # [..., 1, S]
  scale_lp = jnp.sum(onehot * scale_lp, axis=-1)  # [..., K]; broadcasts action and dist leading shapes
  return loc_lp + scale_lp


def log_prob(dist: ActionDist, action: Action) -> jax.Array:
  """``[...]``: log density of ``action`` (the raw, unclipped location) under the mixture.

  The location part is a density on R^2 (not on the clipped square), the scale part a probability; for K > 1
  ``logsumexp_k(log_softmax(mix_logits)_k + log component_k)``.
  """
  comp = _component_log_prob(dist, action)
  if num_components(dist) == 1:
    return comp[..., 0]
  return jax.nn.logsumexp(jax.nn.log_softmax(dist.mix_logits, axis=-1) + comp, axis=-1)


def sample_and_log_prob(key: jax.Array, dist: ActionDist) -> tuple[Action, jax.Array]:
  """`sample` and the `log_prob` of the sample (differentiable w.r.t. ``dist``)."""
  action = sample(key, dist)
  return action, log_prob(dist, action)


def entropy(dist: ActionDist) -> jax.Array:
  """``[...]``: the exact entropy (nats) of a single-component distribution.

  ``H = sum_d (1/2 log(2 pi e) + log_std_d) + H[softmax(scale_logits)]`` (location and scale are independent).
  A mixture's entropy has no closed form: for K > 1 this raises ValueError (use a Monte Carlo estimate,
  ``-log_prob`` of samples, instead).
  """
  if num_components(dist) != 1:
    raise ValueError(f"entropy is exact only for one component; this distribution has K={num_components(dist)}.")
  loc_h = jnp.sum(0.5 * (_LOG_2PI + 1.0) + dist.loc_log_std[..., 0, :], axis=-1)
  logp = jax.nn.log_softmax(dist.scale_logits[..., 0, :], axis=-1)
  scale_h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return loc_h + scale_h


def temper(dist: ActionDist, temperature) -> ActionDist:
  """Raises the temperature of every component: location std times ``sqrt(T)``, scale logits divided by T.

  For a Gaussian this is exactly ``p(loc)^(1/T)`` renormalised; for the Categorical likewise. The mixture weights
  are left unchanged (a defensive mixture keeps its alpha). ``T > 1`` explores more, ``T = 1`` is the identity,
  ``T -> 0`` approaches `mode` per component. ``temperature`` may be a traced scalar or broadcast to ``[...]``.
  """
  t = jnp.asarray(temperature, jnp.float32)
  return dist._replace(
      loc_log_std=dist.loc_log_std + 0.5 * jnp.log(t)[..., None, None],
      scale_logits=dist.scale_logits / t[..., None, None],
  )


def mode(dist: ActionDist) -> Action:
  """The greedy action: the most probable component's mean location and argmax scale (stop-gradient'ed)."""
  comp = jnp.argmax(dist.mix_logits, axis=-1)
  loc = _take_component(dist.loc_mean, comp)
  scale = jnp.argmax(_take_component(dist.scale_logits, comp), axis=-1).astype(jnp.int32)
  return jax.lax.stop_gradient(Action(loc=loc, scale=scale))


def scale_probs(dist: ActionDist) -> jax.Array:
  """``[..., S]``: the marginal scale probabilities ``sum_k pi_k softmax(scale_logits[k])``."""
  pi = jax.nn.softmax(dist.mix_logits, axis=-1)
  return jnp.sum(pi[..., None] * jax.nn.softmax(dist.scale_logits, axis=-1), axis=-2)


def mean_location(dist: ActionDist) -> jax.Array:
  """``[..., 2]``: the mixture's mean location ``sum_k pi_k loc_mean[k]``."""
  pi = jax.nn.softmax(dist.mix_logits, axis=-1)
  return jnp.sum(pi[..., None] * dist.loc_mean, axis=-2)
