"""The attention model's modules: shapes, initialisation, information flow, theta/eta split."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wsram_jax import actions, networks

# A learned location std here (the rollout tests use the fixed one).
MODEL = networks.AttentionModel(num_classes=3, glimpse_size=4, num_scales=2, lowres_size=4, hidden_size=16,
                                glimpse_hidden=8, inference_hidden=12, learn_loc_std=True, loc_std=0.2)


@pytest.fixture(scope="module")
def params():
  return networks.init_params(MODEL, jax.random.key(0))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  lowres = jnp.asarray(rng.uniform(size=(4, 4, 1)), jnp.float32)
  patch = jnp.asarray(rng.uniform(size=(4, 4, 1)), jnp.float32)
  action = actions.Action(loc=jnp.asarray([0.2, -0.3]), scale=jnp.asarray(1, jnp.int32))
  return lowres, patch, action


@functools.partial(jax.jit, static_argnames=("method",))
def _apply(params, *args, method):
  if method == "bottom_first":
    return MODEL.apply({"params": params}, *args, first=True, method=MODEL.bottom)
  return MODEL.apply({"params": params}, *args, method=getattr(MODEL, method))


def test_shapes(params):
  dims = chex.Dimensions(D=16, C=3, S=2, K=1)
  lowres, patch, action = _inputs()
  state = _apply(params, lowres, method="init_state")
  chex.assert_shape([state.h1, state.h2], [dims["D"], dims["D"]])
  heads = _apply(params, state, jnp.asarray(1), method="heads")
  for dist in (heads.prior, heads.inference):
    chex.assert_shape(dist.mix_logits, dims["K"])
    chex.assert_shape(dist.loc_mean, dims["K"] + (2,))
    chex.assert_shape(dist.scale_logits, dims["KS"])
  state = _apply(params, state, patch, action, method="step")
  chex.assert_shape(_apply(params, state, method="classify"), dims["C"])
  chex.assert_shape(_apply(params, state, method="baseline"), ())


def test_initialisation(params):
  d = 16
  for name in ("core1", "core2"):
    kernel = params[name]["kernel"]
    np.testing.assert_array_equal(kernel[-d:], np.eye(d))  # IRNN recurrent block
  np.testing.assert_array_equal(params["baseline"]["kernel"], 0.0)
  lowres, _, _ = _inputs()
  state = _apply(params, lowres, method="init_state")
  np.testing.assert_array_equal(state.h1, 0.0)
  heads = _apply(params, state, jnp.asarray(0), method="heads")
  np.testing.assert_allclose(jnp.exp(heads.prior.loc_log_std), MODEL.loc_std, rtol=1e-5)
  np.testing.assert_allclose(jnp.exp(heads.inference.loc_log_std), MODEL.loc_std, rtol=1e-5)
  assert np.all(np.abs(heads.prior.loc_mean) < 1.0)


def test_classifier_sees_lowres_only_through_glimpses(params):
  # Layer 1 never reads layer 2: with the same patches and actions the logits do not depend on the low-res image.
  _, patch, action = _inputs()

  def logits(lowres):
    state = _apply(params, lowres, method="init_state")
    for _ in range(3):
      state = _apply(params, state, patch, action, method="step")
    return _apply(params, state, method="classify")

  a, b = _inputs(1)[0], _inputs(2)[0]
  np.testing.assert_array_equal(logits(a), logits(b))
  np.testing.assert_array_equal(jax.grad(lambda x: logits(x).sum())(a), 0.0)


def test_inference_head_and_baseline_do_not_reach_theta(params):
  lowres, _, _ = _inputs()

  def loss(p):
    state = _apply(p, lowres, method="init_state")
    heads = _apply(p, state, jnp.asarray(2), method="heads")
    b = _apply(p, state, method="baseline")
    return jnp.sum(heads.inference.loc_mean) + jnp.sum(heads.inference.scale_logits) + b

  grads = jax.grad(loss)(params)
  labels = networks.param_labels(grads, baseline="baseline")
  for g, lab in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(labels)):
    if lab == "theta":
      np.testing.assert_array_equal(g, 0.0)
  assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads["inference"]))
  assert np.any(grads["baseline"]["kernel"] != 0)


def test_inference_head_depends_on_label(params):
  lowres, _, _ = _inputs()
  state = _apply(params, lowres, method="init_state")
  h0 = _apply(params, state, jnp.asarray(0), method="heads")
  h1 = _apply(params, state, jnp.asarray(1), method="heads")
  assert not np.allclose(h0.inference.loc_mean, h1.inference.loc_mean)
  np.testing.assert_array_equal(h0.prior.loc_mean, h1.prior.loc_mean)


def test_param_labels_and_multi_transform(params):
  labels = networks.param_labels(params)
  flat = jax.tree_util.tree_leaves_with_path(labels)
  eta = {jax.tree_util.keystr(p) for p, lab in flat if lab == "eta"}
  assert eta and all(k.startswith("['inference']") for k in eta)
  assert all(lab == "theta" for p, lab in flat if not jax.tree_util.keystr(p).startswith("['inference']"))
  assert networks.param_labels({"params": params})["params"] == labels
  assert networks.param_labels(params, baseline="b")["baseline"]["kernel"] == "b"
  opt = optax.multi_transform({"theta": optax.sgd(1.0), "eta": optax.set_to_zero()}, labels)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_array_equal(updates["inference"]["hidden"]["kernel"], 0.0)
  np.testing.assert_array_equal(updates["core1"]["kernel"], -1.0)


def test_learned_std(params):
  assert "log_std" in params["prior"] and "log_std" in params["inference"]["head"]
  lowres, _, _ = _inputs()

  def log_std(p):
    state = MODEL.apply({"params": p}, lowres, method=MODEL.init_state)
    return MODEL.apply({"params": p}, state, jnp.asarray(0), method=MODEL.heads).prior.loc_log_std.sum()

  g = jax.jit(jax.grad(log_std))(params)
  assert np.any(g["prior"]["log_std"]["bias"] != 0)


def test_activations_stay_bounded_over_glimpses():
  # Default sizes: the IRNN/He initialisation keeps the state of order one over four glimpses.
  model = networks.AttentionModel()
  p = networks.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  lowres = jnp.asarray(rng.uniform(size=(10, 10, 1)) * (rng.uniform(size=(10, 10, 1)) < 0.2), jnp.float32)

  @jax.jit
  def run(lowres, patches):
    state = model.apply({"params": p}, lowres, method=model.init_state)
    norms = []
    for patch in patches:
      action = actions.Action(loc=jnp.zeros(2), scale=jnp.asarray(1))
      state = model.apply({"params": p}, state, patch, action, method=model.step)
      norms.append(jnp.sqrt(jnp.mean(state.h1**2) + jnp.mean(state.h2**2)))
    return jnp.stack(norms)

  patches = jnp.asarray(rng.uniform(size=(4, 12, 12, 1)), jnp.float32)
  norms = np.asarray(run(lowres, patches))
  assert np.all(np.isfinite(norms)) and norms.max() < 20.0 and norms.min() > 0.01, norms


def test_step_is_bottom_then_top(params):
  lowres, patch, action = _inputs()
  state = _apply(params, lowres, method="init_state")
  full = _apply(params, state, patch, action, method="step")
  first = _apply(params, state, patch, action, method="bottom_first")  # h1 = 0: the recurrent half is skipped
  np.testing.assert_allclose(first.h1, full.h1, rtol=1e-6)
  np.testing.assert_array_equal(first.h2, state.h2)
  np.testing.assert_allclose(_apply(params, first, method="top").h2, full.h2, rtol=1e-6)
