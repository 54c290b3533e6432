"""One STaR generation pass (jaxstar/star/rationales.py): hints in and out, bookkeeping, the
saved fine-tuning set, bad input."""
import json
import os

import pytest

from jaxstar import model as model_lib
from jaxstar import sampling
from jaxstar import tokenizer as tokenizer_lib
from jaxstar.data import tasks
from jaxstar.errors import UserError
from jaxstar.evals import lm as lm_lib
from jaxstar.star import rationales

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "testdata")
CFG = sampling.SamplingConfig(max_new_tokens=8)


def _csqa(n=4):
  return tasks.load_csqa(os.path.join(DATA, "commonsenseqa_train.jsonl"), max_rows=n).rows


def _gsm8k(n=4):
  return tasks.load_gsm8k(os.path.join(DATA, "gsm8k_train.jsonl"), max_rows=n).rows


class HintCopyingModel:
  """Answers right exactly when the prompt's last query carries the hint, and wrong otherwise:
  a scripted stand-in for an LM that copies hints, to check where hints go."""

  def __init__(self, task, examples):
    self.task, self.examples = task, examples

  def sample(self, prompts, cfg, progress=None):
    del cfg, progress
    out = []
    for p in prompts:
      last = p.rsplit("\n\n", 1)[-1]
      ex = next(e for e in self.examples if e.question in last)
      hinted = "(CORRECT)" in last or f"({tasks.gsm8k_final_answer(ex.solution or '#### x')})" in last
      if self.task == "commonsenseqa":
        letter = ex.answer if hinted else ("A" if ex.answer != "A" else "B")
        text = f" Because. Therefore, the answer is it ({letter.lower()}).\n\nQ: next"
      else:
        value = ex.answer if hinted else ex.answer + "1"
        text = f" Some steps.\n#### {value}\n\nQ: next"
      out.append(sampling.Generation(text=text, tokens=[], finish="stop"))
    return out


@pytest.mark.parametrize("task", ["commonsenseqa", "gsm8k"])
def test_failures_are_rationalized_with_the_hint_and_saved_without_it(task, tmp_path):
  examples = _csqa() if task == "commonsenseqa" else _gsm8k()
  items = rationales.generate_pass(HintCopyingModel(task, examples), task, examples, CFG)
  stats = rationales.statistics(items)
  assert stats == {"attempted": 4, "correct": 0, "rationalization_attempts": 4,
                   "rationalized": 4, "kept": 4}
  path = str(tmp_path / "train.jsonl")
  assert rationales.write_examples(path, items, task) == 4
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  for row, ex in zip(rows, examples):
    assert row["source"] == "rationalized"
    assert row["prompt"] == rationales.query(task, ex)          # the hint-free query
    assert "(CORRECT)" not in row["prompt"] + row["completion"]
    assert "Q: next" not in row["completion"]                   # cut at the answer
  items = rationales.generate_pass(HintCopyingModel(task, examples), task, examples, CFG,
                                   rationalize=False)
  assert rationales.statistics(items, rationalize=False)["kept"] == 0
  assert rationales.write_examples(path, items, task) == 0


def test_hints():
  ex = _csqa(1)[0]
  hinted = rationales.query("commonsenseqa", ex, hint=True).split("\n")
  marked = [line for line in hinted if line.endswith("(CORRECT)")]
  assert len(marked) == 1 and marked[0].startswith(f"({ex.answer.lower()})")
  g = _gsm8k(1)[0]
  assert rationales.query("gsm8k", g, hint=True).startswith(f"Q: {g.question} ({g.answer})")
  whole = rationales.query("gsm8k", g, hint=True, hint_whole_solution=True)
  assert g.solution in whole
  bad = tasks.Example(question="Which?", answer="F", choices=(("A", "x"), ("B", "y")))
  with pytest.raises(UserError, match="matches none of its choices"):
    rationales.query("commonsenseqa", bad, hint=True)
  with pytest.raises(UserError, match="STaR task 'sums'"):
    rationales.query("sums", g)


def test_a_pass_of_a_real_tiny_model_keeps_its_books(tmp_path):
  tok = tokenizer_lib.get_tokenizer("bytes")
  lm = lm_lib.random_model(model_lib.get_config("tiny", num_layers=1), tok, batch_size=4,
                           max_length=4096)
  examples = _gsm8k(3)
  items = rationales.generate_pass(lm, "gsm8k", examples, CFG)
  stats = rationales.statistics(items)
  assert stats["attempted"] == 3
  assert stats["rationalization_attempts"] == 3 - stats["correct"]
  assert stats["kept"] == sum(bool(it.source) for it in items)
  assert [it.index for it in items] == [0, 1, 2]
  assert "| 1 | 3 |" in rationales.format_table([{"iteration": 1, **stats}])


def test_few_shot_train_prefix(tmp_path):
  examples = _csqa(2)
  items = rationales.generate_pass(HintCopyingModel("commonsenseqa", examples), "commonsenseqa",
                                   examples, CFG)
  path = str(tmp_path / "t.jsonl")
  rationales.write_examples(path, items, "commonsenseqa", few_shot_train=True)
  with open(path, encoding="utf-8") as f:
    first = json.loads(f.readline())
  exemplars = tasks.packaged_prompts("commonsenseqa")
  assert first["prompt"] == "\n\n".join(exemplars) + "\n\n" + rationales.query(
      "commonsenseqa", examples[0])
