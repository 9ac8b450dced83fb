"""The sd_jax model directory: component round trip, overwrite refusal, and use as init_from."""

import jax
import numpy as np
import pytest

from sd_jax import train
from sd_jax.weights import store
from tests import helpers


def test_component_round_trip_and_no_silent_overwrite(tmp_path):
  params = {"conv": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "bias": np.ones(4, np.float32)}}
  fields = {"block_out_channels": (32, 64), "dtype": np.float32, "cross_attention_dim": None}
  store.save_component(tmp_path, "unet", fields, params)
  store.write_index(tmp_path, {"unet": "UNet2DConditionModel"}, source="test")
  config, restored = store.load_component(tmp_path, "unet")
  assert config == {"block_out_channels": [32, 64], "dtype": "float32", "cross_attention_dim": None}
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  assert store.read_index(tmp_path)["components"] == {"unet": "UNet2DConditionModel"}
  with pytest.raises(FileExistsError, match="already holds weights"):
    store.save_component(tmp_path, "unet", fields, params)
  holds = "not an sd_jax model component.*holds: \\['sd_jax_model.json', 'unet'\\]"
  with pytest.raises(FileNotFoundError, match=holds):
    store.load_component(tmp_path, "vae")


def test_relative_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  store.save_component("rel_model", "vae", {"a": 1}, {"w": np.ones(3, np.float32)})
  assert store.load_component("rel_model", "vae")[0] == {"a": 1}


def test_component_works_as_init_from(tmp_path, data_dir):
  """Imported weights fine-tune through the usual init_from path."""
  # The train step of tests/test_train.py's reference run (2 steps: warmup_steps=2 fits; constant schedule): JAX's
  # persistent compilation cache usually has it.
  config = helpers.load_config(total_steps=2, eval_every_steps=-1, **{"mesh.data": 1, "optim.schedule": "constant"})
  setup = train.setup(config, devices=jax.devices()[:1])
  params = jax.device_get(setup.init_fn(jax.random.PRNGKey(7)).params)
  store.save_component(tmp_path / "model", "unet", dict(config.model), params)
  config.init_from = str(tmp_path / "model" / "unet")
  from sd_jax import checkpoint as ckpt_lib
  loaded, mask = ckpt_lib.load_params(config.init_from, setup.abstract_state.params, setup.state_shardings.params,
                                      allow_partial=False)
  assert all(jax.tree.leaves(mask))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)
  train.train_and_evaluate(config, str(tmp_path / "finetune"), devices=jax.devices()[:1])
