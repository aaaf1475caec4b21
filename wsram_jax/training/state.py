"""What a run is between two updates (`TrainState`, exactly the checkpoint's pytree) and the update that leaves
it unchanged when the loss or the gradients are not finite (`guarded_update`, the NaN guard).

`TrainState.nonfinite_step` is set by the step to the first step whose loss or gradients were not finite; that
step and all after it leave the parameters unchanged. The loop (`training.loop`) looks at it only when it logs
and before it saves, so no NaN is ever checkpointed and no host round-trip is added to every step. For R runs
(`training.runs`) every field has a leading run axis ``[R, ...]``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TrainState", "guarded_update", "nonfinite_steps", "scalar_step"]


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: the checkpoint is exactly this pytree.

  Attributes:
    step: [] int32, the number of updates applied.
    params: model parameters (theta and eta).
    opt_state: optax state.
    extra: task state beyond the optimiser (e.g. a moving-average baseline); any pytree.
    key: [2] uint32, the run's base PRNG key; step t uses fold_in(key, t).
    nonfinite_step: [] int32, the first step whose loss or gradients were not finite, or -1.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any
  key: jax.Array
  nonfinite_step: jax.Array

  @classmethod
  def create(cls, *, params, opt_state, key, extra=()):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, extra=extra,
               key=key, nonfinite_step=jnp.full((), -1, jnp.int32))


def guarded_update(state: TrainState, grads: Any, apply_updates: Callable[[Any, Any], tuple[Any, Any]],
                   loss: jax.Array, new_extra: Any = None, *, grad_norm: Optional[jax.Array] = None) -> TrainState:
  """Applies `apply_updates(params, opt_state) -> (params, opt_state)` only if loss and grads are finite.

  Records the first non-finite step in `nonfinite_step`; from then on the state stays as it was (except for
  `step`), so what the loop may later save is the last good state. For use inside a jitted step.

  The gradients count as finite when their global norm is (pass it as `grad_norm` if the step computes it
  anyway, e.g. for clipping): one reduction instead of a finiteness test per parameter array, which on the CPU
  saves dozens of compiled kernels. A gradient so large that its squared norm overflows float32 (about 1.8e19)
  counts as non-finite too.
  """
  if grad_norm is None:
    grad_norm = sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  ok = finite & (state.nonfinite_step < 0)
  params, opt_state = apply_updates(state.params, state.opt_state)
  extra = state.extra if new_extra is None else new_extra
  pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  return state.replace(
      step=state.step + 1,
      params=pick(params, state.params),
      opt_state=pick(opt_state, state.opt_state),
      extra=pick(extra, state.extra),
      nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step))


def nonfinite_steps(state: TrainState) -> np.ndarray:
  """``state.nonfinite_step`` on the host, ``[R]`` (one entry for a single run): -1 for a run that is finite."""
  return np.asarray(jax.device_get(state.nonfinite_step)).reshape(-1)


def scalar_step(state: TrainState) -> int:
  """The number of updates applied (the same for every run of a stacked state)."""
  return int(np.max(np.asarray(jax.device_get(state.step))))
