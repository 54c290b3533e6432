"""Thought-token sampling: Gumbel-max (`jax.random.categorical`) against inverse-CDF sampling.

  python -m benchmarks.sampling

Both draw one token per row from softmax(logits); shapes are [rows, vocabulary].
"""
import platform

import jax

from benchmarks import common
from jaxstar import sampling

SHAPES = ((2048, 4096), (256, 32002), (2048, 32002))


def main():
  gumbel = jax.jit(lambda key, x: jax.random.categorical(key, x, axis=-1))
  inverse_cdf = jax.jit(sampling.sample_inverse_cdf)
  rows = []
  for shape in SHAPES:
    logits = jax.random.normal(jax.random.key(0), shape)
    key = jax.random.key(1)
    t_gumbel = common.time_fn(lambda: gumbel(key, logits))
    t_inverse = common.time_fn(lambda: inverse_cdf(key, logits))
    rows.append((f"{shape[0]} x {shape[1]}", f"{t_gumbel * 1e3:.1f}", f"{t_inverse * 1e3:.1f}",
                 f"{t_gumbel / t_inverse:.1f}x"))
  print(f"# {platform.processor() or platform.machine()} CPU, JAX {jax.__version__}")
  common.print_table(("logits", "Gumbel-max ms", "inverse CDF ms", "speed-up"), rows)


if __name__ == "__main__":
  main()
