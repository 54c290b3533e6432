"""Tests of jaxstar.checkpoint on the 8-device CPU mesh: round trips, resharding, rotation,
corrupt and half-written steps, `restore_params`."""
import logging
import pathlib
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxstar.data
import jaxstar.tokenizer
from jaxstar import checkpoint
from jaxstar.sharding import make_mesh

# When orbax reads a corrupt step, the failing read aborts its private event loop while other
# tensorstore reads still complete later into that closed loop; harmless, reported at GC time.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")

# Per-shape partition specs on the save mesh (8,1,1) and on the restore mesh (2,2,2).
SPECS_811 = {(8, 16): P("data", None), (4, 8): P(None, "data")}
SPECS_222 = {(8, 16): P(("data", "fsdp"), "tensor"), (4, 8): P("tensor", "data"),
             (16,): P("tensor")}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


@pytest.fixture(scope="module")
def meshes():
  return make_mesh((8, 1, 1)), make_mesh((2, 2, 2))


def _shardings(tree, mesh, specs):
  return jax.tree.map(lambda x: NamedSharding(mesh, specs.get(tuple(x.shape), P())), tree)


def _make_state(mesh, seed=0, as_struct=False):
  """params + an adamw state after one update (non-zero moments) + a typed key, on `mesh`."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(k1, (8, 16)), "b": jnp.arange(16, dtype=jnp.float32) + seed,
            "embed": {"table": jax.random.normal(k2, (4, 8), jnp.bfloat16)}}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  parts = dict(step=jnp.array(seed + 7, jnp.int32), params=params, opt_state=opt_state, rng=k3)
  state = TrainState(**parts) if as_struct else parts
  return jax.device_put(state, _shardings(state, mesh, SPECS_811))


def _abstract(state, mesh, specs):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, _shardings(state, mesh, specs))


def _host(tree):
  """Host copies; typed keys as their raw key data, so comparisons are bitwise."""
  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return np.asarray(jax.random.key_data(x))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _assert_trees_equal(actual, expected_host):
  assert jax.tree.structure(_host(actual)) == jax.tree.structure(expected_host)
  for a, e in zip(jax.tree.leaves(_host(actual)), jax.tree.leaves(expected_host)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


def _pipeline():
  return jaxstar.data.lm_dataset(jaxstar.data.synthetic_docs(50),
                                 jaxstar.tokenizer.get_tokenizer("bytes"),
                                 seq_len=32, global_batch_size=4)


def _listing(path):
  return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1)
                for p in pathlib.Path(path).rglob("*"))


def test_round_trip_async_with_iterator_and_config(tmp_path, meshes):
  mesh, _ = meshes
  state = _make_state(mesh)
  expected = _host(state)
  pipeline = _pipeline()
  it = pipeline.iterator()
  for _ in range(3):
    next(it)
  config = {"model": {"variant": "tiny", "dims": (2, 3)}, "lr": 1e-3, "name": "run"}
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=5, async_save=True)
  assert ckpt.save(5, state, data_iter=it, config=config)
  # What a trainer does right after an async save: advance the data, donate the state.
  upcoming = [next(it) for _ in range(2)]
  jax.tree.map(lambda x: x.delete(), state)
  ckpt.wait()
  ckpt.wait()
  assert ckpt.latest_step() == 5

  fresh_it = pipeline.iterator()
  target = _abstract(_make_state(mesh), mesh, SPECS_811)
  restored, step = ckpt.restore(target, data_iter=fresh_it)
  assert step == 5
  _assert_trees_equal(restored, expected)
  assert jax.tree.structure(restored) == jax.tree.structure(target)  # optax namedtuples, not lists
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(jax.random.key(0))
  for batch in upcoming:
    got = next(fresh_it)
    for k in batch:
      np.testing.assert_array_equal(got[k], batch[k])
  assert ckpt.restore_config() == {"model": {"variant": "tiny", "dims": [2, 3]}, "lr": 1e-3,
                                   "name": "run"}
  ckpt.close()
  ckpt.close()
  ckpt.wait()
  with pytest.raises(RuntimeError, match="closed"):
    ckpt.save(10, restored)


def test_restore_onto_another_mesh(tmp_path, meshes):
  mesh_811, mesh_222 = meshes
  state = _make_state(mesh_811, seed=1)
  expected = _host(state)
  with checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False) as ckpt:
    ckpt.save(1, state)
  target = _abstract(state, mesh_222, SPECS_222)
  with checkpoint.Checkpointer(str(tmp_path), save_every=1) as ckpt:
    restored, step = ckpt.restore(target)
  assert step == 1
  _assert_trees_equal(restored, expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  assert restored["params"]["w"].sharding.spec == P(("data", "fsdp"), "tensor")
  assert restored["params"]["w"].addressable_shards[0].data.shape == (2, 8)


def test_keep_latest_and_should_save(tmp_path, meshes):
  state = _make_state(meshes[0])
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=2, keep=2, async_save=True)
  assert ckpt.latest_step() is None
  assert [ckpt.should_save(s) for s in range(5)] == [True, False, True, False, True]
  assert not ckpt.save(3, state)  # not due
  for step in (2, 4, 6):
    assert ckpt.save(step, state)
  assert ckpt.save(7, state, force=True)
  assert not ckpt.save(7, state, force=True)  # already saved: never overwritten
  ckpt.close()
  assert ckpt.all_steps() == [6, 7]
  assert ckpt.latest_step() == 7
  with checkpoint.Checkpointer(str(tmp_path), save_every=0) as never:
    assert not never.should_save(0)
  with pytest.raises(ValueError, match="keep"):
    checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=0)


def _truncate_data(step_dir):
  files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
  assert files
  for p in files:
    with open(p, "r+b") as f:
      f.truncate(p.stat().st_size // 2)
  return "OUT_OF_RANGE"


def _delete_manifest(step_dir):
  (step_dir / "state" / "manifest.ocdbt").unlink()
  return "NOT_FOUND"


def _remove_state_item(step_dir):
  shutil.rmtree(step_dir / "state")
  return "no 'state' item"


@pytest.mark.parametrize("corrupt", [_truncate_data, _delete_manifest, _remove_state_item])
def test_corrupt_newest_step_falls_back_and_is_kept(tmp_path, meshes, caplog, corrupt):
  mesh = meshes[0]
  states = {1: _make_state(mesh, seed=1), 2: _make_state(mesh, seed=2)}
  expected = _host(states[1])
  with checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, config={"step": step})
  problem = corrupt(tmp_path / "2")
  before = _listing(tmp_path)

  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=3)
  assert ckpt.latest_step() == 2  # finalized, though unreadable
  target = _abstract(states[1], mesh, SPECS_811)
  with caplog.at_level(logging.WARNING):
    restored, step = ckpt.restore(target)
  assert step == 1
  _assert_trees_equal(restored, expected)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and "checkpoint step 2" in r.getMessage()]
  assert len(warnings) == 1 and str(tmp_path) in warnings[0] and problem in warnings[0]
  assert not ckpt.save(2, restored, force=True)  # the unreadable step is not overwritten
  ckpt.wait()
  assert _listing(tmp_path) == before  # nothing deleted or rewritten
  with pytest.raises(ValueError, match="step 2 .* cannot be restored"):
    ckpt.restore(target, step=2)

  _remove_state_item(tmp_path / "1")
  with pytest.raises(checkpoint.NoGoodCheckpointError, match="step 2: .*step 1: .*no 'state'"):
    ckpt.restore(target)
  assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()
  ckpt.close()


def test_half_written_step_is_invisible(tmp_path, meshes, caplog):
  state = _make_state(meshes[0])
  with checkpoint.Checkpointer(str(tmp_path), save_every=1, async_save=False) as ckpt:
    ckpt.save(1, state)
  # What a run killed during the write of step 2 leaves: orbax's unrenamed temporary folder.
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1712345678901")
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  with caplog.at_level(logging.WARNING):
    _, step = ckpt.restore(_abstract(state, meshes[0], SPECS_811))
  assert step == 1
  assert not [r for r in caplog.records if "checkpoint step" in r.getMessage()]
  ckpt.close()
  assert (tmp_path / "2.orbax-checkpoint-tmp-1712345678901").is_dir()  # not cleaned up


def test_no_checkpoint_and_bad_arguments(tmp_path, meshes):
  state = _make_state(meshes[0])
  target = _abstract(state, meshes[0], SPECS_811)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "empty"), save_every=1)
  assert ckpt.latest_step() is None
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty") as info:
    ckpt.restore(target)
  assert not isinstance(info.value, checkpoint.NoGoodCheckpointError)
  with pytest.raises(FileNotFoundError, match="step 3"):
    ckpt.restore(target, step=3)
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*missing"):
    checkpoint.restore_params(str(tmp_path / "missing"), target["params"])
  assert not (tmp_path / "missing").exists()  # read-only: not even created
  unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with pytest.raises(ValueError, match="no sharding"):
    ckpt.restore(unsharded)
  with pytest.raises(TypeError, match="JSON"):
    ckpt.save(1, state, config={"bad": object()})
  ckpt.close()


def test_restore_params_from_another_run(tmp_path, meshes):
  mesh_811, mesh_222 = meshes
  other = tmp_path / "other_run"
  old, new = _make_state(mesh_811, seed=3, as_struct=True), _make_state(mesh_811, seed=4,
                                                                         as_struct=True)
  expected = _host(new.params)
  with checkpoint.Checkpointer(str(other), save_every=1, async_save=False) as ckpt:
    ckpt.save(10, old)
    ckpt.save(20, new)
  before = _listing(other)
  abstract_params = _abstract(new.params, mesh_222, SPECS_222)
  params = checkpoint.restore_params(str(other), abstract_params)
  _assert_trees_equal(params, expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract_params)):
    assert got.sharding == want.sharding
  _assert_trees_equal(checkpoint.restore_params(str(other), abstract_params, step=10),
                      _host(old.params))
  assert _listing(other) == before


def test_arrays_that_do_not_fit_the_model_are_named(tmp_path, meshes):
  mesh = meshes[0]
  state = _make_state(mesh, as_struct=True)
  with checkpoint.Checkpointer(str(tmp_path / "run"), save_every=1, async_save=False) as ckpt:
    ckpt.save(1, state)
  target = _abstract(state, mesh, SPECS_811)
  wider = jax.ShapeDtypeStruct((8, 17), jnp.float32, sharding=NamedSharding(mesh, P()))
  target = target.replace(params={**target.params, "w": wider})
  with checkpoint.Checkpointer(str(tmp_path / "run"), save_every=1) as ckpt:
    with pytest.raises(checkpoint.NoGoodCheckpointError,
                       match=r"step 1: ValueError: 1 array\(s\) do not fit the model: params/w "
                             r"is \(8, 16\) there, \(8, 17\) here"):
      ckpt.restore(target)
  with pytest.raises(checkpoint.NoGoodCheckpointError,
                     match=r"params/w is \(8, 16\) there, \(8, 17\) here"):
    checkpoint.restore_params(str(tmp_path / "run"), target.params)
