"""`python -m sd_jax.evaluate` end to end on tiny random networks (no training).

The fixture builds what the shapes pipeline leaves behind, with random weights: a CLIP run's export (clip/,
text_encoder/ = the CLIP's text tower, tokenizer/), a VAE export, and a finished ldm workdir (config.json of
configs/shapes_ldm.py:runlocal pointing at them, metrics.jsonl, export/ with a random U-Net), plus a shapes
evaluator trained for 2 steps. The metrics the command reports are checked against the library functions applied
to the same images, so a wrong prompt, reference set, guidance or feature space shows up as a number mismatch.
"""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import evaluate
from sd_jax import metrics as metrics_lib
from sd_jax import generate as generate_lib
from sd_jax.data import input_pipeline
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.eval import clip_score as clip_score_lib
from sd_jax.eval import fid as fid_lib
from sd_jax.eval import shapes_eval
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.weights import clip as clip_weights
from sd_jax.weights import store
from tests import helpers

FINAL_STEP = 6
N = 8  # images per evaluation: one sampling batch, split over the 8 fake devices
STEPS = 2


def _ldm_config(vae_dir, clip_dir):
  return helpers.load_config("shapes_ldm", "runlocal", **{"ldm.vae_from": str(vae_dir),
                                                          "ldm.text_from": str(clip_dir)})


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("evaluate")
  config = _ldm_config(root / "vae", root / "clip_export")
  dataset = config.dataset.to_dict()
  info = input_pipeline.dataset_info(dataset, "train")

  # A CLIP run's export: the two-tower CLIP, its text tower as text_encoder/, and its tokenizer.
  clip_dir = root / "clip_export"
  base = clip_lib.clip_config("tiny")
  tok = tokenizer_lib.train_tokenizer((info.captions(i) for i in range(info.num_examples)),
                                      str(clip_dir / "tokenizer"), vocab_size=600,
                                      max_length=base.text.max_position_embeddings)
  text_config = dataclasses.replace(base.text, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  clip_config = dataclasses.replace(base, text=text_config)
  clip_model = clip_lib.create_clip_model(clip_config)
  vision = clip_config.vision
  clip_params = nn.meta.unbox(clip_model.init(
      jax.random.PRNGKey(3), jnp.zeros((1, text_config.max_position_embeddings), jnp.int32),
      jnp.zeros((1, vision.image_size, vision.image_size, 3)))["params"])
  fields = clip_lib.clip_config_to_transformers(clip_config)
  fields["logit_bias_init_value"] = None
  store.save_component(clip_dir, clip_weights.CLIP_COMPONENT, fields, clip_params)
  store.save_component(clip_dir, "text_encoder", clip_lib.clip_config_to_transformers(text_config),
                       clip_params["text_model"])
  store.write_index(clip_dir, {"text_encoder": "CLIPTextModel"}, source="test")

  # A VAE run's export.
  vae = vae_lib.create_vae("tiny")
  vae_params = nn.meta.unbox(vae.init(jax.random.PRNGKey(1), **vae.example_inputs())["params"])
  store.save_component(root / "vae", "vae", vae_lib.vae_config_to_diffusers(vae), vae_params)
  store.write_index(root / "vae", {"vae": "AutoencoderKL"}, source="test")

  # A finished ldm run: config.json, training metrics, export/ with a random U-Net (fields as the trainer derives).
  workdir = root / "ldm"
  export = workdir / "export"
  unet_fields = config.model.to_dict()
  unet_fields.update(in_channels=vae.latent_channels, out_channels=vae.latent_channels,
                     cross_attention_dim=text_config.hidden_size,
                     sample_size=config.dataset.resolution // vae.downsample_factor)
  unet = unet_lib.create_unet(unet_fields)
  unet_params = nn.meta.unbox(unet.init(jax.random.PRNGKey(4), **unet.example_inputs(
      context_length=text_config.max_position_embeddings))["params"])
  store.save_component(export, "unet", unet_lib.unet_config_to_diffusers(unet_fields), unet_params)
  shutil.copytree(root / "vae" / "vae", export / "vae")
  shutil.copytree(clip_dir / "text_encoder", export / "text_encoder")
  shutil.copytree(clip_dir / "tokenizer", export / "tokenizer")
  d, s = config.diffusion, config.sample
  (export / "scheduler").mkdir()
  (export / "scheduler" / "scheduler_config.json").write_text(json.dumps({
      "_class_name": "DDIMScheduler", "num_train_timesteps": d.num_train_timesteps, "beta_schedule": d.schedule,
      "beta_start": d.beta_start, "beta_end": d.beta_end, "prediction_type": d.prediction_type,
      "timestep_spacing": s.timestep_spacing, "steps_offset": s.steps_offset,
      "set_alpha_to_one": s.set_alpha_to_one, "clip_sample": False}))
  store.write_index(export, {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                             "text_encoder": "CLIPTextModel"}, source="test")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  (workdir / metrics_lib.METRICS_FILE).write_text("".join(
      json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(2, FINAL_STEP + 1, 2)))

  evaluator, _ = shapes_eval.fit(shapes_eval.TrainConfig(steps=2, batch_size=4))
  shapes_eval.save_evaluator(evaluator, root / "evaluator")
  return {"root": root, "workdir": workdir, "clip_dir": clip_dir, "evaluator_dir": root / "evaluator",
          "dataset": dict(dataset), "stats": root / "stats", "config": config}


def _run(argv):
  evaluate.main([str(a) for a in argv])


def _eval_rows(workdir):
  return [r for r in metrics_lib.read_metrics(workdir) if "eval_settings" in r]


@pytest.fixture(scope="module")
def first(env):
  """One evaluation of the workdir with every metric but FID: its JSON result."""
  _run(["--workdir", env["workdir"], "--metrics", "fd_clip,kd_clip,clip_score,shapes_accuracy", "--num_samples", N,
        "--sampler", "ddim", "--steps", STEPS, "--batch_size", N, "--shapes_evaluator", env["evaluator_dir"],
        "--stats_cache", env["stats"], "--kid_subset_size", 4, "--kid_subsets", 5])
  out = env["workdir"] / "eval" / f"fd_clip-kd_clip-clip_score-shapes_accuracy_ddim_{STEPS}.json"
  return json.loads(out.read_text())


def test_workdir_evaluation_matches_the_library(env, first):
  settings = first["settings"]
  assert settings["step"] == FINAL_STEP and settings["split"] == "test" and settings["num_samples"] == N
  assert settings["guidance"] == env["config"].sample.guidance_scale  # the run's own guidance by default
  assert settings["clip"] == str(env["clip_dir"])  # found through the run's ldm.text_from
  assert settings["resolution"] == env["config"].dataset.resolution
  assert first["reference"]["clip"]["cached"] is False and first["reference"]["clip"]["num_images"] == N

  # The same images, prompts and references through the library.
  dataset = {**env["dataset"], "tokenizer": "", "precomputed_dir": ""}
  prompts = [input_pipeline.dataset_info(dataset, "test").captions(i) for i in range(N)]
  pipe = generate_lib.TextToImage.from_workdir(env["workdir"])
  images = pipe.generate(prompts, steps=STEPS, guidance=env["config"].sample.guidance_scale, seed=0, batch_size=N,
                         sampler="ddim")
  real = evaluate.real_images(dataset, "test", N)
  model, params = clip_weights.load_exported_clip(env["clip_dir"])
  extractor = fid_lib.clip_extractor(model, params, normalization="sd_jax")
  gen_features, real_features = extractor(images), extractor(real)
  want_fd = fid_lib.frechet_distance(*fid_lib.feature_statistics(gen_features),
                                     *fid_lib.feature_statistics(real_features))
  want_kd = fid_lib.kernel_distance(gen_features, real_features, num_subsets=5, subset_size=4, seed=0)
  tokenizer = tokenizer_lib.load_clip_tokenizer(str(env["clip_dir"] / "tokenizer"),
                                                max_length=model.config.text.max_position_embeddings)
  want_cs = clip_score_lib.clip_score(model, params, images, prompts, tokenizer=tokenizer, normalization="sd_jax")
  want_acc = shapes_eval.load_evaluator(str(env["evaluator_dir"])).score(images, prompts).accuracy

  assert first["fd_clip"] > 0
  np.testing.assert_allclose(first["fd_clip"], want_fd, rtol=1e-4)
  np.testing.assert_allclose([first["kd_clip"], first["kd_clip_std"]], [want_kd.mean, want_kd.std], rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(first["clip_score"], want_cs.score, rtol=1e-5)
  assert first["shapes_accuracy"] == want_acc

  # ... and the row appended to metrics.jsonl, at the run's final step.
  rows = _eval_rows(env["workdir"])
  assert rows[0]["step"] == FINAL_STEP
  assert rows[0]["eval_fd_clip"] == first["fd_clip"] and rows[0]["eval_kd_clip"] == first["kd_clip"]
  assert rows[0]["eval_clip_score"] == first["clip_score"]
  assert rows[0]["eval_shapes_acc_test"] == first["shapes_accuracy"]
  assert "ddim 2 steps" in rows[0]["eval_settings"]
  assert list(env["workdir"].glob("events.out.tfevents.*"))  # TensorBoard gets them too


def test_reference_statistics_are_read_from_the_cache(env, first, monkeypatch, tmp_path):
  def no_data(*args, **kwargs):
    raise AssertionError("the reference statistics should come from the cache")

  monkeypatch.setattr(input_pipeline, "create_iterator", no_data)
  out = tmp_path / "again.json"
  _run(["--workdir", env["workdir"], "--metrics", "fd_clip,kd_clip", "--num_samples", N, "--steps", STEPS,
        "--batch_size", N, "--stats_cache", env["stats"], "--kid_subset_size", 4, "--kid_subsets", 5, "--out", out])
  again = json.loads(out.read_text())
  assert again["reference"]["clip"]["cached"] is True
  assert again["reference"]["clip"]["cache_file"] == first["reference"]["clip"]["cache_file"]
  assert again["fd_clip"] == first["fd_clip"] and again["kd_clip"] == first["kd_clip"]  # same seed, same images


def test_real_against_real_is_zero(env):
  dataset = evaluate.dataset_config(env["dataset"], [])
  scorers = evaluate.build_scorers(["fd_clip"], clip_dir=env["clip_dir"])
  num = 16
  references = evaluate.reference_statistics(scorers, dataset, "test", num_images=num, resolution=16,
                                             stats_cache=env["root"] / "stats_rr", batch_size=num)
  real = evaluate.real_images(dataset, "test", num, batch_size=num)
  prompts = evaluate.split_prompts(dataset, "test", num)
  same = evaluate.score_images(real, prompts, scorers, references)["fd_clip"]
  other = evaluate.score_images(evaluate.real_images(dataset, "compositional", num), prompts, scorers,
                                references)["fd_clip"]
  scale = np.trace(references["clip"].stats.sigma)
  assert abs(same) < 1e-6 * scale, (same, scale)
  assert other > 1e-3 * scale, (other, scale)


def test_compositional_split_and_another_sampler(env):
  _run(["--workdir", env["workdir"], "--metrics", "shapes_accuracy", "--split", "compositional", "--num_samples", N,
        "--sampler", "euler", "--steps", STEPS, "--batch_size", N, "--shapes_evaluator", env["evaluator_dir"]])
  result = json.loads((env["workdir"] / "eval" / f"shapes_accuracy_euler_{STEPS}_compositional.json").read_text())
  assert result["settings"]["split"] == "compositional" and result["settings"]["sampler"] == "euler"
  dataset = {**env["dataset"], "tokenizer": "", "precomputed_dir": ""}
  prompts = evaluate.split_prompts(dataset, "compositional", N)
  images = generate_lib.TextToImage.from_workdir(env["workdir"]).generate(
      prompts, steps=STEPS, guidance=env["config"].sample.guidance_scale, seed=0, batch_size=N, sampler="euler")
  score = shapes_eval.load_evaluator(str(env["evaluator_dir"])).score(images, prompts)
  assert result["shapes_accuracy"] == score.accuracy
  np.testing.assert_equal(result["shapes_breakdown"], score.breakdown())  # NaN where a prompt type is absent
  row = _eval_rows(env["workdir"])[-1]
  assert row["step"] == FINAL_STEP and row["eval_shapes_acc_compositional"] == result["shapes_accuracy"]
  assert "eval_shapes_acc_test" not in row


def test_pretrained_with_a_prompts_file(env, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n\na blue square\n")
  out = tmp_path / "r.json"
  before = metrics_lib.read_metrics(env["workdir"])
  _run(["--pretrained", env["workdir"] / "export", "--prompts_file", prompts, "--num_samples", 2, "--metrics",
        "clip_score", "--clip", env["clip_dir"], "--steps", STEPS, "--out", out])
  result = json.loads(out.read_text())
  assert 0.0 <= result["clip_score"] <= 100.0
  assert result["settings"]["guidance"] == 7.5 and result["settings"]["step"] is None
  assert metrics_lib.read_metrics(env["workdir"]) == before  # only --workdir appends to metrics.jsonl


def test_fid_with_an_inception_weights_file(env, tmp_path, monkeypatch):
  """The Inception path's wiring (fid / kid keys, eval_fid, the weights file keying the cache) with a cheap stand-in
  for the network: the real one, and its conversion, are tested in tests/eval/test_inception.py."""
  weights = tmp_path / "inception.pth"
  weights.write_bytes(b"random weights")
  calls = []

  def fake_inception(path, *, batch_size=50, dtype=None):
    calls.append(str(path))

    def embed(images):  # [B, 16, 16, 3] -> [B, 48]: every 4th pixel
      return jnp.reshape(images[:, ::4, ::4], (len(images), -1))

    return fid_lib.FeatureExtractor(name="inception", fd_metric="fid", kd_metric="kid", dim=48, embed=embed,
                                    batch_size=batch_size)

  monkeypatch.setattr(fid_lib, "inception_extractor", fake_inception)
  out = tmp_path / "fid.json"
  _run(["--workdir", env["workdir"], "--metrics", "fid,kid", "--inception_weights", weights, "--num_samples", N,
        "--steps", STEPS, "--batch_size", N, "--stats_cache", env["stats"], "--kid_subset_size", 4, "--out", out])
  result = json.loads(out.read_text())
  assert calls == [str(weights)]
  assert result["fid"] > 0 and {"kid", "kid_std"} <= set(result) and "fd_clip" not in result
  assert "/inception-" in result["reference"]["inception"]["cache_file"]
  row = _eval_rows(env["workdir"])[-1]
  assert row["eval_fid"] == result["fid"] and row["eval_kid"] == result["kid"]


def _error(argv, capsys, code):
  with pytest.raises(SystemExit) as e:
    _run(argv)
  assert e.value.code == code
  return capsys.readouterr().err


def test_fid_without_inception_weights_is_a_clear_error(env, capsys):
  err = _error(["--workdir", env["workdir"], "--metrics", "fid,clip_score"], capsys, 1)
  assert "--inception_weights" in err and "fd_clip" in err and "pt_inception-2015-12-05" in err
  with pytest.raises(evaluate.CommandError, match="--inception_weights.*fd_clip"):
    evaluate.build_scorers(["kid"])


@pytest.mark.parametrize("argv, code, message", [
    (["--metrics", "fd_clip"], 1, "one of the arguments --workdir --pretrained is required"),
    (["--workdir", "W"], 1, "--metrics"),
    (["--workdir", "W", "--metrics", "fd_clip,is"], 1, "unknown is"),
    (["--workdir", "W", "--metrics", "fd_clip", "--num_samples", "0"], 1, "--num_samples=0"),
    (["--workdir", "W", "--metrics", "fd_clip", "--sampler", "plms"], 1, "invalid choice: 'plms'"),
    (["--workdir", "W", "--metrics", "fd_clip", "--sampler", "euler", "--eta", "0.5"], 1, "only for --sampler=ddim"),
    (["--workdir", "W", "--pretrained", "M", "--metrics", "fd_clip"], 1, "not allowed with"),
    (["--pretrained", "M", "--metrics", "clip_score"], 1, "--dataset KEY=VALUE"),
])
def test_bad_flags(argv, code, message, capsys):
  assert message in _error(argv, capsys, code)


def test_bad_inputs(env, capsys, tmp_path):
  w = ["--workdir", env["workdir"], "--stats_cache", env["stats"]]
  err = _error([*w, "--metrics", "clip_score", "--num_samples", 1000], capsys, 1)
  assert "--num_samples=1000" in err and "only 64 examples" in err
  err = _error([*w, "--metrics", "fd_clip", "--dataset", "colour=red"], capsys, 1)
  assert "--dataset 'colour=red'" in err
  err = _error([*w, "--metrics", "clip_score", "--clip", env["workdir"]], capsys, 1)
  assert "holds no two-tower CLIP" in err
  err = _error([*w, "--metrics", "shapes_accuracy", "--shapes_evaluator", tmp_path], capsys, 1)
  assert "python -m sd_jax.eval.shapes_eval --out DIR" in err
  err = _error(["--workdir", tmp_path / "nowhere", "--metrics", "clip_score"], capsys, 1)
  assert "does not exist" in err
  prompts = tmp_path / "p.txt"
  prompts.write_text("a cat on a mat\n")
  err = _error([*w, "--metrics", "shapes_accuracy", "--prompts_file", prompts, "--num_samples", 1,
                "--shapes_evaluator", env["evaluator_dir"]], capsys, 1)
  assert "prompt 0 cannot be checked" in err
