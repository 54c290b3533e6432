"""One STaR generation pass: rationales, rationalization, and the fine-tuning set (spec/star.md
§1.2-1.7) for CommonsenseQA and GSM8K.

For every training item the model writes a rationale and an answer after the task's few-shot
prompt (`jaxstar.evals.lm.LanguageModel.sample`: batched, sharded, every process gets every
result). An item whose final answer matches the gold one is kept. The failures are tried again
with the hint (CommonsenseQA: " (CORRECT)" after the gold choice, with the hinted exemplars;
GSM8K: the final answer after the question, or the whole gold solution as the shipped code does)
and kept when right, saved WITHOUT the hint: the saved example is always the hint-free query
followed by the model's completion.

The completion kept is what the answer check reads: CommonsenseQA its first line; GSM8K up to and
including the first "####" line.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from jaxstar import sampling
from jaxstar.data import tasks
from jaxstar.errors import UserError
from jaxstar.evals import answers

TASKS = ("commonsenseqa", "gsm8k")
STOP = ("\n\n",)  # exemplars are separated by blank lines: a completion never needs one


@dataclasses.dataclass(frozen=True)
class Item:
  """One training item's outcome in a pass.

  Attributes:
    index: the item's position in the split.
    query: the hint-free query ("Q: ...\\nA:").
    completion: the kept part of the model's continuation (from the hinted attempt when
      rationalized), '' when neither attempt was right.
    source: 'direct', 'rationalized' or '' (not kept).
    prediction: the extracted answer of the last attempt (None: none found).
  """
  index: int
  query: str
  completion: str
  source: str
  prediction: str | None


def check_task(task: str) -> None:
  if task not in TASKS:
    raise UserError(f"STaR task {task!r}; choose one of {TASKS}")


def query(task: str, example: tasks.Example, hint: bool = False,
          hint_whole_solution: bool = False) -> str:
  """The query of spec §1.2, with the rationalization hint when `hint`."""
  check_task(task)
  if task == "commonsenseqa":
    if hint and example.answer not in {label.upper() for label, _ in example.choices}:
      raise UserError(f"CommonsenseQA item {example.question!r}: its answer "
                      f"{example.answer!r} matches none of its choices, so there is no choice "
                      "to mark (CORRECT)")
    return tasks.format_csqa_query(example, hint=hint)
  return tasks.format_gsm8k_query(example, hint=hint, hint_whole_solution=hint_whole_solution)


def completion(task: str, text: str) -> str:
  """The part of a generated continuation that is kept (and that the answer check reads)."""
  text = text.split(tasks.END_OF_TEXT, 1)[0]
  if task == "commonsenseqa":
    return text.split("\n", 1)[0]
  lines = text.split("\n")
  for i, line in enumerate(lines):
    if "####" in line:
      return "\n".join(lines[:i + 1])
  return text


def is_right(task: str, text: str, gold: str) -> tuple[bool, str | None]:
  pred = answers.extract_answer(task, text, "few_shot")
  return answers.is_correct(task, pred, gold), pred


def generate_pass(lm, task: str, examples: Sequence[tasks.Example], cfg: sampling.SamplingConfig,
                  *, rationalize: bool = True, hint_whole_solution: bool = False,
                  progress=None) -> list[Item]:
  """Rationales for `examples`, then rationalization of the failures; one `Item` each."""
  check_task(task)
  exemplars = tasks.packaged_prompts(task, "rationale")
  queries = [query(task, ex) for ex in examples]
  gens = lm.sample([tasks.few_shot_context(exemplars, q) for q in queries], cfg,
                   progress=progress)
  items = []
  for i, (ex, q, gen) in enumerate(zip(examples, queries, gens)):
    kept = completion(task, gen.text)
    right, pred = is_right(task, kept, ex.answer)
    items.append(Item(i, q, kept if right else "", "direct" if right else "", pred))
  failed = [it.index for it in items if not it.source]
  if rationalize and failed:
    hinted = tasks.packaged_prompts(task, "answer_key")
    prompts = [tasks.few_shot_context(hinted, query(task, examples[i], hint=True,
                                                    hint_whole_solution=hint_whole_solution))
               for i in failed]
    for i, gen in zip(failed, lm.sample(prompts, cfg, progress=progress)):
      kept = completion(task, gen.text)
      right, pred = is_right(task, kept, examples[i].answer)
      items[i] = dataclasses.replace(items[i], completion=kept if right else "",
                                     source="rationalized" if right else "", prediction=pred)
  return items


def statistics(items: Sequence[Item], rationalize: bool = True) -> dict[str, int]:
  """attempted, correct (direct), rationalization attempts, rationalized, kept."""
  direct = sum(it.source == "direct" for it in items)
  rationalized = sum(it.source == "rationalized" for it in items)
  return {"attempted": len(items), "correct": direct,
          "rationalization_attempts": (len(items) - direct) if rationalize else 0,
          "rationalized": rationalized, "kept": direct + rationalized}


def write_examples(path: str, items: Sequence[Item], task: str,
                   few_shot_train: bool = False) -> int:
  """The kept items as JSONL {index, source, prompt, completion}: the model trains on
  `prompt + completion`, the loss on the completion by default. `few_shot_train` prepends the
  hint-free exemplars to every prompt (spec §1.5). Returns the number written."""
  prefix = ""
  if few_shot_train:
    prefix = "\n\n".join(tasks.packaged_prompts(task, "rationale")) + "\n\n"
  n = 0
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for it in items:
      if it.source:
        f.write(json.dumps({"index": it.index, "source": it.source, "prompt": prefix + it.query,
                            "completion": it.completion}) + "\n")
        n += 1
  os.replace(tmp, path)  # a killed pass leaves no half-written set
  return n


def format_table(rows: Sequence[dict]) -> str:
  """Per-iteration statistics as a markdown table (rows: dicts with 'iteration' and the
  `statistics` keys)."""
  keys = ("attempted", "correct", "rationalization_attempts", "rationalized", "kept")
  lines = ["| iteration | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for r in rows:
    lines.append(f"| {r['iteration']} | " + " | ".join(str(r[k]) for k in keys) + " |")
  return "\n".join(lines)
