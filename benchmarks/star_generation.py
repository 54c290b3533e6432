"""STaR generation speed: the sampler on the STaR arithmetic prompts at batch 1 and in batches.

  python -m benchmarks.star_generation [--model workdirs/star_arithmetic_tiny_base] [--items 256]

The generation pass of `configs/star_arithmetic_tiny.py` (1-shot scratchpad prompts of 2- and
3-digit sums, greedy, stop at a blank line, up to 192 new tokens) through `LanguageModel.sample` at
batch 1, 8, 16 and 64, on the same items. With `--model` the pretrained base model is used, so rows
stop where the model ends its solution; without it the config's model with random weights,
where every row runs the whole budget. tokens/s = generated tokens (to each row's stop) / wall
seconds of the call, after a warm-up call on the same items that compiles.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxstar import allocator  # noqa: E402  pylint: disable=g-import-not-at-top

allocator.ensure()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="", help="a jaxstar run directory (default: random)")
  parser.add_argument("--items", type=int, default=256)
  parser.add_argument("--batches", default="1,8,16,64")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from configs import star_arithmetic_tiny  # pylint: disable=g-import-not-at-top
  from jaxstar import run_lib, sampling, tokenizer  # pylint: disable=g-import-not-at-top
  from jaxstar.evals import lm as lm_lib  # pylint: disable=g-import-not-at-top
  from jaxstar.star import stage  # pylint: disable=g-import-not-at-top

  config = star_arithmetic_tiny.get_config()
  task = stage.make_task(config)
  pool, _ = stage.load_data(config)
  items = [pool[i] for i in stage.draw(len(pool), args.items, 1, config.seed)]
  prompts = [task.prompt(ex) for ex in items]
  cfg = sampling.SamplingConfig(max_new_tokens=task.max_new_tokens, stop=task.stop)
  tok = tokenizer.get_tokenizer("bytes")
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    if args.model:
      lm = lm_lib.LanguageModel.load(args.model, batch_size=batch, max_length=1024)
    else:
      lm = lm_lib.random_model(run_lib.model_config_from(config, tok), tok, batch_size=batch,
                               max_length=1024)
    lm.sample(prompts, cfg)                    # compiles every bucket
    start = time.perf_counter()
    gens = lm.sample(prompts, cfg)
    seconds = time.perf_counter() - start
    tokens = sum(len(g.tokens) for g in gens)
    rows.append([batch, len(items), tokens, f"{seconds:.2f}", f"{tokens / seconds:,.0f}"])
  print(f"\nSTaR arithmetic generation, {'model ' + args.model if args.model else 'random'} "
        f"weights; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, matmul {common.matmul_gflops():.0f} GFLOP/s")
  common.print_table(["batch", "items", "tokens", "seconds", "tokens/s"], rows)


if __name__ == "__main__":
  main()
