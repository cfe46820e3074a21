"""The GRPO objective (DeepSeekMath Sec. 4.1.2; UAE Sec. 2.1 uses it with the reconstruction reward).

For a group of G outputs o_1..o_G of one input, rewards r_i:

  advantage   A_i = (r_i - mean(r)) / (std(r) + eps_std)          (outcome supervision: every
              token of o_i gets A_i; std unbiased, as TRL's GRPOTrainer computes it)
  ratio       rho_it = pi(o_it | ...) / pi_old(o_it | ...) = exp(logp - old_logp)
  surrogate   L_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
  KL (k3)     D_it = exp(ref_logp - logp) - (ref_logp - logp) - 1  (unbiased, >= 0; Schulman's k3)
  per token   l_it = L_it + beta D_it
  reduction   "sequence" (DeepSeekMath): mean over sequences of (sum_t l_it m_it / sum_t m_it);
              "token" (DAPO / TRL's "dapo"): sum l m / sum m over all tokens of the batch.

``m`` is the completion mask (sampled tokens up to and including the stop token). With one
update per rollout batch (``updates_per_batch = 1``) old_logp equals logp numerically and the
ratio is 1 (its gradient is the policy gradient); several updates reuse the batch with the same
old_logp (PPO-style), where the clip becomes active.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

REDUCTIONS = ("sequence", "token")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8          # G
    clip_eps_low: float = 0.2    # eps
    clip_eps_high: float = 0.2
    kl_beta: float = 0.04        # beta (DeepSeekMath's value)
    std_eps: float = 1e-4        # TRL's
    reduction: str = "sequence"
    scale_by_std: bool = True    # False: Dr. GRPO's A_i = r_i - mean(r)

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction {self.reduction!r}: one of {REDUCTIONS}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages are normalised within a group)")


def group_advantages(rewards: jax.Array, group_size: int, *, std_eps: float = 1e-4,
                     scale_by_std: bool = True) -> jax.Array:
    """(N*G,) rewards, groups contiguous -> (N*G,) advantages normalised within each group."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    a = r - mean
    if scale_by_std:
        std = jnp.sqrt(jnp.sum(jnp.square(a), axis=1, keepdims=True) / (group_size - 1))
        a = a / (std + std_eps)
    return a.reshape(-1)


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, advantages: jax.Array,
              mask: jax.Array, c: GRPOConfig) -> tuple[jax.Array, dict]:
    """logp / old_logp / ref_logp (N, T) per-token log-probs of the sampled tokens (logp carries
    the gradient), advantages (N,), mask (N, T) bool. Returns (loss, metrics)."""
    m = mask.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(old_logp)
    adv = jax.lax.stop_gradient(advantages)[:, None]
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - c.clip_eps_low, 1.0 + c.clip_eps_high)
    per_tok = -jnp.minimum(ratio * adv, clipped * adv)
    if ref_logp is not None and c.kl_beta:
        d = jax.lax.stop_gradient(ref_logp) - logp
        kl = jnp.exp(d) - d - 1.0
        per_tok = per_tok + c.kl_beta * kl
    else:
        kl = jnp.zeros_like(logp)
    n_tok = jnp.sum(m, axis=1)
    if c.reduction == "sequence":
        loss = jnp.mean(jnp.sum(per_tok * m, axis=1) / jnp.maximum(n_tok, 1.0))
    else:
        loss = jnp.sum(per_tok * m) / jnp.maximum(jnp.sum(m), 1.0)
    total = jnp.maximum(jnp.sum(m), 1.0)
    is_clipped = ((ratio < 1.0 - c.clip_eps_low) & (adv < 0)) | ((ratio > 1.0 + c.clip_eps_high) & (adv > 0))
    metrics = {"kl": jnp.sum(kl * m) / total,
               "clip_fraction": jnp.sum(is_clipped * m) / total,
               "ratio_mean": jnp.sum(ratio * m) / total}
    return loss, metrics
