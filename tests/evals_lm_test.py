"""Scoring and generation of `jaxstar.evals.lm.LanguageModel` against direct computations.

Equivalence checks run in float64 (tests/equivalence.py).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import model as model_lib
from jaxstar import sampling
from jaxstar import tokenizer as tokenizer_lib
from jaxstar.errors import UserError
from jaxstar.evals import lm as lm_lib
from jaxstar.model import hf_io
from jaxstar.quietstar.config import QuietStarConfig
from tests import equivalence
from tests.equivalence import assert_close, assert_far, x64

TOK = tokenizer_lib.get_tokenizer("bytes")
CONTEXTS = ["12+34=", "7+5=", "Q: what?\nA:"]
CONTINUATIONS = ["46", "12\n", " yes"]


def _direct_loglikelihood(lm, context, continuation):
  whole = TOK.encode(context + continuation, bos=True)
  n = len(TOK.encode(context, bos=True))
  module = model_lib.Transformer(lm.model_cfg)
  logits = np.asarray(module.apply({"params": lm.lm_params}, jnp.asarray([whole])))[0]
  logits = logits[:, :sampling.text_vocab_size(TOK)]
  logprob = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  picked = [float(logprob[t - 1, whole[t]]) for t in range(n, len(whole))]
  greedy = all(int(np.argmax(logits[t - 1])) == whole[t] for t in range(n, len(whole)))
  return sum(picked), greedy


def test_loglikelihood_and_rolling_equal_direct_computation():
  with x64():
    cfg = model_lib.get_config("tiny", num_layers=2, **equivalence.F64)
    lm = lm_lib.random_model(cfg, TOK, batch_size=2, max_length=64)
    got = lm.loglikelihood(CONTEXTS, CONTINUATIONS)
    for (value, greedy), context, continuation in zip(got, CONTEXTS, CONTINUATIONS):
      want, want_greedy = _direct_loglikelihood(lm, context, continuation)
      assert_close(np.float64(value), np.float64(want))
      assert greedy == want_greedy
    # Rolling over a whole text = the loglikelihood of the text after BOS alone.
    rolling = lm.loglikelihood_rolling(["3+4=7\n8+8=16\n"])[0]
    whole = _direct_loglikelihood(lm, "", "3+4=7\n8+8=16\n")[0]
    assert_close(np.float64(rolling), np.float64(whole))
    # Windows: a short max_length still scores every token once (with less context).
    short = lm_lib.LanguageModel(lm.params, cfg, TOK, batch_size=2, max_length=6)
    windowed = short.loglikelihood_rolling(["3+4=7\n8+8=16\n"])[0]
    assert np.isfinite(windowed)
    assert_far(np.float64(windowed), np.float64(rolling), err_msg="context matters")


def test_thought_scoring_matches_thought_free_at_zero_mixing_and_differs_otherwise():
  cfg = model_lib.get_config("tiny", num_layers=2)
  lm = lm_lib.random_model(cfg, TOK, qs=QuietStarConfig(n_ahead=5), batch_size=2)
  plain = lm.loglikelihood(CONTEXTS, CONTINUATIONS)
  thought = lm.loglikelihood(CONTEXTS, CONTINUATIONS, thoughts=True)
  assert lm.loglikelihood(CONTEXTS, CONTINUATIONS, thoughts=True) == thought  # seeded
  assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(plain, thought))
  # With the mixing head's output at zero (as initialized) the thoughts change nothing.
  params = jax.tree.map(lambda x: x, lm.params)
  params["mixing"]["out_proj"]["kernel"] = jnp.zeros_like(params["mixing"]["out_proj"]["kernel"])
  zero = lm_lib.LanguageModel(params, cfg, TOK, qs=lm.qs, batch_size=2)
  for (a, _), (b, _) in zip(zero.loglikelihood(CONTEXTS, CONTINUATIONS, thoughts=True), plain):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(b))   # float32, scaled to the value
  gens = lm.sample(["12+34="], sampling.SamplingConfig(max_new_tokens=3), thoughts=True)
  assert gens[0].aux["thoughts"].shape == (len(gens[0].tokens), 2)


def test_plain_model_refuses_thoughts_and_bad_paths(tmp_path):
  lm = lm_lib.random_model(model_lib.get_config("tiny", num_layers=1), TOK, batch_size=2)
  with pytest.raises(UserError, match="needs a Quiet-STaR model"):
    lm.loglikelihood(["1"], ["2"], thoughts=True)
  with pytest.raises(UserError, match="neither a jaxstar run directory"):
    lm_lib.LanguageModel.load(str(tmp_path))


def test_load_hugging_face_folder(tmp_path):
  cfg = model_lib.get_config("tiny", num_layers=1)
  lm = lm_lib.random_model(cfg, TOK, batch_size=2)
  hf_io.save_hf(lm.params, cfg, str(tmp_path))
  loaded = lm_lib.LanguageModel.load(str(tmp_path), tokenizer="bytes", batch_size=2)
  got = loaded.loglikelihood(CONTEXTS, CONTINUATIONS)
  want = lm.loglikelihood(CONTEXTS, CONTINUATIONS)
  assert [g for _, g in got] == [g for _, g in want]
  # The same float32 weights and programs: equal up to float32 rounding of the sum's scale.
  np.testing.assert_allclose([v for v, _ in got], [v for v, _ in want], rtol=1e-6)


def test_with_thoughts_adds_untrained_thought_parameters_around_the_same_lm():
  cfg = model_lib.get_config("tiny", num_layers=1)
  lm = lm_lib.random_model(cfg, TOK, batch_size=2)
  thinker = lm.with_thoughts(QuietStarConfig(n_ahead=5))
  assert thinker.has_thoughts and thinker.lm_params is lm.params     # shared, not copied
  assert thinker.with_thoughts() is thinker
  assert not np.any(np.asarray(thinker.params["mixing"]["out_proj"]["kernel"]))
  init = np.asarray(lm.params["embedding"])[TOK.thought_init_ids[0]]
  scale = thinker.qs.embedding_scale    # stored / scale, used * scale; float32 rounding
  np.testing.assert_allclose(np.asarray(thinker.params["start_thought"]) * scale, init,
                             rtol=1e-6, atol=1e-7 * float(np.abs(init).max()))
  # Mixing weight 0: thoughts are drawn but the text is the plain model's.
  cfg_s = sampling.SamplingConfig(max_new_tokens=5)
  plain = lm.sample(CONTEXTS[:2], cfg_s)
  thought = thinker.sample(CONTEXTS[:2], cfg_s, thoughts=True)
  assert [g.tokens for g in thought] == [g.tokens for g in plain]
  assert thought[0].aux["thoughts"].shape == (len(thought[0].tokens), 2)
  assert not np.any(np.asarray(thought[0].aux["mix_weight"]))
