"""The ldm trainer on tiny random-weight frozen networks: training, meshes, resume, samples, export, precompute.

The VAE and text tower are stage outputs built here with weights/store.py (random init, as a real VAE / CLIP run's
export/ would hold trained ones), so the tests need no earlier training run. Compiling dominates the run time, so the
tests share programs: two loop runs (1 and 8 devices), and unit tests that reuse the reference run's checkpoint.
"""

import functools
import json
import shutil
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from sd_jax import checkpoint as ckpt_lib
from sd_jax import metrics
from sd_jax import parallel
from sd_jax import precompute as precompute_lib
from sd_jax import train
from sd_jax.data import input_pipeline
from sd_jax.data import precomputed
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.diffusion import samplers
from sd_jax.diffusion import schedules
from sd_jax.models import clip as clip_lib
from sd_jax.models import vae as vae_lib
from sd_jax.trainers import ldm
from sd_jax.weights import model_dir as model_dir_lib
from sd_jax.weights import store
from tests import helpers

STEPS = 6
SAVE_EVERY = 3


@pytest.fixture(scope="module")
def stages(tmp_path_factory, data_dir):
  """(vae_dir, text_dir): sd_jax model directories like a VAE run's and a CLIP run's WORKDIR/export."""
  root = tmp_path_factory.mktemp("stages")
  text_config = clip_lib.clip_config("tiny").text
  dataset = helpers.load_config("shapes_ldm", "runlocal").dataset
  info = input_pipeline.dataset_info(dataset, "train")
  tok = tokenizer_lib.train_tokenizer((info.captions(i) for i in range(info.num_examples)),
                                      str(root / "text" / "tokenizer"), vocab_size=600,
                                      max_length=text_config.max_position_embeddings)

  vae = vae_lib.create_vae("tiny")
  vae_params = nn.meta.unbox(vae.init(jax.random.PRNGKey(1), **vae.example_inputs())["params"])
  store.save_component(root / "vae", "vae", vae_lib.vae_config_to_diffusers(vae), vae_params)
  store.write_index(root / "vae", {"vae": "AutoencoderKL"}, source="test")

  # The tiny tower, with the vocabulary and special ids of the tokenizer it is used with.
  text = clip_lib.create_clip_text_model(text_config, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  text_params = nn.meta.unbox(text.init(jax.random.PRNGKey(2), **text.example_inputs())["params"])
  store.save_component(root / "text", "text_encoder", clip_lib.clip_config_to_transformers(text.config), text_params)
  store.write_index(root / "text", {"text_encoder": "CLIPTextModel"}, source="test")
  return root / "vae", root / "text"


def _config(stages, **overrides):
  vae_dir, text_dir = stages
  base = {"ldm.vae_from": str(vae_dir), "ldm.text_from": str(text_dir), "total_steps": STEPS, "log_every_steps": 1,
          "save_every_steps": SAVE_EVERY, "eval_every_steps": -1, "optim.schedule": "constant"}
  base.update(overrides)
  return helpers.load_config("shapes_ldm", "runlocal", **base)


def _batch(config, split="train"):
  it = input_pipeline.create_iterator(config.dataset, split=split, global_batch_size=config.batch_size,
                                      seed=config.seed, train=split == config.dataset.train_split)
  batch = next(it)
  it.close()
  return batch


def _restore(workdir, setup, step):
  """The checkpointed state, sharded as the loop holds it."""
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=3, with_data=False)
  state = checkpointer.restore(step, setup.abstract_state)
  checkpointer.close()
  return state


@pytest.fixture(scope="module")
def reference(stages, tmp_path_factory):
  """One uninterrupted single-device run, with the held-out loss, a sample grid and the export at the end."""
  workdir = tmp_path_factory.mktemp("ldm_reference")
  config = _config(stages, eval_every_steps=0, sample_every_steps=0, **{"mesh.data": 1})
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return workdir


@pytest.fixture(scope="module")
def trained(stages, reference):
  """What the unit tests share: the reference run's setup, final params, frozen networks and one batch."""
  config = _config(stages, **{"mesh.data": 1})
  setup = train.cached_setup(config, devices=jax.devices()[:1])
  return dict(config=config, setup=setup, task=setup.task, state=jax.device_get(_restore(reference, setup, STEPS)),
              frozen=setup.task.load_frozen(), batch=_batch(config),
              keys=jax.random.split(jax.random.PRNGKey(1), config.batch_size),
              per_example=jax.jit(setup.task.per_example_loss))


def test_workdir_metrics_and_sample_grid(reference):
  rows = metrics.read_metrics(reference)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
  for row in train_rows:
    for key in ("loss", "grad_norm", "latents_std", "caption_dropout_rate"):
      assert np.isfinite(row[key]), key
  assert any("eval_loss" in r and np.isfinite(r["eval_loss"]) for r in rows)
  grid = np.asarray(Image.open(reference / "samples" / f"step_{STEPS:07d}.png"))
  assert grid.ndim == 3 and grid.shape[-1] == 3
  assert grid.shape[0] > 32 and grid.shape[1] >= 2 * 32  # 2 images per prompt at 32 px, plus the caption band
  assert (grid < 128).any()  # caption text (black on white) and images were drawn
  assert list(reference.glob("events.out.tfevents.*"))


def test_a_few_steps_lower_the_held_out_loss(trained, reference):
  """The loop's own programs (init, eval; arguments placed as the loop places them, so the compiled programs are
  reused) on a held-out batch with fixed draws: the params after a few steps beat the initial ones."""
  config, setup = trained["config"], trained["setup"]
  initial = setup.init_fn(jax.random.PRNGKey(config.seed)).params  # the reference run's step 0
  final = _restore(reference, setup, STEPS).params
  evaluate = jax.jit(functools.partial(train.eval_step, task=setup.task, seed=config.seed))
  frozen = setup.load_frozen()
  held_out = parallel.host_batch_to_global(_batch(config, config.dataset.eval_split), setup.batch_sharding)
  before = float(evaluate(initial, frozen, held_out)["loss"])
  after = float(evaluate(final, frozen, held_out)["loss"])
  assert after < 0.9 * before, (before, after)


def test_eight_devices_match_one(stages, reference, tmp_path):
  """8 fake devices as data=2 × fsdp=4 (both axes in one mesh, so one compiled program covers both): the U-Net and
  both frozen networks sharded 4 ways over fsdp and replicated over data, the batch split over all 8 devices; the
  single-device losses."""
  config = _config(stages, **{"mesh.data": 2, "mesh.fsdp": 4})
  setup = train.setup(config)
  split_over = lambda tree, axis: any(  # noqa: E731  (some param split over that axis)
      s.mesh.shape[axis] > 1 and axis in str(s.spec) for s in jax.tree.leaves(tree))
  for tree in (setup.state_shardings.params, setup.frozen_shardings["vae"], setup.frozen_shardings["text_encoder"]):
    assert split_over(tree, "fsdp") and not split_over(tree, "data")
  assert "data" in str(setup.batch_sharding.spec) and "fsdp" in str(setup.batch_sharding.spec)
  train.train_and_evaluate(config, str(tmp_path))
  got, want = helpers.losses(tmp_path), helpers.losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)


def test_exact_resume(stages, reference, tmp_path):
  shutil.copytree(reference, tmp_path / "w")
  shutil.rmtree(tmp_path / "w" / "checkpoints" / str(STEPS))
  shutil.rmtree(tmp_path / "w" / "export")
  train.train_and_evaluate(_config(stages, **{"mesh.data": 1}), str(tmp_path / "w"), devices=jax.devices()[:1])
  assert helpers.losses(tmp_path / "w") == helpers.losses(reference)  # bitwise on CPU, same device count
  assert (tmp_path / "w" / "export" / store.INDEX_FILE).exists()


def test_export_is_a_complete_model_directory(stages, reference, trained, tmp_path):
  from diffusers import DDIMScheduler
  vae_dir, text_dir = stages
  export = reference / "export"
  models = model_dir_lib.load_model(export)
  assert sorted(models) == ["text_encoder", "unet", "vae"]
  assert store.read_clip_skip(export) == trained["config"].ldm.clip_skip  # the context the U-Net was trained on
  unet, unet_params = models["unet"]
  assert unet == trained["task"].model  # same fields: derived channels, context width and latent size included
  final = trained["state"]
  jax.tree.map(np.testing.assert_array_equal, unet_params, final.ema_params)  # the EMA U-Net
  assert not np.allclose(final.ema_params["conv_in"]["kernel"], final.params["conv_in"]["kernel"])
  for name, source in (("vae", vae_dir), ("text_encoder", text_dir)):
    jax.tree.map(np.testing.assert_array_equal, models[name][1], store.load_component(source, name)[1])
  assert (export / "tokenizer" / "vocab.json").read_bytes() == (text_dir / "tokenizer" / "vocab.json").read_bytes()
  # The scheduler config describes the training schedule.
  scheduler = DDIMScheduler.from_config(json.loads((export / "scheduler" / "scheduler_config.json").read_text()))
  np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), trained["task"].schedule.alphas_cumprod, rtol=1e-6)
  assert scheduler.config.prediction_type == trained["config"].diffusion.prediction_type
  # ... and the directory converts to diffusers.
  written = model_dir_lib.export_diffusers(export, tmp_path / "diffusers")
  assert sorted(written) == ["text_encoder", "unet", "vae"]
  model_index = json.loads((tmp_path / "diffusers" / "model_index.json").read_text())
  assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(model_index)
  assert (tmp_path / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_caption_dropout(trained):
  task, params, frozen = trained["task"], trained["state"].params, trained["frozen"]
  n, p = 20_000, 0.1
  keys = jax.random.split(jax.random.PRNGKey(3), n)
  rate = float(jnp.mean(task.caption_drop_mask(keys, p)))
  assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / n), rate
  assert not task.caption_drop_mask(keys[:100], 0.0).any() and task.caption_drop_mask(keys[:100], 1.0).all()

  # A dropped caption is exactly the empty prompt: dropping every caption equals training on "" captions.
  batch, keys, per_example = trained["batch"], trained["keys"], trained["per_example"]
  dropped, aux = per_example(params, frozen, batch, keys, 1.0)
  empty = {**batch, "tokens": np.repeat(task.nets.empty_tokens, len(keys), axis=0)}
  np.testing.assert_allclose(dropped, per_example(params, frozen, empty, keys, 0.0)[0], rtol=1e-6)
  assert float(aux["caption_dropout_rate"]) == 1.0
  assert not np.allclose(dropped, per_example(params, frozen, batch, keys, 0.0)[0])
  tok = task.nets.tokenizer
  assert list(task.nets.empty_tokens[0, :3]) == [tok.bos_id, tok.eos_id, tok.pad_id]


def test_text_tuning_with_v_prediction_min_snr_offset_noise_zero_terminal_snr_snr_shift(stages, trained):
  """The non-default paths in one compiled step: a tuned text tower and the v / min-SNR / offset / ZTSNR loss."""
  from diffusers import DDIMScheduler
  config = _config(stages, **{"ldm.train_text_encoder": True, "diffusion.prediction_type": "v_prediction",
                              "diffusion.min_snr_gamma": 5.0, "diffusion.offset_noise": 0.1,
                              "diffusion.zero_terminal_snr": True, "diffusion.snr_shift": 16.0, "mesh.data": 1})
  setup = train.setup(config, devices=jax.devices()[:1])
  task = setup.task
  assert float(task.schedule.alphas_cumprod[-1]) == 0.0
  # The SNR shift is applied before the zero-SNR rescaling, and the export's scheduler config (trained_betas) gives
  # diffusers, and sd_jax's own samplers, the schedule the model was trained on.
  d = config.diffusion
  table = (d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end)
  want = schedules.make_schedule(*table, rescale_zero_terminal_snr=True, snr_shift=16)
  np.testing.assert_array_equal(task.schedule.alphas_cumprod, want.alphas_cumprod)
  plain = schedules.make_schedule(*table)
  assert float(task.schedule.alphas_cumprod[500]) > float(plain.alphas_cumprod[500]) + 0.1
  exported = json.loads(json.dumps(task.scheduler_config()))
  scheduler = DDIMScheduler.from_config(exported)
  np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), task.schedule.alphas_cumprod, rtol=1e-6, atol=1e-7)
  for sampler_config in (samplers.config_from_diffusers(exported), samplers.config_from_training(config.diffusion)):
    np.testing.assert_array_equal(samplers.noise_schedule(sampler_config).alphas_cumprod, task.schedule.alphas_cumprod)
  assert "text_encoder" not in setup.frozen_shardings  # it moved into the trained params ...
  # ... starting from the pretrained weights (XLA drops the unused U-Net init), with logical axis names.
  initial = jax.jit(lambda rng: nn.meta.unbox(task.init_params(rng))["text_encoder"])(jax.random.PRNGKey(0))
  pretrained = store.load_component(stages[1], "text_encoder")[1]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(initial), pretrained)
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  boxes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))["text_encoder"]
  assert jax.tree.leaves(boxes, is_leaf=is_box) and all(map(is_box, jax.tree.leaves(boxes, is_leaf=is_box)))
  params = {"unet": trained["state"].params, "text_encoder": pretrained}
  value_and_grad = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
  (loss, aux), grads = value_and_grad(params, task.load_frozen(), trained["batch"], trained["keys"])
  assert np.isfinite(float(loss)) and np.isfinite(float(aux["latents_std"]))
  assert float(optax.global_norm(grads["unet"])) > 0 and float(optax.global_norm(grads["text_encoder"])) > 0

  with pytest.raises(ValueError, match="zero_terminal_snr=True with prediction_type='epsilon'"):
    ldm.Task(_config(stages, **{"diffusion.zero_terminal_snr": True}))


def test_bad_frozen_paths_and_mismatches_fail_clearly(stages, tmp_path):
  vae_dir, text_dir = stages
  with pytest.raises(FileNotFoundError, match=r"config.ldm.vae_from=.*nope.* does not exist.*never uses random"):
    ldm.Task(_config(stages, **{"ldm.vae_from": str(tmp_path / "nope")}))
  with pytest.raises(ValueError, match="config.ldm.vae_from is empty"):
    ldm.Task(_config(stages, **{"ldm.vae_from": ""}))
  # A training workdir instead of its export/: the error says which directory to use.
  (tmp_path / "run").mkdir()
  shutil.copytree(vae_dir, tmp_path / "run" / "export")
  with pytest.raises(FileNotFoundError, match=r"looks like a training workdir: use .*run/export"):
    ldm.Task(_config(stages, **{"ldm.vae_from": str(tmp_path / "run")}))
  with pytest.raises(FileNotFoundError, match=r"holds \['text_encoder'\] but no 'vae'"):
    ldm.Task(_config(stages, **{"ldm.vae_from": str(text_dir)}))
  # The dataset's tokenizer follows ldm.text_from; one that is not the text tower's is refused.
  assert _config(stages).dataset.tokenizer == f"{text_dir}/tokenizer"
  other = tmp_path / "other_tokenizer"
  tokenizer_lib.train_tokenizer(["a completely different corpus"] * 4, str(other), vocab_size=520)
  with pytest.raises(ValueError, match="is not the tokenizer of the text tower"):
    ldm.Task(_config(stages, **{"dataset.tokenizer": str(other)}))
  with pytest.raises(ValueError, match="max_text_len=77 is longer"):
    ldm.Task(_config(stages, **{"dataset.max_text_len": 77}))
  # A U-Net field that contradicts the frozen networks.
  with pytest.raises(ValueError, match=r"config.model.cross_attention_dim=64, but the text tower's hidden_size is 32"):
    ldm.Task(_config(stages, **{"model.cross_attention_dim": 64}))


def test_precompute_matches_online_encoding(stages, trained, tmp_path):
  out = tmp_path / "pre"
  config = trained["config"]
  precompute_lib.precompute(config, str(out))
  meta = precomputed.read_meta(out, "train")
  assert meta["num_examples"] == input_pipeline.dataset_info(config.dataset, "train").num_examples
  assert meta["shapes"]["latent_mean"][1:] == [8, 8, 4] and meta["shapes"]["context"][1:] == [16, 32]
  stamp = (out / "train" / "latent_mean.npy").stat().st_mtime_ns
  precompute_lib.precompute(config, str(out))  # reused, not rewritten
  assert (out / "train" / "latent_mean.npy").stat().st_mtime_ns == stamp
  captions = precomputed.PrecomputedSource(out, "test").captions()
  assert captions[0] == " ".join(input_pipeline.dataset_info(config.dataset, "test").captions(0).lower().split())

  # Step s of a precomputed run sees the same examples, posteriors and contexts as step s of an image run.
  params, frozen, keys, per_example = (trained["state"].params, trained["frozen"], trained["keys"],
                                       trained["per_example"])
  images = input_pipeline.create_iterator(config.dataset, split="train", global_batch_size=8, seed=config.seed)
  latents = precomputed.create_iterator(out, split="train", global_batch_size=8, seed=config.seed)
  for _ in range(2):
    from_latents = per_example(params, frozen, next(latents), keys, config.ldm.caption_dropout)[0]
    from_images = per_example(params, frozen, next(images), keys, config.ldm.caption_dropout)[0]
    np.testing.assert_allclose(from_latents, from_images, rtol=1e-5, atol=1e-6)
  images.close()
  latents.close()

  with pytest.raises(ValueError, match=r"different setup \(clip_skip: stored 0 vs now 1\)"):
    precompute_lib.precompute(_config(stages, **{"ldm.clip_skip": 1}), str(out))

  # A tuned text tower reads the stored tokens and encodes them itself: the stored contexts are ignored, and the
  # loss equals that of the image run with the same tower.
  assert meta["shapes"]["tokens"] == [meta["num_examples"], 16]
  tuned = ldm.Task(_config(stages, **{"ldm.train_text_encoder": True, "ldm.precompute_dir": str(out)}))
  precompute_lib.precompute(tuned.config, str(out))  # the same files serve it
  text = jax.tree.map(lambda x: x * 1.5, store.load_component(stages[1], "text_encoder")[1])  # "tuned" weights
  tuned_params, tuned_frozen = {"unet": params, "text_encoder": text}, {"vae": frozen["vae"]}
  tuned_loss = jax.jit(tuned.per_example_loss)
  images = input_pipeline.create_iterator(config.dataset, split="train", global_batch_size=8, seed=config.seed)
  latents = precomputed.create_iterator(out, split="train", global_batch_size=8, seed=config.seed)
  image_batch, latent_batch = next(images), next(latents)
  images.close()
  latents.close()
  np.testing.assert_array_equal(latent_batch["tokens"], image_batch["tokens"])
  assert latent_batch["tokens"].dtype == np.int32
  from_latents = tuned_loss(tuned_params, tuned_frozen, latent_batch, keys, config.ldm.caption_dropout)[0]
  from_images = tuned_loss(tuned_params, tuned_frozen, image_batch, keys, config.ldm.caption_dropout)[0]
  np.testing.assert_allclose(from_latents, from_images, rtol=1e-5, atol=1e-6)
  frozen_loss = per_example(params, frozen, latent_batch, keys, config.ldm.caption_dropout)[0]
  assert not np.allclose(from_latents, frozen_loss)  # the tuned tower's contexts, not the stored ones

  # A split written before tokens were stored serves frozen runs but not a tuned tower.
  meta_file = out / "train" / precomputed.META_FILE
  old = json.loads(meta_file.read_text())
  del old["shapes"]["tokens"]
  meta_file.write_text(json.dumps(old))
  (out / "train" / "tokens.npy").unlink()
  assert set(precomputed.PrecomputedSource(out, "train")[0]) == set(precomputed.ARRAYS)
  with pytest.raises(ValueError, match=r"written without the tokens .* Delete it to recompute"):
    precompute_lib.precompute(tuned.config, str(out))


def test_training_from_precomputed_latents_matches_the_image_run(stages, reference, tmp_path):
  """ldm.precompute_dir in the loop: encoded once before training, then read instead of the images; the losses
  equal the reference run's, which encoded every batch on the fly."""
  out, workdir = tmp_path / "pre", tmp_path / "run"
  config = _config(stages, total_steps=2, **{"mesh.data": 1, "ldm.precompute_dir": str(out)})
  assert config.dataset.precomputed_dir == str(out)  # the config ties the two
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert precomputed.read_meta(out, "train") is not None and precomputed.read_meta(out, "test") is not None
  got, want = helpers.losses(workdir), helpers.losses(reference)
  assert sorted(got) == [1, 2]
  np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=1e-5)


def test_sample_pipeline_and_heldout_evaluation_of_the_export(stages, trained, reference, tmp_path):
  """sd_jax.generate.TextToImage on the exported directory draws what the trainer's sample grids draw with the
  same seed (one generation path; the export's scheduler config is the grids' sampler settings), and sd_jax.stages
  scores held-out prompts with the shapes evaluator and writes the labelled grid."""
  from sd_jax import generate as generate_lib
  from sd_jax import stages as stages_lib
  from sd_jax.eval import shapes_eval
  config, task = trained["config"], trained["task"]
  pipe = generate_lib.TextToImage.from_workdir(reference)
  prompts = ["a red circle", "a small blue square"]
  s = config.sample
  got = pipe.generate(prompts, steps=s.num_steps, guidance=s.guidance_scale, seed=3)
  want = task.sample(trained["state"].ema_params, trained["frozen"], prompts, seed=3, images_per_prompt=1)[:, 0]
  assert got.shape == (2, 16, 16, 3) and got.dtype == np.uint8
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  assert np.abs(got.astype(int) - want.astype(int)).mean() < 0.05  # the same images, not merely close ones
  # Image i of a seed is the same whatever the batch it is drawn in (to float rounding).
  one_by_one = pipe.generate(prompts, steps=s.num_steps, guidance=s.guidance_scale, seed=3, batch_size=1)
  assert np.abs(one_by_one.astype(int) - got.astype(int)).max() <= 1
  np.testing.assert_array_equal(pipe.generate(prompts, steps=s.num_steps, guidance=s.guidance_scale, seed=3), got)
  with pytest.raises(ValueError, match="--height=15: must be a positive multiple of 2"):
    pipe.generate(prompts, height=15)
  with pytest.raises(FileNotFoundError, match="has no export/"):
    generate_lib.TextToImage.from_workdir(tmp_path)

  evaluator, _ = shapes_eval.fit(shapes_eval.TrainConfig(steps=2, batch_size=4))
  # The trainer's own evaluation hook with an evaluator: the accuracy of its samples on both held-out splits.
  shapes_eval.save_evaluator(evaluator, tmp_path / "evaluator")
  with_evaluator = ldm.Task(_config(stages, **{"sample.shapes_evaluator": str(tmp_path / "evaluator"),
                                               "sample.shapes_eval_prompts": 2}))
  accuracy = with_evaluator.shapes_accuracy(trained["state"].ema_params, trained["frozen"], seed=0)
  assert sorted(accuracy) == ["eval_shapes_acc_compositional", "eval_shapes_acc_test"]
  assert all(0.0 <= v <= 1.0 for v in accuracy.values())
  # The evaluation hook reports it at a step with no sample grid due, unless sample.shapes_eval_prompts = 0 (the demo).
  params = trained["state"].ema_params
  ctx = types.SimpleNamespace(frozen=trained["frozen"], mesh=None)
  assert sorted(with_evaluator.on_eval(1, params, ctx)) == sorted(accuracy)
  without = ldm.Task(_config(stages, **{"sample.shapes_evaluator": str(tmp_path / "evaluator"),
                                        "sample.shapes_eval_prompts": 0}))
  assert without.on_eval(1, params, ctx) == {}
  grid = tmp_path / "grid.png"
  results = stages_lib.evaluate_model(reference / "export", config.dataset.to_dict(), evaluator, num_prompts=3,
                                  steps=2, guidance=2.0, seed=0, grid_prompts=2, grid_path=grid)
  assert sorted(results) == ["compositional", "test"]
  for r in results.values():
    assert r["num_prompts"] == 3 and 0.0 <= r["accuracy"] <= 1.0
    assert 0.0 <= r["shape_recall"] <= r["colour_recall"] <= 1.0
  assert np.asarray(Image.open(grid)).shape[-1] == 3
  summary = {"preset": "runlocal", "stages": {}, "heldout": results, "evaluator": {},
             "sampling": {"steps": 2, "guidance": 2.0}, "total_wall_seconds": 1.0,
             "machine": {"cpu": "AMD EPYC, 2 cores", "device": "cpu:cpu", "reference_conv_gflops": 61.5}}
  stages_lib.write_summary(tmp_path, summary)
  summary_md = (tmp_path / "summary.md").read_text()
  assert "| compositional |" in summary_md and "two-shape prompts" in summary_md
  assert "Machine: AMD EPYC, 2 cores;" in summary_md and "61.5 GFLOP/s" in summary_md
  command = stages_lib.stage_command("ldm", "demo", tmp_path)
  assert command[1:3] == ["-m", "sd_jax.main"]
  assert command[3].endswith(f"shapes_ldm.py:demo,vae_from={tmp_path}/vae/export,text_from={tmp_path}/clip/export")
