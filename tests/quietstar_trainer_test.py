"""The `quietstar` stage: resume keeps the learned thought vectors and mixing head; the 7B
config refuses to start without weights or devices."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain_tiny
from configs import quietstar_tiny
from jaxstar.errors import UserError
from jaxstar.quietstar import thoughts


def _pretrain_config(**kw):
  c = pretrain_tiny.get_config()
  c.update_from_flattened_dict({"num_steps": 2, "data.seq_len": 16, "eval_every": 0,
                                "batch_size": 8, "data.synthetic_docs": 64, **kw})
  return c


@pytest.mark.slow
def test_trainer_resume_keeps_thought_vectors_and_mixing_head(tmp_path):
  from jaxstar import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxstar import run_lib  # pylint: disable=g-import-not-at-top
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  from jaxstar import stages  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import trainer  # pylint: disable=g-import-not-at-top

  def config(**kw):
    c = quietstar_tiny.get_config()
    c.update_from_flattened_dict({
        "init_from": str(tmp_path / "pretrain"), "num_steps": 3, "batch_size": 8,
        "data.seq_len": 12, "data.synthetic_docs": 64, "eval_every": 0, "log_every": 1,
        "quietstar.n_ahead": 5, "quietstar.n_ahead_talk": 2, "optim.lr": 1e-2,
        "optim.warmup_steps": 0, **kw})
    return c

  stages.run(_pretrain_config(), str(tmp_path / "pretrain"))
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  summary = trainer.train_and_evaluate(config(eval_every=3, eval_batches=1), straight)
  for key in ("eval_answer_loss_base", "eval_loss_base", "eval_answer_loss_thought",
              "eval_loss_thought"):
    assert np.isfinite(summary[key]), key
  trainer.train_and_evaluate(config(stop_at_step=2), split)
  trainer.train_and_evaluate(config(), split)

  def restore(workdir, abstract, step=None):
    mesh = sharding.make_mesh((-1, 1, 1))
    target = run_lib.with_shardings(abstract, sharding.shardings_for(abstract, mesh))
    return jax.device_get(checkpoint.restore_params(os.path.join(workdir, "checkpoints"),
                                                    target, step=step))

  abstract = jax.eval_shape(lambda: model_params_for(config()))
  a, b = restore(straight, abstract, 3), restore(split, abstract, 3)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # resumed exactly: nothing re-initialized
  at_restart = restore(split, abstract, 2)
  pretrained = restore(str(tmp_path / "pretrain"), abstract["lm"])
  initial = pretrained["embedding"][ord("-") + 3] / 100  # E['---'] / 100, byte tokenizer
  assert not np.array_equal(at_restart["start_thought"], initial)  # learned and kept
  assert np.abs(at_restart["mixing"]["out_proj"]["kernel"]).sum() > 0      # learned, not zero


def model_params_for(config):
  from jaxstar import run_lib  # pylint: disable=g-import-not-at-top
  from jaxstar import tokenizer  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import trainer  # pylint: disable=g-import-not-at-top
  tok = tokenizer.get_tokenizer(config.tokenizer)
  model = thoughts.QuietStarModel(run_lib.model_config_from(config, tok),
                                  trainer.quietstar_config(config), start_id=tok.start_thought_id,
                                  end_id=tok.end_thought_id, init_id=tok.encode("---")[0])
  return model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                    method=thoughts.QuietStarModel.init_all)["params"]


def test_7b_config_stops_at_once_without_weights_or_devices(tmp_path):
  from configs import quietstar_7b  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import trainer  # pylint: disable=g-import-not-at-top
  config = quietstar_7b.get_config()
  assert (config.quietstar.n_ahead, config.quietstar.n_ahead_talk, config.quietstar.n_passes,
          config.batch_size, config.optim.lr, config.optim.warmup_steps,
          config.optim.weight_decay, config.optim.clip_norm, config.num_steps,
          config.data.seq_len) == (12, 4, 2, 8, 1e-6, 20, 0.001, 1.0, 100, 256)
  with pytest.raises(UserError, match="config.init_from is empty"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config.init_from = str(tmp_path)
  with pytest.raises(UserError, match=r"config.mesh_shape=\(1, 8, 4\).*8 cpu device"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_missing_init_from_is_an_error_unless_asked_to_create_it(tmp_path):
  from jaxstar import stages  # pylint: disable=g-import-not-at-top
  config = quietstar_tiny.get_config()
  config.init_from = str(tmp_path / "pretrian")  # mistyped: nothing is trained there
  with pytest.raises(UserError, match="pretrian' is not a folder.*create_init_from"):
    stages.run(config, str(tmp_path / "qs"))
  assert not os.path.exists(tmp_path / "pretrian")
  config.create_init_from = "configs/pretrian_tiny.py"
  with pytest.raises(UserError, match="config file 'configs/pretrian_tiny.py' does not exist"):
    stages.run(config, str(tmp_path / "qs"))


@pytest.mark.slow
def test_create_init_from_trains_it_first_then_runs_the_stage(tmp_path):
  from jaxstar import stages  # pylint: disable=g-import-not-at-top
  short = tmp_path / "short_pretrain.py"
  short.write_text("from configs import pretrain_tiny\n\n\ndef get_config(arg=None):\n"
                   "  c = pretrain_tiny.get_config(arg)\n"
                   "  c.update_from_flattened_dict({'num_steps': 2, 'data.seq_len': 16,\n"
                   "                                'eval_every': 0, 'batch_size': 8})\n"
                   "  return c\n")
  config = quietstar_tiny.get_config()
  config.update_from_flattened_dict({
      "init_from": str(tmp_path / "pretrain"), "num_steps": 1, "batch_size": 8,
      "data.seq_len": 12, "eval_every": 0, "quietstar.n_ahead": 4,
      "quietstar.n_ahead_talk": 1, "create_init_from": str(short)})
  assert stages.run(config, str(tmp_path / "qs"))["step"] == 1
  assert stages.finished(str(tmp_path / "pretrain"), 2)  # trained there first, to the end
  config.num_steps = 2  # a finished init_from is used as it is, not trained again
  config.update_from_flattened_dict({"quietstar.original_mode": True, "eval_every": 1,
                                     "eval_batches": 1})  # and the no-thought evaluation runs
  summary = stages.run(config, str(tmp_path / "qs"))
  assert summary["step"] == 2 and np.isfinite(summary["eval_loss_base"])
  assert stages.finished(str(tmp_path / "pretrain"), 2)
