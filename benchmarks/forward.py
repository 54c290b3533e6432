"""Forward and forward+backward throughput of the `small` model on this machine.

  python benchmarks/forward.py [--batch 8 --seq_len 256 --variant small]

Prints tokens/s, achieved GFLOP/s (analytic matmul FLOPs / time; backward counted as 2x forward)
and that rate as a share of a plain fp32 matmul's GFLOP/s measured in the same run.
"""
import argparse
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from jaxstar import model as model_lib


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()

  cfg = model_lib.get_config(args.variant, dtype=args.dtype)
  module = model_lib.Transformer(cfg)
  params = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0, cfg.vocab_size)

  def loss_fn(p):
    logits = module.apply({"params": p}, tokens)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  fwd = jax.jit(lambda p: module.apply({"params": p}, tokens))
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))

  n_tokens = args.batch * args.seq_len
  flops_fwd = common.forward_flops_per_token(cfg, args.seq_len) * n_tokens
  peak = common.matmul_gflops()
  rows = []
  for name, fn, flops in [("forward", lambda: fwd(params), flops_fwd),
                          ("forward+backward", lambda: fwd_bwd(params), 3 * flops_fwd)]:
    rows.append(common.rate_row(name, common.time_fn(fn), n_tokens, flops, peak))
  print(f"# {args.variant}: {model_lib.count_params(cfg):,} params, batch {args.batch} x "
        f"{args.seq_len} tokens, dtype {args.dtype}; {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {jax.device_count()} device(s))")
  print(f"# plain 2048x2048 fp32 matmul: {peak:.1f} GFLOP/s")
  common.print_table(("step", "ms", "tokens/s", "GFLOP/step", "GFLOP/s", "of matmul"), rows)


if __name__ == "__main__":
  main()
