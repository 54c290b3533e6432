"""The tiny models on their own corpus: two-digit sums ("a+b=") after four solved lines; the
answer probability (paper metric on the digits after "=") and greedy exact match, with and
without thoughts. A CPU run of seconds.

  python launch/tpu.py --config=configs/eval_arithmetic_tiny.py --workdir=workdirs/eval_tiny \\
      --config.init_from=workdirs/demo/quietstar
"""
from configs import common


def get_config(arg=None):
  del arg
  # workdirs/demo/quietstar: the tiny run `make demo` writes.
  return common.eval_stage_config("workdirs/demo/quietstar", task="arithmetic",
                                  metrics="paper,few_shot", limit=100, max_new_tokens=6,
                                  batch_size=16)
