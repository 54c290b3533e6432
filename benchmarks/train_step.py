"""Throughput of the plain LM train step (forward, backward, AdamW update) for `small`.

  python -m benchmarks.train_step [--batch 8 --seq_len 256 --variant small --remat none
                                   --unroll 1,0 --model num_layers=2,embed_dim=64]

Prints step time, tokens/s and achieved GFLOP/s (analytic: 3x the forward matmul FLOPs) beside
a plain fp32 matmul's GFLOP/s measured in the same run, one row per `--unroll` value
(`ModelConfig.scan_unroll`; 0 unrolls all layers), timed in turns over `--rounds` rounds so a
slow spell of a shared machine hits every row alike. `--model` overrides other ModelConfig
fields of the variant.
"""
import argparse
import platform

import jax
import jax.numpy as jnp

from benchmarks import common
from jaxstar import model as model_lib
from jaxstar import sharding
from jaxstar import train_lib


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--unroll", default="1", help="scan_unroll values, one row each")
  parser.add_argument("--model", default="", help="ModelConfig overrides, e.g. num_layers=2")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  overrides = common.parse_overrides(args.model)
  unrolls = [int(u) for u in args.unroll.split(",")]
  runs = [build(model_lib.get_config(args.variant, remat_policy=args.remat, scan_unroll=u,
                                     **overrides), args.batch, args.seq_len) for u in unrolls]
  times = [[] for _ in runs]
  for _ in range(args.rounds):
    for run, t in zip(runs, times):
      t.append(common.time_fn(run))
  cfg = model_lib.get_config(args.variant, **overrides)
  n_tokens = args.batch * args.seq_len
  flops = 3 * common.forward_flops_per_token(cfg, args.seq_len) * n_tokens
  peak = common.matmul_gflops()
  rows = []
  for unroll, t in zip(unrolls, times):
    rows.append(common.rate_row(unroll, sorted(t)[len(t) // 2], n_tokens, flops, peak))
  print(f"# {args.variant} {args.model or ''}: {model_lib.count_params(cfg):,} params, batch "
        f"{args.batch} x {args.seq_len}, remat {args.remat}; {jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()})")
  print(f"# plain 2048x2048 fp32 matmul: {peak:.1f} GFLOP/s")
  common.print_table(("scan_unroll", "step ms", "tokens/s", "GFLOP/step", "GFLOP/s",
                      "of matmul"), rows)


def build(cfg, batch_size, seq_len):
  """A closure running one donated train step of `cfg` on a fixed random batch."""
  module = model_lib.Transformer(cfg)
  optim = train_lib.OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.01, clip_norm=1.0)
  optimizer = train_lib.make_optimizer(optim, 100)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  init = lambda rng: train_lib.init_train_state(
      module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"], optimizer, 0)
  state, _ = sharding.create_sharded(init, mesh, jax.random.key(0))

  def loss_fn(params, batch, rng):
    del rng
    logits = module.apply({"params": params}, batch["tokens"])
    return train_lib.next_token_loss(logits, batch["tokens"], batch["mask"])[0], {}

  step = jax.jit(train_lib.make_train_step(loss_fn, optimizer), donate_argnums=0)
  tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len), 0, cfg.vocab_size)
  batch = {"tokens": tokens, "mask": jnp.ones_like(tokens)}
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch)
    return metrics["loss"]

  return run


if __name__ == "__main__":
  main()
