"""Proposals as pure functions of a ProposalContext."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsram_jax import actions, proposals


def _ctx():
  p = actions.single(jnp.asarray([0.1, 0.2]), jnp.log(0.2), jnp.asarray([0.0, 1.0]))
  q = actions.single(jnp.asarray([-0.4, 0.5]), jnp.log(0.1), jnp.asarray([2.0, 0.0]))
  return proposals.ProposalContext(prior=p, inference=q, h=jnp.zeros(8), label=jnp.asarray(3),
                                   step=jnp.asarray(0))


def test_prior_and_inference_network():
  ctx = _ctx()
  assert proposals.prior(ctx) is ctx.prior
  assert proposals.inference_network(ctx) is ctx.inference


def test_tempered():
  ctx = _ctx()
  d = proposals.tempered(proposals.prior, 4.0)(ctx)
  np.testing.assert_allclose(jnp.exp(d.loc_log_std), 0.4, rtol=1e-6)
  np.testing.assert_allclose(d.scale_logits, ctx.prior.scale_logits / 4.0)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_defensive_mixture(alpha):
  ctx = _ctx()
  d = proposals.defensive_mixture(proposals.inference_network, proposals.prior, alpha)(ctx)
  assert actions.num_components(d) == 2
  np.testing.assert_allclose(jax.nn.softmax(d.mix_logits), [alpha, 1 - alpha], atol=1e-7)
  a = actions.Action(loc=jnp.asarray([0.0, 0.3]), scale=jnp.asarray(1))
  lq, lp = actions.log_prob(ctx.inference, a), actions.log_prob(ctx.prior, a)
  expected = np.logaddexp((math.log(alpha) if alpha else -np.inf) + lq,
                          (math.log(1 - alpha) if alpha < 1 else -np.inf) + lp)
  np.testing.assert_allclose(actions.log_prob(d, a), expected, rtol=1e-6)


def test_defensive_mixture_rejects_bad_alpha():
  with pytest.raises(ValueError, match="alpha"):
    proposals.defensive_mixture(alpha=1.5)


def test_composition_and_jit():
  ctx = _ctx()
  prop = proposals.tempered(proposals.defensive_mixture(alpha=0.5), 2.0)
  d = jax.jit(prop)(ctx)
  np.testing.assert_allclose(jax.nn.softmax(d.mix_logits), [0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(jnp.exp(d.loc_log_std[0]), 0.1 * math.sqrt(2), rtol=1e-6)
