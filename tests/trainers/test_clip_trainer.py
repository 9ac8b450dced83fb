"""The clip trainer: loss and retrieval numerics, training runs on 1 and 8 fake devices, resume, LiT, export."""

import json
import math
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from sd_jax import checkpoint as ckpt_lib
from sd_jax import metrics
from sd_jax import train
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.models import clip as clip_lib
from sd_jax.trainers import clip as clip_trainer
from sd_jax.weights import clip as clip_weights
from sd_jax.weights import model_dir as model_dir_lib
from tests import helpers

STEPS = 6


def _config(arg="runlocal", **overrides):
  base = {"total_steps": STEPS, "log_every_steps": 1, "save_every_steps": 3, "eval_every_steps": -1,
          "optim.schedule": "constant", "optim.warmup_steps": 0}
  base.update(overrides)
  return helpers.load_config("shapes_clip", arg, **base)


def _one_device(**overrides):
  return _config(**{"mesh.data": 1}, **overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """One uninterrupted run on one device, evaluated and exported at the end."""
  workdir = tmp_path_factory.mktemp("clip_reference")
  train.train_and_evaluate(_one_device(eval_every_steps=0), str(workdir), devices=jax.devices()[:1])
  return workdir


# ----------------------------------------------------------------------------------------------------------------
# Numerics


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_softmax_loss_matches_numpy():
  rng = np.random.default_rng(0)
  text, image = _unit(rng.standard_normal((3, 4))), _unit(rng.standard_normal((3, 4)))
  scale = math.log(5.0)
  logits = 5.0 * text @ image.T
  want = -(np.trace(_log_softmax(logits, 1)) + np.trace(_log_softmax(logits, 0))) / 6
  got, got_logits = clip_trainer.softmax_loss(text, image, scale)
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sigmoid_loss_matches_numpy():
  rng = np.random.default_rng(1)
  text, image = _unit(rng.standard_normal((3, 4))), _unit(rng.standard_normal((3, 4)))
  logits = 10.0 * text @ image.T - 10.0
  z = 2 * np.eye(3) - 1
  want = np.sum(np.log1p(np.exp(-z * logits))) / 3  # -log sigmoid(x) = log(1 + e^-x)
  got, _ = clip_trainer.sigmoid_loss(text, image, math.log(10.0), -10.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_retrieval_metrics_hand_made():
  # Rows are texts, columns images. Text 0: its image ranks 1st; text 1: 2nd; text 2: 3rd (last).
  sim = np.array([[0.9, 0.1, 0.2],
                  [0.8, 0.5, 0.1],
                  [0.7, 0.6, 0.3]])
  got = clip_trainer.retrieval_metrics(sim, ks=(1, 2))
  assert got["t2i_r1"] == pytest.approx(1 / 3) and got["t2i_r2"] == pytest.approx(2 / 3)
  # Image columns: image 0 -> text 0 first; image 1 -> text 1 is 2nd (0.6 > 0.5); image 2 -> text 2 1st.
  assert got["i2t_r1"] == pytest.approx(2 / 3) and got["i2t_r2"] == pytest.approx(1.0)
  # A tie with a wrong answer counts against the query.
  tied = clip_trainer.retrieval_metrics(np.array([[0.5, 0.5], [0.1, 0.9]]))
  assert tied["t2i_r1"] == 0.5 and tied["i2t_r1"] == 1.0
  # Several right answers (identical captions): text 1's best right image (column 0) ranks first.
  relevant = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)
  multi = clip_trainer.retrieval_metrics(sim, relevant, ks=(1,))
  assert multi["t2i_r1"] == pytest.approx(1 / 3 + 1 / 3)


# ----------------------------------------------------------------------------------------------------------------
# Training runs


def test_run_trains_evaluates_and_exports(reference):
  losses = helpers.losses(reference)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < losses[1]
  evals = [row for row in metrics.read_metrics(reference) if "eval_loss" in row]
  assert len(evals) == 1
  for key in ("eval_zeroshot_acc", "eval_zeroshot_color_acc", "eval_zeroshot_kind_acc", "eval_t2i_r1",
              "eval_t2i_r5", "eval_i2t_r1", "eval_i2t_r5", "eval_compositional_zeroshot_acc"):
    assert 0.0 <= evals[0][key] <= 1.0, key
  assert evals[0]["eval_t2i_r1"] <= evals[0]["eval_t2i_r5"]

  # The tokenizer the batches used is recorded in config.json, copied to the workdir, and sizes the text tower.
  config = json.loads((reference / "config.json").read_text())
  tokenizer = tokenizer_lib.load_clip_tokenizer(str(reference / "export" / "tokenizer"))
  assert tokenizer.max_length == config["dataset"]["max_text_len"] == config["model"]["text"]["max_position_embeddings"]
  assert clip_trainer._directory_digest(config["dataset"]["tokenizer"]) == clip_trainer._directory_digest(
      str(reference / "tokenizer")) == clip_trainer._directory_digest(str(reference / "export" / "tokenizer"))

  # What the latent-diffusion trainer loads: the text tower, equal to the two-tower model's text tower.
  text_encoder, text_params = model_dir_lib.load_model(reference / "export", components=("text_encoder",))[
      "text_encoder"]
  assert isinstance(text_encoder, clip_lib.CLIPTextTransformer)
  assert text_encoder.config.vocab_size == tokenizer.vocab_size
  assert text_encoder.config.eos_token_id == tokenizer.eos_id
  layout = jax.eval_shape(text_encoder.init, jax.random.PRNGKey(0), **text_encoder.example_inputs())["params"]
  assert jax.tree.structure(jax.tree.map(np.shape, nn.unbox(layout))) == jax.tree.structure(
      jax.tree.map(np.shape, text_params))
  _, clip_params = clip_weights.load_exported_clip(reference / "export")
  jax.tree.map(np.testing.assert_array_equal, text_params, clip_params["text_model"])
  ids = tokenizer(["a small red circle above a blue square", "a green star"])
  hidden = jax.jit(lambda p: text_encoder.apply({"params": p}, ids).last_hidden_state)(text_params)
  assert hidden.shape == (2, tokenizer.max_length, text_encoder.config.hidden_size)
  assert np.isfinite(np.asarray(hidden)).all()

  # The final checkpoint's params are what was exported.
  setup = train.setup(_one_device(), devices=jax.devices()[:1])
  checkpointer = ckpt_lib.Checkpointer(str(reference), keep=3, with_data=False)
  final = jax.device_get(checkpointer.restore(STEPS, setup.abstract_state).params)
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, final, clip_params)


def test_8_devices_match_1_device(reference, tmp_path):
  """The [B, B] logits span the global batch on any mesh. The 1-device run's step-3 checkpoint, resumed on 8 devices
  (batch split over fsdp x data, params over fsdp), gives the 1-device losses, evaluation and exported weights."""
  shutil.copytree(reference, tmp_path / "w")
  shutil.rmtree(tmp_path / "w" / "checkpoints" / str(STEPS))
  shutil.rmtree(tmp_path / "w" / "export")
  train.train_and_evaluate(_config(eval_every_steps=0, **{"mesh.data": 2, "mesh.fsdp": 4}), str(tmp_path / "w"))
  got, want = helpers.losses(tmp_path / "w"), helpers.losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5)
  evals = [next(r for r in metrics.read_metrics(w) if "eval_loss" in r) for w in (tmp_path / "w", reference)]
  assert evals[0].keys() == evals[1].keys()
  for key in evals[0]:
    assert evals[0][key] == pytest.approx(evals[1][key], rel=1e-4), key
  _, got_params = clip_weights.load_exported_clip(tmp_path / "w" / "export")
  _, want_params = clip_weights.load_exported_clip(reference / "export")
  # atol: directions whose gradient is analytically zero (attention key biases) get Adam updates of rounding noise
  # (about lr * noise / eps), which differ between meshes.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), got_params, want_params)


def test_exact_resume(reference, tmp_path):
  shutil.copytree(reference, tmp_path / "w")
  shutil.rmtree(tmp_path / "w" / "checkpoints" / str(STEPS))
  shutil.rmtree(tmp_path / "w" / "export")
  train.train_and_evaluate(_one_device(), str(tmp_path / "w"), devices=jax.devices()[:1])
  assert helpers.losses(tmp_path / "w") == helpers.losses(reference)  # bitwise on CPU with the same device count


def test_lit_sigmoid_keeps_the_image_tower_bitwise(reference, tmp_path):
  """LiT from the reference run's export, with the sigmoid loss: only the text side learns."""
  config = _one_device(arg=f"runlocal,loss=sigmoid,lit={reference / 'export'}", eval_every_steps=-1)
  setup = train.setup(config, devices=jax.devices()[:1])
  assert not set(clip_trainer.VISION_KEYS) & set(setup.abstract_state.params)  # no optimizer state either
  assert "logit_bias" in setup.abstract_state.params
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])

  losses = helpers.losses(tmp_path)
  assert all(np.isfinite(list(losses.values()))) and losses[STEPS] < losses[1]
  rows = [r for r in metrics.read_metrics(tmp_path) if "logit_bias" in r]
  assert rows and rows[0]["logit_bias"] == pytest.approx(-10.0, abs=0.1)  # SigLIP's init, one step later
  _, before = clip_weights.load_exported_clip(reference / "export")
  _, after = clip_weights.load_exported_clip(tmp_path / "export")
  for key in clip_trainer.VISION_KEYS:
    jax.tree.map(np.testing.assert_array_equal, before[key], after[key])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before["text_model"], after["text_model"]))
  assert all(changed)


def test_pmap_is_refused(data_dir):
  with pytest.raises(ValueError, match="global batch"):
    train.setup(_config(parallelism="pmap"))
