"""U-Net weights against diffusers: random tiny PyTorch models saved in the diffusers layout, imported, and their
noise predictions compared; exports checked by loading them back into diffusers (strict) and through diffusers'
own LDM single-file converter; SD 1.5 / 2.1 key sets checked at full size without memory (eval_shape + meta).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from_pretrained below only ever reads local directories
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from sd_jax.models.unet import create_unet, unet_config, unet_config_from_diffusers  # noqa: E402
from sd_jax.weights import common  # noqa: E402
from sd_jax.models import unet as unet_models  # noqa: E402
from sd_jax.weights import unet as unet_weights  # noqa: E402

ATOL = 1e-4  # float32 parity
# Unoptimised XLA code compiles ~3x faster on CPU; these tests are compile-bound.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# diffusers UNet2DConditionModel kwargs. The context width differs from every block width, so a swapped
# to_k/to_v layout or a wrong cross_attention_dim cannot go unnoticed.
CONDITIONAL = {
    # SD 1.x style: 1x1 conv proj_in/out, attention_head_dim an int (= heads), class-conditional, 2 resnets.
    "sd1": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=2,
        cross_attention_dim=24,
        norm_num_groups=8,
        num_class_embeds=10,
        transformer_layers_per_block=1,
    ),
    # SD 2.x style: Linear proj_in/out, per-block head counts, float32 attention, 3 levels.
    "sd2": dict(
        sample_size=8,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        cross_attention_dim=48,
        norm_num_groups=8,
        transformer_layers_per_block=1,
    ),
}


def randomize(model, seed):
  """Every parameter random and non-zero (some diffusers inits are zeros, e.g. proj_out, which would hide a
  mis-mapped weight)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
  return model.eval()


def numpy_state(model):
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def make_inputs(model, seed=0, batch=2, size=8, length=5):
  """NCHW torch-side inputs (numpy)."""
  rng = np.random.default_rng(seed)
  cfg = model.config
  inputs = dict(
      sample=rng.standard_normal((batch, cfg.in_channels, size, size)).astype(np.float32),
      timesteps=np.array([17, 901][:batch], np.int64),
  )
  if getattr(cfg, "cross_attention_dim", None):
    inputs["encoder_hidden_states"] = rng.standard_normal((batch, length, cfg.cross_attention_dim)).astype(np.float32)
  if cfg.num_class_embeds:
    inputs["class_labels"] = rng.integers(0, cfg.num_class_embeds, (batch,))
  return inputs


def torch_forward(model, inputs):
  with torch.no_grad():
    kwargs = {k: torch.from_numpy(v) for k, v in inputs.items() if k not in ("sample", "timesteps")}
    out = model(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]), **kwargs).sample
  return out.numpy()


@functools.cache
def _jitted(module):
  def apply(params, inputs):
    return module.apply({"params": params}, **inputs)
  return jax.jit(apply, compiler_options=FAST_COMPILE)


def jax_forward(module, params, inputs):
  """Same inputs as torch_forward, NHWC in and out, returned as NCHW."""
  jax_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  jax_inputs["sample"] = jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1))
  jax_inputs["timesteps"] = jnp.asarray(inputs["timesteps"], jnp.int32)
  if "class_labels" in inputs:
    jax_inputs["class_labels"] = jnp.asarray(inputs["class_labels"], jnp.int32)
  return np.asarray(_jitted(module)(params, jax_inputs)).transpose(0, 3, 1, 2)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def plain_config(config):
  """A diffusers config without private keys, tuples as lists (as in config.json)."""
  return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def assert_trees_equal(a, b):
  fa, fb = common.flatten(a), common.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


class Saved:
  """A random diffusers model, saved with save_pretrained, plus inputs and its reference output."""

  def __init__(self, model, directory):
    self.model = model
    self.directory = directory
    self.state = numpy_state(model)
    self.inputs = make_inputs(model)
    self.reference = torch_forward(model, self.inputs)
    assert np.std(self.reference) > 1e-2  # the comparison means something
    model.save_pretrained(directory, safe_serialization=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """saved(name) -> Saved, built once per module: 'sd1', 'sd2' (UNet2DConditionModel) or 'ddpm'
  (UNet2DModel with the sd_jax ddpm_small config)."""
  cache = {}

  def get(name):
    if name not in cache:
      if name == "ddpm":
        config = unet_models.unet_config_to_diffusers(unet_config("ddpm_small"))
        assert config.pop("_class_name") == "UNet2DModel"
        model = diffusers.UNet2DModel(**config)
      else:
        model = diffusers.UNet2DConditionModel(**CONDITIONAL[name])
      cache[name] = Saved(randomize(model, seed=len(cache)), tmp_path_factory.mktemp(name))
    return cache[name]

  return get


# ---------------------------------------------------------------------------------------------------------------
# diffusers layout


@pytest.mark.parametrize("name", ["sd1", "sd2", "ddpm"])
def test_import_matches_diffusers(saved, name):
  case = saved(name)
  module, params = unet_weights.load_unet_from_diffusers_dir(case.directory)
  got = jax_forward(module, params, case.inputs)
  diff = max_diff(got, case.reference)
  print(f"{name}: max |jax - torch| = {diff:.2e} (output std {np.std(case.reference):.3f})")
  assert diff <= ATOL
  if name == "ddpm":
    # The pixel-space DDPM config round-trips through diffusers' UNet2DModel config unchanged.
    assert module == create_unet("ddpm_small")
    assert module.down_block_types[1] == "AttnDownBlock2D" and module.mid_block_type == "UNetMidBlock2D"
  else:
    assert module.has_cross_attention
    assert module.use_linear_projection == (name == "sd2")


@pytest.mark.parametrize("name", ["sd1", "sd2", "ddpm"])
def test_export_is_exact_inverse_and_loads_strictly_into_diffusers(saved, name):
  case = saved(name)
  module, params = unet_weights.load_unet_from_diffusers_dir(case.directory)
  exported = unet_weights.unet_to_diffusers_state_dict(params)
  assert exported.keys() == case.state.keys()
  for key, value in case.state.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  assert_trees_equal(unet_weights.unet_from_diffusers_state_dict(exported, module), params)

  fresh = type(case.model)(**plain_config(case.model.config)).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  np.testing.assert_allclose(torch_forward(fresh, case.inputs), case.reference, rtol=0, atol=1e-6)


def test_pre_0_15_attention_names(saved):
  """google/ddpm-* checkpoints predate diffusers 0.15: query/key/value/proj_attn instead of to_q/.../to_out.0."""
  case = saved("ddpm")
  legacy_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  legacy = {}
  for key, value in case.state.items():
    for new, old in legacy_names.items():
      key = key.replace(new, old)
    legacy[key] = value
  assert "mid_block.attentions.0.proj_attn.weight" in legacy
  module = create_unet("ddpm_small")
  assert_trees_equal(
      unet_weights.unet_from_diffusers_state_dict(legacy, module),
      unet_weights.unet_from_diffusers_state_dict(case.state, module),
  )


def test_save_dir_loads_in_diffusers(saved, tmp_path):
  """save_unet_to_diffusers_dir writes what diffusers' from_pretrained reads back to the same model."""
  case = saved("sd2")
  module, params = unet_weights.load_unet_from_diffusers_dir(case.directory)
  unet_weights.save_unet_to_diffusers_dir(tmp_path, module, params)
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
  assert plain_config(reloaded.config) == plain_config(case.model.config)
  for key, value in numpy_state(reloaded).items():
    np.testing.assert_array_equal(value, case.state[key], err_msg=key)
  assert unet_weights.load_unet_from_diffusers_dir(tmp_path)[0] == module


# ---------------------------------------------------------------------------------------------------------------
# Files: shards, variants, pickles


def test_sharded_safetensors(saved, tmp_path):
  case = saved("sd1")
  case.model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
  assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
  _, sharded = unet_weights.load_unet_from_diffusers_dir(tmp_path)
  _, single = unet_weights.load_unet_from_diffusers_dir(case.directory)
  assert_trees_equal(sharded, single)


def test_fp16_variant(saved, tmp_path):
  case = saved("sd1")
  half = type(case.model).from_pretrained(case.directory).half()
  half.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
  assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
  module, params = unet_weights.load_unet_from_diffusers_dir(tmp_path, variant="fp16")
  assert jax.tree_util.tree_leaves(params)[0].dtype == np.float32  # read as fp16, computed in float32
  diff = max_diff(jax_forward(module, params, case.inputs), case.reference)
  print(f"fp16 variant: max |jax(fp16 weights) - torch(fp32)| = {diff:.2e}")
  assert diff <= 1e-2
  # An fp16-only directory is found without naming the variant.
  _, default = unet_weights.load_unet_from_diffusers_dir(tmp_path)
  assert_trees_equal(default, params)


def test_pickle_bin_is_refused_unless_allowed(saved, tmp_path):
  case = saved("sd1")
  case.model.save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / "diffusion_pytorch_model.bin").exists()
  with pytest.raises(ValueError, match="safetensors"):
    unet_weights.load_unet_from_diffusers_dir(tmp_path)
  _, params = unet_weights.load_unet_from_diffusers_dir(tmp_path, allow_pickle=True)
  _, expected = unet_weights.load_unet_from_diffusers_dir(case.directory)
  assert_trees_equal(params, expected)


def test_mismatches_name_the_key(saved, tmp_path):
  case = saved("sd1")
  module = create_unet(unet_config_from_diffusers(dict(case.model.config)))
  convert = functools.partial(unet_weights.unet_from_diffusers_state_dict, config_fields=module)
  missing = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"
  missing_path = "down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel"
  with pytest.raises(common.WeightsMismatchError, match=f"missing.*\n.*{missing_path}"):
    convert({k: v for k, v in case.state.items() if k != missing})
  with pytest.raises(common.WeightsMismatchError, match="unexpected.*\n.*mid_block/resnets_7/conv1/kernel"):
    convert({**case.state, "mid_block.resnets.7.conv1.weight": np.zeros((64, 64, 3, 3), np.float32)})
  with pytest.raises(common.WeightsMismatchError, match=r"conv_in/kernel: model \(3, 3, 4, 32\) vs weights"):
    convert({**case.state, "conv_in.weight": np.zeros((32, 3, 3, 3), np.float32)})
  ldm = unet_weights.unet_to_ldm_state_dict(convert(case.state), module)
  with pytest.raises(common.WeightsMismatchError, match="model.diffusion_model.input_blocks.99.0.weight"):
    unet_weights.unet_from_ldm_state_dict({**ldm, "model.diffusion_model.input_blocks.99.0.weight": np.zeros(3)},
                                          module)
  # Through a directory whose config does not fit its weights (one more resnet per block).
  config = json.loads((case.directory / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(config, layers_per_block=3)))
  (tmp_path / "diffusion_pytorch_model.safetensors").symlink_to(case.directory / "diffusion_pytorch_model.safetensors")
  with pytest.raises(common.WeightsMismatchError, match="down_blocks_0/resnets_2/conv1/kernel"):
    unet_weights.load_unet_from_diffusers_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Original LDM single-file layout


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_ldm_single_file_matches_diffusers_converter(saved, name):
  case = saved(name)
  module, params = unet_weights.load_unet_from_diffusers_dir(case.directory)
  ldm = unet_weights.unet_to_ldm_state_dict(params, module)
  assert all(k.startswith("model.diffusion_model.") for k in ldm)
  assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in ldm
  assert ("model.diffusion_model.label_emb.weight" in ldm) == (name == "sd1")
  # diffusers' converter takes the single-file checkpoint back to exactly the diffusers state dict.
  converted = convert_ldm_unet_checkpoint(dict(ldm), dict(case.model.config))
  assert converted.keys() == case.state.keys()
  for key, value in case.state.items():
    np.testing.assert_array_equal(converted[key], value, err_msg=key)
  # Import: other components of the file are ignored; the result equals the diffusers import.
  checkpoint = {**ldm, "first_stage_model.decoder.conv_in.weight": np.zeros((1,), np.float32)}
  assert_trees_equal(unet_weights.unet_from_ldm_state_dict(checkpoint, module), params)
  stripped = common.strip_prefix(ldm, unet_weights.LDM_PREFIX)  # as a whole-file importer hands it over
  assert_trees_equal(unet_weights.unet_from_ldm_state_dict(stripped, module), params)


def test_ldm_ema_weights(saved):
  case = saved("sd1")
  module, params = unet_weights.load_unet_from_diffusers_dir(case.directory)
  ldm = unet_weights.unet_to_ldm_state_dict(params, module)
  # EMA copies are stored under dot-less names: model_ema.diffusion_modelinput_blocks00weight.
  ema = {"model_ema." + "".join(k.split(".")[1:]): 2 * v for k, v in ldm.items()}
  got = unet_weights.unet_from_ldm_state_dict({**ldm, **ema}, module, use_ema=True)
  assert_trees_equal(got, jax.tree_util.tree_map(lambda x: 2 * x, params))
  assert_trees_equal(unet_weights.unet_from_ldm_state_dict({**ldm, **ema}, module), params)


# ---------------------------------------------------------------------------------------------------------------
# Full-size key sets, without memory


@pytest.mark.parametrize("name", ["sd15", "sd21_base"])
def test_real_sd_keys_map_one_to_one(name):
  """Every tensor of a real SD 1.5 / 2.1 U-Net has exactly one place here with the same shape, in both the
  diffusers layout and (through diffusers' converter) the original single-file layout."""
  module = create_unet(name)
  abstract = jax.eval_shape(functools.partial(module.init, jax.random.key(0)), **module.example_inputs())["params"]
  exported = unet_weights.unet_to_diffusers_state_dict(abstract)
  diffusers_config = unet_models.unet_config_to_diffusers(module)
  with torch.device("meta"):
    reference = diffusers.UNet2DConditionModel(**{k: v for k, v in diffusers_config.items() if k != "_class_name"})
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert {k: tuple(v.shape) for k, v in exported.items()} == expected
  assert len(expected) == 686

  ldm = unet_weights.unet_to_ldm_state_dict(abstract, module)
  assert "model.diffusion_model.output_blocks.11.1.proj_out.weight" in ldm
  assert "model.diffusion_model.output_blocks.8.2.conv.weight" in ldm  # upsampler after attention
  assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm  # upsampler without attention
  converted = convert_ldm_unet_checkpoint(dict(ldm), diffusers_config)
  assert {k: tuple(v.shape) for k, v in converted.items()} == expected
