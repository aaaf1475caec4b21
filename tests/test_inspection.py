"""`classifier.inspection`: K groups of samples give K estimates of an estimator's gradient, each from its own
group's first M samples, and each is jax.grad of the estimator composed with the rollout of those samples."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsram_jax import estimators
from wsram_jax import proposals
from wsram_jax.actions import Action
from wsram_jax.classifier import inspection
from wsram_jax.classifier import loss as loss_lib
from wsram_jax.classifier import model as model_lib

MODEL = model_lib.AttentionModel(num_classes=4, glimpse_size=6, num_scales=2, lowres_size=4, hidden_size=16,
                                 glimpse_hidden=8, inference_hidden=8, head_init_scale=0.5)
N = 2


def _setup(batch=2):
  params = model_lib.init_params(MODEL, jax.random.PRNGKey(0))
  canvases = jax.random.uniform(jax.random.PRNGKey(1), (batch, 24, 24, 1))
  labels = jnp.arange(batch) % MODEL.num_classes
  return params, canvases, labels


def wsram_q_cv(p_a, p_y, q_a):
  return sum(estimators.wsram_losses(p_a, p_y, q_a, control_variates=True))


@functools.partial(jax.jit, static_argnums=0)
def _direct_grad(loss_fn, params, canvases, labels, actions):
  """jax.grad of loss_fn composed with the rollout that scores `actions` ([B, M, N, ...])."""
  def total(p):
    traj = loss_lib.batched_rollout(p, canvases, labels, jax.random.PRNGKey(0), model=MODEL,
                                    proposal=proposals.inference_network, num_glimpses=N,
                                    num_samples=actions.scale.shape[1], actions=actions)
    return loss_fn(traj.log_p_a, traj.log_p_y, traj.log_q_a)
  return jax.grad(total)(params)


def _assert_trees_close(got, want):
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_estimates_are_the_gradients_of_the_composed_loss_on_the_first_m_samples_of_each_group():
  params, canvases, labels = _setup()
  k, m_max, m = 2, 4, 3
  traj = loss_lib.batched_rollout(params, canvases, labels, jax.random.PRNGKey(3), model=MODEL,
                                  proposal=proposals.inference_network, num_glimpses=N, num_samples=k * m_max)
  groups = inspection.group_samples(traj, k)
  assert groups.log_p_a.shape == (k, 2, m_max) and groups.actions.loc.shape == (k, 2, m_max, N, 2)
  np.testing.assert_array_equal(groups.log_p_y[1, 0], traj.log_p_y[0, m_max:2 * m_max])
  grads = inspection.gradient_estimates(wsram_q_cv, params, canvases, labels, groups, num_samples=m, model=MODEL,
                                        proposal=proposals.inference_network, num_glimpses=N)
  for g in range(k):
    first = Action(loc=groups.actions.loc[g, :, :m], scale=groups.actions.scale[g, :, :m])
    want = _direct_grad(wsram_q_cv, params, canvases, labels, first)
    _assert_trees_close(jax.tree_util.tree_map(lambda x, g=g: x[g], grads), want)
  assert float(jnp.abs(grads["inference"]["hidden"]["kernel"]).sum()) > 0  # eta gets loss_q's gradient
  with pytest.raises(ValueError, match="1..4"):
    inspection.gradient_estimates(wsram_q_cv, params, canvases, labels, groups, num_samples=m_max + 1,
                                  model=MODEL, proposal=proposals.inference_network, num_glimpses=N)
