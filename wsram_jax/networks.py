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

The rollout computes the same functions from `Fused` parameters (`fuse`, the ``fused_*`` functions): layers that
read the same input share one matmul, ``h2 -> [prior head | core2's recurrent block]`` and ``h1 -> [core2's input
block | core1's recurrent block]``, the two Dense layers of each action head are one, and the label enters the
inference MLP as a row of its first layer (once per image) instead of a one-hot column per glimpse. Fewer, larger
matmuls are faster (the heads' 2- and 3-column matmuls alone cost as much as a 256-column one); the parameter tree
is the modules' and the tests check the two forms agree.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib

__all__ = ["CoreState", "Heads", "ActionHead", "AttentionModel", "init_params", "param_labels", "INFERENCE_KEY",
           "Fused", "fuse", "fused_top", "fused_label_rows", "fused_inference", "fused_bottom_input",
           "fused_glimpse_update", "relu", "BASELINE_KEY"]

INFERENCE_KEY = "inference"
BASELINE_KEY = "baseline"

_he = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
  """``max(x, 0)`` whose derivative reads the output (``y > 0``), not the input.

  Same values and derivatives as `jax.nn.relu` (derivative 0 at 0); but the backward pass needs only the
  activation, which the next layer's weight gradient keeps anyway, so XLA can fuse the ``max`` into the matmul
  that produces ``x`` instead of keeping the pre-activation and running a separate pass for the ``max``.
  """
  return jnp.maximum(x, 0)


relu.defjvps(lambda g, ans, x: jnp.where(ans > 0, g, jnp.zeros_like(g)))


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


class ActionHead(nn.Module):
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
    outputs = [nn.Dense(2, kernel_init=small, name="loc")(h),
               nn.Dense(self.num_scales, kernel_init=small, name="scale")(h)]
    if self.learn_loc_std:
      outputs.append(nn.Dense(2, kernel_init=nn.initializers.zeros,
                              bias_init=nn.initializers.constant(math.log(self.loc_std)), name="log_std")(h))
    return head_distribution(jnp.concatenate(outputs, -1), num_scales=self.num_scales, loc_std=self.loc_std,
                             learn_loc_std=self.learn_loc_std, min_loc_std=self.min_loc_std,
                             max_loc_std=self.max_loc_std)


def head_distribution(outputs: jax.Array, *, num_scales: int, loc_std: float, learn_loc_std: bool,
                      min_loc_std: float, max_loc_std: float, **unused) -> actions_lib.ActionDist:
  """An action head's K = 1 distribution from its Dense outputs ``[..., 2 + S (+ 2)]``: location mean
  ``tanh(out[:2])``, scale logits ``out[2:2+S]``, log std ``clip(out[2+S:])`` when learned, else ``log(loc_std)``."""
  del unused
  loc_mean = jnp.tanh(outputs[..., :2])
  scale_logits = outputs[..., 2:2 + num_scales]
  if learn_loc_std:
    log_std = jnp.clip(outputs[..., 2 + num_scales:], math.log(min_loc_std), math.log(max_loc_std))
  else:
    log_std = jnp.full(loc_mean.shape, math.log(loc_std), jnp.float32)
  return actions_lib.single(loc_mean, log_std, scale_logits)


class _InferenceNet(nn.Module):
  """[stop_gradient(h2), onehot(y)] -> relu(Dense) -> `ActionHead`."""
  num_classes: int
  hidden: int
  head_kw: dict

  @nn.compact
  def __call__(self, h2: jax.Array, label: jax.Array) -> actions_lib.ActionDist:
    y = jax.nn.one_hot(label, self.num_classes, dtype=h2.dtype)
    x = jnp.concatenate([jax.lax.stop_gradient(h2), y], axis=-1)
    x = nn.relu(nn.Dense(self.hidden, kernel_init=_he, name="hidden")(x))
    return ActionHead(**self.head_kw, name="head")(x)


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
    self.prior_head = ActionHead(**head_kw, name="prior")
    self.inference = _InferenceNet(num_classes=self.num_classes, hidden=self.inference_hidden, head_kw=head_kw,
                                   name=INFERENCE_KEY)
    self.classifier = nn.Dense(self.num_classes, name="classifier")
    self.baseline_head = nn.Dense(1, kernel_init=nn.initializers.zeros, name=BASELINE_KEY)

  def init_state(self, lowres_image: jax.Array) -> CoreState:
    """``lowres [..., L, L, C]`` -> the initial state: ``h1 = 0``, ``h2 = relu(Dense(flatten(lowres)))``."""
    x = lowres_image.reshape(lowres_image.shape[:-3] + (-1,))
    h2 = relu(self.context(x))
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


class Fused(NamedTuple):
  """The parameters arranged for the rollout: layers that read the same input share one matmul.

  Built by `fuse` from the ``'params'`` tree once per rollout (concatenations and slices, so gradients flow back
  to the tree unchanged). With D = hidden_size, G = 2 * glimpse_hidden, P = 2 + S (+ 2 with a learned std) head
  outputs and H_q = inference_hidden:

  Attributes:
    top: ``[D, P + D]``, h2 -> [prior head outputs | core2's recurrent block]; top_bias ``[P + D]``.
    bottom: ``[D, 2 D]``, h1 -> [core2's input block | core1's recurrent block] (no bias).
    inference_h2: ``[D, H_q]``, the inference MLP's rows for stop_gradient(h2).
    inference_label: ``[C, H_q]``, its rows for onehot(y); inference_bias ``[H_q]``.
    inference_head: ``[H_q, P]``, the inference head's outputs; inference_head_bias ``[P]``.
    what, what_bias, where, where_bias: the glimpse net's Dense layers.
    core1_in: ``[G, D]``, core1's input block; core1_bias ``[D]``.
  """
  top: jax.Array
  top_bias: jax.Array
  bottom: jax.Array
  inference_h2: jax.Array
  inference_label: jax.Array
  inference_bias: jax.Array
  inference_head: jax.Array
  inference_head_bias: jax.Array
  what: jax.Array
  what_bias: jax.Array
  where: jax.Array
  where_bias: jax.Array
  core1_in: jax.Array
  core1_bias: jax.Array


def _head_params(head, learn_loc_std: bool):
  names = ("loc", "scale") + (("log_std",) if learn_loc_std else ())
  return (jnp.concatenate([head[k]["kernel"] for k in names], 1),
          jnp.concatenate([head[k]["bias"] for k in names], 0))


def fuse(model: AttentionModel, params) -> Fused:
  """`Fused` from the ``'params'`` tree of `model` (see `Fused`)."""
  d, g = model.hidden_size, 2 * model.glimpse_hidden
  prior_k, prior_b = _head_params(params["prior"], model.learn_loc_std)
  inf_head_k, inf_head_b = _head_params(params[INFERENCE_KEY]["head"], model.learn_loc_std)
  core1, core2, inf = params["core1"]["kernel"], params["core2"]["kernel"], params[INFERENCE_KEY]["hidden"]
  return Fused(
      top=jnp.concatenate([prior_k, core2[d:]], 1), top_bias=jnp.concatenate([prior_b, params["core2"]["bias"]]),
      bottom=jnp.concatenate([core2[:d], core1[g:]], 1),
      inference_h2=inf["kernel"][:d], inference_label=inf["kernel"][d:], inference_bias=inf["bias"],
      inference_head=inf_head_k, inference_head_bias=inf_head_b,
      what=params["glimpse_what"]["kernel"], what_bias=params["glimpse_what"]["bias"],
      where=params["glimpse_where"]["kernel"], where_bias=params["glimpse_where"]["bias"],
      core1_in=core1[:g], core1_bias=params["core1"]["bias"])


def _head_kw(model: AttentionModel) -> dict:
  return dict(num_scales=model.num_scales, loc_std=model.loc_std, learn_loc_std=model.learn_loc_std,
              min_loc_std=model.min_loc_std, max_loc_std=model.max_loc_std)


def fused_top(model: AttentionModel, fused: Fused, h2: jax.Array, *, recurrent: bool = True
              ) -> tuple[actions_lib.ActionDist, jax.Array | None]:
  """The prior over the next action from ``h2 [..., D]`` and, if ``recurrent``, core2's recurrent term
  ``h2 @ W2[D:] + b2`` for the next top-layer update: one matmul (`AttentionModel.heads` and `top`)."""
  p = fused.inference_head.shape[1]
  if recurrent:
    heads, recurrent_term = jnp.split(h2 @ fused.top + fused.top_bias, [p], axis=-1)  # one split: its transpose
    return head_distribution(heads, **_head_kw(model)), recurrent_term               # is one concatenate
  return head_distribution(h2 @ fused.top[:, :p] + fused.top_bias[:p], **_head_kw(model)), None


def fused_label_rows(fused: Fused, label: jax.Array) -> jax.Array:
  """``onehot(y) @ W_y + b`` ``[..., H_q]``: the label's part of the inference MLP's first layer (once per image)."""
  return jax.nn.one_hot(label, fused.inference_label.shape[0], dtype=fused.inference_label.dtype) \
      @ fused.inference_label + fused.inference_bias


def fused_inference(model: AttentionModel, fused: Fused, h2: jax.Array, label_rows: jax.Array
                    ) -> actions_lib.ActionDist:
  """q(a | y, ...) from ``stop_gradient(h2)`` and `fused_label_rows` (`AttentionModel.heads`' inference part)."""
  hidden = relu(jax.lax.stop_gradient(h2) @ fused.inference_h2 + label_rows)
  return head_distribution(hidden @ fused.inference_head + fused.inference_head_bias, **_head_kw(model))


def fused_bottom_input(fused: Fused, h1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(h1 @ W2[:D], h1 @ W1[G:])``: core2's input term and core1's recurrent term, one matmul."""
  core2_in, core1_recurrent = jnp.split(h1 @ fused.bottom, 2, axis=-1)
  return core2_in, core1_recurrent


def fused_glimpse_update(model: AttentionModel, fused: Fused, patch: jax.Array, action: actions_lib.Action,
                         recurrent: jax.Array | None) -> jax.Array:
  """Layer 1 after glimpse ``patch`` taken at ``action``: ``relu(W1 [g, h1] + b1)`` with ``h1 @ W1[G:]`` given as
  ``recurrent`` (`fused_bottom_input`; None for h1 = 0). `AttentionModel.bottom`."""
  x = patch.reshape(patch.shape[:-3] + (-1,))
  loc = jnp.clip(action.loc, -1.0, 1.0)
  where = jnp.concatenate([loc, jax.nn.one_hot(action.scale, model.num_scales, dtype=loc.dtype)], -1)
  g = jnp.concatenate([relu(x @ fused.what + fused.what_bias), relu(where @ fused.where + fused.where_bias)], -1)
  y = g @ fused.core1_in + fused.core1_bias
  return relu(y if recurrent is None else y + recurrent)


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
