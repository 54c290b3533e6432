"""STaR question-answering tasks: CommonsenseQA, GSM8K and n-digit addition.

For each task: a loader (jsonl rows -> `Example`), the query format of spec/star.md §1.2 with and
without the rationalization hint, and answer extraction + checking (§1.4). Few-shot prompt files
are split on blank lines; the generation context is the exemplars and the query joined by blank
lines (`few_shot_context`).

Full splits come from a jsonl file named in the config, or, without one, from the Hugging Face
Hub (`load_task`; needs the optional `datasets` package, `pip install -e .[hf]`). The STaR
paper's few-shot prompt files ship inside the package (`packaged_prompts`).

Gold answers (`Example.answer`): CommonsenseQA 'A'..'E' ('' for an unlabelled test row); GSM8K
the final number after "####", normalized (`normalize_number`: no commas, "$", trailing ".0");
addition the answer line, digits separated by spaces ("5 8").
"""
import dataclasses
import importlib.resources
import re
from typing import Any, Sequence

import numpy as np

from jaxstar.data import jsonl
from jaxstar.errors import UserError

END_OF_TEXT = '<|endoftext|>'  # The official code's sample terminator; extraction cuts at it.
CSQA_HINT = ' (CORRECT)'

# Splits `load_task` knows, named as on the Hugging Face Hub, and where each task lives there
# (dataset, config).
TASK_SPLITS = {'commonsenseqa': ('train', 'validation'), 'gsm8k': ('train', 'test')}
HF_DATASETS = {'commonsenseqa': ('tau/commonsense_qa', None), 'gsm8k': ('openai/gsm8k', 'main')}
# Few-shot prompt files shipped in jaxstar/data/prompts/<task>/, by kind (`packaged_prompts`).
PROMPT_FILES = {
    'commonsenseqa': {'rationale': 'prompts.txt', 'answer_key': 'prompts_answer_key.txt',
                      'direct': 'prompts_direct.txt',
                      'direct_answer_key': 'prompts_direct_answer_key.txt'},
    'gsm8k': {'rationale': 'prompts.txt', 'answer_key': 'prompts_answer_key.txt'},
}


@dataclasses.dataclass(frozen=True)
class Example:
  """One task item.

  Attributes:
    question: CSQA stem, GSM8K question, or addition operands ("1 5 + 4 3").
    answer: the gold answer (see the module docstring).
    choices: CSQA (label, text) pairs as in the file (labels 'A'..'E'); empty otherwise.
    solution: GSM8K gold worked solution (the `answer` field, ending "#### N"); '' otherwise.
    raw: the parsed jsonl row (or the operands for addition).
  """

  question: str
  answer: str
  choices: tuple[tuple[str, str], ...] = ()
  solution: str = ''
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------- CommonsenseQA


def _parse_csqa(row: Any) -> Example:
  q = jsonl.get_field(row, 'question', dict)
  stem = jsonl.get_field(q, 'stem', str)
  choices = tuple((jsonl.get_field(c, 'label', str), jsonl.get_field(c, 'text', str))
                  for c in jsonl.get_field(q, 'choices', list))
  if not choices:
    raise jsonl.MalformedRow('no answer choices')
  answer = row.get('answerKey', '')  # Absent in the unlabelled test split.
  if not isinstance(answer, str):
    raise jsonl.MalformedRow(f"field 'answerKey' should be str, got {type(answer).__name__}")
  if answer and answer not in {label for label, _ in choices}:
    raise jsonl.MalformedRow(f'answerKey {answer!r} is not a choice label')
  return Example(question=stem, answer=answer.upper(), choices=choices, raw=row)


def load_csqa(path: str | Sequence[str], *, skip_malformed: bool = False, max_rows: int = 0,
              config_field: str = '') -> jsonl.Loaded[Example]:
  """CommonsenseQA in the nested TAU jsonl format (spec/star.md §2.1).

  Raises MalformedRow (a UserError) "<path>:<line>: ..." on a malformed row unless
  `skip_malformed`, in which case it is dropped and counted in `.num_skipped`; UserError naming
  the files (and `config_field`) when no row is left.
  """
  return jsonl.read_jsonl(path, _parse_csqa, skip_malformed=skip_malformed, max_rows=max_rows,
                          config_field=config_field)


def _csqa_from_hf(row: Any) -> dict[str, Any]:
  """A `tau/commonsense_qa` record in the nested jsonl form that `_parse_csqa` reads.

  The Hub's record is flat: {id, question (the stem), question_concept,
  choices: {label: [...], text: [...]}, answerKey}.
  """
  choices = jsonl.get_field(row, 'choices', dict)
  labels, texts = choices.get('label'), choices.get('text')
  if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts):
    raise jsonl.MalformedRow("field 'choices' should hold 'label' and 'text' lists of one length")
  return {'answerKey': row.get('answerKey', ''), 'id': row.get('id', ''),
          'question': {'question_concept': row.get('question_concept', ''),
                       'choices': [{'label': l, 'text': t} for l, t in zip(labels, texts)],
                       'stem': jsonl.get_field(row, 'question', str)}}


def format_csqa_query(example: Example, hint: bool = False) -> str:
  """"Q: <stem>\\nAnswer Choices:\\n(a) <text>\\n...\\nA:"; `hint` marks the gold " (CORRECT)"."""
  lines = [f'Q: {example.question}', 'Answer Choices:']
  for label, text in example.choices:
    mark = CSQA_HINT if hint and label.upper() == example.answer else ''
    lines.append(f'({label.lower()}) {text}{mark}')
  lines.append('A:')
  return '\n'.join(lines)


_CSQA_FINAL = re.compile(r'\(([a-eA-E])\)\.\s*$')
_CSQA_ANY = re.compile(r'\(([a-eA-E])\)')


def extract_csqa_answer(text: str, fallback: bool = True) -> str | None:
  """The predicted letter ('A'..'E') of a generated CSQA rationale, or None.

  As the official code: the first line, cut at <|endoftext|>, must end "(x).". With `fallback`,
  a line not ending that way gives its last "(x)" instead.
  """
  line = text.split('\n', 1)[0].split(END_OF_TEXT, 1)[0]
  m = _CSQA_FINAL.search(line)
  if m is None and fallback:
    found = _CSQA_ANY.findall(line)
    return found[-1].upper() if found else None
  return m.group(1).upper() if m else None


def check_csqa(text: str, gold: str, fallback: bool = True) -> bool:
  """Whether the generated `text` answers the gold letter (case-insensitive)."""
  pred = extract_csqa_answer(text, fallback=fallback)
  return pred is not None and pred == gold.strip().upper()


# ---------------------------------------------------------------------------------- GSM8K


def gsm8k_final_answer(solution: str) -> str:
  """The raw final answer of a GSM8K solution: the text after its last "####", stripped."""
  if '####' not in solution:
    raise ValueError("GSM8K solution has no '####' line")
  return solution.rsplit('####', 1)[1].strip()


def normalize_number(s: str) -> str:
  """Canonical form of a numeric answer: "1,080" -> "1080", "$5" -> "5", "72.0" -> "72"."""
  s = s.strip().replace(',', '').replace('$', '').strip().rstrip('.')
  if re.fullmatch(r'[-+]?\d+\.0*', s):
    s = s.split('.', 1)[0]
  return s.lstrip('+')


def _parse_gsm8k(row: Any) -> Example:
  question = jsonl.get_field(row, 'question', str)
  solution = jsonl.get_field(row, 'answer', str)
  if '####' not in solution:
    raise jsonl.MalformedRow("field 'answer' has no '#### <number>' line")
  return Example(question=question, answer=normalize_number(gsm8k_final_answer(solution)),
                 solution=solution, raw=row)


def load_gsm8k(path: str | Sequence[str], *, skip_malformed: bool = False, max_rows: int = 0,
               config_field: str = '') -> jsonl.Loaded[Example]:
  """GSM8K jsonl (question, answer ending "#### N"); errors as `load_csqa`."""
  return jsonl.read_jsonl(path, _parse_gsm8k, skip_malformed=skip_malformed, max_rows=max_rows,
                          config_field=config_field)


def format_gsm8k_query(example: Example, hint: bool = False,
                       hint_whole_solution: bool = False) -> str:
  """"Q: <question>\\nA:".

  `hint` appends " (<final answer>)" to the question, as the hint prompt file does;
  with `hint_whole_solution` it appends the whole gold solution instead, as the shipped code
  does (spec/star.md §1.10 #2).
  """
  q = example.question
  if hint:
    shown = example.solution if hint_whole_solution else gsm8k_final_answer(example.solution)
    q = f'{q} ({shown})'
  return f'Q: {q}\nA:'


def extract_gsm8k_answer(text: str) -> str | None:
  """The raw predicted answer: after the last "####" of the first line holding one, or None."""
  for line in text.split(END_OF_TEXT, 1)[0].split('\n'):
    if '####' in line:
      return line.rsplit('####', 1)[1].strip()
  return None


def check_gsm8k(text: str, gold: str, normalize: bool = True) -> bool:
  """Whether the generated `text` gets the gold answer.

  `normalize=False` is the official pure string comparison ("1,080" != "1080").
  """
  pred = extract_gsm8k_answer(text)
  if pred is None:
    return False
  if normalize:
    return normalize_number(pred) == normalize_number(gold)
  return pred == gold.strip()


# ----------------------------------------------------------------------------- full splits


def load_task(task: str, split: str, path: str | Sequence[str] = '', *,
              skip_malformed: bool = False, max_rows: int = 0,
              config_field: str = '') -> jsonl.Loaded[Example]:
  """A task split as `Example`s: from jsonl `path` if given, else from the Hugging Face Hub.

  Args:
    task: 'commonsenseqa' or 'gsm8k'.
    split: one of `TASK_SPLITS[task]` (CommonsenseQA: train, validation; GSM8K: train, test).
    path: jsonl file(s) of the split, as `load_csqa` / `load_gsm8k` take; '' loads
      `HF_DATASETS[task]` with the optional `datasets` package.
    skip_malformed, max_rows: as `jsonl.parse_rows`.
    config_field: the config field that named `path`, for error messages.

  Both sources give the same `Example`s (Hub CommonsenseQA records are first put in the
  nested jsonl form, which `Example.raw` then holds).
  """
  if task not in TASK_SPLITS:
    raise UserError(f'unknown task {task!r}; valid: {", ".join(TASK_SPLITS)}')
  if split not in TASK_SPLITS[task]:
    raise UserError(f'task {task!r} has no split {split!r}; valid: '
                    f'{", ".join(TASK_SPLITS[task])}')
  parse = {'commonsenseqa': _parse_csqa, 'gsm8k': _parse_gsm8k}[task]
  kw = dict(skip_malformed=skip_malformed, max_rows=max_rows, config_field=config_field)
  if path:
    return jsonl.read_jsonl(path, parse, **kw)
  try:
    import datasets  # pylint: disable=g-import-not-at-top  # Optional: only the Hub needs it.
  except ImportError as e:
    raise ImportError(f'loading {task} {split} from the Hugging Face Hub needs the datasets '
                      'package: pip install -e .[hf]; or pass the path of a jsonl copy of the '
                      f'split{jsonl.field_note(config_field)}') from e
  name, hf_config = HF_DATASETS[task]
  records = datasets.load_dataset(name, hf_config, split=split)
  source = f'Hugging Face dataset {name}[{split}]'
  decode = _csqa_from_hf if task == 'commonsenseqa' else None
  return jsonl.parse_rows(((f'{source} row {i}', r) for i, r in enumerate(records)), parse,
                          source=source, decode=decode, **kw)


# ------------------------------------------------------------------------ few-shot prompts


def load_prompts(path: str) -> list[str]:
  """The exemplars of a few-shot prompt file: its blocks separated by blank lines."""
  with open(path, encoding='utf-8') as f:
    return _split_prompts(f.read(), path)


def packaged_prompts(task: str, kind: str = 'rationale') -> list[str]:
  """The exemplars of a few-shot prompt file shipped with jaxstar (`PROMPT_FILES`).

  Args:
    task: 'commonsenseqa' or 'gsm8k'.
    kind: 'rationale' (worked exemplars), 'answer_key' (the same with the hint, for
      rationalization); CommonsenseQA also has 'direct' and 'direct_answer_key' (answers only,
      the no-rationale baseline).
  """
  if task not in PROMPT_FILES:
    raise UserError(f'no packaged prompts for task {task!r}; valid tasks: '
                    f'{", ".join(PROMPT_FILES)}')
  if kind not in PROMPT_FILES[task]:
    raise UserError(f'task {task!r} has no packaged prompts of kind {kind!r}; valid kinds: '
                    f'{", ".join(PROMPT_FILES[task])}')
  name = PROMPT_FILES[task][kind]
  resource = importlib.resources.files('jaxstar.data') / 'prompts' / task / name
  return _split_prompts(resource.read_text(encoding='utf-8'), f'packaged prompts/{task}/{name}')


def _split_prompts(text: str, origin: str) -> list[str]:
  blocks = [b.strip('\n') for b in text.split('\n\n')]
  blocks = [b for b in blocks if b.strip()]
  if not blocks:
    raise UserError(f'{origin}: no prompt exemplars (the file is empty)')
  return blocks


def few_shot_context(exemplars: Sequence[str], query: str) -> str:
  """The generation context: exemplars, then the query, joined by blank lines."""
  return '\n\n'.join([*exemplars, query])


# ------------------------------------------------------------------------------- addition


def spaced_digits(n: int) -> str:
  """123 -> "1 2 3"."""
  return ' '.join(str(n))


def addition_scratchpad(a: int, b: int) -> str:
  """The "<scratch> ... </scratch>" block of spec/star.md §2.3 for a + b (same digit count)."""
  da, db = str(a), str(b)
  if a < 0 or b < 0 or len(da) != len(db):
    raise ValueError(f'addition scratchpad needs two non-negative numbers with the same '
                     f'number of digits, got {a} and {b}')
  lines = ['<scratch>', f'{spaced_digits(a)} + {spaced_digits(b)} , C: 0']
  carry, total = 0, ''
  for i in reversed(range(len(da))):  # Least-significant pair first.
    s = int(da[i]) + int(db[i]) + carry
    total, carry = str(s % 10) + total, s // 10
    rest = f'{" ".join(da[:i])} + {" ".join(db[:i])} ' if i else ''
    lines.append(f'{rest}, {" ".join(total)} C: {carry}')
  lines += [f'{carry} {" ".join(total)}', '</scratch>']
  return '\n'.join(lines)


def addition_query(a: int, b: int, hint: bool = False) -> str:
  """"Input:\\n<a> + <b>\\nTarget:" (digits spaced), the hint-free query; `hint` puts the
  answer line after "Target:" (STaR's rationalization hint, "Target: 5 8")."""
  target = f'Target: {addition_answer(a, b)}' if hint else 'Target:'
  return f'Input:\n{spaced_digits(a)} + {spaced_digits(b)}\n{target}'


def addition_answer(a: int, b: int) -> str:
  """The answer line: the digits of a + b separated by spaces."""
  return spaced_digits(a + b)


def format_addition(a: int, b: int, scratchpad: bool = True, hint: bool = False) -> str:
  """One solved problem block (without the blank line that separates blocks); `hint`: the
  hinted query of `addition_query`."""
  parts = [addition_query(a, b, hint)]
  if scratchpad:
    parts.append(addition_scratchpad(a, b))
  parts.append(addition_answer(a, b))
  return '\n'.join(parts)


def generate_addition(num: int, num_digits: int, seed: int = 0) -> list[Example]:
  """`num` problems of two uniform `num_digits`-digit numbers (no leading zero), seeded."""
  if num_digits < 1:
    raise ValueError(f'num_digits must be >= 1, got {num_digits}')
  rng = np.random.default_rng([seed, num_digits])
  lo = 0 if num_digits == 1 else 10 ** (num_digits - 1)
  out = []
  for a, b in rng.integers(lo, 10 ** num_digits, size=(num, 2)).tolist():
    out.append(Example(question=f'{spaced_digits(a)} + {spaced_digits(b)}',
                       answer=addition_answer(a, b), raw=dict(a=a, b=b)))
  return out


def addition_sample(problems: Sequence[tuple[int, int]], scratchpad: bool = True,
                    hint: bool = False) -> str:
  """Several solved blocks separated by blank lines (in-sample few-shot exemplars + query)."""
  return '\n\n'.join(format_addition(a, b, scratchpad, hint) for a, b in problems)


def extract_arithmetic_answer(text: str, direct: bool = False) -> str | None:
  """The predicted answer line of a generated addition solution (spec/star.md §1.4), or None.

  The line before a "<|endoftext|>" line; else the line after "</scratch>"; else line 0
  (line 1 in direct mode, where the generation starts with the newline after "Target:").
  """
  lines = text.split('\n')
  if END_OF_TEXT in lines:
    i = lines.index(END_OF_TEXT) - 1
  elif '</scratch>' in lines:
    i = lines.index('</scratch>') + 1
  else:
    i = 1 if direct else 0
  return lines[i].strip() if 0 <= i < len(lines) else None


def check_arithmetic(text: str, gold: str, direct: bool = False) -> bool:
  """Exact match of the extracted answer line with the gold line ("5 8")."""
  pred = extract_arithmetic_answer(text, direct=direct)
  return pred is not None and pred == gold.strip()
