"""The WS-RAM + q train step in PyTorch, eager or under `torch.compile`: the side-by-side peer of wsram_jax's step.

Same work per step as `wsram_jax.classifier.train.make_train_step` for `experiments/configs/mnist.py:wsram_q_cv`
(the default model), with everything that config turns on and the rest `benchmarks.peer_config` lists:

    B digits drawn from the training set, each resized (bilinear, as two matmuls) and pasted on the canvas
    rollout: low-res context -> h2_0; M samples x N glimpses from the inference network q(a | y, I) tempered at
             T (heuristic (1): location std * sqrt(T), scale logits / T), scored under the prior p(a | I), under
             the tempered proposal r and under q itself; glimpse = the window of side size * 2**s centred at the
             clipped location, zero outside the canvas, average-pooled to size x size; two-layer ReLU core;
             classifier on layer 1
    wsram_losses (Eqns 8, 14, 16-19; wake-q on q's own density with the (q/r) control variate when r != q), the
             same surrogates and so the same gradients as `wsram_jax.estimators.wsram_losses`
    the entropy bonus (heuristic (3)) and the coverage bonus (heuristic (2)) when their weights are > 0
    metrics (ESS, bound, error, entropy, scale usage, gradient norm), global-norm clipping, Adam with the
             policies' learning-rate scale and the warmup / decay factor of the update

Same parameter tree as the JAX model (`params_from_flax` copies one), same layer sizes, the same math; only the
random streams differ (torch's generator instead of JAX's keys). `loss_and_metrics` takes canvases, labels and
the rollout's noise explicitly, so a test can feed it exactly what the JAX loss saw and compare the loss, the
gradients and the sampled glimpses.

Written as fast as eager PyTorch allows: no Python loop over the batch or the samples (one over the N glimpses);
the glimpse is one gather of the largest window per sample from an `unfold` view of the canvas padded once per
step (the windows of all scales share their centre pixel, so the smaller ones are static slices of it), average
pooling per scale and one indexed select; heads that read the same input share one matmul (``h2`` feeds the
prior head and core2's recurrent block, ``h1`` feeds core2's input block and core1's recurrent block); `addmm`
for every Dense; the label's rows of the inference net's first layer are gathered, not multiplied by a one-hot;
fused Adam (``torch.optim.Adam(fused=True)``, CPU support since torch 2.4) after foreach global-norm clipping.

``TorchPeer(..., compile_mode=MODE)`` runs the same `loss_and_metrics` under ``torch.compile(mode=MODE,
dynamic=False)`` (Inductor; MODE ``default`` is torch's default mode): the forward pass and the losses as one
graph, its backward compiled by AOTAutograd. Sampling the batch, clipping and Adam stay eager (the latter two are
already fused foreach kernels, and the learning rate changes every update under a schedule). The first step
compiles (`TorchPeer.compile_s`).

`crop_loop_glimpse` is the per-example loop that popular RAM code uses (a Python loop over the batch cropping each
patch), kept only to time the glimpse against it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.peer_config import COMPILE_MODES, PeerConfig, learning_rate_factor

__all__ = ["PeerConfig", "COMPILE_MODES", "params_from_flax", "glimpse", "crop_loop_glimpse", "wsram_losses",
           "coverage_regularizer", "TorchPeer"]

_LOG_2PI = math.log(2.0 * math.pi)


def params_from_flax(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """A flax ``'params'`` tree -> ``{'core1/kernel': tensor, ...}`` (float32 copies, requires_grad)."""
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(f"{prefix}{k}/", v)
      else:
        out[prefix + k] = torch.tensor(np.asarray(v, np.float32), requires_grad=True)

  walk("", params)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Glimpses.


def pad_canvases(canvases: torch.Tensor, *, size: int, num_scales: int) -> torch.Tensor:
  """``[B, H, W]`` -> ``[B, H + 2P, W + 2P]`` zero-padded by half the largest window (once per step)."""
  p = size * 2 ** (num_scales - 1) // 2
  return F.pad(canvases, (p, p, p, p))


def window_starts(loc: torch.Tensor, canvas_hw: tuple[int, int], *, size: int, num_scales: int) -> torch.Tensor:
  """First pixel (row, col) of the largest window in padded coordinates, for clipped ``loc [..., 2]``.

  ``round_half_up((loc + 1) / 2 * (H, W)) - w / 2 + P``: with even windows all scales share this centre pixel.
  """
  big = size * 2 ** (num_scales - 1)
  hw = torch.tensor(canvas_hw, dtype=torch.float32)
  centre = (loc + 1.0) * 0.5 * hw
  return torch.floor(centre + 0.5).long()  # - big // 2 + P, and P = big // 2


def glimpse(padded: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, *, size: int, num_scales: int,
            canvas_hw: tuple[int, int]) -> torch.Tensor:
  """Vectorised glimpses: ``padded [B, Hp, Wp]``, ``loc [B, M, 2]`` (clipped), ``scale [B, M]`` -> ``[B, M, size,
  size]``; the same windows and pooling as `wsram_jax.glimpse.extract_glimpse`."""
  b, m = scale.shape
  big = size * 2 ** (num_scales - 1)
  start = window_starts(loc, canvas_hw, size=size, num_scales=num_scales)  # [B, M, 2]
  views = padded.unfold(1, big, 1).unfold(2, big, 1)  # [B, Hp - big + 1, Wp - big + 1, big, big], no copy
  rows = torch.arange(b).unsqueeze(1).expand(b, m)
  window = views[rows, start[..., 0], start[..., 1]].reshape(b * m, 1, big, big)  # one gather
  pooled = []
  for s in range(num_scales):
    w = size * 2**s
    off = (big - w) // 2
    win = window[:, :, off:off + w, off:off + w]
    pooled.append(F.avg_pool2d(win, 2**s) if s else win)
  stacked = torch.cat(pooled, 1)  # [B M, S, size, size]
  return stacked[torch.arange(b * m), scale.reshape(-1)].reshape(b, m, size, size)


def crop_loop_glimpse(padded: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, *, size: int,
                      num_scales: int, canvas_hw: tuple[int, int]) -> torch.Tensor:
  """The same glimpses with a Python loop over the batch and samples, cropping each patch (as popular RAM code
  does); for timing only."""
  b, m = scale.shape
  big = size * 2 ** (num_scales - 1)
  start = window_starts(loc, canvas_hw, size=size, num_scales=num_scales).tolist()
  scales = scale.tolist()
  out = []
  for i in range(b):
    for j in range(m):
      s = scales[i][j]
      w = size * 2**s
      r, c = start[i][j][0] + (big - w) // 2, start[i][j][1] + (big - w) // 2
      patch = padded[i, r:r + w, c:c + w].unsqueeze(0)
      out.append(F.avg_pool2d(patch, 2**s)[0] if s else patch[0])
  return torch.stack(out).reshape(b, m, size, size)


# ---------------------------------------------------------------------------------------------------------------
# The estimator and the heuristics (the same losses as wsram_jax.estimators.wsram_losses and
# wsram_jax.exploration).


def wsram_losses(log_p_a: torch.Tensor, log_p_y: torch.Tensor, log_q_a: torch.Tensor, *,
                 control_variates: bool = True, p_baseline: str = "self_normalized",
                 log_q_own: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
  """``(loss_p, loss_q)`` from ``[B, M]`` log-probabilities: `wsram_jax.estimators.wsram_losses`.

  With w = softmax(log_p_a + log_p_y - log_q_a) and r = (p/q)_m (self-normalised, or / M): d loss_p / d
  log_p_y[m] = -w_m / B, d loss_p / d log_p_a[m] = -(w_m - r_m) / B (-w_m / B without control variates),
  d loss_q / d log_q[m] = -(w_m - b_m) / B with log_q = `log_q_own` when given (the samples came from another
  proposal: b_m = (q/r)_m, self-normalised or / M), else `log_q_a` (b_m = 1/M); no control variate: b_m = 0.
  """
  m = log_p_a.shape[-1]
  log_w = log_p_a + log_p_y - log_q_a.detach()
  bound = torch.logsumexp(log_w, -1) - math.log(m)
  if control_variates:
    log_ratio = (log_p_a - log_q_a).detach()
    r = torch.softmax(log_ratio, -1) if p_baseline == "self_normalized" else \
        torch.exp(log_ratio - math.log(m)) if p_baseline == "unbiased" else torch.exp(log_ratio)
    bound = bound - (r * (log_p_a - log_p_a.detach())).sum(-1)
  loss_p = -bound.mean()
  w = torch.softmax(log_w, -1).detach()
  log_q = log_q_a if log_q_own is None else log_q_own
  cross_entropy = -(w * log_q).sum(-1)
  if control_variates:
    if log_q_own is None:
      cross_entropy = cross_entropy + (log_q - log_q.detach()).sum(-1) / m
    else:
      log_ratio_q = (log_q_own - log_q_a).detach()
      b = torch.softmax(log_ratio_q, -1) if p_baseline == "self_normalized" else \
          torch.exp(log_ratio_q - math.log(m))
      cross_entropy = cross_entropy + (b * (log_q - log_q.detach())).sum(-1)
  return loss_p, cross_entropy.mean()


def coverage_regularizer(scale_probs: torch.Tensor, loc_mean: torch.Tensor, *, location_weight: float = 1.0,
                         max_location_variance: float = 1.0 / 3.0) -> torch.Tensor:
  """Heuristic (2), `wsram_jax.exploration.coverage_regularizer`: ``scale_probs [L, S]``, ``loc_mean [L, 2]`` (the
  prior's, every glimpse of every sample) -> ``log S - H[mean scale probs] + location_weight * mean_c (1 -
  min(var_c, v_max) / v_max)``."""
  marginal = scale_probs.mean(0)
  tiny = torch.finfo(marginal.dtype).tiny
  scale_term = math.log(scale_probs.shape[-1]) + (marginal * torch.log(marginal.clamp(min=tiny))).sum()
  variance = ((loc_mean - loc_mean.mean(0)) ** 2).mean(0)
  location_term = (1.0 - variance.clamp(max=max_location_variance) / max_location_variance).mean()
  return scale_term + location_weight * location_term


# ---------------------------------------------------------------------------------------------------------------
# The step.


def _interpolation(start: torch.Tensor, side: torch.Tensor, out_len: int, in_len: int) -> torch.Tensor:
  """``[B, out_len, in_len]`` bilinear weights placing ``in_len`` pixels resized to ``side`` at ``start``
  (`wsram_jax.data.canvas._interpolation_matrix`, batched)."""
  i = torch.arange(out_len, dtype=torch.float32)
  u = (i[None] - start[:, None] + 0.5) * (in_len / side[:, None].float()) - 0.5
  k = torch.arange(in_len, dtype=torch.float32)
  weights = torch.clamp(1.0 - (u[:, :, None] - k).abs(), min=0.0)
  inside = (i[None] >= start[:, None]) & (i[None] < (start + side)[:, None])
  return weights * inside[:, :, None]


def _log_prob(mean, log_softmax_logits, loc, scale, std):
  """K = 1 action log-density: Gaussian location (fixed std) times Categorical scale; broadcasts ``[B, (M)]``."""
  z = (loc - mean) / std
  loc_lp = -0.5 * (z * z).sum(-1) - 2.0 * math.log(std) - _LOG_2PI
  return loc_lp + log_softmax_logits.gather(-1, scale.unsqueeze(-1)).squeeze(-1)


# The attention policies' parameters (`wsram_jax.attention.policy_mask`): their step is `policy_lr_scale` times.
_POLICY_KEYS = ("prior", "inference")


class TorchPeer:
  """The train step, ``step() -> metrics``, on the training set given to the constructor; eager, or under
  ``torch.compile(mode=compile_mode)`` (`COMPILE_MODES`)."""

  def __init__(self, cfg: PeerConfig, params: Mapping[str, Any], images: np.ndarray, labels: np.ndarray, *,
               seed: int = 0, compile_mode: Optional[str] = None):
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
      raise ValueError(f"Unknown torch.compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}.")
    self.cfg = cfg
    self.params = params_from_flax(params) if not isinstance(next(iter(params.values())), torch.Tensor) \
        else params
    self.images = torch.as_tensor(np.asarray(images))
    self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    self.generator = torch.Generator().manual_seed(seed)
    self._trainable = list(self.params.values())
    groups = [{"params": [t for k, t in self.params.items() if (k.split("/")[0] in _POLICY_KEYS) == policy],
               "lr_scale": cfg.policy_lr_scale if policy else 1.0} for policy in (False, True)]
    self.optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(0.9, 0.999),
                                      eps=1e-8, fused=True)
    self.updates = 0  # the update count of the learning-rate schedule
    self.compile_mode = compile_mode
    self.compile_s = None  # wall seconds of the first step under torch.compile (the compilation and one step)
    self.loss_fn = self.loss_and_metrics if compile_mode is None else torch.compile(
        self.loss_and_metrics, mode=None if compile_mode == "default" else compile_mode, dynamic=False)

  # -- data ---------------------------------------------------------------------------------------------------
  def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
    """B digits drawn uniformly, each resized to a random side and pasted at a random place: ``[B, H, W]``."""
    c, g = self.cfg, self.generator
    b, size = c.batch_size, c.canvas_size
    index = torch.randint(0, self.images.shape[0], (b,), generator=g)
    digits = self.images[index].float() / 255.0
    side = torch.randint(c.min_size, c.max_size + 1, (b,), generator=g)
    room = (size - side + 1).float()
    top = (torch.rand(b, generator=g) * room).long()
    left = (torch.rand(b, generator=g) * room).long()
    rows = _interpolation(top, side, size, digits.shape[1])
    cols = _interpolation(left, side, size, digits.shape[2])
    canvases = torch.bmm(torch.bmm(rows, digits), cols.transpose(1, 2)).clamp_(0.0, 1.0)
    return canvases, self.labels[index]

  def draw_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normal ``[B, M, N, 2]`` for the locations and uniform ``[B, M, N]`` for the scales."""
    c, g = self.cfg, self.generator
    shape = (c.batch_size, c.num_samples, c.num_glimpses)
    return torch.randn(shape + (2,), generator=g), torch.rand(shape, generator=g)

  # -- the loss -----------------------------------------------------------------------------------------------
  def loss_and_metrics(self, canvases: torch.Tensor, labels: torch.Tensor, normal: torch.Tensor,
                       uniform: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch (``canvases [B, H, W]``, ``labels [B]``) with the given noise, and its metrics
    (with the sampled actions: ``loc [B, M, N, 2]`` unclipped, ``scale [B, M, N]``)."""
    c, p = self.cfg, self.params
    b, m, n_glimpses, s_ = canvases.shape[0], c.num_samples, c.num_glimpses, c.num_scales
    d, g_ = c.hidden_size, c.glimpse_size
    bm = b * m
    std = c.loc_std
    tempered = c.temperature != 1.0
    r_std = std * math.sqrt(c.temperature)  # heuristic (1): the proposal r is q tempered at T
    hw = (canvases.shape[1], canvases.shape[2])
    gh = p["glimpse_what/kernel"].shape[1]
    labels = labels.long()

    # Heads that read the same input share one matmul. Parameters and outputs are cut with `torch.split` (whose
    # backward is one `cat`), not by slicing (whose backward fills a zero tensor per slice).
    k2_in, k2_rec = torch.split(p["core2/kernel"], [d, d])
    k1_in, k1_rec = torch.split(p["core1/kernel"], [2 * gh, d])
    k_inf_h, k_inf_y = torch.split(p["inference/hidden/kernel"], [d, c.num_classes])
    w_heads = torch.cat([p["prior/loc/kernel"], p["prior/scale/kernel"]], 1)
    b_heads = torch.cat([p["prior/loc/bias"], p["prior/scale/bias"]])
    w_top, b_top = torch.cat([w_heads, k2_rec], 1), torch.cat([b_heads, p["core2/bias"]])
    w_bottom = torch.cat([k2_in, k1_rec], 1)
    w_q = torch.cat([p["inference/head/loc/kernel"], p["inference/head/scale/kernel"]], 1)
    b_q = torch.cat([p["inference/head/loc/bias"], p["inference/head/scale/bias"]])
    inf_label_rows = k_inf_y[labels] + p["inference/hidden/bias"]  # [B, H_q]: onehot(y) @ W_y + b

    def prior(h2, last):  # p's distribution and, unless last, core2's recurrent term for the next glimpse
      if last:
        loc, logits = torch.split(torch.addmm(b_heads, h2, w_heads), [2, s_], 1)
        rec = None
      else:
        loc, logits, rec = torch.split(torch.addmm(b_top, h2, w_top), [2, s_, d], 1)
      return torch.tanh(loc), torch.log_softmax(logits, -1), rec

    def inference(h2, label_rows):  # q's distribution from stop_gradient(h2), and the scale logits
      hid = torch.relu(torch.addmm(label_rows, h2.detach(), k_inf_h))
      loc, logits = torch.split(torch.addmm(b_q, hid, w_q), [2, s_], 1)
      return torch.tanh(loc), logits

    def glimpse_features(patch, loc, scale):
      what = torch.relu(torch.addmm(p["glimpse_what/bias"], patch.reshape(bm, -1), p["glimpse_what/kernel"]))
      where_in = torch.cat([loc.reshape(bm, 2), F.one_hot(scale.reshape(bm), s_).float()], 1)
      where = torch.relu(torch.addmm(p["glimpse_where/bias"], where_in, p["glimpse_where/kernel"]))
      return torch.cat([what, where], 1)

    padded = pad_canvases(canvases, size=g_, num_scales=s_)
    lr = c.lowres_size
    lowres = canvases.reshape(b, lr, hw[0] // lr, lr, hw[1] // lr).mean((2, 4)).reshape(b, lr * lr)
    h2 = torch.relu(torch.addmm(p["context/bias"], lowres, p["context/kernel"]))  # [B, D], shared by the M
    prior_mean, prior_lsm, rec2 = prior(h2, n_glimpses == 1)
    prior_mean, prior_lsm = prior_mean[:, None], prior_lsm[:, None]  # [B, 1, ...]: broadcast over the M
    q_mean, q_logits = inference(h2, inf_label_rows)
    q_mean, q_logits = q_mean[:, None], q_logits[:, None]
    if rec2 is not None:
      rec2 = rec2.repeat_interleave(m, 0)
    label_rows = inf_label_rows.repeat_interleave(m, 0)

    log_p_a = log_q_a = log_r_a = scale_entropy = 0.0
    locs, scales, prior_means, prior_probs = [], [], [], []
    h1 = rec1 = None
    for n in range(n_glimpses):
      if n > 0:
        h2_in, rec1 = torch.split(h1 @ w_bottom, [d, d], 1)  # core2's input block, core1's recurrent block
        h2 = torch.relu(h2_in + rec2)
        prior_mean, prior_lsm, rec2 = prior(h2, n == n_glimpses - 1)
        prior_mean, prior_lsm = prior_mean.reshape(b, m, 2), prior_lsm.reshape(b, m, s_)
        q_mean, q_logits = inference(h2, label_rows)
        q_mean, q_logits = q_mean.reshape(b, m, 2), q_logits.reshape(b, m, s_)
      q_lsm = torch.log_softmax(q_logits, -1)
      r_lsm = torch.log_softmax(q_logits.detach() / c.temperature, -1) if tempered else q_lsm.detach()
      # a_n ~ r: location mean + std * noise, scale by inverse CDF.
      loc = (q_mean.detach() + r_std * normal[:, :, n])
      cdf = torch.cumsum(r_lsm.exp(), -1)[..., :-1]
      scale = (uniform[:, :, n, None] >= cdf).sum(-1)
      log_p_a = log_p_a + _log_prob(prior_mean, prior_lsm.expand(b, m, s_), loc, scale, std)
      log_q_a = log_q_a + _log_prob(q_mean, q_lsm.expand(b, m, s_), loc, scale, std)  # q's own density
      if tempered:  # the proposal's density: only its value enters the losses
        log_r_a = log_r_a + _log_prob(q_mean.detach(), r_lsm.expand(b, m, s_), loc, scale, r_std)
      scale_entropy = scale_entropy - (prior_lsm.exp() * prior_lsm).sum(-1).mean()  # the prior's, differentiable
      if c.coverage_weight > 0:
        prior_means.append(prior_mean.expand(b, m, 2))
        prior_probs.append(prior_lsm.exp().expand(b, m, s_))
      locs.append(loc)
      scales.append(scale)
      loc = loc.clamp(-1.0, 1.0)
      patch = glimpse(padded, loc, scale, size=g_, num_scales=s_, canvas_hw=hw)
      x = torch.addmm(p["core1/bias"], glimpse_features(patch, loc, scale), k1_in)
      h1 = torch.relu(x if rec1 is None else x + rec1)

    logits = torch.addmm(p["classifier/bias"], h1, p["classifier/kernel"]).reshape(b, m, -1)
    log_p_y = torch.log_softmax(logits, -1).gather(-1, labels[:, None, None].expand(b, m, 1)).squeeze(-1)
    proposal_lp = log_r_a if tempered else log_q_a
    loss_p, loss_q = wsram_losses(log_p_a, log_p_y, proposal_lp, control_variates=c.control_variates,
                                  p_baseline=c.p_baseline, log_q_own=log_q_a if tempered else None)
    loss = loss_p + loss_q
    # The prior's mean entropy over [B, M, N] (`actions.entropy`: the location's, fixed, plus the scale's).
    entropy = scale_entropy / n_glimpses + 2 * (0.5 * (_LOG_2PI + 1.0) + math.log(std))
    if c.coverage_weight > 0:
      loss = loss + c.coverage_weight * coverage_regularizer(
          torch.stack(prior_probs, 2).reshape(-1, s_), torch.stack(prior_means, 2).reshape(-1, 2),
          location_weight=c.coverage_location_weight)
    if c.entropy_weight > 0:
      loss = loss - c.entropy_weight * entropy

    with torch.no_grad():
      log_w = log_p_a + log_p_y - proposal_lp
      lse = torch.logsumexp(log_w, -1)
      scale = torch.stack(scales, -1)
      usage = F.one_hot(scale, s_).float().mean((0, 1, 2))
      metrics = {
          "ess": torch.exp(2.0 * lse - torch.logsumexp(2.0 * log_w, -1)).mean(),
          "bound": (lse - math.log(m)).mean(),
          "log_p_y": log_p_y.mean(),
          "error": (logits.argmax(-1) != labels[:, None]).float().mean(),
          "entropy": entropy.detach(),
          "loss_p": loss_p.detach(), "loss_q": loss_q.detach(), "loss": loss.detach(),
          "reward": log_p_y.mean(), "loc": torch.stack(locs, 2), "scale": scale,
      }
      for s in range(s_):
        metrics[f"scale_usage_{s}"] = usage[s]
    return loss, metrics

  # -- the update ---------------------------------------------------------------------------------------------
  def update(self, canvases: torch.Tensor, labels: torch.Tensor, normal: torch.Tensor,
             uniform: torch.Tensor) -> dict[str, torch.Tensor]:
    """One update on the given batch and noise: the loss (`loss_fn`), its backward, then `apply_gradients`."""
    first = self.compile_mode is not None and self.compile_s is None
    t0 = time.perf_counter()
    for t in self._trainable:
      t.grad = None
    loss, metrics = self.loss_fn(canvases, labels, normal, uniform)
    loss.backward()
    if first:
      self.compile_s = round(time.perf_counter() - t0, 3)
    metrics["grad_norm"] = self.apply_gradients(finite=bool(torch.isfinite(loss)))
    return metrics

  def apply_gradients(self, finite: bool = True) -> torch.Tensor:
    """Global-norm clipping of the parameters' ``.grad`` and Adam at the learning rate of this update (policies'
    scale, warmup and decay factor), skipped unless the gradient norm is finite and `finite`; returns the norm."""
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self._trainable]
    for t, g in zip(self._trainable, grads):
      t.grad = g
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # pylint: disable=protected-access
    if self.cfg.grad_clip_norm > 0:
      scale = torch.clamp(self.cfg.grad_clip_norm / norm, max=1.0)
      torch._foreach_mul_(grads, scale)  # pylint: disable=protected-access
    if finite and bool(torch.isfinite(norm)):
      factor = learning_rate_factor(self.cfg, self.updates)
      for group in self.optimizer.param_groups:
        group["lr"] = self.cfg.learning_rate * group["lr_scale"] * factor
      self.optimizer.step()
      self.updates += 1
    return norm

  def step(self) -> dict[str, torch.Tensor]:
    """One update on a batch and noise drawn from the peer's generator (`update`)."""
    canvases, labels = self.sample_batch()
    normal, uniform = self.draw_noise()
    return self.update(canvases, labels, normal, uniform)
