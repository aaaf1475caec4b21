"""What the PyTorch peer (`benchmarks.torch_peer`) implements, read off an MNIST config; importable without torch.

The peer is WS-RAM with the inference network q as proposal (`experiments/configs/mnist.py:wsram_q_cv`, the
default, and ``wsram_q``, ``quick``), with everything those variants can turn on:

* the exploration heuristics of Sec. 4.5: (1) the proposal tempered at any T (``heuristics.temperature``),
  (2) the coverage bonus (``heuristics.coverage_weight``, ``coverage_location_weight``), (3) the entropy bonus
  (``heuristics.entropy_weight``);
* control variates on or off, and every p-side coefficient (``p_baseline``);
* the optimiser: global-norm clipping (or none), Adam, ``policy_lr_scale``, and the ``warmup`` and ``decay``
  learning-rate schedules (a Python number per update, outside the timed graph's shapes).

`unsupported(config)` names what it lacks (another method or proposal, a learned location std, the sleep phase,
several runs in one program, an odd glimpse size), and `PeerConfig.from_config` refuses such a config with one
sentence (`errors.ConfigError`), which the benchmark binary reports before it compiles anything.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from wsram_jax import errors

__all__ = ["PeerConfig", "COMPILE_MODES", "unsupported", "learning_rate_factor"]

# The modes of `torch.compile` that `TorchPeer(compile_mode=...)` accepts ("default" is torch's mode=None).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def unsupported(config) -> Optional[str]:
  """What of `config` the peer does not implement, as a phrase; None when it implements all of it."""
  h = config.heuristics
  checks = [
      (config.method == "wsram", f"--config.method={config.method}"),
      (config.proposal == "inference_network", f"--config.proposal={config.proposal}"),
      (not config.model.learn_loc_std, "a learned location std (--config.model.learn_loc_std)"),
      (float(config.get("sleep_weight", 0.0)) == 0, "the sleep phase (--config.sleep_weight > 0)"),
      (int(config.get("num_runs", 1)) == 1, "several runs in one program (--config.num_runs > 1)"),
      (int(config.model.glimpse_size) % 2 == 0, "an odd glimpse size (its windows are not concentric)"),
      (float(h.temperature) > 0, "a temperature <= 0"),
  ]
  missing = [what for ok, what in checks if not ok]
  return ", ".join(missing) if missing else None


@dataclasses.dataclass(frozen=True)
class PeerConfig:
  """The sizes of the model and the step, and the settings of the loss and the optimiser that the peer reads."""
  batch_size: int = 32
  num_samples: int = 5
  num_glimpses: int = 4
  num_classes: int = 10
  glimpse_size: int = 12
  num_scales: int = 3
  lowres_size: int = 10
  hidden_size: int = 256
  loc_std: float = 0.15
  canvas_size: int = 100
  min_size: int = 21
  max_size: int = 56
  # The loss (`wsram_jax.objectives`).
  control_variates: bool = True
  p_baseline: str = "self_normalized"
  temperature: float = 1.0
  coverage_weight: float = 0.0
  coverage_location_weight: float = 1.0
  entropy_weight: float = 0.0
  # The optimiser (`wsram_jax.training.step.make_optimizer`).
  learning_rate: float = 1e-3
  grad_clip_norm: float = 10.0
  policy_lr_scale: float = 1.0
  warmup: tuple[float, int, int] = (1.0, 0, 0)  # start, hold_steps, ramp_steps
  decay: tuple[int, int, float] = (0, 0, 1.0)  # begin, steps, end

  @classmethod
  def from_config(cls, config, canvas_sizes: Mapping[str, int]) -> "PeerConfig":
    """From an MNIST ConfigDict and `wsram_jax.classifier.train.canvas_kwargs(config)`; `errors.ConfigError` (one
    sentence) for what the peer does not implement (`unsupported`)."""
    missing = unsupported(config)
    if missing:
      raise errors.ConfigError(
          f"The PyTorch peer implements WS-RAM with the inference network as proposal (wsram_q_cv, wsram_q, quick), "
          f"not {missing}; --notorch times the JAX step alone.")
    m, h = config.model, config.heuristics
    warmup, decay = config.get("warmup"), config.get("decay")
    return cls(batch_size=int(config.batch_size), num_samples=int(config.num_samples),
               num_glimpses=int(config.num_glimpses), num_classes=int(m.num_classes),
               glimpse_size=int(m.glimpse_size), num_scales=int(m.num_scales), lowres_size=int(m.lowres_size),
               hidden_size=int(m.hidden_size), loc_std=float(m.loc_std), canvas_size=int(canvas_sizes["canvas_size"]),
               min_size=int(canvas_sizes["min_size"]), max_size=int(canvas_sizes["max_size"]),
               control_variates=bool(config.control_variates), p_baseline=str(config.p_baseline),
               temperature=float(h.temperature), coverage_weight=float(h.coverage_weight),
               coverage_location_weight=float(h.coverage_location_weight), entropy_weight=float(h.entropy_weight),
               learning_rate=float(config.learning_rate), grad_clip_norm=float(config.grad_clip_norm),
               policy_lr_scale=float(config.get("policy_lr_scale", 1.0)),
               warmup=((float(warmup.start), int(warmup.hold_steps), int(warmup.ramp_steps)) if warmup is not None
                       else cls.warmup),
               decay=(int(decay.begin), int(decay.steps), float(decay.end)) if decay is not None else cls.decay)


def _linear(init: float, end: float, steps: int, begin: int, count: int) -> float:
  """`optax.linear_schedule(init, end, steps, begin)(count)`, in Python."""
  steps = max(steps, 1)
  done = min(max(count - begin, 0), steps)
  return (init - end) * (1.0 - done / steps) + end


def learning_rate_factor(cfg: PeerConfig, count: int) -> float:
  """The factor of update `count` (0 for the first): ``cfg.warmup`` times ``cfg.decay``, as
  `wsram_jax.training.step.learning_rate_multiplier` (1 when both are off)."""
  factor = 1.0
  start, hold, ramp = cfg.warmup
  if start != 1.0:
    factor *= _linear(start, 1.0, ramp, hold, count)
  begin, steps, end = cfg.decay
  if end != 1.0:
    factor *= _linear(1.0, end, steps, begin, count)
  return factor
