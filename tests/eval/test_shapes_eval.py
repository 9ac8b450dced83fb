"""Shapes evaluator: prompt parsing, a short training that already reads real images, save/load, input checks."""

import json

import numpy as np
import pytest

from sd_jax.data import shapes
from sd_jax.eval import shapes_eval as se

# A short training. After 200 steps it measured 0.985-1.0 prompt accuracy on both real splits (seeds 0-2; 150
# steps: 0.96-0.995), so the threshold below leaves a wide margin. The full default reaches 0.999-1.0.
SHORT = se.TrainConfig(steps=200, batch_size=32, seed=0)
MIN_SHORT_ACCURACY = 0.9


@pytest.fixture(scope="module")
def untrained():
  """An evaluator with freshly initialised weights: enough for input checks and serialisation."""
  import flax.linen as nn
  import jax
  model = se.ShapesClassifier()
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))["params"])
  return se.ShapesEvaluator(jax.device_get(params), model=model)


@pytest.fixture(scope="module")
def real():
  return {split: se.regenerate_split(split, 200, 32) for split in ("test", "compositional")}


def test_parse_prompt_every_caption_variant():
  rng = np.random.default_rng(0)
  for _ in range(300):
    spec = shapes.sample_spec(rng, shapes.ALL_PAIRS)
    want = [(s.color, s.kind) for s in spec.shapes]
    assert se.parse_prompt(shapes.caption(spec)) == want
    varied = shapes.caption(spec, rng)
    assert se.parse_prompt(varied) == want, varied
    assert se.parse_prompt(varied.upper()) == want
  assert se.parse_prompt("two red circles and a large Blue crosses") == [("red", "circle"), ("blue", "cross")]
  spec = shapes.sample_spec(np.random.default_rng(1), shapes.ALL_PAIRS, num_shapes=2)
  assert se.prompt_pairs(spec) == [(s.color, s.kind) for s in spec.shapes]
  assert se.prompt_pairs([("white", "star")]) == [("white", "star")]


@pytest.mark.parametrize("prompt", ["", "a photo of a cat", "a red thing above a blue square", "a circle",
                                    "a red circle and green"])
def test_parse_prompt_rejects_what_it_cannot_check(prompt):
  with pytest.raises(ValueError, match="cannot check prompt"):
    se.parse_prompt(prompt)
  with pytest.raises(ValueError, match="unknown .colour, kind. pairs"):
    se.prompt_pairs([("orange", "circle")])


def test_regenerated_splits_are_the_dataset(data_dir):
  """The report's images are exactly a built split's examples (TFDS stores them in a shuffled key order)."""
  builder = shapes.build(data_dir, config="r32_tiny")  # seed 0, like the named configs the report stands for
  for split in ("test", "compositional"):
    stored = se.load_split(builder, split)
    again = se.regenerate_split(split, len(stored.captions), 32)

    def examples(data):
      return sorted((c, im.tobytes(), [(s.color, s.kind, s.size) for s in spec.shapes], spec.relation)
                    for c, im, spec in zip(data.captions, data.images, data.specs, strict=True))
    assert examples(stored) == examples(again)


def test_training_stream_covers_every_pair():
  """The evaluator learns the held-out compositional pairs too: it measures models, it is not one under test."""
  images, labels = se.render_batch(np.random.default_rng(0), 400, 32, empty_fraction=0.05, blob_fraction=0.05)
  assert images.shape == (400, 32, 32, 3) and images.dtype == np.uint8
  seen = {se.PAIRS[j] for j in np.flatnonzero(labels.sum(0))}
  assert seen == set(shapes.ALL_PAIRS) and shapes.COMPOSITIONAL_PAIRS <= seen
  nothing = labels.sum(1) == 0  # empty and blob images: "nothing present"
  assert 20 <= nothing.sum() <= 60 and images[nothing].any()  # the blobs are not black


def test_short_training_reads_real_images(real, tmp_path):
  # One test trains (not a fixture): under `pytest -n auto` a module fixture would train once per worker.
  evaluator, losses = se.fit(SHORT)
  assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:20])
  for split, data in real.items():
    metrics = se.evaluate_real(evaluator, data)
    assert metrics["prompt_accuracy"] >= MIN_SHORT_ACCURACY, (split, metrics)
    # Chance would accept a wrong prompt as often as the true one; these are rejected almost always.
    for key in ("mismatch_rejection", "attribute_swap_rejection", "binding_swap_rejection", "garbage_rejection"):
      assert metrics[key] >= 0.9, (split, key, metrics)

  data = real["compositional"]
  result = evaluator.score(data.images[:32], data.specs[:32])
  assert result.matches.dtype == bool and result.matches.shape == (32,)
  assert result.accuracy == pytest.approx(result.matches.mean()) and result.accuracy >= MIN_SHORT_ACCURACY
  assert result.named == [se.prompt_pairs(s) for s in data.specs[:32]]
  assert evaluator.predict(data.images[:32]) == result.detected
  assert all(p > evaluator.threshold for d in result.detected for p in d.values())
  # Float input in [-1, 1] and 64×64 images (box-downsampled) read like uint8 32×32 ones.
  as_float = evaluator.probabilities(data.images[:8].astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(as_float, evaluator.probabilities(data.images[:8]), atol=1e-5)
  big = se.regenerate_split("compositional", 32, 64)
  assert evaluator.score(big.images, big.captions).accuracy >= MIN_SHORT_ACCURACY
  # exact=True also rejects extra shapes: two-shape images scored against their first shape only.
  two = [i for i, s in enumerate(data.specs) if len(set(se.prompt_pairs(s))) == 2][:8]
  first_only = [[se.prompt_pairs(data.specs[i])[0]] for i in two]
  assert evaluator.score(data.images[two], first_only).matches.mean() >= 0.75
  assert not evaluator.score(data.images[two], first_only, exact=True).matches.any()

  se.save_evaluator(evaluator, tmp_path)
  loaded = se.load_evaluator(tmp_path)
  np.testing.assert_array_equal(loaded.probabilities(real["test"].images), evaluator.probabilities(real["test"].images))


def test_save_load_round_trip(untrained, real, tmp_path):
  se.save_evaluator(untrained, tmp_path)
  loaded = se.load_evaluator(tmp_path)
  images = real["test"].images[:40]
  np.testing.assert_array_equal(loaded.probabilities(images), untrained.probabilities(images))
  assert loaded.model == untrained.model
  assert (loaded.resolution, loaded.threshold) == (untrained.resolution, untrained.threshold)
  with pytest.raises(FileExistsError, match="already holds weights"):
    se.save_evaluator(untrained, tmp_path)
  se.save_evaluator(untrained, tmp_path, overwrite=True)


@pytest.mark.parametrize("images, match", [
    (np.zeros((32, 32, 3), np.uint8), r"\[N, H, W, 3\].*add a batch axis"),
    (np.zeros((2, 32, 32, 4), np.uint8), r"\[N, H, W, 3\]"),
    (np.zeros((2, 32, 48, 3), np.uint8), r"square"),
    (np.full((2, 32, 32, 3), 200.0, np.float32), r"\[-1, 1\].*pass uint8"),
    (np.zeros((2, 32, 32, 3), np.int32), r"dtype int32"),
    (np.full((1, 32, 32, 3), np.nan, np.float32), r"NaN"),
])
def test_bad_images_fail_clearly(untrained, images, match):
  with pytest.raises(ValueError, match=match):
    untrained.predict(images)


def test_prompt_count_must_match(untrained, real):
  with pytest.raises(ValueError, match="4 images but 3 prompts"):
    untrained.score(real["test"].images[:4], real["test"].captions[:3])


def test_breakdown_locates_the_misses():
  """Per-prompt-type accuracy and per-shape recalls, from hand-made detections."""
  result = se.ScoreResult(
      matches=np.array([True, False, False, True]),
      named=[[("red", "circle")], [("blue", "star")], [("red", "square"), ("green", "cross")],
             [("white", "star"), ("cyan", "circle")]],
      detected=[{("red", "circle"): 0.9}, {("blue", "cross"): 0.8}, {("red", "square"): 0.9, ("green", "star"): 0.7},
                {("white", "star"): 0.9, ("cyan", "circle"): 0.6}])
  b = result.breakdown()
  assert b["accuracy_one_shape"] == 0.5 and b["accuracy_two_shapes"] == 0.5
  assert b["shape_recall"] == 4 / 6       # red circle, red square, white star, cyan circle
  assert b["colour_recall"] == 1.0        # every named colour is there (blue as a cross, green as a star)
  assert b["kind_recall"] == 4 / 6        # the star and the cross are missing in their images
  assert np.isnan(se.ScoreResult(np.array([True]), [[("red", "circle")]], [{}]).breakdown()["accuracy_two_shapes"])


def test_command_line_writes_weights_and_report(tmp_path, capsys):
  out = tmp_path / "ev"
  se.main(["--out", str(out), "--steps", "3", "--batch_size", "8", "--eval_examples", "8"])
  printed = capsys.readouterr().out
  assert "r32 test" in printed and "r64 compositional" in printed
  report = json.loads((out / se.REPORT_FILE).read_text())
  assert report["train"]["steps"] == 3
  for res in ("r32", "r64"):
    for split in ("test", "compositional"):
      assert set(report["real"][res][split]) >= {"prompt_accuracy", "mismatch_rejection", "exact_set_accuracy"}
  assert se.load_evaluator(out).resolution == 32
  with pytest.raises(SystemExit):  # refuses to replace it without --overwrite
    se.main(["--out", str(out), "--steps", "3", "--batch_size", "8", "--eval_examples", "8"])
  with pytest.raises(SystemExit):
    se.main(["--steps", "3"])
  assert "--out is required" in capsys.readouterr().err
