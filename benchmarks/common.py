"""Shared pieces of the benchmark scripts: timing, a matmul reference rate, FLOP counts, tables."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxstar.model import ModelConfig


def time_fn(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> float:
  """Median wall seconds of `fn()` (its outputs are blocked on) after compilation warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def matmul_gflops(n: int = 2048, dtype=jnp.float32) -> float:
  """Achieved GFLOP/s of a square fp32 matmul: the machine's practical peak for comparison."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  seconds = time_fn(lambda: mm(a, b), iters=10)
  return 2 * n ** 3 / seconds / 1e9


def forward_flops_per_token(cfg: ModelConfig, context: int) -> float:
  """Matmul FLOPs of one token's forward pass with `context` keys per query (dense attention)."""
  d, h, k, e, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = 2 * d * (h * e + 2 * k * e) + 2 * h * e * d  # q, k, v, o projections
  per_layer += 3 * 2 * d * f                                 # SwiGLU
  per_layer += 2 * 2 * h * e * context                       # scores and weighted values
  return cfg.num_layers * per_layer + 2 * d * cfg.vocab_size  # + lm_head


def parse_overrides(text: str) -> dict:
  """'scan_unroll=4,remat_policy=none' -> {'scan_unroll': 4, 'remat_policy': 'none'}."""
  pairs = (kv.split("=", 1) for kv in filter(None, text.split(",")))
  return {k: int(v) if v.isdigit() else v for k, v in pairs}


def rate_row(label, seconds: float, n_tokens: int, flops: float, peak_gflops: float) -> tuple:
  """(label, ms, tokens/s, GFLOP/step, GFLOP/s, share of the matmul peak) of a timed step."""
  gflops = flops / seconds / 1e9
  return (label, f"{seconds * 1e3:.1f}", f"{n_tokens / seconds:,.0f}", f"{flops / 1e9:.2f}",
          f"{gflops:.1f}", f"{100 * gflops / peak_gflops:.0f}%")


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"
  print(line(cells[0]))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells[1:]:
    print(line(r))
