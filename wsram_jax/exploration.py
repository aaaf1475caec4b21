r"""The exploration heuristics of Section 4.5, for VAR and WS-RAM alike (after Ba, Mnih, Kavukcuoglu, 2015).

Each is a pure function returning a loss to *add* to the objective's loss, with its own weight:

1. Raising the proposal's temperature: a proposal transform, `wsram_jax.proposals.tempered`, owned by the
   model code (the samples come from the tempered distribution; the importance weights of Eqn 7 account for
   it through log q).
2. `coverage_regularizer`: encourages the attention prior to view all scales and all image locations, across
   the batch. With the prior's scale probabilities pi[b,m,n,s] and location means mu[b,m,n,c]
   (b: example, m: sample, n: glimpse, s: scale, c: coordinate), L = B M N, and a variance cap v_max:

     pi_bar_s = 1/L sum_{b,m,n} pi[b,m,n,s]                          the batch-marginal of scales
     H        = -sum_s pi_bar_s log pi_bar_s                         in [0, log S]
     v_c      = 1/L sum_{b,m,n} (mu[b,m,n,c] - mean_{b,m,n} mu[.,c])^2   the spread of the location means
     loss     = scale_weight (log S - H) + location_weight 1/2 sum_c (1 - min(v_c, v_max) / v_max)

   Each term is in [0, 1] (scale term: [0, log S]) and is 0 exactly when the scale marginal is uniform and
   each coordinate's variance reaches v_max; v_max = 1/3, the variance of a uniform distribution on [-1, 1],
   by default. When every example uses one scale the scale term is its maximum log S: the collapse the paper
   reports for VAR without the heuristics (Figure 3). The gradient flows into both inputs; above the cap the
   location term is flat (no gradient).
3. `entropy_bonus`: `-weight mean(entropy)`, encouraging a high-entropy attention policy at each glimpse.
"""
import chex
import jax.numpy as jnp

Array = chex.Array


def coverage_regularizer(prior_scale_probs: Array, prior_loc_mean: Array, *, scale_weight: float = 1.0,
                         location_weight: float = 1.0, max_location_variance: float = 1.0 / 3.0) -> Array:
  """The coverage loss of heuristic (2) (formula in the module docstring); minimised at full coverage.

  Args:
    prior_scale_probs: `[B, M, N, S]` the prior's scale probabilities at each glimpse.
    prior_loc_mean: `[B, M, N, 2]` the prior's location means, in [-1, 1]^2.
    scale_weight: weight of the scale term `log S - H[pi_bar]`.
    location_weight: weight of the location term.
    max_location_variance: v_max, the per-coordinate variance beyond which spread is not rewarded further.

  Returns:
    The scalar loss, >= 0.
  """
  chex.assert_rank([prior_scale_probs, prior_loc_mean], 4)
  chex.assert_type([prior_scale_probs, prior_loc_mean], float)
  chex.assert_equal_shape_prefix([prior_scale_probs, prior_loc_mean], 3)
  num_scales = prior_scale_probs.shape[-1]

  scale_marginal = jnp.mean(prior_scale_probs, axis=(0, 1, 2))  # [S]
  tiny = jnp.finfo(scale_marginal.dtype).tiny
  entropy = -jnp.sum(scale_marginal * jnp.log(jnp.maximum(scale_marginal, tiny)))
  scale_term = jnp.log(num_scales).astype(entropy.dtype) - entropy

  locations = prior_loc_mean.reshape(-1, prior_loc_mean.shape[-1])  # [L, 2]
  variance = jnp.mean((locations - jnp.mean(locations, axis=0)) ** 2, axis=0)  # [2]
  location_term = jnp.mean(1.0 - jnp.minimum(variance, max_location_variance) / max_location_variance)
  return scale_weight * scale_term + location_weight * location_term


def entropy_bonus(entropy: Array, *, weight: float = 1.0) -> Array:
  """Heuristic (3): `-weight * mean(entropy)` over all axes; adding it to a loss rewards high entropy.

  Args:
    entropy: `[..., N]` the entropy of the attention prior at each glimpse (from the rollout).
    weight: its weight.

  Returns:
    The scalar loss; d loss / d entropy = -weight / (number of elements).
  """
  chex.assert_rank(entropy, {1, 2, 3, 4})
  chex.assert_type(entropy, float)
  return -weight * jnp.mean(entropy)
