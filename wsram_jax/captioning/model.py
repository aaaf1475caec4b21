r"""The multi-scale stochastic hard-attention captioner (paper Sec. 5.2), in flax.linen.

Image side (once per image):

* encoder (pluggable, parameters under ``'encoder'``): any module ``image [H, W, C] -> (F_0, ..., F_{S-1})``,
  ``F_s [h_s, w_s, C_s]``, finest first. The default `ConvPyramid` is a small CNN: blocks of
  ``conv3x3 -> relu -> maxpool 2x2``, the outputs of the last S blocks are the levels. With the default
  channels (8, 16, 32, 32) on a 64 px canvas the levels are 16x16 (stride 4, receptive field 10 px),
  8x8 (stride 8, 22 px) and 4x4 (stride 16, 46 px): "because a convolutional net shrinks the representation
  with max-pooling, choosing a layer is analogous to choosing a scale" (paper). Pretrained encoder weights are
  loaded by `wsram_jax.captioning.encoders`.
* per level, a 1x1 projection to ``feature_dim`` channels (theta), so levels of any width can be read alike.
* context ``c(I) = relu(Dense(flatten(lowres(I))))``: a low-resolution image that only the attention heads see
  (never the word predictor), as the classifier feeds the low-resolution image to its top layer only: the
  words must come through the glimpses.

Per decoder step t (predicting word ``y_t`` from ``y_<t``; ``y_0 = <bos>``), with LSTM state ``(c, h)_{t-1}``
(zeros at t = 0):

* attention input ``u_t = [h_{t-1}, E(y_{t-1}), c(I)]``; prior ``p(a_t | y_<t, a_<t, I) = head(relu(Dense u_t))``,
  an `ActionDist` (`wsram_jax.actions`, K = 1): Gaussian location in R^2 (clipped to [-1, 1]^2 when read)
  times a Categorical over the S pyramid levels.
* inference network (eta, under ``'inference'``): ``q(a_t | y, y_<t, a_<t, I) =
  head(relu(Dense [stop_gradient(u_t), E_q(w_t)]))`` with its own embedding E_q of one word w_t of the target
  (`q_word`): ``'target'`` (default) gives it ``y_t``, the word this glimpse is used to predict;
  ``'previous'`` gives it ``y_{t-1}``, the paper's literal "immediate preceding word in the target sentences".
  Here the prior already conditions on ``y_{t-1}`` (teacher forcing), so with ``'previous'`` q has no
  information about y that the prior lacks and can at best learn the prior; with ``'target'`` it knows which
  word the glimpse must serve (e.g. "7" or "large") and, with the context c(I), can learn where to look for it:
  that is the "teacher" role of Sec. 4.3. The paper does not say whether its prior saw the preceding word when
  choosing a glimpse; the word that comes right after the glimpse is the one the glimpse informs, so we take
  that as our default and keep the literal reading as an option.
* glimpse read (no gradient w.r.t. the location; the action gets score-function gradients): the level
  ``s_t`` map, bilinearly sampled at ``read_size x read_size`` points one cell apart centred on the clipped
  location (zero outside the map), flattened; ``g_t = [relu(Dense(read)), relu(Dense([loc, onehot(s)]))]``.
* ``(c, h)_t = LSTM((c, h)_{t-1}, [E(y_{t-1}), g_t])``; word logits ``Dense(h_t)``.
* baseline (VAR's learned control variate, under ``'baseline'``): ``b(I) = Dense(stop_gradient(c(I)))``.

Parameter groups follow `wsram_jax.attention.param_labels` (``'inference'`` -> eta, the rest theta), so the
classifier's optimiser labels and diagnostics apply unchanged.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import glimpse as glimpse_lib
from wsram_jax import attention

__all__ = ["ConvPyramid", "CaptionModel", "Encoded", "Heads", "Carry", "init_params", "read_level",
           "Q_WORDS", "ENCODER_KEY"]

ENCODER_KEY = "encoder"
Q_WORDS = ("target", "previous")

_he = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

Heads = attention.Heads


class ConvPyramid(nn.Module):
  """The default encoder: ``len(channels)`` blocks of conv3x3 -> relu -> maxpool 2x2; the last ``num_levels``
  block outputs are the pyramid, finest first. Input ``[H, W, C]`` float (or ``[B, H, W, C]``)."""
  channels: Sequence[int] = (8, 16, 32, 32)
  num_levels: int = 3

  @nn.compact
  def __call__(self, image: jax.Array) -> tuple[jax.Array, ...]:
    if not 1 <= self.num_levels <= len(self.channels):
      raise ValueError(f"ConvPyramid: num_levels must be in 1..{len(self.channels)}, got {self.num_levels}.")
    x = image
    outs = []
    for i, ch in enumerate(self.channels):
      x = nn.relu(nn.Conv(ch, (3, 3), padding="SAME", kernel_init=_he, name=f"conv_{i}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
      outs.append(x)
    return tuple(outs[len(self.channels) - self.num_levels:])


def pyramid_geometry(channels: Sequence[int], num_levels: int) -> list[tuple[int, int]]:
  """``[(stride, receptive field)]`` in input pixels of `ConvPyramid`'s levels, finest first."""
  stride, rf, out = 1, 1, []
  for _ in channels:
    rf += 2 * stride  # conv3x3
    rf += stride  # maxpool 2x2
    stride *= 2
    out.append((stride, rf))
  return out[len(channels) - num_levels:]


class Encoded(NamedTuple):
  """Per-image encoder outputs: ``levels`` (S maps ``[h_s, w_s, feature_dim]``, projected) and ``context
  [D_c]``."""
  levels: tuple[jax.Array, ...]
  context: jax.Array


class Carry(NamedTuple):
  """The LSTM state ``c [D]``, ``h [D]``."""
  c: jax.Array
  h: jax.Array


def read_level(feature_map: jax.Array, loc: jax.Array, read_size: int) -> jax.Array:
  """Bilinear samples ``[read_size, read_size, D]`` of ``feature_map [h, w, D]`` around ``loc`` (y, x).

  ``loc`` (clipped to [-1, 1]) maps to the continuous cell coordinate ``(loc + 1) / 2 * (h, w) - 1/2`` (cell
  centres at integers, (-1, -1) the map's top-left corner as for the canvas); the samples are one cell apart,
  centred there; outside the map the features are zero. Differentiable w.r.t. the map, not the location.
  """
  h, w, _ = feature_map.shape
  loc = jax.lax.stop_gradient(jnp.clip(loc, -1.0, 1.0))
  centre = (loc + 1.0) / 2.0 * jnp.array([h, w], jnp.float32) - 0.5
  offsets = jnp.arange(read_size, dtype=jnp.float32) - (read_size - 1) / 2.0
  ys, xs = centre[0] + offsets, centre[1] + offsets
  y0, x0 = jnp.floor(ys), jnp.floor(xs)
  wy, wx = ys - y0, xs - x0
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)

  def gather(yi, xi):  # [r], [r] -> [r, r, D], zero outside
    valid = ((yi >= 0) & (yi < h))[:, None] & ((xi >= 0) & (xi < w))[None, :]
    vals = feature_map[jnp.clip(yi, 0, h - 1)[:, None], jnp.clip(xi, 0, w - 1)[None, :]]
    return jnp.where(valid[..., None], vals, 0.0)

  wy, wx = wy[:, None, None], wx[None, :, None]
  return ((1 - wy) * (1 - wx) * gather(y0, x0) + (1 - wy) * wx * gather(y0, x0 + 1) +
          wy * (1 - wx) * gather(y0 + 1, x0) + wy * wx * gather(y0 + 1, x0 + 1))


class _InferenceNet(nn.Module):
  """``[stop_gradient(u), E_q(word)] -> relu(Dense) -> action head``: q's own parameters only (eta)."""
  vocab_size: int
  embed_dim: int
  hidden: int
  head_kw: dict

  @nn.compact
  def __call__(self, u: jax.Array, word: jax.Array) -> actions_lib.ActionDist:
    e = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(word)
    x = jnp.concatenate([jax.lax.stop_gradient(u), e], axis=-1)
    x = nn.relu(nn.Dense(self.hidden, kernel_init=_he, name="hidden")(x))
    return attention.ActionHead(self.hidden, **self.head_kw, name="head")(x)


class CaptionModel(nn.Module):
  """The captioner: prediction network (theta: encoder, projections, context, LSTM, prior, output) and the
  inference network (eta). See the module docstring.

  Attributes:
    vocab_size: V.
    encoder: the image encoder module (`ConvPyramid` or any module returning S feature maps, finest first).
    num_scales: S, the number of levels the encoder returns.
    feature_dim: channels every level is projected to.
    read_size: side of the grid of bilinear samples read at the chosen level and location.
    embed_dim: word embedding width (the prior's and q's own).
    hidden_size: LSTM width D.
    glimpse_hidden: width of each of the glimpse's "what" and "where" layers.
    attention_hidden: hidden width of the prior's and q's MLPs.
    context_dim: width of the low-resolution context c(I) (0: no context).
    lowres_size: side of the low-resolution image for the context.
    loc_std, learn_loc_std, min_loc_std, max_loc_std, head_init_scale: the action heads, as in
      `wsram_jax.classifier.model.AttentionModel`.
    freeze_encoder: stop gradients into the encoder (e.g. with pretrained weights).
  """
  vocab_size: int
  encoder: nn.Module
  num_scales: int = 3
  feature_dim: int = 32
  read_size: int = 2
  embed_dim: int = 32
  hidden_size: int = 128
  glimpse_hidden: int = 64
  attention_hidden: int = 64
  context_dim: int = 64
  lowres_size: int = 8
  loc_std: float = 0.15
  learn_loc_std: bool = False
  min_loc_std: float = 0.01
  max_loc_std: float = 1.0
  head_init_scale: float = 0.1
  freeze_encoder: bool = False

  def setup(self):
    head_kw = dict(num_scales=self.num_scales, loc_std=self.loc_std, learn_loc_std=self.learn_loc_std,
                   min_loc_std=self.min_loc_std, max_loc_std=self.max_loc_std,
                   mean_init_scale=self.head_init_scale)
    self.projections = [nn.Dense(self.feature_dim, kernel_init=_he, name=f"project_{s}")
                        for s in range(self.num_scales)]
    self.context_net = nn.Dense(max(self.context_dim, 1), kernel_init=_he, name="context")
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, name="embed")
    self.glimpse_what = nn.Dense(self.glimpse_hidden, kernel_init=_he, name="glimpse_what")
    self.glimpse_where = nn.Dense(self.glimpse_hidden, kernel_init=_he, name="glimpse_where")
    self.lstm = nn.OptimizedLSTMCell(self.hidden_size, name="lstm")
    self.attention = nn.Dense(self.attention_hidden, kernel_init=_he, name="attention")
    self.prior_head = attention.ActionHead(self.attention_hidden, **head_kw, name="prior")
    self.inference = _InferenceNet(vocab_size=self.vocab_size, embed_dim=self.embed_dim,
                                   hidden=self.attention_hidden, head_kw=head_kw, name=attention.INFERENCE_KEY)
    self.output = nn.Dense(self.vocab_size, name="output")
    self.baseline_head = nn.Dense(1, kernel_init=nn.initializers.zeros, name=attention.BASELINE_KEY)

  def encode(self, image: jax.Array) -> Encoded:
    """``image [H, W, C]`` float -> `Encoded` (once per image, shared by the M samples)."""
    levels = self.encoder(image)
    if len(levels) != self.num_scales:
      raise ValueError(f"The encoder returned {len(levels)} levels; the model has num_scales={self.num_scales}.")
    if self.freeze_encoder:
      levels = tuple(jax.lax.stop_gradient(f) for f in levels)
    levels = tuple(proj(f) for proj, f in zip(self.projections, levels))
    if self.context_dim > 0:
      lr = glimpse_lib.lowres(image, self.lowres_size)
      context = nn.relu(self.context_net(lr.reshape(-1)))
    else:
      context = jnp.zeros((0,), image.dtype)
    return Encoded(levels=levels, context=context)

  def initial_carry(self) -> Carry:
    z = jnp.zeros((self.hidden_size,), jnp.float32)
    return Carry(c=z, h=z)

  def _attention_input(self, carry: Carry, prev_word: jax.Array, context: jax.Array) -> jax.Array:
    return jnp.concatenate([carry.h, self.embed(prev_word), context], axis=-1)

  def prior(self, carry: Carry, prev_word: jax.Array, context: jax.Array) -> actions_lib.ActionDist:
    """p(a_t | y_<t, a_<t, I) (K = 1)."""
    u = self._attention_input(carry, prev_word, context)
    return self.prior_head(nn.relu(self.attention(u)))

  def heads(self, carry: Carry, prev_word: jax.Array, context: jax.Array, q_word: jax.Array) -> Heads:
    """The prior and the inference network's q (which also sees ``q_word``, a word of the target)."""
    u = self._attention_input(carry, prev_word, context)
    return Heads(prior=self.prior_head(nn.relu(self.attention(u))), inference=self.inference(u, q_word))

  def glimpse(self, encoded: Encoded, action: actions_lib.Action) -> jax.Array:
    """``g [2 glimpse_hidden]``: the chosen level read at the clipped location, with "where" features."""
    loc = jax.lax.stop_gradient(jnp.clip(action.loc, -1.0, 1.0))
    reads = jnp.stack([read_level(f, loc, self.read_size).reshape(-1) for f in encoded.levels])  # [S, r*r*F]
    onehot = jax.nn.one_hot(action.scale, self.num_scales, dtype=reads.dtype)
    read = jnp.sum(onehot[:, None] * reads, axis=0)
    where = jnp.concatenate([loc, onehot], -1)
    return jnp.concatenate([nn.relu(self.glimpse_what(read)), nn.relu(self.glimpse_where(where))], -1)

  def step(self, carry: Carry, prev_word: jax.Array, g: jax.Array) -> tuple[Carry, jax.Array]:
    """One LSTM step on ``[E(y_{t-1}), g_t]``; returns the new carry and word logits ``[V]``."""
    (c, h), _ = self.lstm((carry.c, carry.h), jnp.concatenate([self.embed(prev_word), g], -1))
    return Carry(c=c, h=h), self.output(h)

  def baseline(self, encoded: Encoded) -> jax.Array:
    """``b(I) []`` from the stop-gradient'ed context."""
    return self.baseline_head(jax.lax.stop_gradient(encoded.context))[0]

  def __call__(self, image: jax.Array, word: jax.Array, action: actions_lib.Action) -> Any:
    """Touches every submodule (for `init`)."""
    enc = self.encode(image)
    carry = self.initial_carry()
    heads = self.heads(carry, word, enc.context, word)
    carry, logits = self.step(carry, word, self.glimpse(enc, action))
    return heads, logits, self.baseline(enc)


def init_params(model: CaptionModel, key: jax.Array, image_shape: tuple[int, int, int]) -> dict[str, Any]:
  """Initial parameters (the ``'params'`` collection) for single images of shape ``image_shape``."""
  image = jnp.zeros(image_shape, jnp.float32)
  action = actions_lib.Action(loc=jnp.zeros((2,), jnp.float32), scale=jnp.zeros((), jnp.int32))
  return _jitted_init(model)(key, image, jnp.zeros((), jnp.int32), action)["params"]


@functools.lru_cache(maxsize=16)
def _jitted_init(model: CaptionModel):
  return jax.jit(model.init)

