"""sd_jax.eval.clip_score against transformers' PyTorch CLIPModel (random weights imported through
sd_jax.weights) and CLIPImageProcessor's preprocessing."""

import numpy as np
import pytest
import torch
import transformers

from sd_jax.eval import clip_score as clip_score_lib
from sd_jax.models import clip as clip_lib
from sd_jax.weights import clip as clip_weights

# A tiny CLIP; the text vocabulary's largest id (98) is the eos token, as in CLIP's real vocabulary.
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=24, bos_token_id=97, pad_token_id=1, eos_token_id=98)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=10, projection_dim=24)
NUM_PAIRS = 7


@pytest.fixture(scope="module")
def clip_pair():
  """(transformers CLIPModel, sd_jax CLIPModel, params) with the same random weights."""
  config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
  torch.manual_seed(0)
  reference = transformers.CLIPModel(config)
  with torch.no_grad():
    for p in reference.parameters():  # off the init (biases 0, LayerNorms 1), so every mapping is exercised
      p.add_(0.05 * torch.randn_like(p))
    # Unit-variance projections spread the embedding directions; with this seed the cosines of the test's pairs
    # have both signs (checked in the test), so the clamp at 0 is exercised.
    torch.manual_seed(4)
    for projection in (reference.text_projection, reference.visual_projection):
      projection.weight.normal_()
  reference.eval()
  state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
  sd_config = clip_lib.clip_config_from_transformers(config.to_dict())
  params = clip_weights.clip_from_transformers(state, sd_config)
  return reference, clip_lib.create_clip_model(sd_config), params


def token_ids(seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 97, (NUM_PAIRS, TEXT["max_position_embeddings"]))
  ids[:, 0] = TEXT["bos_token_id"]
  for row, length in enumerate(rng.integers(3, 17, NUM_PAIRS)):
    ids[row, length - 1:] = TEXT["eos_token_id"]
  return ids


def processor(size: int) -> transformers.CLIPImageProcessor:
  """OpenAI CLIP's preprocessing (resize short side, centre crop, OpenAI mean/std) at `size`."""
  return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def reference_score(reference, pixel_values, ids):
  """100 · max(cos, 0) per pair, averaged: torchmetrics' per-pair formula on transformers' features."""
  with torch.no_grad():
    image = reference.get_image_features(pixel_values=torch.as_tensor(pixel_values))
    text = reference.get_text_features(input_ids=torch.from_numpy(ids))
  image = getattr(image, "pooler_output", image)  # transformers v5 may wrap the features in an output object
  text = getattr(text, "pooler_output", text)
  cosine = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1).numpy()
  return 100 * np.maximum(cosine, 0).mean(), cosine


def test_clip_score_matches_transformers(clip_pair):
  reference, model, params = clip_pair
  images = np.random.default_rng(1).integers(0, 256, (NUM_PAIRS, 30, 30, 3), dtype=np.uint8)
  ids = token_ids()
  pixel_values = processor(30)(images=list(images), return_tensors="np")["pixel_values"]  # [N, 3, 30, 30]
  expected, cosine = reference_score(reference, pixel_values, ids)
  result = clip_score_lib.clip_score(model, params, images, ids, batch_size=3)  # 3 + 3 + 1 (padded)
  print(f"CLIP score {result.score:.4f} vs transformers {expected:.4f}; cosines {np.round(cosine, 3)}")
  assert (cosine < 0).any() and (cosine > 0).any()  # random weights: the clamp at 0 is exercised
  np.testing.assert_allclose(result.cosine, cosine, atol=1e-5)
  assert abs(result.score - expected) <= 1e-4 * max(1.0, abs(expected))
  np.testing.assert_allclose(result.per_pair, 100 * np.maximum(cosine, 0), atol=1e-3)


def test_preprocessing_without_resize_is_exact(clip_pair):
  images = np.random.default_rng(2).integers(0, 256, (3, 30, 30, 3), dtype=np.uint8)
  expected = processor(30)(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = clip_score_lib.preprocess_images(clip_score_lib.to_unit_range(images), 30)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (20, 20), (31, 30)])
def test_resize_and_crop_match_clip_image_processor(shape):
  # CLIPImageProcessor resizes with PIL on 8-bit images: two passes, each rounded; fixed-point weights can put a
  # pixel one 8-bit level off, i.e. 1 / 255 / std after normalization.
  images = np.random.default_rng(3).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
  expected = processor(30)(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = np.asarray(clip_score_lib.preprocess_images(clip_score_lib.to_unit_range(images), 30))
  assert ours.shape == expected.shape == (2, 30, 30, 3)
  one_level = 1 / 255 / min(clip_score_lib.OPENAI_CLIP_STD)
  error = np.abs(ours - expected)
  print(f"{shape}: max |diff| {error.max() / one_level:.2f} levels, {np.mean(error > 1e-4):.4f} of values differ")
  assert error.max() <= one_level + 1e-5
  assert np.mean(error > 1e-4) < 0.03  # measured: at most 1.3% (20 -> 30 upsampling)


def test_sd_jax_normalization_is_the_pipeline_range():
  images = np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  unit = clip_score_lib.to_unit_range(images, quantize=False)
  np.testing.assert_allclose(np.asarray(clip_score_lib.preprocess_images(unit, 32, "sd_jax")), images, atol=1e-6)
  quantized = clip_score_lib.to_unit_range(images)
  np.testing.assert_allclose(quantized * 255, np.round(quantized * 255), atol=1e-4)
  np.testing.assert_array_equal(clip_score_lib.to_unit_range(np.full((1, 2, 2, 3), 255, np.uint8)), 1.0)


def test_score_from_embeddings_by_hand():
  image = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  text = np.array([[1.0, 1.0], [-3.0, 0.0], [0.0, 5.0]])  # cos = 1/√2, -1, 1
  result = clip_score_lib.clip_score_from_embeddings(image, text)
  np.testing.assert_allclose(result.cosine, [2**-0.5, -1.0, 1.0], atol=1e-12)
  np.testing.assert_allclose(result.per_pair, [100 * 2**-0.5, 0.0, 100.0], atol=1e-10)
  assert result.score == pytest.approx((100 * 2**-0.5 + 100) / 3, rel=1e-12)


def test_input_errors(clip_pair):
  _, model, params = clip_pair
  images = np.zeros((2, 30, 30, 3), np.uint8)
  with pytest.raises(ValueError, match="tokenizer"):
    clip_score_lib.clip_score(model, params, images, ["a red circle", "a blue square"])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    clip_score_lib.clip_score(model, params, images, np.zeros((2, 77), np.int32))
  with pytest.raises(ValueError, match="3 images but 2 prompts"):
    clip_score_lib.clip_score(model, params, np.zeros((3, 30, 30, 3), np.uint8), token_ids()[:2])
  with pytest.raises(ValueError, match="normalization"):
    clip_score_lib.clip_score(model, params, images, token_ids()[:2], normalization="imagenet")


def test_string_prompts_go_through_the_tokenizer(clip_pair):
  _, model, params = clip_pair
  ids = token_ids()[:2]
  table = {"a red circle": ids[0], "a blue square": ids[1]}
  tokenizer = lambda texts: np.stack([table[t] for t in texts])  # noqa: E731
  images = np.random.default_rng(5).integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
  by_text = clip_score_lib.clip_score(model, params, images, ["a red circle", "a blue square"], tokenizer=tokenizer)
  by_ids = clip_score_lib.clip_score(model, params, images, ids)
  np.testing.assert_array_equal(by_text.cosine, by_ids.cosine)
