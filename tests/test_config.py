"""Config files, typed args, locked overrides, and the checks that run before anything compiles."""

import glob
import json
import os
import time

import pytest

from sd_jax import config_lib
from sd_jax import train
from tests import helpers


def test_parse_arg_types_and_bare_keys():
  arg = config_lib.parse_arg("model=tiny,runlocal,res=64,lr=0.5", model="base", runlocal=False, res=32, lr=1.0)
  assert (arg.model, arg.runlocal, arg.res, arg.lr) == ("tiny", True, 64, 0.5)
  assert isinstance(arg.res, int) and isinstance(arg.lr, float)


def test_parse_arg_unknown_key_lists_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown config arg 'modle'.*Valid args: model, runlocal"):
    config_lib.parse_arg("modle=tiny", model="base", runlocal=False)


def test_parse_arg_bad_type():
  with pytest.raises(ValueError, match="expected an integer"):
    config_lib.parse_arg("res=big", res=32)


@pytest.mark.parametrize("path", sorted(glob.glob(str(helpers.REPO / "configs" / "*.py"))))
@pytest.mark.parametrize("arg", ["", "runlocal", "demo"])
def test_every_config_has_common_keys(path, arg):
  name = os.path.basename(path)[:-3]
  if name == "common":
    pytest.skip("shared pieces, not an experiment")
  config = helpers.load_config(name, arg)
  for key in config_lib.COMMON_KEYS:
    assert key in config, f"{name}:{arg} lacks {key}"
  config_lib.validate(config)
  json.loads(config.to_json_best_effort())  # config.json must be writable


def test_config_is_locked():
  config = helpers.load_config()
  with pytest.raises(AttributeError):
    config.optim.lrr = 1.0


def _fails_fast(config, match, tmp_path, devices=None):
  """The run fails with `match` before compiling anything or writing a checkpoint."""
  start = time.time()
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "w"), devices=devices)
  assert not (tmp_path / "w" / "checkpoints").exists()
  assert time.time() - start < 20


def test_negative_learning_rate(tmp_path, data_dir):
  _fails_fast(helpers.load_config(**{"optim.lr": -1e-3}), r"optim\.lr=-0\.001: the learning rate must be positive",
              tmp_path)


def test_batch_not_divisible_by_data_parallel(tmp_path, data_dir):
  config = helpers.load_config(batch_size=12, **{"mesh.data": 8})
  _fails_fast(config, r"batch_size=12 is not divisible by the data-parallel size 8.*multiple of 8", tmp_path)


def test_mesh_does_not_match_devices(tmp_path, data_dir):
  config = helpers.load_config(**{"mesh.data": 3, "mesh.fsdp": 1})
  _fails_fast(config, r"needs 3 devices but 8 are available", tmp_path)


def test_unknown_trainer(tmp_path, data_dir):
  _fails_fast(helpers.load_config(trainer="gan"),
              r"config.trainer='gan' is not a trainer. Valid trainers: clip, ddpm, dpo, finetune, ldm, vae", tmp_path)


def test_unknown_dataset(tmp_path, data_dir):
  _fails_fast(helpers.load_config(**{"dataset.name": "imagenet99"}), r"imagenet99.*(shapes|folder|tfds)", tmp_path)


def test_cli_rejects_misspelled_override_and_unknown_arg(tmp_path):
  result = helpers.run_main([f"--config={helpers.REPO}/configs/shapes_ddpm.py:runlocal",
                             f"--workdir={tmp_path}/w", "--config.optim.lrr=3e-4"], timeout=120)
  assert result.returncode != 0
  assert "lrr" in result.stderr
  result = helpers.run_main([f"--config={helpers.REPO}/configs/shapes_ddpm.py:runlcoal",
                             f"--workdir={tmp_path}/w"], timeout=120)
  assert result.returncode != 0
  assert "Unknown config arg 'runlcoal'" in result.stderr and "runlocal" in result.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("total_steps,warmup", [(1, 2), (5, 5), (100, 10), (3, 0)])
def test_learning_rate_schedules(schedule, total_steps, warmup):
  optim = helpers.load_config(**{"optim.schedule": schedule, "optim.warmup_steps": warmup}).optim
  lr = train.learning_rate_schedule(optim, total_steps)
  values = [float(lr(s)) for s in range(total_steps + 1)]
  assert all(0.0 <= v <= optim.lr * (1 + 1e-6) for v in values)
  if warmup and warmup < total_steps:
    assert values[warmup] == pytest.approx(optim.lr)
