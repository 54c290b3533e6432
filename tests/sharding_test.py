"""Tests of meshes, logical rules, sharded creation and the sharding checks.

The forward on several meshes is an equivalence test: float64, compared with
`equivalence.assert_close` (1e-9, relative to the compared magnitude; tests/equivalence.py).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxstar import model as model_lib
from jaxstar import sharding
from tests import equivalence
from tests.equivalence import assert_close, assert_far, x64


def test_mesh_fill_and_errors():
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match=r"needs 12 devices, but 8 are available"):
    sharding.make_mesh((2, 2, 3))
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.make_mesh((3, -1, 1))
  with pytest.raises(ValueError, match="3 entries"):
    sharding.make_mesh((8, 1))


def test_logical_to_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.logical_to_spec(("vocab", "embed"), (512, 128), mesh) == PartitionSpec(
      "tensor", "fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (511, 128), mesh) == PartitionSpec(
      None, "fsdp")
  assert sharding.logical_to_spec(("batch", None), (2, 5), mesh) == PartitionSpec("data")
  with pytest.raises(KeyError, match="no_such_axis"):
    sharding.logical_to_spec(("no_such_axis",), (4,), mesh)


def _forward_on_mesh(cfg, tokens, mask, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  module = model_lib.Transformer(cfg)
  init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params, shardings = sharding.create_sharded(init, mesh)
  data = sharding.batch_sharding(mesh)
  tokens, mask = jax.device_put(tokens, data), jax.device_put(mask, data)
  with sharding.use_mesh(mesh):
    fwd = jax.jit(lambda p, t, m: module.apply({"params": p}, t, m),
                  in_shardings=(shardings, data, data))
    logits = fwd(params, tokens, mask)
  return params, shardings, np.asarray(logits)


def test_forward_equal_across_meshes():
  """The same params and batch give the same float64 logits on every mesh (sharded creation,
  sharded matmuls and collectives in float64 on the 8 CPU devices)."""
  with x64():
    cfg = model_lib.get_config("tiny", num_layers=2, sliding_window=6, **equivalence.F64)
    tokens = np.array(jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size,
                                         jnp.int32))
    mask = np.ones((8, 16), bool)
    mask[::3, 12:] = False
    _, _, ref = _forward_on_mesh(cfg, tokens, mask, (1, 1, 1))
    for shape in [(2, 2, 2), (1, 8, 1), (8, 1, 1)]:
      params, shardings, out = _forward_on_mesh(cfg, tokens, mask, shape)
      assert_close(out, ref, f"mesh {shape}")
      # Parameters really are laid out as the rules say, and stay float64.
      assert params["embedding"].sharding == shardings["embedding"]
      assert params["embedding"].dtype == jnp.float64
    assert shardings["layers"]["attn"]["q_proj"].spec == PartitionSpec(None, "fsdp", "tensor")
    # Live: the comparison sees the data (a changed token changes the logits).
    tokens[0, 0] += 1
    _, _, changed = _forward_on_mesh(cfg, tokens, mask, (1, 1, 1))
    assert_far(changed, ref, err_msg="changed token")


def test_report_and_sufficiently_sharded_check():
  cfg = model_lib.get_config("tiny")
  mesh = sharding.make_mesh((1, 4, 2))
  abstract = model_lib.abstract_params(cfg)
  shardings = sharding.shardings_for(abstract, mesh)
  text = sharding.report(abstract, shardings)
  assert "layers/attn/q_proj" in text and "('fsdp', 'tensor')" in text
  sharding.assert_sufficiently_sharded(abstract, shardings, mesh, min_bytes=1 << 16)
  replicated = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec()), shardings)
  with pytest.raises(ValueError, match="embedding"):
    sharding.assert_sufficiently_sharded(abstract, replicated, mesh, min_bytes=1 << 16)
  # A pure data-parallel mesh replicates parameters by design.
  dp = sharding.make_mesh((8, 1, 1))
  sharding.assert_sufficiently_sharded(abstract, sharding.shardings_for(abstract, dp), dp)


def test_mistral_7b_shards_over_a_pod_slice_mesh():
  """The 7B's abstract params map onto a 64-device mesh with nothing large replicated."""
  devices = np.array(jax.devices() * 8)  # shapes only: sharding math, no allocation
  mesh = jax.sharding.Mesh(devices.reshape(2, 8, 4), sharding.MESH_AXES)
  abstract = model_lib.abstract_params(model_lib.get_config("mistral_7b"))
  shardings = sharding.shardings_for(abstract, mesh)
  sharding.assert_sufficiently_sharded(abstract, shardings, mesh)
  q = nn.unbox(abstract)["layers"]["attn"]["q_proj"]
  assert sharding.bytes_per_device(q.shape, q.dtype, shardings["layers"]["attn"]["q_proj"]) == (
      q.size * 4 // 32)
