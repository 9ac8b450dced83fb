"""Whole Stable Diffusion models: a diffusers directory and an original single file in, the diffusers layout out.

Random-weight reference models (diffusers UNet2DConditionModel / AutoencoderKL, transformers CLIPTextModel) are
saved as a diffusers SD directory, converted with the command line, and every network is run on the same inputs.
"""

import dataclasses
import json
import subprocess
import sys

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.models import clip as clip_models
from sd_jax.models import unet as unet_models
from sd_jax.models import vae as vae_models
from sd_jax.weights import clip as clip_weights
from sd_jax.weights import common
from sd_jax.weights import model_dir as model_dir_lib
from sd_jax.weights import store
from sd_jax.weights import unet as unet_weights
from sd_jax.weights import vae as vae_weights
from tests import helpers

TOL = 1e-4


_randomize = helpers.randomize_torch
_public = helpers.public_config


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd")
  unet = _randomize(diffusers.UNet2DConditionModel(
      **_public(unet_models.unet_config_to_diffusers(unet_models.unet_config("tiny")))), 0)
  vae = _randomize(diffusers.AutoencoderKL(
      **_public(vae_models.vae_config_to_diffusers(vae_models.create_vae("tiny")))), 1)
  text = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **clip_models.clip_config_to_transformers(clip_models.clip_config("tiny").text))), 2)
  unet.save_pretrained(root / "unet", safe_serialization=True)
  vae.save_pretrained(root / "vae", safe_serialization=True)
  text.save_pretrained(root / "text_encoder", safe_serialization=True)
  tokenizer_lib.train_tokenizer(["a small red circle above a blue square", "a large green star"] * 8,
                                root / "tokenizer", vocab_size=600, max_length=16)  # the tiny tower's positions
  diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
      root / "scheduler")
  (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  return root, {"unet": unet, "vae": vae, "text_encoder": text}


def _inputs():
  rng = np.random.default_rng(0)
  return dict(latents=rng.normal(size=(2, 16, 16, 4)).astype(np.float32),
              timesteps=np.asarray([10, 700]),
              context=rng.normal(size=(2, 7, 32)).astype(np.float32),
              image=rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32),
              ids=np.asarray([[126, 5, 9, 33, 127, 127], [126, 77, 3, 127, 127, 127]]))


def _nchw(x):
  return torch.from_numpy(np.transpose(x, (0, 3, 1, 2)))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def _torch_outputs(models):
  x = _inputs()
  with torch.no_grad():
    noise = _nhwc(models["unet"](_nchw(x["latents"]), torch.from_numpy(x["timesteps"]),
                                 torch.from_numpy(x["context"])).sample)
    posterior = models["vae"].encode(_nchw(x["image"])).latent_dist
    reconstruction = _nhwc(models["vae"].decode(posterior.mode()).sample)
    text = models["text_encoder"](torch.from_numpy(x["ids"]), output_hidden_states=True)
  return dict(noise=noise, latent_mean=_nhwc(posterior.mean), reconstruction=reconstruction,
              last=text.last_hidden_state.numpy(), penultimate=text.hidden_states[-2].numpy(),
              pooled=text.pooler_output.numpy())


def _sd_jax_outputs(model_dir):
  """README's Python example, in test form: load a model directory and run each network (in one jitted program:
  op by op, every small op would compile on its own)."""
  models = model_dir_lib.load_model(model_dir)
  (unet, _), (vae, _), (text, _) = models["unet"], models["vae"], models["text_encoder"]

  @jax.jit
  def run(params, x):
    noise = unet.apply({"params": params["unet"]}, x["latents"], x["timesteps"], x["context"])
    posterior = vae.apply({"params": params["vae"]}, x["image"], method=vae.encode)
    reconstruction = vae.apply({"params": params["vae"]}, posterior.mode(), method=vae.decode)
    out = text.apply({"params": params["text_encoder"]}, x["ids"], output_hidden_states=True)
    return dict(noise=noise, latent_mean=posterior.mean, reconstruction=reconstruction, last=out.last_hidden_state,
                penultimate=out.hidden_states[-2], pooled=out.pooler_output)
  return run({name: models[name][1] for name in ("unet", "vae", "text_encoder")}, _inputs())


def _assert_close(got, want):
  for key in want:
    err = float(np.max(np.abs(np.asarray(got[key]) - want[key])))
    assert err <= TOL, f"{key}: max abs diff {err}"


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "sd_jax.convert", *args], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=300)


def test_import_diffusers_directory_with_the_command_line(sd_dir, tmp_path):
  root, models = sd_dir
  result = _convert(f"--from_diffusers={root}", f"--out={tmp_path / 'model'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert store.read_index(tmp_path / "model")["components"] == {
      "unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
  assert (tmp_path / "model" / "tokenizer" / "vocab.json").exists()
  assert (tmp_path / "model" / "scheduler" / "scheduler_config.json").exists()
  _assert_close(_sd_jax_outputs(tmp_path / "model"), _torch_outputs(models))

  # A second import into the same --out is refused; nothing is overwritten.
  before = (tmp_path / "model" / "sd_jax_model.json").read_text()
  result = _convert(f"--from_diffusers={root}", f"--out={tmp_path / 'model'}")
  assert result.returncode == 1 and "already holds an sd_jax model" in result.stderr
  assert (tmp_path / "model" / "sd_jax_model.json").read_text() == before


def test_export_loads_in_diffusers_and_transformers(sd_dir, tmp_path):
  root, models = sd_dir
  model_dir_lib.import_diffusers(root, tmp_path / "model")
  result = _convert(f"--to_diffusers={tmp_path / 'model'}", f"--out={tmp_path / 'exported'}")
  assert result.returncode == 0, result.stderr[-3000:]
  exported = tmp_path / "exported"
  reloaded = {"unet": diffusers.UNet2DConditionModel.from_pretrained(exported / "unet").eval(),
              "vae": diffusers.AutoencoderKL.from_pretrained(exported / "vae").eval(),
              "text_encoder": transformers.CLIPTextModel.from_pretrained(exported / "text_encoder").eval()}
  want, got = _torch_outputs(models), _torch_outputs(reloaded)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])  # import -> export is exact
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(exported, safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)
  assert isinstance(pipe.unet, diffusers.UNet2DConditionModel)
  # Import -> export -> import is exact.
  model_dir_lib.import_diffusers(exported, tmp_path / "again")
  for name in ("unet", "vae", "text_encoder"):
    first = common.flatten(store.load_component(tmp_path / "model", name)[1])
    second = common.flatten(store.load_component(tmp_path / "again", name)[1])
    assert first.keys() == second.keys()
    for k in first:
      np.testing.assert_array_equal(first[k], second[k])


def test_original_single_file(sd_dir, tmp_path):
  """A v1-5-pruned-emaonly.safetensors-style file (U-Net + VAE + CLIP text under their LDM prefixes)."""
  root, models = sd_dir
  model_dir_lib.import_diffusers(root, tmp_path / "reference")
  loaded = model_dir_lib.load_model(tmp_path / "reference")
  unet_fields = unet_models.unet_config("tiny")
  state = {}
  state.update(unet_weights.unet_to_ldm_state_dict(loaded["unet"][1], unet_fields))
  state.update(vae_weights.vae_to_ldm_state_dict(loaded["vae"][1]))
  state.update({model_dir_lib.LDM_CLIP_PREFIX + k: v
                for k, v in clip_weights.clip_text_to_transformers(loaded["text_encoder"][1]).items()})
  common.save_state_dict(state, tmp_path / "tiny-pruned-emaonly.safetensors")
  assert model_dir_lib.detect_single_file(state) == "sd1"

  model_dir_lib.import_single_file(tmp_path / "tiny-pruned-emaonly.safetensors", tmp_path / "single",
                              unet_config=unet_fields, vae_config=vae_models.vae_config("tiny"),
                              text_config=clip_models.clip_config("tiny").text)
  for name in ("unet", "vae", "text_encoder"):
    want = common.flatten(loaded[name][1])
    got = common.flatten(store.load_component(tmp_path / "single", name)[1])
    assert want.keys() == got.keys(), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  _assert_close(_sd_jax_outputs(tmp_path / "single"), _torch_outputs(models))


def test_pickle_directory_is_refused(tmp_path):
  (tmp_path / "sd" / "unet").mkdir(parents=True)
  (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps(
      unet_models.unet_config_to_diffusers(unet_models.unet_config("tiny"))))
  (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
  result = _convert(f"--from_diffusers={tmp_path / 'sd'}", f"--out={tmp_path / 'out'}")
  assert result.returncode == 1
  assert "pickle-based" in result.stderr and "safetensors" in result.stderr and "--allow_pickle" in result.stderr


def test_single_file_family_detection():
  prefix = model_dir_lib.LDM_UNET_PREFIX
  sd2 = {prefix + "input_blocks.0.0.weight": np.zeros(1),
         prefix + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": np.zeros((320, 1024))}
  assert model_dir_lib.detect_single_file(sd2) == "sd2"
  with pytest.raises(ValueError, match="not an original Stable Diffusion checkpoint"):
    model_dir_lib.detect_single_file({"foo": np.zeros(1)})


def test_readme_python_example_runs(sd_dir, tmp_path):
  """README's Python block, executed as written against a converted tiny model (path swapped)."""
  root, _ = sd_dir
  model_dir_lib.import_diffusers(root, tmp_path / "sd15")
  readme = (helpers.REPO / "README.md").read_text()
  start = readme.index("```python\nimport numpy as np\nfrom sd_jax.weights import model_dir as model_dir_lib")
  code = readme[start + len("```python\n"): readme.index("```", start + 10)]
  namespace: dict = {}
  exec(code.replace('"models/sd15', f'"{tmp_path / "sd15"}'), namespace)  # noqa: S102 (our own README)
  assert namespace["noise_pred"].shape == (1, 64, 64, 4)
  assert namespace["context"].shape == (1, 16, 32)
  assert namespace["image"].shape[0] == 1 and namespace["image"].shape[-1] == 3


def test_sd2_style_single_file_with_open_clip_text(tmp_path):
  """SD 2.x layout: linear-projection U-Net and the OpenCLIP text tower (fused q/k/v) under cond_stage_model.model."""
  from tests.weights.test_clip_weights import to_open_clip
  unet_fields = unet_models.unet_config("tiny", use_linear_projection=True, attention_head_dim=(2, 4),
                                        upcast_attention=True)
  text_config = clip_models.clip_config("tiny").text
  unet = _randomize(diffusers.UNet2DConditionModel(**_public(unet_models.unet_config_to_diffusers(unet_fields))), 3)
  vae = _randomize(diffusers.AutoencoderKL(
      **_public(vae_models.vae_config_to_diffusers(vae_models.create_vae("tiny")))), 4)
  text = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **clip_models.clip_config_to_transformers(dataclasses.replace(text_config, hidden_act="gelu")))), 5)
  text_state = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
  state = {k: np.asarray(v) for k, v in to_open_clip(text_state, model_dir_lib.LDM_OPENCLIP_PREFIX).items()}
  unet_params = unet_weights.unet_from_diffusers_state_dict(
      {k: v.numpy() for k, v in unet.state_dict().items()}, unet_fields)
  state.update(unet_weights.unet_to_ldm_state_dict(unet_params, unet_fields))
  vae_params = vae_weights.vae_from_diffusers_state_dict({k: v.numpy() for k, v in vae.state_dict().items()},
                                                         vae_models.vae_config("tiny"))
  state.update(vae_weights.vae_to_ldm_state_dict(vae_params))
  common.save_state_dict(state, tmp_path / "sd2-tiny.safetensors")

  model_dir_lib.import_single_file(tmp_path / "sd2-tiny.safetensors", tmp_path / "model", family="sd2",
                              unet_config=unet_fields, vae_config=vae_models.vae_config("tiny"),
                              text_config=dataclasses.replace(text_config, hidden_act="gelu"),
                              image_size=768, prediction_type="v_prediction")
  scheduler = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
  assert scheduler["prediction_type"] == "v_prediction"
  _assert_close(_sd_jax_outputs(tmp_path / "model"), _torch_outputs({"unet": unet, "vae": vae, "text_encoder": text}))


def test_model_trained_here_loads_in_diffusers(data_dir, tmp_path):
  """Train the pixel-space DDPM a few steps, export its EMA U-Net, load it with diffusers: same noise prediction."""
  from sd_jax import train
  # The train step of tests/test_train.py's reference run (constant schedule): JAX's persistent compilation cache
  # usually has it.
  config = helpers.load_config(total_steps=2, eval_every_steps=-1, **{"mesh.data": 1, "optim.schedule": "constant"})
  train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  result = _convert(f"--to_diffusers={tmp_path / 'run' / 'export'}", f"--out={tmp_path / 'diffusers'}")
  assert result.returncode == 0, result.stderr[-3000:]
  reference = diffusers.UNet2DModel.from_pretrained(tmp_path / "diffusers" / "unet").eval()
  unet, params = model_dir_lib.load_model(tmp_path / "run" / "export", components=("unet",))["unet"]
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  t = np.asarray([3, 900])
  ours = np.asarray(unet.apply({"params": params}, x, t))
  with torch.no_grad():
    theirs = _nhwc(reference(_nchw(x), torch.from_numpy(t)).sample)
  assert float(np.max(np.abs(ours - theirs))) <= TOL
  assert json.loads((tmp_path / "diffusers" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
