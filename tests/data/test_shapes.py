"""Tests for the procedural `shapes` TFDS builder (tiny splits, no TensorFlow)."""

import os
import pathlib
import sys

import numpy as np
import pytest

from sd_jax.data import shapes

SPLITS = ("train", "test", "compositional")
TINY = dict(num_train=48, num_test=16, num_compositional=16, seed=3)


def _read_all(builder):
  return {split: [builder.as_data_source(split)[i]
                  for i in range(builder.info.splits[split].num_examples)]
          for split in SPLITS}


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("shapes32")
  builder = shapes.Shapes(
      config=shapes.ShapesConfig(name="tiny32", resolution=32, **TINY),
      data_dir=data_dir)
  builder.download_and_prepare()
  return builder, _read_all(builder)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
  builder = shapes.build(tmp_path_factory.mktemp("shapes64"), 64, **TINY)
  return builder, _read_all(builder)


def test_builds_and_reads_without_tensorflow(tiny32):
  builder, examples = tiny32
  assert builder.info.file_format.value == "array_record"
  assert {s: len(v) for s, v in examples.items()} == {
      "train": 48, "test": 16, "compositional": 16}
  # TFDS imports TensorFlow lazily, only if some code path asks for it.
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("fixture, resolution", [("tiny32", 32), ("tiny64", 64)])
def test_images_and_features(request, fixture, resolution):
  builder, examples = request.getfixturevalue(fixture)
  assert builder.info.features["image"].shape == (resolution, resolution, 3)
  for ex in examples["train"] + examples["compositional"]:
    assert ex["image"].dtype == np.uint8
    assert ex["image"].shape == (resolution, resolution, 3)
    assert isinstance(ex["caption"], bytes)
    n = int(ex["num_shapes"])
    assert n in (1, 2)
    for key in ("color", "kind", "size", "x", "y"):
      assert len(ex["shapes"][key]) == n
    assert (int(ex["relation"]) == 0) == (n == 1)


def test_deterministic_across_builds(tiny32, tmp_path):
  builder, examples = tiny32
  again = shapes.Shapes(
      config=shapes.ShapesConfig(name="tiny32", resolution=32, **TINY),
      data_dir=tmp_path)
  again.download_and_prepare()
  for split in SPLITS:
    files = sorted(p.name for p in pathlib.Path(builder.data_dir).glob(
        f"*-{split}.array_record*"))
    assert files
    for name in files:  # same record files, byte for byte
      assert (pathlib.Path(builder.data_dir, name).read_bytes()
              == pathlib.Path(again.data_dir, name).read_bytes())
  for split, exs in _read_all(again).items():
    for a, b in zip(examples[split], exs, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
      assert a["caption"] == b["caption"]


def test_examples_are_order_independent_and_split_specific():
  a = shapes.make_example(0, "train", 7, 32, shapes.TRAIN_PAIRS)
  b = shapes.make_example(0, "train", 7, 32, shapes.TRAIN_PAIRS)
  c = shapes.make_example(0, "test", 7, 32, shapes.TRAIN_PAIRS)
  d = shapes.make_example(1, "train", 7, 32, shapes.TRAIN_PAIRS)
  assert a["image"] == b["image"] and a["caption"] == b["caption"]
  assert a["image"] != c["image"]
  assert a["image"] != d["image"]


def test_held_out_pairs_leave_every_colour_and_kind_in_train():
  assert shapes.COMPOSITIONAL_PAIRS <= shapes.ALL_PAIRS
  assert len(shapes.COMPOSITIONAL_PAIRS) == len(shapes.COLORS)  # 1 in 5
  assert {c for c, _ in shapes.TRAIN_PAIRS} == set(shapes.COLORS)
  assert {k for _, k in shapes.TRAIN_PAIRS} == set(shapes.KINDS)


def test_splits_respect_held_out_pairs(tiny32):
  _, examples = tiny32
  for split, exs in examples.items():
    for ex in exs:
      for s in shapes.spec_from_example(ex).shapes:
        held_out = (s.color, s.kind) in shapes.COMPOSITIONAL_PAIRS
        assert held_out == (split == "compositional"), (split, s)


def test_captions_name_every_shape_and_relation(tiny32):
  _, examples = tiny32
  relation_words = {"above": ("above",), "below": ("below", "under"),
                    "left of": ("left of",), "right of": ("right of",)}
  for ex in sum(examples.values(), []):
    text = ex["caption"].decode()
    spec = shapes.spec_from_example(ex)
    for s in spec.shapes:
      assert f"{s.color} {s.kind}" in text, (text, s)
    if spec.relation == "none":
      assert not any(w in text for ws in relation_words.values() for w in ws)
    else:
      assert any(w in text for w in relation_words[spec.relation]), text
      # Shape 0 is named first, so the relation reads in the stored direction.
      first, second = spec.shapes
      assert (text.index(f"{first.color} {first.kind}")
              < text.rindex(f"{second.color} {second.kind}"))


def test_canonical_caption():
  spec = shapes.SceneSpec(
      (shapes.ShapeSpec("red", "circle", "small", 0.5, 0.25),
       shapes.ShapeSpec("blue", "square", "large", 0.5, 0.75)), "above")
  assert shapes.caption(spec) == "a small red circle above a large blue square"
  single = shapes.SceneSpec((shapes.ShapeSpec("green", "star", "large", .5, .5),))
  assert shapes.caption(single) == "a large green star"


def test_stored_relation_matches_positions(tiny32):
  _, examples = tiny32
  for ex in sum(examples.values(), []):
    spec = shapes.spec_from_example(ex)
    if len(spec.shapes) == 2:
      assert shapes.relation_between(*spec.shapes) == spec.relation


def test_sampled_layouts_are_valid():
  counts = {r: 0 for r in shapes.RELATIONS}
  for i in range(2000):
    spec = shapes.sample_spec(np.random.default_rng([5, i]), shapes.ALL_PAIRS)
    counts[spec.relation] += 1
    for s in spec.shapes:  # inside the image
      half = shapes.SIZE_FRACTION[s.size] / 2
      assert half <= s.x <= 1 - half and half <= s.y <= 1 - half
    if len(spec.shapes) == 2:
      a, b = spec.shapes
      assert shapes.relation_between(a, b) == spec.relation
      dx, dy = abs(a.x - b.x), abs(a.y - b.y)
      primary, cross = (dy, dx) if spec.relation in ("above", "below") else (dx, dy)
      reach = (shapes.SIZE_FRACTION[a.size] + shapes.SIZE_FRACTION[b.size]) / 2
      assert primary > reach  # bounding boxes do not overlap
      assert cross <= 0.5 * primary + 1e-6  # the relation is unambiguous
  assert all(n > 200 for n in counts.values()), counts


@pytest.mark.parametrize("fixture, resolution", [("tiny32", 32), ("tiny64", 64)])
def test_rendered_colours_at_shape_centres(request, fixture, resolution):
  _, examples = request.getfixturevalue(fixture)
  for ex in examples["train"] + examples["compositional"]:
    image = ex["image"].astype(int)
    for s in shapes.spec_from_example(ex).shapes:
      centre = image[int(s.y * resolution), int(s.x * resolution)]
      assert np.abs(centre - shapes.COLOR_RGB[s.color]).max() <= 8, (s, centre)
    # Outside every bounding box (plus one pixel of anti-aliasing): background.
    centres = (np.arange(resolution) + 0.5) / resolution
    outside = np.ones((resolution, resolution), bool)
    for s in shapes.spec_from_example(ex).shapes:
      reach = shapes.SIZE_FRACTION[s.size] / 2 + 1 / resolution
      outside &= ~((np.abs(centres[:, None] - s.y) < reach)
                   & (np.abs(centres[None, :] - s.x) < reach))
    assert (image[outside] == shapes.BACKGROUND_RGB).all()


def test_render_matches_stored_image(tiny32):
  _, examples = tiny32
  ex = examples["test"][0]
  np.testing.assert_array_equal(
      shapes.render(shapes.spec_from_example(ex), 32), ex["image"])


def test_build_reuses_prepared_data(tmp_path):
  kwargs = dict(num_train=4, num_test=2, num_compositional=2)
  first = shapes.build(tmp_path, 32, **kwargs)
  record = next(pathlib.Path(first.data_dir).glob("*-train.array_record*"))
  mtime = record.stat().st_mtime_ns
  second = shapes.build(tmp_path, 32, **kwargs)
  assert second.data_dir == first.data_dir
  assert record.stat().st_mtime_ns == mtime
  assert len(second.as_data_source("train")) == 4


def test_make_config_names():
  assert shapes.make_config(32).name == "r32"
  assert shapes.make_config(64, seed=0).name == "r64"
  assert shapes.make_config(32, num_train=64, seed=2).name == "r32-train64-seed2"
  with pytest.raises(ValueError, match="unknown"):
    shapes.make_config(32, num_trian=3)


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("SD_JAX_DATA_DIR", "~/somewhere")
  assert shapes.default_data_dir() == os.path.expanduser("~/somewhere")
  monkeypatch.delenv("SD_JAX_DATA_DIR")
  assert shapes.default_data_dir().endswith(".cache/sd_jax/tensorflow_datasets")


def test_named_tiny_configs(data_dir):
  builder = shapes.build(data_dir, config="r64_tiny")
  assert builder.builder_config.name == "r64_tiny"
  assert builder.data_dir.startswith(data_dir)
  assert {s: builder.info.splits[s].num_examples for s in SPLITS} == {
      "train": 256, "test": 64, "compositional": 64}
  assert builder.as_data_source("train")[0]["image"].shape == (64, 64, 3)
  with pytest.raises(ValueError, match="unknown shapes config"):
    shapes.build(data_dir, config="r48")
  with pytest.raises(ValueError, match="not both"):
    shapes.build(data_dir, config="r32_tiny", seed=1)
