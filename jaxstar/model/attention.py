"""Attention kernels and masks, as pure functions.

Axis letters (see `transformer.py`): B batch, L query length, S key length, H query heads,
K key/value heads, G = H // K query heads per kv head, E head features.

The decoder blocks do not know *which* keys a query may see: each block computes rotated q/k/v
for its new tokens and hands them to an "attend" object, which owns the key set and the mask.
`CausalAttend` is the ordinary full-sequence case and `CachedAttend` decodes against a KV cache;
the Quiet-STaR thought passes bring their own attend objects (prefix + per-position branch).
Attend objects are pytrees, so they can be broadcast through `nn.scan` over the layers; their
static fields live in the tree structure.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxstar.model.layers import cpu_layouts, upcast

# Finite "minus infinity": a fully masked row then gives a uniform softmax instead of NaNs.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def visible_keys(q_idx, k_idx, k_valid=None, sliding_window: int | None = None,
                 q_segment=None, k_segment=None):
  """Boolean mask [B, L, S] (or broadcastable) of the keys each query may attend to.

  Args:
    q_idx: [B, L] or [L] sequence index of each query.
    k_idx: [B, S] or [S] sequence index of each key.
    k_valid: optional [B, S] bool, False for padding keys.
    sliding_window: a query at i sees keys j with i - window < j <= i (Mistral's convention).
    q_segment, k_segment: optional [B, L] / [B, S] document ids of packed rows: a query sees
      only the keys of its own document.
  """
  q = jnp.asarray(q_idx)[..., :, None]
  k = jnp.asarray(k_idx)[..., None, :]
  mask = k <= q
  if sliding_window is not None:
    mask &= (q - k) < sliding_window
  if k_valid is not None:
    mask &= jnp.asarray(k_valid, bool)[:, None, :]
  if q_segment is not None:
    mask &= jnp.asarray(q_segment)[:, :, None] == jnp.asarray(k_segment)[:, None, :]
  return mask


def segment_positions(segment_ids_bl):
  """Each token's position within its document, [B, L]: RoPE restarts at 0 per document.

  A document is a run of equal ids in a packed row (`jaxstar.data` pack mode).
  """
  seg = jnp.asarray(segment_ids_bl)
  idx = jnp.arange(seg.shape[1], dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def same_segment_ahead(segment_ids_bl, k: int):
  """[B, L] bool: x_{i+k} exists and belongs to x_i's document (always, without segments)."""
  seg = jnp.asarray(segment_ids_bl)
  ahead = jnp.concatenate([seg[:, k:], jnp.full_like(seg[:, :k], -1)], axis=1)
  return ahead == seg


def attention_scores(q_blhe, k_bske):
  """Scaled dot products in fp32 (or wider), [B, K, G, L, S]."""
  b, l, h, e = q_blhe.shape
  kv_heads = k_bske.shape[2]
  q_blkge = q_blhe.reshape(b, l, kv_heads, h // kv_heads, e)
  scores = jnp.einsum("blkge,bske->bkgls", q_blkge, k_bske,
                      preferred_element_type=upcast(q_blhe.dtype))
  return scores * (e ** -0.5)


def weighted_values(probs_bkgls, v_bske):
  """Probability-weighted sum of values, [B, L, H, E] in the values' dtype."""
  out = jnp.einsum("bkgls,bske->blkge", probs_bkgls.astype(v_bske.dtype), v_bske)
  b, l, k, g, e = out.shape
  return out.reshape(b, l, k * g, e)


# Query block of the CPU path's causal attention: each block of queries attends only to the keys
# up to its own end, so the blocks above the diagonal are never computed (`dot_attention`).
CAUSAL_BLOCK = 128


def _masked_scores(q_bkgle, k_bkse, mask_bls):
  """Scores [B, K, G, L, S] of pre-scaled heads-major queries, MASK_VALUE where masked."""
  scores = jnp.einsum("bkgle,bkse->bkgls", q_bkgle, k_bkse,
                      preferred_element_type=upcast(q_bkgle.dtype))
  return jnp.where(mask_bls[:, None, None], scores, MASK_VALUE)


@jax.custom_vjp
def _heads_major(q_bkgle, k_bkse, v_bkse, mask_bls):
  """Softmax attention of pre-scaled heads-major queries, [B, K, G, L, E]."""
  return _heads_major_fwd(q_bkgle, k_bkse, v_bkse, mask_bls)[0]


def _heads_major_fwd(q_bkgle, k_bkse, v_bkse, mask_bls):
  scores = _masked_scores(q_bkgle, k_bkse, mask_bls)
  # The row's max and the reciprocal of its sum, kept apart: max + log(sum) rounds back to the
  # max for a fully masked row (MASK_VALUE is huge), which would turn its average into a sum.
  top = scores.max(axis=-1, keepdims=True)
  unnormalized = jnp.exp(scores - top)
  inv_sum = 1.0 / unnormalized.sum(axis=-1, keepdims=True)
  probs = unnormalized * inv_sum
  out = jnp.einsum("bkgls,bkse->bkgle", probs.astype(v_bkse.dtype), v_bkse)
  return out, (q_bkgle, k_bkse, v_bkse, mask_bls, top, inv_sum, out)


def _heads_major_bwd(residuals, d_out):
  # The probabilities are recomputed from each row's saved max and sum, as flash attention does
  # from its log-sum-exp: saving them, one [.., L, S] array per layer, cost more than the
  # recomputation (XLA:CPU copies each into the stacked buffer of a rolled layer scan; the
  # benchmark model's plain step x0.95 rolled, x0.99 unrolled, in interleaved runs).
  # The softmax gradient: dS = P * (dP - rowsum(dO * O)), one pass over the [.., L, S] scores
  # where autodiff's softmax rule takes two (rowsum(dP * P), then dS).
  q, k, v, mask_bls, top, inv_sum, out = residuals
  probs = jnp.exp(_masked_scores(q, k, mask_bls) - top) * inv_sum
  wide = probs.dtype
  d_out_w = d_out.astype(wide)
  d_v = jnp.einsum("bkgls,bkgle->bkse", probs, d_out_w)
  d_probs = jnp.einsum("bkgle,bkse->bkgls", d_out_w, v.astype(wide))
  row = jnp.sum(d_out_w * out.astype(wide), axis=-1, keepdims=True)
  d_scores = probs * (d_probs - row)
  d_q = jnp.einsum("bkgls,bkse->bkgle", d_scores, k.astype(wide))
  d_k = jnp.einsum("bkgls,bkgle->bkse", d_scores, q.astype(wide))
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_heads_major.defvjp(_heads_major_fwd, _heads_major_bwd)


def dot_attention(q_blhe, k_bske, v_bske, mask_bls, heads_major: bool | None = None,
                  causal: bool = False):
  """Grouped-query softmax attention with a boolean mask; softmax in fp32.

  On the CPU backend q, k and v are first laid out heads-major (q [B, K, G, L, E], k and v
  [B, K, S, E]), so that every matmul of the forward and backward has its batch axes leading
  and XLA:CPU writes no transposed copies of the [B, K, G, L, S] scores and their gradients,
  and the gradient is computed by hand (`_heads_major_bwd`). With `causal` (the mask hides every
  key after its query; L == S) the queries go in blocks of `CAUSAL_BLOCK`, each against the keys
  up to its own end, which skips the fully masked blocks above the diagonal (a query that sees no
  key at all, as left padding does, then averages its block's values instead of all values: a
  row no other token reads). Causal attention's forward and backward take about half the time
  of the token-major einsums (`benchmarks/layer_grads.py`). Other backends keep the token-major
  einsums, which their layout assignment handles (not measured there). `heads_major` forces one
  or the other (default: `layers.cpu_layouts()`).
  """
  if not (cpu_layouts() if heads_major is None else heads_major):
    scores = attention_scores(q_blhe, k_bske)
    scores = jnp.where(mask_bls[:, None, None], scores, MASK_VALUE)
    return weighted_values(jax.nn.softmax(scores, axis=-1), v_bske)
  b, l, h, e = q_blhe.shape
  s, kv_heads = k_bske.shape[1:3]
  if causal and l != s:
    raise ValueError(f"dot_attention: causal needs as many queries as keys, got {l} and {s}")
  q_bkgle = q_blhe.reshape(b, l, kv_heads, h // kv_heads, e).transpose(0, 2, 3, 1, 4)
  q_bkgle = q_bkgle.astype(upcast(q_blhe.dtype)) * (e ** -0.5)  # scaled once, in fp32 or wider
  k_bkse, v_bkse = k_bske.transpose(0, 2, 1, 3), v_bske.transpose(0, 2, 1, 3)
  ends = range(CAUSAL_BLOCK, l + CAUSAL_BLOCK, CAUSAL_BLOCK) if causal else (l,)
  outs = []
  for start, end in zip((0,) + tuple(ends), ends):
    end = min(end, l)
    keys = end if causal else s
    outs.append(_heads_major(q_bkgle[:, :, :, start:end], k_bkse[:, :, :keys],
                             v_bkse[:, :, :keys], mask_bls[:, start:end, :keys]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, e)


@flax.struct.dataclass
class CausalAttend:
  """Attention over the block's own tokens with a precomputed mask.

  Attributes:
    mask_bll: [B, L, L] bool, e.g. `visible_keys(arange(L), arange(L), valid, window)`.
    return_kv: when True each layer returns its rotated keys and values ([B, L, K, E] each),
      stacked over layers by the scan (used to prefill caches and by the thought passes).
    causal: the mask hides every key after its query, as `visible_keys` of equal query and key
      indices does (on CPU `dot_attention` then skips the blocks above the diagonal).
  """
  mask_bll: jax.Array
  return_kv: bool = flax.struct.field(pytree_node=False, default=False)
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  def __call__(self, q, k, v, layer_state: Any):
    del layer_state
    out = dot_attention(q, k, v, self.mask_bll, causal=self.causal)
    return out, ((k, v) if self.return_kv else None)


@flax.struct.dataclass
class CachedAttend:
  """Attention of Q new tokens against a per-layer KV cache and against each other.

  Attributes:
    index: int32 scalar, the cache slot the first new token will take.
    mask_bqs: [B, Q, S] bool visibility of every cache slot for every new token, the new
      tokens' own slots (index .. index + Q - 1) included.
    empty: the cache holds nothing yet (a prefill): attend within the new tokens only
      (static; spares XLA folding a fully masked cache part as a constant).
  `layer_state` is the layer's `(k_bske, v_bske)` cache, read but not written: the keys and
  values of slots before `index` come from it, those of the new tokens from the block itself.
  Each layer returns its new (k, v) [B, Q, K, E], which the caller writes into the cache once
  for all layers after the layer scan (`Transformer.cached_layers`). Writing the cache inside
  the scan would copy every layer's whole cache each step.
  """
  index: jax.Array
  mask_bqs: jax.Array
  empty: bool = flax.struct.field(pytree_node=False, default=False)

  def __call__(self, q, k, v, layer_state):
    cache_k, cache_v = layer_state
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    s_len, q_len = cache_k.shape[1], q.shape[1]
    new = jax.lax.dynamic_slice_in_dim(self.mask_bqs, self.index, q_len, axis=2)   # [B, Q, Q]
    if self.empty:
      return dot_attention(q, k, v, new), (k, v)
    old = self.mask_bqs & (jnp.arange(s_len) < self.index)
    scores = jnp.concatenate([
        jnp.where(old[:, None, None], attention_scores(q, cache_k), MASK_VALUE),
        jnp.where(new[:, None, None], attention_scores(q, k), MASK_VALUE)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = (weighted_values(probs[..., :s_len], cache_v)
           + weighted_values(probs[..., s_len:], v))
    return out, (k, v)
