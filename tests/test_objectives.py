"""The objective layer's trajectory metrics and VAR's nvil baseline, on hand-made batches."""
import jax
import jax.numpy as jnp
import numpy as np

from wsram_jax import actions
from wsram_jax import attention
from wsram_jax import baselines
from wsram_jax import objectives


def _trajectory(loc, loc_mean, scales, log_p_a, log_q_a, log_p_y):
  b, m, n = scales.shape
  return attention.Trajectory(
      actions=actions.Action(loc=jnp.asarray(loc, jnp.float32), scale=jnp.asarray(scales, jnp.int32)),
      log_p_a=jnp.asarray(log_p_a, jnp.float32), log_q_a=jnp.asarray(log_q_a, jnp.float32),
      log_inference_a=jnp.asarray(log_q_a, jnp.float32), log_p_y=jnp.asarray(log_p_y, jnp.float32),
      entropy=jnp.ones((b, m, n)), prior_scale_probs=jnp.full((b, m, n, 2), 0.5),
      prior_loc_mean=jnp.asarray(loc_mean, jnp.float32), locations=jnp.clip(jnp.asarray(loc), -1, 1),
      scales=jnp.asarray(scales, jnp.int32), baseline=jnp.zeros((b, m)))


def test_trajectory_metrics():
  b, m, n = 2, 2, 2
  loc = np.zeros((b, m, n, 2))
  loc[0, 0, 0] = [1.5, 0.0]  # 1 of the 8 sampled locations is outside the canvas
  loc_mean = np.zeros((b, m, n, 2))
  loc_mean[1, :, :, 0] = 0.99  # tanh^-1(0.99) = 2.65 > 2: a quarter of the coordinates are saturated
  scales = np.asarray([[[0, 1], [0, 1]], [[0, 0], [1, 1]]])
  # Image 0: equal weights (ESS 2); image 1: one sample carries all the weight (ESS 1).
  log_p_a = np.asarray([[-1.0, -1.0], [0.0, -50.0]])
  log_q_a = np.asarray([[-1.0, -1.0], [-1.0, -1.0]])
  log_p_y = np.zeros((b, m))
  out = objectives.trajectory_metrics(_trajectory(loc, loc_mean, scales, log_p_a, log_q_a, log_p_y), 2,
                                      per_glimpse=True)
  np.testing.assert_allclose(out["ess"], 1.5, rtol=1e-5)
  np.testing.assert_allclose(out["ess/min"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["ess/q90"], 1.9, rtol=1e-4)
  np.testing.assert_allclose(out["outside_canvas"], 1 / 8)
  np.testing.assert_allclose(out["loc_saturation"], 1 / 4)
  np.testing.assert_allclose(out["log_p_minus_log_q/q50"], 0.0, atol=1e-6)
  np.testing.assert_allclose([out["scale_usage_0"], out["scale_usage_1"]], [0.5, 0.5])
  np.testing.assert_allclose([out["scale_usage/g1_s0"], out["scale_usage/g2_s1"]], [0.75, 0.75])
  # A mask leaves padded steps out of the per-step metrics.
  masked = objectives.trajectory_metrics(_trajectory(loc, loc_mean, scales, log_p_a, log_q_a, log_p_y), 2,
                                         mask=jnp.asarray([[0.0, 1.0], [0.0, 1.0]]))
  np.testing.assert_allclose(masked["outside_canvas"], 0.0)
  np.testing.assert_allclose(masked["scale_usage_1"], 0.75)


def test_nvil_baseline_centres_the_learned_one_with_a_moving_average():
  """``baseline='nvil'``: the VAR signal is log p(y|a) - b(I) - c, b(I) regresses log p(y|a) - c, and the loss
  reports the residual log p(y|a) - b(I) for the moving average c to track (NVIL's centring)."""
  cfg = objectives.ObjectiveConfig(method="var", proposal="prior", baseline="nvil")
  log_p_a = jnp.asarray([[-1.0, -2.0], [-0.5, -1.5]])
  log_p_y = jnp.asarray([[-2.0, -3.0], [-1.0, -4.0]])
  learned = jnp.asarray([[0.5, 0.5], [-1.0, -1.0]])
  c = -1.5

  def loss(log_p_a, learned):
    return objectives.method_loss(cfg, log_p_a, log_p_y, log_p_a, baseline_value=c, learned_baseline=learned)

  (value, metrics), (g_a, g_b) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(log_p_a, learned)
  np.testing.assert_allclose(metrics["baseline_target"], np.mean(log_p_y - learned), rtol=1e-6)
  # Eqn 5 with b = b(I) + c: d/d log p(a^m) = -(log p(y|a^m) - b(I) - c) / (M B).
  np.testing.assert_allclose(g_a, -(log_p_y - learned - c) / 4, rtol=1e-6)
  # The regression 1/2 mean (b(I) - (log p(y|a) - c))^2 (weight 1).
  np.testing.assert_allclose(g_b, (learned - (log_p_y - c)) / 4, rtol=1e-6)
  # The estimate of -F does not depend on the baseline.
  np.testing.assert_allclose(metrics["baseline_mse"], np.mean((learned + c - log_p_y) ** 2), rtol=1e-6)
  assert np.isfinite(value)
  # With the moving average as its state; the others keep none.
  assert isinstance(objectives.baseline_transform(cfg).init(), baselines.MovingAverageState)
  learned_only = objectives.ObjectiveConfig(method="var", proposal="prior", baseline="learned")
  assert "baseline_target" not in objectives.method_loss(learned_only, log_p_a, log_p_y, log_p_a,
                                                         learned_baseline=learned)[1]
