"""M glimpse trajectories of one image under a proposal, scored under the prior (paper Sec. 3, Eqns 7, 11).

For one canvas ``I`` with label ``y`` and each of M samples, `rollout` runs the attention network
(`classifier.model.AttentionModel`, whose docstring has the equations) for N glimpses::

    h_0 = initial_state(lowres(I))                       once per canvas, shared by the M samples
    for n in 0..N-1:                                     unrolled (N is static)
      p_n, q_n = heads(h2_n, y)                          prior and inference net on the top layer
      a_n      = attention.choose_action(p_n, q_n, ...)  ~ the proposal r_n, or given `actions`, or greedy
      log_p_a += log p_n(a_n);  log_q_a += log r_n(a_n)
      x_n      = extract_glimpse(I, clip(a_n.loc), a_n.scale)
      h_{n+1}  = the core's update with x_n, a_n
    log_p_y = log_softmax(classify(h1_N))[y]

so ``log_p_a + log_p_y - log_q_a`` is the log importance weight of Eqn 7.

Work done once per canvas, outside the loop and the vmap over M: padding the canvas for extraction, the low-res
input, h_0, the baseline, the label's part of the inference net and the first glimpse's heads (they read only h_0).
The first glimpse has ``h1_0 = 0``, so layer 1 skips its recurrent matmul; each later glimpse first updates layer 2
from the previous one, so no layer-2 update follows the last glimpse (nothing reads it). The loop over glimpses is
a Python loop: the compiled step has no while loop (XLA:CPU ran the loop body's matmuls 3x slower than the same
matmuls outside a loop), at the price of compile time linear in N. All random numbers of a canvas come from one
PRNG call (`actions.draw_noise` for ``[M, N]`` draws). Samples are stop-gradient'ed: gradients
reach the parameters only through the log-probabilities (and ``log_p_y``). The proposal sees the prediction
network's outputs stop-gradient'ed, so ``log_q_a``'s gradient reaches only the inference network (eta); ``log_p_a``
reaches the prior head, core, glimpse and context nets (theta), never eta.

`rollout` handles one image and vmaps over the M samples itself; the caller vmaps over the batch, e.g.::

    roll = functools.partial(rollout, model=model, proposal=proposals.prior, num_glimpses=4, num_samples=5)
    traj = jax.vmap(roll, in_axes=(None, 0, 0, 0))(params, canvases, labels, keys)   # fields [B, M, ...]
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import attention
from wsram_jax import glimpse as glimpse_lib
from wsram_jax import proposals as proposals_lib
from wsram_jax.actions import Action
from wsram_jax.classifier import model as model_lib

__all__ = ["ClassifierTrajectory", "rollout"]


@chex.dataclass(frozen=True)
class ClassifierTrajectory(attention.Trajectory):
  """An `attention.Trajectory` of the classifier (N glimpses), with the class logits.

  Attributes:
    logits: ``[M, C]`` class logits after the last glimpse.
  """
  logits: chex.Array


def rollout(params, canvas: jax.Array, label: jax.Array, key: jax.Array, *, model: model_lib.AttentionModel,
            proposal: proposals_lib.Proposal, num_glimpses: int, num_samples: int,
            actions: Optional[Action] = None, greedy: bool = False,
            patch_mask: Optional[jax.Array] = None) -> ClassifierTrajectory:
  """Samples (or scores) ``num_samples`` glimpse sequences of one image; see the module docstring.

  Args:
    params: the model's ``'params'`` collection (`model_lib.init_params`).
    canvas: ``[H, W, C]`` float image.
    label: ``[]`` int class label y.
    key: PRNG key (unused when ``actions`` is given or ``greedy``).
    model: the `AttentionModel` (static).
    proposal: a `proposals.Proposal` (static).
    num_glimpses: N (static).
    num_samples: M (static).
    actions: optional ``Action(loc [M, N, 2], scale [M, N])`` to score instead of sampling (teacher forcing):
      the trajectory then takes exactly these glimpses and reports their log-probabilities.
    greedy: take `actions.mode` of the proposal at every glimpse instead of sampling (evaluation; every m is then
      identical).
    patch_mask: optional ``[N]`` factors for the glimpses' patches (a measurement, not part of the model): 0 at n
      replaces glimpse n's patch by zeros, e.g. with the greedy ``actions`` given, to see how much the classifier
      uses that glimpse (`classifier.train`'s glimpse ablation).

  Returns:
    A `ClassifierTrajectory` with leading axis M.
  """
  chex.assert_rank(canvas, 3)
  chex.assert_rank(label, 0)
  m_, n_ = num_samples, num_glimpses
  if actions is not None:
    chex.assert_shape(actions.loc, (m_, n_, 2))
    chex.assert_shape(actions.scale, (m_, n_))
  size, num_scales = model.glimpse_size, model.num_scales
  variables = {"params": params}
  canvas = jnp.asarray(canvas, jnp.float32)
  label = jnp.asarray(label, jnp.int32)

  def net(method, *args, **kwargs):  # one of the model's equations (`AttentionModel`), on these parameters
    return model.apply(variables, *args, method=method, **kwargs)

  # Once per canvas (outside the loop and the vmap over M): padding, low-res input, initial state, baseline, the
  # label's rows of the inference MLP, and the heads of the first glimpse, which read only the initial state.
  prepared = glimpse_lib.prepare_canvas(canvas, size=size, num_scales=num_scales)
  hw = canvas.shape[:2]
  state0 = net(model_lib.AttentionModel.initial_state, glimpse_lib.lowres(canvas, model.lowres_size))
  baseline = net(model_lib.AttentionModel.baseline, state0.h2)
  label_rows = net(model_lib.AttentionModel.label_rows, label)
  heads0, top0 = net(model_lib.AttentionModel.heads, state0.h2, label_rows, recurrent=n_ > 1)

  def glimpse_step(h2, heads, recurrent1, n, noise_n, given_n):
    """Glimpse n from the heads on h2_n: choose a_n, take x_n, update layer 1 (layer 2 is updated lazily)."""
    record = attention.choose_action(heads, proposal, h=h2, label=label, step=n, noise=noise_n, given=given_n,
                                     greedy=greedy)
    patch = glimpse_lib.extract_prepared(prepared, record.location, record.action.scale, size=size,
                                         num_scales=num_scales, canvas_hw=hw)
    if patch_mask is not None:
      patch = patch * patch_mask[n]
    return net(model_lib.AttentionModel.glimpse_update, patch, record.action, recurrent1), record

  def one_sample(noise, given):
    at = lambda n: jax.tree_util.tree_map(lambda x: x[n], (noise, given))
    # Glimpse 0: its heads are shared by the M samples and h1_0 = 0 (no recurrent term). Each later glimpse first
    # updates layer 2 from the previous one; no layer-2 update after the last glimpse (nothing reads it).
    h1, record = glimpse_step(state0.h2, heads0, None, jnp.int32(0), *at(0))
    records, top = [record], top0
    for n in range(1, n_):  # N is small and static: unrolled (no loop in the compiled step)
      core2_in, recurrent1 = net(model_lib.AttentionModel.bottom_input, h1)
      h2 = net(model_lib.AttentionModel.layer2, core2_in, top)
      heads, top = net(model_lib.AttentionModel.heads, h2, label_rows, recurrent=n < n_ - 1)
      h1, record = glimpse_step(h2, heads, recurrent1, jnp.int32(n), *at(n))
      records.append(record)
    records = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *records)
    logits = net(model_lib.AttentionModel.classify, h1)
    log_p_y = jax.nn.log_softmax(logits)[label]
    return records, logits, log_p_y

  # All the randomness of a canvas in one PRNG call ([M, N] draws), not one per glimpse.
  noise = None if (actions is not None or greedy) else actions_lib.draw_noise(key, (m_, n_))
  records, logits, log_p_y = jax.vmap(one_sample, axis_size=m_)(noise, actions)
  return ClassifierTrajectory(logits=logits, **attention.trajectory_fields(records, log_p_y=log_p_y,
                                                                           baseline=baseline))
