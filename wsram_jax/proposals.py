"""Proposal distributions q(a_n | y, a_<n, I) as pure functions (paper Sec. 4.2-4.5).

A proposal has one signature, ``Proposal = Callable[[ProposalContext], ActionDist]``: at every glimpse the rollout
builds a `ProposalContext` from the heads on the current top-layer state and samples the next action from what the
proposal returns (any number K of mixture components). The rollout scores samples under the prior (log p(a)) and
under the returned distribution (log q(a)), so a proposal never needs to know about weights or estimators.

Gradients: the rollout stop-gradients everything the context carries from the prediction network (``prior``,
``h``), so the gradient of log q(a) reaches only the inference network's parameters eta (through ``inference``),
whatever the proposal does. With ``prior`` as proposal log q(a) equals log p(a) in value but has no gradient.

A new proposal is a function written anywhere, e.g. a prior with a wider location std::

    def wide_prior(ctx):
      return ctx.prior._replace(loc_log_std=ctx.prior.loc_log_std + jnp.log(2.0))

    rollout(..., proposal=wide_prior)

Keep a proposal a plain (hashable) function or closure so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax.actions import ActionDist

__all__ = ["ProposalContext", "Proposal", "prior", "inference_network", "tempered", "defensive_mixture"]


class ProposalContext(NamedTuple):
  """What a proposal sees at glimpse n of one trajectory.

  Attributes:
    prior: the prior head's K = 1 `ActionDist` p(a_n | a_<n, I) (stop-gradient'ed).
    inference: the inference head's K = 1 `ActionDist` q(a_n | y, a_<n, I; eta) (differentiable w.r.t. eta).
    h: ``[D]`` the top-layer state the heads read (stop-gradient'ed).
    label: ``[]`` int32 class label y.
    step: ``[]`` int32 glimpse index n in ``0..N-1``.
  """
  prior: ActionDist
  inference: ActionDist
  h: jax.Array
  label: jax.Array
  step: jax.Array


Proposal = Callable[[ProposalContext], ActionDist]


def prior(ctx: ProposalContext) -> ActionDist:
  """The prior itself (WS-RAM without an inference network; VAR)."""
  return ctx.prior


def inference_network(ctx: ProposalContext) -> ActionDist:
  """The inference network q(a_n | y, a_<n, I; eta) (Sec. 4.3, WS-RAM + q)."""
  return ctx.inference


def tempered(base: Proposal, temperature) -> Proposal:
  """``base`` at temperature T (`actions.temper`: location std * sqrt(T), scale logits / T, mixture weights kept).

  Sec. 4.5's first exploration heuristic. ``temperature`` is a Python float (static) or an array.
  """

  def proposal(ctx: ProposalContext) -> ActionDist:
    return actions_lib.temper(base(ctx), temperature)

  proposal.__name__ = f"tempered({getattr(base, '__name__', 'proposal')}, {temperature})"
  return proposal


def defensive_mixture(q: Proposal = inference_network, prior: Proposal = prior, alpha=0.5) -> Proposal:
  """The defensive mixture ``alpha * q + (1 - alpha) * prior`` at every glimpse (Le et al. 2019, "Revisiting
  Reweighted Wake-Sleep", defensive importance sampling).

  Convention: ``alpha`` is the weight of ``q`` (the learned proposal); ``1 - alpha`` the weight of the defensive
  component. ``alpha = 1`` is ``q``, ``alpha = 0`` the prior. The mixture is per glimpse (each a_n from q with
  probability alpha), and log q(a) is the mixture's log density, ``logaddexp(log alpha + log q_n,
  log(1 - alpha) + log p_n)`` summed over n. K adds up over the two parts (K = 2 for two single components).
  """
  if not isinstance(alpha, jax.Array) and not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"defensive_mixture: alpha must be in [0, 1], got {alpha}.")

  def proposal(ctx: ProposalContext) -> ActionDist:
    a = jnp.asarray(alpha, jnp.float32)
    return actions_lib.mixture([q(ctx), prior(ctx)], [a, 1.0 - a])

  proposal.__name__ = f"defensive_mixture({getattr(q, '__name__', 'q')}, {getattr(prior, '__name__', 'p')}, {alpha})"
  return proposal
