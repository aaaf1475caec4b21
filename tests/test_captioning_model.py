"""The captioner's model and rollout: shapes, jit = no jit, log p(a) = log q(a) under the prior, gradient
isolation, masking, teacher forcing, greedy decoding, and the losses built on the shared estimators."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsram_jax import actions as actions_lib
from wsram_jax import attention
from wsram_jax import objectives as objectives_lib
from wsram_jax import proposals
from wsram_jax.captioning import model as model_lib
from wsram_jax.captioning import loss as loss_lib
from wsram_jax.captioning import rollout as rollout_lib
from wsram_jax.captioning import vocab as vocab_lib

V, M, T, S = 9, 3, 5, 2


def tiny_model(**kw):
  return model_lib.CaptionModel(
      vocab_size=V, encoder=model_lib.ConvPyramid(channels=(4, 4, 4), num_levels=S), num_scales=S,
      feature_dim=4, read_size=2, embed_dim=4, hidden_size=8, glimpse_hidden=4, attention_hidden=8,
      context_dim=4, lowres_size=4, **kw)


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def params(model):
  return model_lib.init_params(model, jax.random.PRNGKey(0), (16, 16, 1))


@pytest.fixture(scope="module")
def data():
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 1))
  # Two captions of different lengths: the second ends early, so its last steps are masked.
  captions = jnp.array([[1, 4, 5, 6, 7, 2], [1, 8, 2, 0, 0, 0]], jnp.int32)
  return images, captions


def roll(params, image, caption, key, *, model, proposal=proposals.inference_network, **kw):
  return rollout_lib.rollout(params, image, caption, key, model=model, proposal=proposal, num_samples=M, **kw)


# Jitted (one compilation per static signature): eager rollouts dispatch op by op and dominate test time.
roll_jit = jax.jit(roll, static_argnames=("model", "proposal", "q_word"))


def test_shapes_and_batch_vmap(model, params, data):
  images, captions = data
  batched = functools.partial(loss_lib.batched_rollout, model=model, proposal=proposals.inference_network,
                              num_samples=M)
  traj = jax.jit(batched)(params, images, captions, jax.random.PRNGKey(2))
  chex.assert_shape([traj.log_p_a, traj.log_q_a, traj.log_p_y, traj.baseline, traj.log_inference_a], (2, M))
  chex.assert_shape([traj.word_log_probs, traj.entropy, traj.scales], (2, M, T))
  chex.assert_shape([traj.actions.loc, traj.locations, traj.prior_loc_mean], (2, M, T, 2))
  chex.assert_shape(traj.prior_scale_probs, (2, M, T, S))
  np.testing.assert_array_equal(traj.mask, [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
  np.testing.assert_allclose(traj.log_p_y, traj.word_log_probs.sum(-1), rtol=1e-6)
  assert np.all(traj.word_log_probs[1, :, 2:] == 0)
  assert np.all(np.abs(traj.locations) <= 1) and np.all((traj.scales >= 0) & (traj.scales < S))
  # The encoder's levels: 16 -> 8 -> 4 -> 2 px; the last two blocks are the levels, finest first.
  enc = model.apply({"params": params}, images[0], method=model.encode)
  assert [f.shape for f in enc.levels] == [(4, 4, 4), (2, 2, 4)]
  assert model_lib.pyramid_geometry((4, 4, 4), 2) == [(4, 10), (8, 22)]


def test_jit_equals_no_jit(model, params, data):
  images, captions = data
  f = functools.partial(roll, model=model)
  key = jax.random.PRNGKey(3)
  eager = f(params, images[0], captions[0], key)
  jitted = roll_jit(params, images[0], captions[0], key, model=model)
  for name in ("log_p_a", "log_q_a", "log_p_y", "locations"):
    np.testing.assert_allclose(getattr(eager, name), getattr(jitted, name), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(eager.scales, jitted.scales)


def test_prior_proposal_log_q_equals_log_p_without_gradient(model, params, data):
  images, captions = data
  f = lambda p: roll(p, images[0], captions[0], jax.random.PRNGKey(4), model=model, proposal=proposals.prior)
  traj, grads = jax.jit(lambda p: (f(p), jax.grad(lambda q: jnp.sum(f(q).log_q_a))(p)))(params)
  np.testing.assert_allclose(traj.log_q_a, traj.log_p_a, rtol=1e-6)
  assert all(np.all(g == 0) for g in jax.tree_util.tree_leaves(grads))


def _group_norms(grads):
  labels = attention.param_labels(grads)
  sums = {"theta": 0.0, "eta": 0.0}
  for lab, g in zip(jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(grads)):
    sums[lab] += float(jnp.sum(g ** 2))
  return sums


def test_gradient_isolation(model, params, data):
  images, captions = data
  cfg = objectives_lib.ObjectiveConfig(method="wsram", proposal="inference_network", num_samples=M)
  names = ("log_q_a", "loss_q", "log_p_a", "log_p_y", "loss_p")

  def scalars(p):
    traj = loss_lib.batched_rollout(p, images, captions, jax.random.PRNGKey(5), model=model,
                                      proposal=proposals.inference_network, num_samples=M)
    # The WS-RAM losses through the shared estimator dispatch.
    parts = objectives_lib.method_loss(cfg, traj.log_p_a, traj.log_p_y, traj.log_q_a)[1]
    return jnp.stack([jnp.sum(traj.log_q_a), parts["loss_q"], jnp.sum(traj.log_p_a), jnp.sum(traj.log_p_y),
                      parts["loss_p"]])

  jac = jax.jit(jax.jacrev(scalars))(params)  # one backward pass, vmapped over the five scalars
  for i, name in enumerate(names):
    norms = _group_norms(jax.tree_util.tree_map(lambda g, i=i: g[i], jac))
    if name in ("log_q_a", "loss_q"):  # q's log-density and the wake-q loss reach only eta
      assert norms["eta"] > 0 and norms["theta"] == 0, name
    else:  # the prior, the likelihood and the wake-p loss reach only theta
      assert norms["theta"] > 0 and norms["eta"] == 0, name
  # The encoder (image side) is trained by log p(y|a) through the glimpse reads.
  assert float(jnp.sum(jac["encoder"]["conv_0"]["kernel"][3] ** 2)) > 0


def test_teacher_forcing_and_masked_steps(model, params, data):
  images, captions = data
  traj = roll_jit(params, images[1], captions[1], jax.random.PRNGKey(6), model=model)
  scored = roll_jit(params, images[1], captions[1], None, model=model, actions=traj.actions)
  for name in ("log_p_a", "log_q_a", "log_p_y"):
    np.testing.assert_allclose(getattr(scored, name), getattr(traj, name), rtol=1e-5, atol=1e-5)
  # Changing the glimpses after <eos> (masked steps) changes no log-probability.
  moved = actions_lib.Action(loc=traj.actions.loc.at[:, 2:].add(0.7), scale=traj.actions.scale.at[:, 2:].set(1))
  again = roll_jit(params, images[1], captions[1], None, model=model, actions=moved)
  for name in ("log_p_a", "log_q_a", "log_p_y"):
    np.testing.assert_allclose(getattr(again, name), getattr(traj, name), rtol=1e-5, atol=1e-5)
  # ... while changing an unmasked glimpse does.
  moved = actions_lib.Action(loc=traj.actions.loc.at[:, 0].add(0.7), scale=traj.actions.scale)
  again = roll_jit(params, images[1], captions[1], None, model=model, actions=moved)
  assert not np.allclose(again.log_p_y, traj.log_p_y)


def test_q_word_choice(model, params, data):
  images, captions = data
  key = jax.random.PRNGKey(7)
  tgt = roll_jit(params, images[0], captions[0], key, model=model)  # q_word="target", the default
  prev = roll_jit(params, images[0], captions[0], key, model=model, q_word="previous")
  assert not np.allclose(tgt.log_q_a, prev.log_q_a)
  with pytest.raises(ValueError, match="q_word"):
    roll_jit(params, images[0], captions[0], key, model=model, q_word="caption")


def test_read_level_bilinear():
  read_level = jax.jit(model_lib.read_level, static_argnums=2)
  fmap = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(4, 4, 2)
  # The centre of cell (1, 2): loc = (2 (i + 1/2) / h - 1, ...).
  loc = jnp.array([2 * 1.5 / 4 - 1, 2 * 2.5 / 4 - 1])
  np.testing.assert_allclose(read_level(fmap, loc, 1)[0, 0], fmap[1, 2], rtol=1e-6)
  # Halfway between cells (1, 2) and (1, 3).
  loc2 = jnp.array([2 * 1.5 / 4 - 1, 2 * 3.0 / 4 - 1])
  np.testing.assert_allclose(read_level(fmap, loc2, 1)[0, 0], (fmap[1, 2] + fmap[1, 3]) / 2, rtol=1e-6)
  # A 2x2 read at the top-left corner samples the cell coordinates {-1, 0}^2: outside the map is zero.
  corner = read_level(fmap, jnp.array([-1.0, -1.0]), 2)
  assert corner.shape == (2, 2, 2)
  np.testing.assert_allclose(corner[:, 0], 0.0)
  np.testing.assert_allclose(corner[0, :], 0.0)
  np.testing.assert_allclose(corner[1, 1], fmap[0, 0], rtol=1e-6)


def test_greedy_decode_stops_at_eos(model, params, data):
  images, _ = data
  dec = jax.jit(jax.vmap(lambda im: rollout_lib.greedy_decode(params, im, model=model, max_len=T)))(images)
  chex.assert_shape(dec.tokens, (2, T))
  chex.assert_shape(dec.locations, (2, T, 2))
  tokens = np.asarray(dec.tokens)
  assert not np.any(tokens == vocab_lib.BOS_ID)
  for row, length in zip(tokens, np.asarray(dec.length)):
    assert np.all((row[:length] != vocab_lib.EOS_ID) & (row[:length] != vocab_lib.PAD_ID))
    if length < T:
      assert row[length] == vocab_lib.EOS_ID and np.all(row[length + 1:] == vocab_lib.PAD_ID)


def test_var_loss_is_finite_and_trains_the_baseline(model, params, data):
  # (WS-RAM's losses: test_gradient_isolation here, and the trainer's smoke test.)
  cfg = objectives_lib.ObjectiveConfig(num_samples=M, method="var", proposal="prior", baseline="learned")
  loss_fn = loss_lib.make_loss_fn(cfg, model)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, data, jax.random.PRNGKey(8))
  assert np.isfinite(loss)
  assert 1.0 <= metrics["ess"] <= M + 1e-4
  assert metrics["nll"] > 0 and metrics["bound"] <= 0
  np.testing.assert_allclose(sum(metrics[f"scale_usage_{s}"] for s in range(S)), 1.0, rtol=1e-5)
  norms = _group_norms(grads)
  assert norms["theta"] > 0
  assert norms["eta"] == 0
  assert float(jnp.sum(grads["baseline"]["kernel"] ** 2) + jnp.sum(grads["baseline"]["bias"] ** 2)) > 0
  assert metrics["baseline_mse"] > 0
