"""The rollout: shapes, jit, retracing, log-probabilities, gradient routing, teacher forcing, user proposals.

Every rollout here is jitted and vmapped over a batch of B = 2 images, as a trainer calls it; compiled functions are
cached per configuration so that the file compiles each only once.
"""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsram_jax import actions, proposals
from wsram_jax.classifier import model as networks
from wsram_jax.classifier.rollout import ClassifierTrajectory, rollout

MODEL = networks.AttentionModel(num_classes=3, glimpse_size=4, num_scales=2, lowres_size=4, hidden_size=16,
                                glimpse_hidden=8, inference_hidden=12)
DIMS = chex.Dimensions(B=2, M=3, N=2, C=3, S=2)
M, N = DIMS.M, DIMS.N
ALPHA = 0.3


def wide_prior(ctx: proposals.ProposalContext) -> actions.ActionDist:
  """A user-defined proposal, written here and not in the library: the prior with twice the location std."""
  return ctx.prior._replace(loc_log_std=ctx.prior.loc_log_std + math.log(2.0))


MIXTURE = proposals.defensive_mixture(proposals.inference_network, proposals.prior, ALPHA)


@functools.lru_cache(maxsize=None)
def roll(proposal, num_glimpses=N, greedy=False):
  """Jitted rollout over a batch: (params, canvases [B,H,W,1], labels [B], keys [B], actions) -> [B, M, ...]."""

  def fn(params, canvases, labels, keys, given=None):
    one = functools.partial(rollout, model=MODEL, proposal=proposal, num_glimpses=num_glimpses, num_samples=M,
                            greedy=greedy)
    return jax.vmap(lambda c, y, k, a: one(params, c, y, k, actions=a))(canvases, labels, keys, given)

  return jax.jit(fn)


@jax.jit
@chex.assert_max_traces(n=1)
def prior_rollout(params, canvases, labels, keys):
  one = functools.partial(rollout, model=MODEL, proposal=proposals.prior, num_glimpses=N, num_samples=M)
  return jax.vmap(one, in_axes=(None, 0, 0, 0))(params, canvases, labels, keys)


@pytest.fixture(scope="module")
def params():
  return networks.init_params(MODEL, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  canvases = jnp.asarray(rng.uniform(size=(DIMS.B, 16, 16, 1)) * (rng.uniform(size=(DIMS.B, 16, 16, 1)) < 0.3),
                         jnp.float32)
  labels = jnp.asarray([1, 2], jnp.int32)
  return canvases, labels


def _keys(seed):
  return jax.random.split(jax.random.key(seed), DIMS.B)


def test_shapes(params, data):
  traj = roll(MIXTURE)(params, *data, _keys(1))
  assert isinstance(traj, ClassifierTrajectory)
  chex.assert_shape(traj.actions.loc, DIMS["BMN"] + (2,))
  chex.assert_shape([traj.actions.scale, traj.scales, traj.entropy], [DIMS["BMN"]] * 3)
  chex.assert_shape([traj.log_p_a, traj.log_q_a, traj.log_inference_a, traj.log_p_y, traj.baseline],
                    [DIMS["BM"]] * 5)
  chex.assert_shape(traj.logits, DIMS["BMC"])
  chex.assert_shape(traj.prior_scale_probs, DIMS["BMNS"])
  chex.assert_shape([traj.prior_loc_mean, traj.locations], [DIMS["BMN"] + (2,)] * 2)
  chex.assert_type([traj.actions.scale, traj.scales, traj.log_p_a], [jnp.int32, jnp.int32, jnp.float32])
  chex.assert_tree_all_finite(traj)


def test_trajectory_contents(params, data):
  canvases, labels = data
  traj = roll(MIXTURE)(params, canvases, labels, _keys(1))
  # Samples differ across m and b; the baseline does not depend on m; locations are the clipped samples.
  assert not np.allclose(traj.actions.loc[:, 0], traj.actions.loc[:, 1])
  assert not np.allclose(traj.actions.loc[0], traj.actions.loc[1])
  np.testing.assert_allclose(traj.baseline, traj.baseline[:, :1] * np.ones((1, M)))
  # To the last bit or two: XLA may compute a sample that two fused kernels recompute with different roundings.
  np.testing.assert_allclose(traj.locations, np.clip(traj.actions.loc, -1, 1), rtol=0, atol=1e-7)
  np.testing.assert_array_equal(traj.scales, traj.actions.scale)
  log_softmax = jax.nn.log_softmax(traj.logits)
  np.testing.assert_allclose(traj.log_p_y, np.take_along_axis(log_softmax, labels[:, None, None], -1)[..., 0],
                             rtol=1e-5)
  np.testing.assert_allclose(traj.prior_scale_probs.sum(-1), 1.0, rtol=1e-5)
  # The first glimpse's prior is the same for every m (it reads only the low-res image).
  np.testing.assert_allclose(traj.prior_loc_mean[:, :, 0], traj.prior_loc_mean[:, :1, 0] * np.ones((1, M, 1)),
                             rtol=1e-6)
  # Same key, same trajectory; a different key, different samples.
  again = roll(MIXTURE)(params, canvases, labels, _keys(1))
  chex.assert_trees_all_equal(again, traj)
  assert not np.allclose(roll(MIXTURE)(params, canvases, labels, _keys(2)).actions.loc, traj.actions.loc)


def test_no_retracing(params, data):
  # prior_rollout is wrapped in chex.assert_max_traces(n=1): new keys, images and parameters reuse the trace.
  canvases, labels = data
  for i in range(3):
    p = jax.tree_util.tree_map(lambda x: x * (1.0 + 0.1 * i), params)
    prior_rollout(p, canvases[::-1] if i % 2 else canvases, labels, _keys(10 + i))


def test_prior_proposal_log_q_equals_log_p(params, data):
  traj = prior_rollout(params, *data, _keys(4))
  np.testing.assert_allclose(traj.log_q_a, traj.log_p_a, rtol=1e-6)
  assert not np.allclose(traj.log_inference_a, traj.log_p_a)


def test_inference_proposal_log_q_is_log_inference(params, data):
  traj = roll(MIXTURE)(params, *data, _keys(4))
  assert not np.allclose(traj.log_q_a, traj.log_p_a)
  assert not np.allclose(traj.log_q_a, traj.log_inference_a)


FIELDS = ("log_p_a", "log_q_a", "log_p_y", "baseline")


@functools.lru_cache(maxsize=None)
def _jacobian(proposal):  # cached: one compilation for all the fields
  """d sum(field) / d params for each field in FIELDS, in one compiled jacrev."""

  def f(p, canvases, labels, keys):
    one = functools.partial(rollout, model=MODEL, proposal=proposal, num_glimpses=N, num_samples=M)
    traj = jax.vmap(one, in_axes=(None, 0, 0, 0))(p, canvases, labels, keys)
    return jnp.stack([jnp.sum(getattr(traj, k)) for k in FIELDS])

  return jax.jit(jax.jacrev(f))


def _reached(proposal, params, data, field):
  """The top-level parameter groups that the gradient of sum(field) reaches."""
  jac = _jacobian(proposal)(params, *data, _keys(5))
  i = FIELDS.index(field)
  norms = {k: float(sum(jnp.sum(jnp.square(g[i])) for g in jax.tree_util.tree_leaves(v))) for k, v in jac.items()}
  return {k for k, v in norms.items() if v > 0}


THETA_BODY = {"core1", "core2", "glimpse_what", "glimpse_where", "context"}


def test_gradient_routing(params, data):
  proposal = proposals.inference_network
  # log p(a): the prior head and everything below it, never the inference net, classifier or baseline.
  assert _reached(proposal, params, data, "log_p_a") == THETA_BODY | {"prior"}
  # log q(a): only the inference network.
  assert _reached(proposal, params, data, "log_q_a") == {"inference"}
  # log p(y | a): the classifier, layer 1 and the glimpse net. The glimpse positions are not differentiated and layer
  # 1 never reads layer 2, so nothing reaches the top layer, the context net or the heads.
  assert _reached(proposal, params, data, "log_p_y") == {"classifier", "core1", "glimpse_what", "glimpse_where"}
  # b(I): only the baseline head.
  assert _reached(proposal, params, data, "baseline") == {"baseline"}


def test_gradient_of_mixture_log_q_reaches_only_eta(params, data):
  # The defensive mixture's prior part is a constant for q's loss: log q(a) still reaches only eta.
  def f(p):
    one = functools.partial(rollout, model=MODEL, proposal=MIXTURE, num_glimpses=N, num_samples=M)
    return jnp.sum(jax.vmap(one, in_axes=(None, 0, 0, 0))(p, *data, _keys(5)).log_q_a)

  grads = jax.jit(jax.grad(f))(params)
  reached = {k for k, v in grads.items() if any(np.any(g != 0) for g in jax.tree_util.tree_leaves(v))}
  assert reached == {"inference"}


def test_teacher_forcing_and_user_defined_proposal(params, data):
  canvases, labels = data
  traj = roll(wide_prior)(params, canvases, labels, _keys(9))
  # Scoring the trajectory's own actions reproduces it (any key).
  scored = roll(wide_prior)(params, canvases, labels, _keys(0), traj.actions)
  chex.assert_trees_all_close(scored, traj, rtol=1e-5, atol=1e-5)
  # The user's proposal really is used: same noise as the prior's draw, twice the offset from the (shared) mean of
  # the first glimpse, and log q is the widened density, not the prior's.
  prior_traj = prior_rollout(params, canvases, labels, _keys(9))
  np.testing.assert_allclose(traj.actions.loc[:, :, 0] - traj.prior_loc_mean[:, :, 0],
                             2 * (prior_traj.actions.loc[:, :, 0] - prior_traj.prior_loc_mean[:, :, 0]), rtol=1e-4,
                             atol=1e-6)
  # Exactly: with z = (loc - mean) / (2 std), log q - log p = sum over glimpses and axes of 1.5 z^2 - log 2.
  z = (traj.actions.loc - traj.prior_loc_mean) / (2 * MODEL.loc_std)
  np.testing.assert_allclose(traj.log_q_a - traj.log_p_a, jnp.sum(1.5 * z**2 - math.log(2.0), axis=(-2, -1)),
                             rtol=1e-4, atol=1e-4)


def test_mixture_log_q_matches_manual_logaddexp(params, data):
  traj = roll(MIXTURE, num_glimpses=1)(params, *data, _keys(10))
  manual = jnp.logaddexp(math.log(ALPHA) + traj.log_inference_a, math.log(1 - ALPHA) + traj.log_p_a)
  np.testing.assert_allclose(traj.log_q_a, manual, rtol=1e-5)


def test_greedy_takes_the_prior_mean(params, data):
  traj = roll(proposals.prior, greedy=True)(params, *data, _keys(11))
  np.testing.assert_allclose(traj.actions.loc, traj.prior_loc_mean, rtol=1e-6)
  np.testing.assert_array_equal(traj.scales, jnp.argmax(traj.prior_scale_probs, -1))
  np.testing.assert_allclose(traj.log_p_y, traj.log_p_y[:, :1] * np.ones((1, M)), rtol=1e-6)


def test_default_model_shapes():
  # The paper's sizes (100 x 100 canvas, 12 px glimpses at 3 scales, hidden 256, N = 4), traced but not compiled.
  model = networks.AttentionModel()
  p = jax.eval_shape(functools.partial(networks.init_params, model), jax.random.key(0))
  fn = functools.partial(rollout, model=model, proposal=proposals.defensive_mixture(), num_glimpses=4,
                         num_samples=5)
  traj = jax.eval_shape(jax.vmap(fn, in_axes=(None, 0, 0, 0)), p, jax.ShapeDtypeStruct((32, 100, 100, 1),
                                                                                       jnp.float32),
                        jax.ShapeDtypeStruct((32,), jnp.int32), jax.random.split(jax.random.key(0), 32))
  chex.assert_shape(traj.prior_scale_probs, (32, 5, 4, 3))
  chex.assert_shape(traj.logits, (32, 5, 10))
