"""Tests for jaxstar.evals.paper_metric: the Quiet-STaR paper metric (spec/quietstar.md §5.1)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar.data.tasks import Example
from jaxstar.errors import UserError
from jaxstar.evals import paper_metric as pm
from jaxstar.tokenizer import get_tokenizer

# spec/quietstar.md §5.1, "Valid id sets [V]".
SPEC_NUMBER_IDS = [28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774, 28734, 13]
SPEC_LETTER_IDS = [330, 365, 334, 384, 413, 13]

GSM = Example(question='Natalia sold 48 clips in April and half as many in May. How many?',
              answer='72', solution='48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72\n#### 72')
CSQA = Example(question='Where do you keep a ball?', answer='B',
               choices=(('A', 'sky'), ('B', 'toy box'), ('C', 'oven'), ('D', 'sea'),
                        ('E', 'moon')))


@pytest.fixture(scope='module')
def mistral():
  return get_tokenizer('mistral')


@pytest.fixture(scope='module')
def tok_bytes():
  return get_tokenizer('bytes')


def official_positions(ids, valid, numeric):
  """A transcription of the official compute_metrics loop (eval_helpers.py), for comparison.

  `i` is the ':' of the last marker; logits row j scores question[j + 1]; a numeric answer
  starts one token later; tokens outside the valid set are skipped.
  """
  i = max(k for k in range(len(ids) - 2) if ids[k:k + 3] == [13, 28741, 28747]) + 2
  out = []
  for j in range(i + int(numeric), len(ids) - 1):
    if ids[j + 1] == 2:
      break
    if ids[j + 1] in valid:
      out.append((j, ids[j + 1]))
  return out


def test_prompts_match_the_spec():
  assert pm.paper_prompt('gsm8k', GSM) == f'Q: {GSM.question}\nA: 72\n'
  assert pm.paper_prompt('commonsenseqa', CSQA) == (
      'Q: Where do you keep a ball?\n(A) sky\n(B) toy box\n(C) oven\n(D) sea\n(E) moon\n'
      'A: B\n')
  with pytest.raises(UserError, match='gsm8k, commonsenseqa'):
    pm.paper_prompt('csqa', CSQA)
  with pytest.raises(ValueError, match='answerKey'):
    pm.paper_prompt('commonsenseqa', Example(question='q', answer='', choices=CSQA.choices))


def test_valid_ids_with_mistral_equal_the_official_lists(mistral):
  np.testing.assert_array_equal(pm.valid_answer_ids(mistral, 'gsm8k'), SPEC_NUMBER_IDS)
  np.testing.assert_array_equal(pm.valid_answer_ids(mistral, 'commonsenseqa'), SPEC_LETTER_IDS)
  assert pm.valid_answer_ids(mistral, 'gsm8k').dtype == np.int32


def test_valid_ids_with_the_byte_tokenizer(tok_bytes):
  byte = lambda s: [b + 3 for b in s.encode()]
  np.testing.assert_array_equal(pm.valid_answer_ids(tok_bytes, 'gsm8k'), byte('1234567890\n'))
  np.testing.assert_array_equal(pm.valid_answer_ids(tok_bytes, 'commonsenseqa'), byte('ABCDE\n'))


def test_gsm8k_targets_with_mistral(mistral):
  ids = mistral.encode(pm.paper_prompt('gsm8k', GSM), bos=True)
  # ... '<0x0A>' 'A' ':' '▁' '7' '2' '<0x0A>': ':' is at n - 5, then the '▁' 28705 is skipped.
  n = len(ids)
  assert ids[-7:] == [13, 28741, 28747, 28705, 28787, 28750, 13]
  positions, targets = pm.answer_targets(mistral, ids, 'gsm8k')
  assert [mistral.id_to_piece(t) for t in targets] == ['7', '2', '<0x0A>']
  np.testing.assert_array_equal(positions, [n - 4, n - 3, n - 2])  # Logits at t - 1 score t.
  np.testing.assert_array_equal(np.asarray(ids)[positions + 1], targets)
  assert positions.dtype == targets.dtype == np.int32
  assert list(zip(positions.tolist(), targets.tolist())) == official_positions(
      ids, SPEC_NUMBER_IDS, numeric=True)
  # Right padding (EOS) ends the answer, as in the official code.
  padded = ids + [2] * 5
  for got, want in zip(pm.answer_targets(mistral, padded, 'gsm8k'), (positions, targets)):
    np.testing.assert_array_equal(got, want)


def test_csqa_targets_with_mistral(mistral):
  ids = mistral.encode(pm.paper_prompt('commonsenseqa', CSQA), bos=True)
  n = len(ids)
  positions, targets = pm.answer_targets(mistral, ids, 'commonsenseqa')
  assert targets.tolist() == [365, 13]  # '▁B', newline.
  np.testing.assert_array_equal(positions, [n - 3, n - 2])  # ':' scores '▁B', '▁B' scores '\n'.
  assert list(zip(positions.tolist(), targets.tolist())) == official_positions(
      ids, SPEC_LETTER_IDS, numeric=False)


def test_byte_tokenizer_targets(tok_bytes):
  ids = tok_bytes.encode(pm.paper_prompt('gsm8k', GSM), bos=True)
  n = len(ids)  # ... ':' ' ' '7' '2' '\n': the space is its own token and not valid.
  positions, targets = pm.answer_targets(tok_bytes, ids, 'gsm8k')
  assert tok_bytes.decode(targets) == '72\n'
  np.testing.assert_array_equal(positions, [n - 4, n - 3, n - 2])
  ids = tok_bytes.encode(pm.paper_prompt('commonsenseqa', CSQA), bos=True)
  positions, targets = pm.answer_targets(tok_bytes, ids, 'commonsenseqa')
  assert tok_bytes.decode(targets) == 'B\n'
  np.testing.assert_array_equal(positions, [len(ids) - 3, len(ids) - 2])


@pytest.mark.parametrize('name', ['mistral', 'bytes'])
def test_last_marker_is_used_and_commas_are_skipped(name):
  tok = get_tokenizer(name)
  ex = Example(question='Is it\nA: 3 or 4?', answer='1080', solution='...\n#### 1,080')
  text = pm.paper_prompt('gsm8k', ex)
  assert text.count('\nA:') == 2
  ids = tok.encode(text, bos=True)
  positions, targets = pm.answer_targets(tok, ids, 'gsm8k')
  assert tok.decode(targets) == '1080\n'  # Not '34...': the question's "\nA:" is ignored.
  ids = np.asarray(ids)
  np.testing.assert_array_equal(ids[positions + 1], targets)
  comma = max(k for k, i in enumerate(ids.tolist()) if tok.decode([i]) == ',')
  assert ids[comma] not in targets  # The comma is skipped ...
  assert comma in positions.tolist()  # ... and its logits score the '0' after it.
  if name == 'mistral':
    assert list(zip(positions.tolist(), targets.tolist())) == official_positions(
        ids.tolist(), SPEC_NUMBER_IDS, numeric=True)


@pytest.mark.parametrize('name', ['mistral', 'bytes'])
def test_missing_marker_or_answer_is_a_clear_error(name):
  tok = get_tokenizer(name)
  with pytest.raises(ValueError, match='no "\\\\nA:" answer marker'):
    pm.answer_targets(tok, tok.encode('Q: what?\nAnswer: 7\n', bos=True), 'gsm8k')
  with pytest.raises(ValueError, match='no valid gsm8k answer token'):
    pm.answer_targets(tok, tok.encode('Q: what?\nA: none\n'.rstrip('\n'), bos=True), 'gsm8k')
  with pytest.raises(UserError, match='valid: gsm8k, commonsenseqa'):
    pm.answer_targets(tok, tok.encode('Q: x\nA: 1\n', bos=True), 'math')


def test_answer_probability_by_hand():
  # V = 5, valid ids {1, 3, 4}. Ids 0 and 2 are invalid: their large logits change the full
  # softmax but cancel in the renormalization over the valid ids.
  # Row 0, target 1: valid exps e^ln2 = 2, e^0 = 1, e^0 = 1 -> P = 2 / 4 = 0.5.
  # Row 1, target 4: valid exps e^0 = 1, e^ln3 = 3, e^0 = 1 -> P = 1 / 5 = 0.2.
  # Score = 0.5 * 0.2 = 0.1.
  logits = np.array([[9.0, math.log(2), 7.0, 0.0, 0.0],
                     [-3.0, 0.0, 40.0, math.log(3), 0.0]])
  valid = np.array([1, 3, 4])
  assert pm.answer_probability(logits, [1, 4], valid) == pytest.approx(0.1, rel=1e-12)
  # The same from the official recipe: full softmax, keep valid ids, renormalize, multiply.
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  kept = p[:, valid] / p[:, valid].sum(1, keepdims=True)
  assert pm.answer_probability(logits, [1, 4], valid) == pytest.approx(
      kept[0, 0] * kept[1, 2], rel=1e-12)
  # Jax arrays in low precision are accepted (and computed in float64 from their values).
  got = pm.answer_probability(jnp.asarray(logits, jnp.bfloat16), jnp.array([1, 4]), valid)
  assert got == pytest.approx(0.1, rel=0.05)
  assert pm.answer_probability(np.zeros((0, 5)), [], valid) == 1.0  # The empty product.


def test_answer_probability_is_stable_and_checks_its_inputs():
  # Huge logits: a naive exp overflows; P = e^0 / (e^0 + e^ln3) = 0.25 all the same.
  big = np.array([[1e4, 1e4 + math.log(3), -1e4]])
  assert pm.answer_probability(big, [0], [0, 1, 2]) == pytest.approx(0.25, rel=1e-12)
  # 30 answer tokens of P = 1e-10 each: 1e-300, far below float32's range, kept accurately.
  c = 30
  logits = np.zeros((c, 2))
  logits[:, 0] = math.log(1e-10 / (1 - 1e-10))  # P(0) = 1e-10 against id 1.
  score = pm.answer_probability(logits, np.zeros(c, int), [0, 1])
  assert score == pytest.approx(1e-300, rel=1e-9)
  with pytest.raises(ValueError, match='not all in the valid set'):
    pm.answer_probability(np.zeros((1, 3)), [2], [0, 1])
  with pytest.raises(ValueError, match=r'expected logits \[C, V\]'):
    pm.answer_probability(np.zeros(3), [0], [0, 1])
  with pytest.raises(ValueError, match='no finite logit'):
    pm.answer_probability(np.full((1, 3), -np.inf), [0], [0, 1])


def test_paper_metric_is_the_mean():
  assert pm.paper_metric([0.1, 0.5, 0.3]) == pytest.approx(0.3)
  with pytest.raises(ValueError, match='at least one'):
    pm.paper_metric([])


def test_end_to_end_on_mistral_ids_with_fake_logits(mistral):
  # Logits favouring each gold token by log(9) over every other valid id: P per token is
  # 9 / (9 + 10) for the 11 number ids and the product runs over '7', '2', '\n'.
  ids = mistral.encode(pm.paper_prompt('gsm8k', GSM), bos=True)
  positions, targets = pm.answer_targets(mistral, ids, 'gsm8k')
  valid = pm.valid_answer_ids(mistral, 'gsm8k')
  logits = np.zeros((len(ids), mistral.vocab_size), np.float32)
  logits[positions, targets] = math.log(9)
  score = pm.answer_probability(logits[positions], targets, valid)
  assert score == pytest.approx((9 / 19) ** 3, rel=1e-6)
