"""Quiet-STaR: the parallel thought passes against a naive per-position reference, step-0
identities, advantages, and configuration errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar import model as model_lib
from jaxstar.model import attention
from jaxstar.quietstar import config as qs_config
from jaxstar.quietstar import loss as qs_loss
from jaxstar.quietstar import thoughts

START, END, PAD = 259, 260, 2


def _model(n_ahead=5, talk=3, passes=2, qs_kw=None, **cfg_kw):
  cfg = model_lib.get_config("tiny", num_layers=2, **cfg_kw)
  qs = qs_config.QuietStarConfig(n_ahead=n_ahead, n_ahead_talk=talk, n_passes=passes,
                                 **(qs_kw or {}))
  return thoughts.QuietStarModel(cfg, qs, start_id=START, end_id=END, init_id=48, pad_id=PAD)


def _params(model, tokens, seed=0, perturb_mixing=True):
  params = nn.unbox(model.init(jax.random.key(seed), tokens,
                               method=thoughts.QuietStarModel.init_all)["params"])
  if perturb_mixing:  # a trained-looking head, so the mixing weight is not 0
    out = params["mixing"]["out_proj"]["kernel"]
    params["mixing"]["out_proj"]["kernel"] = jax.random.normal(jax.random.key(7), out.shape) * 0.5
    params["start_thought"] = params["start_thought"] + 0.01
  return params


def _batch(b=2, l=8):
  tokens = jax.random.randint(jax.random.key(1), (b, l), 3, 250)
  mask = jnp.ones((b, l), jnp.int32).at[1, l - 2:].set(0)
  tokens = jnp.where(mask > 0, tokens, PAD)
  return tokens, mask


def _naive_rows(model, params, tokens, mask, thoughts_nls):
  """Literally inserts start, the thoughts, end and the true tokens after each real position and
  runs the plain model on each such text. Differentiable in `params`.

  Returns (base_logits [B, L, V], base_hidden [B, L, D], rows: the (n, i) of each text,
  thought_logits [R, S, V] (the logits at start, t_1 .. t_{S-1}), talk_hidden [R, A, D]).
  """
  qs, cfg = model.qs, model.cfg
  lm = model_lib.Transformer(cfg)
  lm_p = params["lm"]
  b, l = tokens.shape
  p, talk, s_n = qs.n_passes, qs.n_ahead_talk, qs.num_sampled
  scale = qs.embedding_scale
  base_logits, base_hidden = lm.apply({"params": lm_p}, tokens, mask > 0, return_hidden=True)
  embed = lambda t: lm.apply({"params": lm_p}, jnp.asarray(t)[None], method=lm.embed)[0]
  seqs, lengths, rows = [], [], []
  for n in range(b * p):
    d = n // p
    for i in range(l):
      if not mask[d, i]:
        continue
      ahead = [int(tokens[d, i + k]) if i + k < l else PAD for k in range(1, talk)]
      x = jnp.concatenate([embed(tokens[d, :i + 1]),
                           params["start_thought"][None] * scale,
                           embed(thoughts_nls[n, i]),
                           params["end_thought"][None] * scale] +
                          ([embed(ahead)] if ahead else []), axis=0)
      seqs.append(x)
      lengths.append(x.shape[0])
      rows.append((n, i))
  max_len = max(lengths)
  x = jnp.stack([jnp.pad(s, ((0, max_len - s.shape[0]), (0, 0))) for s in seqs])
  idx = jnp.arange(max_len)
  causal = attention.visible_keys(idx, idx, None, cfg.sliding_window)
  causal = jnp.broadcast_to(causal, (x.shape[0], max_len, max_len))
  pos = jnp.broadcast_to(idx, x.shape[:2])
  hidden, _ = lm.apply({"params": lm_p}, x, pos, attention.CausalAttend(causal),
                       method=lm.run_layers)
  logits = lm.apply({"params": lm_p}, hidden, method=lm.logits)
  thought_logits = jnp.stack([logits[r, i + 1:i + 1 + s_n] for r, (_, i) in enumerate(rows)])
  first = [i + 1 + s_n + 1 for _, i in rows]                            # the end token
  talk_hidden = jnp.stack([hidden[r, f:f + talk] for r, f in enumerate(first)])
  return base_logits, base_hidden, rows, thought_logits, talk_hidden


def _naive(model, params, tokens, mask, thoughts_nls):
  """`_naive_rows` laid out as [N, L, ...] arrays, NaN where a position is padding."""
  cfg, qs = model.cfg, model.qs
  base_logits, base_hidden, rows, thought_rows, talk_rows = _naive_rows(
      model, params, tokens, mask, thoughts_nls)
  n_rows, l = tokens.shape[0] * qs.n_passes, tokens.shape[1]
  thought_logits = np.full((n_rows, l, qs.num_sampled, cfg.vocab_size), np.nan, np.float32)
  talk_hidden = np.full((n_rows, l, qs.n_ahead_talk, cfg.embed_dim), np.nan, np.float32)
  for r, (n, i) in enumerate(rows):
    thought_logits[n, i] = thought_rows[r]
    talk_hidden[n, i] = talk_rows[r]
  return base_logits, base_hidden, thought_logits, talk_hidden


@pytest.mark.parametrize("chunk", [0, 3])  # passes differentiated as they are; block backward
def test_gradients_match_naive_reference(chunk):
  """The gradients of the thought logits and talk states, through the parallel passes, equal
  those through the naive per-position texts (forced thoughts, padding present, P = 2)."""
  model = _model(qs_kw=dict(chunk_positions=chunk))
  tokens, mask = _batch()
  params = _params(model, tokens)
  n_rows, l, cfg = tokens.shape[0] * 2, tokens.shape[1], model.cfg
  forced = jax.random.randint(jax.random.key(6), (n_rows, l, model.qs.num_sampled), 3, 250)
  proj_v = jax.random.normal(jax.random.key(8), (cfg.vocab_size,)).at[START].set(0).at[END].set(0)
  proj_d = jax.random.normal(jax.random.key(9), (cfg.embed_dim,))
  mask_np = np.asarray(mask)
  rows = _naive_rows(model, params, tokens, mask_np, np.asarray(forced))[2]
  n_idx, i_idx = (np.array(a) for a in zip(*rows))

  def ours(p):
    out = model.apply({"params": p}, tokens, mask, jax.random.key(3), forced_thoughts=forced,
                      return_logits=True)
    return (jnp.sum(out["thought_logits"][n_idx, i_idx] @ proj_v) +
            jnp.sum(out["talk_hidden"][n_idx, i_idx] @ proj_d))

  def naive(p):
    _, _, _, thought_rows, talk_rows = _naive_rows(model, p, tokens, mask_np, np.asarray(forced))
    return jnp.sum(thought_rows @ proj_v) + jnp.sum(talk_rows @ proj_d)

  value, grads = jax.value_and_grad(ours)(params)
  naive_value, naive_grads = jax.value_and_grad(naive)(params)
  np.testing.assert_allclose(value, naive_value, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(naive_grads):
    ours_g = grads
    for key in path:
      ours_g = ours_g[key.key]
    np.testing.assert_allclose(ours_g, g, rtol=1e-4, atol=1e-4,
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads["start_thought"]).sum()) > 0  # a live comparison


@pytest.mark.parametrize("chunk", [0, 3])  # all positions at once; 3 chunks, the last padded
def test_parallel_thoughts_match_naive_reference(chunk):
  model = _model(qs_kw=dict(chunk_positions=chunk))
  tokens, mask = _batch()
  params = _params(model, tokens)
  out = model.apply({"params": params}, tokens, mask, jax.random.key(3), return_logits=True)
  base_logits, base_hidden, thought_logits, talk_hidden = _naive(
      model, params, tokens, np.asarray(mask), np.asarray(out["thoughts"]))
  real = np.repeat(np.asarray(mask) > 0, 2, axis=0)
  np.testing.assert_allclose(out["base_logits"], base_logits, atol=1e-4)
  masked = thoughts.mask_thought_ids(jnp.asarray(thought_logits), (START, END))
  np.testing.assert_allclose(np.asarray(out["thought_logits"])[real], np.asarray(masked)[real],
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["talk_hidden"])[real], talk_hidden[real], atol=1e-4)

  # Every loss term from the naive states equals the parallel one.
  qs, p, talk = model.qs, 2, 3
  l = tokens.shape[1]
  w_dv = params["lm"]["lm_head"]
  base_rolled = np.stack([np.roll(base_hidden, -k, axis=1) for k in range(talk)], axis=2)
  base_rolled = np.repeat(base_rolled, p, axis=0)
  talk_hidden = np.where(np.isnan(talk_hidden), 0.0, talk_hidden)  # padded branches: unscored
  w = model.apply({"params": params}, jnp.asarray(base_rolled), jnp.asarray(talk_hidden),
                  method=lambda m, a, b: m.mixing(a, b))
  targets = np.repeat(np.stack([np.roll(tokens, -k, axis=1) for k in range(1, talk + 1)], 2),
                      p, axis=0)
  naive_out = dict(
      base_ce=thoughts.token_ce(base_hidden, w_dv, jnp.roll(tokens, -1, axis=1), False),
      talk_ce=thoughts.token_ce((1 - w) * base_rolled + w * talk_hidden, w_dv,
                                jnp.asarray(targets), False),
      thought_logprob=jnp.take_along_axis(
          jax.nn.log_softmax(masked / qs.reinforce_temperature, axis=-1),
          out["thoughts"][..., None], axis=-1)[..., 0],
      mix_weight=w[..., 0])
  total, metrics = qs_loss.quietstar_loss(out, mask, qs)
  naive_total, naive_metrics = qs_loss.quietstar_loss(
      {k: jnp.where(jnp.isnan(v), 0.0, v) for k, v in naive_out.items()}, mask, qs)
  for key in ("nll", "base_loss", "talk_loss", "reward_mean", "reward_std"):
    np.testing.assert_allclose(metrics[key], naive_metrics[key], atol=1e-4, err_msg=key)
  # The policy term is scaled by 1e6; compare it unscaled.
  np.testing.assert_allclose(metrics["policy_loss"], naive_metrics["policy_loss"], atol=1e-4)
  assert float(metrics["reward_std"]) > 0  # the mixing head is active: a real comparison
  del total, naive_total, l


def test_step_zero_identities_and_gradients():
  model = _model()
  tokens, mask = _batch()
  params = _params(model, tokens, perturb_mixing=False)
  out = model.apply({"params": params}, tokens, mask, jax.random.key(4), return_logits=True)
  base = np.repeat(np.asarray(out["base_logits"]), 2, axis=0)
  talk = np.asarray(out["talk_logits"])
  for k in range(3):
    np.testing.assert_allclose(talk[:, :8 - k - 1, k], base[:, k:7], atol=1e-5)
  total, metrics = qs_loss.quietstar_loss(out, mask, model.qs)
  np.testing.assert_allclose(metrics["reward_mean"], 0.0, atol=1e-5)
  assert float(metrics["policy_loss"]) == 0.0 and float(metrics["positive_advantage_share"]) == 0.0

  def loss_fn(p):
    o = model.apply({"params": p}, tokens, mask, jax.random.key(4))
    return qs_loss.quietstar_loss(o, mask, model.qs)[0]
  grads = jax.grad(loss_fn)(params)
  norm = lambda t: float(optax_norm(t))
  assert norm(grads["mixing"]["out_proj"]) > 0
  for name in ("in_proj", "hidden_proj"):
    assert norm(grads["mixing"][name]) == 0.0, name
  assert norm(grads["start_thought"]) == 0.0 and norm(grads["end_thought"]) == 0.0
  assert norm(grads["lm"]) > 0
  del total


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_two_passes_give_one_positive_advantage_per_position():
  r = jax.random.normal(jax.random.key(0), (6, 9))  # 3 documents x 2 adjacent copies
  adv = np.asarray(qs_loss.advantages(r, passes=2))
  pairs = adv.reshape(3, 2, 9)
  differ = np.ptp(np.asarray(r).reshape(3, 2, 9), axis=1) > 0
  assert np.all((pairs > 0).sum(axis=1)[differ] == 1)
  np.testing.assert_allclose(pairs.max(axis=1), np.abs(np.diff(np.asarray(r).reshape(3, 2, 9),
                                                                axis=1))[:, 0] / 2, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(n_ahead=3), "n_ahead=3 must be >= 4"),
    (dict(n_ahead_talk=0), "n_ahead_talk=0 must be >= 1"),
    (dict(n_passes=0), "n_passes=0 must be >= 1"),
    (dict(reward_reduction="max"), "reward_reduction"),
    (dict(chunk_positions=-1), "chunk_positions=-1 must be >= 0"),
    (dict(chunk_remat="some"), "chunk_remat='some'"),
])
def test_bad_config_is_a_clear_error(kw, message):
  with pytest.raises(ValueError, match=message):
    qs_config.QuietStarConfig(**kw)


def test_sequence_too_short_for_talk():
  with pytest.raises(ValueError, match="seq_len=5 is too short for quietstar.n_ahead_talk=4"):
    qs_config.QuietStarConfig(n_ahead_talk=4).check_seq_len(5)


def _train_step(model, mesh):
  import chex  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  from jaxstar import train_lib  # pylint: disable=g-import-not-at-top
  # Clipped SGD: the update is proportional to the gradient, so equal gradients give equal
  # parameters (Adam's sign-like first step would amplify float-level noise).
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2))

  def loss_fn(params, batch, rng):
    out = model.apply({"params": params}, batch["tokens"], batch["mask"], rng)
    return qs_loss.quietstar_loss(out, batch["mask"], model.qs)

  def init(rng):
    params = model.init(rng, jnp.zeros((1, 2), jnp.int32), method=thoughts.QuietStarModel.init_all)
    params = params["params"]
    # A trained-looking mixing head: rewards well above float noise, a live policy term.
    box = params["mixing"]["out_proj"]["kernel"]
    params["mixing"]["out_proj"]["kernel"] = box.replace_boxed(
        jax.random.normal(jax.random.key(7), box.value.shape))
    return train_lib.init_train_state(params, optimizer, 0)

  state, shardings = sharding.create_sharded(init, mesh, jax.random.key(0))
  step = chex.assert_max_traces(train_lib.make_train_step(loss_fn, optimizer), n=1)
  data = sharding.batch_sharding(mesh)
  with sharding.use_mesh(mesh):
    jitted = jax.jit(step, in_shardings=(shardings, data), out_shardings=(shardings, None),
                     donate_argnums=0)
  return state, jitted, data


def test_sharded_step_equals_unsharded_and_traces_once():
  import chex  # pylint: disable=g-import-not-at-top
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  model = _model(n_ahead=5, talk=2, qs_kw=dict(chunk_positions=4))  # a scan of 2 chunks
  tokens, mask = _batch(b=4, l=8)
  results = []
  for shape in [(1, 1, 1), (2, 2, 2)]:
    chex.clear_trace_counter()  # each mesh gets its own jitted step, traced once
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    state, step, data = _train_step(model, mesh)
    if shape == (2, 2, 2):  # parameters really are sharded
      spec = state.params["lm"]["layers"]["mlp"]["up_proj"].sharding.spec
      assert tuple(spec) == (None, "fsdp", "tensor")
    batch = jax.device_put({"tokens": tokens, "mask": mask}, data)
    with sharding.use_mesh(mesh):
      state, m1 = step(state, batch)
      state, m2 = step(state, batch)  # a second call must not retrace
    results.append((jax.device_get(state.params),
                    [float(m[k]) for m in (m1, m2) for k in ("nll", "policy_loss", "grad_norm")]))
  (p0, l0), (p1, l1) = results
  # Losses unscaled (the policy term enters the total x 1e6); grad norms are ~1e3, so relative.
  np.testing.assert_allclose(l0, l1, atol=1e-4, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), p0, p1)
  assert l0[1] > 1e-3 and l0[4] > 1e-3  # live policy terms: the comparison covers them


def test_single_pass_uses_the_raw_reward():
  r = jnp.array([[0.5, -0.2, 0.0]])
  np.testing.assert_array_equal(qs_loss.advantages(r, passes=1), [[0.5, 0.0, 0.0]])


@pytest.mark.parametrize("qs_kw", [
    dict(remat_logits=True),
    dict(chunk_positions=3),
    dict(chunk_positions=4, chunk_remat="full"),
    dict(chunk_positions=1, chunk_remat="dots_no_batch"),
])
def test_memory_options_change_neither_loss_nor_gradients(qs_kw):
  model = _model(n_ahead=5, talk=2, qs_kw=dict(chunk_positions=0))
  other = _model(n_ahead=5, talk=2, qs_kw=qs_kw)
  tokens, mask = _batch()
  params = _params(model, tokens)
  forced = jax.random.randint(jax.random.key(6), (4, 8, model.qs.num_sampled), 3, 250)

  def loss(m, p):  # the policy term unscaled, so both parts weigh alike
    out = m.apply({"params": p}, tokens, mask, jax.random.key(5), forced_thoughts=forced)
    metrics = qs_loss.quietstar_loss(out, mask, m.qs)[1]
    return metrics["nll"] + metrics["policy_loss"], metrics
  (l0, m0), g0 = jax.value_and_grad(lambda p: loss(model, p), has_aux=True)(params)
  (l1, m1), g1 = jax.value_and_grad(lambda p: loss(other, p), has_aux=True)(params)
  assert float(m0["policy_loss"]) != 0.0  # a live policy term: the comparison covers it
  for key in ("nll", "policy_loss", "reward_mean", "mix_weight_mean"):
    np.testing.assert_allclose(m0[key], m1[key], atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g0, g1)
