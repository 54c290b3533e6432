"""Tests for jaxstar/tokenizer.py: Mistral ids the spec relies on, round trips, bad input."""
import numpy as np
import pytest

from jaxstar import tokenizer as tok_lib


@pytest.fixture(scope='module')
def mistral():
  return tok_lib.get_tokenizer('mistral')


@pytest.fixture(scope='module')
def byte_tok():
  return tok_lib.get_tokenizer('bytes')


def test_mistral_special_ids(mistral):
  assert (mistral.unk_id, mistral.bos_id, mistral.eos_id, mistral.pad_id) == (0, 1, 2, 2)
  assert (mistral.start_thought_id, mistral.end_thought_id) == (32000, 32001)
  assert mistral.vocab_size == 32002


def test_mistral_ids_from_spec(mistral):
  assert mistral.encode('---') == [11940]
  assert mistral.thought_init_ids == [11940]
  assert mistral.id_to_piece(11940) == '\u2581---'
  assert mistral.encode('\nA:')[-3:] == [13, 28741, 28747]
  assert mistral.encode('hi', bos=True)[0] == 1
  assert mistral.encode('hi', eos=True)[-1] == 2
  assert mistral.encode_batch(['hi', '---'], bos=True) == [
      mistral.encode('hi', bos=True), [1, 11940]]


@pytest.mark.parametrize('text', [
    'hello world', '12 + 345 = 357', 'Q: What is 7*8?\nA: 56\n\n', '  leading spaces', ''])
def test_mistral_round_trip(mistral, text):
  assert mistral.decode(mistral.encode(text, bos=True, eos=True)) == text


def test_mistral_thought_tokens_decode(mistral):
  assert mistral.decode([32000]) == '<|startthought|>'
  assert mistral.id_to_piece(32001) == '<|endthought|>'
  ids = (mistral.encode('The cat') + [32000] + mistral.encode('because') + [32001]
         + mistral.encode('sat'))
  # '▁because' keeps its space after a thought token (SentencePiece strips it only at the
  # start of the text).
  assert mistral.decode(ids) == 'The cat<|startthought|> because<|endthought|> sat'
  # Pad (= EOS) is dropped, and numpy arrays are accepted.
  assert mistral.decode(np.array(mistral.encode('hi') + [2, 2])) == 'hi'


def test_byte_layout(byte_tok):
  assert (byte_tok.unk_id, byte_tok.bos_id, byte_tok.eos_id, byte_tok.pad_id) == (0, 1, 2, 2)
  assert (byte_tok.start_thought_id, byte_tok.end_thought_id) == (259, 260)
  assert byte_tok.vocab_size == 261
  assert byte_tok.encode('A', bos=True, eos=True) == [1, ord('A') + 3, 2]
  assert byte_tok.encode('\xff') == [0xC3 + 3, 0xBF + 3]  # UTF-8 bytes, not code points.
  assert byte_tok.thought_init_ids == [ord('-') + 3] * 3
  assert byte_tok.id_to_piece(3) == '<0x00>'
  assert byte_tok.id_to_piece(ord('A') + 3) == 'A'


@pytest.mark.parametrize('text', ['plain ascii', 'é→ naïve 😀', 'tab\tand\nnewline', ''])
def test_byte_round_trip(byte_tok, text):
  assert byte_tok.decode(byte_tok.encode(text, bos=True, eos=True)) == text


def test_byte_thought_tokens_decode(byte_tok):
  ids = byte_tok.encode('a') + [259] + byte_tok.encode('é') + [260]
  assert byte_tok.decode(ids) == 'a<|startthought|>é<|endthought|>'


@pytest.mark.parametrize('name', ['mistral', 'bytes'])
@pytest.mark.parametrize('bad_id', [-1, 'vocab_size'])
def test_decode_bad_id_raises(name, bad_id, request):
  tok = request.getfixturevalue({'mistral': 'mistral', 'bytes': 'byte_tok'}[name])
  bad_id = tok.vocab_size if bad_id == 'vocab_size' else bad_id
  with pytest.raises(ValueError, match=f'token id {bad_id} '):
    tok.decode([5, bad_id])
  with pytest.raises(ValueError, match='1-D'):
    tok.decode([[5, 6]])


def test_get_tokenizer_bad_name():
  with pytest.raises(ValueError, match="'gpt2'.*mistral.*bytes"):
    tok_lib.get_tokenizer('gpt2')


def test_get_tokenizer_model_path(tmp_path):
  # The packaged file is named *.model.v1; a symlink gives it the suffix get_tokenizer expects.
  link = tmp_path / 'mistral.model'
  link.symlink_to(tok_lib.mistral_model_path())
  tok = tok_lib.get_tokenizer(str(link))
  assert isinstance(tok, tok_lib.SentencePieceTokenizer) and tok.vocab_size == 32002
  with pytest.raises(FileNotFoundError, match='missing.model'):
    tok_lib.get_tokenizer(str(tmp_path / 'missing.model'))
