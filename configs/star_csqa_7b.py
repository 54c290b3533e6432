"""STaR on CommonsenseQA from Mistral-7B-v0.1 with the paper's recipe (spec/star.md §1).

  python launch/tpu.py --config=configs/star_csqa_7b.py --workdir=gs://BUCKET/star_csqa \\
      --config.init_from=/path/to/Mistral-7B-v0.1 \\
      --config.star.train_path=/data/commonsenseqa/train_rand_split.jsonl \\
      --config.star.dev_path=/data/commonsenseqa/dev_rand_split.jsonl

Run the same command on every host of the slice. Without train_path / dev_path the splits come
from the Hugging Face Hub (`pip install -e .[hf]`). Every iteration writes rationales for the
whole train split (9741 items) with the 7-shot prompt, rationalizes the failures with the
"(CORRECT)" hint, fine-tunes Mistral-7B-v0.1 afresh for 40 * 1.2^(n-1) steps (batch 8 x 1024
packed tokens, lr 1e-6) and reports dev accuracy (1221 items). `few_shot_train` keeps the
7-shot prompt in the fine-tuning examples, the setting of the paper's best CommonsenseQA result
(72.5 with rationalization, spec §3.2). The paper's model was GPT-J-6B.
"""
from configs import common


def get_config(arg=None):
  del arg
  return common.star_7b_config("commonsenseqa", few_shot_train=True, num_iterations=30,
                               patience=3)
