"""Loss functions per training method: the rollout (`rollout.py`) feeds the estimators (`estimators.py`).

    loss_fn(params, batch, key, baseline_value) -> (loss, metrics)
    batch = (canvases [B, H, W, C] float32, labels [B] int32)

Methods (`ObjectiveConfig.method`):

* ``wsram``: reweighted wake-sleep (Sec. 4.2-4.4). M trajectories per image from the proposal (the prior, the
  inference network, or any `proposals.Proposal`); ``loss_p`` (Eqn 8, or Eqn 16 with control variates) trains
  the prediction network theta and ``loss_q`` (Eqn 14, or Eqn 17) the inference network eta. The rollout hands
  the proposal a stop-gradient'ed prior, so ``loss_q`` cannot reach theta whatever the proposal; with the prior
  as proposal there is no eta to train and ``loss_q`` is left out. With ``sleep_weight > 0`` the sleep-phase q
  update (Bornschein & Bengio) is added: (a, y) drawn from the model, q scored on them by teacher forcing.
* ``var``: the variational method of [2] (Sec. 4.1): M trajectories from the prior, the Eqn 5 surrogate with
  a baseline: none, ``moving`` (a moving average of log p(y|a), passed in as ``baseline_value``), ``learned``
  (the baseline head b(I), regressed on log p(y|a)), or ``loo`` (leave-one-out over the M samples).
* ``vimco``: the multi-sample bound of Eqn 9 with VIMCO's leave-one-out learning signals (Mnih & Rezende 2016),
  samples from the prior.

Exploration heuristics of Sec. 4.5, for every method: (1) ``temperature`` tempers the proposal the samples are
drawn from; (2) ``coverage_weight`` times `exploration.coverage_regularizer`; (3) ``entropy_weight`` times
`exploration.entropy_bonus`.

The metrics (means over the batch) are the ones the paper plots: ESS of the importance weights (Eqn 7; at most
M), the Eqn 9 bound, the error of the sampled trajectories' predictions, action entropies, and how often each
scale is used.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import baselines
from wsram_jax import estimators
from wsram_jax import exploration
from wsram_jax import networks
from wsram_jax import proposals as proposals_lib
from wsram_jax import rollout as rollout_lib

METHODS = ("wsram", "var", "vimco")
PROPOSALS = ("prior", "inference_network", "defensive_mixture")
BASELINES = ("none", "moving", "learned", "loo")

LossFn = Callable[[Any, tuple[jax.Array, jax.Array], jax.Array, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The static choices that define a loss. See the module docstring."""
  method: str = "wsram"
  proposal: str = "inference_network"
  control_variates: bool = True
  baseline: str = "none"
  num_samples: int = 5
  num_glimpses: int = 4
  temperature: float = 1.0
  coverage_weight: float = 0.0
  entropy_weight: float = 0.0
  baseline_weight: float = 1.0
  mixture_alpha: float = 0.5
  sleep_weight: float = 0.0

  @classmethod
  def from_config(cls, config) -> "ObjectiveConfig":
    """From an experiment ConfigDict (`experiments/configs/mnist.py`)."""
    h = config.heuristics
    return cls(method=config.method, proposal=config.proposal, control_variates=bool(config.control_variates),
               baseline=config.baseline, num_samples=int(config.num_samples),
               num_glimpses=int(config.num_glimpses), temperature=float(h.temperature),
               coverage_weight=float(h.coverage_weight), entropy_weight=float(h.entropy_weight),
               baseline_weight=float(config.baseline_weight), mixture_alpha=float(config.mixture_alpha),
               sleep_weight=float(config.get("sleep_weight", 0.0)))

  @property
  def uses_inference_network(self) -> bool:
    return self.method == "wsram" and (self.proposal != "prior" or self.sleep_weight > 0)


def make_proposal(cfg: ObjectiveConfig) -> proposals_lib.Proposal:
  """The proposal the samples are drawn from: the named one, tempered by heuristic (1) when T != 1."""
  if cfg.proposal == "prior":
    proposal = proposals_lib.prior
  elif cfg.proposal == "inference_network":
    proposal = proposals_lib.inference_network
  elif cfg.proposal == "defensive_mixture":
    proposal = proposals_lib.defensive_mixture(alpha=cfg.mixture_alpha)
  else:
    raise ValueError(f"Unknown proposal {cfg.proposal!r}; choose one of {PROPOSALS}.")
  if cfg.temperature != 1.0:
    proposal = proposals_lib.tempered(proposal, cfg.temperature)
  return proposal


def batched_rollout(params, canvases, labels, key, *, model, proposal, num_glimpses, num_samples,
                    greedy=False) -> rollout_lib.Trajectory:
  """`rollout.rollout` vmapped over the batch: every field gets a leading axis B."""
  roll = functools.partial(rollout_lib.rollout, model=model, proposal=proposal, num_glimpses=num_glimpses,
                           num_samples=num_samples, greedy=greedy)
  keys = jax.random.split(key, canvases.shape[0])
  return jax.vmap(roll, in_axes=(None, 0, 0, 0))(params, canvases, labels, keys)


def trajectory_metrics(traj: rollout_lib.Trajectory, labels: jax.Array, num_scales: int) -> dict[str, jax.Array]:
  """Diagnostics of a batch of trajectories (fields [B, M, ...]): ESS, bound, error, entropy, scale usage."""
  sg = jax.lax.stop_gradient
  log_w = estimators.log_importance_weights(sg(traj.log_p_a), sg(traj.log_p_y), sg(traj.log_q_a))
  predictions = jnp.argmax(traj.logits, axis=-1)
  metrics = {
      "ess": jnp.mean(estimators.effective_sample_size(log_w)),
      "bound": jnp.mean(estimators.log_marginal_bound(log_w)),
      "log_p_y": jnp.mean(sg(traj.log_p_y)),
      "error": jnp.mean((predictions != labels[:, None]).astype(jnp.float32)),
      "entropy": jnp.mean(sg(traj.entropy)),
  }
  usage = jnp.mean(jax.nn.one_hot(traj.scales, num_scales), axis=(0, 1, 2))
  for s in range(num_scales):
    metrics[f"scale_usage_{s}"] = usage[s]
  return metrics


def method_loss(cfg: ObjectiveConfig, log_p_a: jax.Array, log_p_y: jax.Array, log_q_a: jax.Array, *,
                baseline_value=0.0, learned_baseline=None) -> tuple[jax.Array, dict]:
  """The estimator part of `cfg.method`'s loss, from per-sample log-probabilities `[B, M]` of any model.

  Shared by every model trained with these estimators (the classifier here, the captioner in
  `wsram_jax.captioning`): ``wsram`` -> `estimators.wsram_losses` (``loss_q`` added unless the proposal is the
  prior), ``vimco`` -> `estimators.vimco_loss`, ``var`` -> `estimators.variational_loss` with the baseline
  `cfg.baseline` (``moving``: ``baseline_value``; ``learned``: ``learned_baseline`` `[B, M]`, also regressed
  with weight `cfg.baseline_weight`; ``loo``: leave-one-out). The sleep update and the exploration
  heuristics need the rollout and stay with the caller.

  Returns:
    `(loss, metrics)`: the scalar loss and its parts (``loss_p``, ``loss_q``, ``baseline_mse``).
  """
  metrics = {}
  if cfg.method == "wsram":
    loss_p, loss_q = estimators.wsram_losses(log_p_a, log_p_y, log_q_a, control_variates=cfg.control_variates)
    loss = loss_p
    metrics["loss_p"] = loss_p
    if cfg.proposal != "prior":
      loss = loss + loss_q
      metrics["loss_q"] = loss_q
  elif cfg.method == "vimco":
    loss = estimators.vimco_loss(log_p_a, log_p_y)
  elif cfg.method == "var":
    if cfg.baseline == "none":
      baseline = 0.0
    elif cfg.baseline == "moving":
      baseline = baseline_value
    elif cfg.baseline == "learned":
      if learned_baseline is None:
        raise ValueError("baseline='learned' needs the model's learned_baseline [B, M].")
      baseline = learned_baseline
    elif cfg.baseline == "loo":
      baseline = estimators.leave_one_out_baseline(log_p_y)
    else:
      raise ValueError(f"Unknown baseline {cfg.baseline!r}; choose one of {BASELINES}.")
    loss = estimators.variational_loss(log_p_a, log_p_y, baseline)
    if cfg.baseline != "none":
      metrics["baseline_mse"] = jnp.mean((jax.lax.stop_gradient(baseline) - log_p_y) ** 2)
    if cfg.baseline == "learned":
      loss = loss + cfg.baseline_weight * baselines.baseline_loss(learned_baseline, log_p_y)
  else:
    raise ValueError(f"Unknown method {cfg.method!r}; choose one of {METHODS}.")
  return loss, metrics


def make_loss_fn(cfg: ObjectiveConfig, model: networks.AttentionModel) -> LossFn:
  """The loss of `cfg.method` for `model`; see the module docstring. Pure; jit it (with `model` closed over)."""
  if cfg.method not in METHODS:
    raise ValueError(f"Unknown method {cfg.method!r}; choose one of {METHODS}.")
  if cfg.baseline not in BASELINES:
    raise ValueError(f"Unknown baseline {cfg.baseline!r}; choose one of {BASELINES}.")
  proposal = make_proposal(cfg)
  roll = functools.partial(batched_rollout, model=model, proposal=proposal, num_glimpses=cfg.num_glimpses,
                           num_samples=cfg.num_samples)

  def loss_fn(params, batch, key, baseline_value=0.0):
    canvases, labels = batch
    k_roll, k_sleep = jax.random.split(key)
    traj = roll(params, canvases, labels, k_roll)
    metrics = trajectory_metrics(traj, labels, model.num_scales)

    loss, estimator_metrics = method_loss(cfg, traj.log_p_a, traj.log_p_y, traj.log_q_a,
                                          baseline_value=baseline_value, learned_baseline=traj.baseline)
    metrics.update(estimator_metrics)
    if cfg.method == "wsram" and cfg.sleep_weight > 0:
      sleep = sleep_loss(params, canvases, k_sleep, model=model, num_glimpses=cfg.num_glimpses,
                         num_samples=cfg.num_samples)
      loss = loss + cfg.sleep_weight * sleep
      metrics["loss_sleep"] = sleep

    return with_heuristics(cfg, loss, traj, metrics)

  return loss_fn


def with_heuristics(cfg: ObjectiveConfig, loss: jax.Array, traj, metrics: dict[str, jax.Array]
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`loss` plus the exploration terms of Sec. 4.5 that `cfg` turns on (coverage, entropy bonus), and the
  metrics every task's loss reports with it: ``loss`` and ``reward`` (the batch's mean log p(y|a), which the
  moving-average baseline tracks). `traj` needs ``prior_scale_probs``, ``prior_loc_mean``, ``entropy`` and
  ``log_p_y`` (a `rollout.Trajectory` or the captioner's)."""
  if cfg.coverage_weight > 0:
    loss = loss + cfg.coverage_weight * exploration.coverage_regularizer(traj.prior_scale_probs,
                                                                         traj.prior_loc_mean)
  if cfg.entropy_weight > 0:
    loss = loss + exploration.entropy_bonus(traj.entropy, weight=cfg.entropy_weight)
  metrics["loss"] = loss
  metrics["reward"] = jnp.mean(jax.lax.stop_gradient(traj.log_p_y))
  return loss, metrics


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
