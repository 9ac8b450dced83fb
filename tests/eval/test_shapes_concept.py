"""A novel kind for fine-tuning experiments: the renderer draws it, the dataset never uses it, and the extended
evaluator (ConceptClassifier) learns, parses and scores it; relations are checked by colour."""

import dataclasses
import json

import numpy as np
import pytest

from sd_jax.data import shapes
from sd_jax.eval import shapes_eval as se

CONCEPT_KINDS = shapes.KINDS + shapes.NOVEL_KINDS


def test_novel_kind_renders_and_the_dataset_never_uses_it(tmp_path):
  assert shapes.NOVEL_KINDS and not set(shapes.NOVEL_KINDS) & set(shapes.KINDS)
  assert not any(k in shapes.NOVEL_KINDS for _, k in shapes.ALL_PAIRS | shapes.TRAIN_PAIRS | shapes.COMPOSITIONAL_PAIRS)
  # The stored format: the dataset's kind labels are KINDS, unchanged.
  features = shapes.Shapes(config="r32_tiny", data_dir=str(tmp_path))._info().features
  assert tuple(features["shapes"]["kind"].names) == shapes.KINDS
  for split, pairs in (("train", shapes.TRAIN_PAIRS), ("test", shapes.TRAIN_PAIRS),
                       ("compositional", shapes.COMPOSITIONAL_PAIRS)):
    for i in range(20):
      assert not set(shapes.make_example(0, split, i, 32, pairs)["shapes"]["kind"]) & set(shapes.NOVEL_KINDS)
  for kind in shapes.NOVEL_KINDS:
    spec = shapes.SceneSpec((shapes.ShapeSpec("red", kind, "large", 0.5, 0.5),))
    image = shapes.render(spec, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    area = (image.max(-1) > 100).mean()
    assert 0.1 < area < 0.25  # a large shape: 46 % of the side, about a circle's area
    for other in shapes.KINDS:  # a shape of its own
      other_image = shapes.render(dataclasses.replace(spec, shapes=(dataclasses.replace(spec.shapes[0], kind=other),)),
                                  32)
      assert np.abs(image.astype(int) - other_image).mean() > 3, other
    assert (image[..., 0] > 100).any() and image[..., 1].max() < 60  # red on black


def test_novel_scenes_and_concept_captions():
  specs = shapes.novel_scenes(40, "heart", seed=3, colors=("red", "blue"), two_shape_fraction=0.5)
  assert specs == shapes.novel_scenes(40, "heart", seed=3, colors=("red", "blue"), two_shape_fraction=0.5)
  assert specs != shapes.novel_scenes(40, "heart", seed=4, colors=("red", "blue"), two_shape_fraction=0.5)
  assert 10 <= sum(len(s.shapes) == 2 for s in specs) <= 30
  for spec in specs:
    hearts = [s for s in spec.shapes if s.kind == "heart"]
    assert len(hearts) == 1 and hearts[0].color in ("red", "blue")
    if len(spec.shapes) == 2:
      other = next(s for s in spec.shapes if s.kind != "heart")
      assert (other.color, other.kind) in shapes.TRAIN_PAIRS
      assert spec.relation == shapes.relation_between(*spec.shapes)
    else:
      assert spec.relation == "none"
    shapes.render(spec, 32)
    caption = shapes.concept_caption(spec, "zq")
    assert "zq" in caption and "heart" not in caption
    assert se.parse_prompt(caption, kinds=CONCEPT_KINDS, aliases={"zq": "heart"}) == se.prompt_pairs(spec)
  one = next(s for s in specs if len(s.shapes) == 1)
  assert shapes.concept_caption(one, "zq") == f"a {one.shapes[0].size} {one.shapes[0].color} zq"
  with pytest.raises(ValueError, match="cannot draw"):
    shapes.novel_scenes(1, "hexagon")
  with pytest.raises(ValueError, match="one word"):
    shapes.concept_caption(one, "two words")


def test_parse_prompt_with_novel_kinds_and_aliases():
  # The default evaluator knows the dataset's kinds only: a heart or a rare token is a prompt it cannot check.
  for prompt in ("a red heart", "a red zq above a blue square"):
    with pytest.raises(ValueError, match="cannot check prompt"):
      se.parse_prompt(prompt)
  assert se.parse_prompt("two Red Hearts under a green circle", kinds=CONCEPT_KINDS) == [
      ("red", "heart"), ("green", "circle")]
  assert se.parse_prompt("a small red zq above a blue square", kinds=CONCEPT_KINDS, aliases={"zq": "heart"}) == [
      ("red", "heart"), ("blue", "square")]
  with pytest.raises(ValueError, match="cannot check prompt"):
    se.parse_prompt("a red zq", kinds=CONCEPT_KINDS)  # the token only reads as the kind through aliases
  with pytest.raises(ValueError, match="aliases"):
    se.parse_prompt("a red zq", kinds=CONCEPT_KINDS, aliases={"zq": "hexagon"})
  assert se.prompt_pairs([("white", "heart")], kinds=CONCEPT_KINDS) == [("white", "heart")]
  with pytest.raises(ValueError, match="unknown .colour, kind. pairs"):
    se.prompt_pairs([("white", "heart")])


def test_default_evaluator_is_unchanged():
  model = se.ShapesClassifier()
  assert model.kind_names == shapes.KINDS
  assert "kinds" not in se._module_fields(model)
  evaluator = se.ShapesEvaluator(None, model=model)
  assert evaluator.pairs == se.PAIRS and evaluator.config_fields()["pairs"] == [list(p) for p in se.PAIRS]
  _, labels = se.render_batch(np.random.default_rng(0), 16, 32)
  assert labels.shape == (16, len(se.PAIRS))
  images, labels = se.render_batch(np.random.default_rng(0), 300, 32, kinds=CONCEPT_KINDS)
  assert labels.shape == (300, len(shapes.COLORS) * len(CONCEPT_KINDS))
  hearts = labels.reshape(300, len(shapes.COLORS), len(CONCEPT_KINDS))[:, :, -1]
  assert 0.05 < hearts.sum() / labels.sum() < 0.3  # about one shape in six


def test_concept_evaluator_trains_scores_saves_and_reports(tmp_path):
  """A tiny training run: the API end to end (the accuracy of a real run is in its report, RESULTS.md)."""
  model = se.ConceptClassifier()
  assert model.kind_names == CONCEPT_KINDS
  report = se.train_evaluator(tmp_path, model=model, steps=4, batch_size=8, eval_examples=8, eval_resolutions=(32,))
  novel = report.real["r32"]["novel_heart"]
  assert set(novel) >= {"prompt_accuracy", "attribute_swap_rejection", "relation_accuracy", "num_relations"}
  assert novel["num_relations"] > 0 and novel["relation_accuracy"] == 1.0  # ground truth: by colour, exact
  assert "novel_heart" in report.summary() and "relation 1.000" in report.summary()
  stored = json.loads((tmp_path / se.REPORT_FILE).read_text())
  assert "novel_heart" in stored["real"]["r32"]

  evaluator = se.load_evaluator(tmp_path)
  assert isinstance(evaluator.model, se.ConceptClassifier) and evaluator.kinds == CONCEPT_KINDS
  data = se.novel_split("heart", 6, 32)
  probs = evaluator.probabilities(data.images)
  assert probs.shape == (6, len(shapes.COLORS), len(CONCEPT_KINDS))
  prompts = [c.replace("heart", "zq") for c in data.captions]
  result = evaluator.score(data.images, prompts, aliases={"zq": "heart"})
  assert result.named == [se.prompt_pairs(s) for s in data.specs]
  assert result.matches.shape == (6,)
  assert all(set(d) <= set(evaluator.pairs) for d in result.detected)
  # A hand-set classifier output: the scoring reads the heart column.
  evaluator.probabilities = lambda images: np.eye(len(CONCEPT_KINDS))[None, None, -1].repeat(
      len(shapes.COLORS), 1).repeat(len(images), 0)  # every colour: heart only
  assert evaluator.score(data.images[:1], ["a cyan zq"], aliases={"zq": "heart"}).matches.all()
  assert not evaluator.score(data.images[:1], ["a cyan circle"]).matches.any()

  with pytest.raises(ValueError, match="retrain"):  # a default evaluator's config cannot load these weights
    fields = json.loads((tmp_path / se.COMPONENT / "config.json").read_text())
    fields["model"].pop("kinds")
    (tmp_path / se.COMPONENT / "config.json").write_text(json.dumps(fields))
    se.load_evaluator(tmp_path)


def test_check_relations_on_ground_truth():
  data = se.novel_split("heart", 60, 32)
  two = [i for i, s in enumerate(data.specs) if len(s.shapes) == 2 and s.shapes[0].color != s.shapes[1].color]
  result = se.check_relations(data.images, data.captions, kinds=CONCEPT_KINDS)
  assert result.checked.sum() == len(two) >= 15 and result.accuracy == 1.0
  flip = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
  wrong = [shapes.caption(dataclasses.replace(data.specs[i], relation=flip[data.specs[i].relation]))
           for i in two]
  assert not se.check_relations(data.images[two], wrong, kinds=CONCEPT_KINDS).holds.any()
  assert [se.parse_relation(c) for c in ("a red circle under a blue star", "a red circle to the left of a blue star",
                                         "a red circle")] == ["below", "left of", "none"]
  # A colour that is not in the image fails; one-shape and same-colour prompts are not checked.
  spec = data.specs[two[0]]
  other = next(c for c in shapes.COLORS if c not in {s.color for s in spec.shapes})
  missing = shapes.caption(dataclasses.replace(spec, shapes=(dataclasses.replace(spec.shapes[0], color=other),
                                                             spec.shapes[1])))
  same = shapes.caption(dataclasses.replace(spec, shapes=(spec.shapes[0], dataclasses.replace(
      spec.shapes[1], color=spec.shapes[0].color))))
  r = se.check_relations(data.images[[two[0]] * 3], [missing, same, "a red heart"], kinds=CONCEPT_KINDS)
  assert r.checked.tolist() == [True, False, False] and not r.holds.any()
