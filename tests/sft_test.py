"""Prompt/completion fine-tuning examples (jaxstar/data/sft.py) and the completion-only loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import tokenizer as tokenizer_lib
from jaxstar import train_lib
from jaxstar.data import sft
from jaxstar.errors import UserError

TOK = tokenizer_lib.get_tokenizer('bytes')
EX = sft.Example(prompt='Q: 1+2?\nA:', completion=' 3.\n#### 3')


def test_completion_targets_and_truncation():
  row = sft.encode(TOK, EX, 32)
  n = len(TOK.encode(EX.prompt + EX.completion, bos=True, eos=True))
  start = len(TOK.encode(EX.prompt, bos=True))
  assert row['mask'].tolist() == [1] * n + [0] * (32 - n)
  assert row['targets'].tolist() == [0] * start + [1] * (n - start) + [0] * (32 - n)
  assert TOK.decode(row['tokens'][row['targets'] > 0]) == EX.completion   # EOS dropped
  every = sft.encode(TOK, EX, 32, loss_on='all')
  assert every['targets'].tolist() == [0] + [1] * (n - 1) + [0] * (32 - n)
  short = sft.encode(TOK, EX, n - 3)            # loses the prompt's first tokens, not the answer
  assert short['mask'].all() and TOK.decode(short['tokens'][short['targets'] > 0]) == EX.completion
  with pytest.raises(UserError, match='does not fit in seq_len=5'):
    sft.encode(TOK, EX, 5)
  with pytest.raises(UserError, match="loss_on='prompt'"):
    sft.encode(TOK, EX, 32, loss_on='prompt')


def test_loss_counts_only_completion_targets():
  batch = sft.encode_all(TOK, [EX, sft.Example('x', 'y')], 32)
  logits = jax.random.normal(jax.random.key(0), (2, 32, TOK.vocab_size))
  loss, n = train_lib.next_token_loss(logits, batch['tokens'], batch['mask'],
                                      target_mask_bl=batch['targets'])
  assert int(n) == int(batch['targets'][:, 1:].sum())
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(logp, batch['tokens'][:, 1:, None], axis=-1)[..., 0]
  want = -(picked * batch['targets'][:, 1:]).sum() / batch['targets'][:, 1:].sum()
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_reading_examples(tmp_path):
  good = tmp_path / 'set.jsonl'
  good.write_text('{"prompt": "Q", "completion": " A"}\n')
  assert sft.read_examples(str(good)) == [sft.Example('Q', ' A')]
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "Q"}\n')
  with pytest.raises(UserError, match='bad.jsonl:1'):
    sft.read_examples(str(bad))


def test_packing_keeps_whole_examples_in_rows():
  examples = [sft.Example(f'Q: {i}+{i}?\nA:', f' {2 * i}.' * (1 + i % 4)) for i in range(11)]
  packed = sft.pack_examples(TOK, examples, 48, seed=3)
  seen = []
  for r in range(len(packed['tokens'])):
    segs = packed['segment_ids'][r]
    assert (packed['mask'][r] > 0).tolist() == (segs > 0).tolist()
    for s in range(1, segs.max() + 1):
      at = segs == s
      assert np.all(np.diff(np.flatnonzero(at)) == 1)           # contiguous
      tokens, targets = packed['tokens'][r][at], packed['targets'][r][at]
      seen.append(TOK.decode(tokens[1:-1].tolist()))              # without BOS / EOS
      n = int(at.sum())
      one = next(sft.encode(TOK, ex, 48) for ex in examples
                 if ex.prompt + ex.completion == seen[-1])
      assert tokens.tolist() == one['tokens'][:n].tolist()
      assert targets.tolist() == one['targets'][:n].tolist()
  assert sorted(seen) == sorted(ex.prompt + ex.completion for ex in examples)
  assert len(packed['tokens']) < len(examples)                    # rows hold several
  with pytest.raises(UserError, match='no fine-tuning examples'):
    sft.pack_examples(TOK, [], 48)
