"""The classifier's attention network (paper Sec. 3, Fig. 1; Sec. 5.1), in flax.linen: its one definition.

Prediction network (parameters theta), for glimpses n = 1..N, with ``a_n = (loc_n, s_n)`` and ``x_n`` the patch
taken at the clipped location ``clip(loc_n, -1, 1)`` and scale ``s_n``:

    h2_0 = relu(W_c flatten(lowres(I)) + b_c)                 context: the low-res image enters layer 2 only
    h1_0 = 0
    p(a_n | a_<n, I) = head_p(h2_{n-1})                       prior (`attention.ActionHead`)
    g_n  = [relu(W_what flatten(x_n) + b_what),               glimpse net, "what" ...
            relu(W_where [clip(loc_n), onehot(s_n)] + b_where)]           ... and "where"
    h1_n = relu(W1 [g_n, h1_{n-1}] + b1)                      core layer 1
    h2_n = relu(W2 [h1_n, h2_{n-1}] + b2)        (n < N)      core layer 2
    logits = W_y h1_N + b_y                                   classifier, from layer 1 after the last glimpse
    b(I) = W_b stop_gradient(h2_0) + b_b                      VAR's learned baseline (its own group)

Inference network (parameters eta, under ``'inference'``):

    q(a_n | y, a_<n, I) = head_q(relu(W_q [stop_gradient(h2_{n-1}), onehot(y)] + b_q))

The heads' outputs: location mean ``tanh``, location std ``loc_std`` (fixed) or ``exp(clip(.))`` of a third
output (``learn_loc_std``), scale logits (`attention.head_distribution`). Parameter names: ``context``
(W_c, b_c), ``glimpse_what``, ``glimpse_where``, ``core1`` (W1 = ``kernel [2 G_h + D, D]``, input rows first),
``core2`` (W2, ``[2 D, D]``), ``prior``, ``classifier``, ``baseline``, ``inference/hidden`` (W_q,
``[D + C, H_q]``, the h2 rows first), ``inference/head``.

Layer 1 never reads layer 2, so the class prediction can use the low-resolution image only through the chosen
glimpses (the paper's guard against ignoring attention). As in RAM, "what" and "where" are combined by the
core's input layer (RAM adds one more ``relu(Dense)`` of width D). The recurrent blocks start at
``recurrent_scale * identity`` (IRNN), the input blocks He-normal, so activations stay of order one.

The methods below are what the rollout (`classifier.rollout`) runs, and they compute these equations with the
layers that read the same input sharing one matmul: on ``h2``, the prior head and W2's recurrent block
(`heads`); on ``h1``, W2's input block and W1's recurrent block (`bottom_input`); the label enters the inference
MLP as a row of W_q, once per image (`label_rows`). Fewer, larger matmuls are faster on every backend (the
heads' 2- and 3-column matmuls alone cost as much as a 256-column one). Changing a layer here changes what
trains; `tests/test_networks.py` checks the methods against the equations above, values and gradients.

Use: ``params = init_params(model, key)``; ``model.apply({'params': params}, ..., method=model.heads)``.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsram_jax import actions as actions_lib
from wsram_jax import attention
from wsram_jax.attention import ActionHead, Heads, Linear

__all__ = ["AttentionModel", "CoreState", "init_params", "relu"]

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


def _block_identity_init(in_features: int, scale: float):
  """Kernel ``[in_features + D, D]``: He-normal rows for the input, ``scale * I`` rows for the recurrence."""

  def init(key, shape, dtype=jnp.float32):
    d = shape[1]
    w_in = _he(key, (in_features, d), dtype)
    return jnp.concatenate([w_in, scale * jnp.eye(d, dtype=dtype)], axis=0)

  return init


class AttentionModel(nn.Module):
  """The WS-RAM attention classifier: prediction network (theta) and inference network (eta).

  Attributes:
    num_classes: C.
    glimpse_size: side of the pooled glimpse (12).
    num_scales: S (3: windows 12/24/48 for glimpse_size 12).
    lowres_size: side of the low-resolution input (10).
    hidden_size: D of both core layers (256).
    glimpse_hidden: G_h, width of each of the glimpse net's "what" and "where" layers (128; g has twice this).
    inference_hidden: H_q, width of the inference MLP's hidden layer (256).
    loc_std: location std of prior and inference heads, in [-1, 1] units (0.15 = 7.5 px on a 100 px canvas);
      the fixed value, or the initial one when learned.
    learn_loc_std: learn a state-dependent std, clipped to [min_loc_std, max_loc_std].
    min_loc_std, max_loc_std: the clip range of a learned std.
    recurrent_scale: the recurrent kernels' initial ``scale * identity`` (IRNN).
    head_init_scale: variance scale of the action heads' kernels. Small, as for the last layer of a policy in RL:
      the untrained prior and inference net start near-uniform over scales with location means near the centre
      at every glimpse (with 0.1 the growing top state tilts later glimpses towards scale 0 and off-centre,
      the same way for every image).
    channels: the canvas's channels (1 for MNIST).
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
  channels: int = 1

  def setup(self):
    d, g, c = self.hidden_size, 2 * self.glimpse_hidden, self.channels
    head_kw = dict(num_scales=self.num_scales, loc_std=self.loc_std, learn_loc_std=self.learn_loc_std,
                   min_loc_std=self.min_loc_std, max_loc_std=self.max_loc_std, mean_init_scale=self.head_init_scale)
    self.context = Linear(self.lowres_size ** 2 * c, d, kernel_init=_he)
    self.glimpse_what = Linear(self.glimpse_size ** 2 * c, self.glimpse_hidden, kernel_init=_he)
    self.glimpse_where = Linear(2 + self.num_scales, self.glimpse_hidden, kernel_init=_he)
    self.core1 = Linear(g + d, d, kernel_init=_block_identity_init(g, self.recurrent_scale))
    self.core2 = Linear(d + d, d, kernel_init=_block_identity_init(d, self.recurrent_scale))
    self.prior = ActionHead(d, **head_kw)
    self.classifier = Linear(d, self.num_classes)
    self.baseline_head = Linear(d, 1, kernel_init=nn.initializers.zeros, name=attention.BASELINE_KEY)
    self.inference = _InferenceNet(d, self.num_classes, self.inference_hidden, head_kw,
                                   name=attention.INFERENCE_KEY)

  # The equations of the module docstring, in the order the rollout runs them.

  def initial_state(self, lowres_image: jax.Array) -> CoreState:
    """``lowres [..., L, L, C]`` -> ``h1_0 = 0``, ``h2_0 = relu(W_c flatten(lowres) + b_c)``."""
    h2 = relu(self.context(lowres_image.reshape(lowres_image.shape[:-3] + (-1,))))
    return CoreState(h1=jnp.zeros_like(h2), h2=h2)

  def baseline(self, h2_0: jax.Array) -> jax.Array:
    """``b(I) [...]`` from ``stop_gradient(h2_0)``."""
    return self.baseline_head(jax.lax.stop_gradient(h2_0))[..., 0]

  def label_rows(self, label: jax.Array) -> jax.Array:
    """``W_q[D:] onehot(y) + b_q [..., H_q]``: the label's part of the inference MLP's first layer (once per
    image; `heads` adds the h2 part)."""
    kernel, bias = self.inference.hidden.weights()
    return jax.nn.one_hot(label, self.num_classes, dtype=kernel.dtype) @ kernel[self.hidden_size:] + bias

  def heads(self, h2: jax.Array, label_rows: jax.Array, *, recurrent: bool = True
            ) -> tuple[Heads, Optional[jax.Array]]:
    """The prior and the inference network over the next action, from ``h2 [..., D]``, and, if ``recurrent``,
    layer 2's recurrent term ``W2[D:] h2 + b2`` for the next ``h2``: the prior head and that term are one matmul.
    ``label_rows`` from `label_rows`."""
    prior_k, prior_b = self.prior.weights()
    p = prior_k.shape[1]
    if recurrent:
      core2_k, core2_b = self.core2.weights()
      out = h2 @ jnp.concatenate([prior_k, core2_k[self.hidden_size:]], 1) + jnp.concatenate([prior_b, core2_b])
      outputs, recurrent_term = jnp.split(out, [p], axis=-1)  # one split: its transpose is one concatenate
    else:
      outputs, recurrent_term = h2 @ prior_k + prior_b, None
    return Heads(prior=self.prior.distribution(outputs), inference=self.inference(h2, label_rows)), recurrent_term

  def glimpse_update(self, patch: jax.Array, action: actions_lib.Action,
                     recurrent: Optional[jax.Array]) -> jax.Array:
    """Layer 1 after glimpse ``patch [..., G, G, C]`` taken at ``action``: ``h1_n = relu(W1 [g_n, h1_{n-1}] +
    b1)``, with ``W1[2 G_h:] h1_{n-1}`` given as ``recurrent`` (from `bottom_input`; None for h1 = 0)."""
    loc = jnp.clip(action.loc, -1.0, 1.0)
    where = jnp.concatenate([loc, jax.nn.one_hot(action.scale, self.num_scales, dtype=loc.dtype)], -1)
    g = jnp.concatenate([relu(self.glimpse_what(patch.reshape(patch.shape[:-3] + (-1,)))),
                         relu(self.glimpse_where(where))], -1)
    kernel, bias = self.core1.weights()
    y = g @ kernel[:2 * self.glimpse_hidden] + bias
    return relu(y if recurrent is None else y + recurrent)

  def bottom_input(self, h1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(W2[:D] h1, W1[2 G_h:] h1)``: layer 2's input term and layer 1's recurrent term, one matmul."""
    core2_k, core1_k = self.core2.weights()[0], self.core1.weights()[0]
    both = h1 @ jnp.concatenate([core2_k[:self.hidden_size], core1_k[2 * self.glimpse_hidden:]], 1)
    core2_in, core1_recurrent = jnp.split(both, 2, axis=-1)
    return core2_in, core1_recurrent

  def layer2(self, core2_in: jax.Array, recurrent: jax.Array) -> jax.Array:
    """``h2_n = relu(W2 [h1_n, h2_{n-1}] + b2)`` from its two terms: ``W2[:D] h1_n`` (`bottom_input`) and
    ``W2[D:] h2_{n-1} + b2`` (`heads`)."""
    return relu(core2_in + recurrent)

  def classify(self, h1: jax.Array) -> jax.Array:
    """Class logits ``[..., C]`` from layer 1."""
    return self.classifier(h1)

  def step(self, state: CoreState, patch: jax.Array, action: actions_lib.Action) -> CoreState:
    """One whole core update with glimpse ``patch`` taken at ``action`` (layer 1, then layer 2), composed of the
    methods above; the rollout interleaves them instead (it needs no layer-2 update after the last glimpse)."""
    _, core1_recurrent = self.bottom_input(state.h1)
    h1 = self.glimpse_update(patch, action, core1_recurrent)
    core2_in, _ = self.bottom_input(h1)
    core2_k, core2_b = self.core2.weights()
    return CoreState(h1=h1, h2=self.layer2(core2_in, state.h2 @ core2_k[self.hidden_size:] + core2_b))

  def __call__(self, lowres_image: jax.Array, patch: jax.Array, action: actions_lib.Action,
               label: jax.Array) -> tuple[Heads, jax.Array, jax.Array]:
    """Touches every layer (for `init`): returns (heads, logits, baseline) after one glimpse."""
    state = self.initial_state(lowres_image)
    heads, _ = self.heads(state.h2, self.label_rows(label))
    state = self.step(state, patch, action)
    return heads, self.classify(state.h1), self.baseline(state.h2)


class _InferenceNet(nn.Module):
  """``[stop_gradient(h2), onehot(y)] -> relu(W_q . + b_q) -> head_q``; its first layer's label rows are added
  by the caller (`AttentionModel.label_rows`)."""
  hidden_size: int
  num_classes: int
  inference_hidden: int
  head_kw: dict

  def setup(self):
    self.hidden = Linear(self.hidden_size + self.num_classes, self.inference_hidden, kernel_init=_he)
    self.head = ActionHead(self.inference_hidden, **self.head_kw)

  def __call__(self, h2: jax.Array, label_rows: jax.Array) -> actions_lib.ActionDist:
    kernel, _ = self.hidden.weights()
    return self.head(relu(jax.lax.stop_gradient(h2) @ kernel[:self.hidden_size] + label_rows))


def init_params(model: AttentionModel, key: jax.Array) -> dict[str, Any]:
  """Initial parameters (the ``'params'`` collection) for single-image inputs."""
  lr = jnp.zeros((model.lowres_size, model.lowres_size, model.channels), jnp.float32)
  patch = jnp.zeros((model.glimpse_size, model.glimpse_size, model.channels), jnp.float32)
  action = actions_lib.Action(loc=jnp.zeros((2,), jnp.float32), scale=jnp.zeros((), jnp.int32))
  return _jitted_init(model)(key, lr, patch, action, jnp.zeros((), jnp.int32))["params"]


@functools.lru_cache(maxsize=16)
def _jitted_init(model: AttentionModel):
  # One compiled init per model configuration: op-by-op initialisation compiles every initialiser separately
  # (seconds on a small CPU), and a fresh jax.jit(model.init) per call would recompile.
  return jax.jit(model.init)
