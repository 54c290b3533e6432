"""Prompt/completion examples for fine-tuning (STaR's per-iteration sets), tokenized with a loss
mask: rows of {tokens, mask (real tokens), targets (the tokens the loss scores)}.

An example is BOS + the tokens of `prompt + completion` + EOS. The completion's tokens are those
of the joined text after the prompt's (the convention of `jaxstar.evals.lm.loglikelihood`), so
the boundary never splits a token differently from how the model reads the text. `targets` marks
the completion and EOS (`loss_on='completion'`, the default of spec/star.md §1.10 #1) or every
token after BOS (`'all'`, what the shipped STaR code trains on). An example longer than
`seq_len` keeps its end (the completion) and loses the start of its prompt.

`sft_dataset` packs the encoded examples into rows of `seq_len` (whole examples only, in a
seeded order, numbered by `segment_ids` so attention stays within each), and batches them
like the LM pipelines (`jaxstar.data.lm.batch_rows`): shuffled each epoch, repeated, sharded
by process, resumable through its grain iterator.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from jaxstar.data import jsonl
from jaxstar.data import lm
from jaxstar.errors import UserError

LOSS_ON = ('completion', 'all')
BATCH_KEYS = ('tokens', 'mask', 'targets', 'segment_ids')  # of every packed batch, int32


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


def _trim(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  n = int(row['mask'].sum())
  return {k: v[:n] for k, v in row.items()}


def pack_examples(tokenizer, examples: Sequence[Example], seq_len: int,
                  loss_on: str = 'completion', seed: int = 0) -> dict[str, np.ndarray]:
  """The examples, shuffled with `seed`, packed greedily into rows of `seq_len`: an example
  that does not fit in the current row starts the next one. Returns {tokens, mask, targets,
  segment_ids} [R, seq_len]; segment ids number each row's examples from 1 (0 on padding)."""
  if not examples:
    raise UserError('no fine-tuning examples to pack')
  order = np.random.default_rng(seed).permutation(len(examples))
  rows, current, used = [], [], 0
  for i in order:
    ex = _trim(encode(tokenizer, examples[int(i)], seq_len, loss_on))
    n = len(ex['tokens'])
    if used + n > seq_len:
      rows.append(current)
      current, used = [], 0
    current.append(ex)
    used += n
  rows.append(current)
  out = {'tokens': np.full((len(rows), seq_len), tokenizer.pad_id, np.int32),
         **{k: np.zeros((len(rows), seq_len), np.int32)
            for k in ('mask', 'targets', 'segment_ids')}}
  for r, row in enumerate(rows):
    at = 0
    for s, ex in enumerate(row):
      n = len(ex['tokens'])
      for k in ('tokens', 'mask', 'targets'):
        out[k][r, at:at + n] = ex[k]
      out['segment_ids'][r, at:at + n] = s + 1
      at += n
  return out


def sft_dataset(tokenizer, examples: Sequence[Example], *, seq_len: int, global_batch_size: int,
                loss_on: str = 'completion', seed: int = 0, process_index: int = 0,
                process_count: int = 1) -> lm.LMPipeline:
  """This process's batches of packed examples, repeated forever (see the module docstring);
  `.iterator()` is resumable, `.rows_per_epoch` counts the packed rows."""
  if global_batch_size % process_count:
    raise UserError(f'global batch {global_batch_size} is not divisible by the '
                    f'{process_count} processes')
  packed = pack_examples(tokenizer, examples, seq_len, loss_on, seed)
  num_rows = len(packed['tokens'])
  ds = grain.MapDataset.range(num_rows).map(lambda r: {k: v[r] for k, v in packed.items()})
  ds = lm.batch_rows(ds, global_batch_size, seed=seed, num_epochs=0,
                     process_index=process_index, process_count=process_count)
  return lm.LMPipeline(ds, global_batch_size // process_count, len(examples), num_rows)
