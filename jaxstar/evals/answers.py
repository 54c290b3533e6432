"""Generation-based answers: zero-shot CoT prompts, extraction, checking and majority votes.

Zero-shot chain of thought follows the official Quiet-STaR script (spec/quietstar.md §5.2):
the prompt ends "A: Let's think step by step."; the first stage's continuation is cut at the
next "Q:" or "\\n\\n\\n" (`truncate_first_stage`); the answer stage appends
`ANSWER_TRIGGERS[task]` (`answer_stage_prompt`) and the answer is read from what follows
(`extract_zero_shot_answer`). Few-shot chain of thought (STaR) reuses the extraction rules of
jaxstar.data.tasks (spec/star.md §1.4).

Predictions are normalized strings: a GSM8K number as `tasks.normalize_number` writes it, a
CommonsenseQA letter 'A'..'E', an addition answer line ("5 8"); None when there is no answer.
"""
import collections
import decimal
import re
from typing import Iterable

from jaxstar.data import tasks
from jaxstar.data.tasks import Example
from jaxstar.errors import UserError

ZERO_SHOT_COT_TRIGGER = "Let's think step by step."
ANSWER_TRIGGERS = {
    'gsm8k': '\nTherefore, the answer (arabic numerals) is',
    'commonsenseqa': '\nTherefore, among A through E, the answer is',
}
# Strings that end the first stage: the model starting a new question, or running out of text.
FIRST_STAGE_STOPS = ('Q:', '\n\n\n')
MODES = ('few_shot', 'zero_shot')
FEW_SHOT_TASKS = ('gsm8k', 'commonsenseqa', 'arithmetic')


def _check_zero_shot_task(task: str) -> None:
  if task not in ANSWER_TRIGGERS:
    raise UserError(f'unknown zero-shot task {task!r}; valid: {", ".join(ANSWER_TRIGGERS)}')


def zero_shot_prompt(task: str, example: Example) -> str:
  """The first-stage prompt, ending "A: Let's think step by step.".

  gsm8k: "Q: <question>\\nA: Let's think step by step." exactly as the official script.
  commonsenseqa: the STaR query (`tasks.format_csqa_query`: "Q: <stem>\\nAnswer Choices:\\n
  (a) <text>\\n...\\nA:") + " Let's think step by step.". The official script has no CSQA
  variant; this keeps the choice format the few-shot evaluation uses.
  """
  _check_zero_shot_task(task)
  if task == 'gsm8k':
    return f'Q: {example.question}\nA: {ZERO_SHOT_COT_TRIGGER}'
  return f'{tasks.format_csqa_query(example)} {ZERO_SHOT_COT_TRIGGER}'


def truncate_first_stage(text: str) -> str:
  """The first-stage continuation cut before the first "Q:" or "\\n\\n\\n" in it.

  `text` is only what the model generated after the prompt. The official script stops when
  "Q:" or "\\n\\n\\n" appears a second time in prompt + continuation. For "Q:" (once in the
  prompt) that is the same cut; the prompt has no "\\n\\n\\n", so the official waits for a
  second one, while here the first already ends the stage (a deliberate simplification).
  """
  cut = min((i for i in (text.find(s) for s in FIRST_STAGE_STOPS) if i >= 0), default=len(text))
  return text[:cut]


def answer_stage_prompt(task: str, prompt: str, generation: str) -> str:
  """The answer-stage prompt: prompt + truncated first stage, right-stripped, + the trigger.

  As the official script, which strips trailing whitespace before appending the trigger.
  """
  _check_zero_shot_task(task)
  return (prompt + truncate_first_stage(generation)).rstrip() + ANSWER_TRIGGERS[task]


# A thousands separator: a comma between a digit and exactly three digits.
_THOUSANDS = re.compile(r'(?<=\d),(?=\d{3}(?!\d))')
# A number; a '-' is its sign only when not glued to a preceding word or number ("5-6" is 5).
_NUMBER = re.compile(r'(?:(?<![\w-])-)?\d+(?:\.\d+)?')
# A choice letter standing alone: "(c)", "C.", "c", "C)"; not a letter of a word or "e.g.".
_LETTER = re.compile(r'(?<![A-Za-z0-9])(\()?([A-Ea-e])(?![A-Za-z0-9])(?!\.[A-Za-z])')


def extract_zero_shot_answer(task: str, text: str) -> str | None:
  """The answer in the text generated after the answer trigger, normalized, or None.

  gsm8k: the first number; thousands commas dropped ("1,080" -> "1080"), units ignored ("$18",
  "18 dollars" -> "18"). Deviation from the official script, which reads only the digits of the
  first integer: the sign and decimals are kept ("-3", "2.5"), then `tasks.normalize_number`
  ("72.0" -> "72"); the official also deletes every comma ("1,2" -> 12), here only commas
  followed by exactly three digits.
  commonsenseqa: the first standalone choice letter A-E, either case, with or without
  parentheses ("(c)", "C.", "c") -> 'C'. A lowercase "a" followed by a word ("a ball") is the
  article, not choice A, unless written "(a)".
  """
  _check_zero_shot_task(task)
  if task == 'gsm8k':
    m = _NUMBER.search(_THOUSANDS.sub('', text))
    return tasks.normalize_number(m.group()) if m else None
  for m in _LETTER.finditer(text):
    paren, letter = m.groups()
    if letter == 'a' and not paren and re.match(r'\s+[A-Za-z]', text[m.end():]):
      continue
    return letter.upper()
  return None


def extract_answer(task: str, text: str, mode: str) -> str | None:
  """The normalized prediction in generated `text`, or None.

  Args:
    task: 'gsm8k', 'commonsenseqa', or (few-shot only) 'arithmetic'.
    text: the generation after the prompt (zero-shot: after the answer trigger).
    mode: 'few_shot' (STaR's rules, spec/star.md §1.4: GSM8K the text after "####" on the first
      line holding one; CSQA the first line's final "(x)."; addition the answer line) or
      'zero_shot' (`extract_zero_shot_answer`).
  """
  if mode == 'zero_shot':
    return extract_zero_shot_answer(task, text)
  if mode != 'few_shot':
    raise UserError(f'unknown answer mode {mode!r}; valid: {", ".join(MODES)}')
  if task == 'gsm8k':
    raw = tasks.extract_gsm8k_answer(text)
    pred = tasks.normalize_number(raw) if raw is not None else None
  elif task == 'commonsenseqa':
    pred = tasks.extract_csqa_answer(text)
  elif task == 'arithmetic':
    pred = tasks.extract_arithmetic_answer(text)
  else:
    raise UserError(f'unknown few-shot task {task!r}; valid: {", ".join(FEW_SHOT_TASKS)}')
  return pred or None  # An empty answer ("####" with nothing after it) is no answer.


def is_correct(task: str, prediction: str | None, gold: str) -> bool:
  """Whether a prediction matches the gold answer.

  gsm8k: equal after `tasks.normalize_number`, or equal in value ("18.50" and "18.5");
  commonsenseqa: the same letter in any case; arithmetic: the same answer line.
  """
  if prediction is None:
    return False
  if task == 'gsm8k':
    pred, want = tasks.normalize_number(prediction), tasks.normalize_number(gold)
    try:  # By value where both are numbers, so "18.50" matches "18.5".
      return pred == want or decimal.Decimal(pred) == decimal.Decimal(want)
    except decimal.InvalidOperation:
      return False
  if task == 'commonsenseqa':
    return prediction.strip().upper() == gold.strip().upper()
  if task == 'arithmetic':
    return prediction.strip() == gold.strip()
  raise UserError(f'unknown task {task!r}; valid: {", ".join(FEW_SHOT_TASKS)}')


def majority_vote(predictions: Iterable[str | None]) -> str | None:
  """The most common non-None prediction, ties to the first seen; None if there is none.

  The official script counts None as a vote too (so mostly-unparsed samples vote None); here a
  sample without an answer abstains.
  """
  counts = collections.Counter(p for p in predictions if p is not None)
  # A Counter iterates in first-seen order and max keeps the first maximum: ties go first.
  return max(counts, key=counts.get) if counts else None
