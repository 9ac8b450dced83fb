"""The fine-tune trainer (sd_jax/trainers/finetune.py) on a tiny random base model: every method trains through the
real loop, on 1 device and on 8 fake devices (data × fsdp) with the same losses, lowers its loss, resumes exactly,
exports files that load back, and never modifies the base."""

import hashlib
import json
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from sd_jax import checkpoint as ckpt_lib
from sd_jax import generate
from sd_jax import sample
from sd_jax import train
from sd_jax.data import input_pipeline
from sd_jax.trainers import finetune
from sd_jax.weights import lora as lora_weights
from sd_jax.weights import store
from tests import helpers

STEPS = 4
PROMPT = "a photo of zq shape"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random text-to-image model directory (16 px images) and a folder of 3 photos without captions."""
  root = tmp_path_factory.mktemp("ft_base")
  model = helpers.tiny_text_to_image(root / "model", ["a photo of a red circle", "a blue square", PROMPT])
  photos = root / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for i, size in enumerate(((20, 24), (32, 16), (16, 16))):  # any size and aspect
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(photos / f"{i}.png")
  return model, photos


def _digest(directory) -> str:
  digest = hashlib.sha256()
  for path in sorted(p for p in directory.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
  return digest.hexdigest()


METHODS = {  # a config per combination the tests train; "combined" exercises LoRA + text LoRA + a new token + prior
    "combined": ("dreambooth_lora", dict(prior=True), {"finetune.text_encoder": "lora",
                                                        "finetune.new_tokens": ("<zq>",),
                                                        "finetune.instance_prompt": "a photo of <zq> zq shape",
                                                        "finetune.class_prompt": "a photo of a shape"}),
    "full": ("full", {}, {"finetune.instance_prompt": PROMPT}),
    "textual_inversion": ("textual_inversion", {}, {"finetune.instance_prompt": "a photo of <sks-concept>",
                                                    "finetune.initializer": "shape"}),
}


def _final(config, workdir):
  """(the loop's Setup with its task's data prepared, the params of the run's last checkpoint)."""
  setup = train.cached_setup(config, devices=jax.devices()[:1])  # the run's own, reused
  setup.task.prepare_data(workdir)
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=3, with_data=False)
  final = checkpointer.restore(STEPS, setup.abstract_state).params
  checkpointer.close()
  return setup, final


def _config(base, method, **overrides):
  preset, args, keys = METHODS[method]
  model, photos = base
  arg = ",".join([f"method={preset}", f"base={model}", f"data={photos}", "runlocal",
                  *(f"{k}={v}" for k, v in args.items())])
  keys = {"total_steps": STEPS, "save_every_steps": 2, "mesh.data": 1, **keys, **overrides}
  return helpers.load_config("finetune", arg, **keys)


@pytest.fixture(scope="module")
def references(base, tmp_path_factory):
  """One uninterrupted single-device run per method."""
  before = _digest(base[0])
  runs = {}
  for method in METHODS:
    workdir = tmp_path_factory.mktemp(f"ft_{method}")
    train.train_and_evaluate(_config(base, method, batch_size=8), str(workdir), devices=jax.devices()[:1])
    runs[method] = workdir
  assert _digest(base[0]) == before  # the base model is never modified
  return runs


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_lowers_the_loss_and_exports(base, references, method):
  workdir = references[method]
  losses = helpers.losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))
  exported = json.loads((workdir / "export" / finetune.SUMMARY_FILE).read_text())
  config = _config(base, method, batch_size=8)
  # The loop's own programs on a fixed training batch with fixed draws: the final params beat the initial ones.
  setup, final = _final(config, workdir)
  task = setup.task
  data = input_pipeline.create_iterator(task.dataset_config(), split="train", global_batch_size=8, seed=0,
                                        train=False)
  batch = next(data)
  data.close()
  initial = setup.init_fn(jax.random.PRNGKey(config.seed)).params
  initial = task.initial_params(initial, setup.state_shardings.params) or initial  # as the loop starts a run
  frozen, keys = setup.load_frozen(), jax.random.split(jax.random.PRNGKey(5), 8)
  loss = jax.jit(lambda p, frozen, batch, keys: task.loss(p, frozen, batch, keys)[0])  # the weights as arguments
  assert float(loss(final, frozen, batch, keys)) < float(loss(initial, frozen, batch, keys))
  assert exported["step"] == STEPS
  if method == "combined":
    assert sorted(exported["files"]) == ["diffusers_lora", "embeddings", "kohya_lora"]
    adapters = lora_weights.load(workdir / "export" / finetune.LORA_FILE, task.unet_params,
                                 task.text_params)
    assert sorted(adapters) == ["text_encoder", "unet"]
    assert (workdir / "finetune_data" / "class_images" / "00003.png").exists()
    rows = [json.loads(line) for line in (workdir / "finetune_data" / "metadata.jsonl").read_text().splitlines()]
    assert sum(r["prior"] for r in rows) == 4 and sum(1 - r["prior"] for r in rows) >= 4
  elif method == "textual_inversion":
    embeddings = lora_weights.load_embeddings(workdir / "export" / finetune.EMBEDDINGS_FILE)
    assert list(embeddings) == ["<sks-concept>"] and embeddings["<sks-concept>"].shape == (1, 32)
  else:
    assert exported["files"] == {"model": "."} and (workdir / "export" / store.INDEX_FILE).exists()


@pytest.mark.parametrize("method", ["combined", "full"])
def test_eight_devices_match_one(base, references, method, tmp_path):
  """8 fake devices as data=2 × fsdp=4 (both axes in one compiled program) give the single-device losses; the run
  is also interrupted after 2 steps and resumed (exact resume on a sharded state: the combined config has LoRA,
  text LoRA, a new token and prior images)."""
  mesh = {"mesh.data": 2, "mesh.fsdp": 4}
  train.train_and_evaluate(_config(base, method, batch_size=8, total_steps=2, **mesh), str(tmp_path),
                           devices=jax.devices())
  assert sorted(helpers.losses(tmp_path)) == [1, 2]
  train.train_and_evaluate(_config(base, method, batch_size=8, **mesh), str(tmp_path), devices=jax.devices())
  got, want = helpers.losses(tmp_path), helpers.losses(references[method])
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5)


def test_exact_resume(base, references, tmp_path):
  """Textual inversion alone (a frozen U-Net): interrupted after 2 steps and resumed, the losses of one run."""
  method = "textual_inversion"
  train.train_and_evaluate(_config(base, method, batch_size=8, total_steps=2), str(tmp_path),
                           devices=jax.devices()[:1])
  train.train_and_evaluate(_config(base, method, batch_size=8), str(tmp_path), devices=jax.devices()[:1])
  got, want = helpers.losses(tmp_path), helpers.losses(references[method])
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)


def test_the_exported_files_draw_what_the_trainer_draws(base, references, tmp_path):
  """One generation path: the trainer's sampling with its final params, `TextToImage.from_workdir` (the base with
  the exported LoRA and embeddings), and the sample command with --lora/--embedding on the base draw the same
  images; the kohya file gives the diffusers file's images."""
  workdir = references["combined"]
  setup, final = _final(_config(base, "combined", batch_size=8), workdir)
  task = setup.task
  prompts = ["a photo of <zq> zq shape", "a photo of a shape"]
  settings = dict(steps=2, guidance=3.0, seed=1)
  want = task.generator().generate(prompts, params=jax.jit(task.generation_params)(final, setup.load_frozen()),
                                   **settings)
  got = generate.TextToImage.from_workdir(workdir).generate(prompts, **settings)
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
  export = workdir / "export"
  kohya = generate.TextToImage.from_model_dir(base[0]).with_lora(export / finetune.KOHYA_FILE).with_embeddings(
      export / finetune.EMBEDDINGS_FILE).generate(prompts, **settings)
  assert np.abs(kohya.astype(int) - want.astype(int)).max() <= 1
  out = tmp_path / "out"
  assert sample.main(["--pretrained", str(base[0]), "--lora", f"{export / finetune.LORA_FILE}:1.0", "--embedding",
                      str(export / finetune.EMBEDDINGS_FILE), "--prompt", *prompts, "--steps", "2", "--guidance", "3",
                      "--seed", "1", "--out", str(out)]) == 0
  drawn = np.asarray(Image.open(out / "0000_a_photo_of_zq_zq_shape.png"))
  assert np.abs(drawn.astype(int) - want[0].astype(int)).max() <= 1
  # Merged into a copy of the base (`python -m sd_jax.convert --base --merge_lora --embedding`): a plain model.
  merged = tmp_path / "merged"
  command = ["-m", "sd_jax.convert", f"--base={base[0]}", f"--merge_lora={export / finetune.KOHYA_FILE}",
             f"--embedding={export / finetune.EMBEDDINGS_FILE}", f"--out={merged}"]
  result = subprocess.run([sys.executable, *command], cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  plain = generate.TextToImage.from_model_dir(merged).generate(prompts, **settings)
  assert np.abs(plain.astype(int) - want.astype(int)).max() <= 1


def test_bad_input_fails_clearly(base, tmp_path, caplog):
  model, photos = base
  with caplog.at_level(logging.WARNING):
    finetune.Task(_config(base, "full"))  # "a photo of zq shape": every word is a known token
  assert any("every word is a single known token" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match="finetune.instance_prompt"):
    finetune.Task(_config(base, "full", **{"finetune.instance_prompt": ""})).prepare_data(tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="holds no images"):
    finetune.Task(_config(base, "full", **{"finetune.data": str(empty)})).prepare_data(tmp_path)
  with pytest.raises(FileNotFoundError, match="is not a Stable Diffusion model"):
    finetune.Task(_config(base, "full", **{"finetune.base": str(photos)}))
  with pytest.raises(ValueError, match="multiples of 2"):  # the VAE halves the size
    finetune.Task(_config(base, "full", **{"finetune.resolution": 17}))
  with pytest.raises(ValueError, match="nothing trains"):
    finetune.Task(_config(base, "full", **{"finetune.unet": "frozen"}))
