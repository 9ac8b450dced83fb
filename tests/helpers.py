"""Shared test helpers: tiny configs, metric reading, subprocess runs of the entry point."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str = "shapes_ddpm", arg: str = "runlocal", **overrides):
  """configs/<name>.py:get_config(arg) with dotted-key overrides ("optim.lr": 1e-3)."""
  from sd_jax import config_lib
  config = config_lib.load_config_file(REPO / "configs" / f"{name}.py", arg)
  config.lock()  # as the command line does (config_flags lock_config=True)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def losses(workdir) -> dict[int, float]:
  from sd_jax import metrics
  return {row["step"]: row["loss"] for row in metrics.read_metrics(workdir) if "loss" in row}


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS for a subprocess with `num_devices` CPU devices, keeping this process's other flags (conftest.py)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join([f"--xla_force_host_platform_device_count={num_devices}", *flags])


def run_main(args: list[str], *, env: dict[str, str] | None = None, timeout: int = 300,
             check: bool = False) -> subprocess.CompletedProcess:
  """Runs `python -m sd_jax.main ARGS` in a fresh process (its own device count from env XLA_FLAGS)."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  result = subprocess.run([sys.executable, "-m", "sd_jax.main", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"sd_jax.main failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
  return result


def randomize_torch(model, seed: int):
  """A torch module with every parameter non-zero (diffusers zero-initialises some output layers), norms near 1."""
  import torch  # pylint: disable=import-outside-toplevel
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=generator) * 0.05
      p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)
  return model.eval()


def public_config(config: dict) -> dict:
  """A diffusers config without its private `_...` keys."""
  return {k: v for k, v in config.items() if not k.startswith("_")}


def tiny_text_to_image(model: Path, captions: list[str]) -> Path:
  """A tiny random text-to-image model directory at `model` (16 px images; a one-level U-Net: compiling dominates
  the runs that use it; a tokenizer trained on `captions`) for the fine-tune and preference trainers' tests."""
  import json

  import flax.linen as nn
  import jax

  from sd_jax.data import tokenizer as tokenizer_lib
  from sd_jax.models import clip as clip_lib
  from sd_jax.models import unet as unet_lib
  from sd_jax.models import vae as vae_lib
  from sd_jax.weights import store

  tok = tokenizer_lib.train_tokenizer(list(captions) * 8, str(model / "tokenizer"), vocab_size=600, max_length=16)
  unet = unet_lib.create_unet(unet_lib.unet_config(
      "tiny", sample_size=8, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
      up_block_types=("CrossAttnUpBlock2D",)))
  vae = vae_lib.create_vae("tiny")
  text = clip_lib.create_clip_text_model(clip_lib.clip_config("tiny").text, vocab_size=tok.vocab_size,
                                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  for i, (name, module, config, inputs) in enumerate((
      ("unet", unet, unet_lib.unet_config_to_diffusers(unet), unet.example_inputs(1, 16)),
      ("vae", vae, vae_lib.vae_config_to_diffusers(vae), vae.example_inputs()),
      ("text_encoder", text, clip_lib.clip_config_to_transformers(text.config), text.example_inputs()))):
    # One jitted init per network: op-by-op (eager) inits compile every small op on its own, several times slower.
    params = jax.jit(lambda key, inputs, module=module: module.init(key, **inputs))(jax.random.PRNGKey(i), inputs)
    store.save_component(model, name, config, nn.meta.unbox(params["params"]))
  (model / "scheduler").mkdir()
  (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({
      "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
      "clip_sample": False}))
  store.write_index(model, {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"},
                    source="test")
  return model


@contextlib.contextmanager
def serving(app):
  """A real HTTP server (uvicorn on a free local port, in a thread) for an ASGI `app`: yields its base URL."""
  import socket
  import threading
  import time

  import uvicorn
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started:
    assert time.time() < deadline, "the server did not start"
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=10)
