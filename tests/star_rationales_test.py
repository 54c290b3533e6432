"""One STaR generation pass (jaxstar/star/rationales.py): hints in and out, bookkeeping, the
saved fine-tuning set, bad input."""
import json
import os
import subprocess
import sys

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


def test_arithmetic_hint_goes_after_target_and_never_into_the_saved_query():
  task = rationales.make_task("arithmetic", shots=2, exemplar_pool=5)
  ex = tasks.generate_addition(1, 3, seed=4)[0]
  plain, hinted = task.prompt(ex), task.prompt(ex, hint=True)
  assert plain.endswith(task.query(ex)) and task.query(ex).endswith("\nTarget:")
  assert hinted.endswith(f"\nTarget: {ex.answer}")
  blocks = hinted.split("\n\n")
  assert len(blocks) == 3 and all(b.split("\n")[2] == "Target: " + b.split("\n")[-1]
                                  for b in blocks[:-1])       # hinted exemplars too
  assert all(len(b.split("\n")[1].split(" + ")[0].split()) == 3 for b in blocks)  # same digits
  right = "\n" + tasks.addition_scratchpad(ex.raw["a"], ex.raw["b"]) + f"\n{ex.answer}"
  items = rationales.generate_pass(_Scripted(lambda p: right if "Target: " in p.rsplit(
      "\n\n", 1)[-1] else "\n<scratch>\n</scratch>\n0"), task, [ex], CFG)
  assert items[0].source == "rationalized" and items[0].query == task.query(ex)
  assert items[0].completion == right                     # cut after the answer line


class _Scripted:
  def __init__(self, reply):
    self.reply = reply

  def sample(self, prompts, cfg, progress=None):
    del cfg, progress
    return [sampling.Generation(text=self.reply(p), tokens=[1, 2], finish="stop")
            for p in prompts]


@pytest.mark.parametrize("task,gold", [("commonsenseqa", "B"), ("gsm8k", "18"),
                                       ("arithmetic", "5 8")])
def test_malformed_generations_are_wrong_not_errors(task, gold):
  t = rationales.make_task(task)
  ex = tasks.Example(question="1 5 + 4 3" if task == "arithmetic" else "q", answer=gold,
                     choices=(("A", "x"), ("B", "y")) if task == "commonsenseqa" else (),
                     solution="#### 18" if task == "gsm8k" else "")
  for text in ["", "\n", "<|endoftext|>", "garbage without an answer", "\n\n\n(b", "####",
               "#### \n", "</scratch>", "<scratch>\n</scratch>", "(c", "\x00\ufffd",
               " The answer is (z).", "#### 1 8", "\n<scratch>\n</scratch>\n5 9"]:
    right, _ = t.check(t.completion(text), ex)
    assert right is False, (task, text)
  good = {"commonsenseqa": " So the answer is y (b).\nQ: next",
          "gsm8k": " 9 + 9 = 18\n#### 18\n\nQ:", "arithmetic":
          "\n" + tasks.addition_scratchpad(15, 43) + "\n5 8\n\nInput:"}[task]
  assert t.check(t.completion(good), ex) == (True, gold)


def test_star_never_imports_quietstar():
  code = ("import sys, jaxstar.star.stage, jaxstar.star.rationales; "
          "print([m for m in sys.modules if m.startswith('jaxstar.quietstar')])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  assert out.stdout.strip() == "[]"
