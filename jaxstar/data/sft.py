"""Prompt/completion examples for fine-tuning (STaR's per-iteration sets), tokenized with a loss
mask: rows of {tokens, mask (real tokens), targets (the tokens the loss scores)}.

An example is BOS + the tokens of `prompt + completion` + EOS. The completion's tokens are those
of the joined text after the prompt's (the convention of `jaxstar.evals.lm.loglikelihood`), so
the boundary never splits a token differently from how the model reads the text. `targets` marks
the completion and EOS (`loss_on='completion'`, the default of spec/star.md §1.10 #1) or every
token after BOS (`'all'`, what the shipped STaR code trains on). An example longer than
`seq_len` keeps its end (the completion) and loses the start of its prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxstar.data import jsonl
from jaxstar.errors import UserError

LOSS_ON = ('completion', 'all')


@dataclasses.dataclass(frozen=True)
class Example:
  """One fine-tuning example: the model reads `prompt + completion`."""
  prompt: str
  completion: str


def _parse(row: Any) -> Example:
  completion = jsonl.get_field(row, 'completion', str)
  if not completion:
    raise jsonl.MalformedRow("field 'completion' is empty")
  return Example(prompt=jsonl.get_field(row, 'prompt', str), completion=completion)


def read_examples(path: str | Sequence[str], config_field: str = '') -> list[Example]:
  """The examples of jsonl file(s) with 'prompt' and 'completion' fields (errors name the file
  and line; a file without a good row is an error)."""
  return jsonl.read_jsonl(path, _parse, config_field=config_field).rows


def encode(tokenizer, example: Example, seq_len: int, loss_on: str = 'completion'
           ) -> dict[str, np.ndarray]:
  """{tokens int32 [seq_len], mask int32 [seq_len], targets int32 [seq_len]} of one example,
  right-padded with the pad id."""
  if loss_on not in LOSS_ON:
    raise UserError(f'loss_on={loss_on!r}; choose one of {LOSS_ON}')
  ids = tokenizer.encode(example.prompt + example.completion, bos=True, eos=True)
  start = len(tokenizer.encode(example.prompt, bos=True))
  start = min(start, len(ids) - 1)          # EOS is always a target
  target = np.zeros(len(ids), np.int32)
  target[start if loss_on == 'completion' else 1:] = 1
  if len(ids) > seq_len:
    cut = len(ids) - seq_len
    if loss_on == 'completion' and cut > start:
      raise UserError(f'a completion of {len(ids) - start} tokens does not fit in seq_len='
                      f'{seq_len}')
    ids, target = ids[cut:], target[cut:]
  out = {'tokens': np.full(seq_len, tokenizer.pad_id, np.int32),
         'mask': np.zeros(seq_len, np.int32), 'targets': np.zeros(seq_len, np.int32)}
  out['tokens'][:len(ids)] = ids
  out['mask'][:len(ids)] = 1
  out['targets'][:len(ids)] = target
  return out


def encode_all(tokenizer, examples: Sequence[Example], seq_len: int,
               loss_on: str = 'completion') -> dict[str, np.ndarray]:
  """`encode` of every example, stacked: {name: [N, seq_len]}."""
  rows = [encode(tokenizer, ex, seq_len, loss_on) for ex in examples]
  return {k: np.stack([r[k] for r in rows]) for k in ('tokens', 'mask', 'targets')}
