"""Tokenizers: SentencePiece (Mistral-7B v0.1 by default) and a tiny byte tokenizer.

Both add the two Quiet-STaR thought tokens right after their base vocabulary and share one
interface: `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `unk_id`, `start_thought_id`,
`end_thought_id`, `encode`, `encode_batch`, `decode`, `id_to_piece` and `thought_init_ids`.

Conventions follow the official Quiet-STaR code (spec/quietstar.md): BOS 1, EOS 2, UNK 0, and
padding uses EOS (id 2). With the Mistral model the thought tokens are 32000 and 32001 and
`encode("---")` is `[11940]`, the piece whose embedding initializes the thought vectors.

`encode` never turns the literal strings "<|startthought|>" / "<|endthought|>" into thought ids:
thoughts are inserted by the model, so text from a dataset cannot inject them.
"""
import importlib.resources
import os
from typing import Iterable, Sequence

import numpy as np

START_THOUGHT = '<|startthought|>'
END_THOUGHT = '<|endthought|>'
# The three ids every tokenizer here shares; pad is EOS as in the official code.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MISTRAL_MODEL = 'tokenizer.model.v1'  # Mistral-7B v0.1, shipped by the mistral-common package.


class _Tokenizer:
  """Shared bookkeeping: special ids, id validation and the decode loop."""

  unk_id, bos_id, eos_id, pad_id = UNK_ID, BOS_ID, EOS_ID, EOS_ID
  vocab_size: int
  start_thought_id: int
  end_thought_id: int

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
    """Returns the ids of `text`, optionally with BOS prepended and EOS appended."""
    return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

  def encode_batch(self, texts: Iterable[str], bos: bool = False,
                   eos: bool = False) -> list[list[int]]:
    """Encodes each text of `texts` (no padding: that is the data pipeline's job)."""
    return [self.encode(t, bos=bos, eos=eos) for t in texts]

  @property
  def thought_init_ids(self) -> list[int]:
    """Ids of "---", whose embedding (scaled) initializes the start/end thought vectors."""
    return self.encode('---')

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Returns the text of a 1-D id sequence.

    BOS, EOS and pad are dropped; thought ids are rendered as "<|startthought|>" and
    "<|endthought|>". Raises ValueError for an id outside [0, vocab_size).
    """
    ids = self._check_ids(ids)
    special = {self.start_thought_id: START_THOUGHT, self.end_thought_id: END_THOUGHT}
    out, run = [], []
    for i in ids:
      if i in (self.bos_id, self.eos_id, self.pad_id):
        continue
      if i in special:
        out.append(self._decode_run(run, first=not out))
        out.append(special[i])
        run = []
      else:
        run.append(i)
    out.append(self._decode_run(run, first=not out))
    return ''.join(out)

  def id_to_piece(self, i: int) -> str:
    """Returns the vocabulary entry of id `i` (for debugging)."""
    (i,) = self._check_ids([i])
    if i == self.start_thought_id:
      return START_THOUGHT
    if i == self.end_thought_id:
      return END_THOUGHT
    return self._piece(i)

  def _check_ids(self, ids) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise ValueError(f'expected a 1-D sequence of integer ids, got shape {arr.shape} '
                       f'dtype {arr.dtype}')
    bad = arr[(arr < 0) | (arr >= self.vocab_size)]
    if bad.size:
      raise ValueError(f'token id {int(bad[0])} is out of range [0, {self.vocab_size})')
    return arr.tolist()

  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode_run(self, ids: list[int], first: bool) -> str:
    raise NotImplementedError

  def _piece(self, i: int) -> str:
    raise NotImplementedError


def mistral_model_path() -> str:
  """Path of the Mistral-7B v0.1 SentencePiece model inside the mistral-common package."""
  try:
    path = importlib.resources.files('mistral_common') / 'data' / MISTRAL_MODEL
  except ModuleNotFoundError as e:
    raise FileNotFoundError('the default tokenizer needs the mistral-common package '
                            '(pip install mistral-common), or pass a .model path') from e
  if not path.is_file():
    raise FileNotFoundError(f'{MISTRAL_MODEL} not found in mistral-common at {path}; '
                            'pass a SentencePiece .model path instead')
  return str(path)


class SentencePieceTokenizer(_Tokenizer):
  """SentencePiece model plus the two thought ids (sp vocab size and sp vocab size + 1)."""

  def __init__(self, model_path: str | None = None):
    import sentencepiece  # Imported here so the byte tokenizer works without it.
    self.model_path = model_path or mistral_model_path()
    if not os.path.isfile(self.model_path):
      raise FileNotFoundError(f'SentencePiece model not found: {self.model_path}')
    self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
    # The shared BOS/EOS/UNK convention is only right if the model agrees with it.
    got = (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
    if got != (UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(f'{self.model_path}: expected unk/bos/eos ids (0, 1, 2), got {got}')
    n = self.sp.vocab_size()
    self.start_thought_id, self.end_thought_id, self.vocab_size = n, n + 1, n + 2
    # SentencePiece strips the leading space of the first piece it decodes (the dummy
    # prefix). A run that follows a thought token is not the start of the text, so we
    # decode it behind this sentinel and cut the sentinel off, keeping its leading space.
    self._sentinel = self.sp.encode('a')
    self._sentinel_text = self.sp.decode(self._sentinel)

  def _encode(self, text):
    return self.sp.encode(text)

  def encode_batch(self, texts, bos=False, eos=False):
    """Encodes each text of `texts` (SentencePiece's batch call, no padding)."""
    return [[self.bos_id] * bos + ids + [self.eos_id] * eos
            for ids in self.sp.encode(list(texts))]

  def _decode_run(self, ids, first):
    if first or not ids:
      return self.sp.decode(ids)
    return self.sp.decode(self._sentinel + ids)[len(self._sentinel_text):]

  def _piece(self, i):
    return self.sp.id_to_piece(i)


class ByteTokenizer(_Tokenizer):
  """UTF-8 bytes 0..255 as ids 3..258, thought ids 259/260; for tiny configs and tests."""

  OFFSET = 3  # Ids 0, 1, 2 are unk, BOS, EOS as in the Mistral model.

  def __init__(self):
    self.start_thought_id = self.OFFSET + 256
    self.end_thought_id = self.OFFSET + 257
    self.vocab_size = self.OFFSET + 258

  def _encode(self, text):
    return [b + self.OFFSET for b in text.encode('utf-8')]

  def _decode_run(self, ids, first):
    # UNK never comes out of `encode`; show it as U+FFFD rather than fail on sampled ids.
    data = b''.join('\ufffd'.encode() if i == self.unk_id else bytes([i - self.OFFSET])
                    for i in ids)
    return data.decode('utf-8', errors='replace')

  def _piece(self, i):
    names = {self.unk_id: '<unk>', self.bos_id: '<s>', self.eos_id: '</s>'}
    if i in names:
      return names[i]
    b = i - self.OFFSET
    return chr(b) if 0x21 <= b < 0x7f else f'<0x{b:02X}>'


TOKENIZERS = ('mistral', 'bytes', '<path>.model')


def get_tokenizer(name: str) -> _Tokenizer:
  """Returns the tokenizer a config names: 'mistral', 'bytes', or a SentencePiece .model path."""
  if name == 'mistral':
    return SentencePieceTokenizer()
  if name == 'bytes':
    return ByteTokenizer()
  if isinstance(name, str) and name.endswith('.model'):
    return SentencePieceTokenizer(name)
  raise ValueError(f'unknown tokenizer {name!r}; valid choices: {", ".join(TOKENIZERS)}')
