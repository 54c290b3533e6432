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
  return common.eval_stage_config(task="commonsenseqa", metrics="paper,few_shot",
                                  max_new_tokens=96)
