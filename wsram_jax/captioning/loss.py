"""The captioner's loss: its rollout (`captioning.rollout`) feeds the same estimators as the classifier's.

    loss_fn(params, batch, key, baseline_value, hyper) -> (loss, metrics)
    batch = (images [B, H, W, C] float32, captions [B, T + 1] int32)

The method part is `wsram_jax.objectives.method_loss` on the rollout's per-sample ``log_p_a``, ``log_p_y``,
``log_q_a`` `[B, M]` (no second copy of the math): ``wsram`` -> `estimators.wsram_losses` (Eqns 8, 14; 16-19
with control variates), ``var`` -> `estimators.variational_loss` (Eqn 5) with a baseline from
`wsram_jax.baselines` (none, moving average, learned b(I), leave-one-out), ``vimco``. The proposal is built by
`wsram_jax.objectives.make_proposal` (prior, inference network, defensive mixture; tempered by heuristic (1)),
and heuristics (2) and (3) are added by `wsram_jax.objectives.with_heuristics`, as for the classifier. The
sleep-phase q update is the classifier's only.

Metrics (means over the batch): ``nll`` = -log p(y|a) per caption (Figure 4's training NLL, for the sampled
glimpses), ``nll_per_word``, ``bound`` (Eqn 9, the multi-sample bound on log p(y|I)), ``ess``, the prior's
entropy, and the usage of each pyramid level over the unmasked steps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wsram_jax import attention
from wsram_jax import objectives as objectives_lib
from wsram_jax.captioning import model as model_lib
from wsram_jax.captioning import rollout as rollout_lib

__all__ = ["batched_rollout", "caption_metrics", "make_loss_fn"]


def batched_rollout(params, images, captions, key, *, model, proposal, num_samples, q_word="target",
                    greedy=False) -> rollout_lib.CaptionTrajectory:
  """`captioning.rollout.rollout` vmapped over the batch (every field gets a leading B)."""
  roll = functools.partial(rollout_lib.rollout, model=model, proposal=proposal, num_samples=num_samples,
                           q_word=q_word, greedy=greedy)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(roll, in_axes=(None, 0, 0, 0))(params, images, captions, keys)


def caption_metrics(traj: rollout_lib.CaptionTrajectory, num_scales: int) -> dict[str, jax.Array]:
  """Diagnostics of a batch of trajectories (fields ``[B, M, ...]``): `objectives.trajectory_metrics` over the
  unmasked steps, ``nll`` and ``nll_per_word``."""
  sg = jax.lax.stop_gradient
  words = jnp.sum(traj.mask, axis=-1)  # [B]
  metrics = {
      "nll": -jnp.mean(sg(traj.log_p_y)),
      "nll_per_word": -jnp.mean(jnp.mean(sg(traj.log_p_y), axis=-1) / jnp.maximum(words, 1.0)),
  }
  metrics.update(objectives_lib.trajectory_metrics(traj, num_scales, mask=traj.mask))
  return metrics


def make_loss_fn(cfg: objectives_lib.ObjectiveConfig, model: model_lib.CaptionModel, *, q_word: str = "target"):
  """The loss of ``cfg.method`` for the captioner; pure (jit it with ``model`` closed over). ``hyper`` as for
  `wsram_jax.classifier.loss.make_loss_fn`."""
  if cfg.sleep_weight > 0:
    raise ValueError("The sleep-phase q update is not implemented for the captioner; set sleep_weight=0.")

  def loss_fn(params, batch, key, baseline_value=0.0, hyper=None):
    hyper = hyper or {}
    net = attention.model_for_run(model, hyper)
    images, captions = batch
    traj = batched_rollout(params, images, captions, key, model=net, proposal=objectives_lib.make_proposal(cfg, hyper),
                           num_samples=cfg.num_samples, q_word=q_word)
    metrics = caption_metrics(traj, net.num_scales)
    loss, parts = objectives_lib.method_loss(cfg, traj.log_p_a, traj.log_p_y, traj.log_q_a,
                                             baseline_value=baseline_value, learned_baseline=traj.baseline,
                                             log_inference_a=traj.log_inference_a, hyper=hyper)
    metrics.update(parts)
    return objectives_lib.with_heuristics(cfg, loss, traj, metrics, hyper)

  return loss_fn
