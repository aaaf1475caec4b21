"""M glimpse trajectories of one image under a proposal, scored under the prior (paper Sec. 3, Eqns 7, 11).

For one canvas ``I`` with label ``y`` and each of M samples, `rollout` runs the attention model for N glimpses::

    h_0 = init_state(lowres(I))                          once per canvas, shared by the M samples
    for n in 0..N-1:                                     unrolled (N is static)
      p_n, q_n = heads(h_n, y)                           prior and inference net on the top layer
      r_n      = proposal(ProposalContext(p_n, q_n, ...))
      a_n      ~ r_n                                     (or given `actions`, or `mode(r_n)` when greedy)
      log_p_a += log p_n(a_n);  log_q_a += log r_n(a_n)
      x_n      = extract_glimpse(I, clip(a_n.loc), a_n.scale)
      h_{n+1}  = step(h_n, x_n, a_n)
    log_p_y = log_softmax(classify(h_N))[y]

so ``log_p_a + log_p_y - log_q_a`` is the log importance weight of Eqn 7.

Work done once per canvas, outside the loop and the vmap over M: padding the canvas for extraction, the low-res
input, h_0, the baseline, the label's part of the inference net and the first glimpse's heads (they read only h_0).
The first glimpse has ``h1_0 = 0``, so layer 1 skips its recurrent matmul; each later glimpse first updates layer 2
from the previous one, so no layer-2 update follows the last glimpse (nothing reads it). The loop over glimpses is
a Python loop: the compiled step has no while loop (XLA:CPU ran the loop body's matmuls 3x slower than the same
matmuls outside a loop), at the price of compile time linear in N. The networks run in their fused form
(`networks.fuse`): layers that read the same state share one matmul. All random numbers of a canvas come from one
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
from wsram_jax import glimpse as glimpse_lib
from wsram_jax import networks
from wsram_jax import proposals as proposals_lib
from wsram_jax.actions import Action

__all__ = ["Trajectory", "rollout"]


@chex.dataclass(frozen=True)
class Trajectory:
  """M trajectories of N glimpses of one image (a caller's vmap over B prepends ``B`` to every shape).

  Attributes:
    actions: the actions as sampled (locations unclipped): ``Action(loc [M, N, 2] float32, scale [M, N] int32)``.
    log_p_a: ``[M]`` log p(a | I; theta) = sum_n log prior_n(a_n), differentiable w.r.t. theta.
    log_q_a: ``[M]`` log q(a | y, I) = sum_n log proposal_n(a_n), differentiable w.r.t. eta only.
    log_inference_a: ``[M]`` sum_n log inference_n(a_n), the inference network's own log-density of the actions,
      whatever the proposal (equals log_q_a for `proposals.inference_network`; e.g. for a wake-q update with the
      prior or a tempered proposal). Costs nothing when unused under jit.
    log_p_y: ``[M]`` log p(y | a, I; theta).
    logits: ``[M, C]`` class logits after the last glimpse.
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
  logits: chex.Array
  entropy: chex.Array
  prior_scale_probs: chex.Array
  prior_loc_mean: chex.Array
  locations: chex.Array
  scales: chex.Array
  baseline: chex.Array


def rollout(params, canvas: jax.Array, label: jax.Array, key: jax.Array, *, model: networks.AttentionModel,
            proposal: proposals_lib.Proposal, num_glimpses: int, num_samples: int,
            actions: Optional[Action] = None, greedy: bool = False) -> Trajectory:
  """Samples (or scores) ``num_samples`` glimpse sequences of one image; see the module docstring.

  Args:
    params: the model's ``'params'`` collection (`networks.init_params`).
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

  Returns:
    A `Trajectory` with leading axis M.
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

  # Once per canvas (outside the loop and the vmap over M): the fused parameters (unbatched under the caller's
  # vmap, so built once), padding, low-res input, initial state, baseline, the label's rows of the inference MLP,
  # and the heads of the first glimpse, which read only the initial state.
  fused = networks.fuse(model, params)
  prepared = glimpse_lib.prepare_canvas(canvas, size=size, num_scales=num_scales)
  hw = canvas.shape[:2]
  state0 = model.apply(variables, glimpse_lib.lowres(canvas, model.lowres_size), method=model.init_state)
  baseline = model.apply(variables, state0, method=model.baseline)
  label_rows = networks.fused_label_rows(fused, label)

  def heads_and_recurrent(h2, last):
    """The heads on h2_n and, unless n is the last glimpse, core2's recurrent term for h2_{n+1}."""
    prior, recurrent = networks.fused_top(model, fused, h2, recurrent=not last)
    return networks.Heads(prior=prior, inference=networks.fused_inference(model, fused, h2, label_rows)), recurrent

  heads0, top0 = heads_and_recurrent(state0.h2, n_ == 1)

  def glimpse_step(h2, heads, recurrent1, n, noise_n, given_n):
    """Glimpse n from the heads on h2_n: choose a_n, take x_n, update layer 1 (layer 2 is updated lazily)."""
    ctx = proposals_lib.ProposalContext(prior=actions_lib.stop_gradient(heads.prior), inference=heads.inference,
                                        h=jax.lax.stop_gradient(h2), label=label, step=n)
    dist = proposal(ctx)
    if given_n is not None:
      action = jax.lax.stop_gradient(Action(loc=jnp.asarray(given_n.loc, jnp.float32),
                                            scale=jnp.asarray(given_n.scale, jnp.int32)))
    elif greedy:
      action = actions_lib.mode(dist)
    else:
      action = actions_lib.sample_from_noise(dist, noise_n)
    loc = jnp.clip(action.loc, -1.0, 1.0)
    patch = glimpse_lib.extract_prepared(prepared, loc, action.scale, size=size, num_scales=num_scales,
                                         canvas_hw=hw)
    h1 = networks.fused_glimpse_update(model, fused, patch, action, recurrent1)
    out = dict(
        action=action,
        log_p=actions_lib.log_prob(heads.prior, action),
        log_q=actions_lib.log_prob(dist, action),
        log_r=actions_lib.log_prob(heads.inference, action),
        entropy=actions_lib.entropy(heads.prior),
        scale_probs=actions_lib.scale_probs(heads.prior),
        loc_mean=actions_lib.mean_location(heads.prior),
        location=loc,
    )
    return h1, out

  def one_sample(noise, given):
    at = lambda n: jax.tree_util.tree_map(lambda x: x[n], (noise, given))
    # Glimpse 0: its heads are shared by the M samples and h1_0 = 0 (no recurrent term). Each later glimpse first
    # updates layer 2 from the previous one; no layer-2 update after the last glimpse (nothing reads it).
    h1, out = glimpse_step(state0.h2, heads0, None, jnp.int32(0), *at(0))
    outs, top = [out], top0
    for n in range(1, n_):  # N is small and static: unrolled (no loop in the compiled step)
      core2_in, recurrent1 = networks.fused_bottom_input(fused, h1)
      h2 = networks.relu(core2_in + top)  # h2_n = relu(W2 [h1_n, h2_{n-1}] + b2)
      heads, top = heads_and_recurrent(h2, n == n_ - 1)
      h1, out = glimpse_step(h2, heads, recurrent1, jnp.int32(n), *at(n))
      outs.append(out)
    outs = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)
    logits = model.apply(variables, networks.CoreState(h1=h1, h2=state0.h2), method=model.classify)
    log_p_y = jax.nn.log_softmax(logits)[label]
    return outs, logits, log_p_y

  # All the randomness of a canvas in one PRNG call ([M, N] draws), not one per glimpse.
  noise = None if (actions is not None or greedy) else actions_lib.draw_noise(key, (m_, n_))
  outs, logits, log_p_y = jax.vmap(one_sample, axis_size=m_)(noise, actions)
  return Trajectory(
      actions=outs["action"],
      log_p_a=jnp.sum(outs["log_p"], axis=1),
      log_q_a=jnp.sum(outs["log_q"], axis=1),
      log_inference_a=jnp.sum(outs["log_r"], axis=1),
      log_p_y=log_p_y,
      logits=logits,
      entropy=outs["entropy"],
      prior_scale_probs=outs["scale_probs"],
      prior_loc_mean=outs["loc_mean"],
      locations=outs["location"],
      scales=outs["action"].scale,
      baseline=jnp.broadcast_to(baseline, (m_,)),
  )
