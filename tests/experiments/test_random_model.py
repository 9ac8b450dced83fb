"""experiments/random_model.py: a model directory of random weights in named shapes (BENCHMARKS.md's SD-1.5-shaped
pipeline row), here in the tiny presets: it loads, generates, and is never written over."""

import json

import numpy as np
import pytest

from experiments import random_model
from sd_jax import generate
from sd_jax.weights import store


def test_a_tiny_random_model_generates_and_an_existing_out_is_kept(tmp_path):
  out = tmp_path / "model"
  random_model.write_random_model(out, resolution=16, unet="tiny", vae="tiny", text="tiny")
  index = store.read_index(out)
  assert sorted(index["components"]) == ["text_encoder", "unet", "vae"]
  assert index["source"].startswith("random weights: U-Net tiny, VAE tiny, text tiny")
  unet_config = json.loads((out / "unet" / "config.json").read_text())
  assert unet_config["sample_size"] == 8 and unet_config["block_out_channels"] == [32, 64]  # 16 px / the VAE's 2
  text_config = json.loads((out / "text_encoder" / "config.json").read_text())
  assert text_config["hidden_size"] == 32 and text_config["vocab_size"] >= 128
  images = generate.TextToImage.from_model_dir(out).generate(["an astronaut riding a horse"], steps=2, seed=0)
  assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
  assert not (tmp_path / "model.partial").exists()
  before = sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())
  with pytest.raises(FileExistsError, match="choose a new --out"):
    random_model.write_random_model(out, resolution=16, unet="tiny", vae="tiny", text="tiny")
  assert sorted(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()) == before
  with pytest.raises(ValueError, match="--resolution=18: use a multiple of 4"):
    random_model.write_random_model(tmp_path / "other", resolution=18, unet="tiny", vae="tiny", text="tiny")
