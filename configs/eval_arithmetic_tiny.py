"""The tiny models on their own corpus: two-digit sums ("a+b=") after four solved lines; the
answer probability (paper metric on the digits after "=") and greedy exact match, with and
without thoughts. A CPU run of seconds.

  python launch/tpu.py --config=configs/eval_arithmetic_tiny.py --workdir=workdirs/eval_tiny \\
      --config.init_from=workdirs/demo/quietstar
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.base_config()
  config.stage = "eval"
  config.tokenizer = ""                 # '' = the run's own ('mistral' for a HF folder)
  config.init_from = "workdirs/demo/quietstar"  # a tiny run (make demo writes this one)
  config.mesh_shape = (-1, 1, 1)        # rows over every device (batch_size must divide)
  config.eval = common.eval_config(task="arithmetic", metrics="paper,few_shot", limit=100,
                                   max_new_tokens=6, batch_size=16)
  return config
