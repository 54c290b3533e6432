"""Config files and their helpers: `parse_arg`, blocks built from the dataclasses, unknown keys."""
import dataclasses

import pytest

from configs import common
from configs import pretrain_tiny
from configs import quietstar_7b
from configs import quietstar_tiny
from configs import star_arithmetic_tiny
from configs import star_csqa_7b
from configs import star_gsm8k_7b
from jaxstar import model as model_lib
from jaxstar import run_lib
from jaxstar import tokenizer
from jaxstar.errors import UserError
from jaxstar.model.config import ModelConfig
from jaxstar.quietstar import trainer
from jaxstar.quietstar.config import QuietStarConfig
from jaxstar.star import stage as star_stage


def test_parse_arg():
  args = common.parse_arg("variant=small,runlocal,steps=7", variant="tiny", runlocal=False,
                          steps=1, fast=True)
  assert (args.variant, args.runlocal, args.steps, args.fast) == ("small", True, 7, True)
  assert common.parse_arg("fast=no", fast=True).fast is False
  assert common.parse_arg(None, variant="tiny").variant == "tiny"
  assert common.parse_arg("", variant="tiny").variant == "tiny"
  with pytest.raises(ValueError, match=r"unknown config arg 'size'; known: \['variant'\]"):
    common.parse_arg("size=7", variant="tiny")
  with pytest.raises(ValueError, match="config arg 'variant' needs a value"):
    common.parse_arg("variant", variant="tiny")
  with pytest.raises(ValueError):
    common.parse_arg("steps=many", steps=1)


def test_blocks_take_their_defaults_from_the_dataclasses():
  assert dict(common.quietstar_config()) == dataclasses.asdict(QuietStarConfig())
  assert common.quietstar_config(n_ahead=8).n_ahead == 8
  block = common.model_config("tiny")
  assert set(block.keys()) == {"variant"} | {f.name for f in dataclasses.fields(ModelConfig)}
  tok = tokenizer.get_tokenizer("bytes")
  config = pretrain_tiny.get_config()   # the tiny variant with its layer scan unrolled
  assert run_lib.model_config_from(config, tok) == model_lib.get_config("tiny", scan_unroll=0)
  config.model.num_layers = 2
  config.model.dtype = "bfloat16"
  cfg = run_lib.model_config_from(config, tok)
  assert (cfg.num_layers, cfg.dtype, cfg.embed_dim) == (2, "bfloat16", 128)


def test_every_config_file_builds_its_stage_config():
  for module in (pretrain_tiny, quietstar_tiny, quietstar_7b, star_arithmetic_tiny,
                 star_csqa_7b, star_gsm8k_7b):
    config = module.get_config()
    run_lib.model_config_from(config, tokenizer.get_tokenizer(config.tokenizer))  # its own
    if config.stage == "quietstar":
      trainer.quietstar_config(config)
    if config.stage == "star":
      config.init_from = "/models/base"
      star_stage._check(config)
  pre = star_arithmetic_tiny.get_config("pretrain")
  assert pre.stage == "pretrain" and pre.data.synthetic_format == "scratchpad"


def test_star_step_rules():
  star = star_csqa_7b.get_config().star
  assert [star_stage.num_steps(star, n) for n in range(1, 11)] == [
      40, 48, 57, 69, 82, 99, 119, 143, 171, 206]
  assert star_stage.num_steps(star, 16) == 616
  gsm = star_gsm8k_7b.get_config().star
  assert star_stage.num_steps(gsm, 30) == 7912 and star_stage.num_steps(gsm, 40) == 7912
  star.steps_rule, star.start_steps, star.add_steps = "linear", 300, 20
  assert [star_stage.num_steps(star, n) for n in (1, 2, 16)] == [300, 320, 600]
  star.steps_rule = "cubic"
  with pytest.raises(UserError, match="config.star.steps_rule='cubic'"):
    star_stage.num_steps(star, 1)


def test_unknown_and_bad_values_name_the_field():
  config = quietstar_tiny.get_config()
  config.unlock()
  config.quietstar.n_ahaed = 3
  with pytest.raises(UserError, match=r"config.quietstar has unknown field\(s\) \['n_ahaed'\]; "
                                      r"fields: \['n_ahead'"):
    trainer.quietstar_config(config)
  config = pretrain_tiny.get_config()
  config.model.remat_policy = "sometimes"
  with pytest.raises(UserError, match="config.model: remat_policy='sometimes'"):
    run_lib.model_config_from(config, tokenizer.get_tokenizer("bytes"))
  config = pretrain_tiny.get_config()
  config.nonfinite = "skipp"
  with pytest.raises(UserError, match=r"config.nonfinite='skipp'; choose one of"):
    run_lib.validate_config(config)
