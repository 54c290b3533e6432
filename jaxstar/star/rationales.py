"""One STaR generation pass: rationales, rationalization, and the fine-tuning set (spec/star.md
§1.2-1.7) for CommonsenseQA, GSM8K and n-digit addition with a scratchpad.

For every training item the model writes a rationale and an answer after the task's few-shot
prompt (`jaxstar.evals.lm.LanguageModel.sample`: batched, sharded, every process gets every
result). An item whose final answer matches the gold one is kept. The failures are tried again
with the hint and kept when right, saved WITHOUT the hint: the saved example is always the
hint-free query followed by the model's completion. Hints:
  CommonsenseQA  " (CORRECT)" after the gold choice, with the hinted exemplars;
  GSM8K          the final answer after the question, " (18)", or with `hint_whole_solution`
                 the whole gold solution, as the shipped code does (spec §1.10 #2);
  arithmetic     the answer line after "Target:" ("Target: 5 8"), in the query and in its
                 in-sample exemplars.

The completion kept is what the answer check reads: CommonsenseQA its first line; GSM8K up to
and including the first "####" line; arithmetic up to and including the answer line after
"</scratch>".

A task is an object with `prompt(example, hint)`, `query(example)`, `completion(text)`,
`check(completion, example)`, `group(example)`, `stop` and `max_new_tokens`; `make_task` builds
one by name.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from jaxstar import sampling
from jaxstar.data import tasks
from jaxstar.errors import UserError
from jaxstar.evals import answers

TASKS = ("commonsenseqa", "gsm8k", "arithmetic")


@dataclasses.dataclass(frozen=True)
class Item:
  """One training item's outcome in a pass.

  Attributes:
    index: the item's position in the list of examples of the pass.
    query: the hint-free query ("Q: ...\\nA:", "Input: ...\\nTarget:").
    completion: the kept part of the model's continuation (from the hinted attempt when
      rationalized), '' when neither attempt was right.
    source: 'direct', 'rationalized' or '' (not kept).
    prediction: the extracted answer of the last attempt (None: none found).
    text: the last attempt's whole continuation, as generated.
    tokens: tokens generated for this item over its attempts.
  """
  index: int
  query: str
  completion: str
  source: str
  prediction: str | None
  text: str = ""
  tokens: int = 0


def check_task(task: str) -> None:
  """Raises `UserError` unless `task` is one of TASKS."""
  if task not in TASKS:
    raise UserError(f"STaR task {task!r}; choose one of {TASKS}")


# ----------------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class QATask:
  """CommonsenseQA or GSM8K with the STaR paper's packaged few-shot prompts."""
  name: str
  hint_whole_solution: bool = False
  prompt_path: str = ""        # a few-shot prompt file ('' = the packaged one)
  hint_prompt_path: str = ""   # its hinted version, for rationalization ('' = packaged)

  def __post_init__(self):
    check_task(self.name)
    if self.name == "arithmetic":
      raise ValueError("use ArithmeticTask for arithmetic")
    self.exemplars()          # a missing or empty prompt file fails here, before any work
    self.exemplars(hint=True)

  @property
  def stop(self) -> tuple[str, ...]:
    """Stop strings: a newline for CommonsenseQA, a blank line for GSM8K."""
    # A CommonsenseQA answer is one line; a GSM8K solution ends before the next blank line.
    return ("\n",) if self.name == "commonsenseqa" else ("\n\n",)

  @property
  def max_new_tokens(self) -> int:
    """Tokens generated per attempt at most: 96 for CommonsenseQA, 256 for GSM8K."""
    return 96 if self.name == "commonsenseqa" else 256   # spec §1.10 #6

  def exemplars(self, hint: bool = False) -> list[str]:
    """The few-shot exemplars: of `prompt_path` (`hint_prompt_path` with `hint`), else the
    packaged ones."""
    path = self.hint_prompt_path if hint else self.prompt_path
    if path:
      return tasks.load_prompts(path)
    return tasks.packaged_prompts(self.name, "answer_key" if hint else "rationale")

  def query(self, example: tasks.Example, hint: bool = False) -> str:
    """The query ("Q: ...\\nA:") of `example`, with the task's hint when `hint`."""
    if self.name == "commonsenseqa":
      if hint and example.answer not in {label.upper() for label, _ in example.choices}:
        raise UserError(f"CommonsenseQA item {example.question!r}: its answer "
                        f"{example.answer!r} matches none of its choices, so there is no "
                        "choice to mark (CORRECT)")
      return tasks.format_csqa_query(example, hint=hint)
    return tasks.format_gsm8k_query(example, hint=hint,
                                    hint_whole_solution=self.hint_whole_solution)

  def prompt(self, example: tasks.Example, hint: bool = False) -> str:
    """The few-shot context: the exemplars (the hinted ones with `hint`), then the query."""
    return tasks.few_shot_context(self.exemplars(hint), self.query(example, hint))

  def train_prefix(self) -> str:
    """What `few_shot_train` puts before every saved query: the hint-free exemplars."""
    return "\n\n".join(self.exemplars()) + "\n\n"

  def completion(self, text: str) -> str:
    """The kept part of a generated `text`: CommonsenseQA its first line; GSM8K up to and
    including the first "####" line (all of it when there is none)."""
    text = text.split(tasks.END_OF_TEXT, 1)[0]
    if self.name == "commonsenseqa":
      return text.split("\n", 1)[0]
    lines = text.split("\n")
    for i, line in enumerate(lines):
      if "####" in line:
        return "\n".join(lines[:i + 1])
    return text

  def check(self, completion: str, example: tasks.Example) -> tuple[bool, str | None]:
    """(right, extracted answer or None) of `completion` against `example`'s gold answer."""
    pred = answers.extract_answer(self.name, completion, "few_shot")
    return answers.is_correct(self.name, pred, example.answer), pred

  def group(self, example: tasks.Example) -> str:
    """The accuracy group of `example`: always 'all'."""
    del example
    return "all"


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """n-digit addition with STaR's scratchpad (spec/star.md §2.3): each query follows `shots`
  solved problems of its own digit count, drawn per problem from `exemplar_pool` fixed ones
  (the paper: 9 of 50)."""
  name: str = "arithmetic"
  shots: int = 3
  exemplar_pool: int = 20
  seed: int = 0
  max_digits: int = 5

  def __post_init__(self):
    if self.shots < 0 or self.exemplar_pool < self.shots:
      raise UserError(f"arithmetic: shots={self.shots} and exemplar_pool="
                      f"{self.exemplar_pool} need 0 <= shots <= exemplar_pool")

  stop = ("\n\n",)

  @property
  def max_new_tokens(self) -> int:
    """Tokens generated per attempt at most: 48 per digit of `max_digits`, and 48 more."""
    # "<scratch>" ... "</scratch>" and the answer: about 45 bytes per digit and 40 more.
    return 48 * self.max_digits + 48

  @staticmethod
  def operands(example: tasks.Example) -> tuple[int, int]:
    """(a, b) of an addition example: from its raw fields, else from its question "a + b"."""
    raw = example.raw or {}
    if "a" in raw and "b" in raw:
      return int(raw["a"]), int(raw["b"])
    a, b = example.question.split(" + ")
    return int(a.replace(" ", "")), int(b.replace(" ", ""))

  def digits(self, example: tasks.Example) -> int:
    """The digit count of `example` (of its first operand)."""
    return len(str(self.operands(example)[0]))

  def exemplars(self, example: tasks.Example) -> list[tuple[int, int]]:
    """The (a, b) solved before `example`: `shots` seeded draws from `exemplar_pool` fixed
    problems of its digit count, itself excluded."""
    a, b = self.operands(example)
    d = self.digits(example)
    pool = [ex.raw for ex in tasks.generate_addition(self.exemplar_pool, d, seed=self.seed + 7)]
    pool = [(p["a"], p["b"]) for p in pool if (p["a"], p["b"]) != (a, b)]
    rng = np.random.default_rng([self.seed, d, a, b])
    return [pool[i] for i in rng.choice(len(pool), size=min(self.shots, len(pool)),
                                        replace=False)]

  def query(self, example: tasks.Example, hint: bool = False) -> str:
    """The query ("Input: ...\\nTarget:") of `example`; `hint` puts the answer line after
    "Target:"."""
    return tasks.addition_query(*self.operands(example), hint=hint)

  def prompt(self, example: tasks.Example, hint: bool = False) -> str:
    """The solved exemplars (hinted with `hint`), then the query, separated by blank lines."""
    shots = tasks.addition_sample(self.exemplars(example), hint=hint)
    return tasks.few_shot_context([shots] if shots else [], self.query(example, hint))

  def train_prefix(self) -> str:
    """As `QATask.train_prefix`: ''."""
    return ""   # the exemplars are per problem; saved examples are the query alone

  def completion(self, text: str) -> str:
    """The kept part of a generated `text`: up to and including the answer line after
    "</scratch>" (all of it when there is none)."""
    lines = text.split(tasks.END_OF_TEXT, 1)[0].split("\n")
    if "</scratch>" in lines:
      return "\n".join(lines[:lines.index("</scratch>") + 2])
    return "\n".join(lines)

  def check(self, completion: str, example: tasks.Example) -> tuple[bool, str | None]:
    """(right, predicted answer line or None) of `completion` against `example`'s answer."""
    pred = tasks.extract_arithmetic_answer(completion)
    return pred is not None and pred == example.answer, pred

  def group(self, example: tasks.Example) -> str:
    """The accuracy group of `example`: its digit count, '<n> digits'."""
    return f"{self.digits(example)} digits"


def make_task(name: str, *, hint_whole_solution: bool = False, prompt_path: str = "",
              hint_prompt_path: str = "", shots: int = 3, exemplar_pool: int = 20, seed: int = 0,
              max_digits: int = 5):
  """The task object of `name` (one of TASKS)."""
  check_task(name)
  if name == "arithmetic":
    return ArithmeticTask(shots=shots, exemplar_pool=exemplar_pool, seed=seed,
                          max_digits=max_digits)
  return QATask(name, hint_whole_solution=hint_whole_solution, prompt_path=prompt_path,
                hint_prompt_path=hint_prompt_path)


def _task(task, hint_whole_solution: bool = False):
  if isinstance(task, str):
    return make_task(task, hint_whole_solution=hint_whole_solution)
  return task


# ------------------------------------------------------------------ name-based helper


def query(task, example: tasks.Example, hint: bool = False,
          hint_whole_solution: bool = False) -> str:
  """The query of spec §1.2 (without exemplars), with the rationalization hint when `hint`."""
  return _task(task, hint_whole_solution).query(example, hint)


# ------------------------------------------------------------------------------ the pass


def generate_pass(lm, task, examples: Sequence[tasks.Example], cfg: sampling.SamplingConfig,
                  *, rationalize: bool = True, hint_whole_solution: bool = False,
                  progress=None) -> list[Item]:
  """Rationales for `examples`, then rationalization of the failures; one `Item` each.

  `task` is a name or a task object; `lm` anything with `sample(prompts, cfg, progress)`.
  """
  task = _task(task, hint_whole_solution)
  queries = [task.query(ex) for ex in examples]
  gens = lm.sample([task.prompt(ex) for ex in examples], cfg, progress=progress)
  items = []
  for i, (ex, q, gen) in enumerate(zip(examples, queries, gens)):
    kept = task.completion(gen.text)
    right, pred = task.check(kept, ex)
    items.append(Item(i, q, kept if right else "", "direct" if right else "", pred, gen.text,
                      len(gen.tokens)))
  failed = [it.index for it in items if not it.source]
  if rationalize and failed:
    prompts = [task.prompt(examples[i], hint=True) for i in failed]
    for i, gen in zip(failed, lm.sample(prompts, cfg, progress=progress)):
      kept = task.completion(gen.text)
      right, pred = task.check(kept, examples[i])
      items[i] = dataclasses.replace(items[i], completion=kept if right else "",
                                     source="rationalized" if right else "", prediction=pred,
                                     text=gen.text, tokens=items[i].tokens + len(gen.tokens))
  return items


def statistics(items: Sequence[Item], rationalize: bool = True) -> dict[str, int]:
  """attempted, correct (direct), rationalization attempts, rationalized, kept."""
  direct = sum(it.source == "direct" for it in items)
  rationalized = sum(it.source == "rationalized" for it in items)
  return {"attempted": len(items), "correct": direct,
          "rationalization_attempts": (len(items) - direct) if rationalize else 0,
          "rationalized": rationalized, "kept": direct + rationalized}


def kept_examples(items: Sequence[Item], task, few_shot_train: bool = False) -> list[dict]:
  """The kept items as {index, source, prompt, completion}: the model trains on
  `prompt + completion`, the loss on the completion by default. `few_shot_train` prepends the
  hint-free exemplars to every prompt (spec §1.5)."""
  prefix = _task(task).train_prefix() if few_shot_train else ""
  return [{"index": it.index, "source": it.source, "prompt": prefix + it.query,
           "completion": it.completion} for it in items if it.source]


def write_examples(path: str, items: Sequence[Item], task, few_shot_train: bool = False) -> int:
  """`kept_examples` as JSONL, written atomically; returns the number written."""
  rows = kept_examples(items, task, few_shot_train)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)  # a killed pass leaves no half-written set
  return len(rows)


def format_table(rows: Sequence[dict]) -> str:
  """Per-iteration statistics as a markdown table (rows: dicts with 'iteration' and the
  `statistics` keys)."""
  keys = ("attempted", "correct", "rationalization_attempts", "rationalized", "kept")
  lines = ["| iteration | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for r in rows:
    lines.append(f"| {r['iteration']} | " + " | ".join(str(r[k]) for k in keys) + " |")
  return "\n".join(lines)
