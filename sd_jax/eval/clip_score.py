"""CLIP score (Hessel et al. 2021; Radford et al. 2021): how well generated images match their prompts.

For each (image, prompt) pair, with a CLIP model's projected embeddings e_I = visual_projection(image tower) and
e_T = text_projection(text tower):

    CLIPScore(I, T) = 100 · max(cos(e_I, e_T), 0)        (in [0, 100]; higher = better aligned)

and the reported `clip_score` is its mean over the pairs. This is the definition torchmetrics documents and the
CLIP-score paper's CLIP-S with weight 100 instead of 2.5. (torchmetrics' code clamps the *mean* cosine instead of
each one; the two agree whenever no pair has a negative cosine, which is the case for any real CLIP on real
prompts. `ClipScore.cosine` keeps the raw values.) Scores are only comparable between runs that use the same
CLIP weights, preprocessing and prompts.

Any sd_jax `CLIPModel` works: imported OpenAI / OpenCLIP weights (sd_jax.weights.clip.clip_from_transformers) or
one trained here (sd_jax.weights.clip.load_exported_clip). Images are brought to the vision tower's input as
CLIP's image processor does: the short side resized to `image_size` (PIL's 8-bit bicubic, antialiased when shrinking),
a centre crop, then per-channel (x - mean) / std of [0, 1] pixels. `normalization` picks the mean/std the tower
was trained with: "openai" (OpenAI CLIP and OpenCLIP models) or "sd_jax" (mean = std = 0.5, i.e. the [-1, 1]
images of sd_jax's input pipeline, on which sd_jax's CLIP trainer trains).

    model, params = load_exported_clip("runs/shapes_clip/export")
    tokens = load_clip_tokenizer("runs/shapes_clip/export/tokenizer")(prompts)     # int32 [N, L]
    result = clip_score(model, params, images, tokens, normalization="sd_jax")
    result.score, result.per_pair, result.cosine                              # float, [N], [N]

Images: uint8 [N, H, W, 3], or float [N, H, W, 3] in [-1, 1] (the pipeline's and the samplers' range).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models import clip as clip_lib

# OpenAI CLIP's image normalization (CLIPImageProcessor's image_mean / image_std; OpenCLIP uses the same).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "openai": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "sd_jax": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [0, 1] -> [-1, 1], the range sd_jax's CLIP trainer sees
}
Normalization = Union[str, tuple[Sequence[float], Sequence[float]]]
DEFAULT_BATCH_SIZE = 64


# ----------------------------------------------------------------------------------------------------------------
# Images


def to_unit_range(images: Any, *, quantize: bool = True) -> np.ndarray:
  """uint8 [N, H, W, 3] or float in [-1, 1] -> float32 in [0, 1].

  Floats are clipped to [-1, 1]; with `quantize` they are also rounded to the 256 levels an 8-bit PNG holds (what
  reference FID / CLIP-score code reads generated images from). uint8 input is exact either way.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected RGB images [N, H, W, 3], got shape {images.shape}")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
  unit = np.clip((images.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
  if quantize:
    unit = np.round(unit * 255.0) / 255.0
  return unit.astype(np.float32)


def _normalization(normalization: Normalization) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(normalization, str):
    if normalization not in NORMALIZATIONS:
      raise ValueError(f"unknown CLIP image normalization {normalization!r}; use one of {sorted(NORMALIZATIONS)} or "
                       "a (mean, std) pair")
    normalization = NORMALIZATIONS[normalization]
  mean, std = (np.asarray(v, np.float32).reshape(3) for v in normalization)
  return mean, std


def _quantize_8bit(x: jax.Array) -> jax.Array:
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0) / 255.0


def resize_and_center_crop(images: jax.Array, image_size: int) -> jax.Array:
  """[N, H, W, C] in [0, 1] -> [N, S, S, C]: the short side resized to S, then the centre S×S crop (offsets
  (H' - S) // 2, as transformers' center_crop).

  The resize is PIL's BICUBIC on 8-bit images, which CLIPImageProcessor uses: a Keys cubic (a = -0.5) stretched
  by the scale factor when shrinking (antialiasing), width first, then height, the image rounded and clipped to
  8 bits after each pass (within one 8-bit level of PIL; the clipping matters where bicubic overshoots).
  """
  batch, height, width, channels = images.shape
  # transformers' get_resize_output_image_size(default_to_square=False): the long side is int(S * long / short).
  new_h, new_w = ((image_size, int(image_size * width / height)) if height <= width
                  else (int(image_size * height / width), image_size))
  if new_w != width:
    images = _quantize_8bit(jax.image.resize(images, (batch, height, new_w, channels), "bicubic", antialias=True))
  if new_h != height:
    images = _quantize_8bit(jax.image.resize(images, (batch, new_h, new_w, channels), "bicubic", antialias=True))
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  return images[:, top:top + image_size, left:left + image_size]


def preprocess_images(images_unit: jax.Array, image_size: int, normalization: Normalization = "openai"
                      ) -> jax.Array:
  """[N, H, W, 3] float in [0, 1] (see to_unit_range) -> the vision tower's pixel_values [N, S, S, 3]."""
  mean, std = _normalization(normalization)
  pixels = resize_and_center_crop(jnp.asarray(images_unit, jnp.float32), image_size)
  return (pixels - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


def run_batched(fn: Callable[[np.ndarray], Any], inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over `inputs` in chunks of exactly `batch_size` rows (the last one zero-padded, so a jitted fn compiles
  once), the outputs concatenated and cut back to len(inputs)."""
  inputs = np.asarray(inputs)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  outputs = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    if len(chunk) < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    outputs.append(np.asarray(jax.device_get(fn(chunk))))
  if not outputs:
    raise ValueError("no inputs")
  return np.concatenate(outputs)[:len(inputs)]


def _vision_config(model: nn.Module) -> clip_lib.CLIPVisionConfig:
  config = model.config
  return config.vision if isinstance(config, clip_lib.CLIPConfig) else config


def image_embedding_fn(model: nn.Module, normalization: Normalization = "openai"
                       ) -> Callable[[Any, jax.Array], jax.Array]:
  """jitted (params, images in [0, 1] [B, H, W, 3]) -> image features [B, P] (float32, not normalized).

  CLIPModel -> get_image_features (projected); CLIPVisionModelWithProjection -> image_embeds (projected);
  CLIPVisionTransformer -> pooler_output (no projection there). Cached per (model, normalization), so repeated
  calls reuse one compiled function.
  """
  if not isinstance(model, (clip_lib.CLIPModel, clip_lib.CLIPVisionModelWithProjection,
                            clip_lib.CLIPVisionTransformer)):
    raise TypeError(f"expected an sd_jax CLIPModel or CLIP vision tower, got {type(model).__name__}")
  mean, std = _normalization(normalization)
  return _image_embedding_fn(model, tuple(mean.tolist()), tuple(std.tolist()))


@functools.lru_cache(maxsize=8)
def _image_embedding_fn(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]
                        ) -> Callable[[Any, jax.Array], jax.Array]:
  image_size = _vision_config(model).image_size

  def embed(params, images_unit):
    pixels = preprocess_images(images_unit, image_size, (mean, std))
    if isinstance(model, clip_lib.CLIPModel):
      out = model.apply({"params": params}, pixels, method="get_image_features")
    elif isinstance(model, clip_lib.CLIPVisionModelWithProjection):
      out = model.apply({"params": params}, pixels).image_embeds
    else:
      out = model.apply({"params": params}, pixels).pooler_output
    return out.astype(jnp.float32)

  return jax.jit(embed)


@functools.lru_cache(maxsize=8)
def _text_embedding_fn(model: clip_lib.CLIPModel) -> Callable[[Any, jax.Array], jax.Array]:
  return jax.jit(lambda params, ids: model.apply({"params": params}, ids, method="get_text_features"
                                                 ).astype(jnp.float32))


def _tokens(model: clip_lib.CLIPModel, texts: Any, tokenizer: Callable[[Sequence[str]], np.ndarray] | None
            ) -> np.ndarray:
  if isinstance(texts, str) or (isinstance(texts, Sequence) and texts and isinstance(texts[0], str)):
    if tokenizer is None:
      raise ValueError("prompts given as strings need the model's tokenizer (tokenizer=load_clip_tokenizer(DIR)), "
                       "or pass token ids [N, L]")
    texts = tokenizer([texts] if isinstance(texts, str) else list(texts))
  ids = np.asarray(texts)
  length = model.config.text.max_position_embeddings
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"token ids must be an integer array [N, L], got {ids.dtype} {ids.shape}")
  if ids.shape[1] != length:
    raise ValueError(f"token rows have length {ids.shape[1]} but the CLIP text tower reads {length} "
                     "(max_position_embeddings): tokenize with the model's own tokenizer / max_length")
  return ids.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# The score


@dataclasses.dataclass(frozen=True)
class ClipScore:
  """CLIP score of N (image, prompt) pairs."""

  score: float  # mean of per_pair: the reported `clip_score`
  per_pair: np.ndarray  # [N] 100 * max(cos, 0)
  cosine: np.ndarray  # [N] raw cosine similarities, in [-1, 1]


def clip_score_from_embeddings(image_embeds: Any, text_embeds: Any) -> ClipScore:
  """ClipScore from paired (not necessarily normalized) embeddings [N, P] (row i of each is pair i)."""
  image = np.asarray(image_embeds, np.float64)
  text = np.asarray(text_embeds, np.float64)
  if image.shape != text.shape or image.ndim != 2:
    raise ValueError(f"paired embeddings must both be [N, P], got {image.shape} and {text.shape}")
  if not len(image):
    raise ValueError("no (image, prompt) pairs to score")
  cosine = np.sum(image * text, axis=-1) / (np.linalg.norm(image, axis=-1) * np.linalg.norm(text, axis=-1))
  per_pair = 100.0 * np.maximum(cosine, 0.0)
  return ClipScore(score=float(per_pair.mean()), per_pair=per_pair, cosine=cosine)


def clip_score(model: clip_lib.CLIPModel, params: Any, images: Any, texts: Any, *,
               tokenizer: Callable[[Sequence[str]], np.ndarray] | None = None, normalization: Normalization = "openai",
               batch_size: int = DEFAULT_BATCH_SIZE, quantize: bool = True) -> ClipScore:
  """CLIP score of images [N, H, W, 3] (uint8, or float in [-1, 1]) against their prompts (token ids int [N, L],
  or N strings with `tokenizer`). `normalization`: "openai" for imported OpenAI / OpenCLIP models, "sd_jax" for a
  CLIP trained by sd_jax's clip trainer (see the module docstring). Runs jitted, `batch_size` rows at a time."""
  if not isinstance(model, clip_lib.CLIPModel):
    raise TypeError(f"clip_score needs an sd_jax CLIPModel (both towers), got {type(model).__name__}")
  ids = _tokens(model, texts, tokenizer)
  images_unit = to_unit_range(images, quantize=quantize)
  if len(images_unit) != len(ids):
    raise ValueError(f"{len(images_unit)} images but {len(ids)} prompts: CLIP score scores pairs")
  embed_images = image_embedding_fn(model, normalization)
  embed_texts = _text_embedding_fn(model)
  image_embeds = run_batched(functools.partial(embed_images, params), images_unit, batch_size)
  text_embeds = run_batched(functools.partial(embed_texts, params), ids, batch_size)
  return clip_score_from_embeddings(image_embeds, text_embeds)
