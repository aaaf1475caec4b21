"""The classifier's loss: its rollout (`classifier.rollout`) feeds the objective layer (`wsram_jax.objectives`).

    loss_fn = make_loss_fn(cfg, model, num_glimpses=N)
    loss_fn(params, batch, key, baseline_value, hyper) -> (loss, metrics)
    batch = (canvases [B, H, W, C] float32, labels [B] int32)

The loss is `objectives.method_loss` on the rollout's per-sample ``log_p_a``, ``log_p_y``, ``log_q_a`` ``[B, M]``
(Eqns 5, 8, 14, 16-19, VIMCO), plus, for WS-RAM with ``cfg.sleep_weight > 0``, the sleep-phase q loss
(`sleep_loss`), plus the exploration heuristics (`objectives.with_heuristics`).

Metrics (means over the batch): those of `objectives.trajectory_metrics` (ESS, Eqn 9 bound, entropy, scale
usage), ``log_p_y`` and ``error``, the error of the sampled trajectories' predictions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import attention
from wsram_jax import estimators
from wsram_jax import objectives
from wsram_jax import proposals as proposals_lib
from wsram_jax.classifier import model as model_lib
from wsram_jax.classifier import rollout as rollout_lib

__all__ = ["batched_rollout", "make_loss_fn", "sleep_loss"]


def batched_rollout(params, canvases, labels, key, *, model, proposal, num_glimpses, num_samples, greedy=False,
                    actions=None, patch_mask=None) -> rollout_lib.ClassifierTrajectory:
  """`rollout.rollout` vmapped over the batch: every field gets a leading axis B (``actions``, if given,
  ``[B, M, N, ...]``; ``patch_mask`` ``[N]`` is the same for every canvas)."""
  roll = functools.partial(rollout_lib.rollout, model=model, proposal=proposal, num_glimpses=num_glimpses,
                           num_samples=num_samples, greedy=greedy, patch_mask=patch_mask)
  keys = jax.random.split(key, canvases.shape[0])
  return jax.vmap(lambda c, y, k, a: roll(params, c, y, k, actions=a))(canvases, labels, keys, actions)


def make_loss_fn(cfg: objectives.ObjectiveConfig, model: model_lib.AttentionModel, *, num_glimpses: int):
  """The loss of `cfg.method` for `model` with N = `num_glimpses`; see the module docstring. Pure; jit it.

  ``loss_fn(params, batch, key, baseline_value, hyper)``: ``hyper`` (``{name: scalar}``; optional, ``{}`` for a
  single run) holds a run's own values of the numbers a sweep may vary (`training.runs`): ``loc_std`` (the
  model's, `attention.model_for_run`) and `objectives.HYPER`; they take the place of the model's and of `cfg`'s.
  """

  def loss_fn(params, batch, key, baseline_value=0.0, hyper=None):
    hyper = hyper or {}
    net = attention.model_for_run(model, hyper)
    canvases, labels = batch
    k_roll, k_sleep = jax.random.split(key)
    traj = batched_rollout(params, canvases, labels, k_roll, model=net, proposal=objectives.make_proposal(cfg, hyper),
                           num_glimpses=num_glimpses, num_samples=cfg.num_samples)
    metrics = objectives.trajectory_metrics(traj, net.num_scales, per_glimpse=True)
    metrics["log_p_y"] = jnp.mean(jax.lax.stop_gradient(traj.log_p_y))
    predictions = jnp.argmax(traj.logits, axis=-1)
    metrics["error"] = jnp.mean((predictions != labels[:, None]).astype(jnp.float32))

    loss, estimator_metrics = objectives.method_loss(cfg, traj.log_p_a, traj.log_p_y, traj.log_q_a,
                                                     baseline_value=baseline_value,
                                                     learned_baseline=traj.baseline,
                                                     log_inference_a=traj.log_inference_a, hyper=hyper)
    metrics.update(estimator_metrics)
    if cfg.sleep_weight > 0:
      sleep = sleep_loss(params, canvases, k_sleep, model=net, num_glimpses=num_glimpses,
                         num_samples=cfg.num_samples)
      loss = loss + cfg.sleep_weight * sleep
      metrics["loss_sleep"] = sleep

    return objectives.with_heuristics(cfg, loss, traj, metrics, hyper)

  return loss_fn


def sleep_loss(params, canvases, key, *, model, num_glimpses, num_samples) -> jax.Array:
  """The sleep-phase q loss (`estimators.sleep_q_loss`): (a, y) ~ p(a|I) p(y|a,I), then -log q(a|y,I).

  The M trajectories come from the prior; each gets its own label y^m drawn from its class distribution; q
  scores the same actions with y^m as its label input (a teacher-forced rollout, one per m).
  """
  sg = jax.lax.stop_gradient
  k_prior, k_label = jax.random.split(key)
  placeholder = jnp.zeros((canvases.shape[0],), jnp.int32)  # The prior does not read the label.
  traj = batched_rollout(params, canvases, placeholder, k_prior, model=model, proposal=proposals_lib.prior,
                         num_glimpses=num_glimpses, num_samples=num_samples)
  sampled_y = jax.random.categorical(k_label, sg(traj.logits))  # [B, M]

  def score_one(canvas, y, loc, scale):  # one image, one sample m
    given = actions_lib.Action(loc=loc[None], scale=scale[None])
    t = rollout_lib.rollout(params, canvas, y, jax.random.PRNGKey(0), model=model,
                            proposal=proposals_lib.inference_network, num_glimpses=num_glimpses,
                            num_samples=1, actions=given)
    return t.log_inference_a[0]

  per_sample = jax.vmap(score_one, in_axes=(None, 0, 0, 0))
  log_q = jax.vmap(per_sample)(canvases, sampled_y, sg(traj.actions.loc), sg(traj.actions.scale))
  return estimators.sleep_q_loss(log_q)
