"""What every stochastic hard-attention model here shares: its action heads, one glimpse decision, the trajectory.

A task's rollout (`wsram_jax.classifier.rollout`, `wsram_jax.captioning.rollout`) runs its own network, and at
every glimpse n hands the heads' outputs to `choose_action`, which is the same for every task:

    ctx   = ProposalContext(stop_gradient(p_n), q_n, stop_gradient(h_n), y, n)
    r_n   = proposal(ctx)                             what the samples are drawn from (proposals.py)
    a_n   = given a_n | mode(r_n) (greedy) | a draw from r_n by the noise (sampled), stop-gradient'ed
    log p_n(a_n), log r_n(a_n), log q_n(a_n)          under the prior, the proposal, the inference network

and records it as a `GlimpseRecord`. `trajectory_fields` sums the records of N glimpses into the per-sample
log-probabilities of Eqn 7 (``log_p_a``, ``log_q_a``) that the estimators read, so a task's trajectory is a
`Trajectory` (plus its own fields) and the objective layer (`wsram_jax.objectives`: losses, heuristics,
metrics) reads every task's alike.

`ActionHead` is the network layer both tasks put on a hidden state to get an action distribution (a Gaussian
location with a ``tanh`` mean and a categorical scale; `head_distribution`). Every attention model has a
``loc_std`` field, which a sweep may vary per run (`model_for_run`).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import proposals as proposals_lib
from wsram_jax.actions import Action

__all__ = ["INFERENCE_KEY", "BASELINE_KEY", "PRIOR_KEY", "param_labels", "policy_mask", "Heads", "Linear",
           "ActionHead", "head_distribution", "GlimpseRecord", "choose_action", "Trajectory", "trajectory_fields",
           "model_for_run"]


# Parameter groups: the inference network's parameters (eta) live under this top-level key of a model's
# ``'params'``, a VAR baseline head's under the other; everything else is the prediction network (theta).
INFERENCE_KEY = "inference"
BASELINE_KEY = "baseline"
# The prior's action head (the attention policy p(a_n | a_<n, I)) lives under this top-level key.
PRIOR_KEY = "prior"


class Heads(NamedTuple):
  """Per-glimpse head outputs: ``prior`` and ``inference`` are K = 1 `ActionDist`s over the next action."""
  prior: actions_lib.ActionDist
  inference: actions_lib.ActionDist


def head_distribution(outputs: jax.Array, *, num_scales: int, loc_std: float, learn_loc_std: bool,
                      min_loc_std: float, max_loc_std: float, **unused) -> actions_lib.ActionDist:
  """An action head's K = 1 distribution from its Dense outputs ``[..., 2 + S (+ 2)]``: location mean
  ``tanh(out[:2])``, scale logits ``out[2:2+S]``, log std ``clip(out[2+S:])`` when learned, else ``log(loc_std)``."""
  del unused
  loc_mean = jnp.tanh(outputs[..., :2])
  scale_logits = outputs[..., 2:2 + num_scales]
  if learn_loc_std:
    log_std = jnp.clip(outputs[..., 2 + num_scales:], math.log(min_loc_std), math.log(max_loc_std))
  else:  # a Python number (folded into the program), or a traced one (a run's own value in a sweep)
    log_loc_std = math.log(loc_std) if isinstance(loc_std, (int, float)) else jnp.log(loc_std)
    log_std = jnp.full(loc_mean.shape, log_loc_std, jnp.float32)
  return actions_lib.single(loc_mean, log_std, scale_logits)


class Linear(nn.Module):
  """``x @ kernel + bias``, kernel ``[in_features, features]``: `flax.linen.Dense` with its input width declared, so
  that a model can read the weights without an input (`weights`) and fuse layers that read the same input into
  one matmul. Same parameter names, creation order and default initialisers as ``nn.Dense``, hence the same
  initial values for the same key and module path."""
  in_features: int
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  def setup(self):
    self.kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features), jnp.float32)
    self.bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """``(kernel [in_features, features], bias [features])``."""
    return self.kernel, self.bias

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = self.weights()
    return x @ kernel + bias


class ActionHead(nn.Module):
  """``h [..., in_features]`` -> a K = 1 `ActionDist` (`head_distribution`): a ``tanh`` location mean, a fixed or
  learned location std, scale logits. Its layers ``loc`` (2 outputs), ``scale`` (S) and, with a learned std,
  ``log_std`` (2) read the same ``h`` and run as one matmul (`weights` concatenates them; `distribution` reads
  the outputs).

  Attributes:
    in_features: width of ``h``.
    num_scales: S.
    loc_std: the fixed location std, or the initial one when learned (the ``log_std`` layer starts at zero
      weights and bias ``log(loc_std)``).
    learn_loc_std: a state-dependent std, clipped to ``[min_loc_std, max_loc_std]``.
    min_loc_std, max_loc_std: that clip range.
    mean_init_scale: variance scale of the ``loc`` and ``scale`` kernels (small: a near-uniform initial policy).
  """
  in_features: int
  num_scales: int
  loc_std: float
  learn_loc_std: bool
  min_loc_std: float
  max_loc_std: float
  mean_init_scale: float

  def setup(self):
    small = nn.initializers.variance_scaling(self.mean_init_scale, "fan_in", "truncated_normal")
    self.loc = Linear(self.in_features, 2, kernel_init=small)
    self.scale = Linear(self.in_features, self.num_scales, kernel_init=small)
    if self.learn_loc_std:
      self.log_std = Linear(self.in_features, 2, kernel_init=nn.initializers.zeros,
                            bias_init=nn.initializers.constant(math.log(self.loc_std)))

  @property
  def num_outputs(self) -> int:
    """P = 2 + S (+ 2 with a learned std)."""
    return 2 + self.num_scales + (2 if self.learn_loc_std else 0)

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """``(kernel [in_features, P], bias [P])``: the layers ``loc | scale (| log_std)`` side by side."""
    layers = [self.loc, self.scale] + ([self.log_std] if self.learn_loc_std else [])
    kernels, biases = zip(*(layer.weights() for layer in layers))
    return jnp.concatenate(kernels, 1), jnp.concatenate(biases, 0)

  def distribution(self, outputs: jax.Array) -> actions_lib.ActionDist:
    """The distribution from the layers' outputs ``[..., P]`` (`head_distribution`)."""
    return head_distribution(outputs, num_scales=self.num_scales, loc_std=self.loc_std,
                             learn_loc_std=self.learn_loc_std, min_loc_std=self.min_loc_std,
                             max_loc_std=self.max_loc_std)

  def __call__(self, h: jax.Array) -> actions_lib.ActionDist:
    kernel, bias = self.weights()
    return self.distribution(h @ kernel + bias)


class GlimpseRecord(NamedTuple):
  """One glimpse decision of one trajectory (a vmap or scan over samples and glimpses prepends their axes).

  Attributes:
    action: the action as chosen (``loc [2]`` unclipped, ``scale []`` int32), stop-gradient'ed.
    location: ``[2]`` the location the glimpse is taken at, ``clip(loc, -1, 1)``.
    log_p: ``[]`` log p_n(a_n) under the prior (differentiable w.r.t. theta).
    log_q: ``[]`` log r_n(a_n) under the proposal (differentiable w.r.t. eta only).
    log_inference: ``[]`` log q_n(a_n) under the inference network, whatever the proposal (eta only).
    entropy: ``[]`` the prior's entropy (differentiable).
    scale_probs: ``[S]`` the prior's scale probabilities (differentiable).
    loc_mean: ``[2]`` the prior's location mean (differentiable).
  """
  action: Action
  location: jax.Array
  log_p: jax.Array
  log_q: jax.Array
  log_inference: jax.Array
  entropy: jax.Array
  scale_probs: jax.Array
  loc_mean: jax.Array


def choose_action(heads: Heads, proposal: proposals_lib.Proposal, *, h: jax.Array, label: jax.Array,
                  step: jax.Array, noise: Optional[actions_lib.Noise] = None, given: Optional[Action] = None,
                  greedy: bool = False) -> GlimpseRecord:
  """Glimpse n's action and its log-probabilities, from the heads on the state ``h`` (see the module docstring).

  Args:
    heads: the prior p_n and the inference network q_n (K = 1 each) on ``h``.
    proposal: a `proposals.Proposal` (static).
    h: the state the heads read (the proposal sees it stop-gradient'ed).
    label: ``[]`` int32, what the inference network conditions on (the class, or a word of the caption).
    step: ``[]`` int32 glimpse index n.
    noise: `actions.Noise` for one draw (`actions.draw_noise`); used when sampling.
    given: an action to score instead of choosing one (teacher forcing).
    greedy: take `actions.mode` of the proposal instead of sampling.

  Returns:
    The `GlimpseRecord`. The proposal sees the prior and ``h`` stop-gradient'ed, so ``log_q``'s gradient
    reaches only the inference network's parameters, whatever the proposal.
  """
  ctx = proposals_lib.ProposalContext(prior=actions_lib.stop_gradient(heads.prior), inference=heads.inference,
                                      h=jax.lax.stop_gradient(h), label=label, step=step)
  dist = proposal(ctx)
  if given is not None:
    action = jax.lax.stop_gradient(Action(loc=jnp.asarray(given.loc, jnp.float32),
                                          scale=jnp.asarray(given.scale, jnp.int32)))
  elif greedy:
    action = actions_lib.mode(dist)
  else:
    action = actions_lib.sample_from_noise(dist, noise)
  return GlimpseRecord(
      action=action,
      location=jnp.clip(action.loc, -1.0, 1.0),
      log_p=actions_lib.log_prob(heads.prior, action),
      log_q=actions_lib.log_prob(dist, action),
      log_inference=actions_lib.log_prob(heads.inference, action),
      entropy=actions_lib.entropy(heads.prior),
      scale_probs=actions_lib.scale_probs(heads.prior),
      loc_mean=actions_lib.mean_location(heads.prior),
  )


@chex.dataclass(frozen=True)
class Trajectory:
  """M trajectories of N glimpses of one input (a caller's vmap over B prepends ``B`` to every shape); what the
  objective layer reads. Each task's rollout returns a subclass with its own fields added.

  Attributes:
    actions: the actions as chosen (locations unclipped): ``Action(loc [M, N, 2] float32, scale [M, N] int32)``.
    log_p_a: ``[M]`` log p(a | I; theta) = sum_n log prior_n(a_n), differentiable w.r.t. theta.
    log_q_a: ``[M]`` log q(a | y, I) = sum_n log proposal_n(a_n), differentiable w.r.t. eta only.
    log_inference_a: ``[M]`` sum_n log inference_n(a_n), the inference network's own log-density of the actions,
      whatever the proposal (equals log_q_a for `proposals.inference_network`).
    log_p_y: ``[M]`` log p(y | a, I; theta).
    entropy: ``[M, N]`` entropy of the prior at each glimpse (for the entropy bonus; differentiable).
    prior_scale_probs: ``[M, N, S]`` the prior's scale probabilities at each glimpse (differentiable).
    prior_loc_mean: ``[M, N, 2]`` the prior's location mean at each glimpse (differentiable).
    locations: ``[M, N, 2]`` the locations actually glimpsed, i.e. clipped to [-1, 1] (no gradient).
    scales: ``[M, N]`` int32, the scales glimpsed (no gradient).
    baseline: ``[M]`` the baseline head's b(I) (the same for every m; gradient only to the baseline head).
  """
  actions: Action
  log_p_a: chex.Array
  log_q_a: chex.Array
  log_inference_a: chex.Array
  log_p_y: chex.Array
  entropy: chex.Array
  prior_scale_probs: chex.Array
  prior_loc_mean: chex.Array
  locations: chex.Array
  scales: chex.Array
  baseline: chex.Array


def trajectory_fields(records: GlimpseRecord, *, log_p_y: jax.Array, baseline: jax.Array,
                      mask: Optional[jax.Array] = None) -> dict:
  """The `Trajectory` fields from the stacked records of M trajectories (``[M, N, ...]``).

  ``log_p_a``, ``log_q_a``, ``log_inference_a`` are the sums over the N glimpses of the records' log-densities,
  each glimpse weighted by ``mask [N]`` when given (a glimpse with weight 0 counts nowhere). ``baseline`` is the
  per-input b(I) ``[]``, broadcast to ``[M]``.
  """
  m_ = records.log_p.shape[0]
  total = (lambda x: jnp.sum(x, axis=1)) if mask is None else (lambda x: jnp.sum(mask * x, axis=1))
  return dict(
      actions=records.action,
      log_p_a=total(records.log_p),
      log_q_a=total(records.log_q),
      log_inference_a=total(records.log_inference),
      log_p_y=log_p_y,
      entropy=records.entropy,
      prior_scale_probs=records.scale_probs,
      prior_loc_mean=records.loc_mean,
      locations=records.location,
      scales=records.action.scale,
      baseline=jnp.broadcast_to(baseline, (m_,)),
  )


def _path_keys(path) -> list[str]:
  out = []
  for p in path:
    k = getattr(p, "key", getattr(p, "name", None))
    if k is not None:
      out.append(str(k))
  return out


def _top_key(path) -> Optional[str]:
  """The top-level module name of a parameter path, past a leading ``'params'`` collection; None for none."""
  keys = _path_keys(path)
  if keys and keys[0] == "params":
    keys = keys[1:]
  return keys[0] if keys else None


def param_labels(params, *, baseline: str = "theta"):
  """A pytree like ``params`` with leaves ``'eta'`` (inference network) or ``'theta'`` (everything else).

  Works on the ``'params'`` collection or on ``{'params': ...}`` and on gradients of the same structure; use with
  ``optax.multi_transform``. ``baseline`` relabels the baseline head (e.g. ``'baseline'`` to give it its own
  optimiser or keep it out of theta's gradient-variance diagnostics); by default it is part of theta.
  """

  def label(path, _):
    top = _top_key(path)
    if top == INFERENCE_KEY:
      return "eta"
    if top == BASELINE_KEY:
      return baseline
    return "theta"

  return jax.tree_util.tree_map_with_path(label, params)


def policy_mask(params):
  """A pytree like ``params`` with leaves True for the attention policies' own parameters (the prior's action
  head, ``PRIOR_KEY``, and the whole inference network q, ``INFERENCE_KEY``) and False elsewhere. Works on the
  ``'params'`` collection or on ``{'params': ...}``; for ``optax.masked``. The prior's gradient also reaches the
  core through its input h2; those shared layers are not in the mask."""

  return jax.tree_util.tree_map_with_path(lambda path, _: _top_key(path) in (PRIOR_KEY, INFERENCE_KEY), params)


def model_for_run(model, hyper):
  """`model` with the run's own location std when a sweep varies it (``hyper['loc_std']``, a traced scalar;
  `training.runs`), else `model` itself."""
  return model.clone(loc_std=hyper["loc_std"]) if "loc_std" in hyper else model
