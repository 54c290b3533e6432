"""A Mistral-style decoder in Flax Linen, applied to an explicit params pytree.

Axis letters used in names, einsum strings and shape comments throughout jaxstar (this is the
one table; code, docstrings, configs and the README use it):
  B batch (documents)             L sequence length (queries)     S key length / cache slots
  D model width (embed_dim)       H query heads                   K key/value heads
  G query heads per kv head       E features per head             F SwiGLU hidden width
  V vocabulary                    Q new tokens per row (or per position) in one pass
Quiet-STaR, with the config field that sets each:
  T sampled thought tokens per position: n_ahead - 3 (the official n_ahead = T + 3 counts the
    start and end tokens and the first talk step)
  A talk tokens: true tokens ahead scored after each thought (n_ahead_talk)
  P thoughts per position (n_passes)      N = B * P rows      C positions per chunk

Parameters (all float32 by default; layer parameters carry a leading layer axis from `nn.scan`):
  embedding [V, D]; layers/{attn_norm,mlp_norm}/scale [D]; layers/attn/{q_proj [D, H, E],
  k_proj [D, K, E], v_proj [D, K, E], o_proj [H, E, D]}; layers/mlp/{gate_proj, up_proj [D, F],
  down_proj [F, D]}; final_norm/scale [D]; lm_head [D, V] (absent when tied).

The layer stack takes an "attend" object (see `attention.py`) that decides which keys each query
sees, so the same compiled layer body serves the full forward, KV-cache decoding and the
Quiet-STaR thought passes.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxstar.model import attention
from jaxstar.model.config import ModelConfig
from jaxstar.model.layers import Block, RMSNorm, constrain, dense, dense_init, upcast

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for decoding.

  Attributes:
    k, v: [num_layers, B, S, K, E] rotated keys / values, slot s holds the token fed at step s.
    valid: [B, S] bool, True where the slot holds a real (non-padding) token.
    index: int32 scalar, the next free slot.
  A sliding window is applied by masking; the cache does not roll.
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    """S: the number of cache slots."""
    return self.k.shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` tokens."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


class Transformer(nn.Module):
  """Mistral decoder: embedding, scanned pre-norm blocks, final RMSNorm, lm_head."""
  cfg: ModelConfig

  def setup(self):
    """Declares the parameters and submodules: embedding, the scanned layers, final_norm and
    lm_head (absent when tied)."""
    cfg = self.cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embedding = self.param("embedding", dense_init(("vocab", "embed")),
                                (cfg.vocab_size, cfg.embed_dim), pdt)
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        unroll=cfg.scan_unroll or cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    self.final_norm = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), pdt, name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", dense_init(("embed", "vocab")),
                                (cfg.embed_dim, cfg.vocab_size), pdt)

  def embed(self, tokens_bl):
    """Token embeddings [B, L, D] in the compute dtype."""
    x = jnp.take(self.embedding, tokens_bl, axis=0).astype(jnp.dtype(self.cfg.dtype))
    return constrain(x, ("act_batch", "act_len", "act_embed"))

  def run_layers(self, x_bld, positions_bl, attend, layer_state=None):
    """All decoder blocks then the final norm.

    Args:
      x_bld: input embeddings [B, L, D].
      positions_bl: RoPE position of each input [B, L].
      attend: an attend object (`attention.CausalAttend`, `attention.CachedAttend`, ...).
      layer_state: pytree with a leading layer axis given to `attend` layer by layer, or None.
    Returns:
      (hidden [B, L, D] after the final norm, per-layer outputs of `attend` stacked on axis 0).
    """
    x_bld, layer_out = self.layers(x_bld, positions_bl, attend, layer_state)
    return self.final_norm(x_bld), layer_out

  def logits(self, h_bld):
    """Next-token logits [B, L, V] in fp32 (or wider)."""
    dtype = jnp.dtype(self.cfg.dtype)
    w_dv = self.embedding.T if self.cfg.tie_embeddings else self.lm_head
    out = dense(h_bld.astype(dtype), w_dv.astype(dtype), out_dtype=upcast(dtype))
    return constrain(out, ("act_batch", "act_len", "act_vocab"))

  def text_attend(self, tokens_bl, input_mask_bl=None, segment_ids_bl=None, return_kv=False):
    """(RoPE positions [B, L], `CausalAttend`) of a full causal pass over a text.

    With `segment_ids_bl` (packed rows) a token attends only within its own document and its
    position restarts at 0 there, so a packed row computes what its documents would alone.
    """
    b, l = tokens_bl.shape
    idx = jnp.arange(l, dtype=jnp.int32)
    if input_mask_bl is None:
      input_mask_bl = jnp.ones((b, l), bool)
    if segment_ids_bl is None:
      positions = jnp.broadcast_to(idx, (b, l))
      mask = attention.visible_keys(idx, idx, input_mask_bl, self.cfg.sliding_window)
    else:
      positions = attention.segment_positions(segment_ids_bl)
      mask = attention.visible_keys(idx, idx, input_mask_bl, self.cfg.sliding_window,
                                    segment_ids_bl, segment_ids_bl)
    return positions, attention.CausalAttend(mask_bll=mask, return_kv=return_kv, causal=True)

  def __call__(self, tokens_bl, input_mask_bl=None, positions_bl=None, return_hidden=False,
               segment_ids_bl=None):
    """Full causal forward.

    Args:
      tokens_bl: int token ids [B, L].
      input_mask_bl: optional bool [B, L], False at padding (padding keys are never attended).
      positions_bl: optional RoPE positions [B, L]; defaults to 0..L-1 (per document with
        segment ids).
      return_hidden: also return the final-norm hidden states.
      segment_ids_bl: optional int [B, L] document ids of packed rows (see `text_attend`).
    Returns:
      logits [B, L, V] fp32, or (logits, hidden [B, L, D]).
    """
    positions, attend = self.text_attend(tokens_bl, input_mask_bl, segment_ids_bl)
    hidden, _ = self.run_layers(self.embed(tokens_bl),
                                positions if positions_bl is None else positions_bl, attend)
    logits = self.logits(hidden)
    return (logits, hidden) if return_hidden else logits

  def decode(self, tokens_bq, cache: KVCache, token_mask_bq=None, positions_bq=None,
             empty_cache: bool = False):
    """Feeds Q tokens through the KV cache: a prefill (Q = prompt length) or a decode step (Q = 1).

    Args:
      tokens_bq: int ids [B, Q] written to slots cache.index .. cache.index + Q - 1.
      cache: the `KVCache` (its buffers can be donated by the caller's jit).
      token_mask_bq: optional bool [B, Q], False for padding tokens (never attended later).
      positions_bq: optional RoPE positions [B, Q]; defaults to the slot indices.
      empty_cache: static promise that the cache holds nothing yet (a prefill): the new
        tokens attend only to each other (`attention.CachedAttend.empty`).
    Returns:
      (logits [B, Q, V] fp32, updated cache).
    """
    hidden, cache = self.decode_hidden(self.embed(tokens_bq), cache, token_mask_bq, positions_bq,
                                       empty_cache)
    return self.logits(hidden), cache

  def decode_hidden(self, x_bqd, cache: KVCache, token_mask_bq=None, positions_bq=None,
                    empty_cache: bool = False):
    """`decode` from input embeddings [B, Q, D]; returns (hidden [B, Q, D], updated cache)."""
    b, q, _ = x_bqd.shape
    q_idx = cache.index + jnp.arange(q, dtype=jnp.int32)
    if positions_bq is None:
      positions_bq = jnp.broadcast_to(q_idx, (b, q))
    if token_mask_bq is None:
      token_mask_bq = jnp.ones((b, q), bool)
    valid = jax.lax.dynamic_update_slice(cache.valid, token_mask_bq.astype(bool),
                                         (jnp.zeros_like(cache.index), cache.index))
    k_idx = jnp.arange(cache.max_len, dtype=jnp.int32)
    mask = attention.visible_keys(q_idx, k_idx, valid, self.cfg.sliding_window)
    hidden, cache = self.cached_layers(x_bqd, positions_bq, cache, mask, empty_cache)
    return hidden, cache.replace(valid=valid, index=cache.index + q)

  def cached_layers(self, x_bqd, positions_bq, cache: KVCache, mask_bqs,
                    empty_cache: bool = False):
    """The layers over Q inputs whose keys/values go to slots cache.index .. + Q - 1, query q
    seeing the slots where `mask_bqs` [B, Q, S] is True (its own slot included).

    The lowest-level cached call: `valid` and `index` are left as they are, so a caller can
    write scratch slots past the text (the thought branch of `jaxstar.quietstar.decoding`)
    that the next real token overwrites. Returns (hidden [B, Q, D], cache with the new k/v).
    """
    attend = attention.CachedAttend(index=cache.index, mask_bqs=mask_bqs, empty=empty_cache)
    hidden, (k_new, v_new) = self.run_layers(x_bqd, positions_bq, attend, (cache.k, cache.v))
    zero = jnp.zeros_like(cache.index)
    start = (zero, zero, cache.index, zero, zero)       # every layer's new slots at once
    return hidden, cache.replace(k=jax.lax.dynamic_update_slice(cache.k, k_new, start),
                                 v=jax.lax.dynamic_update_slice(cache.v, v_new, start))


@functools.lru_cache(maxsize=None)
def _abstract(cfg: ModelConfig):
  model = Transformer(cfg)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))


def abstract_params(cfg: ModelConfig):
  """Boxed (logically partitioned) abstract params of `cfg`, with no allocation."""
  return _abstract(cfg)["params"]


def count_params(cfg: ModelConfig) -> int:
  """Number of parameters of `cfg`, from shapes only."""
  leaves = jax.tree.leaves(nn.unbox(abstract_params(cfg)))
  return sum(int(x.size) for x in leaves)
