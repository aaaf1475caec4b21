"""The attention model's networks (paper Sec. 3, Fig. 1; Sec. 5.1), in flax.linen.

Prediction network (parameters theta):

- context net: ``h2_0 = relu(Dense(flatten(lowres(I))))``; the low-resolution image enters the top layer only.
- glimpse net (as in RAM): ``g_n = [relu(Dense(patch_n)), relu(Dense([loc_n, onehot(s_n)]))]`` ("what" and
  "where", concatenated) with the clipped location, i.e. where the glimpse was actually taken. RAM adds the two
  through one more ``relu(Dense)`` of width D; here the core's input layer combines them directly, which saves a
  D x D matmul per glimpse (a fifth of the model's FLOPs).
- two-layer ReLU core: ``h1_n = relu(W1 [g_n, h1_{n-1}] + b1)`` (`AttentionModel.bottom`),
  ``h2_n = relu(W2 [h1_n, h2_{n-1}] + b2)`` (`AttentionModel.top`); ``h1_0 = 0``. Layer 1 never sees layer 2, so the class prediction can use the low-resolution image only
  through the chosen glimpses. The recurrent blocks are initialised to ``recurrent_scale * identity``
  (IRNN, Le et al. 2015), the input blocks with He-normal, so activations stay of order one over the glimpses.
- prior head ``p(a_{n+1} | a_{1:n}, I)`` on h2_n: location mean ``tanh(Dense(h2))``, location std ``loc_std``
  (fixed) or ``exp(clip(Dense(h2)))`` initialised at ``loc_std`` (``learn_loc_std=True``), scale logits
  ``Dense(h2)``. The first action reads h2_0.
- classifier: ``logits = Dense(h1_N)``, from layer 1 after the last glimpse.
- baseline: ``b(I) = Dense(stop_gradient(h2_0))``, a scalar per image for VAR's control variate; it sees only the
  context, never the sampled actions, and its regression loss does not reach the context net.

Inference network (parameters eta): ``q(a_{n+1} | y, a_{1:n}, I)`` is an MLP on
``[stop_gradient(h2_n), onehot(y)]`` with the prior head's output form. The stop-gradient means the inference
network's loss never reaches theta; its parameters live under the top-level key ``'inference'`` (`param_labels`).

Use: ``params = init_params(model, key)`` and ``model.apply({'params': params}, ..., method=model.heads)``; see
`wsram_jax.rollout` for the loop.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib

__all__ = ["CoreState", "Heads", "AttentionModel", "init_params", "param_labels", "INFERENCE_KEY",
           "BASELINE_KEY"]

INFERENCE_KEY = "inference"
BASELINE_KEY = "baseline"

_he = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class CoreState(NamedTuple):
  """The recurrent state: ``h1 [..., D]`` (layer 1, read by the classifier), ``h2 [..., D]`` (top layer)."""
  h1: jax.Array
  h2: jax.Array


class Heads(NamedTuple):
  """Per-glimpse head outputs: ``prior`` and ``inference`` are K = 1 `ActionDist`s over the next action."""
  prior: actions_lib.ActionDist
  inference: actions_lib.ActionDist


def _block_identity_init(in_features: int, scale: float):
  """Kernel ``[in_features + D, D]``: He-normal rows for the input, ``scale * I`` rows for the recurrence."""

  def init(key, shape, dtype=jnp.float32):
    d = shape[1]
    w_in = _he(key, (in_features, d), dtype)
    return jnp.concatenate([w_in, scale * jnp.eye(d, dtype=dtype)], axis=0)

  return init


class _RecurrentDense(nn.Module):
  """``x @ K[:in] + h @ K[in:] + b`` with one kernel ``K [in + D, D]`` (the Dense of ``[x, h]``); ``h=None`` is a
  zero state and skips its half of the matmul (the first glimpse)."""
  features: int
  in_features: int
  recurrent_scale: float

  @nn.compact
  def __call__(self, x: jax.Array, h: jax.Array | None) -> jax.Array:
    kernel = self.param("kernel", _block_identity_init(self.in_features, self.recurrent_scale),
                        (self.in_features + self.features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = x @ kernel[:self.in_features] + bias
    if h is not None:
      y = y + h @ kernel[self.in_features:]
    return y


class _ActionHead(nn.Module):
  """h -> K = 1 ActionDist: tanh location mean, fixed or learned location std, scale logits."""
  num_scales: int
  loc_std: float
  learn_loc_std: bool
  min_loc_std: float
  max_loc_std: float
  mean_init_scale: float

  @nn.compact
  def __call__(self, h: jax.Array) -> actions_lib.ActionDist:
    small = nn.initializers.variance_scaling(self.mean_init_scale, "fan_in", "truncated_normal")
    loc_mean = jnp.tanh(nn.Dense(2, kernel_init=small, name="loc")(h))
    scale_logits = nn.Dense(self.num_scales, kernel_init=small, name="scale")(h)
    log_std0 = math.log(self.loc_std)
    if self.learn_loc_std:
      raw = nn.Dense(2, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.constant(log_std0),
                     name="log_std")(h)
      log_std = jnp.clip(raw, math.log(self.min_loc_std), math.log(self.max_loc_std))
    else:
      log_std = jnp.full(loc_mean.shape, log_std0, jnp.float32)
    return actions_lib.single(loc_mean, log_std, scale_logits)


class _InferenceNet(nn.Module):
  """[stop_gradient(h2), onehot(y)] -> relu(Dense) -> `_ActionHead`."""
  num_classes: int
  hidden: int
  head_kw: dict

  @nn.compact
  def __call__(self, h2: jax.Array, label: jax.Array) -> actions_lib.ActionDist:
    y = jax.nn.one_hot(label, self.num_classes, dtype=h2.dtype)
    x = jnp.concatenate([jax.lax.stop_gradient(h2), y], axis=-1)
    x = nn.relu(nn.Dense(self.hidden, kernel_init=_he, name="hidden")(x))
    return _ActionHead(**self.head_kw, name="head")(x)


class AttentionModel(nn.Module):
  """The WS-RAM attention model: prediction network (theta) and inference network (eta).

  Attributes:
    num_classes: C.
    glimpse_size: side of the pooled glimpse (12).
    num_scales: S (3: windows 12/24/48 for glimpse_size 12).
    lowres_size: side of the low-resolution input (10).
    hidden_size: D of both core layers (256).
    glimpse_hidden: width of each of the glimpse net's "what" and "where" layers (128; g has twice this).
    inference_hidden: width of the inference MLP's hidden layer (256).
    loc_std: location std of prior and inference heads, in [-1, 1] units (0.15 = 7.5 px on a 100 px canvas);
      the fixed value, or the initial one when learned.
    learn_loc_std: learn a state-dependent std, clipped to [min_loc_std, max_loc_std].
    min_loc_std, max_loc_std: the clip range of a learned std.
    recurrent_scale: the recurrent kernels' initial ``scale * identity`` (IRNN).
    head_init_scale: variance scale of the action heads' kernels. Small, as for the last layer of a policy in RL:
      the untrained prior and inference net start near-uniform over scales with location means near the centre
      at every glimpse (with 0.1 the growing top state tilts later glimpses towards scale 0 and off-centre,
      the same way for every image).
  """
  num_classes: int = 10
  glimpse_size: int = 12
  num_scales: int = 3
  lowres_size: int = 10
  hidden_size: int = 256
  glimpse_hidden: int = 128
  inference_hidden: int = 256
  loc_std: float = 0.15
  learn_loc_std: bool = False
  min_loc_std: float = 0.01
  max_loc_std: float = 1.0
  recurrent_scale: float = 1.0
  head_init_scale: float = 0.01

  def setup(self):
    d = self.hidden_size
    head_kw = dict(num_scales=self.num_scales, loc_std=self.loc_std, learn_loc_std=self.learn_loc_std,
                   min_loc_std=self.min_loc_std, max_loc_std=self.max_loc_std,
                   mean_init_scale=self.head_init_scale)
    self.context = nn.Dense(d, kernel_init=_he, name="context")
    self.glimpse_what = nn.Dense(self.glimpse_hidden, kernel_init=_he, name="glimpse_what")
    self.glimpse_where = nn.Dense(self.glimpse_hidden, kernel_init=_he, name="glimpse_where")
    self.core1 = _RecurrentDense(d, 2 * self.glimpse_hidden, self.recurrent_scale, name="core1")
    self.core2 = _RecurrentDense(d, d, self.recurrent_scale, name="core2")
    self.prior_head = _ActionHead(**head_kw, name="prior")
    self.inference = _InferenceNet(num_classes=self.num_classes, hidden=self.inference_hidden, head_kw=head_kw,
                                   name=INFERENCE_KEY)
    self.classifier = nn.Dense(self.num_classes, name="classifier")
    self.baseline_head = nn.Dense(1, kernel_init=nn.initializers.zeros, name=BASELINE_KEY)

  def init_state(self, lowres_image: jax.Array) -> CoreState:
    """``lowres [..., L, L, C]`` -> the initial state: ``h1 = 0``, ``h2 = relu(Dense(flatten(lowres)))``."""
    x = lowres_image.reshape(lowres_image.shape[:-3] + (-1,))
    h2 = nn.relu(self.context(x))
    return CoreState(h1=jnp.zeros_like(h2), h2=h2)

  def heads(self, state: CoreState, label: jax.Array) -> Heads:
    """The prior and inference distributions over the next action, from the top layer (``label [...]`` int)."""
    return Heads(prior=self.prior_head(state.h2), inference=self.inference(state.h2, label))

  def glimpse_features(self, patch: jax.Array, action: actions_lib.Action) -> jax.Array:
    """``patch [..., G, G, C]``, action (loc clipped here) -> ``g [..., 2 * glimpse_hidden]``."""
    x = patch.reshape(patch.shape[:-3] + (-1,))
    loc = jnp.clip(action.loc, -1.0, 1.0)
    where = jnp.concatenate([loc, jax.nn.one_hot(action.scale, self.num_scales, dtype=loc.dtype)], -1)
    return jnp.concatenate([nn.relu(self.glimpse_what(x)), nn.relu(self.glimpse_where(where))], -1)

  def bottom(self, state: CoreState, patch: jax.Array, action: actions_lib.Action, *,
             first: bool = False) -> CoreState:
    """Layer 1 reads glimpse ``patch`` taken at ``action``: ``h1 = relu(W1 [g, h1] + b1)``; h2 unchanged.

    ``first=True`` treats h1 as the zero initial state and skips its half of the matmul.
    """
    g = self.glimpse_features(patch, action)
    h1 = nn.relu(self.core1(g, None if first else state.h1))
    return CoreState(h1=h1, h2=state.h2)

  def top(self, state: CoreState) -> CoreState:
    """Layer 2 reads layer 1: ``h2 = relu(W2 [h1, h2] + b2)``; h1 unchanged."""
    return CoreState(h1=state.h1, h2=nn.relu(self.core2(state.h1, state.h2)))

  def step(self, state: CoreState, patch: jax.Array, action: actions_lib.Action, *,
           update_top: bool = True) -> CoreState:
    """One full core update (`bottom` then `top`) with glimpse ``patch`` taken at ``action``. ``update_top=False``
    skips layer 2 (after the last glimpse only layer 1 is read, by the classifier)."""
    state = self.bottom(state, patch, action)
    return self.top(state) if update_top else state

  def classify(self, state: CoreState) -> jax.Array:
    """Class logits ``[..., C]`` from layer 1."""
    return self.classifier(state.h1)

  def baseline(self, state: CoreState) -> jax.Array:
    """``b(I) [...]`` from ``stop_gradient(h2)`` of the initial state."""
    return self.baseline_head(jax.lax.stop_gradient(state.h2))[..., 0]

  def __call__(self, lowres_image: jax.Array, patch: jax.Array, action: actions_lib.Action,
               label: jax.Array) -> tuple[Heads, jax.Array, jax.Array]:
    """Touches every submodule (for `init`): returns (heads, logits, baseline)."""
    state = self.init_state(lowres_image)
    b = self.baseline(state)
    heads = self.heads(state, label)
    state = self.step(state, patch, action)
    return heads, self.classify(state), b


def init_params(model: AttentionModel, key: jax.Array, *, channels: int = 1) -> dict[str, Any]:
  """Initial parameters (the ``'params'`` collection) for single-image inputs with ``channels`` channels."""
  lr = jnp.zeros((model.lowres_size, model.lowres_size, channels), jnp.float32)
  patch = jnp.zeros((model.glimpse_size, model.glimpse_size, channels), jnp.float32)
  action = actions_lib.Action(loc=jnp.zeros((2,), jnp.float32), scale=jnp.zeros((), jnp.int32))
  return _jitted_init(model)(key, lr, patch, action, jnp.zeros((), jnp.int32))["params"]


@functools.lru_cache(maxsize=16)
def _jitted_init(model: AttentionModel):
  # One compiled init per model configuration: op-by-op initialisation compiles every initialiser separately
  # (seconds on a small CPU), and a fresh jax.jit(model.init) per call would recompile.
  return jax.jit(model.init)


def _path_keys(path) -> list[str]:
  out = []
  for p in path:
    k = getattr(p, "key", getattr(p, "name", None))
    if k is not None:
      out.append(str(k))
  return out


def param_labels(params, *, baseline: str = "theta"):
  """A pytree like ``params`` with leaves ``'eta'`` (inference network) or ``'theta'`` (everything else).

  Works on the ``'params'`` collection or on ``{'params': ...}`` and on gradients of the same structure; use with
  ``optax.multi_transform``. ``baseline`` relabels the baseline head (e.g. ``'baseline'`` to give it its own
  optimiser or keep it out of theta's gradient-variance diagnostics); by default it is part of theta.
  """

  def label(path, _):
    keys = _path_keys(path)
    if keys and keys[0] == "params":
      keys = keys[1:]
    if not keys:
      return "theta"
    if keys[0] == INFERENCE_KEY:
      return "eta"
    if keys[0] == BASELINE_KEY:
      return baseline
    return "theta"

  return jax.tree_util.tree_map_with_path(label, params)
