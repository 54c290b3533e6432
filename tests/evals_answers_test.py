"""Tests for jaxstar.evals.answers: zero-/few-shot CoT prompts, extraction, checking, votes."""
import pytest

from jaxstar.data.tasks import Example
from jaxstar.errors import UserError
from jaxstar.evals import answers

GSM = Example(question='How many apples?', answer='18', solution='6*3=18\n#### 18')
CSQA = Example(question='Where is a ball kept?', answer='B',
               choices=(('A', 'sky'), ('B', 'toy box'), ('C', 'oven'), ('D', 'sea'),
                        ('E', 'moon')))


def test_zero_shot_prompts():
  assert answers.zero_shot_prompt('gsm8k', GSM) == (
      "Q: How many apples?\nA: Let's think step by step.")
  assert answers.zero_shot_prompt('commonsenseqa', CSQA) == (
      'Q: Where is a ball kept?\nAnswer Choices:\n(a) sky\n(b) toy box\n(c) oven\n(d) sea\n'
      "(e) moon\nA: Let's think step by step.")
  with pytest.raises(UserError, match='valid: gsm8k, commonsenseqa'):
    answers.zero_shot_prompt('arithmetic', GSM)


def test_truncate_first_stage():
  assert answers.truncate_first_stage(' 6 bags of 3.\nSo 18.') == ' 6 bags of 3.\nSo 18.'
  assert answers.truncate_first_stage(' So 18.\n\nQ: Next question') == ' So 18.\n\n'
  assert answers.truncate_first_stage(' So 18.\n\n\n\nMore') == ' So 18.'
  # Whichever stop comes first wins.
  assert answers.truncate_first_stage(' a\n\n\nQ: b') == ' a'
  assert answers.truncate_first_stage(' aQ: b\n\n\n') == ' a'
  assert answers.truncate_first_stage('') == ''


def test_answer_stage_prompt():
  prompt = answers.zero_shot_prompt('gsm8k', GSM)
  got = answers.answer_stage_prompt('gsm8k', prompt, ' 6 times 3 is 18. \n\nQ: other')
  assert got == prompt + ' 6 times 3 is 18.\nTherefore, the answer (arabic numerals) is'
  got = answers.answer_stage_prompt('commonsenseqa', 'P', ' toys go in boxes.\n')
  assert got == 'P toys go in boxes.\nTherefore, among A through E, the answer is'


@pytest.mark.parametrize('text, want', [
    (' 18.', '18'),
    (' $18.', '18'),
    (' 18 dollars.', '18'),
    (' 1,080 apples', '1080'),
    (' 1,080,000.', '1080000'),
    (' 18, and 20 were left', '18'),  # Two answers: the first wins.
    (' 7 or maybe 8', '7'),
    (' -3 degrees', '-3'),  # The official loses the sign; kept here.
    (' 2.5 hours', '2.5'),
    (' 72.0', '72'),
    (' 5-6 apples', '5'),  # A range's hyphen is not a sign.
    (' not known.', None),
    ('', None),
])
def test_zero_shot_gsm8k_extraction(text, want):
  assert answers.extract_zero_shot_answer('gsm8k', text) == want


@pytest.mark.parametrize('text, want', [
    (' (c) oven.', 'C'),
    (' C.', 'C'),
    (' c', 'C'),
    (' (b)', 'B'),
    (' e) moon', 'E'),
    (' (B) or (C)', 'B'),  # Two answers: the first wins.
    (' a toy box, so (b).', 'B'),  # "a toy box": the article, not choice A.
    (' (a) sky', 'A'),
    (' A.', 'A'),
    (' toy box, e.g. a drawer', None),  # "e.g." and the article are no choice.
    (' the oven', None),
    (' F', None),
    ('', None),
])
def test_zero_shot_csqa_extraction(text, want):
  assert answers.extract_zero_shot_answer('commonsenseqa', text) == want


def test_few_shot_extraction_follows_star_rules():
  fs = lambda task, text: answers.extract_answer(task, text, 'few_shot')
  assert fs('gsm8k', ' 6*3=18\n#### 1,080\n\nQ: next') == '1080'
  # Two answer lines: the first line holding "####" wins (spec/star.md §1.4).
  assert fs('gsm8k', ' x\n#### 18\n#### 20') == '18'
  assert fs('gsm8k', ' 6*3=18, no final line') is None
  assert fs('gsm8k', ' x\n####\n') is None  # An empty answer is no answer.
  assert fs('gsm8k', ' x\n#### $18.00') == '18'
  # CSQA: the first line ending "(x)."; lowercase letters come back upper case.
  assert fs('commonsenseqa', ' Balls go in toy boxes. So the answer is toy box (b).\nQ:') == 'B'
  assert fs('commonsenseqa', ' Not (a), so (b) it is. Or (c)') == 'C'  # Last "(x)" fallback.
  assert fs('commonsenseqa', ' no letter here.\n(c).') is None  # Only the first line counts.
  assert fs('arithmetic', '<scratch>\n...\n</scratch>\n5 8\n') == '5 8'
  with pytest.raises(UserError, match='valid: gsm8k, commonsenseqa, arithmetic'):
    fs('math', '#### 1')
  with pytest.raises(UserError, match='valid: few_shot, zero_shot'):
    answers.extract_answer('gsm8k', '1', 'greedy')


def test_zero_shot_mode_dispatch():
  assert answers.extract_answer('gsm8k', ' $1,080 in all', 'zero_shot') == '1080'
  assert answers.extract_answer('commonsenseqa', ' (d)', 'zero_shot') == 'D'
  with pytest.raises(UserError, match='unknown zero-shot task'):
    answers.extract_answer('arithmetic', ' 5 8', 'zero_shot')


def test_is_correct():
  assert answers.is_correct('gsm8k', '1080', '1,080')
  assert answers.is_correct('gsm8k', '18.50', '18.5')
  assert answers.is_correct('gsm8k', '18', '$18')
  assert not answers.is_correct('gsm8k', '-18', '18')
  assert not answers.is_correct('gsm8k', 'eighteen', '18')
  assert not answers.is_correct('gsm8k', None, '18')
  assert answers.is_correct('commonsenseqa', 'b', 'B')
  assert not answers.is_correct('commonsenseqa', 'C', 'B')
  assert answers.is_correct('arithmetic', '5 8', '5 8 ')
  assert not answers.is_correct('arithmetic', '58', '5 8')
  with pytest.raises(UserError, match='unknown task'):
    answers.is_correct('math', '1', '1')


def test_majority_vote():
  assert answers.majority_vote(['18', '20', '18', None]) == '18'
  assert answers.majority_vote(['20', '18', '18', '20']) == '20'  # Tie: the first seen.
  assert answers.majority_vote([None, '7', None, None, '8', '8']) == '8'  # None abstains.
  assert answers.majority_vote([None, None]) is None
  assert answers.majority_vote([]) is None
  assert answers.majority_vote(iter(['B', 'C'])) == 'B'
