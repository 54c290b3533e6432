"""Model configuration and the table of sizes.

`ModelConfig` describes a Mistral-style decoder; `VARIANTS` maps a name to its sizes. `tiny` is for
tests, `small` for CPU demos and benchmarks, `mistral_7b` is Mistral-7B-v0.1 exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: equivalence tests (x64)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and numerics of a Mistral-style decoder."""
  vocab_size: int              # V: rows of the embedding and of the lm_head
  embed_dim: int               # D: model width
  num_layers: int              # decoder blocks (scanned)
  num_heads: int               # H: query heads
  num_kv_heads: int            # K: key/value heads (GQA when K < H)
  head_dim: int                # E: features per head
  mlp_dim: int                 # F: SwiGLU hidden width
  rope_theta: float = 10000.0  # RoPE base
  norm_eps: float = 1e-5       # RMSNorm epsilon (Mistral-7B-v0.1's checkpoint uses 1e-5)
  sliding_window: int | None = None  # attend to at most this many keys back (query included)
  max_len: int = 32768         # max_position_embeddings, exported to HF configs
  tie_embeddings: bool = False  # share the embedding with the lm_head (small models only)
  dtype: str = "float32"       # matmul/activation dtype; softmax, norms and losses run in at
                               # least fp32 (`layers.upcast`)
  param_dtype: str = "float32"  # master weights
  remat_policy: str = "none"   # per-layer rematerialization: none | full | dots | dots_no_batch
  # Layers per iteration of the scan over layers (0 or num_layers: fully unrolled). Unrolling
  # saves XLA:CPU the loop's bookkeeping (tiny models: train step 0.74-0.88x the time,
  # `benchmarks/train_step.py --unroll 1,0`); keep 1 on TPU/GPU and wherever remat matters,
  # since an unrolled scan lets XLA undo the rematerialization and hold every layer's
  # activations.
  scan_unroll: int = 1

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; choose one of {DTYPES}")
    if not 0 <= self.scan_unroll <= self.num_layers:
      raise ValueError(f"scan_unroll={self.scan_unroll} must be in [0, num_layers="
                       f"{self.num_layers}] (0: all layers)")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

  def replace(self, **kw: Any) -> "ModelConfig":
    """A copy with the fields in `kw` changed, validated again (`dataclasses.replace`)."""
    return dataclasses.replace(self, **kw)


VARIANTS: dict[str, dict[str, Any]] = {
    # ~0.9M parameters: unit tests and the tiny demos.
    "tiny": dict(vocab_size=512, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384, max_len=2048),
    # ~12.6M parameters: CPU demos and benchmarks.
    "small": dict(vocab_size=4096, embed_dim=384, num_layers=6, num_heads=6, num_kv_heads=2,
                  head_dim=64, mlp_dim=1024, max_len=4096),
    # Mistral-7B-v0.1 exactly (7,241,732,096 parameters at vocabulary 32000).
    "mistral_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, mlp_dim=14336, rope_theta=10000.0,
                       norm_eps=1e-5, sliding_window=4096, max_len=32768),
}


def get_config(variant: str, **overrides: Any) -> ModelConfig:
  """Returns the `ModelConfig` of a named variant, with fields overridden by `overrides`."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown model variant {variant!r}; known variants: {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"Unknown ModelConfig field(s) {sorted(unknown)}; fields: {sorted(fields)}")
  return ModelConfig(**{**VARIANTS[variant], **overrides})
