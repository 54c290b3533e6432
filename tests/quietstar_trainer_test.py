"""The `quietstar` stage: resume keeps the learned thought vectors and mixing head; the 7B
config refuses to start without weights or devices."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstar.quietstar import thoughts


def test_trainer_resume_keeps_thought_vectors_and_mixing_head(tmp_path):
  from configs import quietstar_tiny  # pylint: disable=g-import-not-at-top
  from jaxstar import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxstar import sharding  # pylint: disable=g-import-not-at-top
  from jaxstar import train_lib  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import trainer  # pylint: disable=g-import-not-at-top

  def config(**kw):
    c = quietstar_tiny.get_config()
    c.update_from_flattened_dict({
        "init_from": str(tmp_path / "pretrain"), "pretrain.num_steps": 2,
        "pretrain.data.seq_len": 16, "pretrain.eval_every": 0, "pretrain.batch_size": 8,
        "pretrain.data.synthetic_docs": 64, "num_steps": 3, "batch_size": 8,
        "data.seq_len": 12, "data.synthetic_docs": 64, "eval_every": 0, "log_every": 1,
        "quietstar.n_ahead": 5, "quietstar.n_ahead_talk": 2, "optim.lr": 1e-2,
        "optim.warmup_steps": 0, **kw})
    return c

  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  trainer.train_and_evaluate(config(), straight)   # also pretrains into init_from first
  trainer.train_and_evaluate(config(stop_at_step=2), split)
  trainer.train_and_evaluate(config(), split)

  def restore(workdir, abstract, step=None):
    mesh = sharding.make_mesh((-1, 1, 1))
    target = train_lib.with_shardings(abstract, sharding.shardings_for(abstract, mesh))
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
  from jaxstar import tokenizer  # pylint: disable=g-import-not-at-top
  from jaxstar import train_lib  # pylint: disable=g-import-not-at-top
  from jaxstar.quietstar import trainer  # pylint: disable=g-import-not-at-top
  tok = tokenizer.get_tokenizer(config.tokenizer)
  model = thoughts.QuietStarModel(train_lib.model_config_from(config, tok),
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
  with pytest.raises(ValueError, match="config.init_from is empty"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match=r"config.mesh_shape=\(1, 8, 4\).*8 cpu device"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
