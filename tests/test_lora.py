"""LoRA adapters (sd_jax.lora) and their files (sd_jax.weights.lora), checked against diffusers + PEFT.

Tiny random-weight reference models (diffusers UNet2DConditionModel, transformers CLIPTextModel) are converted to
sd_jax params; LoRAs made by PEFT load here, LoRAs made here load in diffusers, and both give the same outputs.
Every U-Net LoRA targets the "resnet" preset (Dense and Conv modules: attention, proj_in/out, ff, resnet convs), so
that all the U-Net runs share one compiled program; the U-Net runs with remat_policy="dots_saveable", so that every
comparison also checks that adapters apply inside rematerialised blocks.
"""

import copy
import logging

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from sd_jax import lora
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.models import clip as clip_models
from sd_jax.models import layers
from sd_jax.models import unet as unet_models
from sd_jax.weights import clip as clip_weights
from sd_jax.weights import common
from sd_jax.weights import lora as lora_files
from sd_jax.weights import unet as unet_weights
from tests import helpers

TOL = 1e-4
SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.UNET_TARGETS["resnet"])  # scale 2
TEXT_SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.TEXT_TARGETS)
# The same modules, as PEFT's target_modules name them on the diffusers / transformers models.
PEFT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut"]
PEFT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


_randomize = helpers.randomize_torch
_public = helpers.public_config


def _with_up(adapters, seed: int, std: float = 0.1):
  """The adapters with a random non-zero "up" (fresh ones have up = 0)."""
  rng = np.random.default_rng(seed)
  return {p: {"down": np.asarray(a["down"]), "up": rng.normal(size=a["up"].shape).astype(np.float32) * std}
          for p, a in adapters.items()}


@pytest.fixture(scope="module")
def m():
  """Reference torch models, the same weights as sd_jax params, inputs, and jitted forwards (compiled once).

  `unet_lora(params, adapters, scale)` is the one compiled U-Net program: with scale 0 it adds exact zeros, so it
  is also the base model (the text tower, cheap to compile, has a separate plain program for a bitwise check).
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny models: threads only spin on a shared 2-core machine
  torch_unet = _randomize(diffusers.UNet2DConditionModel(
      **_public(unet_models.unet_config_to_diffusers(unet_models.unet_config("tiny")))), 0)
  torch_text = _randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **clip_models.clip_config_to_transformers(clip_models.clip_config("tiny").text))), 1)
  unet = unet_models.create_unet("tiny", remat_policy="dots_saveable")  # the params do not depend on remat
  text = clip_models.create_clip_text_model(clip_models.clip_config("tiny").text)
  unet_params = unet_weights.unet_from_diffusers_state_dict(
      {k: v.numpy() for k, v in torch_unet.state_dict().items()}, unet)
  text_params = clip_weights.clip_text_from_transformers(
      {k: v.numpy() for k, v in torch_text.state_dict().items()}, text)
  rng = np.random.default_rng(0)
  x = dict(latents=rng.normal(size=(2, 16, 16, 4)).astype(np.float32), timesteps=np.asarray([10, 700]),
           context=rng.normal(size=(2, 7, 32)).astype(np.float32),
           ids=np.asarray([[126, 5, 9, 33, 127, 127], [126, 77, 3, 127, 127, 127]]))

  @jax.jit
  def unet_lora(params, adapters, scale):
    with lora.applied(adapters, scale):
      return unet.apply({"params": params}, x["latents"], x["timesteps"], x["context"])

  @jax.jit
  def text_lora(params, adapters, scale):
    with lora.applied(adapters, scale):
      return text.apply({"params": params}, x["ids"]).last_hidden_state

  @jax.jit
  def text_base(params):
    return text.apply({"params": params}, x["ids"]).last_hidden_state

  def torch_unet_out(model):
    with torch.no_grad():
      out = model(torch.from_numpy(np.transpose(x["latents"], (0, 3, 1, 2))), torch.from_numpy(x["timesteps"]),
                  torch.from_numpy(x["context"])).sample
    return np.transpose(out.numpy(), (0, 2, 3, 1))

  def torch_text_out(model):
    with torch.no_grad():
      return model(torch.from_numpy(x["ids"])).last_hidden_state.numpy()

  yield dict(torch_unet=torch_unet, torch_text=torch_text, unet=unet, text=text, unet_params=unet_params,
             text_params=text_params, x=x, unet_lora=unet_lora, text_lora=text_lora,
             text_base=text_base, torch_unet_out=torch_unet_out, torch_text_out=torch_text_out)
  torch.set_num_threads(threads)


def _adapters(m, seed: int = 0):
  """Adapters made here, with a non-zero "up": {"unet": ..., "text_encoder": ...}."""
  key_unet, key_text = jax.random.split(jax.random.key(seed))
  return {"unet": _with_up(lora.init(key_unet, m["unet_params"], SPEC), seed + 1),
          "text_encoder": _with_up(lora.init(key_text, m["text_params"], TEXT_SPEC), seed + 2)}


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ---------------------------------------------------------------------------------------------------------------
# The library


def test_spec_targets_and_init(m):
  assert lora.LoraSpec(rank=8).scale == 1.0 and SPEC.scale == 2.0
  for bad, match in ((dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(alpha=-1.0), "alpha"),
                     (dict(dropout=1.0), "dropout"), (dict(targets=()), "non-empty"), (dict(targets="to_q"), "tuple")):
    with pytest.raises(ValueError, match=match):
      lora.LoraSpec(**bad)

  attention = lora.find_targets(m["unet_params"], lora.UNET_TARGETS["attention"])
  assert len(attention) == 4 * 2 * 4  # 4 transformer blocks (down 1, mid 1, up 2) x (attn1, attn2) x (q, k, v, out)
  assert "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0" in attention
  resnet = lora.find_targets(m["unet_params"], lora.UNET_TARGETS["resnet"])
  assert "mid_block/resnets_1/conv2" in resnet and "up_blocks_1/resnets_0/conv_shortcut" in resnet
  assert "up_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj" in resnet
  assert lora.find_targets(m["text_params"], lora.TEXT_TARGETS) == sorted(
      f"encoder/layers_{i}/self_attn/{p}" for i in range(2) for p in lora.TEXT_TARGETS)
  with pytest.raises(ValueError, match=r"\['nope'\] match no Dense/Conv module"):
    lora.find_targets(m["unet_params"], ("to_q", "nope"))

  adapters = lora.init(jax.random.key(0), m["unet_params"], SPEC)
  assert set(adapters) == set(resnet)
  q = adapters["down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"]  # Dense [32 context, 32]
  assert q["down"].shape == (32, 4) and q["up"].shape == (4, 32) and q["down"].dtype == jnp.float32
  conv = adapters["down_blocks_1/resnets_0/conv1"]  # Conv [3, 3, 32, 64]
  assert conv["down"].shape == (3, 3, 32, 4) and conv["up"].shape == (1, 1, 4, 64)
  assert all(not np.any(np.asarray(a["up"])) for a in adapters.values())
  downs = np.concatenate([np.ravel(a["down"]) for a in adapters.values()])
  assert abs(downs.std() - 1 / SPEC.rank) < 0.01 and abs(downs.mean()) < 0.01  # PEFT's gaussian: N(0, (1/r)^2)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), lora.abstract(m["unet_params"], SPEC)) == jax.tree.map(
      lambda a: (a.shape, a.dtype), adapters)
  assert lora.num_params(adapters) == sum(a["down"].size + a["up"].size for a in adapters.values())


def test_applied_equals_merge_and_zero_up_is_exact(m):
  adapters, fresh = _adapters(m), lora.init(jax.random.key(0), m["text_params"], TEXT_SPEC)
  base = np.asarray(m["text_base"](m["text_params"]))
  np.testing.assert_array_equal(np.asarray(m["text_lora"](m["text_params"], fresh, TEXT_SPEC.scale)), base)
  fresh = lora.init(jax.random.key(0), m["unet_params"], SPEC)
  base = np.asarray(m["unet_lora"](m["unet_params"], adapters["unet"], 0.0))
  np.testing.assert_array_equal(np.asarray(m["unet_lora"](m["unet_params"], fresh, SPEC.scale)), base)

  got = np.asarray(m["unet_lora"](m["unet_params"], adapters["unet"], 0.7))
  merged = np.asarray(m["unet_lora"](lora.merge(m["unet_params"], adapters["unet"], 0.7), adapters["unet"], 0.0))
  assert _max_diff(got, base) > 0.5  # the adapters matter
  assert _max_diff(got, merged) < 1e-5

  # Text tower; two LoRAs at once (nested contexts) equal both merged.
  text_params, first, second = m["text_params"], adapters["text_encoder"], _adapters(m, seed=7)["text_encoder"]
  text = m["text"]

  @jax.jit
  def two(params, a, b):
    with lora.applied(a, 0.5), lora.applied(b, 1.5):
      return text.apply({"params": params}, m["x"]["ids"]).last_hidden_state

  want = m["text_base"](lora.merge(lora.merge(text_params, first, 0.5), second, 1.5))
  assert _max_diff(two(text_params, first, second), want) < 1e-5
  assert _max_diff(m["text_lora"](text_params, first, 1.0), m["text_base"](lora.merge(text_params, first))) < 1e-5
  # merge keeps a variables dict and logically partitioned boxes.
  boxed = {"params": {"q": {"kernel": nn.LogicallyPartitioned(np.ones((2, 3), np.float32), ("embed", "mlp")),
                            "bias": np.zeros(3)}}}
  one = {"q": {"down": np.ones((2, 1), np.float32), "up": np.ones((1, 3), np.float32)}}
  merged_boxed = lora.merge(boxed, one, 2.0)
  assert merged_boxed["params"]["q"]["kernel"].names == ("embed", "mlp")
  np.testing.assert_array_equal(merged_boxed["params"]["q"]["kernel"].unbox(), np.full((2, 3), 3.0))


class _Resnet(nn.Module):
  """A U-Net resnet block (Conv and Dense modules), rematerialised as the U-Net does it."""

  @nn.compact
  def __call__(self, x, temb):
    resnet = layers.remat(layers.ResnetBlock2D, "dots_saveable", static_argnums=(3,))
    return resnet(out_channels=16, groups=8, name="resnets_0")(x, temb, True)


def test_gradients_with_sharded_params_and_dropout(caplog):
  """Only the adapters get gradients, under jit with sharded base params and remat; dropout needs an rng."""
  model, rng = _Resnet(), np.random.default_rng(0)
  inputs = (rng.normal(size=(2, 4, 4, 8)).astype(np.float32), rng.normal(size=(2, 32)).astype(np.float32))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))["params"]
  base = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.2).astype(np.float32), shapes)
  spec = lora.LoraSpec(rank=2, targets=("conv1", "conv2", "conv_shortcut", "time_emb_proj"))
  adapters = _with_up(lora.init(jax.random.key(1), base, spec), 2)

  def loss_fn(lora_params, params, rate=0.0, key=None):
    with lora.applied(lora_params, 0.5, dropout=rate, rng=key):
      return jnp.mean(model.apply({"params": params}, *inputs) ** 2)

  mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
  sharded = jax.device_put(base, jax.tree.map(
      lambda a: NamedSharding(mesh, PartitionSpec(*([None] * (a.ndim - 1)), "model")), base))
  replicated = lambda tree: jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))  # noqa: E731
  step = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = step(replicated(adapters), sharded)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(np.all(np.any(np.asarray(g) != 0, axis=-1)) for g in jax.tree.leaves(grads))
  updated = jax.tree.map(lambda a, g: a - 0.1 * np.asarray(g), adapters, grads)
  assert float(step(replicated(updated), sharded)[0]) < float(loss)

  dropped = jax.jit(lambda a, key: loss_fn(a, base, 0.5, key))
  first, again, other = (float(dropped(adapters, jax.random.key(s))) for s in (1, 1, 2))
  assert first == again and first != other and first != float(loss)
  with pytest.raises(ValueError, match="needs an rng"):
    loss_fn(adapters, base, 0.5)
  # Adapters that match nothing the model calls (made for another model, or another root) are reported.
  with caplog.at_level(logging.WARNING):
    jax.eval_shape(loss_fn, {f"unet/{p}": a for p, a in adapters.items()}, base)
  assert "none of the 4 adapters (paths like unet/resnets_0/conv1) matched" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Files: PEFT / diffusers -> sd_jax


@pytest.fixture(scope="module")
def peft_models(m, tmp_path_factory):
  """The reference models with PEFT LoRAs (r 4, lora_alpha 8: scale 2; lora_B non-zero), saved as diffusers'
  training scripts save them (save_lora_weights with the adapter metadata)."""
  unet, text = copy.deepcopy(m["torch_unet"]), copy.deepcopy(m["torch_text"])
  unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=PEFT_UNET_TARGETS))
  text.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=PEFT_TEXT_TARGETS))
  generator = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for model in (unet, text):
      for name, p in model.named_parameters():
        if "lora_B" in name:
          p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
  root = tmp_path_factory.mktemp("peft")
  unet_state, text_state = get_peft_model_state_dict(unet), get_peft_model_state_dict(text)
  diffusers.StableDiffusionPipeline.save_lora_weights(
      root, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
      unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
      text_encoder_lora_adapter_metadata=text.peft_config["default"].to_dict())
  return dict(dir=root, unet=unet, text=text, unet_state=unet_state, text_state=text_state)


def test_peft_lora_loads_here(m, peft_models):
  loaded = lora_files.load(peft_models["dir"], m["unet_params"], m["text_params"])
  assert set(loaded["unet"]) == set(lora.find_targets(m["unet_params"], SPEC.targets))
  want = m["torch_unet_out"](peft_models["unet"])
  assert _max_diff(want, m["torch_unet_out"](m["torch_unet"])) > 0.5
  assert _max_diff(m["unet_lora"](m["unet_params"], loaded["unet"], 1.0), want) < TOL
  want = m["torch_text_out"](peft_models["text"])
  assert _max_diff(m["text_lora"](m["text_params"], loaded["text_encoder"], 1.0), want) < TOL


def test_older_diffusers_forms(m, peft_models, tmp_path):
  """`.lora.down.weight` (what diffusers' training scripts wrote through convert_state_dict_to_diffusers), the
  attention-processor form without the `unet.` prefix, and `lora_linear_layer` text keys: the same adapters.
  Without metadata diffusers takes lora_alpha = r, so these files mean scale 1 where the PEFT file says 2."""
  reference = lora_files.load(peft_models["dir"], m["unet_params"], m["text_params"])
  unet_state = diffusers.utils.convert_state_dict_to_diffusers(peft_models["unet_state"])
  text_state = diffusers.utils.convert_state_dict_to_diffusers(peft_models["text_state"])
  assert any(".to_q.lora.down.weight" in k for k in unet_state)
  assert any(".q_proj.lora_linear_layer.down.weight" in k for k in text_state)
  diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "old", unet_lora_layers=unet_state,
                                                       text_encoder_lora_layers=text_state)
  processor = {}
  for key, value in unet_state.items():
    for proj, old in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora")):
      key = key.replace(f".{proj}.lora.", f".processor.{old}.")
    processor[key] = value.numpy()
  assert any(".attn1.processor.to_out_lora.up.weight" in k for k in processor)
  common.save_state_dict(processor, tmp_path / "procs.safetensors")
  for path in (tmp_path / "old", tmp_path / "procs.safetensors"):
    loaded = lora_files.load(path, m["unet_params"], m["text_params"])
    for component in ("unet", "text_encoder") if path.is_dir() else ("unet",):
      assert loaded[component].keys() == reference[component].keys()
      for module, adapter in loaded[component].items():
        np.testing.assert_array_equal(adapter["down"], reference[component][module]["down"])
        np.testing.assert_allclose(2 * adapter["up"], reference[component][module]["up"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Files: sd_jax -> diffusers


def _pipeline(m):
  unet, text = copy.deepcopy(m["torch_unet"]), copy.deepcopy(m["torch_text"])
  return diffusers.StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet,
                                           scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)


def test_saved_files_load_in_diffusers(m, tmp_path):
  adapters = _adapters(m)
  want_unet = np.asarray(m["unet_lora"](m["unet_params"], adapters["unet"], SPEC.scale))
  want_text = np.asarray(m["text_lora"](m["text_params"], adapters["text_encoder"], SPEC.scale))

  file = lora_files.save_diffusers(tmp_path / "diffusers", adapters, SPEC.scale)
  assert file.name == "pytorch_lora_weights.safetensors"
  keys = common.load_state_dict(file)
  assert keys["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (4, 32)
  assert keys["unet.down_blocks.1.resnets.0.conv1.lora_A.weight"].shape == (4, 32, 3, 3)
  assert keys["unet.down_blocks.1.resnets.0.conv1.lora_B.weight"].shape == (64, 4, 1, 1)
  assert keys["text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight"].shape == (32, 4)
  kohya = lora_files.save_kohya(tmp_path / "kohya.safetensors", adapters, SPEC)
  keys = common.load_state_dict(kohya)
  assert keys["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"] == 8.0
  assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys

  for path in (file.parent, kohya):
    pipe = _pipeline(m)
    pipe.load_lora_weights(str(path))
    assert _max_diff(m["torch_unet_out"](pipe.unet), want_unet) < TOL, path
    assert _max_diff(m["torch_text_out"](pipe.text_encoder), want_text) < TOL, path

  # Both files read back here as the same adapters, scale folded into "up".
  for path in (file, kohya):
    loaded = lora_files.load(path, m["unet_params"], m["text_params"])
    for component in ("unet", "text_encoder"):
      assert loaded[component].keys() == adapters[component].keys()
      for module, adapter in adapters[component].items():
        np.testing.assert_allclose(loaded[component][module]["down"], adapter["down"], rtol=1e-6)
        np.testing.assert_allclose(loaded[component][module]["up"], SPEC.scale * adapter["up"], rtol=1e-6)

  # The LDM-named kohya variant (input_blocks / middle_block / output_blocks) is the same LoRA, here and in
  # diffusers.
  modules, subtrees = unet_weights._ldm_module_map(m["unet"])
  to_ldm = {}
  for path in adapters["unet"]:
    name = unet_weights._path_to_torch(path)
    ldm_name = unet_weights._rename(f"{name}.weight", modules, subtrees).removesuffix(".weight")
    to_ldm[f"lora_unet_{name.replace('.', '_')}"] = f"lora_unet_{ldm_name.replace('.', '_')}"
  ldm = {}
  for key, value in common.load_state_dict(kohya).items():
    name, _, leaf = key.partition(".")
    ldm[f"{to_ldm.get(name, name)}.{leaf}"] = value
  assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in ldm
  assert "lora_unet_output_blocks_2_0_skip_connection.lora_up.weight" in ldm
  assert "lora_unet_middle_block_0_in_layers_2.alpha" in ldm
  common.save_state_dict(ldm, tmp_path / "ldm.safetensors")
  pipe = _pipeline(m)
  pipe.load_lora_weights(str(tmp_path / "ldm.safetensors"), unet_config=pipe.unet.config)  # block numbers need it
  assert _max_diff(m["torch_unet_out"](pipe.unet), want_unet) < TOL
  loaded_ldm = lora_files.load(tmp_path / "ldm.safetensors", m["unet_params"], m["text_params"])
  loaded = lora_files.load(kohya, m["unet_params"], m["text_params"])
  for component in ("unet", "text_encoder"):
    assert loaded_ldm[component].keys() == loaded[component].keys()
    for module in loaded[component]:
      for part in ("down", "up"):
        np.testing.assert_array_equal(loaded_ldm[component][module][part], loaded[component][module][part])


# ---------------------------------------------------------------------------------------------------------------
# Errors and embeddings


def test_errors_name_what_does_not_fit(m, peft_models, tmp_path):
  adapters = _adapters(m)
  file = lora_files.save_diffusers(tmp_path, adapters, 1.0)
  # Another model: no mid-block attention, a 48-wide context (attn2 to_k / to_v take 48 inputs).
  other = copy.deepcopy(m["unet_params"])
  del other["mid_block"]["attentions_0"]
  other["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"] = np.zeros((48, 32))
  with pytest.raises(common.WeightsMismatchError) as error:
    lora_files.load(file, other, m["text_params"])
  message = str(error.value)
  assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q: no such Dense/Conv module" in message
  assert "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k: kernel (48, 32) needs down (48, 4)" in message
  with pytest.raises(ValueError, match="has text_encoder LoRA weights.*pass the base text_encoder's params"):
    lora_files.load(file, m["unet_params"])
  with pytest.raises(ValueError, match="modules missing from the model"):
    lora.merge(other, {"mid_block/attentions_0/proj_in": adapters["unet"]["mid_block/attentions_0/proj_in"]})

  # Pickles only with allow_pickle.
  diffusers.StableDiffusionPipeline.save_lora_weights(
      tmp_path / "bin", unet_lora_layers=peft_models["unet_state"], safe_serialization=False)
  with pytest.raises(ValueError, match="(?s)pickle-based.*allow_pickle"):
    lora_files.load(tmp_path / "bin", m["unet_params"])
  with pytest.raises(ValueError, match="(?s)pickle-based.*allow_pickle"):
    lora_files.load(tmp_path / "bin" / "pytorch_lora_weights.bin", m["unet_params"])
  assert len(lora_files.load(tmp_path / "bin", m["unet_params"], allow_pickle=True)["unet"]) == len(adapters["unet"])

  # Not a LoRA; a LoRA variant this does not read; an SDXL LoRA.
  common.save_state_dict(unet_weights.unet_to_diffusers_state_dict(m["unet_params"]), tmp_path / "unet.safetensors")
  with pytest.raises(ValueError, match="not a LoRA file"):
    lora_files.load(tmp_path / "unet.safetensors", m["unet_params"])
  state = common.load_state_dict(file)
  for extra, match in (("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "not a plain LoRA"),
                       ("unet.conv_in.weight", "not LoRA weights"),
                       ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha", "SDXL")):
    common.save_state_dict({**state, extra: np.ones(4, np.float32)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=match):
      lora_files.load(tmp_path / "bad.safetensors", m["unet_params"], m["text_params"])


def test_embeddings_round_trip(m, tmp_path):
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(3, 32)).astype(np.float32)
  file = lora_files.save_embeddings(tmp_path, {"<cat-toy>": vectors})
  assert file.name == "learned_embeds.safetensors"
  np.testing.assert_array_equal(lora_files.load_embeddings(tmp_path)["<cat-toy>"], vectors)
  assert lora_files.load_embeddings(file, token="<toy>").keys() == {"<toy>"}
  # diffusers reads it: three new tokens <cat-toy>, <cat-toy>_1, <cat-toy>_2 with these rows.
  tokenizer_lib.train_tokenizer(["a small red circle above a blue square"] * 4, tmp_path / "tokenizer",
                                vocab_size=600, max_length=16)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
  pipe = _pipeline(m)
  pipe.load_textual_inversion(str(file), tokenizer=tokenizer, text_encoder=pipe.text_encoder)
  rows = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()
  np.testing.assert_array_equal(rows[tokenizer.convert_tokens_to_ids(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"])],
                                vectors)

  # A1111: a pickle holding string_to_param["*"], named after the file; only with allow_pickle.
  torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)}, "name": "old-name",
              "step": 3000, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, tmp_path / "my-style.pt")
  with pytest.raises(ValueError, match="pickle-based"):
    lora_files.load_embeddings(tmp_path / "my-style.pt")
  loaded = lora_files.load_embeddings(tmp_path / "my-style.pt", allow_pickle=True)
  assert loaded.keys() == {"my-style"}
  np.testing.assert_array_equal(loaded["my-style"], vectors)
  # The single-tensor safetensors A1111 reads (kohya's trainer): {"emb_params": [n, dim]}.
  common.save_state_dict({"emb_params": vectors[:1]}, tmp_path / "EasyNegative.safetensors")
  loaded = lora_files.load_embeddings(tmp_path / "EasyNegative.safetensors")
  assert loaded.keys() == {"EasyNegative"} and loaded["EasyNegative"].shape == (1, 32)
  with pytest.raises(ValueError, match=r"\[n_vectors, dim\]"):
    lora_files.save_embeddings(tmp_path / "bad.safetensors", {"<x>": np.zeros((2, 3, 4))})
