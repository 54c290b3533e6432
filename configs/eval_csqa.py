"""CommonsenseQA: the Quiet-STaR paper metric and 7-shot chain-of-thought exact match, with and
without thoughts, on a jaxstar run directory or a Hugging Face Mistral folder.

  python launch/tpu.py --config=configs/eval_csqa.py --workdir=workdirs/eval_csqa \\
      --config.init_from=workdirs/quietstar_7b [--config.eval.limit=100]

The validation split comes from the Hugging Face Hub (`pip install -e .[hf]`) unless
--config.eval.data_path names a jsonl copy (the TAU format).
"""
from configs import common


def get_config(arg=None):
  del arg
  config = common.base_config()
  config.stage = "eval"
  config.tokenizer = ""                 # '' = the run's own ('mistral' for a HF folder)
  config.init_from = ""                 # the run directory or HF folder to evaluate
  config.mesh_shape = (-1, 1, 1)
  config.eval = common.eval_config(task="commonsenseqa", metrics="paper,few_shot",
                                   max_new_tokens=96)
  return config
