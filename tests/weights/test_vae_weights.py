"""diffusers / original-LDM AutoencoderKL weights ⇄ sd_jax, checked against diffusers' PyTorch model.

The reference is a random diffusers `AutoencoderKL` with a tiny config (2 levels, mid-block attention, a
conv_shortcut in both encoder and decoder), saved with `save_pretrained`; norms and biases are perturbed so that a
swapped scale/bias or a missed transpose cannot hide behind identity initialisations.
"""

import functools
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

from sd_jax.models.vae import create_vae  # noqa: E402
from sd_jax.weights import common  # noqa: E402
from sd_jax.weights import vae as vae_weights  # noqa: E402

TINY_DIFFUSERS_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def nhwc(t):
  return np.asarray(t.detach().float().numpy()).transpose(0, 2, 3, 1)


def torch_outputs(model, x):
  """(latent mean, reconstruction from the mode) of a diffusers AutoencoderKL, NHWC numpy."""
  with torch.no_grad():
    posterior = model.encode(x).latent_dist
    return nhwc(posterior.mean), nhwc(model.decode(posterior.mode()).sample)


@functools.cache
def jitted_outputs(model):
  def outputs(params, x):
    posterior = model.apply({"params": params}, x, method=model.encode)
    return posterior.mean, model.apply({"params": params}, posterior.mode(), method=model.decode)

  return jax.jit(outputs, compiler_options=FAST_COMPILE)


def jax_outputs(model, params, x_nhwc):
  return tuple(np.asarray(a) for a in jitted_outputs(model)(params, x_nhwc))


def assert_params_equal(a, b):
  flat_a, flat_b = common.flatten(a), common.flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=key)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """The torch model, its saved directory, an input batch, torch's outputs and the imported (model, params)."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**TINY_DIFFUSERS_CONFIG).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norm scales / biases: move off the 1 / 0 init
        p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("vae_diffusers")
  model.save_pretrained(directory, safe_serialization=True)
  x = torch.rand(2, 3, 16, 16) * 2 - 1
  mean, reconstruction = torch_outputs(model, x)
  jax_model, params = vae_weights.load_vae_from_diffusers_dir(directory)
  return dict(torch=model, dir=directory, x=x, x_nhwc=nhwc(x), mean=mean, reconstruction=reconstruction,
              model=jax_model, params=params)


# ----------------------------------------------------------------------------------------------------------------
# diffusers directories


def test_diffusers_parity_float32(ref):
  model, params = ref["model"], ref["params"]
  assert model == create_vae("tiny", scaling_factor=0.18215)  # config.json → the same module as our tiny config
  mean, reconstruction = jax_outputs(model, params, ref["x_nhwc"])
  mean_err = np.abs(mean - ref["mean"]).max()
  rec_err = np.abs(reconstruction - ref["reconstruction"]).max()
  print(f"float32 parity: latent mean max abs diff {mean_err:.2e}, reconstruction {rec_err:.2e}")
  assert mean_err <= 1e-4 and rec_err <= 1e-4
  assert np.abs(ref["reconstruction"]).max() > 0.1  # a real signal, not two near-zero outputs


def test_sharded_safetensors(ref, tmp_path):
  ref["torch"].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
  index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
  assert index.exists() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
  _, params = vae_weights.load_vae_from_diffusers_dir(tmp_path)
  assert_params_equal(params, ref["params"])


def test_fp16_variant(ref, tmp_path):
  half = diffusers.AutoencoderKL(**TINY_DIFFUSERS_CONFIG)
  half.load_state_dict(ref["torch"].state_dict())
  half.half().save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
  assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
  model, params = vae_weights.load_vae_from_diffusers_dir(tmp_path, variant="fp16")
  # Params are float32 (param_dtype) holding exactly the fp16-rounded weights.
  rounded = vae_weights.vae_from_diffusers_state_dict(
      {k: v.half().float() for k, v in ref["torch"].state_dict().items()}, model
  )
  assert_params_equal(params, rounded)
  mean, reconstruction = jax_outputs(model, params, ref["x_nhwc"])
  mean_err = np.abs(mean - ref["mean"]).max()
  rec_err = np.abs(reconstruction - ref["reconstruction"]).max()
  print(f"fp16 weights vs float32 torch: latent mean max abs diff {mean_err:.2e}, reconstruction {rec_err:.2e}")
  assert mean_err <= 1e-2 and rec_err <= 1e-2


def test_pickle_weights_refused(ref, tmp_path):
  ref["torch"].save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / "diffusion_pytorch_model.bin").exists()
  with pytest.raises(ValueError, match="safetensors"):
    vae_weights.load_vae_from_diffusers_dir(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Export


def test_export_round_trip_and_strict_load_into_diffusers(ref):
  state = vae_weights.vae_to_diffusers_state_dict(ref["params"])
  reference_state = ref["torch"].state_dict()
  assert state.keys() == reference_state.keys()
  for key, value in state.items():
    np.testing.assert_array_equal(value, reference_state[key].numpy(), err_msg=key)
  # import → export → import is exact
  assert_params_equal(vae_weights.vae_from_diffusers_state_dict(state, ref["model"]), ref["params"])

  fresh = diffusers.AutoencoderKL(**TINY_DIFFUSERS_CONFIG).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  mean, reconstruction = torch_outputs(fresh, ref["x"])
  np.testing.assert_array_equal(mean, ref["mean"])
  np.testing.assert_array_equal(reconstruction, ref["reconstruction"])


def test_save_dir_loads_in_diffusers(ref, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local directory; never the network
  vae_weights.save_vae_to_diffusers_dir(tmp_path, ref["model"], ref["params"])
  loaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
  assert loaded.config.block_out_channels == ref["torch"].config.block_out_channels
  mean, reconstruction = torch_outputs(loaded, ref["x"])
  np.testing.assert_array_equal(mean, ref["mean"])
  np.testing.assert_array_equal(reconstruction, ref["reconstruction"])
  model, params = vae_weights.load_vae_from_diffusers_dir(tmp_path)
  assert model == ref["model"]
  assert_params_equal(params, ref["params"])


# ----------------------------------------------------------------------------------------------------------------
# Older diffusers spellings and original LDM names


def test_legacy_attention_names_and_conv_shaped_weights(ref):
  """diffusers < 0.15 `query/key/value/proj_attn`, and q/k/v/out stored as 1×1 conv weights [C, C, 1, 1]."""
  legacy = {}
  for key, value in ref["torch"].state_dict().items():
    value = value.numpy()
    if ".attentions.0." in key:
      key = (key.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
             .replace(".to_out.0.", ".proj_attn."))
      if key.endswith("weight") and value.ndim == 2 and key.startswith("encoder"):
        value = value[:, :, None, None]
    legacy[key] = value
  assert "encoder.mid_block.attentions.0.query.weight" in legacy
  params = vae_weights.vae_from_diffusers_state_dict(legacy, ref["model"])
  assert_params_equal(params, ref["params"])

  conv_shaped = {k: (v.numpy()[:, :, None, None] if ".attentions.0.to_" in k and v.ndim == 2 else v.numpy())
                 for k, v in ref["torch"].state_dict().items()}
  assert_params_equal(vae_weights.vae_from_diffusers_state_dict(conv_shaped, "tiny"), ref["params"])


def test_ldm_names_are_the_real_ones(ref):
  """diffusers' own single-file converter maps our LDM export back onto the original diffusers state dict."""
  ldm = vae_weights.vae_to_ldm_state_dict(ref["params"])
  assert all(k.startswith("first_stage_model.") for k in ldm)
  assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # CompVis: 1×1 convs
  assert "first_stage_model.decoder.up.1.upsample.conv.weight" in ldm  # decoder levels numbered bottom-up
  assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in ldm
  converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()},
                                         dict(ref["torch"].config))
  reference_state = ref["torch"].state_dict()
  assert converted.keys() == reference_state.keys()
  for key, value in converted.items():
    np.testing.assert_array_equal(value.numpy(), reference_state[key].numpy(), err_msg=key)


def test_ldm_import(ref):
  ldm = vae_weights.vae_to_ldm_state_dict(ref["params"])
  # A whole SD single file: other components are ignored.
  single_file = dict(ldm, **{"model.diffusion_model.conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)})
  assert_params_equal(vae_weights.vae_from_ldm_state_dict(single_file, ref["model"]), ref["params"])
  # A standalone VAE training checkpoint: bare keys plus the loss's weights, which are not the VAE's.
  standalone = dict(vae_weights.vae_to_ldm_state_dict(ref["params"], prefix=""),
                    **{"loss.logvar": np.zeros((), np.float32)})
  assert "encoder.conv_in.weight" in standalone
  assert_params_equal(vae_weights.vae_from_ldm_state_dict(standalone, "tiny"), ref["params"])
  # Torch tensors are accepted as well as numpy arrays.
  as_torch = {k: torch.from_numpy(v) for k, v in ldm.items()}
  assert_params_equal(vae_weights.vae_from_ldm_state_dict(as_torch, ref["model"]), ref["params"])


# ----------------------------------------------------------------------------------------------------------------
# Mismatches


def test_mismatches_name_every_key(ref):
  state = {k: v.numpy() for k, v in ref["torch"].state_dict().items()}
  del state["decoder.up_blocks.1.resnets.0.conv_shortcut.bias"]
  state["decoder.mid_block.attentions.1.to_q.weight"] = np.zeros((64, 64), np.float32)
  state["encoder.conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)
  with pytest.raises(common.WeightsMismatchError) as info:
    vae_weights.vae_from_diffusers_state_dict(state, ref["model"])
  message = str(info.value)
  assert "missing from the weights (1)" in message
  assert "decoder/up_blocks_1/resnets_0/conv_shortcut/bias" in message
  assert "unexpected in the weights (1)" in message and "decoder/mid_block/attentions_1/to_q/kernel" in message
  assert "wrong shape (1)" in message and "encoder/conv_in/kernel: model (3, 3, 3, 32) vs weights (3, 3, 4, 32)" in (
      message
  )


def test_weights_of_another_config_are_refused(ref):
  state = ref["torch"].state_dict()
  with pytest.raises(common.WeightsMismatchError, match="missing from the weights"):
    vae_weights.vae_from_diffusers_state_dict(state, "f4_small")
  ldm = vae_weights.vae_to_ldm_state_dict(ref["params"])
  ldm["first_stage_model.decoder.up.2.block.0.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)
  with pytest.raises(common.WeightsMismatchError, match="LDM VAE weights") as info:
    vae_weights.vae_from_ldm_state_dict(ldm, ref["model"])
  assert "unexpected in the weights (1)" in str(info.value)
