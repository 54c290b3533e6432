"""Tests of batched KV-cache decoding (jaxstar/sampling.py).

Greedy generation is compared with a full recompute of the sequence at every token, in float64
(tests/equivalence.py), so an argmax cannot flip on rounding.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import model as model_lib
from jaxstar import sampling
from jaxstar import sharding
from jaxstar import tokenizer as tokenizer_lib
from jaxstar.errors import UserError
from tests import equivalence
from tests.equivalence import x64

PROMPTS = ("12+34=", "7+5=46\n9", "1", "Hello, world! 99+1=", "3+4=7\n8+8=16\n")
TOK = tokenizer_lib.get_tokenizer("bytes")


def _model(window=None, seed=0, f64=True):
  cfg = model_lib.get_config("tiny", num_layers=2, sliding_window=window,
                             **(equivalence.F64 if f64 else {}))
  module = model_lib.Transformer(cfg)
  params = nn.unbox(module.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])
  return cfg, module, params


def _recompute(module, params, prompt_ids, max_new, stop=()):
  """Greedy generation by running the whole sequence for every new token (the reference)."""
  total = 64
  forward = jax.jit(lambda t, m: module.apply({"params": params}, t, m))
  ids = list(prompt_ids)
  out = []
  for _ in range(max_new):
    tokens = np.full((1, total), TOK.eos_id, np.int32)
    tokens[0, :len(ids)] = ids
    mask = np.arange(total)[None] < len(ids)
    logits = np.asarray(forward(tokens, mask))[0, len(ids) - 1]
    token = int(np.argmax(logits[:sampling.text_vocab_size(TOK)]))  # thought ids are not text
    out.append(token)
    ids.append(token)
    text = TOK.decode([t for t in out if t != TOK.eos_id])
    if token == TOK.eos_id or any(s in text for s in stop):
      break
  return out


def _ascii_run(tokens, n):
  printable = [0x20 <= t - TOK.OFFSET < 0x7f for t in tokens]
  for i in range(2, len(tokens) - n + 1):
    if all(printable[i:i + n]):
      return TOK.decode(tokens[i:i + n])
  return None


@pytest.mark.parametrize("window", [None, 6])
def test_cached_greedy_generation_equals_recompute_with_ragged_prompts_and_stops(window):
  with x64():
    cfg, module, params = _model(window)
    sampler = sampling.Sampler(sampling.PlainDecoder(cfg), params, TOK, batch_size=4,
                               buckets=(16, 32))
    free = sampler.generate(PROMPTS, sampling.SamplingConfig(max_new_tokens=12))
    for prompt, gen in zip(PROMPTS, free):
      assert gen.tokens == _recompute(module, params, TOK.encode(prompt, bos=True), 12), prompt
      ended = gen.tokens[-1] == TOK.eos_id
      assert gen.finish == ("eos" if ended else "length")
      assert ended or len(gen.tokens) == 12
    # Stop strings taken from what the model writes, so that they fire: the first two-byte run
    # of printable ASCII (other bytes may not survive a text round trip) after a generation's
    # second token, and the first one-byte run in another generation.
    runs = [(_ascii_run(g.tokens, 2), _ascii_run(g.tokens, 1)) for g in free]
    first = next(i for i, r in enumerate(runs) if r[0])
    stop = (runs[first][0], next(r[1] for i, r in enumerate(runs) if r[1] and i != first))
    stopped = sampler.generate(PROMPTS, sampling.SamplingConfig(max_new_tokens=12, stop=stop))
    fired = 0
    for prompt, gen in zip(PROMPTS, stopped):
      want = _recompute(module, params, TOK.encode(prompt, bos=True), 12, stop)
      assert gen.tokens == want, prompt
      text = TOK.decode([t for t in want if t != TOK.eos_id])
      cut = min([text.find(s) for s in stop if s in text], default=len(text))
      assert gen.text == text[:cut]
      fired += gen.finish == "stop"
      assert all(s not in gen.text for s in stop)
    assert fired >= 2
    assert len(stopped[first].tokens) < 12


def test_sampling_is_deterministic_and_top_k_1_is_greedy():
  cfg, _, params = _model(f64=False)
  sampler = sampling.Sampler(sampling.PlainDecoder(cfg), params, TOK, batch_size=8)
  hot = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, seed=3)
  a = sampler.generate(PROMPTS, hot)
  b = sampler.generate(PROMPTS, hot)
  c = sampler.generate(PROMPTS, sampling.SamplingConfig(max_new_tokens=10, temperature=1.0,
                                                        seed=4))
  assert [g.tokens for g in a] == [g.tokens for g in b]
  assert [g.tokens for g in a] != [g.tokens for g in c]
  greedy = sampler.generate(PROMPTS, sampling.SamplingConfig(max_new_tokens=10))
  for cfg_ in (sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1),
               sampling.SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=1e-6)):
    assert [g.tokens for g in sampler.generate(PROMPTS, cfg_)] == [g.tokens for g in greedy]


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(sampling.filter_logits(logits, top_k=2)) == [False, True, False, True]
  # top_p: 0.4 alone is < 0.5, so 0.3 joins; 0.4 + 0.3 = 0.7 >= 0.5 stops there.
  assert kept(sampling.filter_logits(logits, top_p=0.5)) == [False, True, False, True]
  assert kept(sampling.filter_logits(logits, top_p=0.4)) == [False, True, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.75)) == [False, True, True, True]
  # Inverse-CDF draws follow the distribution.
  draws = sampling.sample_inverse_cdf(jax.random.key(0), jnp.broadcast_to(logits, (20000, 4)))
  freq = np.bincount(np.asarray(draws), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0.1, 0.4, 0.2, 0.3], atol=0.015)


def test_sharded_generation_equals_single_device():
  """Mesh (2, 2, 2): rows on data x fsdp, the model on tensor; greedy and sampled."""
  with x64():
    cfg, module, params = _model()
    single = sampling.Sampler(sampling.PlainDecoder(cfg), params, TOK, batch_size=4)
    mesh = sharding.make_mesh((2, 2, 2))
    abstract = module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    abstract = jax.eval_shape(lambda: abstract)
    shardings = sharding.shardings_for(abstract, mesh)
    sharded_params = jax.device_put(params, shardings)
    sharded = sampling.Sampler(sampling.PlainDecoder(cfg), sharded_params, TOK, mesh=mesh,
                               batch_size=4)
    for cfg_ in (sampling.SamplingConfig(max_new_tokens=8),
                 sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, seed=5)):
      want = single.generate(PROMPTS, cfg_)
      got = sharded.generate(PROMPTS, cfg_)
      assert [g.tokens for g in got] == [g.tokens for g in want]


def test_bad_requests_are_clear_errors():
  cfg, _, params = _model(f64=False)
  sampler = sampling.Sampler(sampling.PlainDecoder(cfg), params, TOK, batch_size=2, max_len=16)
  with pytest.raises(UserError, match="prompt 1 has 16 tokens.*max_len"):
    sampler.generate(["1+1=", "x" * 15], sampling.SamplingConfig(max_new_tokens=4))
  with pytest.raises(UserError, match="prompt 0 is empty"):
    sampler.generate([[]], sampling.SamplingConfig(max_new_tokens=4))
  with pytest.raises(UserError, match="multiple of the mesh's 4 batch shards"):
    sampling.Sampler(sampling.PlainDecoder(cfg), params, TOK, mesh=sharding.make_mesh((2, 2, 2)),
                     batch_size=6)
  for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
              dict(stop="\n")):
    with pytest.raises(UserError):
      sampling.SamplingConfig(**bad)
