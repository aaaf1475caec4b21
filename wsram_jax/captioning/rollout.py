"""M glimpse sequences of one image and its caption under a proposal, scored under the prior (Eqns 7, 11).

For one image ``I`` with caption ids ``y [T + 1]`` (`vocab.py` convention) and each of M samples, `rollout`
runs the captioner teacher-forced over the T words::

    enc = encode(I)                                      once per image, shared by the M samples
    for t in 0..T-1:                                     lax.scan
      p_t, q_t = heads(carry, y_t, context, q word)      prior and inference net
      a_t      = attention.choose_action(p_t, q_t, ...)  ~ proposal r_t (label = the q word), or given
                                                         `actions`, or `mode(r_t)` when greedy
      carry, logits_t = step(carry, y_t, glimpse(enc, a_t))
      m_t      = [y_{t+1} != <pad>]                      steps after <eos> count nowhere
      log_p_a += m_t log p_t(a_t);  log_q_a += m_t log r_t(a_t);  log_p_y += m_t log softmax(logits_t)[y_{t+1}]

so ``log_p_a + log_p_y - log_q_a`` is the log importance weight of Eqn 7 and the same estimator functions
(`wsram_jax.estimators`, through `wsram_jax.objectives.method_loss`) train it. The masks make the model take no
glimpse after <eos>: a padded step changes none of the three log-probabilities.

Gradients follow `wsram_jax.classifier.rollout`: samples are stop-gradient'ed; the proposal sees the prior
stop-gradient'ed, so log_q_a reaches only the inference network (eta); log_p_a and log_p_y reach theta only.

`rollout` handles one image and vmaps over the M samples itself; the caller vmaps over the batch
(`captioning.loss.batched_rollout`). `greedy_decode` generates a caption from the prior's mode glimpses.
"""
from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import attention
from wsram_jax import proposals as proposals_lib
from wsram_jax.actions import Action
from wsram_jax.captioning import model as model_lib
from wsram_jax.captioning import vocab as vocab_lib

__all__ = ["CaptionTrajectory", "Decoded", "rollout", "greedy_decode"]


@chex.dataclass(frozen=True)
class CaptionTrajectory(attention.Trajectory):
  """An `attention.Trajectory` of the captioner, teacher-forced on a caption: its N glimpses are the T words'
  (one before each word), and every per-sample sum counts only the unmasked steps (a caller's vmap prepends
  ``B``).

  Attributes (beyond `attention.Trajectory`'s, with N = T):
    word_log_probs: ``[M, T]`` the per-word terms of log_p_y (0 where masked); log_p_y = their sum.
    mask: ``[T]`` float32, 1 where the step's target is a word or <eos>.
  """
  word_log_probs: chex.Array
  mask: chex.Array


def rollout(params, image: jax.Array, caption: jax.Array, key: jax.Array, *, model: model_lib.CaptionModel,
            proposal: proposals_lib.Proposal, num_samples: int, q_word: str = "target",
            actions: Optional[Action] = None, greedy: bool = False) -> CaptionTrajectory:
  """Samples (or scores) ``num_samples`` glimpse sequences for one image and caption; see the module docstring.

  Args:
    params: the model's ``'params'``.
    image: ``[H, W, C]`` float.
    caption: ``[T + 1]`` int ids, <bos> first.
    key: PRNG key (unused, and may be None, with ``actions`` or ``greedy``).
    model: the `CaptionModel` (static).
    proposal: a `proposals.Proposal` (static); its context's ``label`` is the word q sees.
    num_samples: M (static).
    q_word: ``'target'`` (q sees y_{t+1}, the word step t predicts) or ``'previous'`` (y_t).
    actions: optional ``Action(loc [M, T, 2], scale [M, T])`` to score instead of sampling.
    greedy: take the proposal's mode at every step (every m identical).

  Returns:
    A `CaptionTrajectory` with leading axis M.
  """
  chex.assert_rank([image, caption], [3, 1])
  if q_word not in model_lib.Q_WORDS:
    raise ValueError(f"q_word must be one of {model_lib.Q_WORDS}, got {q_word!r}.")
  m_, t_ = num_samples, caption.shape[0] - 1
  if actions is not None:
    chex.assert_shape(actions.loc, (m_, t_, 2))
    chex.assert_shape(actions.scale, (m_, t_))
  variables = {"params": params}
  if key is None:  # scoring given actions, or greedy: no randomness is used
    key = jax.random.PRNGKey(0)
  caption = jnp.asarray(caption, jnp.int32)
  prev, target = caption[:-1], caption[1:]
  mask = (target != vocab_lib.PAD_ID).astype(jnp.float32)
  seen = target if q_word == "target" else prev

  enc = model.apply(variables, jnp.asarray(image, jnp.float32), method=model.encode)
  baseline = model.apply(variables, enc, method=model.baseline)
  carry0 = model.apply(variables, method=model.initial_carry)

  def word_step(carry, x):
    t, step_key, prev_t, target_t, seen_t, mask_t, given_t = x
    heads = model.apply(variables, carry, prev_t, enc.context, seen_t, method=model.heads)
    record = attention.choose_action(heads, proposal, h=carry.h, label=seen_t, step=t,
                                     noise=actions_lib.draw_noise(step_key), given=given_t, greedy=greedy)
    g = model.apply(variables, enc, record.action, method=model.glimpse)
    carry, logits = model.apply(variables, carry, prev_t, g, method=model.step)
    return carry, (record, mask_t * jax.nn.log_softmax(logits)[target_t])

  def one_sample(sample_key, given):
    xs = (jnp.arange(t_, dtype=jnp.int32), jax.random.split(sample_key, t_), prev, target, seen, mask, given)
    _, outs = jax.lax.scan(word_step, carry0, xs)
    return outs

  records, word_log_probs = jax.vmap(one_sample)(jax.random.split(key, m_), actions)
  return CaptionTrajectory(word_log_probs=word_log_probs, mask=mask,
                           **attention.trajectory_fields(records, log_p_y=jnp.sum(word_log_probs, axis=1),
                                                         baseline=baseline, mask=mask))


@chex.dataclass(frozen=True)
class Decoded:
  """A generated caption (a caller's vmap prepends ``B``).

  Attributes:
    tokens: ``[T]`` int32 generated ids (the first <eos> and everything after it: <eos>/<pad>).
    locations: ``[T, 2]`` the clipped location read before each generated token.
    scales: ``[T]`` int32 the level read before each token.
    length: ``[]`` int32 the number of words before <eos>.
  """
  tokens: chex.Array
  locations: chex.Array
  scales: chex.Array
  length: chex.Array


def greedy_decode(params, image: jax.Array, *, model: model_lib.CaptionModel, max_len: int) -> Decoded:
  """Generates a caption for one image: at every step the prior's mode glimpse (location mean, most probable
  level), then the most probable word, fed back as the next input; ``max_len`` steps (static), cut at <eos>."""
  chex.assert_rank(image, 3)
  variables = {"params": params}
  enc = model.apply(variables, jnp.asarray(image, jnp.float32), method=model.encode)
  carry0 = model.apply(variables, method=model.initial_carry)

  def word_step(state, _):
    carry, prev, done = state
    dist = model.apply(variables, carry, prev, enc.context, method=model.prior)
    action = actions_lib.mode(dist)
    g = model.apply(variables, enc, action, method=model.glimpse)
    carry, logits = model.apply(variables, carry, prev, g, method=model.step)
    # Never emit <pad>/<bos> (ids the decoder is never trained to produce as a next word).
    logits = logits.at[jnp.array([vocab_lib.PAD_ID, vocab_lib.BOS_ID])].set(-jnp.inf)
    word = jnp.argmax(logits).astype(jnp.int32)
    word = jnp.where(done, vocab_lib.PAD_ID, word)
    done = done | (word == vocab_lib.EOS_ID)
    return (carry, word, done), (word, jnp.clip(action.loc, -1.0, 1.0), action.scale)

  init = (carry0, jnp.asarray(vocab_lib.BOS_ID, jnp.int32), jnp.zeros((), bool))
  _, (tokens, locs, scales) = jax.lax.scan(word_step, init, None, length=max_len)
  is_word = (tokens != vocab_lib.EOS_ID) & (tokens != vocab_lib.PAD_ID)
  length = jnp.sum(jnp.cumprod(is_word.astype(jnp.int32)))
  return Decoded(tokens=tokens, locations=locs, scales=scales, length=length.astype(jnp.int32))
