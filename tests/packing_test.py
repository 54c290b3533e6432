"""Packed rows (`segment_ids`): each document of a row is computed as if it were alone.

Equivalence tests in float64 (`tests/equivalence.py`: 1e-9 relative to the compared magnitude).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import model as model_lib
from jaxstar import train_lib
from jaxstar.model import attention
from jaxstar.quietstar import config as qs_config
from jaxstar.quietstar import loss as qs_loss
from jaxstar.quietstar import thoughts
from tests.equivalence import F64, assert_close, assert_far, x64

START, END, PAD = 259, 260, 2
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3],    # three documents
                     [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])   # two
DOC_LEN = SEGMENTS.shape[1]


def _tokens():
  return jax.random.randint(jax.random.key(1), SEGMENTS.shape, 3, 250)


def _documents(tokens):
  """(row, first, length) of every document, and each alone as a right-padded row."""
  docs, rows = [], []
  for r, seg in enumerate(SEGMENTS):
    for s in np.unique(seg):
      where = np.flatnonzero(seg == s)
      first, n = int(where[0]), len(where)
      docs.append((r, first, n))
      alone = np.full(DOC_LEN, PAD, np.int32)
      alone[:n] = np.asarray(tokens)[r, first:first + n]
      rows.append(alone)
  alone = np.stack(rows)
  mask = np.zeros_like(alone)
  for d, (_, _, n) in enumerate(docs):
    mask[d, :n] = 1
  return docs, jnp.asarray(alone), jnp.asarray(mask)


def test_segment_positions_and_visibility():
  seg = jnp.asarray(SEGMENTS)
  np.testing.assert_array_equal(attention.segment_positions(seg)[0],
                                [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2])
  idx = jnp.arange(DOC_LEN)
  mask = np.asarray(attention.visible_keys(idx, idx, None, None, seg, seg))
  assert mask[0, 4, 3] and mask[0, 4, 4] and not mask[0, 4, 2] and not mask[0, 4, 5]
  ahead = np.asarray(attention.same_segment_ahead(seg, 2))[0]
  np.testing.assert_array_equal(ahead, [1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0])


@pytest.mark.parametrize("window", [None, 3])
def test_packed_forward_equals_documents_alone(window):
  with x64():
    cfg = model_lib.get_config("tiny", num_layers=2, **F64, sliding_window=window)
    model = model_lib.Transformer(cfg)
    tokens = _tokens()
    params = model.init(jax.random.key(0), tokens)
    packed = model.apply(params, tokens, segment_ids_bl=jnp.asarray(SEGMENTS))
    unaware = model.apply(params, tokens)
    docs, alone, mask = _documents(tokens)
    single = model.apply(params, alone, mask > 0)
    for d, (r, first, n) in enumerate(docs):
      assert_close(packed[r, first:first + n], single[d, :n], err_msg=f"document {d}")
    # Live: without segment ids a later document sees the one before it.
    assert_far(unaware[0, 3:8], single[1, :5], err_msg="segment ids ignored")

    loss, n_targets = train_lib.next_token_loss(packed, tokens, jnp.ones_like(tokens),
                                                jnp.asarray(SEGMENTS))
    per_doc = [train_lib.next_token_loss(single[d:d + 1], alone[d:d + 1], mask[d:d + 1])
               for d in range(len(docs))]
    assert int(n_targets) == sum(int(c) for _, c in per_doc) == DOC_LEN * 2 - len(docs)
    assert_close(loss, sum(float(l) * float(c) for l, c in per_doc) / float(n_targets))


@pytest.mark.parametrize("chunk", [0, 4])  # one pass over all positions; chunks of 4
def test_packed_quietstar_equals_documents_alone(chunk):
  with x64():
    cfg = model_lib.get_config("tiny", num_layers=2, **F64, sliding_window=4)
    qs = qs_config.QuietStarConfig(n_ahead=5, n_ahead_talk=3, n_passes=2, chunk_positions=chunk)
    model = thoughts.QuietStarModel(cfg, qs, start_id=START, end_id=END, init_id=48, pad_id=PAD)
    tokens = _tokens()
    params = nn.unbox(model.init(jax.random.key(0), tokens,
                                 method=thoughts.QuietStarModel.init_all)["params"])
    kernel = params["mixing"]["out_proj"]["kernel"]  # a trained-looking head: w != 0
    params["mixing"]["out_proj"]["kernel"] = jax.random.normal(jax.random.key(7), kernel.shape)
    docs, alone, mask = _documents(tokens)
    forced = jax.random.randint(jax.random.key(6), (2 * 2, DOC_LEN, qs.num_sampled), 3, 250)
    forced_alone = np.zeros((len(docs) * 2, DOC_LEN, qs.num_sampled), np.int32)
    for d, (r, first, n) in enumerate(docs):
      forced_alone[2 * d:2 * d + 2, :n] = forced[2 * r:2 * r + 2, first:first + n]
    seg = jnp.asarray(SEGMENTS)

    run = jax.jit(lambda t, m, f, s: model.apply({"params": params}, t, m, jax.random.key(3),
                                                 segment_ids_bl=s, forced_thoughts=f,
                                                 return_logits=True))
    packed = run(tokens, jnp.ones_like(tokens), forced, seg)
    single = run(alone, mask, jnp.asarray(forced_alone), None)
    thought_ids = np.isin(np.arange(cfg.vocab_size), [START, END])
    _, talk_real = qs_loss.target_masks(jnp.ones_like(tokens), qs.n_ahead_talk, seg)
    _, talk_real_alone = qs_loss.target_masks(mask, qs.n_ahead_talk)
    for d, (r, first, n) in enumerate(docs):
      span, rows, rows_alone = slice(first, first + n), slice(2 * r, 2 * r + 2), slice(2 * d,
                                                                                      2 * d + 2)
      assert_close(packed["base_logits"][r, span], single["base_logits"][d, :n])
      for key in ("thought_logprob", "talk_hidden"):
        assert_close(packed[key][rows, span], single[key][rows_alone, :n], err_msg=key)
      logits = np.asarray(packed["thought_logits"][rows, span])
      assert np.all(logits[..., thought_ids] == thoughts.MASKED_LOGIT)
      assert_close(logits[..., ~thought_ids],
                   np.asarray(single["thought_logits"][rows_alone, :n])[..., ~thought_ids])
      real = np.asarray(talk_real[r, span], bool)
      np.testing.assert_array_equal(real, np.asarray(talk_real_alone[d, :n], bool))
      for key in ("talk_ce", "mix_weight"):
        assert_close(np.asarray(packed[key][rows, span])[:, real],
                     np.asarray(single[key][rows_alone, :n])[:, real], err_msg=key)
    assert float(jnp.abs(packed["mix_weight"]).max()) > 1e-3  # the thought path is live
