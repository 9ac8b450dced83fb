"""Shapes evaluator: does a generated image show the coloured shapes its prompt names?

A small Flax classifier reads an image of the `shapes` dataset (sd_jax/data/shapes.py) and says, for each of the
7×5 colour×kind pairs, whether a shape of that colour and kind is in it (multi-label sigmoid). Predicting pairs,
not colours and kinds separately, is what tells "a red circle and a blue square" from "a blue circle and a red
square" (attribute binding). It learns from the renderer's ground truth only — scenes drawn on the fly with
`shapes.render(shapes.sample_spec(...))` over ALL pairs, the compositional held-out ones included (it is the
measuring instrument, not the model under test) — plus black images and shapeless colour blobs labelled
"nothing", with noise, blur and colour-jitter augmentation, since generated images are imperfect. No CLIP, and
nothing from any model under test. See `ShapesClassifier` for the architecture.

  report = train_evaluator("runs/shapes_eval")      # trains (~2 min on 2 CPU cores), saves weights + report
  evaluator = load_evaluator("runs/shapes_eval")
  evaluator.predict(images)                  # [{("red", "circle"): 0.99, ...}, ...]: pairs present + probability
  result = evaluator.score(images, prompts)  # prompts: captions, SceneSpecs or lists of (colour, kind)
  result.matches, result.accuracy            # bool [N]: every shape the prompt names is there; their mean

  python -m sd_jax.eval.shapes_eval --out DIR [--resolution 32] [--steps N] [--batch_size B] [--seed S] \
      [--eval_examples 1000] [--overwrite] [--novel_kinds heart]

Novel kinds (`shapes.NOVEL_KINDS`: shapes the renderer draws that the dataset never uses, for fine-tuning a model on
a concept it has never seen): `ConceptClassifier` (`--novel_kinds heart`) is the same classifier over the dataset's
kinds plus those, trained the same way on renderer ground truth; its report adds the split "novel_heart" (rendered
scenes with a heart). `score(images, prompts, aliases={"zq": "heart"})` reads a fine-tune's rare token as the kind,
and `check_relations` checks a two-shape prompt's relation by where its two colours are.

Images: uint8 [N, H, W, 3], or float [N, H, W, 3] in [-1, 1] (the pipeline's and the samplers' range), square,
any side. A side that is a multiple of the evaluator's resolution is box-downsampled (the renderer anti-aliases
with a box filter, so a 64×64 render downsamples to what a 32×32 render is, up to rounding); other sides are
resized with an anti-aliased linear filter. Prompts are parsed by `parse_prompt` (every `shapes.caption` wording);
a prompt naming no checkable shape is an error, not a silent pass. `score(..., exact=True)` also rejects extra
shapes. Limits: only the 7 palette colours and 5 kinds exist for it; it reads at most `top_colors` (3) colours an
image; relations ("above") and sizes are not checked.

`DIR/report.json` gives its own accuracy on real images of the dataset's `test` and `compositional` splits
(`regenerate_split`: the same examples, byte for byte, as the r32 / r64 builds), at 32 and 64 pixels:
  prompt_accuracy             every pair named in the image's own caption is detected (what `score` checks);
  exact_set_accuracy          the detected set of pairs is exactly the true set;
  same_color_prompt_accuracy  prompt_accuracy on two-shape images whose shapes share a colour (hardest case);
  noisy_prompt_accuracy       with gaussian noise σ = 0.1 (in [-1, 1] units) and a slight blur;
  heavy_noise_prompt_accuracy with σ = 0.3 and twice the blur;
  mismatch_rejection          another image's caption (one naming a pair not in the image) is rejected;
  attribute_swap_rejection    one shape's colour or kind changed in the caption: rejected;
  binding_swap_rejection      two-shape images, the colours swapped between the shapes: rejected;
  garbage_rejection           smooth colour-noise images (a failed generation) against real captions: rejected.
Measured with the defaults (1500 steps × 32, seed 0; 1000 images a split; deterministic on one machine):
prompt accuracy 0.999 (test) and 1.000 (compositional) at 32 and at 64 pixels, same-colour 0.985, noisy ≥ 0.998,
heavy noise 0.978 / 0.984 at 32 (1.0 at 64: downsampling averages the noise away), every rejection rate 1.000.
Training took 111-123 s (compilation included) and the whole command ~3 min wall / 80 s CPU, on 2 CPU cores
shared with other jobs (load ≈ 9); an idle machine should take well under that.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from sd_jax.data import shapes
from sd_jax.models import layers
from sd_jax.weights import store

PAIRS = tuple((c, k) for c in shapes.COLORS for k in shapes.KINDS)  # output order: colour-major
PAIR_INDEX = {pair: i for i, pair in enumerate(PAIRS)}
COMPONENT = "shapes_evaluator"  # weights: OUT/shapes_evaluator/{config.json,params/}
REPORT_FILE = "report.json"

Pair = tuple[str, str]
Prompt = Union[str, shapes.SceneSpec, Sequence[Pair]]


# ----------------------------------------------------------------------------------------------------------------
# Prompts

_COLOR_RE = "|".join(shapes.COLORS)


@functools.lru_cache(maxsize=None)
def _prompt_patterns(words: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
  """(pair pattern, lone colour-or-kind-word pattern) for kind names `words`."""
  kind_re = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first: no prefix wins
  # A colour then a kind ("red circle"), tolerating a size word between them ("red small circle") and plurals
  # ("circles", "crosses"). Captions put sizes first ("a small red circle"); those words are simply skipped.
  pair_re = re.compile(rf"\b({_COLOR_RE})\s+(?:(?:{'|'.join(shapes.SIZES)}|big)\s+)?({kind_re})(?:s|es)?\b")
  return pair_re, re.compile(rf"\b({_COLOR_RE}|{kind_re})(?:s|es)?\b")


def _pairs(kinds: Sequence[str]) -> tuple[Pair, ...]:
  """Every (colour, kind) pair of `kinds`, colour-major (the classifier's output order)."""
  return tuple((c, k) for c in shapes.COLORS for k in kinds)


def _check_aliases(aliases, kinds: Sequence[str]) -> dict[str, str]:
  aliases = {str(w).lower(): k for w, k in (aliases or {}).items()}
  bad = {w: k for w, k in aliases.items() if k not in kinds or not re.fullmatch(r"[^\W\d_][\w-]*", w)}
  if bad:
    raise ValueError(f"aliases {bad}: each must map one word to a kind of {tuple(kinds)}")
  return aliases


def parse_prompt(prompt: str, *, kinds: Sequence[str] = shapes.KINDS,
                 aliases: dict[str, str] | None = None) -> list[Pair]:
  """The (colour, kind) of every shape a shapes caption names, in order (repeats kept).

  Handles every wording `shapes.caption` produces ("there is a small red circle", "a red circle under a large blue
  square", "an image of ...", "... on a black background", sizes present or not), any letter case and plurals.
  `kinds` are the kind names it knows (default the dataset's; an evaluator of novel kinds passes its own), and
  `aliases` maps other words to them: {"zq": "heart"} reads "a red zq" as ("red", "heart").

  Raises:
    ValueError: if the prompt names no shape, or names a colour without a kind (or a kind without a colour) —
      a prompt this evaluator cannot check should not silently pass.
  """
  kinds = tuple(kinds)
  aliases = _check_aliases(aliases, kinds)
  pair_re, word_re = _prompt_patterns(tuple(dict.fromkeys(kinds + tuple(aliases))))
  text = prompt.lower()
  pairs = [(m.group(1), aliases.get(m.group(2), m.group(2))) for m in pair_re.finditer(text)]
  leftover = word_re.findall(pair_re.sub(" ", text))
  if not pairs or leftover:
    problem = "names no colour+kind shape" if not pairs else f"has unpaired colour/kind words {leftover}"
    raise ValueError(f"cannot check prompt {prompt!r}: it {problem}; expected shapes captions such as "
                     f"'a small red circle above a blue square' (colours {shapes.COLORS}, kinds {kinds})")
  return pairs


def prompt_pairs(prompt: Prompt, *, kinds: Sequence[str] = shapes.KINDS,
                 aliases: dict[str, str] | None = None) -> list[Pair]:
  """(colour, kind) pairs of a caption string, a `SceneSpec`, or an explicit list of pairs (`kinds`, `aliases`:
  see `parse_prompt`)."""
  if isinstance(prompt, str):
    return parse_prompt(prompt, kinds=kinds, aliases=aliases)
  if isinstance(prompt, shapes.SceneSpec):
    return [(s.color, s.kind) for s in prompt.shapes]
  pairs = [tuple(p) for p in prompt]
  known = set(_pairs(tuple(kinds)))
  unknown = [p for p in pairs if p not in known]
  if unknown or not pairs:
    raise ValueError(f"unknown (colour, kind) pairs {unknown or 'none given'}; known colours {shapes.COLORS}, "
                     f"kinds {tuple(kinds)}")
  return pairs


# ----------------------------------------------------------------------------------------------------------------
# Model


def _palette() -> np.ndarray:
  """float32 [len(COLORS) + 1, 3]: the dataset's colours, then the background, in [-1, 1]."""
  rgb = [shapes.COLOR_RGB[c] for c in shapes.COLORS] + [shapes.BACKGROUND_RGB]
  return np.asarray(rgb, np.float32) / 127.5 - 1


_ABSENT_LOGIT = -20.0  # logit of every kind of a colour the kind CNN did not read (p ≈ 2e-9)


class ShapesClassifier(nn.Module):
  """Image [B, H, W, 3] in [-1, 1] → one logit per colour×kind pair [B, len(PAIRS)] (colour-major).

  Factored the way the question is: which colours are where, and what shape does each colour's region have.
  1. Colour stage: a per-pixel softmax over the palette colours and the background. Its logits are a learned 1×1
     projection initialised to -|pixel - colour|² / 2σ², i.e. it starts as soft nearest-palette-colour assignment
     and training (with colour jitter and noise) adapts the boundaries.
  2. Kind stage: one small CNN, shared by all colours, reads each colour's soft mask and predicts which kinds
     that mask contains (multi-label). Sharing it across colours is what makes held-out colour+kind pairs as easy
     as seen ones, and reading only colour c's mask is what binds kind to colour ("red circle and blue square" ≠
     "blue circle and red square"). To save compute it runs on the `top_colors` colours with the most pixels;
     the rest are reported absent (the dataset has at most two shapes an image).
  Masks are cut into patches (space-to-depth) so the CNN always starts at 16×16; conv stages with max pooling
  between them; kinds are scored at each position of the final 4×4 map and the best position counts (presence
  is "anywhere in the image").
  """

  widths: tuple[int, ...] = (16, 32, 32)  # kind-CNN channels per stage (2×2 max pool between stages)
  hidden: int = 64  # width of the per-position MLP that scores kinds
  top_colors: int = 3  # colours whose masks the kind CNN reads (1..7)
  color_sigma: float = 0.25  # initial colour-assignment scale, [-1, 1] units (palette colours are ≥ 1.2 apart)
  # Added to every kind logit: starts the outputs near the prior (a kind is in a mask ~10 % of the time). From 0
  # (p = 0.5 everywhere) training first sat ~300 steps on an all-absent plateau; with it, 300 steps reach 99 %.
  logit_offset: float = -2.5

  @property
  def kind_names(self) -> tuple[str, ...]:
    """The kinds it scores, in output order (the dataset's `KINDS`; `ConceptClassifier` adds novel ones)."""
    return shapes.KINDS

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    batch, height, width, _ = images.shape
    num_colors, num_kinds = len(shapes.COLORS), len(self.kind_names)
    if height != width or height % 16:
      raise ValueError(f"ShapesClassifier reads square images with a side divisible by 16, got {images.shape}")
    if not 1 <= self.top_colors <= num_colors:
      raise ValueError(f"top_colors must be in 1..{num_colors}, got {self.top_colors}")
    palette = _palette()
    inv_var = 1.0 / self.color_sigma ** 2
    # -|x - p|²/2σ² = (x·p - |p|²/2)/σ² - |x|²/2σ²: the last term is the same for every p; softmax cancels it.
    kernel = self.param("color_kernel", nn.with_logical_partitioning(
        lambda *_: jnp.asarray(palette.T * inv_var), ("channels", "colors")), None)
    bias = self.param("color_bias", nn.with_logical_partitioning(
        lambda *_: jnp.asarray(-0.5 * inv_var * (palette ** 2).sum(-1)), ("colors",)), None)
    assignment = jax.nn.softmax(images @ kernel + bias, axis=-1)  # [B, H, W, colours + background]
    masks = assignment[..., :num_colors].transpose(0, 3, 1, 2)  # [B, C, H, W]

    k = self.top_colors
    if k < num_colors:
      _, chosen = jax.lax.top_k(masks.sum(axis=(2, 3)), k)  # [B, K] colours with the most pixels
      masks = jnp.take_along_axis(masks, chosen[:, :, None, None], axis=1)  # [B, K, H, W]
    patch = height // 16
    h = masks.reshape(batch * k, 16, patch, 16, patch).transpose(0, 1, 3, 2, 4)
    h = h.reshape(batch * k, 16, 16, patch * patch) * 2 - 1  # [B*K, 16, 16, patch²]
    for i, features in enumerate(self.widths):
      if i:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      h = nn.relu(layers.conv(features, 3, name=f"conv_{i}")(h))
    h = nn.relu(layers.conv(self.widths[-1], 3, name="conv_out")(h))
    # Kinds are scored at every position of the final map (each position sees a whole shape), then the best
    # position counts: two same-colour shapes are found at their own positions instead of blurring together.
    h = nn.relu(layers.dense(self.hidden, ("embed", "mlp"), name="fc")(h))
    local_logits = layers.dense(num_kinds, ("mlp", "embed"), name="kind_logits")(h)  # [B*K, h, w, kinds]
    kind_logits = local_logits.max(axis=(1, 2)).reshape(batch, k, num_kinds) + self.logit_offset
    if k < num_colors:  # colours not read: a fixed, confident "absent"
      full = jnp.full((batch, num_colors, num_kinds), _ABSENT_LOGIT, kind_logits.dtype)
      kind_logits = full.at[jnp.arange(batch)[:, None], chosen].set(kind_logits)
    return kind_logits.reshape(batch, num_colors * num_kinds)


class ConceptClassifier(ShapesClassifier):
  """A `ShapesClassifier` over `kinds`: the dataset's kinds plus novel ones the renderer draws (`shapes.NOVEL_KINDS`),
  so that it can check a model fine-tuned on a new shape. Same network, one more kind output per colour; trained the
  same way (`train_evaluator(..., model=ConceptClassifier())`) on renderer ground truth over every colour × kind."""

  kinds: tuple[str, ...] = shapes.KINDS + shapes.NOVEL_KINDS

  @property
  def kind_names(self) -> tuple[str, ...]:
    return tuple(self.kinds)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def prepare_images(images: Any, resolution: int) -> np.ndarray:
  """uint8 [N,H,W,3] or float [-1, 1] [N,H,W,3] → float32 [N, resolution, resolution, 3] in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.shape[1] < 1:
    raise ValueError(f"images must be a batch of square RGB images [N, H, W, 3] (H == W), got shape {images.shape}"
                     + (" — add a batch axis for a single image" if images.ndim == 3 else ""))
  if images.dtype == np.uint8:
    x = images.astype(np.float32) / 127.5 - 1.0
  elif np.issubdtype(images.dtype, np.floating):
    x = images.astype(np.float32)
    if not np.all(np.isfinite(x)):
      raise ValueError("images contain NaN or inf")
    if x.size and (x.min() < -1.5 or x.max() > 1.5):  # a little overshoot is normal for generated images
      raise ValueError(f"float images must be in [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}] "
                       "(pass uint8 for [0, 255] images)")
    x = np.clip(x, -1.0, 1.0)
  else:
    raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
  side = x.shape[1]
  if side == resolution:
    return x
  if side % resolution == 0:  # box filter, as the renderer anti-aliases
    f = side // resolution
    return x.reshape(len(x), resolution, f, resolution, f, 3).mean(axis=(2, 4))
  resized = jax.image.resize(x, (len(x), resolution, resolution, 3), method="linear", antialias=True)
  return np.asarray(resized, np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The evaluator


@dataclasses.dataclass
class ScoreResult:
  """Per-image prompt checks."""
  matches: np.ndarray  # bool [N]: every (colour, kind) named by prompt i is detected in image i
  named: list[list[Pair]]  # the pairs each prompt names
  detected: list[dict[Pair, float]]  # pairs detected in each image, with probabilities

  @property
  def accuracy(self) -> float:
    """Fraction of images that match their prompt."""
    return float(np.mean(self.matches)) if len(self.matches) else float("nan")

  def breakdown(self) -> dict[str, float]:
    """Where the misses are: accuracy of one-shape and of two-shape prompts, and recalls over every named shape.

    shape_recall: named (colour, kind) pairs detected / named pairs; colour_recall / kind_recall: named shapes whose
    colour (with any kind) / kind (in any colour) is detected. NaN where a group is empty.
    """
    def mean(values) -> float:
      values = list(values)
      return float(np.mean(values)) if values else float("nan")
    shapes = [(pair, detected) for named, detected in zip(self.named, self.detected, strict=True) for pair in named]
    return {
        "accuracy_one_shape": mean(m for m, n in zip(self.matches, self.named, strict=True) if len(n) == 1),
        "accuracy_two_shapes": mean(m for m, n in zip(self.matches, self.named, strict=True) if len(n) == 2),
        "shape_recall": mean(pair in d for pair, d in shapes),
        "colour_recall": mean(any(c == pair[0] for c, _ in d) for pair, d in shapes),
        "kind_recall": mean(any(k == pair[1] for _, k in d) for pair, d in shapes),
    }


class ShapesEvaluator:
  """A trained `ShapesClassifier` with its input handling; see the module docstring."""

  def __init__(self, params: Any, *, model: ShapesClassifier | None = None, resolution: int = 32,
               threshold: float = 0.5, max_batch: int = 256):
    self.model = model or ShapesClassifier()
    self.params = params
    self.resolution = resolution  # the side the network reads
    self.threshold = threshold  # probability above which a pair counts as present
    self.max_batch = max_batch  # images per forward pass
    self.kinds = tuple(self.model.kind_names)  # the kinds it knows (the dataset's, or with novel ones)
    self.pairs = _pairs(self.kinds)  # its outputs, colour-major
    self._probs = jax.jit(lambda p, x: jax.nn.sigmoid(self.model.apply({"params": p}, x)))

  def probabilities(self, images: Any) -> np.ndarray:
    """float32 [N, len(COLORS), len(self.kinds)]: probability that each colour×kind pair is present."""
    x = prepare_images(images, self.resolution)
    out = []
    for start in range(0, len(x), self.max_batch):
      chunk = x[start:start + self.max_batch]
      # Pad to a power of two: a handful of compiled shapes whatever the caller's batch sizes.
      padded = min(self.max_batch, 1 << max(0, len(chunk) - 1).bit_length())
      chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]), np.float32)])
      out.append(np.asarray(self._probs(self.params, chunk))[:len(x) - start])
    probs = np.concatenate(out) if out else np.zeros((0, len(self.pairs)), np.float32)
    return probs.reshape(len(x), len(shapes.COLORS), len(self.kinds))

  def predict(self, images: Any) -> list[dict[Pair, float]]:
    """Per image, {(colour, kind): probability} of the pairs detected (probability > threshold)."""
    return _detected(self.probabilities(images), self.threshold, self.pairs)

  def score(self, images: Any, prompts: Sequence[Prompt], *, exact: bool = False,
            aliases: dict[str, str] | None = None) -> ScoreResult:
    """Checks image i against prompt i (a caption, a `SceneSpec` or a list of (colour, kind) pairs).

    Args:
      images: [N, H, W, 3] uint8 or float in [-1, 1].
      prompts: N prompts.
      exact: also require that nothing else is detected (no extra shapes of other colour/kind pairs).
      aliases: other words for kinds it knows, e.g. {"zq": "heart"}: a fine-tune's rare token for a novel kind.

    Returns:
      A `ScoreResult`; `.matches[i]` is True when every shape the prompt names has its colour+kind detected.
    """
    named = [prompt_pairs(p, kinds=self.kinds, aliases=aliases) for p in prompts]
    probs = self.probabilities(images)
    if len(named) != len(probs):
      raise ValueError(f"got {len(probs)} images but {len(named)} prompts")
    detected = _detected(probs, self.threshold, self.pairs)
    matches = np.array([all(p in d for p in n) and (not exact or set(d) == set(n))
                        for n, d in zip(named, detected, strict=True)], dtype=bool)
    return ScoreResult(matches, named, detected)

  def config_fields(self) -> dict[str, Any]:
    """What `load_evaluator` needs to rebuild it (saved as the component's config.json)."""
    return {"model": _module_fields(self.model),
            "resolution": self.resolution, "threshold": self.threshold, "pairs": [list(p) for p in self.pairs]}


def _module_fields(model: ShapesClassifier) -> dict[str, Any]:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}


def _detected(probs: np.ndarray, threshold: float, pairs: Sequence[Pair] = PAIRS) -> list[dict[Pair, float]]:
  flat = probs.reshape(len(probs), len(pairs))
  return [{pairs[j]: float(row[j]) for j in np.flatnonzero(row > threshold)} for row in flat]


def save_evaluator(evaluator: ShapesEvaluator, out_dir, *, overwrite: bool = False) -> None:
  """Writes OUT/shapes_evaluator/{config.json, params/} (an sd_jax model component)."""
  store.save_component(out_dir, COMPONENT, evaluator.config_fields(), evaluator.params, overwrite=overwrite)


def load_evaluator(out_dir) -> ShapesEvaluator:
  """The evaluator `train_evaluator(out_dir)` saved (a `ConceptClassifier` one too: its config names its kinds)."""
  fields, params = store.load_component(out_dir, COMPONENT)
  m = fields["model"]
  kinds = tuple(m["kinds"]) if "kinds" in m else shapes.KINDS
  if [tuple(p) for p in fields["pairs"]] != list(_pairs(kinds)):
    raise ValueError(f"{out_dir}: the evaluator was trained on pairs {fields['pairs']}, but shapes now has "
                     f"{list(_pairs(kinds))}; retrain it")
  classifier = ConceptClassifier if "kinds" in m else ShapesClassifier
  model = classifier(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
  return ShapesEvaluator(params, model=model, resolution=fields["resolution"], threshold=fields["threshold"])


# ----------------------------------------------------------------------------------------------------------------
# Training data and augmentation


def default_evaluator_dir() -> str:
  """Where the shared evaluator is cached: beside the datasets (~/.cache/sd_jax/shapes_evaluator, or
  $SD_JAX_DATA_DIR/../shapes_evaluator)."""
  from sd_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel  (TFDS is slow to import)
  return os.path.join(os.path.dirname(input_pipeline.default_data_dir()), "shapes_evaluator")


def blob_image(rng: np.random.Generator, resolution: int) -> np.ndarray:
  """uint8 [R, R, 3]: irregular blobs of random smooth colour on black — no shape of the dataset.

  Stands for failed generations (early-training samples are blobby): trained on as "nothing present" so that
  a blob of roughly the right colour is not read as a shape.
  """
  cells = int(rng.choice([3, 4, 6]))  # blob scale: resolution / cells pixels

  def up(a):  # smooth upsampling of a coarse random grid
    return np.asarray(Image.fromarray(a).resize((resolution, resolution), Image.Resampling.BICUBIC))

  color = up(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)).astype(np.float32)
  level = up(rng.integers(0, 256, (cells, cells), dtype=np.uint8)).astype(np.float32) / 255
  mask = np.clip((level - rng.uniform(0.4, 0.7)) * 8, 0, 1)[..., None]  # soft-edged blobs on black
  return (color * mask).astype(np.uint8)


def render_batch(rng: np.random.Generator, batch_size: int, resolution: int, empty_fraction: float = 0.03,
                 blob_fraction: float = 0.0, kinds: Sequence[str] = shapes.KINDS) -> tuple[np.ndarray, np.ndarray]:
  """Freshly rendered scenes over ALL colour×kind pairs: (uint8 [B, R, R, 3], multi-hot float32 [B, len(pairs)]).

  A few images are empty (black) or hold shapeless colour blobs (`blob_image`), labelled "nothing present":
  a failed generation must not be read as some shape. `kinds`: the kinds drawn and labelled (default the
  dataset's: every colour×kind pair of `shapes.ALL_PAIRS`; a `ConceptClassifier`'s adds novel kinds).
  """
  pair_index = {pair: i for i, pair in enumerate(_pairs(tuple(kinds)))}
  all_pairs = frozenset(pair_index)  # for the dataset's kinds, shapes.ALL_PAIRS: the same draws
  images = np.zeros((batch_size, resolution, resolution, 3), np.uint8)
  labels = np.zeros((batch_size, len(pair_index)), np.float32)
  for i in range(batch_size):
    u = rng.random()
    if u < empty_fraction:
      continue
    if u < empty_fraction + blob_fraction:
      images[i] = blob_image(rng, resolution)
      continue
    spec = shapes.sample_spec(rng, all_pairs)
    images[i] = shapes.render(spec, resolution)
    for s in spec.shapes:
      labels[i, pair_index[(s.color, s.kind)]] = 1.0
  return images, labels


def _blur3(x: jax.Array) -> jax.Array:
  """Separable [1, 2, 1]/4 blur of [B, H, W, C] (edge-padded)."""
  def along(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    xp = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    taps = [jax.lax.slice_in_dim(xp, i, i + n, axis=axis) for i in range(3)]
    return 0.25 * taps[0] + 0.5 * taps[1] + 0.25 * taps[2]
  return along(along(x, 1), 2)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Mild corruptions of the kind generated images show; strengths are drawn per image up to these maxima."""
  # Gaussian noise σ in [-1, 1] units (0.3 ≈ 38 levels of 255). Up to 0.15 left the σ = 0.3 accuracy at 90 %
  # once blob negatives were added; 0.3 brings it to 98 % at no cost on clean images.
  noise_std: float = 0.3
  blur: float = 1.0  # blend weight with a 3x3 blur (applied twice at most: up to a ~1 px gaussian)
  color_gain: float = 0.12  # per-channel gain in [1 - g, 1 + g]
  color_offset: float = 0.08  # per-channel offset (background no longer pure black)
  flip: bool = True  # horizontal flips keep every kind's look


def augment(rng: jax.Array, x: jax.Array, cfg: AugmentConfig) -> jax.Array:
  """Random flip, blur, colour jitter and noise on float [B, H, W, 3] in [-1, 1]."""
  b = x.shape[0]
  k = jax.random.split(rng, 7)
  if cfg.flip:
    x = jnp.where(jax.random.bernoulli(k[0], 0.5, (b, 1, 1, 1)), x[:, :, ::-1], x)
  once = _blur3(x)
  twice = _blur3(once)
  a1 = cfg.blur * jax.random.uniform(k[1], (b, 1, 1, 1))
  a2 = cfg.blur * jax.random.uniform(k[2], (b, 1, 1, 1)) * jax.random.bernoulli(k[3], 0.3, (b, 1, 1, 1))
  x = (1 - a1) * x + a1 * ((1 - a2) * once + a2 * twice)
  gain = 1 + cfg.color_gain * jax.random.uniform(k[4], (b, 1, 1, 3), minval=-1, maxval=1)
  offset = cfg.color_offset * jax.random.uniform(k[5], (b, 1, 1, 3), minval=-1, maxval=1)
  x = (x + 1) * gain - 1 + offset
  std = cfg.noise_std * jax.random.uniform(k[6], (b, 1, 1, 1))
  x = x + std * jax.random.normal(jax.random.fold_in(k[6], 1), x.shape)
  return jnp.clip(x, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Real-image evaluation


@dataclasses.dataclass
class RealSplit:
  """Examples of a shapes split with ground truth."""
  images: np.ndarray  # uint8 [N, R, R, 3]
  captions: list[str]
  specs: list[shapes.SceneSpec]


def regenerate_split(split: str, num_examples: int, resolution: int, seed: int = 0) -> RealSplit:
  """Examples 0..num_examples-1 of `split` exactly as `shapes.build` makes them (same PNG bytes, same captions)
  for a build with this `seed` (0 for the named configs), without building the dataset.

  With `num_examples` equal to the split's size these are the split's examples; a built split lists them in
  TFDS's shuffled key order, so the first n of `load_split` are a different (equally random) subset.
  """
  pairs = shapes.COMPOSITIONAL_PAIRS if split == "compositional" else shapes.TRAIN_PAIRS
  images, captions, specs = [], [], []
  for i in range(num_examples):
    ex = shapes.make_example(seed, split, i, resolution, pairs)
    images.append(np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"), np.uint8))
    captions.append(ex["caption"])
    s = ex["shapes"]
    specs.append(shapes.SceneSpec(tuple(
        shapes.ShapeSpec(c, k, z, float(x), float(y))
        for c, k, z, x, y in zip(s["color"], s["kind"], s["size"], s["x"], s["y"], strict=True)), ex["relation"]))
  return RealSplit(np.stack(images), captions, specs)


def load_split(builder, split: str, num_examples: int | None = None) -> RealSplit:
  """Examples of a built shapes dataset (`shapes.build(...)`): its stored images, captions and ground truth."""
  source = builder.as_data_source(split)
  n = len(source) if num_examples is None else min(num_examples, len(source))
  examples = [source[i] for i in range(n)]
  captions = [ex["caption"].decode() if isinstance(ex["caption"], bytes) else str(ex["caption"]) for ex in examples]
  return RealSplit(np.stack([ex["image"] for ex in examples]), captions,
                   [shapes.spec_from_example(ex) for ex in examples])


def _mismatched_prompts(data: RealSplit, kinds: Sequence[str] = shapes.KINDS) -> list[str]:
  """For image i, the next caption in the split that names a pair image i does not show."""
  truth = [set(prompt_pairs(s)) for s in data.specs]
  named = [parse_prompt(c, kinds=kinds) for c in data.captions]
  out = []
  for i in range(len(data.captions)):
    for d in range(1, len(data.captions)):
      j = (i + d) % len(data.captions)
      if not set(named[j]) <= truth[i]:
        out.append(data.captions[j])
        break
    else:
      raise ValueError(f"every caption in the split names only pairs of image {i}; cannot build a mismatch")
  return out


def _attribute_swaps(data: RealSplit, rng: np.random.Generator, kinds: Sequence[str] = shapes.KINDS) -> list[str]:
  """For image i, its spec with one shape's colour or kind changed to a pair not in the image, as a caption."""
  out = []
  for spec in data.specs:
    truth = {(s.color, s.kind) for s in spec.shapes}
    k = int(rng.integers(len(spec.shapes)))
    shape = spec.shapes[k]
    if rng.random() < 0.5:
      options = [dataclasses.replace(shape, color=c) for c in shapes.COLORS if (c, shape.kind) not in truth]
    else:
      options = [dataclasses.replace(shape, kind=t) for t in kinds if (shape.color, t) not in truth]
    new = options[int(rng.integers(len(options)))]
    out.append(shapes.caption(dataclasses.replace(spec, shapes=spec.shapes[:k] + (new,) + spec.shapes[k + 1:]), rng))
  return out


def _binding_swaps(data: RealSplit, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
  """Indices of two-shape images with two colours and two kinds, and their captions with the colours swapped."""
  idx, prompts = [], []
  for i, spec in enumerate(data.specs):
    if len(spec.shapes) != 2:
      continue
    a, b = spec.shapes
    if a.color == b.color or a.kind == b.kind:
      continue
    swapped = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
    idx.append(i)
    prompts.append(shapes.caption(dataclasses.replace(spec, shapes=swapped), rng))
  return np.array(idx, int), prompts


def evaluate_real(evaluator: ShapesEvaluator, data: RealSplit, seed: int = 0) -> dict[str, float | None]:
  """The evaluator's own accuracy on real shapes images (the metrics in the module docstring)."""
  rng = np.random.default_rng(seed)
  detected = evaluator.predict(data.images)

  def accept(prompts, dets):
    return np.array([all(p in d for p in parse_prompt(prompt, kinds=evaluator.kinds))
                     for prompt, d in zip(prompts, dets, strict=True)], bool)

  truth = [{(s.color, s.kind) for s in spec.shapes} for spec in data.specs]
  own = accept(data.captions, detected)
  bind_idx, bind_prompts = _binding_swaps(data, rng)
  # The hardest real case: two kinds inside one colour's mask.
  same_color = np.array([len(t) == 2 and len({c for c, _ in t}) == 1 for t in truth], bool)
  return {
      "num_images": len(data.images),
      "prompt_accuracy": float(own.mean()),
      "exact_set_accuracy": float(np.mean([set(d) == t for d, t in zip(detected, truth, strict=True)])),
      "mismatch_rejection": float(1 - accept(_mismatched_prompts(data, evaluator.kinds), detected).mean()),
      "attribute_swap_rejection": float(1 - accept(_attribute_swaps(data, rng, evaluator.kinds), detected).mean()),
      "binding_swap_rejection": (float(1 - accept(bind_prompts, [detected[i] for i in bind_idx]).mean())
                                 if len(bind_idx) else None),  # None: no such image (JSON has no NaN)
      "num_binding_swaps": len(bind_idx),
      "same_color_prompt_accuracy": float(own[same_color].mean()) if same_color.any() else None,
      "num_same_color": int(same_color.sum()),
      "noisy_prompt_accuracy": float(accept(data.captions, evaluator.predict(corrupt(data.images, rng, 0.1))).mean()),
      "heavy_noise_prompt_accuracy": float(
          accept(data.captions, evaluator.predict(corrupt(data.images, rng, 0.3, blur_passes=2))).mean()),
      "garbage_rejection": float(1 - accept(data.captions, evaluator.predict(noise_fields(rng, data.images))).mean()),
  }


def corrupt(images: np.ndarray, rng: np.random.Generator, noise_std: float, blur_passes: int = 1) -> np.ndarray:
  """Fixed corruption for the robustness metrics: `blur_passes` [1,2,1] blurs at half strength, gaussian noise."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1
  for _ in range(blur_passes):
    x = 0.5 * x + 0.5 * _blur3(x)
  x = np.asarray(x) + noise_std * rng.standard_normal(x.shape).astype(np.float32)
  return np.clip(x, -1, 1)


def noise_fields(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
  """Smooth gaussian colour-noise images shaped like `like` (a failed generation; not `blob_image`, which the
  evaluator trains on): float [-1, 1]."""
  x = jnp.asarray(rng.standard_normal(like.shape).astype(np.float32))
  for _ in range(6):
    x = _blur3(x)
  x = np.asarray(x)
  return np.clip(0.6 * x / x.std(), -1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Novel kinds and relations

NOVEL_SPLIT_SEED = 9  # seed stream of `novel_split` (shapes.novel_scenes), apart from what fine-tuning data uses


def novel_split(kind: str, num_examples: int, resolution: int, seed: int = NOVEL_SPLIT_SEED) -> RealSplit:
  """Rendered ground truth for a novel kind (`shapes.novel_scenes`): half one-shape scenes, half with a second
  shape of any dataset pair; captions name the kind by its own name ("a small red heart above a blue square")."""
  specs = shapes.novel_scenes(num_examples, kind, seed=seed, two_shape_fraction=0.5, other_pairs=shapes.ALL_PAIRS)
  rng = np.random.default_rng([seed, shapes.NOVEL_STREAM, 1])
  images = np.stack([shapes.render(spec, resolution) for spec in specs])
  return RealSplit(images, [shapes.caption(spec, rng) for spec in specs], specs)


_RELATION_RE = re.compile(r"\b(above|below|under|(?:to the )?left of|(?:to the )?right of)\b")


def parse_relation(prompt: str) -> str:
  """The relation a two-shape caption states between its first and second shape (one of `shapes.RELATIONS`; "none"
  when it states none). "under" reads as "below", "to the left of" as "left of"."""
  found = _RELATION_RE.findall(prompt.lower())
  if len(found) > 1:
    raise ValueError(f"prompt {prompt!r} states {len(found)} relations; captions state at most one")
  if not found:
    return "none"
  word = found[0].removeprefix("to the ")
  return "below" if word == "under" else word


def color_centroids(images: Any, resolution: int = 32) -> np.ndarray:
  """float32 [N, len(COLORS), 3]: per palette colour, the (x, y) centre of the pixels nearest to it (x right, y down,
  in [0, 1], as `ShapeSpec`) and their fraction of the image. A pixel counts for the nearest of the palette colours
  and the background."""
  x = prepare_images(images, resolution)  # [N, R, R, 3] in [-1, 1]
  palette = _palette()  # colours, then the background
  nearest = ((x[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # [N, R, R]
  coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
  out = np.zeros((len(x), len(shapes.COLORS), 3), np.float32)
  for c in range(len(shapes.COLORS)):
    mask = (nearest == c).astype(np.float32)
    mass = mask.sum(axis=(1, 2))
    safe = np.maximum(mass, 1.0)
    out[:, c, 0] = (mask * coords[None, None, :]).sum(axis=(1, 2)) / safe
    out[:, c, 1] = (mask * coords[None, :, None]).sum(axis=(1, 2)) / safe
    out[:, c, 2] = mass / resolution ** 2
  return out


@dataclasses.dataclass
class RelationResult:
  """Per-image relation checks of two-shape prompts."""
  checked: np.ndarray  # bool [N]: the prompt names two shapes of different colours and a relation
  holds: np.ndarray  # bool [N]: checked, and the first colour's pixels lie in that relation to the second's

  @property
  def accuracy(self) -> float:
    """Fraction of checked prompts whose relation holds (NaN when none is checked)."""
    return float(self.holds[self.checked].mean()) if self.checked.any() else float("nan")


def check_relations(images: Any, prompts: Sequence[str], *, kinds: Sequence[str] = shapes.KINDS,
                    aliases: dict[str, str] | None = None, resolution: int = 32,
                    min_fraction: float = 0.01) -> RelationResult:
  """Does image i show prompt i's two shapes in the stated relation ("a red zq above a blue square")?

  Judged by colour, not by the classifier: the centres of the pixels of each named colour (`color_centroids`),
  compared as the dataset defines relations (`shapes.relation_between`: the dominant axis wins). Checkable only when
  the prompt names two shapes of different colours and a relation; a colour covering less than `min_fraction` of
  the image fails. On rendered two-colour scenes it is right every time (tests); it checks where colours are, so
  pair it with `ShapesEvaluator.score` for what the shapes are.
  """
  if len(images) != len(prompts):
    raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
  centroids = color_centroids(images, resolution)
  checked = np.zeros(len(prompts), bool)
  holds = np.zeros(len(prompts), bool)
  for i, prompt in enumerate(prompts):
    named = parse_prompt(prompt, kinds=kinds, aliases=aliases)
    relation = parse_relation(prompt)
    if len(named) != 2 or relation == "none" or named[0][0] == named[1][0]:
      continue
    checked[i] = True
    (xa, ya, ma), (xb, yb, mb) = (centroids[i, shapes.COLORS.index(c)] for c, _ in named)
    if min(ma, mb) < min_fraction:
      continue
    a = shapes.ShapeSpec(named[0][0], named[0][1], "small", float(xa), float(ya))
    b = shapes.ShapeSpec(named[1][0], named[1][1], "small", float(xb), float(yb))
    holds[i] = shapes.relation_between(a, b) == relation
  return RelationResult(checked, holds)


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class TrainConfig:
  """How `fit` trains the evaluator (every number one might sweep)."""
  resolution: int = 32  # image side the network reads (a multiple of 16)
  steps: int = 1500
  batch_size: int = 32
  learning_rate: float = 1e-2  # peak; lower rates sit much longer on the all-absent plateau
  warmup_steps: int = 50
  end_lr_fraction: float = 0.02  # cosine decay down to this fraction of the peak
  weight_decay: float = 1e-4
  empty_fraction: float = 0.03  # black images in the training stream
  blob_fraction: float = 0.05  # shapeless colour blobs (`blob_image`) in the training stream
  seed: int = 0  # renderer stream, init and augmentation


@dataclasses.dataclass
class EvaluatorReport:
  """What `train_evaluator` measured; written to OUT/report.json."""
  train: dict[str, Any]  # the TrainConfig
  augment: dict[str, Any]  # the AugmentConfig
  model: dict[str, Any]  # the ShapesClassifier fields
  train_seconds: float  # training loop, compilation included
  final_loss: float  # mean BCE over the last 50 steps
  real: dict[str, dict[str, dict[str, float | None]]]  # {"r32": {"test": metrics, "compositional": ...}, ...}

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, allow_nan=False)

  def summary(self) -> str:
    t = self.train

    def f(v):
      return "  n/a" if v is None else f"{v:.3f}"

    lines = [f"shapes evaluator r{t['resolution']}: {t['steps']} steps × {t['batch_size']} in "
             f"{self.train_seconds:.0f} s, final loss {self.final_loss:.4f}"]
    for res, splits in self.real.items():
      for split, m in splits.items():
        lines.append(f"  {res} {split:13s} prompt {f(m['prompt_accuracy'])}  exact {f(m['exact_set_accuracy'])}  "
                     f"same-colour {f(m['same_color_prompt_accuracy'])}  noisy {f(m['noisy_prompt_accuracy'])}  "
                     f"heavy-noise {f(m['heavy_noise_prompt_accuracy'])} | rejects: mismatch "
                     f"{f(m['mismatch_rejection'])}  attr-swap {f(m['attribute_swap_rejection'])}  "
                     f"bind-swap {f(m['binding_swap_rejection'])}  garbage {f(m['garbage_rejection'])}"
                     + (f" | relation {f(m['relation_accuracy'])}" if "relation_accuracy" in m else ""))
    return "\n".join(lines)


def _make_train_step(model: ShapesClassifier, tx: optax.GradientTransformation, aug: AugmentConfig):
  def train_step(params, opt_state, images, labels, rng):
    x = augment(rng, images.astype(jnp.float32) / 127.5 - 1, aug)

    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(train_step, donate_argnums=(0, 1))


def fit(config: TrainConfig | None = None, model: ShapesClassifier | None = None,
        augment_config: AugmentConfig | None = None, log_every: int = 0) -> tuple[ShapesEvaluator, list[float]]:
  """Trains a classifier on freshly rendered scenes; returns (evaluator, per-step losses)."""
  config = config or TrainConfig()
  augment_config = augment_config or AugmentConfig()
  if config.resolution % 16 or config.resolution < 16:
    raise ValueError(f"resolution must be a positive multiple of 16, got {config.resolution}")
  if config.steps < 1 or config.batch_size < 1:
    raise ValueError(f"steps and batch_size must be positive, got {config.steps}, {config.batch_size}")
  model = model or ShapesClassifier()
  res = config.resolution
  data_rng = np.random.default_rng([config.seed, 1234])  # own stream: not the real splits' seeds
  key = jax.random.PRNGKey(config.seed)
  params = nn.meta.unbox(model.init(key, jnp.zeros((1, res, res, 3)))["params"])
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, min(config.warmup_steps, config.steps // 2), max(config.steps, 2),
      config.learning_rate * config.end_lr_fraction)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  opt_state = tx.init(params)
  train_step = _make_train_step(model, tx, augment_config)
  losses, start = [], time.time()
  for step in range(config.steps):
    # Rendered while the previous step (dispatched asynchronously) still runs.
    images, labels = render_batch(data_rng, config.batch_size, res, config.empty_fraction,
                                   config.blob_fraction, kinds=model.kind_names)
    params, opt_state, loss = train_step(params, opt_state, images, labels, jax.random.fold_in(key, step))
    losses.append(loss)
    if log_every and (step + 1) % log_every == 0:
      print(f"step {step + 1}/{config.steps}  loss {float(loss):.4f}  ({time.time() - start:.0f} s)", flush=True)
  losses = [float(v) for v in jax.device_get(losses)]
  if not np.isfinite(losses[-1]):
    raise FloatingPointError(f"shapes evaluator training diverged (loss {losses[-1]}); lower learning_rate")
  return ShapesEvaluator(jax.device_get(params), model=model, resolution=res), losses


def train_evaluator(
    out_dir,
    *,
    resolution: int = 32,
    steps: int = TrainConfig.steps,
    batch_size: int = TrainConfig.batch_size,
    seed: int = 0,
    model: ShapesClassifier | None = None,
    augment_config: AugmentConfig | None = None,
    eval_examples: int = 1000,
    eval_resolutions: Iterable[int] | None = None,
    overwrite: bool = False,
    log_every: int = 0,
    **train_overrides,
) -> EvaluatorReport:
  """Trains the evaluator, saves it to `out_dir` and reports its own accuracy on real shapes images.

  Args:
    out_dir: where the weights (OUT/shapes_evaluator/) and OUT/report.json go; None or "": not saved.
    resolution, steps, batch_size, seed: see `TrainConfig`; `train_overrides` sets its other fields.
    model: the classifier (default `ShapesClassifier()`; `ConceptClassifier()` also learns the novel kinds and
      reports on rendered scenes of each, as split "novel_KIND", with `check_relations`' accuracy).
    augment_config: training corruptions (default `AugmentConfig()`).
    eval_examples: images per real split to report on (the named dataset configs hold 1000).
    eval_resolutions: image sides to report at (default: `resolution` and 64). Images are rendered at that side
      and resized to `resolution`, as generated images of that side would be.
    overwrite: replace an evaluator already in `out_dir`.
    log_every: print the loss every this many steps (0: quiet).
  """
  if out_dir and (store._path(out_dir) / COMPONENT / "params").exists() and not overwrite:
    raise FileExistsError(f"{out_dir} already holds a shapes evaluator; load it with load_evaluator(), or pass "
                          "overwrite=True (--overwrite)")
  config = TrainConfig(resolution=resolution, steps=steps, batch_size=batch_size, seed=seed, **train_overrides)
  start = time.time()
  augment_config = augment_config or AugmentConfig()
  evaluator, losses = fit(config, model, augment_config, log_every=log_every)
  train_seconds = time.time() - start
  real = {}
  for res in (sorted({resolution, 64}) if eval_resolutions is None else eval_resolutions):
    real[f"r{res}"] = {split: evaluate_real(evaluator, regenerate_split(split, eval_examples, res), seed=seed)
                       for split in ("test", "compositional")}
    for kind in evaluator.kinds:
      if kind not in shapes.KINDS:  # a ConceptClassifier: its own accuracy on rendered scenes of the novel kind
        data = novel_split(kind, eval_examples, res)
        metrics = evaluate_real(evaluator, data, seed=seed)
        relations = check_relations(data.images, data.captions, kinds=evaluator.kinds, resolution=resolution)
        metrics["relation_accuracy"] = None if not relations.checked.any() else relations.accuracy
        metrics["num_relations"] = int(relations.checked.sum())
        real[f"r{res}"][f"novel_{kind}"] = metrics
  report = EvaluatorReport(train=dataclasses.asdict(config), augment=dataclasses.asdict(augment_config),
                           model=_module_fields(evaluator.model),
                           train_seconds=round(train_seconds, 1), final_loss=float(np.mean(losses[-50:])), real=real)
  if out_dir:
    save_evaluator(evaluator, out_dir, overwrite=overwrite)
    (store._path(out_dir) / REPORT_FILE).write_text(report.to_json())
  return report


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sd_jax.eval.shapes_eval --out DIR [--resolution 32] [--steps N] ...`: trains, prints the report
  (argv: the flags, without the program name; default sys.argv[1:]). Returns 0; exits 1 on bad flags, 1 when
  training cannot start (an evaluator already in --out without --overwrite, a bad resolution)."""
  from absl import flags
  from sd_jax import cli

  cmd = cli.Command("python -m sd_jax.eval.shapes_eval", __doc__)
  fv = cmd.flags
  flags.DEFINE_string("out", None, "Directory for the evaluator weights and report.json.", flag_values=fv)
  flags.DEFINE_integer("resolution", 32, "Image side the evaluator reads (a multiple of 16).", flag_values=fv)
  flags.DEFINE_integer("steps", TrainConfig.steps, "Training steps.", flag_values=fv)
  flags.DEFINE_integer("batch_size", TrainConfig.batch_size, "Images per step.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of rendering, init and augmentation.", flag_values=fv)
  flags.DEFINE_integer("eval_examples", 1000, "Real images per split in the report.", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an evaluator already in --out.", flag_values=fv)
  flags.DEFINE_list("novel_kinds", [], f"Also learn these kinds the renderer draws but the dataset never uses "
                    f"(of {shapes.NOVEL_KINDS}): a ConceptClassifier, for models fine-tuned on them.", flag_values=fv)
  cmd.require("out")
  cmd.parse(argv)
  unknown = [k for k in fv.novel_kinds if k not in shapes.NOVEL_KINDS]
  if unknown:
    print(f"error: --novel_kinds {unknown}: the renderer's novel kinds are {shapes.NOVEL_KINDS}", file=sys.stderr)
    raise SystemExit(1)
  model = ConceptClassifier(kinds=shapes.KINDS + tuple(fv.novel_kinds)) if fv.novel_kinds else None
  try:
    report = train_evaluator(fv.out, resolution=fv.resolution, steps=fv.steps, batch_size=fv.batch_size,
                             seed=fv.seed, eval_examples=fv.eval_examples, overwrite=fv.overwrite, model=model,
                             log_every=max(1, fv.steps // 10))
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None
  print(report.summary())
  print(f"wrote {os.path.join(fv.out, COMPONENT)} and {os.path.join(fv.out, REPORT_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
