"""GSM8K: the Quiet-STaR paper metric and 6-shot chain-of-thought exact match, with and without
thoughts, on a jaxstar run directory or a Hugging Face Mistral folder.

  python launch/tpu.py --config=configs/eval_gsm8k.py --workdir=workdirs/eval_gsm8k \\
      --config.init_from=workdirs/quietstar_7b [--config.eval.limit=100]

The test split comes from the Hugging Face Hub (`pip install -e .[hf]`) unless
--config.eval.data_path names a jsonl copy. The paper's zero-shot cot-maj@8 (spec/quietstar.md
§5.2): --config.eval.metrics=zero_shot --config.eval.num_samples=8 --config.eval.temperature=0.9
--config.eval.max_new_tokens=384.
"""
from configs import common


def get_config(arg=None):
  del arg
  return common.eval_stage_config(task="gsm8k", metrics="paper,few_shot")
