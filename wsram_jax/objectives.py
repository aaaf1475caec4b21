"""The objective layer: a training method's loss from per-sample log-probabilities, for any attention model.

A task's loss is its rollout (which returns an `attention.Trajectory`, fields ``[B, M, ...]``) followed by the
functions here; nothing here imports a model:

    cfg = ObjectiveConfig(method=..., proposal=..., ...)     the static choices, checked on construction
    proposal = make_proposal(cfg)                              what the rollout samples from
    loss, parts = method_loss(cfg, log_p_a, log_p_y, log_q_a)  the estimator of `cfg.method` on [B, M] arrays
    loss, metrics = with_heuristics(cfg, loss, traj, metrics)  the exploration terms of Sec. 4.5
    metrics = trajectory_metrics(traj, num_scales)             ESS, Eqn 9 bound, entropy, scale usage

Methods (`ObjectiveConfig.method`):

* ``wsram``: reweighted wake-sleep (Sec. 4.2-4.4). M trajectories per image from the proposal (the prior, the
  inference network, or any `proposals.Proposal`); ``loss_p`` (Eqn 8, or Eqn 16 with control variates) trains
  the prediction network theta and ``loss_q`` (Eqn 14, or Eqn 17) the inference network eta. The rollout hands
  the proposal a stop-gradient'ed prior, so ``loss_q`` cannot reach theta whatever the proposal; with the prior
  as proposal there is no eta to train and ``loss_q`` is left out. ``sleep_weight > 0`` adds the sleep-phase q
  update (Bornschein & Bengio), which needs the model and is added by the task's loss.
* ``var``: the variational method of [2] (Sec. 4.1): M trajectories from the prior, the Eqn 5 surrogate with
  a baseline: none, ``moving`` (a moving average of log p(y|a), `baseline_transform`), ``learned`` (the
  model's baseline head b(I), regressed on log p(y|a)), ``nvil`` (b(I) plus a moving average c of the residual
  log p(y|a) - b(I), NVIL's centring [11]: b(I) regresses log p(y|a) - c), or ``loo`` (leave-one-out over the M
  samples).
* ``vimco``: the multi-sample bound of Eqn 9 with VIMCO's leave-one-out learning signals (Mnih & Rezende 2016),
  samples from the prior.

Exploration heuristics of Sec. 4.5, for every method: (1) ``temperature`` tempers the proposal the samples are
drawn from; (2) ``coverage_weight`` times `exploration.coverage_regularizer`; (3) ``entropy_weight`` times
`exploration.entropy_bonus`.

Proposals are named: ``prior``, ``inference_network``, ``defensive_mixture`` (weight ``mixture_alpha`` on q), or
``module.path:function`` for a `proposals.Proposal` written anywhere importable (no library change needed).
Such a proposal is called as the built-ins are, and checked each time it is traced (`checked_user_proposal`):
one that raises, or returns anything but an `actions.ActionDist` shaped like the prior's, is one sentence naming
it (`errors.ConfigError`), raised when the train step is first traced, before training.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import attention
from wsram_jax import baselines
from wsram_jax import estimators
from wsram_jax import exploration
from wsram_jax import proposals as proposals_lib
from wsram_jax.errors import ConfigError, UserError

METHODS = ("wsram", "var", "vimco")
PROPOSALS = ("prior", "inference_network", "defensive_mixture")
BASELINES = ("none", "moving", "learned", "nvil", "loo")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def resolve_proposal(name: str, *, mixture_alpha: float = 0.5) -> proposals_lib.Proposal:
  """The untempered proposal called `name`: a built-in (`PROPOSALS`) or ``module.path:function``, imported.

  Raises `errors.ConfigError` (one sentence) for an unknown name, a module that cannot be imported, a missing
  attribute, or one that is not callable.
  """
  if name == "prior":
    return proposals_lib.prior
  if name == "inference_network":
    return proposals_lib.inference_network
  if name == "defensive_mixture":
    return proposals_lib.defensive_mixture(alpha=mixture_alpha)
  if not isinstance(name, str) or name.count(":") != 1:
    raise ConfigError(f"Unknown --config.proposal {name!r}; choose one of {', '.join(PROPOSALS)}, or name a "
                      "function of your own as module.path:function.")
  module_name, attr = name.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except  (any failure to import is the user's to fix)
    raise ConfigError(f"--config.proposal={name}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
                      "is its directory on PYTHONPATH?") from None
  fn = getattr(module, attr, None)
  _require(fn is not None, f"--config.proposal={name}: module {module_name!r} has no attribute {attr!r}.")
  _require(callable(fn), f"--config.proposal={name}: {attr!r} is a {type(fn).__name__}, not a function of a "
                         "proposals.ProposalContext.")
  return checked_user_proposal(name, fn)


def is_user_proposal(name: Any) -> bool:
  """Whether the proposal `name` is a user's ``module.path:function`` (not a built-in)."""
  return isinstance(name, str) and name.count(":") == 1


_PROPOSAL_CONTRACT = ("a proposal returns an actions.ActionDist of K >= 1 components shaped like ctx.prior: "
                      "mix_logits [K], loc_mean and loc_log_std [K, 2], scale_logits [K, S], floating point")


def _proposal_output_problem(dist: Any, prior: actions_lib.ActionDist) -> Optional[str]:
  """What is wrong with a proposal's output `dist` for a context whose prior is `prior`, as a phrase; None if
  nothing."""
  if not isinstance(dist, actions_lib.ActionDist):
    return f"returned {'None' if dist is None else 'a ' + type(dist).__name__}, not an actions.ActionDist"
  if not all(hasattr(x, "shape") and hasattr(x, "dtype") for x in dist):
    return "returned an ActionDist whose fields are not arrays"
  lead, num_scales = tuple(prior.mix_logits.shape[:-1]), prior.scale_logits.shape[-1]
  k = dist.mix_logits.shape[-1] if dist.mix_logits.ndim > len(lead) else None
  expected = {"mix_logits": (k,), "loc_mean": (k, 2), "loc_log_std": (k, 2), "scale_logits": (k, num_scales)}
  for field, tail in expected.items():
    x = getattr(dist, field)
    if k is None or k < 1 or tuple(x.shape) != lead + tail:
      shape = "[" + ", ".join(map(str, x.shape)) + "]"
      want = "[" + ", ".join("K" if d is None else str(d) for d in lead + tail) + "]"
      return f"returned an ActionDist whose {field} is {shape}, not {want}"
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return f"returned an ActionDist whose {field} is {x.dtype}, not floating point"
  return None


def checked_user_proposal(name: str, fn: proposals_lib.Proposal) -> proposals_lib.Proposal:
  """`fn` (the user's proposal `name`) with its call and its output checked: an exception it raises, or an output
  that is not an `actions.ActionDist` shaped like the context's prior (`_PROPOSAL_CONTRACT`), becomes one sentence
  (`errors.ConfigError`) naming the proposal. The checks are on shapes and dtypes, so they run once, when the step
  is traced."""

  @functools.wraps(fn)
  def proposal(ctx: proposals_lib.ProposalContext) -> actions_lib.ActionDist:
    try:
      dist = fn(ctx)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (whatever the user's code raises is theirs to fix)
      text = str(e).strip().splitlines()
      raise ConfigError(f"--config.proposal={name} raised {type(e).__name__}"
                        f"{': ' + text[0] if text else ''} when called on a proposals.ProposalContext.") from None
    problem = _proposal_output_problem(dist, ctx.prior)
    if problem:
      raise ConfigError(f"--config.proposal={name} {problem}; {_PROPOSAL_CONTRACT}.")
    return dist

  return proposal


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The static choices that define a loss; checked on construction (`errors.ConfigError`, a `ValueError`).

  Attributes:
    method: ``wsram``, ``var`` or ``vimco``.
    proposal: what the samples are drawn from (see the module docstring); None means the inference network for
      ``wsram`` and the prior for the others, which need the prior.
    control_variates: WS-RAM's Eqns 16-19 (VAR's control variate is ``baseline``).
    p_baseline: the coefficient of WS-RAM's p-side control variate (`estimators.wsram_losses`):
      ``self_normalized`` (Eqn 18, the paper's), ``unbiased`` (p / (M q)) or ``as_printed`` (p / q, Eqn 16).
    baseline: VAR's baseline: ``none``, ``moving``, ``learned``, ``nvil`` or ``loo``.
    baseline_decay: the moving average's decay, in [0, 1).
    baseline_weight: weight of the learned baseline's regression loss.
    num_samples: M.
    temperature: heuristic (1), the proposal's temperature (1 = off).
    coverage_weight: heuristic (2) (0 = off).
    coverage_location_weight: the weight of heuristic (2)'s location term against its scale term (1: the
      paper's "view all image locations"; 0: only the scales are spread).
    entropy_weight: heuristic (3) (0 = off).
    mixture_alpha: weight of q in the ``defensive_mixture`` proposal.
    sleep_weight: weight of the sleep-phase q loss (WS-RAM only; 0 = off).
  """
  method: str = "wsram"
  proposal: Optional[str] = None
  control_variates: bool = True
  p_baseline: str = "self_normalized"
  baseline: str = "none"
  baseline_decay: float = 0.9
  baseline_weight: float = 1.0
  num_samples: int = 5
  temperature: float = 1.0
  coverage_weight: float = 0.0
  coverage_location_weight: float = 1.0
  entropy_weight: float = 0.0
  mixture_alpha: float = 0.5
  sleep_weight: float = 0.0

  def __post_init__(self):
    _require(self.method in METHODS,
             f"Unknown --config.method {self.method!r}; choose one of {', '.join(METHODS)}.")
    if self.proposal is None:
      object.__setattr__(self, "proposal", "inference_network" if self.method == "wsram" else "prior")
    _require(self.p_baseline in estimators.P_BASELINES,
             f"Unknown --config.p_baseline {self.p_baseline!r}; choose one of {', '.join(estimators.P_BASELINES)}.")
    _require(self.baseline in BASELINES,
             f"Unknown --config.baseline {self.baseline!r}; choose one of {', '.join(BASELINES)}.")
    m = self.num_samples
    _require(isinstance(m, int) and not isinstance(m, bool) and m >= 1,
             f"--config.num_samples must be an integer >= 1, got {m!r}.")
    if self.method != "wsram":
      _require(self.proposal == "prior",
               f"--config.method={self.method} samples from the prior; set --config.proposal=prior "
               "(use --config.heuristics.temperature to temper it).")
    if self.method != "var":
      _require(self.baseline == "none",
               f"--config.baseline={self.baseline} is VAR's control variate; with --config.method={self.method} "
               "set it to none (WS-RAM's control variates are --config.control_variates).")
    if self.method == "vimco" or self.baseline == "loo":
      _require(m >= 2, "VIMCO and the leave-one-out baseline need --config.num_samples >= 2.")
    _require(float(self.temperature) > 0,
             f"--config.heuristics.temperature must be positive, got {self.temperature}.")
    if self.method == "vimco":
      _require(float(self.temperature) == 1.0,
               "VIMCO's learning signal assumes samples from the untempered prior; set "
               "--config.heuristics.temperature=1.")
    _require(float(self.coverage_weight) >= 0 and float(self.entropy_weight) >= 0
             and float(self.coverage_location_weight) >= 0,
             "The heuristic weights --config.heuristics.coverage_weight, coverage_location_weight and "
             "entropy_weight must be >= 0.")
    _require(0.0 <= float(self.mixture_alpha) <= 1.0,
             f"--config.mixture_alpha must be in [0, 1], got {self.mixture_alpha}.")
    _require(0.0 <= float(self.baseline_decay) < 1.0,
             f"--config.baseline_decay must be in [0, 1), got {self.baseline_decay}.")
    _require(float(self.baseline_weight) >= 0,
             f"--config.baseline_weight must be >= 0, got {self.baseline_weight}.")
    _require(float(self.sleep_weight) >= 0, f"--config.sleep_weight must be >= 0, got {self.sleep_weight}.")
    if float(self.sleep_weight) > 0:
      _require(self.method == "wsram", "The sleep phase (--config.sleep_weight > 0) trains WS-RAM's inference "
                                       "network; it needs --config.method=wsram.")
    resolve_proposal(self.proposal, mixture_alpha=self.mixture_alpha)  # a bad name or import fails here

  @classmethod
  def from_config(cls, config) -> "ObjectiveConfig":
    """From an experiment ConfigDict (`experiments/configs/mnist.py`): its top-level method keys and its
    ``heuristics`` block. Raises `errors.ConfigError` for an invalid combination."""
    h = config.heuristics
    return cls(method=config.method, proposal=config.proposal, control_variates=bool(config.control_variates),
               p_baseline=config.p_baseline, baseline=config.baseline, baseline_decay=float(config.baseline_decay),
               baseline_weight=float(config.baseline_weight), num_samples=config.num_samples,
               temperature=float(h.temperature), coverage_weight=float(h.coverage_weight),
               coverage_location_weight=float(h.coverage_location_weight), entropy_weight=float(h.entropy_weight),
               mixture_alpha=float(config.mixture_alpha),
               sleep_weight=float(config.sleep_weight))

  @property
  def uses_inference_network(self) -> bool:
    """Whether eta gets a gradient: WS-RAM with a proposal other than the prior, or with the sleep phase."""
    return self.method == "wsram" and (self.proposal != "prior" or self.sleep_weight > 0)


# The objective's numbers that may differ between the runs of one program (`training.runs`): a run's own value
# arrives as ``hyper[name]``, a traced scalar, and takes the place of the config's.
HYPER = ("temperature", "coverage_weight", "entropy_weight", "mixture_alpha")


def make_proposal(cfg: ObjectiveConfig, hyper=None) -> proposals_lib.Proposal:
  """The proposal the samples are drawn from: `cfg.proposal` (`resolve_proposal`), tempered by heuristic (1)
  when T != 1. ``hyper`` (optional, ``{name: scalar}``) gives a run's own ``temperature`` or
  ``mixture_alpha``."""
  hyper = hyper or {}
  proposal = resolve_proposal(cfg.proposal, mixture_alpha=hyper.get("mixture_alpha", cfg.mixture_alpha))
  if "temperature" in hyper:
    return proposals_lib.tempered(proposal, hyper["temperature"])
  if cfg.temperature != 1.0:
    proposal = proposals_lib.tempered(proposal, cfg.temperature)
  return proposal


def baseline_transform(cfg: ObjectiveConfig, *, init_value: float = 0.0) -> baselines.BaselineTransform:
  """VAR's moving average (``baseline='moving'``: of the batches' mean log p(y|a); ``'nvil'``: of their mean
  residual log p(y|a) - b(I)), whose value before any batch is `init_value` and which is debiased towards the
  batches seen; or no baseline state. What it averages is the loss's ``baseline_target`` metric, or its
  ``reward`` (`training.step.build_step`)."""
  if cfg.method == "var" and cfg.baseline in ("moving", "nvil"):
    return baselines.moving_average(cfg.baseline_decay, init_value=init_value)
  return baselines.no_baseline()


# A prior location mean counts as saturated when |tanh^-1(mean)| > 2: tanh's slope there is below 0.071, so the
# gradient through the mean is at least 14 times smaller than at the centre.
SATURATION = 2.0
QUANTILES = (0.1, 0.5, 0.9)


def trajectory_metrics(traj: attention.Trajectory, num_scales: int, *, mask=None,
                       per_glimpse: bool = False) -> dict[str, jax.Array]:
  """Diagnostics of a batch of trajectories (fields ``[B, M, N, ...]``), all stop-gradient'ed:

  * ``ess``, ``bound``: the mean ESS of the importance weights (Eqn 7; at most M) and the mean Eqn 9 bound;
    ``ess/q10``, ``ess/q50``, ``ess/q90``, ``ess/min``: the ESS's quantiles and minimum over the batch;
  * ``log_p_minus_log_q/q10`` (``q50``, ``q90``): quantiles over the B M samples of log p(a) - log q(a), how far
    the prior is from the proposal (0 everywhere with the prior as proposal);
  * ``entropy``: the prior's mean entropy; ``scale_usage_{s}``: how often the samples use scale s, and with
    `per_glimpse`, ``scale_usage/g{n}_s{s}`` per glimpse n = 1..N;
  * ``outside_canvas``: the fraction of sampled locations outside the canvas ([-1, 1]^2 in either coordinate),
    where the glimpse is taken at the clipped location;
  * ``loc_saturation``: the fraction of the prior's location means (each coordinate, each glimpse) whose
    ``tanh`` pre-activation exceeds `SATURATION` in size.

  ``mask [B, N]`` (optional) leaves steps out of the per-step metrics (a caption's padding).
  """
  sg = jax.lax.stop_gradient
  log_w = estimators.log_importance_weights(sg(traj.log_p_a), sg(traj.log_p_y), sg(traj.log_q_a))
  ess = estimators.effective_sample_size(log_w)  # [B]
  log_ratio = sg(traj.log_p_a - traj.log_q_a).reshape(-1)
  metrics = {"ess": jnp.mean(ess), "bound": jnp.mean(estimators.log_marginal_bound(log_w))}
  for q, v in zip(QUANTILES, jnp.quantile(ess, jnp.asarray(QUANTILES))):
    metrics[f"ess/q{round(100 * q)}"] = v
  metrics["ess/min"] = jnp.min(ess)
  for q, v in zip(QUANTILES, jnp.quantile(log_ratio, jnp.asarray(QUANTILES))):
    metrics[f"log_p_minus_log_q/q{round(100 * q)}"] = v
  onehot = jax.nn.one_hot(traj.scales, num_scales)  # [B, M, N, S]
  outside = jnp.any(jnp.abs(sg(traj.actions.loc)) > 1.0, axis=-1).astype(jnp.float32)  # [B, M, N]
  saturated = (jnp.abs(jnp.arctanh(jnp.clip(sg(traj.prior_loc_mean), -1 + 1e-6, 1 - 1e-6))) > SATURATION)
  saturated = jnp.mean(saturated.astype(jnp.float32), axis=-1)  # [B, M, N]
  if mask is None:
    metrics["entropy"] = jnp.mean(sg(traj.entropy))
    usage = jnp.mean(onehot, axis=(0, 1, 2))
    metrics["outside_canvas"] = jnp.mean(outside)
    metrics["loc_saturation"] = jnp.mean(saturated)
  else:
    mask = mask[:, None, :]  # [B, 1, N]
    steps = jnp.maximum(jnp.sum(mask) * traj.scales.shape[1], 1.0)
    metrics["entropy"] = jnp.sum(sg(traj.entropy) * mask) / steps
    usage = jnp.sum(onehot * mask[..., None], axis=(0, 1, 2)) / steps
    metrics["outside_canvas"] = jnp.sum(outside * mask) / steps
    metrics["loc_saturation"] = jnp.sum(saturated * mask) / steps
  for s in range(num_scales):
    metrics[f"scale_usage_{s}"] = usage[s]
  if per_glimpse:
    per = jnp.mean(onehot, axis=(0, 1))  # [N, S]
    for n in range(per.shape[0]):
      for s in range(num_scales):
        metrics[f"scale_usage/g{n + 1}_s{s}"] = per[n, s]
  return metrics


def method_loss(cfg: ObjectiveConfig, log_p_a: jax.Array, log_p_y: jax.Array, log_q_a: jax.Array, *,
                baseline_value=0.0, learned_baseline=None, log_inference_a=None, hyper=None
                ) -> tuple[jax.Array, dict]:
  """The estimator part of `cfg.method`'s loss, from per-sample log-probabilities `[B, M]` of any model.

  ``wsram`` -> `estimators.wsram_losses` (``loss_q`` added unless the proposal is the prior), ``vimco`` ->
  `estimators.vimco_loss`, ``var`` -> `estimators.variational_loss` with the baseline `cfg.baseline`
  (``moving``: ``baseline_value``; ``learned``: ``learned_baseline`` `[B, M]`, also regressed with weight
  `cfg.baseline_weight`; ``nvil``: ``learned_baseline + baseline_value``, the head regressed on
  ``log_p_y - baseline_value``, and the metric ``baseline_target``, the batch's mean ``log_p_y -
  learned_baseline``, for the moving average to track; ``loo``: leave-one-out). The sleep update and the
  exploration heuristics need the rollout and are added by the task's loss (`with_heuristics`).
  ``log_inference_a`` `[B, M]` is the inference network's own log-density of the samples: when the proposal is
  not q itself (tempered, a mixture, one of the user's), wake-q trains q's own density on them
  (`estimators.wsram_losses`' ``log_q_own``). ``hyper`` as for `make_proposal`.

  Returns:
    `(loss, metrics)`: the scalar loss and its parts (``loss_p``, ``loss_q``, ``baseline_mse``).
  """
  metrics = {}
  if cfg.method == "wsram":
    proposal_is_q = (cfg.proposal == "inference_network" and cfg.temperature == 1.0
                     and "temperature" not in (hyper or {}))
    loss_p, loss_q = estimators.wsram_losses(
        log_p_a, log_p_y, log_q_a, control_variates=cfg.control_variates, p_baseline=cfg.p_baseline,
        log_q_own=None if proposal_is_q or log_inference_a is None else log_inference_a)
    loss = loss_p
    metrics["loss_p"] = loss_p
    if cfg.proposal != "prior":
      loss = loss + loss_q
      metrics["loss_q"] = loss_q
  elif cfg.method == "vimco":
    loss = estimators.vimco_loss(log_p_a, log_p_y)
  else:  # var (ObjectiveConfig admits nothing else)
    if cfg.baseline == "none":
      baseline = 0.0
    elif cfg.baseline == "moving":
      baseline = baseline_value
    elif cfg.baseline in ("learned", "nvil"):
      if learned_baseline is None:
        raise ValueError(f"baseline='{cfg.baseline}' needs the model's learned_baseline [B, M].")
      centre = 0.0  # the plain head has none
      if cfg.baseline == "nvil":  # NVIL's centring c (from earlier batches only) absorbs what b(I) lags behind
        centre = baseline_value
        metrics["baseline_target"] = jnp.mean(jax.lax.stop_gradient(log_p_y - learned_baseline))
      baseline = learned_baseline + centre
    else:  # loo
      baseline = estimators.leave_one_out_baseline(log_p_y)
    loss = estimators.variational_loss(log_p_a, log_p_y, baseline)
    if cfg.baseline != "none":
      metrics["baseline_mse"] = jnp.mean((jax.lax.stop_gradient(baseline) - log_p_y) ** 2)
    if cfg.baseline in ("learned", "nvil"):  # b(I) regresses what the centre leaves of the reward
      loss = loss + cfg.baseline_weight * baselines.baseline_loss(learned_baseline, log_p_y - centre)
  return loss, metrics


def with_heuristics(cfg: ObjectiveConfig, loss: jax.Array, traj: attention.Trajectory,
                    metrics: dict[str, jax.Array], hyper=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`loss` plus the exploration terms of Sec. 4.5 that `cfg` turns on (coverage, entropy bonus), and the
  metrics every task's loss reports with it: ``loss`` and ``reward`` (the batch's mean log p(y|a), which the
  moving-average baseline tracks). ``hyper`` (optional) gives a run's own ``coverage_weight`` or
  ``entropy_weight``."""
  hyper = hyper or {}
  if "coverage_weight" in hyper or cfg.coverage_weight > 0:
    loss = loss + hyper.get("coverage_weight", cfg.coverage_weight) * exploration.coverage_regularizer(
        traj.prior_scale_probs, traj.prior_loc_mean, location_weight=cfg.coverage_location_weight)
  if "entropy_weight" in hyper or cfg.entropy_weight > 0:
    loss = loss + exploration.entropy_bonus(traj.entropy, weight=hyper.get("entropy_weight", cfg.entropy_weight))
  metrics["loss"] = loss
  metrics["reward"] = jnp.mean(jax.lax.stop_gradient(traj.log_p_y))
  return loss, metrics
