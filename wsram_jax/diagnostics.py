r"""Diagnostics of the estimators: gradient variance (the paper's Figure 2, middle) and effective sample size
(Figure 2, right).

Gradient variance. At fixed parameters and for ONE minibatch, draw K independent gradient estimates
g^1..g^K (K keys, the samples a^m being the only randomness) and summarise, over the P scalar parameters
of a group (or all of them):

  grad_var             = 1/P sum_p Var_k[g^k_p]                 (unbiased variance over k, ddof = 1)
  grad_var_normalized  = sum_p Var_k[g^k_p] / sum_p (mean_k g^k_p)^2
                       = trace of the covariance / squared norm of the mean gradient
  grad_mean_sq_norm    = sum_p (mean_k g^k_p)^2

The normalised one is scale-free (comparable across parameter groups and methods whose gradients differ in
size); it is a noise-to-signal ratio, and its denominator includes the mean's own noise, trace/K.

ESS. `ess_summary(log_w [B, M])` summarises `estimators.effective_sample_size` over a batch.
"""
from typing import Any, Callable, Optional, Union

import chex
import jax
import jax.numpy as jnp

from wsram_jax import estimators

Array = chex.Array
# grad_fn(params, batch, key) -> a pytree of gradients with the structure of params.
GradFn = Callable[[Any, Any, chex.PRNGKey], Any]
Labels = Union[Any, Callable[[Any], Any]]


def gradient_variance(grad_fn: GradFn, params: Any, batch: Any, key: chex.PRNGKey, *,
                      num_estimates: int = 16, labels: Optional[Labels] = None) -> dict[str, Array]:
  """Variance of K independent gradient estimates of one minibatch at fixed parameters.

  The K estimates are `jax.vmap(grad_fn, in_axes=(None, None, 0))(params, batch, jax.random.split(key, K))`.
  Results are deterministic given the key. The function is traceable: for speed, call it inside `jax.jit`
  with grad_fn, num_estimates and labels bound (e.g. by functools.partial).

  Args:
    grad_fn: `(params, batch, key) -> grads`, a pytree with the structure of params.
    params: the parameters, held fixed.
    batch: the minibatch, held fixed.
    key: consumed to make the K estimates' keys.
    num_estimates: K >= 2.
    labels: group names: a pytree of strings with the structure of params or a prefix of it (like optax's
      multi_transform labels, e.g. `{'theta': 'theta', 'eta': 'eta'}`), or a callable params -> such a tree.
      None: only the '/all' entries.

  Returns:
    A flat dict of scalars: 'grad_var/all', 'grad_var_normalized/all', 'grad_mean_sq_norm/all', and the same
    with '/<group>' for each group name in labels.
  """
  if num_estimates < 2:
    raise ValueError(f"gradient_variance needs num_estimates >= 2; got {num_estimates}.")
  keys = jax.random.split(key, num_estimates)
  grads = jax.vmap(grad_fn, in_axes=(None, None, 0))(params, batch, keys)
  return gradient_summary(grads, labels=labels, params=params)


def gradient_summary(grads: Any, *, labels: Optional[Labels] = None, params: Any = None) -> dict[str, Array]:
  """The summaries of `gradient_variance` (module docstring) of K gradient estimates made by any means.

  Args:
    grads: a pytree of arrays with a leading axis K >= 2 (estimate k of every parameter), e.g. from
      `classifier.inspection.gradient_estimates`.
    labels: group names, as for `gradient_variance`: a pytree (or prefix) of strings with the structure of one
      estimate, or a callable of `params` that makes one.
    params: what a callable `labels` is given (default: the first estimate).

  Returns:
    The flat dict of scalars of `gradient_variance`.
  """
  num_estimates = jax.tree.leaves(grads)[0].shape[0]
  if num_estimates < 2:
    raise ValueError(f"gradient_summary needs K >= 2 estimates; got {num_estimates}.")

  def sums(tree) -> tuple[Array, Array, int]:
    """(sum of per-parameter variances, squared norm of the mean, number of parameters) over a subtree."""
    leaves = jax.tree.leaves(tree)
    var = sum(jnp.sum(jnp.var(g, axis=0, ddof=1)) for g in leaves)
    mean_sq = sum(jnp.sum(jnp.mean(g, axis=0) ** 2) for g in leaves)
    count = sum(g[0].size for g in leaves)
    return var, mean_sq, count

  groups = {"all": [grads]}
  if labels is not None:
    if callable(labels):
      labels = labels(jax.tree.map(lambda g: g[0], grads) if params is None else params)
    label_leaves, label_def = jax.tree.flatten(labels)
    for name, subtree in zip(label_leaves, label_def.flatten_up_to(grads)):
      groups.setdefault(str(name), []).append(subtree)

  metrics = {}
  for name, subtrees in groups.items():
    var, mean_sq, count = (sum(parts) for parts in zip(*(sums(t) for t in subtrees)))
    metrics[f"grad_var/{name}"] = var / max(count, 1)
    metrics[f"grad_var_normalized/{name}"] = var / mean_sq
    metrics[f"grad_mean_sq_norm/{name}"] = mean_sq
  return metrics


def ess_summary(log_w: Array, *, low_threshold: float = 1.5) -> dict[str, Array]:
  """Summary of the effective sample size `1 / sum_m w_m^2` over a batch of examples.

  Args:
    log_w: `[B, M]` log importance weights (Eqn 7).
    low_threshold: an example counts as degenerate when its ESS is below this.

  Returns:
    A flat dict of scalars: 'ess/mean', 'ess/min', 'ess/max', 'ess/mean_fraction' (mean ESS / M),
    'ess/frac_low' (fraction of examples with ESS < low_threshold), 'ess/max_weight' (mean over examples of
    the largest normalised weight).
  """
  chex.assert_rank(log_w, 2)
  chex.assert_type(log_w, float)
  num_samples = log_w.shape[-1]
  ess = estimators.effective_sample_size(log_w)
  return {
      "ess/mean": jnp.mean(ess),
      "ess/min": jnp.min(ess),
      "ess/max": jnp.max(ess),
      "ess/mean_fraction": jnp.mean(ess) / num_samples,
      "ess/frac_low": jnp.mean((ess < low_threshold).astype(log_w.dtype)),
      "ess/max_weight": jnp.mean(jnp.max(estimators.normalized_weights(log_w), axis=-1)),
  }
