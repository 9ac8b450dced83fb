"""The preference trainer (sd_jax/trainers/dpo.py) on a tiny random base model and votes in a real feedback database:
the loss is the paper's formula, a LoRA and a full run start at log 2 (the policy is the reference) and lower it, 8
fake devices (fsdp) interrupted and resumed give the single-device losses, the database and its Pick-a-Pic export
train alike, and bad settings are refused by name."""

import types

import jax
import numpy as np
import pytest
from PIL import Image

from sd_jax import metrics
from sd_jax import train
from sd_jax.data import input_pipeline
from sd_jax.feedback import store as store_lib
from sd_jax.trainers import dpo
from sd_jax.trainers import finetune
from sd_jax.weights import store as weights_store
from tests import helpers

STEPS = 4
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(a tiny model directory, a feedback database with 8 votes (one tie, one "both bad"), its parquet export)."""
  root = tmp_path_factory.mktemp("dpo")
  captions = [f"a {c} square" for c in COLOURS]
  model = helpers.tiny_text_to_image(root / "model", captions)
  store = store_lib.FeedbackStore(root / "feedback.sqlite")
  model_id = store.add_model(str(model), "0" * 64)
  rng = np.random.default_rng(0)
  for i in range(8):
    colour = list(COLOURS)[i % 3]
    ids = []
    for j, fill in enumerate((COLOURS[colour], tuple(rng.integers(0, 255, 3)))):  # the right colour, another one
      image = np.full((16, 16, 3), 255, np.uint8)
      image[4:12, 4:12] = fill
      Image.fromarray(image).save(store.image_path(f"{i}_{j}.png"))
      ids.append(store.add_image(f"a {colour} square", model_id, j, {"steps": 2}, f"{i}_{j}.png"))
    choice = "tie" if i == 6 else "both_bad" if i == 7 else "a" if i % 2 else "b"
    store.record_vote(*(ids if choice != "b" else ids[::-1]), choice=choice, rater="stand-in")
  parquet = root / "prefs.parquet"
  assert store_lib.export_parquet(store, parquet) == 7  # "both bad" is not a preference; the tie is exported
  store.close()
  return model, root / "feedback.sqlite", parquet


def _config(base, method="lora", prefs=None, **overrides):
  model, db, _ = base
  keys = {"total_steps": STEPS, "save_every_steps": 2, "batch_size": 8, "mesh.data": 1, **overrides}
  return helpers.load_config("dpo", f"method={method},base={model},prefs={prefs or db},runlocal", **keys)


@pytest.fixture(scope="module")
def references(base, tmp_path_factory):
  """One uninterrupted single-device run per method, on the database."""
  runs = {}
  for method in ("lora", "full"):
    workdir = tmp_path_factory.mktemp(f"dpo_{method}")
    train.train_and_evaluate(_config(base, method), str(workdir), devices=jax.devices()[:1])
    runs[method] = workdir
  return runs


def test_the_loss_is_the_papers_formula():
  """pair_loss against the formulas written out in NumPy: Diffusion-DPO (Wallace et al. 2023, eq. 14 as the
  authors' train.py computes it) and the KTO variant, from per-pair errors of the model and the reference."""
  rng = np.random.default_rng(0)
  e_w, e_l, r_w, r_l = (rng.uniform(0.05, 0.2, 16).astype(np.float32) for _ in range(4))
  beta = 2500.0
  inside = -0.5 * beta * ((e_w - e_l) - (r_w - r_l))
  sigmoid = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
  want = {"dpo": -np.log(sigmoid(inside)),
          "kto": 0.5 * ((1 - sigmoid(0.5 * beta * (r_w - e_w))) + (1 - sigmoid(0.5 * beta * (e_l - r_l))))}
  for loss in dpo.LOSSES:
    task = types.SimpleNamespace(config=types.SimpleNamespace(dpo=types.SimpleNamespace(beta=beta, loss=loss)))
    got, got_inside = dpo.Task.pair_loss(task, tuple(map(jax.numpy.asarray, (e_w, e_l, r_w, r_l))))
    np.testing.assert_allclose(np.asarray(got_inside), inside, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), want[loss], rtol=1e-4, atol=1e-6)


def test_the_loss_of_the_tiny_model_is_the_formula_in_numpy(base, references):
  """task.loss with the trained LoRA (policy ≠ reference) against the paper's loss written out in NumPy from the
  networks' outputs: x_t = sqrt(ᾱ_t)·z + sqrt(1 − ᾱ_t)·ε for the preferred and the other image's latents z with
  the same t and ε per pair, e = mean‖ε − ε_θ(x_t)‖² per image, loss = mean −log σ(−β/2 ((e_θ(w) − e_θ(l)) −
  (e_ref(w) − e_ref(l)))). The draws (latent samples, t, ε) are the trainer's, from the same keys."""
  from sd_jax import checkpoint as ckpt_lib
  from sd_jax.diffusion import losses as losses_lib
  config = _config(base, "lora")
  setup = train.cached_setup(config, devices=jax.devices()[:1])
  task = setup.task
  checkpointer = ckpt_lib.Checkpointer(str(references["lora"]), keep=3, with_data=False)
  params = checkpointer.restore(STEPS, setup.abstract_state).params
  checkpointer.close()
  data = input_pipeline.create_iterator(task.dataset_config(), split="train", global_batch_size=6, seed=0,
                                        train=False)
  batch = next(data)
  data.close()
  frozen, keys = setup.load_frozen(), jax.random.split(jax.random.PRNGKey(7), 6)
  got, got_metrics = jax.jit(task.loss)(params, frozen, batch, keys)

  draws = losses_lib.example_draws(keys)
  d_keys = jax.vmap(lambda k: jax.random.split(k))(draws["latent"])
  # The networks' calls jitted (one program each, not op by op; the weights are arguments, not constants baked into
  # the programs): the reference is the formula, not the dispatch.
  encode = jax.jit(lambda vae, images, keys: task.vae.scale_latents(jax.vmap(lambda p, k: p.sample(k))(
      task.vae.apply({"params": vae}, images, method="encode"), keys)))
  z = [np.asarray(encode(frozen["vae"], batch[image], d_keys[:, i])) for i, image in enumerate(("image", "image_l"))]
  t = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (), 0, 1000))(draws["timestep"]))
  eps = np.stack([np.asarray(losses_lib.offset_noise(k, (1,) + z[0].shape[1:])[0]) for k in draws["noise"]])
  abar = np.asarray(task.schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
  context = jax.jit(task.encode_text)(params, frozen, batch["tokens"])
  networks = {
      "model": jax.jit(lambda p, f, x, t, context, rng: task.unet_fn(p, f)(x, t, context, rng)),
      "ref": jax.jit(lambda p, f, x, t, context, rng: task.unet.apply({"params": f["unet"]}, x, t, context))}
  errors = {}
  for name, image in (("w", z[0]), ("l", z[1])):
    x_t = np.sqrt(abar) * image + np.sqrt(1 - abar) * eps
    for who, fn in networks.items():
      out = np.asarray(fn(params, frozen, x_t.astype(np.float32), t, context, draws["dropout"][0]), np.float64)
      errors[who, name] = np.mean((eps - out) ** 2, axis=(1, 2, 3))
  inside = -0.5 * config.dpo.beta * ((errors["model", "w"] - errors["model", "l"])
                                     - (errors["ref", "w"] - errors["ref", "l"]))
  want = np.mean(np.log1p(np.exp(-inside)))  # −log σ(x) = log(1 + e^−x)
  assert abs(float(got_metrics["reward_margin"])) > 1e-2  # the trained policy differs from the reference
  # The errors agree to float32 rounding, which β multiplies in the loss.
  np.testing.assert_allclose(float(got_metrics["model_error"]), errors["model", "w"].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(got_metrics["reward_margin"]), inside.mean(), rtol=1e-3, atol=2e-3)
  np.testing.assert_allclose(float(got), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_starts_at_log2_and_lowers_the_loss(base, references, method):
  """At step 1 the policy is the reference (LoRA: B = 0; full: the copy), so every pair's loss is log 2; on a fixed
  batch with fixed draws the final params lower the loss, prefer the winners (implicit accuracy up), and export."""
  workdir = references[method]
  losses = helpers.losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  # The policy's and the reference's errors agree to float rounding (other programs, other fusions), which β
  # multiplies: log 2 to 1e-4.
  np.testing.assert_allclose(losses[1], np.log(2), atol=1e-4)
  config = _config(base, method)
  setup = train.cached_setup(config, devices=jax.devices()[:1])
  task = setup.task
  from sd_jax import checkpoint as ckpt_lib
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=3, with_data=False)
  final = checkpointer.restore(STEPS, setup.abstract_state).params
  checkpointer.close()
  data = input_pipeline.create_iterator(task.dataset_config(), split="train", global_batch_size=6, seed=0,
                                        train=False)  # the 6 pairs (the tie and "both bad" carry no preference)
  batch = next(data)
  data.close()
  initial = setup.init_fn(jax.random.PRNGKey(config.seed)).params
  initial = task.initial_params(initial, setup.state_shardings.params) or initial  # as the loop starts a run
  frozen, keys = setup.load_frozen(), jax.random.split(jax.random.PRNGKey(5), 6)
  loss = jax.jit(task.loss)  # lora: test_the_loss_of_the_tiny_model_is_the_formula_in_numpy's program
  (before, m_before), (after, m_after) = loss(initial, frozen, batch, keys), loss(final, frozen, batch, keys)
  np.testing.assert_allclose(float(before), np.log(2), atol=1e-4)
  assert abs(float(m_before["reward_margin"])) < 1e-3
  assert float(after) < float(before)
  assert float(m_after["implicit_accuracy"]) > 0.5 and float(m_after["reward_margin"]) > 0.0
  export = workdir / "export"
  assert (export / finetune.LORA_FILE).exists() if method == "lora" else (export / weights_store.INDEX_FILE).exists()


def test_eight_devices_interrupted_and_resumed_match_one_on_the_parquet_export(base, references, tmp_path):
  """fsdp over 8 fake devices, stopped after 2 steps and resumed, reading the Pick-a-Pic export of the database:
  the single-device losses (the export holds the same pairs in the same order; its tie is left out too)."""
  config = dict(prefs=base[2], **{"mesh.data": 1, "mesh.fsdp": 8})
  train.train_and_evaluate(_config(base, "lora", total_steps=2, **config), str(tmp_path), devices=jax.devices())
  assert sorted(helpers.losses(tmp_path)) == [1, 2]
  train.train_and_evaluate(_config(base, "lora", **config), str(tmp_path), devices=jax.devices())
  got, want = _logged(tmp_path), _logged(references["lora"])
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  # The model's denoising error to float rounding; the loss to β times that (β = 500 scales the error difference).
  for key, tolerance in (("model_error", dict(rtol=2e-5)), ("loss", dict(atol=2e-4))):
    np.testing.assert_allclose([got[s][key] for s in sorted(got)], [want[s][key] for s in sorted(want)],
                               **tolerance, err_msg=key)


def _logged(workdir) -> dict[int, dict[str, float]]:
  return {row["step"]: row for row in metrics.read_metrics(workdir) if "loss" in row}


@pytest.mark.parametrize("overrides, message", [
    ({"dpo.beta": 0.0}, "config.dpo.beta=0.0: must be > 0"),
    ({"dpo.loss": "ipo"}, "config.dpo.loss='ipo': use one of"),
    ({"dataset.preferences": ""}, "set --config.dataset.preferences"),
    ({"finetune.prior_preservation": True, "finetune.class_prompt": "a square"}, "not part of preference training"),
    ({"finetune.text_encoder": "full"}, "text tower by LoRA only"),
])
def test_bad_settings_are_refused_by_name(base, overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    dpo.Task(_config(base, **overrides))


def test_a_missing_or_empty_preference_file_is_a_clear_error(base, tmp_path):
  from sd_jax.data import preferences
  with pytest.raises(FileNotFoundError, match="does not exist"):
    preferences.PreferenceSource(str(tmp_path / "none.parquet"), "train")
  empty = store_lib.FeedbackStore(tmp_path / "empty.sqlite")
  empty.close()
  with pytest.raises(ValueError, match="holds no preference"):
    preferences.PreferenceSource(str(tmp_path / "empty.sqlite"), "train")
