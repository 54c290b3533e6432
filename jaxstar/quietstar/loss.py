"""Quiet-STaR losses from per-token quantities (spec/quietstar.md §3), as pure functions.

Shapes: B documents, P copies each (rows n = b * P + p, adjacent), N = B * P, L positions,
A = n_ahead_talk talk steps, T = sampled thought tokens (n_ahead - 3).

  NLL     = w_base * mean(base CE) + (1 - w_base) * mean_k mean(talk CE_k)
  reward  R[n, i] = sum_k (base CE[i + k] - talk CE_k[n, i])    (detached; i <= L - 2 - A)
  advantage = R - mean over the P copies of the same document and position, positive part
  policy  = mean_t mean_{n, i <= L-2-A} (-advantage * logprob_s)
  total   = NLL + policy_weight * policy
Means over targets count only real (non-padding) targets; the policy mean counts every row and
every position i <= L - 2 - A, padded or not, as the official code does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxstar.model import attention
from jaxstar.quietstar.config import QuietStarConfig


def target_masks(mask_bl, talk: int, segment_ids_bl=None):
  """Real-target masks: base [B, L] (x_{i+1} real) and talk [B, L, A] (x_{i+k+1} real).

  In a packed row (`segment_ids_bl`) a target in the next document is not a real target.
  """
  m = mask_bl.astype(jnp.float32)
  shifted = [jnp.concatenate([m[:, k:], jnp.zeros_like(m[:, :k])], axis=1)
             for k in range(1, talk + 1)]
  if segment_ids_bl is not None:
    shifted = [s * attention.same_segment_ahead(segment_ids_bl, k)
               for k, s in enumerate(shifted, 1)]
  return shifted[0], jnp.stack(shifted, axis=-1)


def masked_mean(x, weights):
  """sum(x * weights) / max(sum(weights), 1)."""
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def nll_loss(base_ce_bl, talk_ce_nla, base_mask_bl, talk_mask_bla, passes: int,
             base_weight: float = 0.5):
  """w * mean base CE + (1 - w) * (1/A) sum_k mean talk CE_k. Returns (nll, base, talk means).

  Args:
    base_ce_bl: [B, L] base cross-entropies; talk_ce_nla: [N, L, A] mixed cross-entropies.
    base_mask_bl: [B, L] and talk_mask_bla: [B, L, A] real-target masks.
  """
  base = masked_mean(base_ce_bl, base_mask_bl)
  talk_mask = jnp.repeat(talk_mask_bla, passes, axis=0)
  per_k = jax.vmap(masked_mean, in_axes=(-1, -1))(talk_ce_nla, talk_mask)
  talk = jnp.mean(per_k)
  return base_weight * base + (1.0 - base_weight) * talk, base, talk


def rewards(base_ce_bl, talk_ce_nla, talk_mask_bla, passes: int, reduction: str = "sum"):
  """Per-position reward [N, L - 1 - A]: gain in log-likelihood of the next A true tokens.

  R[n, i] = sum_k (base_ce[b, i + k] - talk_ce[n, i, k]) over real targets, base detached.
  """
  b, l = base_ce_bl.shape
  talk = talk_ce_nla.shape[-1]
  keep = l - 1 - talk
  base_k = jnp.stack([jnp.roll(base_ce_bl, -k, axis=1) for k in range(talk)], axis=-1)
  base_k = jnp.repeat(jax.lax.stop_gradient(base_k), passes, axis=0)
  mask = jnp.repeat(talk_mask_bla, passes, axis=0)
  gain = (base_k - talk_ce_nla) * mask
  r = jnp.sum(gain, axis=-1) if reduction == "sum" else jnp.mean(gain, axis=-1)
  return jax.lax.stop_gradient(r[:, :keep])


def advantages(rewards_nl, passes: int, positive_only: bool = True):
  """Reward minus the mean over the P copies of the same document and position (detached).

  With P = 1 there is no baseline: the reward itself (as the official code does).
  """
  n, l = rewards_nl.shape
  adv = rewards_nl
  if passes > 1:
    grouped = rewards_nl.reshape(n // passes, passes, l)
    adv = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(n, l)
  if positive_only:
    adv = jnp.maximum(adv, 0.0)
  return jax.lax.stop_gradient(adv)


def policy_loss(advantages_nl, thought_logprob_nlt):
  """mean_t mean_{n, i} (-advantage[n, i] * logprob[n, i, s]) over the scored positions.

  Args:
    advantages_nl: [N, L'] with L' = L - 1 - A scored positions.
    thought_logprob_nlt: [N, L, T] log-probabilities (the first L' positions are used).
  """
  keep = advantages_nl.shape[1]
  return jnp.mean(-advantages_nl[..., None] * thought_logprob_nlt[:, :keep])


def quietstar_loss(out: dict, mask_bl, qs: QuietStarConfig, segment_ids_bl=None):
  """Total loss and metrics from the outputs of `QuietStarModel.__call__`."""
  base_mask, talk_mask = target_masks(mask_bl, qs.n_ahead_talk, segment_ids_bl)
  nll, base, talk = nll_loss(out["base_ce"], out["talk_ce"], base_mask, talk_mask,
                             qs.n_passes, qs.base_loss_weight)
  r = rewards(out["base_ce"], out["talk_ce"], talk_mask, qs.n_passes, qs.reward_reduction)
  adv = advantages(r, qs.n_passes, qs.remove_negative_rewards)
  pg = policy_loss(adv, out["thought_logprob"])
  w = out["mix_weight"]
  metrics = dict(nll=nll, base_loss=base, talk_loss=talk, policy_loss=pg,
                 reward_mean=r.mean(), reward_std=r.std(),
                 positive_advantage_share=jnp.mean((adv > 0).astype(jnp.float32)),
                 mix_weight_mean=w.mean(), mix_weight_std=w.std())
  return nll + qs.policy_weight * pg, metrics


def original_mode_loss(base_ce_bl, mask_bl, segment_ids_bl=None):
  """The no-thought baseline (`original_mode`): plain next-token CE (0.5 CE + 0.5 CE)."""
  base_mask, _ = target_masks(mask_bl, 1, segment_ids_bl)
  base = masked_mean(base_ce_bl, base_mask)
  return base, dict(nll=base, base_loss=base)
