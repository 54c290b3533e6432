"""The Quiet-STaR paper's zero-shot GSM8K / CommonsenseQA metric (spec/quietstar.md §5.1).

Not exact match: for each example, the probability the model gives the gold answer tokens after
the last "\\nA:" marker, each renormalized over the task's valid answer ids (digits + newline,
or the five letters + newline), multiplied over the answer. The dataset score is the mean.

The steps, host-side: `paper_prompt` builds the prompt text (gold answer included);
`answer_targets` finds, in its token ids, which logits positions score which tokens; the model
gives the logits at those positions; `answer_probability` scores one example, `paper_metric`
averages. `valid_answer_ids` derives the valid id set from the tokenizer (with the Mistral
tokenizer it equals the ids hard-coded in the official eval_helpers.py).

Convention: the logits at position p predict token p + 1, so target token t is scored from the
logits at position t - 1.
"""
from typing import Sequence

import numpy as np

from jaxstar.data.tasks import Example
from jaxstar.errors import UserError

MARKER = '\nA:'
TASKS = ('gsm8k', 'commonsenseqa')
_DIGITS = '1234567890'  # The order of the official hard-coded id list.
_LETTERS = 'ABCDE'


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise UserError(f'unknown paper-metric task {task!r}; valid: {", ".join(TASKS)}')


def paper_prompt(task: str, example: Example) -> str:
  """The metric's prompt for a labelled example, gold answer and trailing newline included.

  gsm8k: "Q: <question>\\nA:" + the solution's text after its last "####" (leading space
  kept) + "\\n", e.g. "...\\nA: 72\\n". commonsenseqa: "Q: <stem>\\n(A) <text>\\n...(E) <text>"
  + "\\nA: <answerKey>\\n". Raises ValueError for an example without a gold answer.
  """
  _check_task(task)
  if task == 'gsm8k':
    if '####' not in example.solution:
      raise ValueError(f"GSM8K example has no '####' answer line: {example.question[:60]!r}")
    return 'Q: ' + example.question + MARKER + example.solution.split('####')[-1] + '\n'
  if not example.answer:
    raise ValueError(f'CommonsenseQA example has no answerKey (unlabelled split?): '
                     f'{example.question[:60]!r}')
  choices = '\n'.join(f'({label}) {text}' for label, text in example.choices)
  return 'Q: ' + example.question + '\n' + choices + MARKER + ' ' + example.answer + '\n'


def _appended_ids(tokenizer, context: str, text: str) -> list[int]:
  """The ids that `text` adds when appended to `context` (so in-context pieces, e.g. '▁A')."""
  base, ids = tokenizer.encode(context), tokenizer.encode(context + text)
  if ids[:len(base)] != base or len(ids) == len(base):
    raise ValueError(f'cannot isolate the tokens of {text!r} after {context!r}: the tokenizer '
                     'merges them with the context')
  return ids[len(base):]


def _single_id(tokenizer, context: str, text: str) -> int:
  """The one id ending `text` after `context`; any earlier added ids must be whitespace."""
  added = _appended_ids(tokenizer, context, text)
  if tokenizer.decode(added[-1:]).strip() != text.strip() or (
      len(added) > 1 and tokenizer.decode(added[:-1]).strip()):
    raise ValueError(f'{text!r} after {context!r} is not one token (got ids {added})')
  return added[-1]


def valid_answer_ids(tokenizer, task: str) -> np.ndarray:
  """The ids an answer token is renormalized over, int32, derived from `tokenizer`.

  gsm8k: the digits '1'..'9', '0' as they appear inside a number, then newline.
  commonsenseqa: the letters A..E as they follow "A:" (the SentencePiece piece '▁A'; the byte
  tokenizer's letter byte, its space being a separate, non-valid token), then newline.
  With the Mistral tokenizer these are exactly the official ids (spec §5.1).
  """
  _check_task(task)
  if task == 'gsm8k':
    # After a digit, so SentencePiece gives the bare digit piece, not '▁' + digit.
    ids = [_single_id(tokenizer, 'Q: x\nA: 1', d) for d in _DIGITS]
    ids.append(_single_id(tokenizer, 'Q: x\nA: 1', '\n'))
  else:
    ids = [_single_id(tokenizer, 'Q: x\nA:', ' ' + c) for c in _LETTERS]
    ids.append(_single_id(tokenizer, 'Q: x\nA: A', '\n'))
  if len(set(ids)) != len(ids):
    raise ValueError(f'valid answer ids for {task} are not distinct: {ids}')
  return np.asarray(ids, np.int32)


def _marker_end(tokenizer, ids: list[int]) -> int:
  """Index of the last token of the last "\\nA:" in `ids`.

  As the official code: decode ever shorter prefixes until the marker count drops, which works
  for any tokenizer whatever the marker's split into tokens.
  """
  text = tokenizer.decode(ids)
  n = text.count(MARKER)
  if not n:
    raise ValueError(f'no "\\nA:" answer marker in the prompt (it ends {text[-80:]!r}); '
                     'answer_targets expects a tokenized paper_prompt')
  for k in range(len(ids) - 1, 0, -1):
    if tokenizer.decode(ids[:k]).count(MARKER) < n:
      return k  # ids[:k + 1] has all n markers, so token k completes the last one.
  return 0


def answer_targets(tokenizer, ids: Sequence[int] | np.ndarray,
                   task: str) -> tuple[np.ndarray, np.ndarray]:
  """Which logits positions score which answer tokens in one tokenized paper prompt.

  Args:
    tokenizer: a jaxstar tokenizer.
    ids: the 1-D token ids of `paper_prompt(...)`, BOS first; right padding (the pad id) is
      allowed and ends the answer, as in the official code.
    task: 'gsm8k' or 'commonsenseqa'.

  Returns:
    (positions [C], targets [C]), int32: the logits at `positions[c]` predict token
    `targets[c] = ids[positions[c] + 1]`. The tokens are those after the last "\\nA:" marker
    that are in `valid_answer_ids`; others are skipped (the space before the answer, commas,
    minus signs). The official code also skips one token after ':' for a numeric answer: that
    token is the '▁' before the digits (a ' ' with the byte tokenizer), never a valid id, so the
    skip rule covers it. Deviation: the official picks the valid set by whether the answer's
    first character is a digit; here the task picks it, which differs only for a GSM8K answer
    such as "-3" (the official would score it over letters).

  Raises:
    ValueError: no marker, or no valid answer token after it.
  """
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f'expected the 1-D ids of one prompt, got shape {arr.shape}')
  valid = set(valid_answer_ids(tokenizer, task).tolist())
  pads = np.flatnonzero(arr == tokenizer.pad_id)
  ids = arr[:pads[0] if pads.size else len(arr)].tolist()
  i = _marker_end(tokenizer, ids)
  found = [(t - 1, ids[t]) for t in range(i + 1, len(ids)) if ids[t] in valid]
  if not found:
    raise ValueError(f'no valid {task} answer token after the last "\\nA:" marker in '
                     f'{tokenizer.decode(ids)[-80:]!r}')
  positions, targets = zip(*found)
  return np.asarray(positions, np.int32), np.asarray(targets, np.int32)


def answer_probability(logits_cv, targets, valid_ids) -> float:
  """One example's score: the product over c of P(targets[c] | valid ids) under logits[c].

  Args:
    logits_cv: [C, V] logits at the `answer_targets` positions (numpy or jax, any float dtype).
    targets: [C] target ids, each in `valid_ids`.
    valid_ids: the task's `valid_answer_ids`.

  The official softmax over the full vocabulary, restricted to the valid ids and renormalized,
  equals a softmax over the valid ids' logits alone (the full normalizer cancels); we compute
  that in float64 log space, so tiny probabilities neither underflow nor lose precision.
  An empty answer (C = 0) scores 1, the empty product.
  """
  logits = np.asarray(logits_cv).astype(np.float64)
  targets = np.asarray(targets).astype(np.int64)
  valid = np.asarray(valid_ids).astype(np.int64)
  if logits.ndim != 2 or targets.shape != logits.shape[:1] or valid.ndim != 1:
    raise ValueError(f'expected logits [C, V], targets [C] and 1-D valid ids; got '
                     f'{logits.shape}, {targets.shape}, {valid.shape}')
  where = (targets[:, None] == valid[None, :])
  if not where.any(axis=1).all():
    raise ValueError(f'target ids {targets.tolist()} are not all in the valid set '
                     f'{valid.tolist()}')
  z = logits[:, valid]  # [C, valid]
  top = z.max(axis=1, keepdims=True)
  if not np.isfinite(top).all():
    raise ValueError('the valid answer ids have no finite logit at some answer position')
  log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
  log_p = logits[np.arange(len(targets)), targets] - log_norm
  return float(np.exp(log_p.sum()))


def paper_metric(scores: Sequence[float] | np.ndarray) -> float:
  """The dataset score: the mean of the per-example `answer_probability` values."""
  scores = np.asarray(scores, np.float64)
  if scores.size == 0:
    raise ValueError('paper_metric needs at least one example score')
  return float(scores.mean())
