"""The vae trainer: it trains, meshes agree, resume is exact, the GAN's gradients go where they should, PSNR and
LPIPS numerics, and the export the latent-diffusion stage loads."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from sd_jax import checkpoint as ckpt_lib
from sd_jax import images as images_lib
from sd_jax import metrics
from sd_jax import train
from sd_jax.data import input_pipeline
from sd_jax.models import discriminator as disc_lib
from sd_jax.models import lpips as lpips_lib
from sd_jax.trainers import vae as vae_trainer
from sd_jax.weights import common
from sd_jax.weights import model_dir as model_dir_lib
from tests import helpers

STEPS = 4


def _config(arg="runlocal", **overrides):
  base = {"total_steps": STEPS, "log_every_steps": 1, "save_every_steps": 2, "eval_every_steps": -1,
          "sample_every_steps": -1, "optim.schedule": "constant"}
  base.update(overrides)
  return helpers.load_config("shapes_vae", arg, **base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """One uninterrupted run on a single device, evaluated and exported at the end."""
  workdir = tmp_path_factory.mktemp("vae_reference")
  train.train_and_evaluate(_config(eval_every_steps=0, sample_every_steps=0, **{"mesh.data": 1}), str(workdir),
                           devices=jax.devices()[:1])
  return workdir


def _assert_same_losses(workdir, reference, rtol=1e-5):
  got, want = helpers.losses(workdir), helpers.losses(reference)
  assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=rtol)


def test_training_lowers_the_loss_and_evaluates(reference):
  losses = helpers.losses(reference)
  assert losses[STEPS] < 0.8 * losses[1], losses
  rows = metrics.read_metrics(reference)
  train_rows = [r for r in rows if "loss" in r]
  for key in ("rec_l1", "rec_l2", "kl", "nll", "grad_norm"):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  evals = [r for r in rows if "eval_psnr" in r]
  assert [r["step"] for r in evals] == [STEPS]
  assert all(np.isfinite(evals[0][k]) for k in ("eval_psnr", "eval_l1", "eval_l2", "eval_kl"))
  assert json.loads((reference / "config.json").read_text())["trainer"] == "vae"


def test_reconstruction_grid_has_originals_on_top(reference):
  config = _config()
  grid = np.asarray(Image.open(reference / "samples" / f"step_{STEPS:07d}.png"))
  n, res, pad = config.sample.num_images, config.dataset.resolution, 2
  assert grid.shape == (2 * (res + pad) + pad, n * (res + pad) + pad, 3)
  first = next(input_pipeline.create_iterator(config.dataset, split=config.dataset.eval_split,
                                        global_batch_size=config.batch_size, seed=config.seed, train=False))
  np.testing.assert_array_equal(grid[pad:pad + res, pad:pad + res], images_lib.to_uint8(first["image"][0]))
  assert list(reference.glob("events.out.tfevents.*"))


def test_sharding_equivalence(reference, tmp_path):
  """8 fake devices as data=2 × fsdp=4 (both axes in one compiled program): the single-device losses."""
  config = _config(save_every_steps=STEPS, **{"mesh.data": 2, "mesh.fsdp": 4}, **{"export.enabled": False})
  setup = train.setup(config)
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(setup.state_shardings.params))
  train.train_and_evaluate(config, str(tmp_path))
  _assert_same_losses(tmp_path, reference)


def test_exact_resume_after_interruption(reference, tmp_path):
  """Lose everything after step 2 (as a crash would), rerun: the losses and final state are the uninterrupted run's."""
  shutil.copytree(reference, tmp_path / "w")
  shutil.rmtree(tmp_path / "w" / "checkpoints" / str(STEPS))
  config = _config(eval_every_steps=0, sample_every_steps=0, **{"mesh.data": 1})
  train.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  assert helpers.losses(tmp_path / "w") == helpers.losses(reference)  # bitwise on CPU, same device count
  setup = train.setup(config, devices=jax.devices()[:1])
  final = []
  for workdir in (reference, tmp_path / "w"):
    checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=3, with_data=False)
    final.append(jax.device_get(checkpointer.restore(STEPS, setup.abstract_state)))
    checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, final[0], final[1])


def test_export_is_loadable_with_the_measured_scaling_factor(reference):
  config = _config()
  measured = [r for r in metrics.read_metrics(reference) if "export_scaling_factor" in r]
  assert len(measured) == 1
  scaling_factor = measured[0]["export_scaling_factor"]
  models = model_dir_lib.load_model(reference / "export", components=("vae",))
  vae, params = models["vae"]
  assert vae.scaling_factor == pytest.approx(scaling_factor, rel=1e-6) and scaling_factor != 1.0
  assert tuple(vae.block_out_channels) == tuple(config.model.block_out_channels)

  # The exported params are the EMA params' autoencoder part (no discriminator in the tree anyway).
  setup = train.setup(_config(**{"mesh.data": 1}), devices=jax.devices()[:1])
  checkpointer = ckpt_lib.Checkpointer(str(reference), keep=3, with_data=False)
  state = jax.device_get(checkpointer.restore(STEPS, setup.abstract_state))
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, params, state.ema_params["vae"])

  # The scaling factor is 1 / std of the posterior-mode latents of the first export.scale_batches training batches.
  iterator = input_pipeline.create_iterator(config.dataset, split=config.dataset.train_split,
                                      global_batch_size=config.batch_size, seed=config.seed, train=False)
  images = np.concatenate([next(iterator)["image"] for _ in range(config.export.scale_batches)])
  latents = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode).mode())(params, images)
  latents = np.asarray(latents, np.float64)
  assert scaling_factor == pytest.approx(1.0 / latents.std(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# GAN


def _batch_and_keys(config, seed=0):
  res = config.dataset.resolution
  images = jax.random.uniform(jax.random.PRNGKey(seed), (config.batch_size, res, res, 3), minval=-1.0, maxval=1.0)
  return {"image": images}, jax.random.split(jax.random.PRNGKey(seed + 1), config.batch_size)


def _fresh_params(config):
  """Initial params through the loop's own (compiled, cached) init on one device."""
  setup = train.setup(config, devices=jax.devices()[:1])
  return setup.task, setup.init_fn(jax.random.PRNGKey(config.seed)).params


def _norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def test_gan_gradients_reach_each_network_only_through_its_own_objective():
  task, params = _fresh_params(_config("runlocal,gan", **{"losses.disc_start": 3, "mesh.data": 1}))
  config = task.config
  # The same nll and GAN terms without the adaptive weight's own gradients inside: for the brute-force check.
  plain = vae_trainer.Task(_config("runlocal,gan", **{"losses.disc_start": 3, "losses.disc_adaptive": False}))
  batch, keys = _batch_and_keys(config)

  @jax.jit
  def probe(p, step):
    def parts(q):
      return task.objectives(q, {}, batch, keys, step)

    def last_kernel_grad(name):  # brute force: differentiate the logged term at the decoder's last kernel
      def term(kernel):
        q = {**p, "vae": vae_trainer._with_last_layer(p["vae"], kernel)}
        return plain.objectives(q, {}, batch, keys, step)[2][name]
      return jax.grad(term)(vae_trainer._last_layer(p["vae"]))

    gen = jax.grad(lambda q: parts(q)[0])(p)
    disc = jax.grad(lambda q: parts(q)[1])(p)
    return gen, disc, last_kernel_grad("nll"), last_kernel_grad("g_loss"), task.loss(p, {}, batch, keys, step)[1]

  for step in (2, 3):  # disc_start = 3: the GAN is off, then on
    gen, disc, nll_grad, g_grad, aux = probe(params, jnp.int32(step))
    assert _norm(gen["vae"]) > 0
    assert _norm(gen["disc"]) == 0.0  # the generator term never trains the discriminator
    assert _norm(disc["vae"]) == 0.0  # the hinge loss never trains the autoencoder
    assert (_norm(disc["disc"]) > 0) == (step >= 3)
    assert float(aux["gan_factor"]) == (config.losses.disc_factor if step >= 3 else 0.0)
    # The adaptive weight is ‖∇nll‖ / (‖∇g‖ + eps) at the decoder's last kernel, times disc_weight.
    losses = config.losses
    expected = min(_norm(nll_grad) / (_norm(g_grad) + losses.adaptive_weight_eps), losses.adaptive_weight_max)
    assert float(aux["d_weight"]) == pytest.approx(expected * losses.disc_weight, rel=1e-4)

  # Called without the step, a delayed start is refused at trace time, naming the fix.
  with pytest.raises(ValueError, match="disc_start=3: Task.loss needs the training step"):
    jax.eval_shape(lambda p: task.loss(p, {}, batch, keys), params)


def test_gan_train_step_updates_both_networks():
  """Two steps of the loop's own train_step, the discriminator on from the second (whose learning rate the warmup
  makes non-zero): both networks move. The config is test_loop_passes_the_step_for_a_delayed_discriminator_start's,
  so the two tests share one compiled step."""
  config = _config("runlocal,gan", **{"mesh.data": 1, "losses.disc_start": 1})
  setup = train.setup(config, devices=jax.devices()[:1])
  state = setup.init_fn(jax.random.PRNGKey(config.seed))
  fresh = jax.device_get(state.params)
  step = jax.jit(functools.partial(train.train_step, task=setup.task, tx=setup.tx, schedule=setup.schedule,
                                   config=config, global_batch=config.batch_size))
  batch, _ = _batch_and_keys(config)
  for _ in range(2):
    state, aux = step(state, batch, {})
  state, aux = jax.device_get((state, aux))
  for key in ("loss", "d_loss", "g_loss", "d_weight", "logits_real", "logits_fake", "gan_factor"):
    assert np.isfinite(aux[key]), key
  assert aux["d_weight"] > 0 and aux["gan_factor"] == config.losses.disc_factor
  for part in ("vae", "disc"):
    assert _norm(jax.tree.map(lambda a, b: a - b, state.params[part], fresh[part])) > 0, part


def test_discriminator_output_size():
  for size, layers in ((16, 2), (32, 3), (64, 3)):
    disc = disc_lib.NLayerDiscriminator(channels=8, num_layers=layers, norm="group", norm_num_groups=4)
    x = jnp.zeros((2, size, size, 3))
    logits = jax.eval_shape(lambda x: disc.init_with_output(jax.random.PRNGKey(0), x)[0], x)
    assert logits.shape == (2, disc.output_size(size), disc.output_size(size), 1)


# ---------------------------------------------------------------------------------------------------------------
# PSNR


def test_psnr_against_hand_computed_values():
  x = jnp.zeros((2, 4, 4, 3))
  y = jnp.stack([jnp.full((4, 4, 3), 0.1), jnp.full((4, 4, 3), -0.5)])
  # MSE 0.01 and 0.25 over a data range of 2: 10 log10(4 / 0.01) = 26.0206 dB, 10 log10(4 / 0.25) = 12.0412 dB.
  np.testing.assert_allclose(vae_trainer.psnr(y, x), [26.0206, 12.0412], atol=1e-4)
  # The same images on a [0, 1] scale with range 1 give the same numbers.
  np.testing.assert_allclose(vae_trainer.psnr((y + 1) / 2, (x + 1) / 2, data_range=1.0), [26.0206, 12.0412],
                             atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS-VGG from a user-supplied file)

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # torchvision indices of relu1_2 .. relu5_3 in vgg16().features


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
  """Random LPIPS-VGG weights, named as the `lpips` package's state dict names them."""
  rng = np.random.default_rng(0)
  state, index, channels, slice_of = {}, 0, 3, 1
  for v in _VGG16:
    if v == "M":
      index += 1
      continue
    fan_in = channels * 9
    state[f"net.slice{slice_of}.{index}.weight"] = rng.normal(0, np.sqrt(2 / fan_in), (v, channels, 3, 3))
    state[f"net.slice{slice_of}.{index}.bias"] = rng.normal(0, 0.01, (v,))
    channels, index = v, index + 2
    if index - 1 in _TAPS:
      slice_of += 1
  for k, c in enumerate((64, 128, 256, 512, 512)):
    state[f"lin{k}.model.1.weight"] = np.abs(rng.normal(0, 0.1, (1, c, 1, 1)))
    state[f"lins.{k}.model.1.weight"] = state[f"lin{k}.model.1.weight"]
  state["scaling_layer.shift"] = np.array(lpips_lib.SHIFT)[None, :, None, None]
  state["scaling_layer.scale"] = np.array(lpips_lib.SCALE)[None, :, None, None]
  path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
  common.save_state_dict({k: np.asarray(v, np.float32) for k, v in state.items()}, path)
  return path, state


def _torch_lpips(state, x, y):
  """Reference: torchvision's VGG16 `features` layout and LPIPS' normalize/lin/average, in PyTorch."""
  import torch
  import torch.nn.functional as F
  weights = {}
  for k, v in state.items():
    if k.startswith("net.slice"):
      weights["features." + k.split(".", 2)[2]] = torch.from_numpy(np.asarray(v, np.float32))

  def features(images):
    h = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    h = (h - torch.tensor(lpips_lib.SHIFT).view(1, 3, 1, 1)) / torch.tensor(lpips_lib.SCALE).view(1, 3, 1, 1)
    taps, index = [], 0
    for v in _VGG16:
      if v == "M":
        h, index = F.max_pool2d(h, 2, 2), index + 1
        continue
      h = F.relu(F.conv2d(h, weights[f"features.{index}.weight"], weights[f"features.{index}.bias"], padding=1))
      if index + 1 in _TAPS:
        taps.append(h)
      index += 2
    return taps

  total = 0
  for k, (a, b) in enumerate(zip(features(x), features(y))):
    a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    lin = torch.from_numpy(np.asarray(state[f"lin{k}.model.1.weight"], np.float32))
    total = total + F.conv2d((a - b) ** 2, lin).mean((2, 3))
  return total[:, 0].numpy()


def test_lpips_matches_a_pytorch_reference(lpips_file):
  path, state = lpips_file
  params = lpips_lib.load_lpips_params(path)
  rng = np.random.default_rng(1)
  x, y = (rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32) for _ in range(2))
  got = jax.jit(lpips_lib.LPIPS().apply)({"params": params}, x, y)
  np.testing.assert_allclose(got, _torch_lpips(state, x, y), rtol=1e-4)
  assert float(jnp.max(jnp.abs(lpips_lib.LPIPS().apply({"params": params}, x, x)))) == 0.0


def test_perceptual_loss_trains_through_the_frozen_lpips(lpips_file, tmp_path):
  path, state = lpips_file
  task, params = _fresh_params(_config(**{"losses.perceptual_path": str(path), "mesh.data": 1}))
  config = task.config
  frozen = task.load_frozen()
  assert set(frozen) == {"lpips"}
  assert jax.tree.map(np.shape, frozen) == jax.tree.map(np.shape, nn.meta.unbox(task.frozen_abstract()))
  batch, keys = _batch_and_keys(config)
  (loss, aux), grads = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, frozen, batch, keys)
  assert aux["perceptual"] > 0
  assert float(loss) == pytest.approx(float(aux["nll"] + config.losses.kl_weight * aux["kl"] / (16 * 16 * 3)),
                                      rel=1e-6)
  assert np.isfinite(_norm(grads)) and _norm(grads) > 0

  # A missing file fails when the task is built; a wrong file names the tensors that do not fit.
  with pytest.raises(FileNotFoundError, match="perceptual_path=.*nope.safetensors.*does not exist"):
    vae_trainer.Task(_config(**{"losses.perceptual_path": str(tmp_path / "nope.safetensors")}))
  bad = dict(state)
  bad["lin2.model.1.weight"] = np.zeros((1, 8, 1, 1))
  del bad["lins.2.model.1.weight"], bad["net.slice5.28.bias"]
  common.save_state_dict({k: np.asarray(v, np.float32) for k, v in bad.items()}, tmp_path / "bad.safetensors")
  with pytest.raises(common.WeightsMismatchError, match=r"(?s)missing.*features_28/bias.*wrong shape.*lin2/kernel"):
    lpips_lib.load_lpips_params(tmp_path / "bad.safetensors")


def test_loop_passes_the_step_for_a_delayed_discriminator_start():
  """The loop's own train_step gives the loss its step: with disc_start=1 the GAN is off at step 0, on at step 1."""
  config = _config("runlocal,gan", **{"mesh.data": 1, "losses.disc_start": 1})
  setup = train.setup(config, devices=jax.devices()[:1])
  state = setup.init_fn(jax.random.PRNGKey(config.seed))
  step = jax.jit(functools.partial(train.train_step, task=setup.task, tx=setup.tx, schedule=setup.schedule,
                                   config=config, global_batch=config.batch_size))
  batch, _ = _batch_and_keys(config)
  factors = []
  for _ in range(2):
    state, aux = step(state, batch, {})
    factors.append(float(aux["gan_factor"]))
  assert factors == [0.0, config.losses.disc_factor]
