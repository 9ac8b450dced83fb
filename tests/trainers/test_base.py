"""The trainer interface (sd_jax/trainers/base.py): every trainer implements it, and the loop drives a task only
through it: the step gets the step number, the dataset comes from the task, grids are the loop's, export at the end."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sd_jax import metrics
from sd_jax import train
from sd_jax import trainers
from sd_jax.trainers import base
from tests import helpers


@pytest.mark.parametrize("name", sorted(trainers.TRAINERS))
def test_every_trainer_is_a_task(name):
  assert issubclass(trainers.get(name).Task, base.Task)


class _Probe(base.Task):
  """A linear model of the mean pixel, trained through the real loop; records what the loop calls."""

  grid_tag = "probe"

  def __init__(self, config, calls):
    super().__init__(config)
    self.calls = calls
    # The dataset the loop must read: a completed copy (here: a smaller resolution), never written into config.
    self.dataset = ml_collections.ConfigDict(config.dataset.to_dict())
    self.dataset.resolution = 8

  def dataset_config(self):
    return self.dataset

  def prepare_data(self, workdir):
    assert (workdir / "run.lock").exists()  # the workdir is this run's
    self.calls.append("prepare_data")

  def init_params(self, rng):
    kernel = nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp"))(rng, (3, 1))
    return {"kernel": kernel}

  def loss(self, params, frozen, batch, keys, step):
    assert frozen is None and keys.shape == (self.config.batch_size, 2)
    assert batch["image"].shape[1:3] == (8, 8)  # the task's dataset, not config.dataset's 16 px
    pred = jnp.mean(batch["image"], axis=(1, 2)) @ params["kernel"]
    loss = jnp.mean(jnp.square(pred - 1.0))
    return loss, {"step_seen": step.astype(jnp.float32)}

  def sample_grid(self, params, ctx):
    self.calls.append("sample_grid")
    value = int(np.clip(np.asarray(params["kernel"]).mean() * 100 + 128, 0, 255))
    return np.full((4, 4, 3), value, np.uint8)

  def export(self, host_state, ctx):
    self.calls.append(("export", int(host_state.step)))
    (ctx.workdir / "export").mkdir(exist_ok=True)


def test_the_loop_drives_a_task_through_the_interface(data_dir, tmp_path):
  config = helpers.load_config(total_steps=4, log_every_steps=1, save_every_steps=4, eval_every_steps=-1,
                               sample_every_steps=2, **{"mesh.data": 1})
  calls = []
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], task=_Probe(config, calls))
  rows = [r for r in metrics.read_metrics(tmp_path) if "loss" in r]
  assert [r["step_seen"] for r in rows] == [0, 1, 2, 3]  # loss(..., step) sees the steps taken so far
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert calls == ["prepare_data", "sample_grid", "sample_grid", ("export", 4)]  # grids without evaluations
  assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
  assert np.asarray(Image.open(tmp_path / "samples" / "step_0000004.png")).shape == (4, 4, 3)
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded["dataset"]["resolution"] == 8 and config.dataset.resolution == 16  # recorded, not written into
