"""The one place that names mesh axes: meshes, logical->mesh rules, shardings and reports.

Mesh axes are ('data', 'fsdp', 'tensor'). Model code names only logical axes; `LOGICAL_RULES`
maps them. A logical axis whose dimension is not divisible by its mesh axes is left unsharded
(rather than failing), and `assert_sufficiently_sharded` catches the case where that leaves a
large parameter replicated on a model-parallel mesh.

State is created sharded from birth: `jax.eval_shape(init)` -> `shardings_for(...)` ->
`jax.jit(init, out_shardings=...)` (see `create_sharded`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes. Parameters: 'embed' is FSDP-sharded, the wide axes tensor-parallel.
# Activations ('act_*'): batch over data x fsdp, heads / mlp / vocab over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("act_batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_len", None),
    ("act_embed", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None, dcn_data: int = 1) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh; one entry of `shape` may be -1 (fills the rest).

  Args:
    shape: per-axis sizes within a slice (or over all devices when dcn_data == 1).
    devices: defaults to all global devices (every process of a multi-host run).
    dcn_data: number of slices; the data axis becomes dcn_data x shape[0] over slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive, at most one -1")
  per_slice, rem = divmod(n, dcn_data)
  if rem:
    raise ValueError(f"dcn_data={dcn_data} does not divide the {n} devices")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if per_slice % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide the {per_slice} devices "
                       f"available per slice")
    shape[shape.index(-1)] = per_slice // known
  if math.prod(shape) != per_slice:
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape) * dcn_data} devices, "
                     f"but {n} are available")
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if dcn_data > 1:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_hybrid_device_mesh(shape, [dcn_data, 1, 1], devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES):
  """Sets the mesh and the logical rules so that activation constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec for one array; mesh axes that do not divide a dimension are dropped."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_RULES")
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    kept = []
    for ax in axes:
      size = math.prod(mesh.shape[a] for a in kept + [ax])
      if ax not in used and dim % size == 0:
        kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def shardings_for(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a (possibly logically boxed) abstract pytree.

  Boxed leaves (`nn.LogicallyPartitioned`) are sharded by their names, every other leaf is
  replicated. The result matches the structure of `nn.unbox(abstract_tree)`.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      names = tuple(leaf.names) + (None,) * (len(value.shape) - len(leaf.names))
      return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch-major array: the leading axis over data x fsdp."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=LOGICAL_RULES):
  """Runs `init_fn(*args)` with its outputs sharded from birth; returns (state, shardings).

  `init_fn` may return logically boxed leaves; the returned state is unboxed.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = shardings_for(abstract, mesh, rules)
  with use_mesh(mesh, rules):
    state = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return state, shardings


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def bytes_per_device(shape: Sequence[int], dtype, sharding: NamedSharding) -> int:
  """Bytes of one device's shard of a `shape`, `dtype` array under `sharding`."""
  shard = sharding.shard_shape(tuple(shape))
  return int(np.prod(shard, dtype=np.int64)) * np.dtype(dtype).itemsize


def report(tree: Any, shardings: Any) -> str:
  """A table of every leaf: name, shape, dtype, partition spec, bytes per device."""
  tree = nn.unbox(tree)
  rows = [("name", "shape", "dtype", "sharding", "bytes/device")]
  total = 0
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings)):
    nbytes = bytes_per_device(leaf.shape, leaf.dtype, sh)
    total += nbytes
    rows.append((_path_name(path), str(tuple(leaf.shape)), str(np.dtype(leaf.dtype)),
                 str(tuple(sh.spec)), f"{nbytes:,}"))
  rows.append(("total", "", "", "", f"{total:,}"))
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def assert_sufficiently_sharded(tree: Any, shardings: Any, mesh: Mesh,
                                min_bytes: int = 1 << 20) -> None:
  """Raises if a leaf of at least `min_bytes` is fully replicated on a model-parallel mesh.

  Pure data-parallel meshes (fsdp == tensor == 1) replicate parameters by design and pass.
  """
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return
  tree = nn.unbox(tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  bad = []
  for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings)):
    total = int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    if total >= min_bytes and bytes_per_device(leaf.shape, leaf.dtype, sh) == total:
      bad.append(f"{_path_name(path)} {tuple(leaf.shape)} ({total:,} bytes)")
  if bad:
    raise ValueError(f"{len(bad)} large parameter(s) are replicated on mesh {dict(mesh.shape)}; "
                     f"check LOGICAL_RULES and that their dimensions divide the mesh axes: "
                     + "; ".join(bad))
