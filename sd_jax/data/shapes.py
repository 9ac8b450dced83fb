"""`shapes`: a procedural, captioned dataset of coloured shapes (TFDS builder).

Each image shows one or two flat shapes on a black background. Every shape has a
colour (`COLORS`), a kind (`KINDS`), a size (`SIZES`: small ≈ 30 % of the image
side, large ≈ 46 %) and a position. Two shapes never overlap and stand in a
clear spatial relation (`RELATIONS`: shape 0 is above / below / left of / right
of shape 1; the primary-axis offset is at least twice the cross-axis offset).
Captions name the colour and kind of every shape and the relation, with a little
variation in wording ("a small red circle above a blue square", "there is a
large green cross"). The ground-truth attributes are stored with each example.

Splits
  * `train`: shapes drawn only from the colour×kind pairs not held out.
  * `test`: new samples of the same pairs as `train`.
  * `compositional`: every shape is one of the held-out `COMPOSITIONAL_PAIRS`,
    i.e. a colour+kind combination that never occurs in `train`.

Held-out combinations (`COMPOSITIONAL_PAIRS`, 7 of the 35 colour×kind pairs,
one per colour; every colour keeps 4 kinds and every kind keeps 5 or 6 colours
in `train`): red square, green star, blue circle, yellow triangle, purple cross,
cyan square, white star.

Generation is deterministic: example `i` of split `s` is drawn from
`np.random.default_rng([seed, SPLIT_IDS[s], i])`, so it does not depend on
generation order, and identical configs give identical bytes. Images are drawn
with PIL at 4× the target resolution and box-downsampled (anti-aliased), and
PNG-encoded with PIL, so building and reading need no TensorFlow.

Configs: `r32` and `r64` (20000 train / 1000 test / 1000 compositional, seed 0),
`r32_tiny` and `r64_tiny` (256 / 64 / 64, for runlocal configs and tests);
`make_config` / `ShapesConfig` make others. Stored as array_record
and read with `builder.as_data_source(split)` (the builder defaults to
array_record, so `tfds.builder("shapes", data_dir=...)` works too once this
module is imported). Building takes ~8 s for `r32` and ~13 s for `r64` on 2 CPU
cores (13 MB and 17 MB on disk).

Usage:
  builder = shapes.build(data_dir)             # r32: built once, then reused
  builder = shapes.build(data_dir, config="r32_tiny")
  train = builder.as_data_source("train")      # random access, grain-ready
  ex = train[0]  # {"image": uint8 [32, 32, 3], "caption": bytes,
                 #  "relation": int, "num_shapes": int,
                 #  "shapes": {"color"|"kind"|"size": [np.int64] * num_shapes,
                 #             "x"|"y": [np.float32] * num_shapes}}
  spec = shapes.spec_from_example(ex)          # back to names and positions
Ground truth comes back as variable-length lists: keep only "image" and
"caption" before batching.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
from typing import Collection, Iterator, Sequence

from etils import epath
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

# Class-label orders below are part of the stored format: append, never reorder.
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan", "white")
COLOR_RGB = {  # well separated in RGB (min pairwise distance ≈ 155)
    "red": (230, 25, 25),
    "green": (30, 200, 30),
    "blue": (30, 60, 255),
    "yellow": (245, 225, 20),
    "purple": (180, 40, 220),
    "cyan": (20, 215, 225),
    "white": (245, 245, 245),
}
KINDS = ("circle", "square", "triangle", "star", "cross")
# Kinds `render` draws that the dataset never uses (not in KINDS, the splits or the stored ClassLabels): a concept no
# model trained on the shapes data has seen, for fine-tuning experiments (`novel_scenes`, `concept_caption`).
NOVEL_KINDS = ("heart",)
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.30, "large": 0.46}  # bounding-box side / image side
RELATIONS = ("none", "above", "below", "left of", "right of")
BACKGROUND_RGB = (0, 0, 0)

# Colour i is held out with kind (2i + 1) mod 5: one pair per colour, and every
# kind keeps at least 5 colours in train. Written out so the set is explicit.
COMPOSITIONAL_PAIRS = frozenset({
    ("red", "square"),
    ("green", "star"),
    ("blue", "circle"),
    ("yellow", "triangle"),
    ("purple", "cross"),
    ("cyan", "square"),
    ("white", "star"),
})
ALL_PAIRS = frozenset(itertools.product(COLORS, KINDS))
TRAIN_PAIRS = ALL_PAIRS - COMPOSITIONAL_PAIRS  # used by `train` and `test`

SPLIT_IDS = {"train": 0, "test": 1, "compositional": 2}  # seed-stream per split
NOVEL_STREAM = 100  # seed-stream of `novel_scenes` (apart from every split's)

_MARGIN = 0.01  # min distance between a shape's bounding box and the border
_GAP = 0.04  # min gap between the two bounding boxes along the relation axis
_MAX_CROSS_RATIO = 0.5  # |cross-axis offset| <= this * |relation-axis offset|
_SUPERSAMPLE = 4  # draw at 4x, then box-downsample

_RELATION_WORDS = {  # first entry is the canonical wording
    "above": ("above",),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
_ONE_SHAPE_TEMPLATES = ("{a}", "there is {a}", "an image of {a}",
                        "{a} on a black background")
_TWO_SHAPE_TEMPLATES = ("{a} {rel} {b}", "{a} is {rel} {b}",
                        "there is {a} {rel} {b}", "an image of {a} {rel} {b}")
_SIZE_WORD_PROB = 0.75  # varied captions mention each shape's size this often


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
  """One shape: attributes and bounding-box centre (x right, y down, in [0, 1])."""
  color: str
  kind: str
  size: str
  x: float
  y: float


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """One image: one or two shapes; `relation` is shapes[0] relative to shapes[1]."""
  shapes: tuple[ShapeSpec, ...]
  relation: str = "none"  # "none" for one shape


def relation_between(a: ShapeSpec, b: ShapeSpec) -> str:
  """The relation of `a` to `b` implied by their centres (dominant axis wins)."""
  dx, dy = b.x - a.x, b.y - a.y
  if abs(dy) >= abs(dx):
    return "above" if dy > 0 else "below"
  return "left of" if dx > 0 else "right of"


def sample_spec(
    rng: np.random.Generator,
    allowed_pairs: Collection[tuple[str, str]] = TRAIN_PAIRS,
    num_shapes: int | None = None,
) -> SceneSpec:
  """Samples a scene whose shapes' (colour, kind) pairs all lie in `allowed_pairs`.

  Args:
    rng: numpy Generator; the result is a deterministic function of its state.
    allowed_pairs: (colour, kind) pairs to draw from, e.g. `TRAIN_PAIRS` or
      `COMPOSITIONAL_PAIRS`.
    num_shapes: 1 or 2; None draws either with probability 1/2.

  Returns:
    A `SceneSpec` with non-overlapping shapes inside the image whose `relation`
    agrees with `relation_between(shapes[0], shapes[1])`.
  """
  pairs = sorted(allowed_pairs)  # sorted: independent of set iteration order
  if not pairs:
    raise ValueError("allowed_pairs is empty")
  if num_shapes is None:
    num_shapes = int(rng.integers(1, 3))
  if num_shapes not in (1, 2):
    raise ValueError(f"num_shapes must be 1 or 2, got {num_shapes}")
  attrs = []
  for _ in range(num_shapes):
    color, kind = pairs[int(rng.integers(len(pairs)))]
    attrs.append((color, kind, SIZES[int(rng.integers(len(SIZES)))]))
  halves = [SIZE_FRACTION[size] / 2 for _, _, size in attrs]

  if num_shapes == 1:
    lo, hi = halves[0] + _MARGIN, 1 - halves[0] - _MARGIN
    x, y = rng.uniform(lo, hi, size=2)
    return SceneSpec((ShapeSpec(*attrs[0], float(x), float(y)),), "none")

  relation = RELATIONS[int(rng.integers(1, len(RELATIONS)))]
  h0, h1 = halves
  # Along the relation axis: shape "first" sits before shape "second"
  # (smaller coordinate), with bounding boxes separated by at least _GAP.
  first, second = (0, 1) if relation in ("above", "left of") else (1, 0)
  hf, hs = halves[first], halves[second]
  d_min = hf + hs + _GAP
  d_max = (1 - hs - _MARGIN) - (hf + _MARGIN)
  d = rng.uniform(d_min, d_max)
  p_first = rng.uniform(hf + _MARGIN, 1 - hs - _MARGIN - d)
  p = {first: p_first, second: p_first + d}
  # Across: small offset so the relation stays unambiguous.
  q0 = rng.uniform(h0 + _MARGIN, 1 - h0 - _MARGIN)
  e_lo = max(-_MAX_CROSS_RATIO * d, h1 + _MARGIN - q0)
  e_hi = min(_MAX_CROSS_RATIO * d, 1 - h1 - _MARGIN - q0)
  q = {0: q0, 1: q0 + rng.uniform(e_lo, e_hi)}
  vertical = relation in ("above", "below")
  shapes = []
  for i in range(2):
    x, y = (q[i], p[i]) if vertical else (p[i], q[i])
    shapes.append(ShapeSpec(*attrs[i], float(x), float(y)))
  return SceneSpec(tuple(shapes), relation)


def _describe(shape: ShapeSpec, rng: np.random.Generator | None) -> str:
  with_size = rng is None or rng.random() < _SIZE_WORD_PROB
  words = ([shape.size] if with_size else []) + [shape.color, shape.kind]
  noun = " ".join(words)
  return ("an " if noun[0] in "aeiou" else "a ") + noun


def caption(spec: SceneSpec, rng: np.random.Generator | None = None) -> str:
  """Natural-language caption naming every shape's colour and kind (and relation).

  With `rng=None` the caption is canonical (sizes always named, fixed wording),
  e.g. "a small red circle above a large blue square"; with an rng the wording
  varies a little and sizes are sometimes left out.
  """
  a = _describe(spec.shapes[0], rng)
  if len(spec.shapes) == 1:
    template = _ONE_SHAPE_TEMPLATES[0 if rng is None else
                                    int(rng.integers(len(_ONE_SHAPE_TEMPLATES)))]
    return template.format(a=a)
  b = _describe(spec.shapes[1], rng)
  words = _RELATION_WORDS[spec.relation]
  if rng is None:
    template, rel = _TWO_SHAPE_TEMPLATES[0], words[0]
  else:
    template = _TWO_SHAPE_TEMPLATES[int(rng.integers(len(_TWO_SHAPE_TEMPLATES)))]
    rel = words[int(rng.integers(len(words)))]
  return template.format(a=a, rel=rel, b=b)


def _outline(kind: str) -> np.ndarray | None:
  """Polygon of `kind` in unit bounding-box coordinates ([-0.5, 0.5]², y down)."""
  if kind == "circle":
    return None  # drawn as an ellipse
  if kind == "square":
    s = 0.43  # slightly inset: a full box looks much bigger than a circle
    return np.array([(-s, -s), (s, -s), (s, s), (-s, s)])
  if kind == "triangle":
    return np.array([(0.0, -0.47), (0.5, 0.42), (-0.5, 0.42)])
  if kind == "star":
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 0.52, 0.24)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    pts[:, 1] += (0.52 - 0.52 * np.cos(np.pi / 5)) / 2  # centre the bounding box
    return pts
  if kind == "cross":
    t = 0.18  # half arm thickness
    return np.array([(-t, -0.5), (t, -0.5), (t, -t), (0.5, -t), (0.5, t),
                     (t, t), (t, 0.5), (-t, 0.5), (-t, t), (-0.5, t),
                     (-0.5, -t), (-t, -t)])
  if kind == "heart":  # a novel kind (NOVEL_KINDS): the classic parametric heart, 48 vertices
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y down: lobes on top
    pts = np.stack([x, y], axis=1) / 32  # 32 wide: the bounding box is 1.0 × 0.90, like a circle's width
    pts[:, 1] -= (pts[:, 1].max() + pts[:, 1].min()) / 2  # centre the bounding box
    return pts
  raise ValueError(f"unknown kind {kind!r}")


_OUTLINES = {kind: _outline(kind) for kind in KINDS}
_OUTLINES.update({kind: _outline(kind) for kind in NOVEL_KINDS})


def render(spec: SceneSpec, resolution: int) -> np.ndarray:
  """Draws `spec` as a uint8 [resolution, resolution, 3] image (anti-aliased)."""
  big = resolution * _SUPERSAMPLE
  canvas = Image.new("RGB", (big, big), BACKGROUND_RGB)
  draw = ImageDraw.Draw(canvas)
  for shape in spec.shapes:
    side = SIZE_FRACTION[shape.size] * big
    cx, cy = shape.x * big, shape.y * big
    fill = COLOR_RGB[shape.color]
    outline = _OUTLINES[shape.kind]
    if outline is None:
      r = side / 2
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
      pts = outline * side + (cx, cy)
      draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
  small = canvas.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(small, dtype=np.uint8)


def novel_scenes(num_scenes: int, kind: str = NOVEL_KINDS[0], *, seed: int = 0, two_shape_fraction: float = 0.3,
                 colors: Sequence[str] = COLORS,
                 other_pairs: Collection[tuple[str, str]] = TRAIN_PAIRS) -> list[SceneSpec]:
  """Scenes that each show one shape of `kind` (any kind `render` draws, e.g. a novel one), for fine-tuning on it.

  Scene i is drawn from `np.random.default_rng([seed, NOVEL_STREAM, i])`: one shape of `kind` in a random colour of
  `colors`, size and position, alone or, with probability `two_shape_fraction`, with a second shape of a random
  (colour, kind) of `other_pairs` in a clear relation (laid out as `sample_spec` lays out two shapes; the shape of
  `kind` is the first or the second, at random). Captions: `concept_caption`.
  """
  if kind not in _OUTLINES:
    raise ValueError(f"render cannot draw kind {kind!r}; it draws {KINDS + NOVEL_KINDS}")
  if not colors or any(c not in COLOR_RGB for c in colors):
    raise ValueError(f"colors must be some of {COLORS}, got {tuple(colors)}")
  if not 0.0 <= two_shape_fraction <= 1.0:
    raise ValueError(f"two_shape_fraction must be in [0, 1], got {two_shape_fraction}")
  scenes = []
  for i in range(num_scenes):
    rng = np.random.default_rng([seed, NOVEL_STREAM, i])
    two = rng.random() < two_shape_fraction
    color = colors[int(rng.integers(len(colors)))]
    # The layout (sizes, positions, relation) of an ordinary scene; one of its shapes becomes the novel one.
    spec = sample_spec(rng, other_pairs, num_shapes=2 if two else 1)
    k = int(rng.integers(len(spec.shapes)))
    novel = dataclasses.replace(spec.shapes[k], color=color, kind=kind)
    scenes.append(dataclasses.replace(spec, shapes=spec.shapes[:k] + (novel,) + spec.shapes[k + 1:]))
  return scenes


def concept_caption(spec: SceneSpec, word: str, rng: np.random.Generator | None = None,
                    kinds: Collection[str] = NOVEL_KINDS) -> str:
  """`caption(spec, rng)` with `word` (e.g. a rare token, "zq") as the name of every shape of `kinds`: "a red zq",
  "a small blue zq above a green square" (the dataset's wording, canonical with `rng=None`)."""
  if not word.strip() or " " in word.strip():
    raise ValueError(f"word must be one word, got {word!r}")
  renamed = tuple(dataclasses.replace(s, kind=word.strip()) if s.kind in kinds else s for s in spec.shapes)
  return caption(dataclasses.replace(spec, shapes=renamed), rng)


def _png_bytes(image: np.ndarray) -> bytes:
  # Encoded here with PIL: tfds.features.Image would call tf.image.encode_png.
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=6)
  return buf.getvalue()


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Resolution, split sizes and seed of a `shapes` build.

  The config `name` identifies the build on disk (data_dir/shapes/NAME/VERSION),
  so different settings need different names (`make_config` derives one).
  """
  resolution: int = 32  # image side in pixels
  num_train: int = 20_000
  num_test: int = 1_000
  num_compositional: int = 1_000
  seed: int = 0  # base of every split's seed stream


_DEFAULT_SIZES = dict(num_train=20_000, num_test=1_000, num_compositional=1_000,
                      seed=0)
_TINY_SIZES = dict(num_train=256, num_test=64, num_compositional=64, seed=0)


def _standard_config(resolution: int, tiny: bool = False) -> ShapesConfig:
  if tiny:  # for runlocal configs and tests: builds in a fraction of a second
    return ShapesConfig(
        name=f"r{resolution}_tiny", resolution=resolution, **_TINY_SIZES,
        description=f"{resolution}x{resolution} images, tiny splits.")
  return ShapesConfig(
      name=f"r{resolution}", resolution=resolution, **_DEFAULT_SIZES,
      description=f"{resolution}x{resolution} images, default split sizes.")


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Procedural captioned shapes; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_standard_config(32), _standard_config(64),
                     _standard_config(32, tiny=True),
                     _standard_config(64, tiny=True)]

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    # array_record by default: TFDS's tfrecord default would need TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default looks the module up through `importlib_resources`, which
    # TF-free installs may lack; the path only locates an (absent) checksums file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "shapes": tfds.features.Sequence({
                "color": tfds.features.ClassLabel(names=COLORS),
                "kind": tfds.features.ClassLabel(names=KINDS),
                "size": tfds.features.ClassLabel(names=SIZES),
                "x": np.float32,  # bounding-box centre, [0, 1], left to right
                "y": np.float32,  # bounding-box centre, [0, 1], top to bottom
            }),
            "relation": tfds.features.ClassLabel(names=RELATIONS),
            "num_shapes": np.int32,
        }),
        supervised_keys=("image", "caption"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train, TRAIN_PAIRS),
        "test": self._generate_examples("test", cfg.num_test, TRAIN_PAIRS),
        "compositional": self._generate_examples(
            "compositional", cfg.num_compositional, COMPOSITIONAL_PAIRS),
    }

  def _generate_examples(self, split: str, num_examples: int,
                         pairs: Collection[tuple[str, str]]) -> Iterator:
    cfg = self.builder_config
    for index in range(num_examples):
      yield index, make_example(cfg.seed, split, index, cfg.resolution, pairs)


def make_example(seed: int, split: str, index: int, resolution: int,
                 pairs: Collection[tuple[str, str]]) -> dict:
  """Example `index` of `split` as fed to TFDS (image as PNG bytes)."""
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  spec = sample_spec(rng, pairs)
  return {
      "image": _png_bytes(render(spec, resolution)),
      "caption": caption(spec, rng),
      "shapes": {
          "color": [s.color for s in spec.shapes],
          "kind": [s.kind for s in spec.shapes],
          "size": [s.size for s in spec.shapes],
          "x": np.array([s.x for s in spec.shapes], np.float32),
          "y": np.array([s.y for s in spec.shapes], np.float32),
      },
      "relation": spec.relation,
      "num_shapes": len(spec.shapes),
  }


def spec_from_example(example: dict) -> SceneSpec:
  """Rebuilds the `SceneSpec` from an example read with `as_data_source`."""
  s = example["shapes"]
  shapes = tuple(
      ShapeSpec(COLORS[int(c)], KINDS[int(k)], SIZES[int(z)], float(x), float(y))
      for c, k, z, x, y in zip(s["color"], s["kind"], s["size"], s["x"], s["y"]))
  return SceneSpec(shapes, RELATIONS[int(example["relation"])])


def default_data_dir() -> str:
  """$SD_JAX_DATA_DIR, else ~/.cache/sd_jax/tensorflow_datasets (expanded)."""
  return os.path.expanduser(
      os.environ.get("SD_JAX_DATA_DIR", "~/.cache/sd_jax/tensorflow_datasets"))


def make_config(resolution: int = 32, **overrides) -> ShapesConfig:
  """`r{resolution}` with `overrides` (num_train, num_test, num_compositional,
  seed); the name encodes every non-default value, e.g. "r32-train64-seed3"."""
  unknown = set(overrides) - set(_DEFAULT_SIZES)
  if unknown:
    raise ValueError(f"unknown ShapesConfig fields {sorted(unknown)}; "
                     f"expected some of {sorted(_DEFAULT_SIZES)}")
  values = {**_DEFAULT_SIZES, **overrides}
  short = {"num_train": "train", "num_test": "test",
           "num_compositional": "comp", "seed": "seed"}
  name = f"r{resolution}" + "".join(
      f"-{short[k]}{values[k]}" for k in short if values[k] != _DEFAULT_SIZES[k])
  return ShapesConfig(name=name, resolution=resolution, **values)


def build(data_dir: str | os.PathLike | None = None, resolution: int = 32, *,
          config: str | ShapesConfig | None = None, **overrides) -> Shapes:
  """Returns the prepared `Shapes` builder, generating it on first use.

  Args:
    data_dir: TFDS data dir; None or "" -> `default_data_dir()`.
    resolution: image side; 32 and 64 have named configs, others work too.
    config: a named config ("r32", "r64", "r32_tiny", "r64_tiny") or a
      `ShapesConfig`; replaces `resolution` and `overrides`.
    **overrides: ShapesConfig fields (num_train, num_test, num_compositional,
      seed) that differ from the defaults.

  A later call with the same arguments reuses the files (TFDS skips
  `download_and_prepare` for a built dataset).
  """
  if config is None:
    config = make_config(resolution, **overrides)
    if config.name in Shapes.builder_configs:  # TFDS refuses a custom twin
      config = config.name
  elif overrides:
    raise ValueError(f"pass either config={config!r} or overrides "
                     f"{sorted(overrides)}, not both")
  elif isinstance(config, str) and config not in Shapes.builder_configs:
    raise ValueError(f"unknown shapes config {config!r}; named configs are "
                     f"{sorted(Shapes.builder_configs)} (or use overrides)")
  builder = Shapes(config=config, data_dir=data_dir or default_data_dir())
  builder.download_and_prepare()
  return builder


def specs_grid(specs: Sequence[SceneSpec], resolution: int, cols: int = 4,
               scale: int = 4, pad: int = 2) -> np.ndarray:
  """Tiles rendered `specs` into one uint8 image (for looking at the data)."""
  rows = -(-len(specs) // cols)
  cell = resolution * scale + pad
  grid = np.full((rows * cell + pad, cols * cell + pad, 3), 64, np.uint8)
  for i, spec in enumerate(specs):
    img = np.kron(render(spec, resolution), np.ones((scale, scale, 1), np.uint8))
    r, c = divmod(i, cols)
    grid[pad + r * cell: pad + r * cell + resolution * scale,
         pad + c * cell: pad + c * cell + resolution * scale] = img
  return grid
