"""sd_jax.sample: TextToImage against diffusers' Stable Diffusion pipelines, and the `python -m sd_jax.sample` command.

A tiny random-weight Stable Diffusion (diffusers UNet2DConditionModel + AutoencoderKL, transformers CLIPTextModel, a
trained CLIP tokenizer, an SD-style DDIM scheduler config) is saved as a diffusers directory and imported with
sd_jax.weights.model_dir.import_diffusers. diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline run on
the same networks with the same initial noise: the decoded images agree within 1e-3, which checks the whole chain
(tokenizer, text tower, classifier-free guidance with negative prompts, the sampler, the latent scaling factor and
the VAE). The tests share one compiled sampling function per setting (a module-scoped pipeline), which keeps them
fast; the command-line tests reuse those settings.
"""

import json
import pathlib

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from sd_jax import generate
from sd_jax import sample
from sd_jax.diffusion import samplers
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.models import clip as clip_models
from sd_jax.models import unet as unet_models
from sd_jax.models import vae as vae_models
from sd_jax.weights import model_dir as model_dir_lib
from tests import helpers

TOL = 1e-3  # decoded images in [0, 1], float32 JAX vs float32 PyTorch
PROMPTS = ["a small red circle", "a large green star above a blue square"]
SIZE = 32  # pixels: the tiny U-Net's sample_size 16 × the tiny VAE's factor 2
STEPS = 4
GUIDANCE = 3.0


_randomize = helpers.randomize_torch
_public = helpers.public_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """(diffusers directory, sd_jax model directory, the torch networks)."""
  root = tmp_path_factory.mktemp("sd_diffusers")
  tok = tokenizer_lib.train_tokenizer(["a small red circle above a blue square", "a large green star"] * 8,
                                      str(root / "tokenizer"), vocab_size=600, max_length=16)
  unet = _randomize(diffusers.UNet2DConditionModel(
      **_public(unet_models.unet_config_to_diffusers(unet_models.unet_config("tiny")))), 0)
  # scaling_factor != 1 so that a missing or doubled latent scaling shows.
  vae = _randomize(diffusers.AutoencoderKL(
      **_public(vae_models.vae_config_to_diffusers(vae_models.create_vae("tiny", scaling_factor=0.5)))), 1)
  text_config = clip_models.clip_config_to_transformers(clip_models.clip_config("tiny").text)
  text_config.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
  text = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config)), 2)
  unet.save_pretrained(root / "unet")
  vae.save_pretrained(root / "vae")
  text.save_pretrained(root / "text_encoder")
  # Stable Diffusion 1.x/2.x's scheduler settings.
  diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1).save_pretrained(root / "scheduler")
  (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  model_dir = tmp_path_factory.mktemp("sd_jax") / "model"
  model_dir_lib.import_diffusers(root, model_dir)
  return root, model_dir, {"unet": unet, "vae": vae, "text_encoder": text}


@pytest.fixture(scope="module")
def pipe(model):
  p = generate.TextToImage.from_model_dir(model[1])
  p.devices = jax.local_devices()[:1]
  return p


def _torch_pipeline(model, cls, scheduler):
  root, _, nets = model
  p = cls(vae=nets["vae"], text_encoder=nets["text_encoder"], unet=nets["unet"], scheduler=scheduler,
          tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"), safety_checker=None,
          feature_extractor=None, requires_safety_checker=False)
  p.set_progress_bar_config(disable=True)
  return p


def _noise(seed: int, batch: int = len(PROMPTS)) -> torch.Tensor:
  """The initial noise TextToImage draws for images 0..batch-1 of `seed` (samplers.image_noise), NCHW for
  diffusers."""
  noise, _ = samplers.image_noise(seed, np.arange(batch), (SIZE // 2, SIZE // 2, 4))
  noise = np.asarray(noise)
  return torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2)))


def _assert_close(got, want):
  assert got.shape == want.shape, (got.shape, want.shape)
  err = float(np.max(np.abs(got - want)))
  assert err <= TOL, f"max abs diff {err}"
  # Not a trivial agreement: the images are not saturated to 0 / 1 by the clip.
  assert np.mean((want > 0.01) & (want < 0.99)) > 0.5


def _scheduler(model, name):
  """diffusers' `name` scheduler with the model's scheduler config (as Scheduler.from_config swaps them)."""
  ddim = diffusers.DDIMScheduler.from_pretrained(model[0] / "scheduler")
  return getattr(diffusers, name).from_config(ddim.config)


# DDIM as the scheduler config says (leading spacing, steps_offset 1, ᾱ_0 past the end); Euler (σ-scaled start and
# model inputs) with a negative prompt per prompt and guidance rescale. Each sampler's own agreement with its diffusers
# scheduler (DPM-Solver++, Karras σ, ...) is tested in tests/diffusion/test_samplers.py.
@pytest.mark.parametrize("sampler, scheduler, negative, rescale", [
    ("ddim", "DDIMScheduler", "", 0.0),
    ("euler", "EulerDiscreteScheduler", ["a blue square", "a small circle"], 0.7),
])
def test_txt2img_matches_diffusers(model, pipe, sampler, scheduler, negative, rescale):
  got = pipe.generate(PROMPTS, negative_prompt=negative, steps=STEPS, guidance=GUIDANCE, seed=1, sampler=sampler,
                      guidance_rescale=rescale, output_type="np")
  reference = _torch_pipeline(model, diffusers.StableDiffusionPipeline, _scheduler(model, scheduler))
  with torch.no_grad():
    want = reference(PROMPTS, negative_prompt=[negative] * 2 if isinstance(negative, str) else negative,
                     height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     guidance_rescale=rescale, latents=_noise(1), output_type="np").images
  _assert_close(got, want)


def test_img2img_matches_diffusers(model, pipe, monkeypatch):
  """One init image per prompt, strength 0.5: the last 2 of 4 DDIM steps, from the noised posterior mean."""
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  init = np.stack([np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1), rng.integers(0, 256, (SIZE, SIZE, 3))])
  init = init.clip(0, 255).astype(np.uint8)
  got = pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=2, init_image=init, strength=0.5,
                      output_type="np")
  # diffusers samples the posterior; TextToImage takes its mean (the module docstring says why): make the
  # reference do the same, and add TextToImage's noise.
  monkeypatch.setattr(img2img_module, "retrieve_latents", lambda output, generator=None: output.latent_dist.mode())
  monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **_: _noise(2).reshape(shape))
  reference = _torch_pipeline(model, diffusers.StableDiffusionImg2ImgPipeline, _scheduler(model, "DDIMScheduler"))
  with torch.no_grad():
    want = reference(PROMPTS, image=[Image.fromarray(i) for i in init], strength=0.5, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, output_type="np").images
  _assert_close(got, want)
  # The image matters: txt2img with the same seed and the same settings gives something else.
  txt2img = pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=2, output_type="np")
  assert np.abs(txt2img - got).mean() > 0.01


def test_same_seed_same_images_compiled_once(pipe):
  """Three prompts in batches of 2 (the last one padded): one trace, reused; same seed → same images."""
  prompts = PROMPTS + ["a blue square"]
  before = pipe.num_traces
  first = pipe.generate(prompts, steps=STEPS, guidance=GUIDANCE, seed=5, batch_size=2)
  assert pipe.num_traces - before <= 1  # 0 when an earlier test compiled these settings
  traced = pipe.num_traces
  again = pipe.generate(prompts, steps=STEPS, guidance=GUIDANCE, seed=5, batch_size=2)
  assert pipe.num_traces == traced
  assert first.shape == (3, SIZE, SIZE, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  # Batch 0 of a run is the same whatever follows it; another seed or a negative prompt changes the images.
  np.testing.assert_array_equal(pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=5), first[:2])
  other_seed = pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=6)
  negative = pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=5, negative_prompt="a large green star")
  assert pipe.num_traces == traced
  for changed in (other_seed, negative):
    assert np.abs(changed.astype(int) - first[:2]).mean() > 1.0
  # num_images: prompt-major, every image of a prompt different.
  pairs = pipe.generate(PROMPTS[:1], num_images=2, steps=STEPS, guidance=GUIDANCE, seed=5)
  assert pairs.shape == (2, SIZE, SIZE, 3) and np.abs(pairs[0].astype(int) - pairs[1]).mean() > 1.0


def test_stochastic_sampler_and_sharded_batch(model, pipe):
  """Euler-a (fresh noise each step) is seeded; a batch sharded over 2 devices draws what one device draws."""
  kwargs = dict(steps=STEPS, guidance=GUIDANCE, seed=3, sampler="euler_a", output_type="np")
  np.testing.assert_array_equal(pipe.generate(PROMPTS, **kwargs), pipe.generate(PROMPTS, **kwargs))
  assert np.abs(pipe.generate(PROMPTS, **{**kwargs, "seed": 4}) - pipe.generate(PROMPTS, **kwargs)).mean() > 0.01
  kwargs = dict(steps=STEPS, guidance=GUIDANCE, seed=1, output_type="np")
  sharded = generate.TextToImage.from_model_dir(model[1])
  sharded.devices = jax.local_devices()[:2]
  np.testing.assert_allclose(sharded.generate(PROMPTS, **kwargs), pipe.generate(PROMPTS, **kwargs), atol=1e-5)
  assert [key[-1] for key in sharded._compiled] == [True]  # it did run on the 2-device mesh


def test_generate_errors(pipe):
  with pytest.raises(ValueError, match="--height=30: must be a positive multiple of 4"):
    pipe.generate(PROMPTS, height=30)
  with pytest.raises(ValueError, match="--sampler='heun'"):
    pipe.generate(PROMPTS, sampler="heun")
  with pytest.raises(ValueError, match="--eta=0.5 with --sampler=euler"):
    pipe.generate(PROMPTS, sampler="euler", eta=0.5)
  init = np.zeros((SIZE, SIZE, 3), np.uint8)
  for strength in (0.0, 1.5):
    with pytest.raises(ValueError, match=f"--strength={strength}: must be in"):
      pipe.generate(PROMPTS, init_image=init, strength=strength)
  with pytest.raises(ValueError, match="runs no step"):
    pipe.generate(PROMPTS, init_image=init, strength=0.1, steps=4)
  with pytest.raises(ValueError, match="float images must be in"):
    pipe.generate(PROMPTS, init_image=init.astype(np.float32) + 3)
  with pytest.raises(ValueError, match="3 images for 2 prompts"):
    pipe.generate(PROMPTS, init_image=np.zeros((3, SIZE, SIZE, 3), np.uint8))
  for guidance in (float("nan"), float("inf"), -1.0):
    with pytest.raises(ValueError, match=f"--guidance={guidance}: must be a finite number >= 0"):
      pipe.generate(PROMPTS, guidance=guidance)
  # A model that gives NaN (here: NaN weights) is an error naming the prompt and seed, never a black image.
  nan_unet = jax.tree.map(lambda x: np.full(np.shape(x), np.nan, np.float32), pipe.unet_params)
  params = {"unet": nan_unet, "vae": pipe.vae_params, "text_encoder": pipe.text_params}
  with pytest.raises(FloatingPointError, match=r"NaN/Inf for prompt 'a small red circle' \(image 0 of seed 7; 2 of"):
    pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=7, params=params)


# ----------------------------------------------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------------------------------------------


def _main_error(capsys, argv) -> tuple[int, str]:
  with pytest.raises(SystemExit) as e:
    sample.main(argv)
  return e.value.code, capsys.readouterr().err


def test_command_writes_images_grid_and_settings(model, pipe, tmp_path):
  out = tmp_path / "out"
  argv = ["--pretrained", str(model[1]), "--prompt", *PROMPTS, "--steps", str(STEPS), "--guidance", str(GUIDANCE),
          "--seed", "1", "--out", str(out)]
  assert sample.main(argv) == 0
  names = ["0000_a_small_red_circle.png", "0001_a_large_green_star_above_a_blue_square.png"]
  want = pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=1)
  for name, image in zip(names, want, strict=True):
    np.testing.assert_array_equal(np.asarray(Image.open(out / name)), image)
  grid = np.asarray(Image.open(out / "grid.png"))
  assert grid.ndim == 3 and grid.shape[-1] == 3 and grid.shape[0] > SIZE
  settings = json.loads((out / "settings.json").read_text())
  assert settings["images"] == names and settings["sampler"] == "ddim" and settings["scheduler"]["steps_offset"] == 1
  assert (settings["height"], settings["width"], settings["prompts"]) == (SIZE, SIZE, PROMPTS)

  # img2img from a prompts file, the init image resized to --height/--width.
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(PROMPTS) + "\n\n")
  Image.fromarray(np.full((48, 40, 3), 200, np.uint8)).save(tmp_path / "init.png")
  out2 = tmp_path / "img2img"
  assert sample.main(["--pretrained", str(model[1]), "--prompts_file", str(prompts_file), "--init_image",
                      str(tmp_path / "init.png"), "--height", str(SIZE), "--width", str(SIZE), "--strength", "0.5",
                      "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed", "2", "--out", str(out2)]) == 0
  want = pipe.generate(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=2, strength=0.5,
                       init_image=np.full((SIZE, SIZE, 3), 200, np.uint8))
  np.testing.assert_array_equal(np.asarray(Image.open(out2 / names[1])), want[1])
  assert json.loads((out2 / "settings.json").read_text())["strength"] == 0.5


def test_pretrained_takes_a_diffusers_directory_directly(model, pipe, data_dir, tmp_path):
  """--pretrained DIFFUSERS_DIR: converted once into the cache beside the datasets, then reused; the images are
  those of the sd_jax model directory converted by hand."""
  out = tmp_path / "out"
  argv = ["--pretrained", str(model[0]), "--prompt", PROMPTS[0], "--steps", str(STEPS), "--guidance", str(GUIDANCE),
          "--seed", "4", "--out", str(out)]
  assert sample.main(argv) == 0
  want = pipe.generate(PROMPTS[:1], steps=STEPS, guidance=GUIDANCE, seed=4)
  np.testing.assert_array_equal(np.asarray(Image.open(out / "0000_a_small_red_circle.png")), want[0])
  cache = pathlib.Path(model_dir_lib.default_cache_dir())
  (converted,) = [p for p in cache.iterdir() if p.name.startswith("sd_diffusers")]
  stamp = (converted / "sd_jax_model.json").stat().st_mtime_ns
  assert sample.main(argv) == 0 and (converted / "sd_jax_model.json").stat().st_mtime_ns == stamp  # reused


def test_command_errors(model, tmp_path, capsys):
  _, model_dir, _ = model
  base = ["--prompt", "a red circle", "--out", str(tmp_path / "out")]
  code, err = _main_error(capsys, ["--workdir", str(tmp_path / "nowhere"), *base])
  assert code == 1 and "--workdir" in err and "does not exist" in err
  code, err = _main_error(capsys, ["--workdir", str(tmp_path), *base])
  assert code == 1 and "has no export/" in err
  code, err = _main_error(capsys, ["--pretrained", str(tmp_path / "nowhere"), *base])
  assert code == 1 and "--pretrained" in err and "does not exist" in err
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  code, err = _main_error(capsys, ["--pretrained", str(model_dir), "--prompts_file", str(empty), "--out",
                                   str(tmp_path / "out")])
  assert code == 1 and "--prompts_file" in err and "has no prompts" in err
  code, err = _main_error(capsys, ["--pretrained", str(model_dir), *base, "--height", "30"])
  assert code == 1 and "--height=30: must be a positive multiple of 4" in err
  code, err = _main_error(capsys, ["--pretrained", str(model_dir), *base, "--sampler", "heun"])
  assert code == 1 and "--sampler" in err and "dpmpp_2m" in err
  Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(tmp_path / "odd.png")
  code, err = _main_error(capsys, ["--pretrained", str(model_dir), *base, "--init_image", str(tmp_path / "odd.png")])
  assert code == 1 and "--init_image" in err and "--height=30" in err and "Pass --height and --width" in err
  for strength in ("0", "1.5"):
    code, err = _main_error(capsys, ["--pretrained", str(model_dir), *base, "--init_image",
                                     str(tmp_path / "odd.png"), "--strength", strength])
    assert code == 1 and f"--strength={float(strength)}: must be in (0, 1]" in err
  code, err = _main_error(capsys, ["--pretrained", str(model_dir), *base, "--strength", "0.5"])
  assert code == 1 and "give --init_image" in err
  code, err = _main_error(capsys, ["--pretrained", str(model_dir), *base, "--sampler", "euler", "--eta", "0.5"])
  assert code == 1 and "--eta=0.5" in err
  for value in ("nan", "inf"):
    code, err = _main_error(capsys, ["--pretrained", str(model_dir), *base, "--guidance", value])
    assert code == 1 and f"--guidance={float(value)}: must be a finite number." in err
  assert not (tmp_path / "out").exists()  # nothing written on an error
