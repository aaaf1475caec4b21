"""The classifier's attention network: what trains equals the documented equations; shapes, initialisation,
information flow, the theta/eta split."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import mnist
from wsram_jax import actions
from wsram_jax import attention
from wsram_jax import glimpse as glimpse_lib
from wsram_jax import proposals
from wsram_jax.classifier import model as networks
from wsram_jax.classifier import rollout as rollout_lib
from wsram_jax.training import config as config_lib
from wsram_jax.training import step as step_lib

# A learned location std here (the rollout tests use the fixed one).
MODEL = networks.AttentionModel(num_classes=3, glimpse_size=4, num_scales=2, lowres_size=4, hidden_size=16,
                                glimpse_hidden=8, inference_hidden=12, learn_loc_std=True, loc_std=0.2)
Net = networks.AttentionModel


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
  return MODEL.apply({"params": params}, *args, method=getattr(Net, method))


def _heads(params, h2, label):
  return _apply(params, h2, _apply(params, jnp.asarray(label), method="label_rows"), method="heads")[0]


# ---------------------------------------------------------------------------------------------------------------
# The trained computation is the module docstring's equations.


def _reference(params, model, canvas, label, given):
  """The equations of `classifier.model`'s docstring, written out on the raw parameter tree for one canvas and
  the glimpse sequences ``given`` (``Action(loc [M, N, 2], scale [M, N])``): (log_p_a [M], log_inference_a [M],
  log_p_y [M], logits [M, C], b(I))."""
  sg, relu = jax.lax.stop_gradient, jax.nn.relu
  dense = lambda layer, x: x @ layer["kernel"] + layer["bias"]
  kw = dict(num_scales=model.num_scales, loc_std=model.loc_std, learn_loc_std=model.learn_loc_std,
            min_loc_std=model.min_loc_std, max_loc_std=model.max_loc_std)
  outputs = ("loc", "scale") + (("log_std",) if model.learn_loc_std else ())
  head = lambda tree, h: attention.head_distribution(jnp.concatenate([dense(tree[k], h) for k in outputs]), **kw)
  p = params
  h2_0 = relu(dense(p["context"], glimpse_lib.lowres(canvas, model.lowres_size).reshape(-1)))
  onehot_y = jax.nn.one_hot(label, model.num_classes)

  def one(loc, scale):
    h1, h2 = jnp.zeros(model.hidden_size), h2_0
    log_p = log_q = 0.0
    for n in range(loc.shape[0]):
      a = actions.Action(loc=loc[n], scale=scale[n])
      prior = head(p["prior"], h2)
      q = head(p["inference"]["head"], relu(dense(p["inference"]["hidden"], jnp.concatenate([sg(h2), onehot_y]))))
      log_p += actions.log_prob(prior, a)
      log_q += actions.log_prob(q, a)
      where_loc = jnp.clip(a.loc, -1.0, 1.0)
      x = glimpse_lib.extract_glimpse(canvas, where_loc, a.scale, size=model.glimpse_size,
                                      num_scales=model.num_scales)
      g = jnp.concatenate([relu(dense(p["glimpse_what"], x.reshape(-1))),
                           relu(dense(p["glimpse_where"], jnp.concatenate(
                               [where_loc, jax.nn.one_hot(a.scale, model.num_scales)])))])
      h1 = relu(dense(p["core1"], jnp.concatenate([g, h1])))
      if n < loc.shape[0] - 1:
        h2 = relu(dense(p["core2"], jnp.concatenate([h1, h2])))
    logits = dense(p["classifier"], h1)
    return log_p, log_q, jax.nn.log_softmax(logits)[label], logits

  log_p, log_q, log_p_y, logits = jax.vmap(one)(given.loc, given.scale)
  return log_p, log_q, log_p_y, logits, dense(p["baseline"], sg(h2_0))[0]


@pytest.mark.parametrize("learn_loc_std, num_glimpses", [(True, 3), (False, 1)])
def test_trained_computation_equals_the_documented_equations(learn_loc_std, num_glimpses):
  model = networks.AttentionModel(num_classes=3, glimpse_size=4, num_scales=2, lowres_size=4, hidden_size=16,
                                  glimpse_hidden=8, inference_hidden=12, learn_loc_std=learn_loc_std,
                                  head_init_scale=1.0)
  rng = np.random.default_rng(3)
  # Random parameters (not the initial ones, whose identity blocks and zero baseline would hide mistakes).
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, jnp.float32),
                                  networks.init_params(model, jax.random.key(1)))
  canvas = jnp.asarray(rng.uniform(size=(16, 16, 1)), jnp.float32)
  m_ = 3
  given = actions.Action(loc=jnp.asarray(rng.normal(size=(m_, num_glimpses, 2)) * 0.7, jnp.float32),
                         scale=jnp.asarray(rng.integers(0, 2, size=(m_, num_glimpses)), jnp.int32))
  label = jnp.asarray(2)

  def trained(p):
    t = rollout_lib.rollout(p, canvas, label, None, model=model, proposal=proposals.inference_network,
                            num_glimpses=num_glimpses, num_samples=m_, actions=given)
    return t.log_p_a, t.log_inference_a, t.log_p_y, t.logits, t.baseline[0]

  def reference(p):
    return _reference(p, model, canvas, label, given)

  got, want = jax.jit(trained)(params), jax.jit(reference)(params)
  for name, g, w in zip(("log_p_a", "log_inference_a", "log_p_y", "logits", "baseline"), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)

  weights = (1.0, 0.7, 1.3, 0.2, 0.5)
  scalar = lambda f: lambda p: sum(w * jnp.sum(x) for w, x in zip(weights, f(p)))
  g_trained = jax.jit(jax.grad(scalar(trained)))(params)
  g_reference = jax.jit(jax.grad(scalar(reference)))(params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_trained)[0], jax.tree_util.tree_leaves(g_reference)):
    scale = float(jnp.max(jnp.abs(b))) + 1e-6
    # float32 rounding: with these random parameters some gradients are sums of terms of 1e2-1e3 that cancel (XLA's
    # fusion choices move them by up to 2e-4 relative); a wrong derivation is off by far more.
    np.testing.assert_allclose(a, b, rtol=5e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(g_trained["inference"]))


# ---------------------------------------------------------------------------------------------------------------
# Shapes, initialisation, information flow.


def test_shapes(params):
  dims = chex.Dimensions(D=16, C=3, S=2, K=1)
  lowres, patch, action = _inputs()
  state = _apply(params, lowres, method="initial_state")
  chex.assert_shape([state.h1, state.h2], [dims["D"], dims["D"]])
  heads = _heads(params, state.h2, 1)
  for dist in (heads.prior, heads.inference):
    chex.assert_shape(dist.mix_logits, dims["K"])
    chex.assert_shape(dist.loc_mean, dims["K"] + (2,))
    chex.assert_shape(dist.scale_logits, dims["KS"])
  state = _apply(params, state, patch, action, method="step")
  chex.assert_shape(_apply(params, state.h1, method="classify"), dims["C"])
  chex.assert_shape(_apply(params, state.h2, method="baseline"), ())


def test_initialisation(params):
  d = 16
  for name in ("core1", "core2"):
    kernel = params[name]["kernel"]
    np.testing.assert_array_equal(kernel[-d:], np.eye(d))  # IRNN recurrent block
  np.testing.assert_array_equal(params["baseline"]["kernel"], 0.0)
  lowres, _, _ = _inputs()
  state = _apply(params, lowres, method="initial_state")
  np.testing.assert_array_equal(state.h1, 0.0)
  heads = _heads(params, state.h2, 0)
  np.testing.assert_allclose(jnp.exp(heads.prior.loc_log_std), MODEL.loc_std, rtol=1e-5)
  np.testing.assert_allclose(jnp.exp(heads.inference.loc_log_std), MODEL.loc_std, rtol=1e-5)
  assert np.all(np.abs(heads.prior.loc_mean) < 1.0)


def test_classifier_sees_lowres_only_through_glimpses(params):
  # Layer 1 never reads layer 2: with the same patches and actions the logits do not depend on the low-res image.
  _, patch, action = _inputs()

  def logits(lowres):
    state = _apply(params, lowres, method="initial_state")
    for _ in range(3):
      state = _apply(params, state, patch, action, method="step")
    return _apply(params, state.h1, method="classify")

  a, b = _inputs(1)[0], _inputs(2)[0]
  np.testing.assert_array_equal(logits(a), logits(b))
  np.testing.assert_array_equal(jax.grad(lambda x: logits(x).sum())(a), 0.0)


def test_inference_head_and_baseline_do_not_reach_theta(params):
  lowres, _, _ = _inputs()

  def loss(p):
    state = _apply(p, lowres, method="initial_state")
    heads = _heads(p, state.h2, 2)
    b = _apply(p, state.h2, method="baseline")
    return jnp.sum(heads.inference.loc_mean) + jnp.sum(heads.inference.scale_logits) + b

  grads = jax.grad(loss)(params)
  labels = attention.param_labels(grads, baseline="baseline")
  for g, lab in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(labels)):
    if lab == "theta":
      np.testing.assert_array_equal(g, 0.0)
  assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads["inference"]))
  assert np.any(grads["baseline"]["kernel"] != 0)


def test_inference_head_depends_on_label(params):
  lowres, _, _ = _inputs()
  state = _apply(params, lowres, method="initial_state")
  h0, h1 = _heads(params, state.h2, 0), _heads(params, state.h2, 1)
  assert not np.allclose(h0.inference.loc_mean, h1.inference.loc_mean)
  np.testing.assert_array_equal(h0.prior.loc_mean, h1.prior.loc_mean)


def test_param_labels_and_multi_transform(params):
  labels = attention.param_labels(params)
  flat = jax.tree_util.tree_leaves_with_path(labels)
  eta = {jax.tree_util.keystr(p) for p, lab in flat if lab == "eta"}
  assert eta and all(k.startswith("['inference']") for k in eta)
  assert all(lab == "theta" for p, lab in flat if not jax.tree_util.keystr(p).startswith("['inference']"))
  assert attention.param_labels({"params": params})["params"] == labels
  assert attention.param_labels(params, baseline="b")["baseline"]["kernel"] == "b"
  opt = optax.multi_transform({"theta": optax.sgd(1.0), "eta": optax.set_to_zero()}, labels)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_array_equal(updates["inference"]["hidden"]["kernel"], 0.0)
  np.testing.assert_array_equal(updates["core1"]["kernel"], -1.0)


def _constant_rate_config():
  """The default config with Adam at a constant rate (its own schedule off)."""
  return config_lib.apply_overrides(mnist.get_config("wsram_q_cv"), mnist.schedule_values("constant", 0))


def test_policy_lr_scale_steps_only_the_policies(params):
  # make_optimizer with policy_lr_scale k: Adam's step times k for the prior's head and q, unchanged elsewhere.
  mask = attention.policy_mask(params)
  assert set(mask) == set(params)
  assert all(jax.tree_util.tree_leaves(mask["prior"])) and all(jax.tree_util.tree_leaves(mask["inference"]))
  assert not any(jax.tree_util.tree_leaves({k: v for k, v in mask.items() if k not in ("prior", "inference")}))
  assert attention.policy_mask({"params": params})["params"] == mask
  config = _constant_rate_config()
  config.update({"learning_rate": 1e-3, "grad_clip_norm": 0.0, "policy_lr_scale": 0.25})
  grads = jax.tree_util.tree_map(jnp.ones_like, params)

  def first_update(config):
    tx = step_lib.make_optimizer(config)
    return tx.update(grads, tx.init(params), params)[0]

  scaled = first_update(config)
  config.policy_lr_scale = 1.0
  plain = first_update(config)
  np.testing.assert_allclose(scaled["prior"]["loc"]["kernel"], 0.25 * plain["prior"]["loc"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(scaled["inference"]["hidden"]["kernel"], 0.25 * plain["inference"]["hidden"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_array_equal(scaled["core1"]["kernel"], plain["core1"]["kernel"])
  np.testing.assert_allclose(plain["core1"]["kernel"], -1e-3, rtol=1e-3)


def _first_steps_under_constant_gradients(config, params, n):
  """One weight's first `n` updates under `make_optimizer(config)` with all gradients 1: -lr times the schedule."""
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  tx = step_lib.make_optimizer(config)
  opt_state, steps = tx.init(params), []
  for _ in range(n):
    updates, opt_state = tx.update(grads, opt_state, params)
    steps.append(float(updates["core1"]["kernel"][0, 0]))
  return steps


def test_warmup_scales_the_first_updates_then_rises_to_the_full_rate(params):
  # Constant gradients make every Adam step -lr (bias-corrected m / sqrt(v) = 1), so each update shows the
  # multiplier: start for hold_steps updates, then linear to 1 over ramp_steps.
  config = _constant_rate_config()
  config.update({"learning_rate": 1e-3, "grad_clip_norm": 0.0})
  config.warmup.update({"start": 0.25, "hold_steps": 2, "ramp_steps": 2})
  steps = _first_steps_under_constant_gradients(config, params, 6)
  np.testing.assert_allclose(steps, [-2.5e-4, -2.5e-4, -2.5e-4, -6.25e-4, -1e-3, -1e-3], rtol=1e-4)
  config.warmup.start = 1.0  # off: plain Adam, the optimiser state of a run without warm-up
  assert jax.tree_util.tree_structure(step_lib.make_optimizer(config).init(params)) == jax.tree_util.tree_structure(
      optax.adam(1e-3).init(params))


def test_decay_lowers_the_rate_linearly_and_multiplies_the_warmup(params):
  # As above: each update is -lr times the multiplier. Warm-up from 0.5 rising to 1 by update 4 (0.5, 0.625, 0.75,
  # 0.875, 1, 1), decay from 1 at update 2 to 0.25 at update 4 (1, 1, 1, 0.625, 0.25, 0.25): their product.
  config = _constant_rate_config()
  config.update({"learning_rate": 1e-3, "grad_clip_norm": 0.0})
  config.warmup.update({"start": 0.5, "hold_steps": 0, "ramp_steps": 4})
  config.decay.update({"begin": 2, "steps": 2, "end": 0.25})
  steps = _first_steps_under_constant_gradients(config, params, 6)
  np.testing.assert_allclose(steps, [-5e-4, -6.25e-4, -7.5e-4, -5.46875e-4, -2.5e-4, -2.5e-4], rtol=1e-4)


def test_learned_std(params):
  assert "log_std" in params["prior"] and "log_std" in params["inference"]["head"]
  lowres, _, _ = _inputs()

  def log_std(p):
    state = MODEL.apply({"params": p}, lowres, method=Net.initial_state)
    label_rows = MODEL.apply({"params": p}, jnp.asarray(0), method=Net.label_rows)
    return MODEL.apply({"params": p}, state.h2, label_rows, method=Net.heads)[0].prior.loc_log_std.sum()

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
    state = model.apply({"params": p}, lowres, method=Net.initial_state)
    norms = []
    for patch in patches:
      action = actions.Action(loc=jnp.zeros(2), scale=jnp.asarray(1))
      state = model.apply({"params": p}, state, patch, action, method=Net.step)
      norms.append(jnp.sqrt(jnp.mean(state.h1**2) + jnp.mean(state.h2**2)))
    return jnp.stack(norms)

  patches = jnp.asarray(rng.uniform(size=(4, 12, 12, 1)), jnp.float32)
  norms = np.asarray(run(lowres, patches))
  assert np.all(np.isfinite(norms)) and norms.max() < 20.0 and norms.min() > 0.01, norms
