"""Analytic model FLOPs of jaxstar's train steps: matmuls only, as MFU is usually counted.

XLA's own count (`compiled.cost_analysis()`) sees the scan over layers once rather than
num_layers times, so the compile-only plan and the benchmarks use these. The backward pass costs
twice the forward (3x in all); rematerialization's recomputation is not model FLOPs.
"""
from __future__ import annotations

from jaxstar.model.config import ModelConfig


def layer_flops(cfg: ModelConfig, context: float) -> float:
  """Forward matmul FLOPs of one token through one layer attending to `context` keys."""
  d, h, k, e, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  if cfg.sliding_window:
    context = min(context, cfg.sliding_window)
  return 2 * d * (h * e + 2 * k * e) + 2 * h * e * d + 6 * d * f + 4 * h * e * context


def lm_step_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """Forward + backward FLOPs of a plain next-token step on [batch, seq_len] (dense attention
  over the whole row, as the step computes it)."""
  head = 2 * cfg.embed_dim * cfg.vocab_size
  return 3 * batch * seq_len * (cfg.num_layers * layer_flops(cfg, seq_len) + head)


def quietstar_step_flops(cfg: ModelConfig, batch: int, seq_len: int, n_ahead: int,
                         n_ahead_talk: int, n_passes: int) -> float:
  """Forward + backward FLOPs of one Quiet-STaR step on `batch` documents of `seq_len`.

  The base pass over the documents; then, on n_passes copies, n_ahead - 2 thought passes (every
  position extends its thought by one token, attending to the document and the thought so far;
  the last one's logits are not needed) and n_ahead_talk talk passes scoring the true tokens
  ahead through the mixing head.
  """
  d, v, rows = cfg.embed_dim, cfg.vocab_size, batch * n_passes
  head = 2 * d * v
  fwd = batch * seq_len * (cfg.num_layers * layer_flops(cfg, seq_len) + head)
  for s in range(1, n_ahead - 1):
    fwd += rows * seq_len * (cfg.num_layers * layer_flops(cfg, seq_len + s)
                             + (head if s <= n_ahead - 3 else 0))
  mixing = 2 * (2 * d * d + d * d + d)
  talk_context = seq_len + n_ahead - 2 + n_ahead_talk
  fwd += rows * seq_len * n_ahead_talk * (cfg.num_layers * layer_flops(cfg, talk_context)
                                          + mixing + head)
  return 3 * fwd
