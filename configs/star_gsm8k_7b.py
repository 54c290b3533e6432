"""STaR on GSM8K from Mistral-7B-v0.1 with the paper's recipe (spec/star.md §1).

  python launch/tpu.py --config=configs/star_gsm8k_7b.py --workdir=gs://BUCKET/star_gsm8k \\
      --config.init_from=/path/to/Mistral-7B-v0.1 \\
      --config.star.train_path=/data/gsm/train_rand_split.jsonl \\
      --config.star.dev_path=/data/gsm/dev_rand_split.jsonl

Run the same command on every host of the slice. Without the paths GSM8K comes from the Hugging
Face Hub (`pip install -e .[hf]`); its evaluation split is the test set (1319 items), as in the
paper. Every iteration writes 6-shot solutions (256 new tokens) for the 7473 training items,
rationalizes the failures with the final answer as hint (`--config.star.hint_whole_solution`
shows the whole gold solution, as the shipped code does), fine-tunes Mistral-7B-v0.1 afresh for
40 * 1.2^(n-1) steps, capped at 7912 (the paper's 30th iteration), and reports test accuracy.
The paper's model was GPT-J-6B.
"""
from configs import common


def get_config(arg=None):
  del arg
  return common.star_7b_config("gsm8k", num_iterations=46, patience=5, max_steps=7912)
