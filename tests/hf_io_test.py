"""Tests for jaxstar/model/hf_io.py: parity with transformers' Mistral, export, bad checkpoints.

Parity is an equivalence test: both models run in float64 (ours under x64 with float64 params,
transformers' `.double()` with its float32 casts widened, see `_hf_float64`) and logits compare
with `equivalence.assert_close` (1e-9, relative to the compared magnitude; tests/equivalence.py).
Checkpoints stay float32 files: float32 weights are exact in float64.
"""
import contextlib
import copy
import json
import os
import re
import types

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from transformers.models.mistral import modeling_mistral

from jaxstar import sharding
from jaxstar.model import Transformer, abstract_params, hf_io
from tests import equivalence
from tests.equivalence import assert_close, assert_far, x64

SEQ = 12


def _hf_config(**kw):
  base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=5,
              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
              initializer_range=0.1, tie_word_embeddings=False)
  return transformers.MistralConfig(**{**base, **kw}, attn_implementation='eager')


def _hf_model(seed, **kw):
  """A random fp32 HF Mistral; norms are perturbed so that a swapped norm mapping shows."""
  torch.manual_seed(seed)
  model = transformers.MistralForCausalLM(_hf_config(**kw)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
  return model


def _batch():
  """3 rows, right padded: row 0 full, row 1 pads from 9, row 2 from 5 (shorter than the window)."""
  tokens = np.random.default_rng(0).integers(0, 256, (3, SEQ))
  mask = np.ones((3, SEQ), bool)
  mask[1, 9:] = False
  mask[2, 5:] = False
  return tokens, mask


class _Float64Torch(types.ModuleType):
  """`torch` as modeling_mistral sees it inside `_hf_float64`: float32 is float64."""
  float32 = float = torch.float64

  def __getattr__(self, name):
    return getattr(torch, name)


@contextlib.contextmanager
def _hf_float64():
  """Transformers' Mistral casts to float32 for RMSNorm, the attention softmax and RoPE's
  inverse frequencies and cos/sin, even in a `.double()` model (a float32 floor of ~1e-7 on the
  logits). Inside this context those casts in modeling_mistral are to float64 instead."""
  saved = modeling_mistral.torch
  modeling_mistral.torch = _Float64Torch("torch")
  try:
    yield
  finally:
    modeling_mistral.torch = saved


def _hf_logits(model, tokens, mask):
  """Logits of a float64 copy of the HF `model`, computed in float64 throughout."""
  with _hf_float64(), torch.no_grad():
    wide = copy.deepcopy(model).double()
    rotary = wide.model.rotary_emb
    assert rotary.rope_type == 'default'
    # Built in float32 at construction; recomputed by HF's own function, now in float64.
    rotary.inv_freq = type(rotary).compute_default_rope_parameters(wide.config)[0]
    assert rotary.inv_freq.dtype == torch.float64
    out = wide(input_ids=torch.tensor(tokens),
               attention_mask=torch.tensor(mask.astype(np.int64)))
  assert out.logits.dtype == torch.float64
  return out.logits.numpy()


def _our_logits(cfg, params, tokens, mask):
  """Our logits; call inside `x64()` with a float64 cfg and params."""
  return np.asarray(Transformer(cfg).apply({'params': params}, jnp.asarray(tokens),
                                           jnp.asarray(mask)))


def _assert_logits_close(ours, ref, mask, what):
  assert ref.std() > 0.3, 'logits too small for the comparison to mean anything'
  err = np.abs(ours - ref) / np.abs(ref).max()
  print(f'\n{what}: max |logits - HF| / max |HF| = {err[mask].max():.3g} (tokens), '
        f'{err[~mask].max():.3g} (padding)')
  assert_close(ours[mask], ref[mask], f'{what}: non-padding positions')
  assert_close(ours[~mask], ref[~mask], f'{what}: padding positions')


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')


def _random_params(cfg, seed):
  """Our own random params (not from HF), large enough to give O(1) logits."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(abstract_params(cfg), sep='/')  # boxed leaves
  out = {}
  for key, leaf in flat.items():
    shape = leaf.value.shape
    out[key] = (1 + 0.2 * rng.standard_normal(shape) if key.endswith('scale')
                else 0.1 * rng.standard_normal(shape)).astype(np.float32)
  return flax.traverse_util.unflatten_dict(out, sep='/')


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """(folder, model): an untied random Mistral saved by transformers as safetensors."""
  model = _hf_model(0)
  folder = str(tmp_path_factory.mktemp('hf'))
  model.save_pretrained(folder, safe_serialization=True)
  return folder, model


def test_import_matches_transformers(hf_dir):
  folder, model = hf_dir
  cfg = hf_io.config_from_hf(folder)
  assert cfg.sliding_window == 5 and cfg.num_kv_heads == 2 and cfg.norm_eps == 1e-5
  tokens, mask = _batch()
  with x64():
    cfg = hf_io.config_from_hf(folder, **equivalence.F64)
    ours = _our_logits(cfg, hf_io.load_hf_params(folder, dtype=np.float64), tokens, mask)
  ref = _hf_logits(model, tokens, mask)
  _assert_logits_close(ours, ref, mask, 'import')
  # Live: a 1e-4 change of one norm's weights in HF is far outside the tolerance.
  changed = copy.deepcopy(model)
  with torch.no_grad():
    changed.model.layers[1].post_attention_layernorm.weight.mul_(1 + 1e-4)
  assert_far(_hf_logits(changed, tokens, mask), ref, err_msg='one norm changed by 1e-4')


def test_import_tied_checkpoint(tmp_path):
  model = _hf_model(1, tie_word_embeddings=True)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  assert 'lm_head.weight' not in hf_io.open_safetensors(str(tmp_path))
  tokens, mask = _batch()
  ref = _hf_logits(model, tokens, mask)
  with x64():
    cfg = hf_io.config_from_hf(str(tmp_path), **equivalence.F64)
    assert cfg.tie_embeddings
    params = hf_io.load_hf_params(str(tmp_path), dtype=np.float64)
    assert 'lm_head' not in params
    _assert_logits_close(_our_logits(cfg, params, tokens, mask), ref, mask, 'tied import')
    # Loading a tied checkpoint into an untied model starts the head as the embedding.
    untied = cfg.replace(tie_embeddings=False)
    params = hf_io.load_hf_params(str(tmp_path), cfg=untied, dtype=np.float64)
    np.testing.assert_array_equal(np.asarray(params['lm_head']),
                                  np.asarray(params['embedding']).T)
    _assert_logits_close(_our_logits(untied, params, tokens, mask), ref, mask, 'untied import')


@pytest.mark.parametrize('max_shard_bytes', [5e9, 40_000])
def test_export_loads_in_transformers(tmp_path, max_shard_bytes):
  cfg = hf_io.config_from_hf(_hf_config().to_dict())
  params = _random_params(cfg, seed=2)
  written = hf_io.save_hf(params, cfg, str(tmp_path), max_shard_bytes=max_shard_bytes)
  shards = sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))
  if max_shard_bytes < 1e6:
    assert len(shards) > 2 and os.path.basename(written[-2]) == hf_io.INDEX_FILE
    index = json.load(open(tmp_path / hf_io.INDEX_FILE))
    assert sorted(set(index['weight_map'].values())) == shards
    assert len(index['weight_map']) == 3 + 9 * cfg.num_layers
  else:
    assert shards == ['model.safetensors']
  model = transformers.MistralForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation='eager').float().eval()
  assert model.config.sliding_window == 5 and model.config.rms_norm_eps == 1e-5
  tokens, mask = _batch()
  with x64():  # the float32 params in float64: exactly the values that were written
    ours = _our_logits(cfg.replace(**equivalence.F64),
                       jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params), tokens, mask)
  _assert_logits_close(ours, _hf_logits(model, tokens, mask), mask,
                       f'export (max_shard_bytes={max_shard_bytes:g}, {len(shards)} files)')
  # And back: a float32 round trip is exact.
  back = hf_io.load_hf_params(str(tmp_path))
  for key, value in _flat(params).items():
    np.testing.assert_array_equal(_flat(back)[key], value, err_msg=key)


def test_export_bfloat16_and_overwrite(tmp_path):
  cfg = hf_io.config_from_hf(_hf_config().to_dict())
  params = _random_params(cfg, seed=3)
  hf_io.save_hf(params, cfg, str(tmp_path), max_shard_bytes=40_000)
  with pytest.raises(FileExistsError, match='overwrite=True'):
    hf_io.save_hf(params, cfg, str(tmp_path))
  # Overwriting with one file removes the stale shards and index, which would shadow it.
  hf_io.save_hf(params, cfg, str(tmp_path), dtype='bfloat16', overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']
  assert json.load(open(tmp_path / 'config.json'))['torch_dtype'] == 'bfloat16'
  assert hf_io.open_safetensors(str(tmp_path))['lm_head.weight'].dtype == ml_dtypes.bfloat16
  back = hf_io.load_hf_params(str(tmp_path))
  for key, value in _flat(params).items():
    want = value.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(_flat(back)[key], want, err_msg=key)


def test_config_fields_and_rope_spellings():
  hf = _hf_config().to_dict()
  hf.pop('rope_theta', None)
  hf['rope_parameters'] = {'rope_theta': 500000.0, 'rope_type': 'default'}
  cfg = hf_io.config_from_hf(hf)
  assert (cfg.rope_theta, cfg.embed_dim, cfg.mlp_dim, cfg.num_layers, cfg.num_heads,
          cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.max_len, cfg.sliding_window,
          cfg.tie_embeddings) == (500000.0, 64, 128, 2, 4, 2, 16, 256, 64, 5, False)
  old = {k: v for k, v in hf.items() if k != 'rope_parameters'}
  old.update(rope_theta=1e6, head_dim=None, sliding_window=None, rope_scaling=None)
  cfg = hf_io.config_from_hf(old, dtype='bfloat16')
  assert (cfg.rope_theta, cfg.head_dim, cfg.sliding_window, cfg.dtype) == (
      1e6, 16, None, 'bfloat16')
  assert hf_io.config_from_hf({**old, 'model_type': 'llama'}).rope_theta == 1e6
  # Our export writes both spellings; they read back to the same config.
  assert hf_io.config_from_hf(hf_io.hf_config_dict(cfg)) == cfg.replace(dtype='float32')


@pytest.mark.parametrize('change, message', [
    ({'model_type': 'gpt2'}, "model_type='gpt2' is not supported"),
    ({'rope_parameters': {'rope_theta': 1e4, 'rope_type': 'linear', 'factor': 2.0}},
     "RoPE type 'linear' is not supported"),
    ({'rope_scaling': {'type': 'dynamic', 'factor': 2.0}}, "RoPE type 'dynamic'"),
    ({'attention_bias': True}, 'attention_bias=true is not supported'),
    ({'hidden_size': None}, "missing required field(s) ['hidden_size']"),
])
def test_config_rejects_unsupported(change, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    hf_io.config_from_hf({**_hf_config().to_dict(), **change})


def test_vocab_growth(hf_dir):
  folder, _ = hf_dir
  base = hf_io.load_hf_params(folder)
  grown = hf_io.load_hf_params(folder, vocab_size=258, rng_seed=7)
  emb, head = np.asarray(grown['embedding']), np.asarray(grown['lm_head'])
  assert emb.shape == (258, 64) and head.shape == (64, 258)
  np.testing.assert_array_equal(emb[:256], np.asarray(base['embedding']))
  np.testing.assert_array_equal(head[:, :256], np.asarray(base['lm_head']))
  new = np.concatenate([emb[256:].ravel(), head[:, 256:].ravel()])  # 256 draws
  assert abs(new.mean()) < 0.006 and 0.015 < new.std() < 0.025, (new.mean(), new.std())
  assert not np.allclose(emb[256:], head[:, 256:].T)  # independent draws for the two matrices
  again = hf_io.load_hf_params(folder, vocab_size=258, rng_seed=7)
  np.testing.assert_array_equal(np.asarray(again['embedding']), emb)
  other = hf_io.load_hf_params(folder, vocab_size=258, rng_seed=8)
  assert not np.array_equal(np.asarray(other['embedding'])[256:], emb[256:])
  with pytest.raises(ValueError, match='smaller than the checkpoint'):
    hf_io.load_hf_params(folder, vocab_size=255)


def test_load_into_sharded_mesh(hf_dir):
  folder, _ = hf_dir
  mesh = sharding.make_mesh((2, 2, 2))
  cfg = hf_io.config_from_hf(folder, vocab_size=258)
  want = sharding.shardings_for(abstract_params(cfg), mesh)
  params = hf_io.load_hf_params(folder, cfg=cfg, mesh=mesh, rng_seed=3)
  q = params['layers']['attn']['q_proj']
  assert q.sharding == want['layers']['attn']['q_proj']
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)  # [NL, D/fsdp, H/tensor, E]
  assert params['lm_head'].sharding.spec == want['lm_head'].spec
  plain = hf_io.load_hf_params(folder, cfg=cfg, rng_seed=3)
  for key, value in _flat(plain).items():
    np.testing.assert_array_equal(_flat(params)[key], value, err_msg=key)
  # Explicit shardings give the same arrays, and a wrong tree is named.
  again = hf_io.load_hf_params(folder, cfg=cfg, shardings=want, rng_seed=3)
  np.testing.assert_array_equal(np.asarray(again['embedding']), np.asarray(plain['embedding']))
  with pytest.raises(ValueError, match='shardings tree does not match'):
    hf_io.load_hf_params(folder, cfg=cfg, shardings={'embedding': want['embedding']})


def _rewrite(src, dst, edit):
  """Copies checkpoint `src` to `dst` (one file, fp32) with `edit` applied to its tensor dict."""
  tensors = {k: np.array(v) for k, v in hf_io.open_safetensors(src).items()}
  edit(tensors)
  os.makedirs(dst, exist_ok=True)
  hf_io.save_safetensors(os.path.join(dst, 'model.safetensors'), tensors)
  with open(os.path.join(src, 'config.json')) as f:
    config = f.read()
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    f.write(config)
  return str(dst)


def test_missing_tensor_is_named(hf_dir, tmp_path):
  name = 'model.layers.1.mlp.up_proj.weight'
  folder = _rewrite(hf_dir[0], tmp_path / 'ckpt', lambda t: t.pop(name))
  with pytest.raises(ValueError) as e:
    hf_io.load_hf_params(folder)
  assert name in str(e.value) and folder in str(e.value) and 'lacks' in str(e.value)


def test_wrong_shape_is_named(hf_dir, tmp_path):
  name = 'model.layers.0.self_attn.k_proj.weight'
  def edit(t):
    t[name] = np.zeros((16, 64), np.float32)
  folder = _rewrite(hf_dir[0], tmp_path / 'ckpt', edit)
  with pytest.raises(ValueError) as e:
    hf_io.load_hf_params(folder)
  assert f'tensor {name} has shape [16, 64], expected [32, 64]' in str(e.value)


def test_unused_tensor_is_refused(hf_dir, tmp_path):
  def edit(t):
    t['model.layers.0.self_attn.q_proj.bias'] = np.zeros((64,), np.float32)
  folder = _rewrite(hf_dir[0], tmp_path / 'ckpt', edit)
  with pytest.raises(ValueError, match=r"not use: \['model.layers.0.self_attn.q_proj.bias'\]"):
    hf_io.load_hf_params(folder)


def test_pickle_only_folder_is_refused(hf_dir, tmp_path):
  with open(os.path.join(hf_dir[0], 'config.json')) as f:
    (tmp_path / 'config.json').write_text(f.read())
  # Not a real pickle: the loader must refuse by name and never try to open it.
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not a pickle')
  with pytest.raises(ValueError) as e:
    hf_io.load_hf_params(str(tmp_path))
  msg = str(e.value)
  assert 'pytorch_model.bin' in msg and 'save_pretrained' in msg
  assert 'safe_serialization=True' in msg


def test_corrupt_files_are_refused(hf_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='no model.safetensors'):
    hf_io.open_safetensors(str(tmp_path))
  data = open(os.path.join(hf_dir[0], 'model.safetensors'), 'rb').read()
  (tmp_path / 'model.safetensors').write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match='do not fit its size or the file'):
    hf_io.open_safetensors(str(tmp_path))
  (tmp_path / 'model.safetensors').write_bytes(b'\x00' * 4)
  with pytest.raises(ValueError, match='not a safetensors file or is truncated'):
    hf_io.open_safetensors(str(tmp_path))
  (tmp_path / hf_io.INDEX_FILE).write_text(json.dumps(
      {'weight_map': {'model.norm.weight': 'model-00002-of-00002.safetensors'}}))
  with pytest.raises(FileNotFoundError, match='lists shard model-00002-of-00002.safetensors'):
    hf_io.open_safetensors(str(tmp_path))
