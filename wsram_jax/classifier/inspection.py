r"""Estimators compared at fixed parameters: independent gradient estimates of several estimators, from shared samples.

Every estimator of `wsram_jax.estimators` is a surrogate loss ``L(log_p_a, log_p_y, log_q_a)`` of the per-sample
log-probabilities ``[B, M]`` (Eqns 5, 8, 14, 16-19, VIMCO), and the rollout (`classifier.rollout`) makes those
from the parameters with the sampled actions held fixed. By the chain rule the estimator's gradient is

    dL/dparams = sum_{b,m} [ dL/dlog_p_a[b,m] dlog p(a^bm | I_b)/dparams + dL/dlog_p_y[b,m] dlog p(y_b | a^bm, I_b)/dparams
                            + dL/dlog_q_a[b,m] dlog q(a^bm | y_b, I_b)/dparams ],

the vector-Jacobian product of the rollout's three log-probabilities with the cotangents ``jax.grad(L)`` at their
values (`surrogate_gradients`): the same number as ``jax.grad`` of ``L`` composed with the rollout (a test checks
it). The cotangents are cheap (pure math on ``[B, M]`` arrays) while the VJP is the whole network's backward
pass; so `gradient_estimates` compiles the VJP once per M, and every estimator at that M runs the same compiled
program on the first M samples of each group: the estimators compared on one group see the same samples, as in
``notebooks/estimator_math.ipynb``.

Shapes: B canvases, K independent groups of samples (estimates), M samples per estimate (M_max drawn), N
glimpses. `group_samples` turns one rollout of ``K * M_max`` samples per canvas (fields ``[B, K M_max, ...]``)
into K groups (``[K, B, M_max, ...]``); `diagnostics.gradient_summary` summarises the K estimates (the variance
of Figure 2, middle).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from wsram_jax import proposals as proposals_lib
from wsram_jax.actions import Action
from wsram_jax.classifier import loss as loss_lib
from wsram_jax.classifier import model as model_lib
from wsram_jax.classifier import rollout as rollout_lib

__all__ = ["EstimatorLoss", "group_samples", "surrogate_gradients", "gradient_estimates"]

# An estimator as a surrogate loss of [B, M] log-probabilities (log_p_a, log_p_y, log_q_a) -> scalar, e.g.
# lambda p_a, p_y, q_a: estimators.wsram_losses(p_a, p_y, q_a, control_variates=True)[0].
EstimatorLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def group_samples(traj: rollout_lib.ClassifierTrajectory, num_groups: int) -> rollout_lib.ClassifierTrajectory:
  """Fields ``[B, K M, ...]`` (a batched rollout of ``K M`` samples per canvas) -> ``[K, B, M, ...]``: K groups
  of M independent samples of every canvas (group k holds samples ``k M .. (k + 1) M - 1``)."""
  total = traj.log_p_a.shape[1]
  if num_groups < 1 or total % num_groups:
    raise ValueError(f"group_samples cannot split {total} samples per canvas into {num_groups} equal groups.")

  def split(x):
    x = x.reshape(x.shape[:1] + (num_groups, total // num_groups) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  return jax.tree_util.tree_map(split, traj)


def surrogate_gradients(params, canvases: jax.Array, labels: jax.Array, actions: Action,
                        cotangents: tuple[jax.Array, jax.Array, jax.Array], *, model: model_lib.AttentionModel,
                        proposal: proposals_lib.Proposal, num_glimpses: int):
  """``sum_{b,m}`` of the cotangents times the gradients of ``(log p(a), log p(y|a), log q(a))`` of the given
  actions (module docstring): the gradient of a surrogate loss whose derivatives with respect to the
  log-probabilities are `cotangents`.

  Args:
    params: the model's ``'params'``.
    canvases: ``[B, H, W, C]`` float.
    labels: ``[B]`` int.
    actions: ``Action(loc [B, M, N, 2], scale [B, M, N])``, scored, not sampled (`rollout`'s ``actions``).
    cotangents: ``(d/d log_p_a, d/d log_p_y, d/d log_q_a)``, each ``[B, M]``.
    model: the `AttentionModel` (static).
    proposal: the density ``log_q_a`` is scored under (static): the proposal the actions came from. With a zero
      ``d/d log_q_a`` (the prior as proposal) it changes nothing.
    num_glimpses: N (static).

  Returns:
    A pytree with the structure of `params`.
  """
  num_samples = actions.scale.shape[1]

  def log_probs(p):
    traj = loss_lib.batched_rollout(p, canvases, labels, jax.random.PRNGKey(0), model=model, proposal=proposal,
                                    num_glimpses=num_glimpses, num_samples=num_samples, actions=actions)
    return traj.log_p_a, traj.log_p_y, traj.log_q_a

  _, vjp = jax.vjp(log_probs, params)
  return vjp(tuple(cotangents))[0]


@functools.lru_cache(maxsize=16)
def _batched_surrogate_gradients(model, proposal, num_glimpses):
  """`surrogate_gradients` over a leading axis K of actions and cotangents, jitted (one compilation per shape)."""
  one = functools.partial(surrogate_gradients, model=model, proposal=proposal, num_glimpses=num_glimpses)
  return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))


def gradient_estimates(loss_fn: EstimatorLoss, params, canvases: jax.Array, labels: jax.Array,
                       groups: rollout_lib.ClassifierTrajectory, *, num_samples: int,
                       model: model_lib.AttentionModel, proposal: proposals_lib.Proposal, num_glimpses: int):
  """K independent estimates of the gradient of the estimator `loss_fn`, each from the first `num_samples` of a
  group of samples of the canvases.

  Args:
    loss_fn: the estimator's surrogate loss (`EstimatorLoss`) of ``[B, M]`` arrays. With the prior as proposal
      it should use ``log_p_a`` where it needs the proposal's density (e.g. ``wsram_losses(p_a, p_y,
      stop_gradient(p_a), ...)``, ``vimco_loss(p_a, p_y)``).
    params: the parameters, held fixed.
    canvases: ``[B, H, W, C]`` float.
    labels: ``[B]`` int.
    groups: the samples, fields ``[K, B, M_max, ...]`` (`group_samples`), drawn from `proposal`.
    num_samples: M, ``1 <= M <= M_max``.
    model: the `AttentionModel`.
    proposal: the proposal the samples were drawn from.
    num_glimpses: N.

  Returns:
    A pytree with the structure of `params` and a leading axis K (`diagnostics.gradient_summary` takes it).
  """
  m_max = groups.log_p_a.shape[-1]
  if not 1 <= num_samples <= m_max:
    raise ValueError(f"gradient_estimates: num_samples must be in 1..{m_max} (the samples drawn), got "
                     f"{num_samples}.")
  first = lambda x: x[:, :, :num_samples]
  cotangents = _cotangents(loss_fn)(*(first(x) for x in (groups.log_p_a, groups.log_p_y, groups.log_q_a)))
  actions = jax.tree_util.tree_map(first, jax.lax.stop_gradient(groups.actions))
  return _batched_surrogate_gradients(model, proposal, num_glimpses)(params, canvases, labels, actions, cotangents)


@functools.lru_cache(maxsize=64)
def _cotangents(loss_fn: EstimatorLoss):
  """``(log_p_a, log_p_y, log_q_a) [K, B, M] -> d loss_fn / d each``, jitted (one compilation per estimator and
  M)."""
  return jax.jit(jax.vmap(jax.grad(loss_fn, argnums=(0, 1, 2))))
