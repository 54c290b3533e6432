"""Thought-augmented decoding (jaxstar/quietstar/decoding.py) against the training-time thought
passes: with the same (forced) thoughts, the decoder's mixed logits for the next token equal
the parallel computation's at the last position, in float64 (tests/equivalence.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import sampling
from jaxstar import tokenizer as tokenizer_lib
from jaxstar.model import transformer
from jaxstar.quietstar import decoding
from tests.equivalence import assert_close, assert_far, x64
from tests.quietstar_test import END, PAD, START, _model, _params

TOK = tokenizer_lib.get_tokenizer("bytes")


def _rows(lengths, seed=1):
  return [np.asarray(jax.random.randint(jax.random.key(seed + i), (n,), 3, 250)).tolist()
          for i, n in enumerate(lengths)]


def _training_logits(model, params, rows, forced_bt):
  """Mixed logits at each row's last token from the training passes (rows right-padded)."""
  l = max(map(len, rows))
  tokens = np.full((len(rows), l), PAD, np.int32)
  mask = np.zeros((len(rows), l), np.int32)
  forced = np.full((len(rows), l, model.qs.num_sampled), 3, np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row)], mask[r, :len(row)] = row, 1
    forced[r, len(row) - 1] = forced_bt[r]
  out = model.apply({"params": params}, tokens, mask, jax.random.key(0),
                    forced_thoughts=jnp.asarray(forced), return_logits=True)
  last = np.array([len(r) - 1 for r in rows])
  take = lambda x: np.asarray(x)[np.arange(len(rows)), last]
  return take(out["talk_logits"][:, :, 0]), take(out["mix_weight"][:, :, 0])


@pytest.mark.parametrize("window", [None, 4])
def test_thought_decoding_equals_training_passes_at_the_last_position(window):
  with x64():
    model = _model(n_ahead=6, talk=1, passes=1, sliding_window=window)
    params = _params(model, jnp.zeros((1, 4), jnp.int32))
    rows = _rows([7, 4, 9])
    t_n = model.qs.num_sampled
    forced = jax.random.randint(jax.random.key(5), (3, t_n), 3, 250, jnp.int32)
    forced_next = jax.random.randint(jax.random.key(6), (3, t_n), 3, 250, jnp.int32)
    new = jnp.array([11, 22, 33], jnp.int32)

    l = 12
    tokens = np.full((3, l), PAD, np.int32)
    mask = np.zeros((3, l), bool)
    for r, row in enumerate(rows):
      tokens[r, l - len(row):], mask[r, l - len(row):] = row, True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = transformer.init_cache(model.cfg, 3, l + 1 + t_n + 2)

    def prefill(forced_bt):
      return model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                         jnp.asarray(positions), cache, jax.random.key(0), False, forced_bt,
                         method=decoding.prefill_thought)

    logits, cache_after, aux = prefill(forced)
    want, want_w = _training_logits(model, params, rows, np.asarray(forced))
    assert_close(np.asarray(logits), want, "prefill + thought")
    assert_close(np.asarray(aux["mix_weight"]), want_w, "mixing weight")
    np.testing.assert_array_equal(np.asarray(aux["thoughts"]), np.asarray(forced))
    assert int(cache_after.index) == l

    # One more token through the cache (with the start vector in the same call), then think.
    logits2, _, _ = model.apply({"params": params}, new, jnp.asarray(positions[:, -1] + 1),
                                cache_after, jax.random.key(0), False, forced_next,
                                method=decoding.step_thought)
    longer = [row + [int(t)] for row, t in zip(rows, new)]
    want2, _ = _training_logits(model, params, longer, np.asarray(forced_next))
    assert_close(np.asarray(logits2), want2, "step + thought")

    # Live: the thought matters (other thoughts, and no thought, give other logits).
    other, _, _ = prefill(forced_next)
    assert_far(np.asarray(other), want, err_msg="other thoughts")
    base = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                       method=lambda m, t, k: m.lm(t, k))[:, -1]
    assert_far(np.asarray(base), want, err_msg="no thought")


def test_greedy_thought_generation_equals_recomputing_every_position():
  """The sampler with the thought decoder (greedy thoughts and tokens) writes what recomputing
  the thought-augmented forward over the whole sequence for every token writes (the official
  generation loop, with the learned start/end vectors)."""
  with x64():
    model = _model(n_ahead=5, talk=1, passes=1)
    params = _params(model, jnp.zeros((1, 4), jnp.int32))
    decoder = decoding.ThoughtDecoder(model.cfg, model.qs, START, END, 48, PAD,
                                      greedy_thoughts=True)
    sampler = sampling.Sampler(decoder, params, TOK, batch_size=2, buckets=(16,))
    prompts = ["12+34=", "5+5=10\n7"]
    gens = sampler.generate(prompts, sampling.SamplingConfig(max_new_tokens=6))

    forward = jax.jit(lambda t, k: model.apply({"params": params}, t, k, jax.random.key(0),
                                               greedy=True, return_logits=True)["talk_logits"])
    for prompt, gen in zip(prompts, gens):
      ids = TOK.encode(prompt, bos=True)
      out = []
      for _ in range(6):
        tokens = np.full((1, 24), PAD, np.int32)
        tokens[0, :len(ids)] = ids
        logits = np.asarray(forward(tokens, (np.arange(24) < len(ids))[None]))
        token = int(np.argmax(logits[0, len(ids) - 1, 0, :sampling.text_vocab_size(TOK)]))
        out.append(token)
        ids = ids + [token]
        if token == TOK.eos_id:
          break
      assert gen.tokens == out, prompt
      assert gen.aux["thoughts"].shape == (len(out), model.qs.num_sampled)
      assert np.all(gen.aux["mix_weight"] != 0)
      trace = decoding.thought_trace(TOK, gen)
      assert [t for t, _, _ in trace] == [TOK.decode([t]) for t in out]
      assert trace[0][1] == "".join(TOK.decode([i]) if i < TOK.vocab_size else f"<id {i}>"
                                    for i in gen.aux["thoughts"][0])


def test_mixed_logits_at_chosen_positions_equal_all_positions():
  with x64():
    model = _model(n_ahead=6, talk=1, passes=1)
    params = _params(model, jnp.zeros((1, 4), jnp.int32))
    rows = _rows([9, 6])
    tokens = np.full((2, 9), PAD, np.int32)
    mask = np.zeros((2, 9), np.int32)
    for r, row in enumerate(rows):
      tokens[r, :len(row)], mask[r, :len(row)] = row, 1
    forced = jax.random.randint(jax.random.key(3), (2, 9, model.qs.num_sampled), 3, 250)
    full = model.apply({"params": params}, tokens, mask, jax.random.key(0),
                       forced_thoughts=forced, return_logits=True)
    at = np.array([[2, 5, 7], [0, 3, 4]])
    forced_at = np.take_along_axis(np.asarray(forced), at[..., None], axis=1)
    mixed, base = model.apply({"params": params}, tokens, mask, jnp.asarray(at),
                              jax.random.key(0), forced_bct=jnp.asarray(forced_at),
                              method=decoding.mixed_logits_at)
    rows_idx = np.arange(2)[:, None]
    assert_close(np.asarray(mixed), np.asarray(full["talk_logits"][:, :, 0])[rows_idx, at])
    assert_close(np.asarray(base), np.asarray(full["base_logits"])[rows_idx, at])
    assert_far(np.asarray(mixed), np.asarray(base), err_msg="thoughts change the logits")


def test_mixed_logits_at_needs_the_eval_setting():
  model = _model(n_ahead=5, talk=2, passes=1, float64=False)
  params = _params(model, jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="n_ahead_talk=1 and n_passes=1"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)),
                jnp.zeros((1, 1), jnp.int32), jax.random.key(0),
                method=decoding.mixed_logits_at)


