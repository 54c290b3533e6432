"""Forward + backward of one MLP and one attention, each of jaxstar's CPU layouts against the other.

  python -m benchmarks.layer_grads [--iters 20]

Shapes of the `benchmarks/quietstar_step` model at batch 4 x 256 (d 256, ffn 512, 8 query and 4
kv heads of 32), fp32. Rows:
- MLP (SwiGLU): `layers.dense` as one 2-D matmul with its own gradient (`flat=True`, the CPU
  default) against the plain einsum (`flat=False`, the other backends' path);
- attention: `attention.dot_attention` heads-major (the CPU default, with its own gradient)
  against token-major, under a causal mask given as any mask; then heads-major with the mask
  known to be causal (`causal=True`, as the text passes give it: query blocks skip the blocks
  above the diagonal) against the same without.
Each time is the median of `--iters` calls of the jitted gradient of a scalar of the output,
the two variants taken in turns so a slow spell of a shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp

from benchmarks import common
from jaxstar.model import attention, layers

B, L, D, F, H, K, E = 4, 256, 256, 512, 8, 4, 32


def mlp_grad(flat: bool):
  def loss(x, gate, up, down):
    act = jax.nn.silu(layers.dense(x, gate, flat=flat)) * layers.dense(x, up, flat=flat)
    return jnp.sum(layers.dense(act, down, flat=flat) ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def attention_grad(heads_major: bool, causal: bool = False):
  def loss(q, k, v, mask):
    out = attention.dot_attention(q, k, v, mask, heads_major=heads_major, causal=causal)
    return jnp.sum(out ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 7)
  mlp_args = (jax.random.normal(keys[0], (B, L, D)), jax.random.normal(keys[1], (D, F)) * 0.05,
              jax.random.normal(keys[2], (D, F)) * 0.05, jax.random.normal(keys[3], (F, D)) * 0.05)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
  attn_args = (jax.random.normal(keys[4], (B, L, H, E)), jax.random.normal(keys[5], (B, L, K, E)),
               jax.random.normal(keys[6], (B, L, K, E)), mask)
  cases = [("MLP fwd+bwd", "einsum", "flat 2-D matmul", mlp_grad, mlp_args),
           ("attention fwd+bwd", "token-major", "heads-major", attention_grad, attn_args),
           ("causal attention fwd+bwd", "heads-major, any mask", "heads-major, causal blocks",
            lambda new: attention_grad(True, causal=new), attn_args)]
  rows = []
  for name, old_name, new_name, make, inputs in cases:
    old, new = make(False), make(True)
    old_t, new_t = [], []
    for _ in range(args.rounds):
      old_t.append(common.time_fn(lambda f=old: f(*inputs), warmup=2, iters=args.iters))
      new_t.append(common.time_fn(lambda f=new: f(*inputs), warmup=2, iters=args.iters))
    old_ms, new_ms = sorted(old_t)[len(old_t) // 2] * 1e3, sorted(new_t)[len(new_t) // 2] * 1e3
    rows.append((name, f"{old_name}: {old_ms:.1f}", f"{new_name}: {new_ms:.1f}",
                 f"{new_ms / old_ms:.2f}x"))
  print(f"# {jax.default_backend()} backend, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"batch {B} x {L}, d {D}, ffn {F}, heads {H}/{K} x {E}, fp32")
  common.print_table(("layer", "before (ms)", "CPU default (ms)", "time ratio"), rows)


if __name__ == "__main__":
  main()
