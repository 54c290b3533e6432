"""Language-model text pipelines on grain `MapDataset`, sharded by process, resumable.

A pipeline turns documents into per-process batches `dict(tokens=int32[b, L], mask=int32[b, L])`,
plus `segment_ids=int32[b, L]` in pack mode, where `b = global_batch / process_count`. `mask` is
1 on real tokens and 0 on padding; `segment_ids` numbers the documents of each packed row from 1,
so that attention can be kept within a document (a packed row has no padding to mask).

Stages (spec/quietstar.md §1.1):
  1. documents: a synthetic arithmetic corpus (the default, generated in code), jsonl files, or a
     Hugging Face dataset; optionally only the first `max_docs`.
  2. tokenize with BOS prepended and no EOS, then per mode:
     - 'crop_pad': a document longer than L keeps L contiguous tokens from a random offset (drawn
       from (seed, document index), so fixed for the whole run); a shorter one is right-padded
       with the pad id (2, which is EOS).
     - 'pack': documents are joined with EOS after each and cut into L-token rows (the last
       partial row is dropped), with their segment ids. The corpus is tokenized up front, so
       bound it with `max_docs`.
  3. shuffle with `seed` (each epoch differently), repeat `num_epochs` times (0: forever),
     keep whole global batches only, batch, and give process p the p-th block of b rows of
     every global batch: the processes' batches, concatenated in process order, are exactly
     the single-process batch.
  4. `LMPipeline.iterator()` is a grain `DatasetIterator`; its `get_state()` / `set_state()`
     save and restore the position, so a resumed run sees the batches it would have seen.

Config fields read by `lm_dataset_from_config` (an ml_collections.ConfigDict or a dict; missing
fields take the defaults in `DEFAULTS`; other fields are ignored). Input the user can fix (an
unknown source or mode, a missing or empty file, no documents left) raises `UserError` naming
the config field, or FileNotFoundError for a missing file.
  source                'synthetic' | 'jsonl' | 'hf'.
  paths                 jsonl: a list of paths/globs or one comma-separated string;
                        hf: a dataset name on the Hub, or a local folder.
  hf_split              hf split name, e.g. 'train'.
  text_field            field holding the document text (jsonl and hf).
  max_docs              keep only the first N documents (0: all); the official Quiet-STaR run
                        uses the first 1000 OpenWebMath documents.
  skip_docs             drop the first N documents before `max_docs` applies (held-out
                        evaluation on the documents after a training subset).
  seq_len               L, tokens per row.
  mode                  'crop_pad' | 'pack'.
  seed                  shuffle seed; also seeds crop offsets and the synthetic corpus.
  num_epochs            passes over the data (0: repeat forever).
  skip_malformed        jsonl: skip (and count) malformed rows instead of raising.
  synthetic_docs        number of synthetic documents.
  synthetic_format      'sums': lines "12+345=357"; 'scratchpad': STaR's addition blocks
                        (spec/star.md §2.3), `synthetic_blocks` solved problems of one digit
                        count per document, separated by blank lines.
  synthetic_min_digits  synthetic operands have synthetic_min_digits..synthetic_max_digits
  synthetic_max_digits  digits.
  synthetic_blocks      scratchpad format: problems per document.
  synthetic_hint_fraction  scratchpad format: documents whose queries show the answer after
                        "Target:" (the rationalization hint).
"""
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

from jaxstar.data import jsonl
from jaxstar.data import tasks
from jaxstar.errors import UserError

SOURCES = ('synthetic', 'jsonl', 'hf')
MODES = ('crop_pad', 'pack')
DEFAULTS = dict(
    source='synthetic', paths='', hf_split='train', text_field='text', max_docs=0, skip_docs=0,
    seq_len=256, mode='crop_pad', seed=42, num_epochs=0, skip_malformed=False,
    synthetic_docs=1000, synthetic_format='sums', synthetic_min_digits=1, synthetic_max_digits=5,
    synthetic_blocks=3, synthetic_hint_fraction=0.0)
SYNTHETIC_FORMATS = ('sums', 'scratchpad')


# ----------------------------------------------------------------------------------- sources


class LazyDocs(Sequence[str]):
  """A read-only sequence of `n` documents computed on access by `fn(index)`."""

  def __init__(self, n: int, fn: Callable[[int], str]):
    self._n, self._fn = n, fn

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._n))]
    if not -self._n <= i < self._n:
      raise IndexError(f'document {i} out of range [0, {self._n})')
    return self._fn(i % self._n)


def synthetic_arithmetic_doc(index: int, *, seed: int = 42, max_digits: int = 5,
                             problems: tuple[int, int] = (4, 16), min_digits: int = 1) -> str:
  """Document `index` of the synthetic corpus: lines like "12+345=357\\n".

  Deterministic in (seed, index). Each operand has a uniform number of digits in
  [min_digits, max_digits] (no leading zero); a document has `problems[0]..problems[1]` lines.
  """
  _check_digits(min_digits, max_digits)
  rng = np.random.default_rng([seed, index])
  lines = []
  for _ in range(rng.integers(problems[0], problems[1] + 1)):
    a, b = (_random_int(rng, int(rng.integers(min_digits, max_digits + 1))) for _ in range(2))
    lines.append(f'{a}+{b}={a + b}\n')
  return ''.join(lines)


def scratchpad_doc(index: int, *, seed: int = 42, min_digits: int = 1, max_digits: int = 5,
                   blocks: int = 3, hint_fraction: float = 0.0) -> str:
  """Document `index` of the scratchpad corpus: `blocks` solved additions of one digit count
  (uniform in [min_digits, max_digits]), each "Input: ... Target:", its "<scratch>" working and
  the answer (spec/star.md §2.3), separated by blank lines: a STaR arithmetic sample with its
  in-sample exemplars. A `hint_fraction` of the documents shows each answer after "Target:"
  too (STaR's rationalization hint), so a model learns to read it. Deterministic in
  (seed, index). In 'pack' mode each document ends with EOS, as a STaR fine-tuning example
  does."""
  _check_digits(min_digits, max_digits)
  if blocks < 1:
    raise UserError(f'data.synthetic_blocks must be >= 1, got {blocks}')
  rng = np.random.default_rng([seed, index])
  digits = int(rng.integers(min_digits, max_digits + 1))
  pairs = [(_random_int(rng, digits), _random_int(rng, digits)) for _ in range(blocks)]
  return tasks.addition_sample(pairs, hint=bool(rng.random() < hint_fraction))


def _check_digits(min_digits: int, max_digits: int) -> None:
  if not 1 <= min_digits <= max_digits:
    raise UserError(f'data.synthetic_min_digits={min_digits} and synthetic_max_digits='
                    f'{max_digits}: need 1 <= min <= max')


def _random_int(rng: np.random.Generator, digits: int) -> int:
  lo = 0 if digits == 1 else 10 ** (digits - 1)
  return int(rng.integers(lo, 10 ** digits))


def synthetic_docs(num_docs: int, *, seed: int = 42, max_digits: int = 5,
                   fmt: str = 'sums', min_digits: int = 1, blocks: int = 3,
                   hint_fraction: float = 0.0) -> LazyDocs:
  """The synthetic arithmetic corpus: `num_docs` documents made on access (no download), in
  format `fmt` ('sums' or 'scratchpad', see the module docstring)."""
  if num_docs < 1:
    raise UserError(f'data.synthetic_docs must be >= 1, got {num_docs}')
  if fmt == 'sums':
    _check_digits(min_digits, max_digits)
    return LazyDocs(num_docs, lambda i: synthetic_arithmetic_doc(
        i, seed=seed, max_digits=max_digits, min_digits=min_digits))
  if fmt == 'scratchpad':
    kw = dict(seed=seed, min_digits=min_digits, max_digits=max_digits, blocks=blocks,
              hint_fraction=hint_fraction)
    scratchpad_doc(0, **kw)
    return LazyDocs(num_docs, lambda i: scratchpad_doc(i, **kw))
  raise UserError(f'data.synthetic_format={fmt!r}; choose one of {SYNTHETIC_FORMATS}')


def jsonl_docs(paths: str | Sequence[str], *, text_field: str = 'text', max_docs: int = 0,
               skip_malformed: bool = False, config_field: str = '') -> jsonl.Loaded[str]:
  """Texts of field `text_field` of every row of the jsonl `paths` (list, comma string, globs).

  A malformed row raises MalformedRow (a UserError) naming file and line, or is skipped and
  counted in `.num_skipped` when `skip_malformed`. Files without any good row raise UserError
  naming them and `config_field`.
  """
  return jsonl.read_jsonl(paths, lambda row: jsonl.get_field(row, text_field, str),
                          skip_malformed=skip_malformed, max_rows=max_docs,
                          config_field=config_field)


def hf_docs(name_or_path: str, *, split: str = 'train', text_field: str = 'text',
            max_docs: int = 0, skip_docs: int = 0) -> Sequence[str]:
  """Texts of a Hugging Face dataset (Hub name, or a local folder), read lazily by index.

  With `max_docs` and a Hub name, the first `max_docs` rows are streamed instead of
  downloading the whole dataset. Needs the optional `datasets` package (`pip install -e .[hf]`).
  Raises UserError if no document is left.
  """
  try:
    import datasets  # pylint: disable=g-import-not-at-top  # Optional; only this source needs it.
  except ImportError as e:
    raise ImportError("data source 'hf' needs the Hugging Face datasets package: "
                      'pip install -e .[hf] (or pip install datasets)') from e
  name = f'{name_or_path}[{split}]'
  if os.path.isdir(name_or_path) and (
      os.path.exists(os.path.join(name_or_path, 'dataset_dict.json'))
      or os.path.exists(os.path.join(name_or_path, 'state.json'))):
    ds = datasets.load_from_disk(name_or_path)  # A folder written by save_to_disk.
    if isinstance(ds, datasets.DatasetDict):
      ds = ds[split]
  elif max_docs and not os.path.isdir(name_or_path):
    stream = datasets.load_dataset(name_or_path, split=split, streaming=True).skip(skip_docs)
    texts = [_hf_text(row, text_field, name, skip_docs + i)
             for i, row in enumerate(stream.take(max_docs))]
    if not texts:
      raise UserError(f'Hugging Face dataset {name}: no rows after skipping {skip_docs}')
    return texts
  else:
    ds = datasets.load_dataset(name_or_path, split=split)
  n = max(0, len(ds) - skip_docs)
  n = min(n, max_docs) if max_docs else n
  if not n:
    raise UserError(f'Hugging Face dataset {name}: no rows after skipping {skip_docs} of '
                    f'{len(ds)}')
  if text_field not in ds.column_names:
    raise UserError(f'Hugging Face dataset {name}: no field {text_field!r} (data.text_field); '
                    f'fields: {ds.column_names}')
  return LazyDocs(n, lambda i: _hf_text(ds[skip_docs + i], text_field, name, skip_docs + i))


def _hf_text(row: Mapping[str, Any], field: str, name: str, index: int) -> str:
  text = row.get(field)
  if not isinstance(text, str):
    raise jsonl.MalformedRow(f'Hugging Face dataset {name} row {index}: field {field!r} should '
                             f'be str, got {type(text).__name__}')
  return text


# ------------------------------------------------------------------------------- row making


def crop_or_pad(ids: Sequence[int], seq_len: int, pad_id: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One row from one tokenized document: a random L-window if longer, else right-padded."""
  ids = np.asarray(ids, np.int32)
  n = len(ids)
  if n > seq_len:
    start = int(rng.integers(0, n - seq_len + 1))  # Uniform in [0, n - L], as the official code.
    return dict(tokens=ids[start:start + seq_len], mask=np.ones(seq_len, np.int32))
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n] = ids
  return dict(tokens=tokens, mask=(np.arange(seq_len) < n).astype(np.int32))


def pack_rows(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int,
              ) -> tuple[np.ndarray, np.ndarray]:
  """Joins tokenized docs with EOS after each and cuts them into rows.

  Returns (tokens int32[R, L], segment_ids int32[R, L]); segment ids count the documents of
  each row from 1. The last partial row is dropped.
  """
  lengths = np.array([len(d) + 1 for d in docs], np.int64)
  stream = np.full(int(lengths.sum()), eos_id, np.int32)
  ends = np.cumsum(lengths)
  for doc, end, n in zip(docs, ends, lengths):
    stream[end - n:end - 1] = doc
  doc_of_token = np.repeat(np.arange(len(docs), dtype=np.int32), lengths)
  num_rows = len(stream) // seq_len
  if num_rows == 0:
    raise UserError(f'pack mode: the corpus has {len(stream)} tokens, fewer than one row of '
                    f'seq_len={seq_len} (data.seq_len)')
  tokens = stream[:num_rows * seq_len].reshape(num_rows, seq_len)
  segs = doc_of_token[:num_rows * seq_len].reshape(num_rows, seq_len)
  return tokens, segs - segs[:, :1] + 1


# ---------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class LMPipeline:
  """A per-process batched dataset and what a trainer wants to know about it.

  Attributes:
    dataset: grain MapDataset; element i is this process's batch for global step i.
    local_batch_size: rows per process per step (global batch / process count).
    num_docs: documents used (after `max_docs`).
    rows_per_epoch: rows (over all processes) in one pass over the data.
    num_skipped: malformed jsonl rows skipped.
  """

  dataset: grain.MapDataset
  local_batch_size: int
  num_docs: int
  rows_per_epoch: int
  num_skipped: int = 0

  def iterator(self, read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state()` / `set_state(state)`) over the batches."""
    # Each element is a whole batch, so a few prefetched elements are plenty; grain's
    # default (500 elements, 16 threads) would hold hundreds of batches in memory.
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(self.dataset.to_iter_dataset(read_options))


def lm_dataset(docs: Sequence[str], tokenizer, *, seq_len: int, global_batch_size: int,
               mode: str = 'crop_pad', seed: int = 42, num_epochs: int = 0,
               process_index: int = 0, process_count: int = 1,
               num_skipped: int = 0) -> LMPipeline:
  """Builds the batched, process-sharded pipeline over `docs` (see the module docstring).

  Args:
    docs: document texts (any sequence with len and indexing; may be lazy).
    tokenizer: a `jaxstar.tokenizer` tokenizer.
    seq_len: L.
    global_batch_size: rows per step over all processes; divisible by `process_count`.
    mode: 'crop_pad' or 'pack' (which adds `segment_ids`).
    seed: shuffle seed, also the crop offsets' seed.
    num_epochs: passes over the data; 0 repeats forever.
    process_index, process_count: this process and how many share the batch.
    num_skipped: recorded on the result (malformed rows the caller skipped).
  """
  if mode not in MODES:
    raise UserError(f'unknown data mode {mode!r} (data.mode); valid: {", ".join(MODES)}')
  if seq_len < 1 or global_batch_size < 1:
    raise UserError(f'seq_len and global_batch_size must be >= 1, got {seq_len}, '
                    f'{global_batch_size}')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if global_batch_size % process_count:
    raise UserError(f'global batch {global_batch_size} is not divisible by the '
                    f'{process_count} processes')
  if num_epochs < 0:
    raise UserError(f'num_epochs must be >= 0 (0: forever), got {num_epochs}')
  if not len(docs):
    raise UserError('no documents to build the LM pipeline from')

  if mode == 'crop_pad':
    num_docs = len(docs)
    def make_row(index, text):
      ids = tokenizer.encode(text, bos=True, eos=False)
      # Grain passes epoch * len + i after repeat; the crop must not change between epochs.
      rng = np.random.default_rng([seed, index % num_docs])
      return crop_or_pad(ids, seq_len, tokenizer.pad_id, rng)
    ds = grain.MapDataset.source(docs).map_with_index(make_row)
  else:
    tokens, segs = pack_rows(tokenizer.encode_batch(docs, bos=True, eos=False), seq_len,
                             tokenizer.eos_id)
    def make_packed(r):
      return dict(tokens=tokens[r], mask=np.ones(seq_len, np.int32), segment_ids=segs[r])
    ds = grain.MapDataset.range(len(tokens)).map(make_packed)
  rows_per_epoch = len(ds)
  ds = batch_rows(ds, global_batch_size, seed=seed, num_epochs=num_epochs,
                  process_index=process_index, process_count=process_count)
  local = global_batch_size // process_count
  return LMPipeline(ds, local, len(docs), rows_per_epoch, num_skipped)


def batch_rows(ds: grain.MapDataset, global_batch_size: int, *, seed: int, num_epochs: int,
               process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Rows -> this process's batches: shuffled (differently each epoch), repeated `num_epochs`
  times (0: forever), whole global batches only, process p taking the p-th block of
  `global_batch_size / process_count` rows of every global batch."""
  # Shuffle before repeat so epochs do not mix; repeat reseeds the shuffle every epoch.
  ds = ds.shuffle(seed=seed).repeat(num_epochs or None)
  if num_epochs:
    steps = len(ds) // global_batch_size
    if steps == 0:
      raise UserError(f'{len(ds)} rows in {num_epochs} epochs (data.num_epochs) make no '
                      f'global batch of {global_batch_size}')
    ds = ds[:steps * global_batch_size]  # Every process must see the same number of steps.
  local = global_batch_size // process_count
  # Local batch k holds rows [k*b, (k+1)*b); global step s is local batches s*P .. s*P+P-1.
  return ds.batch(local, drop_remainder=True)[process_index::process_count]


def _window(docs: Sequence[str], skip: int, limit: int) -> Sequence[str]:
  """Documents skip .. skip + limit - 1 (limit 0: to the end), without materializing them."""
  n = max(0, len(docs) - skip)
  n = min(n, limit) if limit else n
  return docs if (skip, n) == (0, len(docs)) else LazyDocs(n, lambda i: docs[skip + i])


def _cfg_get(cfg, name: str):
  value = cfg.get(name, DEFAULTS[name])
  return DEFAULTS[name] if value is None else value


def lm_dataset_from_config(data_cfg, tokenizer, global_batch_size: int, process_index: int = 0,
                           process_count: int = 1) -> LMPipeline:
  """Builds the LM pipeline a config describes (fields: module docstring)."""
  get = lambda name: _cfg_get(data_cfg, name)
  source, max_docs, skip_docs = get('source'), int(get('max_docs')), int(get('skip_docs'))
  skipped = 0
  if source == 'synthetic':
    n = int(get('synthetic_docs'))
    docs = _window(synthetic_docs(n, seed=int(get('seed')),
                                  max_digits=int(get('synthetic_max_digits')),
                                  fmt=get('synthetic_format'),
                                  min_digits=int(get('synthetic_min_digits')),
                                  blocks=int(get('synthetic_blocks')),
                                  hint_fraction=float(get('synthetic_hint_fraction'))),
                   skip_docs, max_docs)
    origin = f'the {n} synthetic documents (data.synthetic_docs)'
  elif source == 'jsonl':
    if not get('paths'):
      raise UserError("data source 'jsonl' needs data.paths")
    loaded = jsonl_docs(get('paths'), text_field=get('text_field'),
                        max_docs=max_docs + skip_docs if max_docs else 0,
                        skip_malformed=bool(get('skip_malformed')), config_field='data.paths')
    docs, skipped = _window(loaded.rows, skip_docs, 0), loaded.num_skipped
    origin = f'the {len(loaded)} documents of {get("paths")} (data.paths)'
  elif source == 'hf':
    paths = get('paths')
    paths = [paths] if isinstance(paths, str) else list(paths)
    if len(paths) != 1 or not paths[0]:
      raise UserError("data source 'hf' needs data.paths = one dataset name or folder, got "
                      f'{get("paths")!r}')
    name = paths[0]
    docs = hf_docs(name, split=get('hf_split'), text_field=get('text_field'),
                   max_docs=max_docs, skip_docs=skip_docs)
    origin = f'Hugging Face dataset {name}[{get("hf_split")}] (data.paths, data.hf_split)'
  else:
    raise UserError(f'unknown data source {source!r} (data.source); valid: '
                    f'{", ".join(SOURCES)}')
  if not len(docs):  # Each source reports its own empty input; here skip_docs took them all.
    raise UserError(f'data.skip_docs={skip_docs} leaves no document of {origin}')
  return lm_dataset(docs, tokenizer, seq_len=int(get('seq_len')),
                    global_batch_size=global_batch_size, mode=get('mode'),
                    seed=int(get('seed')), num_epochs=int(get('num_epochs')),
                    process_index=process_index, process_count=process_count,
                    num_skipped=skipped)


def make_global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays (batch axis = process-major rows).

  `sharding` is one `jax.sharding.Sharding` for every leaf, or a matching dict of them.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding[k], np.asarray(v))
          for k, v in local_batch.items()}
