"""sd_jax CLIP towers against transformers' PyTorch CLIP (random weights, tiny configs, float32), the Stable
Diffusion single-file key maps (checked against diffusers' converters), and CLIP tokenizer parity."""

import dataclasses
import json
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex
import torch
import transformers

from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.models import clip as clip_lib
from sd_jax.weights import clip as clip_weights
from sd_jax.weights import common

TOL = 1e-4  # max abs difference allowed against PyTorch in float32
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Tiny towers; the text vocabulary's largest id (98) is the eos token, as in CLIP's real vocabulary.
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=24, bos_token_id=97, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=10, projection_dim=24)
LENGTHS = (5, 11, 16)  # tokens per row including bos and eos; the rest is padding


def perturbed(model, seed=0):
  """A transformers model in eval mode with every tensor moved off its init (biases and LayerNorms included, which
  transformers initializes to 0 / 1 and so would not test their mapping)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_state(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def token_ids(eos_id: int, seed: int = 0) -> np.ndarray:
  """[3, 16] rows: bos, random tokens (never eos, some above eos_id), eos, then eos as padding (SD 1 style)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 97, (len(LENGTHS), TEXT["max_position_embeddings"]))
  ids[ids == eos_id] = 3
  ids[:, 0] = TEXT["bos_token_id"]
  for row, n in enumerate(LENGTHS):
    ids[row, n - 1:] = eos_id
  return ids


def padding_mask() -> np.ndarray:
  return (np.arange(TEXT["max_position_embeddings"])[None] < np.asarray(LENGTHS)[:, None]).astype(np.int64)


def jit_apply(model, method=None, **static):
  def apply(params, *args):
    return model.apply({"params": params}, *args, method=method, **static)
  return jax.jit(apply, compiler_options=FAST_COMPILE)


def max_diff(ours, reference) -> float:
  return float(np.abs(np.asarray(ours, np.float64) - reference.detach().numpy().astype(np.float64)).max())


def assert_same_params(a, b):
  fa, fb = common.flatten(a), common.flatten(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Text tower


@pytest.fixture(scope="module", params=[("quick_gelu", 2), ("gelu", 60)], ids=["quick_gelu-legacy_eos", "gelu-eos60"])
def text_case(request, tmp_path_factory):
  """A transformers CLIPTextModel saved with save_pretrained and loaded back through sd_jax.

  eos_token_id 2 is the legacy convention (pool at argmax of the ids; the eos token is then id 98, the largest);
  60 pools at the first 60, which is not where argmax points (rows hold larger ids), so the two differ.
  """
  act, eos_config = request.param
  config = transformers.CLIPTextConfig(**TEXT, hidden_act=act, eos_token_id=eos_config)
  reference = perturbed(transformers.CLIPTextModel(config))
  directory = tmp_path_factory.mktemp(f"clip_text_{act}")
  reference.save_pretrained(directory, safe_serialization=True)
  model, params = clip_weights.load_clip_text_from_transformers_dir(directory)
  eos_token = 98 if eos_config == 2 else eos_config
  return config, reference, model, params, token_ids(eos_token)


def test_text_config_read_from_config_json(text_case):
  config, _, model, _, _ = text_case
  assert isinstance(model, clip_lib.CLIPTextTransformer)
  assert model.config.hidden_act == config.hidden_act and model.config.eos_token_id == config.eos_token_id
  assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 37


def test_text_parity(text_case):
  config, reference, model, params, ids = text_case
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids), output_hidden_states=True)
  out = jit_apply(model, output_hidden_states=True)(params, jnp.asarray(ids, jnp.int32))
  diffs = {
      "last_hidden_state": max_diff(out.last_hidden_state, expected.last_hidden_state),
      "penultimate": max_diff(out.hidden_states[-2], expected.hidden_states[-2]),
      "pooler_output": max_diff(out.pooler_output, expected.pooler_output),
  }
  assert len(out.hidden_states) == len(expected.hidden_states) == config.num_hidden_layers + 1
  diffs["all_hidden_states"] = max(max_diff(a, b) for a, b in zip(out.hidden_states, expected.hidden_states))
  print(f"CLIPTextModel {config.hidden_act} eos={config.eos_token_id}: {diffs}")
  assert max(diffs.values()) <= TOL, diffs
  if config.eos_token_id != 2:  # the test can tell the conventions apart
    assert (ids.argmax(-1) != (ids == config.eos_token_id).argmax(-1)).any()


def test_text_parity_with_padding_mask(text_case):
  _, reference, model, params, ids = text_case
  mask = padding_mask()
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  out = jit_apply(model)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert max_diff(out.last_hidden_state, expected.last_hidden_state) <= TOL
  assert max_diff(out.pooler_output, expected.pooler_output) <= TOL


def test_text_clip_skip_matches_diffusers_encode_prompt(text_case):
  """diffusers: prompt_embeds = final_layer_norm(hidden_states[-(clip_skip + 1)])."""
  _, reference, model, params, ids = text_case
  with torch.no_grad():
    hidden = reference(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    expected = {k: reference.final_layer_norm(hidden[-(k + 1)]) for k in (1, 2)}
  for clip_skip, value in expected.items():
    out = jit_apply(model, method="encode", clip_skip=clip_skip)(params, jnp.asarray(ids, jnp.int32))
    assert max_diff(out, value) <= TOL


def test_text_export_loads_strictly_into_transformers(text_case):
  config, reference, _, params, ids = text_case
  fresh = transformers.CLIPTextModel(config).eval()
  fresh.load_state_dict(torch_state(clip_weights.clip_text_to_transformers(params, prefix="")), strict=True)
  with torch.no_grad():
    ids_t = torch.from_numpy(ids)
    torch.testing.assert_close(fresh(ids_t).pooler_output, reference(ids_t).pooler_output, rtol=0, atol=0)
  # Default export = the hub layout (`text_model.` keys); import -> export -> import is exact.
  exported = clip_weights.clip_text_to_transformers(params)
  assert all(k.startswith("text_model.") for k in exported)
  for key, value in numpy_state(reference).items():
    np.testing.assert_array_equal(exported["text_model." + key], value, err_msg=key)
  assert_same_params(clip_weights.clip_text_from_transformers(exported, config.to_dict()), params)


def test_text_hub_layout_export_reads_with_from_pretrained(text_case, tmp_path):
  config, reference, _, params, _ = text_case
  common.save_state_dict(clip_weights.clip_text_to_transformers(params), tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  loaded = transformers.CLIPTextModel.from_pretrained(tmp_path)
  for key, value in reference.state_dict().items():
    torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_text_with_projection_parity():
  config = transformers.CLIPTextConfig(**TEXT, eos_token_id=2)
  reference = perturbed(transformers.CLIPTextModelWithProjection(config), seed=1)
  state = numpy_state(reference)
  params = clip_weights.clip_text_with_projection_from_transformers(state, config.to_dict())
  model = clip_lib.create_clip_text_model(clip_lib.clip_config_from_transformers(config.to_dict()),
                                          with_projection=True)
  ids = token_ids(98)
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids))
  out = jit_apply(model)(params, jnp.asarray(ids, jnp.int32))
  diffs = {"text_embeds": max_diff(out.text_embeds, expected.text_embeds),
           "last_hidden_state": max_diff(out.last_hidden_state, expected.last_hidden_state)}
  print(f"CLIPTextModelWithProjection: {diffs}")
  assert max(diffs.values()) <= TOL, diffs
  exported = clip_weights.clip_text_with_projection_to_transformers(params)
  fresh = transformers.CLIPTextModelWithProjection(config)
  fresh.load_state_dict(torch_state(exported), strict=True)
  assert_same_params(clip_weights.clip_text_with_projection_from_transformers(exported, model), params)
  # The text tower alone reads from the same dict (its `text_model.*` part).
  assert_same_params(clip_weights.clip_text_from_transformers(state, config.to_dict()), params["text_model"])


# ---------------------------------------------------------------------------------------------------------------
# Image tower and two-tower model


def pixels(seed=0, batch=2) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, 3, 30, 30)).astype(np.float32)  # NCHW (torch)


def test_vision_with_projection_parity():
  config = transformers.CLIPVisionConfig(**VISION)
  reference = perturbed(transformers.CLIPVisionModelWithProjection(config), seed=2)
  state = numpy_state(reference)
  params = clip_weights.clip_vision_from_transformers(state, clip_lib.clip_config_from_transformers(config.to_dict()))
  model = clip_lib.create_clip_vision_model(clip_lib.clip_config_from_transformers(config.to_dict()))
  x = pixels()
  with torch.no_grad():
    expected = reference(torch.from_numpy(x), output_hidden_states=True)
  out = jit_apply(model, output_hidden_states=True)(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  diffs = {"image_embeds": max_diff(out.image_embeds, expected.image_embeds),
           "last_hidden_state": max_diff(out.last_hidden_state, expected.last_hidden_state),
           "all_hidden_states": max(max_diff(a, b) for a, b in zip(out.hidden_states, expected.hidden_states))}
  print(f"CLIPVisionModelWithProjection: {diffs}")
  assert len(out.hidden_states) == len(expected.hidden_states) == 3
  assert max(diffs.values()) <= TOL, diffs
  exported = clip_weights.clip_vision_to_transformers(params)
  fresh = transformers.CLIPVisionModelWithProjection(config).eval()
  fresh.load_state_dict(torch_state(exported), strict=True)
  with torch.no_grad():
    torch.testing.assert_close(fresh(torch.from_numpy(x)).image_embeds, expected.image_embeds, rtol=0, atol=0)
  assert_same_params(clip_weights.clip_vision_from_transformers(exported, model), params)


def test_clip_model_parity():
  config = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=2), vision_config=VISION, projection_dim=24)
  reference = perturbed(transformers.CLIPModel(config), seed=3)
  state = numpy_state(reference)
  sd_config = clip_lib.clip_config_from_transformers(config.to_dict())
  params = clip_weights.clip_from_transformers(state, sd_config)
  model = clip_lib.create_clip_model(sd_config)
  ids, x = token_ids(98), pixels(1)
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(x))
  out = jit_apply(model)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(x.transpose(0, 2, 3, 1)))
  diffs = {name: max_diff(getattr(out, name), getattr(expected, name))
           for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")}
  print(f"CLIPModel (logit scale {float(np.exp(state['logit_scale'])):.2f}): {diffs}")
  assert max(diffs.values()) <= TOL, diffs
  exported = clip_weights.clip_to_transformers(params)
  fresh = transformers.CLIPModel(config)
  fresh.load_state_dict(torch_state(exported), strict=True)
  assert_same_params(clip_weights.clip_from_transformers(exported, sd_config), params)
  # Each tower reads its part of a CLIPModel dict.
  assert_same_params(clip_weights.clip_text_from_transformers(state, sd_config), params["text_model"])


def test_mismatch_names_every_bad_key():
  config = transformers.CLIPTextConfig(**TEXT, eos_token_id=2)
  state = numpy_state(transformers.CLIPTextModel(config))
  del state["encoder.layers.1.mlp.fc1.bias"]
  state["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 8), np.float32)
  state["encoder.layers.3.layer_norm1.weight"] = np.ones(32, np.float32)
  with pytest.raises(common.WeightsMismatchError) as info:
    clip_weights.clip_text_from_transformers(state, config.to_dict())
  message = str(info.value)
  for fragment in ("encoder/layers_1/mlp/fc1/bias", "encoder/layers_0/self_attn/q_proj/kernel: model (32, 32)",
                   "encoder/layers_3/layer_norm1/scale"):
    assert fragment in message, message


# ---------------------------------------------------------------------------------------------------------------
# Stable Diffusion single files


def test_sd1_single_file_text_encoder():
  from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

  config = transformers.CLIPTextConfig(**TEXT, eos_token_id=2)
  state = {"text_model." + k: v for k, v in numpy_state(perturbed(transformers.CLIPTextModel(config))).items()}
  single_file = {"cond_stage_model.transformer." + k: v for k, v in state.items()}
  single_file["model.diffusion_model.conv_in.weight"] = np.zeros((4, 4, 3, 3), np.float32)  # the rest of the file
  # diffusers' own conversion strips the same prefix and leaves the CLIPTextModel keys.
  assert set(convert_ldm_clip_checkpoint(single_file)) == set(state)
  assert_same_params(clip_weights.clip_text_from_ldm(single_file, config.to_dict()),
                     clip_weights.clip_text_from_transformers(state, config.to_dict()))


def to_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
  """The inverse of diffusers' convert_open_clip_checkpoint: transformers CLIPTextModel keys (v5, unprefixed) ->
  the OpenCLIP text layout of an SD 2.x single file."""
  out = {
      prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
      prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
      prefix + "ln_final.weight": state["final_layer_norm.weight"],
      prefix + "ln_final.bias": state["final_layer_norm.bias"],
  }
  layer = 0
  while f"encoder.layers.{layer}.layer_norm1.weight" in state:
    src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
    for leaf in ("weight", "bias"):
      out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
          [state[f"{src}self_attn.{p}_proj.{leaf}"] for p in ("q", "k", "v")], dim=0)
      for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                       ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        out[f"{dst}{new}.{leaf}"] = state[f"{src}{old}.{leaf}"]
    layer += 1
  return out


def test_sd2_open_clip_single_file():
  """An SD 2.x-shaped text encoder (23 layers used of 24 OpenCLIP blocks; narrow to stay fast): the OpenCLIP dict
  built by `to_open_clip` converts back to the original with diffusers' converter (so the OpenCLIP names are
  right), and sd_jax's importer reads it to the same params as the transformers dict."""
  from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

  config = transformers.CLIPTextConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=23,
                                       num_attention_heads=2, max_position_embeddings=5, hidden_act="gelu",
                                       projection_dim=6, eos_token_id=2, bos_token_id=18, pad_token_id=1)
  reference = perturbed(transformers.CLIPTextModel(config), seed=4)
  state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
  prefix = "cond_stage_model.model."
  unused_block = perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**dict(
      config.to_dict(), num_hidden_layers=24))), seed=6).state_dict()
  single_file = to_open_clip({k: v.detach().clone() for k, v in unused_block.items()}, prefix)
  single_file.update(to_open_clip(state, prefix))  # blocks 0..22 from the reference, block 23 unused by SD 2
  projection = torch.randn(8, 6)  # OpenCLIP text_projection, used as x @ P
  single_file[prefix + "text_projection"] = projection
  single_file[prefix + "logit_scale"] = torch.tensor(4.6)
  single_file["model.diffusion_model.out.2.bias"] = torch.zeros(4)
  assert prefix + "transformer.resblocks.23.ln_1.weight" in single_file

  converted = convert_open_clip_checkpoint(reference, single_file, prefix=prefix)
  expected = {"text_model." + k: v for k, v in state.items()}
  assert sorted(converted) == sorted(expected)
  for key, value in expected.items():
    torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)

  numpy_file = {k: v.numpy() for k, v in single_file.items()}
  sd_config = clip_lib.clip_config_from_transformers(config.to_dict())
  params = clip_weights.clip_text_from_open_clip(numpy_file, sd_config)
  assert_same_params(params, clip_weights.clip_text_from_transformers(numpy_state(reference), sd_config))
  with_projection = clip_weights.clip_text_from_open_clip(numpy_file, sd_config, with_projection=True)
  assert_same_params(with_projection["text_model"], params)
  np.testing.assert_array_equal(with_projection["text_projection"]["kernel"], projection.numpy())

  # A missing block, or a checkpoint deeper than one extra block, is reported by name.
  short = {k: v for k, v in numpy_file.items() if ".resblocks.4." not in k}
  with pytest.raises(common.WeightsMismatchError, match="encoder/layers_4/"):
    clip_weights.clip_text_from_open_clip(short, sd_config)
  shallow = dataclasses.replace(sd_config.text, num_hidden_layers=21)
  with pytest.raises(common.WeightsMismatchError, match="encoder/layers_22/"):
    clip_weights.clip_text_from_open_clip(numpy_file, shallow)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer parity


class ReferenceClipTokenizer:
  """A line-by-line port of the original CLIP tokenizer (openai/CLIP `simple_tokenizer.py`, which transformers v4's
  slow CLIPTokenizer copied), reading vocab.json / merges.txt.

  Its text cleaning is ftfy.fix_text + whitespace_clean + lower; ftfy is not installed here (and transformers v5
  has no slow CLIP tokenizer left to fall back on it), so this port applies NFC (part of ftfy.fix_text) and
  keeps the rest: curly quotes, ligatures and full-width forms, which ftfy would rewrite, are left out of the
  comparison below.
  """

  def __init__(self, directory):
    with open(f"{directory}/vocab.json", encoding="utf-8") as f:
      self.encoder = json.load(f)
    with open(f"{directory}/merges.txt", encoding="utf-8") as f:
      merges = f.read().strip().split("\n")[1:]
    self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    self.byte_encoder = tokenizer_lib.bytes_to_unicode()
    self.cache = {"<|startoftext|>": ("<|startoftext|>",), "<|endoftext|>": ("<|endoftext|>",)}
    self.pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE)

  def bpe(self, token: str) -> tuple[str, ...]:
    if token in self.cache:
      return self.cache[token]
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    return word

  def __call__(self, texts, max_length=77) -> np.ndarray:
    bos, eos = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
    rows = []
    for text in texts:
      text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
      ids = []
      for token in self.pattern.findall(text):
        token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
        ids += [self.encoder[piece] for piece in self.bpe(token)]
      row = [bos] + ids[:max_length - 2] + [eos]
      rows.append(row + [eos] * (max_length - len(row)))
    return np.asarray(rows)


TRAIN_CAPTIONS = [
    "a photo of a cat", "a painting of a dog running on the beach", "an astronaut riding a horse, 4k, detailed",
    "café crème brûlée on a table", "naïve résumé", "a 🐱 and a 🚀", "it's the dog's toy", "price: $1,234.56",
    "日本語のテキスト", "Ünïcödé ÀÉÎÕÜ straße", "co-operate, re-enter!", "O'Neil's red (and blue) car",
] * 4

TRICKY_CAPTIONS = [
    "A Photo Of A CAT!!!", "hello,world...what?!", "  leading and trailing   spaces  ", "tabs\tand\nnew\r\nlines",
    "café crème brûlée", "e\u0301cole (a decomposed accent)", "Ünïcödé ÀÉÎÕÜ", "naïve RÉSUMÉ", "İstanbul", "straße",
    "emoji 🐱🚀👩‍🚀 party 🎉", "日本語のテキスト", "привет мир", "price: $1,234.56 (approx.) 3.14159 42nd 2024",
    "don't won't I'M YOU'RE they'll we'd O'Neil's", "&amp; <html> #hashtag @user_name snake_case", "", "   ",
    "nbsp\u00a0here ideographic\u3000space", "zero\u200bwidth joiner", "<|endoftext|> in the text",
    "<|startoftext|>hi", " ".join(["a long caption with many words"] * 20), "x" * 300,
]
# ftfy rewrites these in the original tokenizer (curly quotes, ligatures, full-width letters); the fast tokenizers
# keep the characters. Compared with transformers only.
FTFY_DEPENDENT = ["it’s “quoted” ‘text’", "ﬁne ligature", "ＦＵＬＬ ｗｉｄｔｈ"]
# Upper-case spellings of the special tokens: lowercased *after* special-token matching by the fast tokenizers
# (BPE pieces), but turned into the special token by the original one (lowercase, then its bpe cache).
SPECIAL_UPPERCASE = ["<|ENDOFTEXT|>", "<|StartOfText|> upper"]


@pytest.fixture(scope="module")
def trained_tokenizer_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip_tokenizer"))
  tokenizer_lib.train_tokenizer(TRAIN_CAPTIONS, directory, vocab_size=700, min_frequency=1)
  return directory


@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_tokenizer_matches_transformers(trained_tokenizer_dir, cls_name):
  ours = tokenizer_lib.load_clip_tokenizer(trained_tokenizer_dir)
  theirs = getattr(transformers, cls_name).from_pretrained(trained_tokenizer_dir)
  texts = TRICKY_CAPTIONS + FTFY_DEPENDENT + SPECIAL_UPPERCASE
  expected = np.asarray(theirs(texts, padding="max_length", truncation=True, max_length=77)["input_ids"])
  got = ours(texts)
  assert got.shape == expected.shape == (len(texts), 77)
  for text, a, b in zip(texts, got, expected):
    np.testing.assert_array_equal(a, b, err_msg=repr(text))
  # Over-long captions keep bos first and eos last.
  assert got[-1][0] == ours.bos_id and got[-1][-1] == ours.eos_id


def test_tokenizer_matches_original_clip_bpe(trained_tokenizer_dir):
  ours = tokenizer_lib.load_clip_tokenizer(trained_tokenizer_dir)
  reference = ReferenceClipTokenizer(trained_tokenizer_dir)
  got, expected = ours(TRICKY_CAPTIONS), reference(TRICKY_CAPTIONS)
  for text, a, b in zip(TRICKY_CAPTIONS, got, expected):
    np.testing.assert_array_equal(a, b, err_msg=repr(text))
  # The one known difference, shared with transformers' (fast) CLIPTokenizer: see SPECIAL_UPPERCASE.
  assert not np.array_equal(ours(SPECIAL_UPPERCASE[:1]), reference(SPECIAL_UPPERCASE[:1]))
