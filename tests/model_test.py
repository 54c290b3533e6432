"""Tests of the Mistral-style decoder: sizes, KV-cache decoding, remat, bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import model as model_lib


def _init(cfg, seed=0):
  module = model_lib.Transformer(cfg)
  params = nn.unbox(module.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])
  return module, params


def test_mistral_7b_parameter_count():
  assert model_lib.count_params(model_lib.get_config("mistral_7b")) == 7_241_732_096


def test_variant_sizes():
  assert 0.5e6 < model_lib.count_params(model_lib.get_config("tiny")) < 2e6
  assert 10e6 < model_lib.count_params(model_lib.get_config("small")) < 20e6


def test_unknown_variant_and_bad_fields():
  with pytest.raises(ValueError, match="Unknown model variant 'huge'"):
    model_lib.get_config("huge")
  with pytest.raises(ValueError, match="nope"):
    model_lib.get_config("tiny", nope=1)
  with pytest.raises(ValueError, match="num_kv_heads"):
    model_lib.get_config("tiny", num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    model_lib.get_config("tiny", remat_policy="sometimes")


@pytest.mark.parametrize("window", [None, 5])
def test_kv_cache_decoding_equals_full_forward(window):
  cfg = model_lib.get_config("tiny", sliding_window=window)
  module, params = _init(cfg)
  b, l, prompt = 3, 12, 5
  tokens = jax.random.randint(jax.random.key(1), (b, l), 0, cfg.vocab_size)
  # Row 1 has two padding tokens inside the prompt region: they are never attended.
  mask = jnp.ones((b, l), bool).at[1, 3:5].set(False)
  full = module.apply({"params": params}, tokens, mask)

  decode = jax.jit(lambda p, t, c, m: module.apply({"params": p}, t, c, m,
                                                   method=model_lib.Transformer.decode))
  cache = model_lib.init_cache(cfg, b, 16)
  first, cache = decode(params, tokens[:, :prompt], cache, mask[:, :prompt])
  steps = [first]
  for i in range(prompt, l):
    logits, cache = decode(params, tokens[:, i:i + 1], cache, mask[:, i:i + 1])
    steps.append(logits)
  stepped = jnp.concatenate(steps, axis=1)
  valid = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(stepped)[valid], np.asarray(full)[valid], atol=1e-5)
  assert int(cache.index) == l


def test_padding_keys_are_ignored():
  """Changing a padded token must not change any real position's logits."""
  cfg = model_lib.get_config("tiny")
  module, params = _init(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  mask = jnp.ones((2, 10), bool).at[:, 7:].set(False)
  a = module.apply({"params": params}, tokens, mask)
  b = module.apply({"params": params}, tokens.at[:, 8].set(7), mask)
  np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_does_not_change_values_or_gradients(policy):
  cfg = model_lib.get_config("tiny", num_layers=2)
  module, params = _init(cfg)
  remat = model_lib.Transformer(cfg.replace(remat_policy=policy))
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)

  def loss(m, p):
    logits = m.apply({"params": p}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  (l0, g0), (l1, g1) = [jax.value_and_grad(lambda p, m=m: loss(m, p))(params)
                        for m in (module, remat)]
  np.testing.assert_allclose(l0, l1, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g0, g1)


def test_tied_embeddings_have_no_lm_head():
  cfg = model_lib.get_config("tiny", tie_embeddings=True)
  _, params = _init(cfg)
  assert "lm_head" not in params
  assert model_lib.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_bfloat16_compute_runs_and_returns_fp32_logits():
  cfg = model_lib.get_config("tiny", dtype="bfloat16")
  module, params = _init(cfg)
  logits = module.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert params["embedding"].dtype == jnp.float32
