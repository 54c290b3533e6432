"""Checkpoints: the only user of orbax. Saves and restores {train state, data iterator, config}.

One orbax `CheckpointManager` per directory; each step is a folder with up to three items:

  <directory>/<step>/state/    the train state pytree (orbax PyTree, OCDBT/zarr), every process
                               writes its own shards; restored onto any mesh through abstract
                               targets that carry the wanted shardings.
  <directory>/<step>/data/     grain iterator state, one `process_<i>-of-<n>.json` per process
                               (grain's orbax handler), so a resumed run sees the same batches.
  <directory>/<step>/config/   the run's config as JSON (written by process 0 only).

Facts about this stack (orbax 0.12, grain 0.2.18) that callers rely on:
  - Typed PRNG keys (`jax.random.key`) are saved natively: orbax writes their uint32 key data
    and the impl name and re-wraps them on restore when the target leaf has a key dtype.
  - An async `save` returns after the arrays are copied to host memory and the iterator state
    is written, so the caller may donate / advance both right away; the write to storage runs
    in the background and the next `save`, `wait` or `close` finishes it.
  - Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete (on
    GCS: a `commit_success.txt` marker instead); unfinished steps are invisible to
    `latest_step`. They are never cleaned up here: nothing from a failed run is deleted.
  - Restoring without a sharded abstract target would put arrays on the saved mesh and return
    optax state as plain lists; `restore` therefore insists on shardings.

Resume precedence (the trainers'): the newest good step of the workdir > `init_from`
(`restore_params`) > fresh init. A newest step that cannot be read (truncated or missing file)
is skipped with a warning naming it and the problem; it is left in place, never overwritten.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import grain.checkpoint  # Registers grain's orbax handler (CheckpointSave/CheckpointRestore).
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, CONFIG = "state", "data", "config"


class NoGoodCheckpointError(FileNotFoundError):
  """Steps exist in the directory but none of them could be restored.

  A subclass of FileNotFoundError (the documented error), so callers can tell "nothing there"
  from "everything there is unreadable": a trainer must not start fresh over the latter, or
  its new saves would eventually rotate the unreadable steps away.
  """


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """One handler per item, for save and restore, so no step depends on handler inference."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  # PyTree (not Standard) handler: it supports the partial restore `restore_params` needs.
  registry.add(STATE, ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler())
  registry.add(STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
  registry.add(DATA, grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointHandler())
  registry.add(DATA, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler())
  registry.add(CONFIG, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
  registry.add(CONFIG, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
  return registry


def _describe(error: BaseException, limit: int = 400) -> str:
  """One line naming an exception; tensorstore messages can run for kilobytes."""
  text = " ".join(str(error).split())
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(error).__name__}: {text}"


def _all_processes_ok(ok: bool) -> bool:
  """True only if `ok` on every process, so all processes fall back to the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


def _check_abstract(tree: Any, what: str) -> None:
  """Every leaf must name a sharding, else orbax would restore onto the saved mesh."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  bad = [jax.tree_util.keystr(p) for p, leaf in leaves
         if not isinstance(getattr(leaf, "sharding", None), jax.sharding.Sharding)]
  if bad:
    raise ValueError(f"{what}: {len(bad)} leaves have no sharding (e.g. {', '.join(bad[:3])}); "
                     "pass jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...)) leaves")


def _leaf_names(tree: Any) -> dict[str, Any]:
  """{'params/layers/attn/q_proj': leaf}: paths by key names, alike for dicts, dataclasses and
  namedtuples (a saved TrainState comes back from metadata as nested dicts)."""
  def name(key) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(saved_metadata: Any, target: Any, prefix: str = "") -> None:
  """Raises ValueError naming the leaves whose saved shape differs from the target's.

  Run before a restore: orbax would fail on them too, but only inside its asynchronous reads,
  whose threads then print tracebacks about their closed event loop.
  """
  saved = _leaf_names(saved_metadata)
  bad = [(name, saved[prefix + name].shape, leaf.shape)
         for name, leaf in _leaf_names(target).items()
         if prefix + name in saved and hasattr(saved[prefix + name], "shape")
         and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)  # saved as key data
         and tuple(saved[prefix + name].shape) != tuple(leaf.shape)]
  if bad:
    shown = "; ".join(f"{prefix}{n} is {tuple(a)} there, {tuple(b)} here" for n, a, b in bad[:3])
    raise ValueError(f"{len(bad)} array(s) do not fit the model: {shown}")


class Checkpointer:
  """Saves every `save_every` steps, keeps the newest `keep`, restores the newest good step.

  Every process must make the same calls in the same order (orbax synchronizes them); only
  process 0 writes shared files, each process writes its own array shards and iterator state.

  Attributes:
    directory: the checkpoint folder (absolute for local paths).
    save_every: `should_save(step)` is true every this many steps (0: only forced saves).
    keep: newest steps kept by orbax's `max_to_keep` (None: all).
  """

  def __init__(self, directory: str, *, save_every: int, keep: int | None = 3,
               async_save: bool = True, read_only: bool = False):
    if save_every < 0:
      raise ValueError(f"save_every must be >= 0 (0: only forced saves), got {save_every}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None (keep all), got {keep}")
    directory = os.fspath(directory)
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.save_every, self.keep = save_every, keep
    self._bad_steps: dict[int, str] = {}  # step -> why it could not be restored
    options = ocp.CheckpointManagerOptions(
        # Due-ness is decided by `should_save`; orbax only sees forced saves (and read-only
        # managers warn unless nothing is ever due).
        save_interval_steps=0 if read_only else 1,
        max_to_keep=None if read_only else keep,
        enable_async_checkpointing=async_save and not read_only,
        read_only=read_only,
        create=not read_only,
        # Half-written steps of a crashed run stay for inspection; they are invisible anyway.
        cleanup_tmp_directories=False)
    self._manager: ocp.CheckpointManager | None = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=_registry())

  # ------------------------------------------------------------------------------ queries

  def all_steps(self) -> list[int]:
    """Finalized steps on disk, ascending (read from the directory, not a cache)."""
    return sorted(ocp.utils.checkpoint_steps(self.directory))

  def latest_step(self) -> int | None:
    """The newest finalized step in the directory (it may still prove unreadable), or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """True every `save_every` steps."""
    return self.save_every > 0 and step % self.save_every == 0

  # --------------------------------------------------------------------------------- save

  def save(self, step: int, state: Any, *, data_iter=None, config: dict | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` (and the iterator position and config) as `step`.

    Args:
      step: the step number (the folder name).
      state: a pytree of global jax.Arrays.
      data_iter: a grain DatasetIterator; omitted from the step when None.
      config: a JSON-serializable dict; tuples come back as lists.
      force: save even if `should_save(step)` is false.

    Returns:
      True if a save was started; False if not due, or if `step` already exists (an existing
      step is never overwritten, even one that failed to restore).
    """
    manager = self._live_manager()
    if not (force or self.should_save(step)):
      return False
    if step in manager.all_steps() or step in self.all_steps():
      if step in self._bad_steps:
        logging.warning("not saving step %d: %s/%d exists and is unreadable (%s); it is left "
                        "untouched, the next save goes to a new step", step, self.directory,
                        step, self._bad_steps[step])
      else:
        logging.info("step %d is already saved in %s; not saving it again", step,
                     self.directory)
      return False
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      try:  # Fail here, naming the problem, rather than in orbax's background thread.
        json.dumps(config)
      except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint config is not JSON-serializable: {e}") from e
      items[CONFIG] = ocp.args.JsonSave(config)
    return manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    """Blocks until a pending async save is complete; raises its error if it failed."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's threads; later calls do nothing."""
    manager, self._manager = self._manager, None
    if manager is not None:
      manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ------------------------------------------------------------------------------ restore

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iter=None):
    """Restores the train state (and the iterator, in place) from `step` or the newest good one.

    Args:
      abstract_state: the state's pytree of jax.ShapeDtypeStruct with `.sharding` set; the
        arrays come back with these shardings (any mesh) and this tree structure.
      step: a specific step (its failure raises), or None for the newest step that restores;
        unreadable newer steps are skipped with a warning and left in place.
      data_iter: a grain DatasetIterator whose position is set to the saved one.

    Returns:
      (state, step).

    Raises:
      FileNotFoundError: no finalized step (NoGoodCheckpointError: none restores).
      ValueError: an explicitly requested step cannot be restored, or a leaf lacks a sharding.
    """
    _check_abstract(abstract_state, "restore target")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)

    def load(s: int):
      _check_shapes(self._item_metadata(s, STATE), abstract_state)
      state = self._restore_item(s, STATE, ocp.args.PyTreeRestore(
          abstract_state, restore_args=restore_args))
      if data_iter is not None:  # After the state: a bad state leaves the iterator alone.
        self._restore_item(s, DATA, grain.checkpoint.CheckpointRestore(data_iter))
      return state

    return self._newest_good(load, step)

  def restore_config(self, step: int | None = None) -> dict:
    """The config saved with `step` (None: the newest step whose config reads).

    Pass the step `restore` returned to get the config that goes with the restored state.
    """
    return dict(self._newest_good(
        lambda s: self._restore_item(s, CONFIG, ocp.args.JsonRestore()), step)[0])

  def _item_metadata(self, step: int, name: str) -> Any:
    if not (epath.Path(self.directory) / str(step) / name).exists():
      raise FileNotFoundError(f"step {step} has no {name!r} item (missing, or saved "
                              "without it)")
    return self._live_manager().item_metadata(step)[name]

  def _restore_item(self, step: int, name: str, args) -> Any:
    if not (epath.Path(self.directory) / str(step) / name).exists():
      raise FileNotFoundError(f"step {step} has no {name!r} item (missing, or saved "
                              "without it)")
    return self._live_manager().restore(step, args=ocp.args.Composite(**{name: args}))[name]

  def _newest_good(self, load: Callable[[int], Any], step: int | None):
    """Returns (load(s), s) for `step`, or for the newest finalized step where load succeeds."""
    self.wait()  # A save in flight must not be read half-written, nor race with the read.
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no finalized checkpoint step {step} in {self.directory}; "
                                f"finalized steps: {steps}")
      try:
        return load(step), step
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"checkpoint step {step} in {self.directory} cannot be restored: "
                         f"{_describe(e)}") from e
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}: no finalized step folders "
                              "(half-written '*.orbax-checkpoint-tmp-*' folders do not count)")
    problems, last_error = [], None
    for s in reversed(steps):
      error = None
      try:
        result = load(s)
      except Exception as e:  # pylint: disable=broad-except  # Any read failure = bad step.
        error = last_error = e
      if _all_processes_ok(error is None):
        return result, s
      problem = _describe(error) if error is not None else "failed on another process"
      self._bad_steps[s] = problem
      problems.append(f"step {s}: {problem}")
      logging.warning("checkpoint step %d in %s cannot be restored (%s); falling back to an "
                      "older step. Step %d is left in place, not deleted or overwritten.",
                      s, self.directory, problem, s)
    raise NoGoodCheckpointError(
        f"none of the {len(steps)} checkpoint steps in {self.directory} can be restored "
        "(nothing was deleted): " + "; ".join(problems)) from last_error

  def _live_manager(self) -> ocp.CheckpointManager:
    if self._manager is None:
      raise RuntimeError(f"the Checkpointer for {self.directory} is closed")
    return self._manager


def restore_params(directory: str, abstract_params: Any, step: int | None = None):
  """Restores only `params` (tree path 'params' of the saved state) from another run.

  For `init_from`: reads the newest good step of `directory` (or `step`) without writing or
  deleting anything there, and lays the arrays out as `abstract_params`' shardings say.
  """
  _check_abstract(abstract_params, "restore_params target")
  target = {"params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with Checkpointer(directory, save_every=0, keep=None, async_save=False,
                    read_only=True) as ckpt:
    def load(s: int):
      saved = ckpt._item_metadata(s, STATE)  # pylint: disable=protected-access
      _check_shapes(saved, abstract_params, prefix="params/")
      # partial_restore: the other run's optimizer state and rng are not read at all.
      args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
      return ckpt._restore_item(s, STATE, args)["params"]  # pylint: disable=protected-access

    params, found = ckpt._newest_good(load, step)  # pylint: disable=protected-access
  logging.info("loaded params from step %d of %s", found, ckpt.directory)
  return params
