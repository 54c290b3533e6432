"""The official mixing ("talk") head: how much of the post-thought state to use per position.

`w = Linear(D -> 1, no bias)(relu(Linear(D -> D)(relu(Linear(2D -> D)([h_base ; h_thought])))))`,
with the last layer zero-initialized and no sigmoid: at step 0, w == 0 and the model is exactly
the base model; w is unbounded afterwards (spec/quietstar.md §2). Mixing hidden states is mixing
logits, because the lm_head is linear without bias:
  h_mix = (1 - w) * h_base + w * h_thought.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxstar.model.layers import upcast

INIT_STD = 0.02  # as the official code's HF _init_weights


class MixingHead(nn.Module):
  """Maps ([..., D], [..., D]) -> mixing weight [..., 1] (weight of the post-thought path)."""
  embed_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_base, h_thought):
    d = self.embed_dim
    normal = nn.initializers.normal(INIT_STD)
    dense = lambda features, names, name, bias=True, init=normal: nn.Dense(
        features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))
    x = jnp.concatenate([h_base, h_thought], axis=-1).astype(self.dtype)
    x = nn.relu(dense(d, ("embed", "mlp"), "in_proj")(x))
    x = nn.relu(dense(d, ("mlp", "embed"), "hidden_proj")(x))
    w = dense(1, ("embed", None), "out_proj", bias=False, init=nn.initializers.zeros)(x)
    return w.astype(upcast(self.dtype))


def mix(h_base, h_thought, w):
  """h_mix = (1 - w) * h_base + w * h_thought, in w's dtype (fp32 or wider)."""
  return (1.0 - w) * h_base.astype(w.dtype) + w * h_thought.astype(w.dtype)
