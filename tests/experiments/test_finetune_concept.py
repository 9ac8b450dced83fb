"""experiments/finetune_concept.py: the concept data, prompts, commands, scoring and report, with a fake model and
an oracle evaluator (no training here)."""

import json

import numpy as np
import pytest

from experiments import finetune_concept as fc
from sd_jax.data import shapes
from sd_jax.eval import shapes_eval as se

TRAIN_COLORS = [c for c in shapes.COLORS if c not in ("cyan", "white")]
CONCEPT_KINDS = shapes.KINDS + ("heart",)


def test_concept_folder(tmp_path):
  examples = fc.concept_examples("heart", "zq", 20, TRAIN_COLORS)
  assert examples == fc.concept_examples("heart", "zq", 20, TRAIN_COLORS)  # deterministic
  fc.write_concept_folder(tmp_path, examples, 32)
  lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
  assert [line["text"] for line in lines] == [c for _, c in examples]
  assert len(list(tmp_path.glob("*.png"))) == 20
  from sd_jax.data import folder
  source = folder.ImageFolderSource(str(tmp_path), folder.DEFAULT_SPLIT)  # what the fine-tune trainer reads
  assert len(source.file_names) == 20
  first = folder.load_rgb(str(tmp_path / lines[0]["file_name"]))
  np.testing.assert_array_equal(first, shapes.render(examples[0][0], 32))
  for spec, caption in examples:
    heart = next(s for s in spec.shapes if s.kind == "heart")
    assert heart.color in TRAIN_COLORS and " zq" in caption and "heart" not in caption
  assert 2 <= sum(len(s.shapes) == 2 for s, _ in examples) <= 12  # about 30 % two-shape scenes


def test_concept_prompts():
  examples = fc.concept_examples("heart", "zq", 20, TRAIN_COLORS)
  train = [c for _, c in examples]
  prompts = fc.concept_prompts("heart", "zq", 100, TRAIN_COLORS, exclude=train)
  assert prompts == fc.concept_prompts("heart", "zq", 100, TRAIN_COLORS, exclude=train)
  assert len(prompts) == 100 and sum(p.two_shapes for p in prompts) == 50
  canonical_train = {fc._canonical(c) for c in train}
  for p in prompts:
    named = se.parse_prompt(p.prompt, kinds=CONCEPT_KINDS, aliases={"zq": "heart"})
    assert named == se.prompt_pairs(p.spec)
    heart = next(s for s in p.spec.shapes if s.kind == "heart")
    assert p.seen_color == (heart.color in TRAIN_COLORS)
    if p.two_shapes:
      assert p.spec.shapes[0].color != p.spec.shapes[1].color
      assert se.parse_relation(p.prompt) == p.spec.relation != "none"
      assert fc._canonical(p.prompt) not in canonical_train
  ones = [p for p in prompts if not p.two_shapes]
  assert {p.spec.shapes[0].color for p in ones} == set(shapes.COLORS)  # every colour, the held-out ones too
  assert fc._canonical("there is a small red circle under a blue star") == fc._canonical(
      "a red circle below a large blue star")


def test_finetune_command():
  cmd = fc.finetune_command("dreambooth_lora", True, "/b", "/d", "/w", "a shape", ["--config.total_steps=5"])
  assert cmd[1:3] == ["-m", "sd_jax.main"]
  assert cmd[3].endswith("configs/finetune.py:method=dreambooth_lora,demo,base=/b,data=/d,prior=True")
  assert cmd[4:] == ["--workdir=/w", "--config.finetune.class_prompt=a shape", "--config.total_steps=5"]
  plain = fc.finetune_command("full", False, "/b", "/d", "/w", "a shape")
  assert plain[3].endswith(":method=full,demo,base=/b,data=/d") and len(plain) == 5
  assert fc.run_name("full", True) == "full_prior" and fc.run_name("full", False) == "full"


class FakePipe:
  """Renders, for each prompt, the scene `scenes` maps it to; prompts it does not know get a heart (a fine-tune
  whose concept leaked everywhere)."""

  def __init__(self, scenes, wrong_kind=None):
    self.scenes, self.wrong_kind = scenes, wrong_kind
    self.drawn = {}  # image bytes -> scene, for the oracle

  def generate(self, prompts, num_images=1, steps=25, guidance=4.0, seed=0, batch_size=None):
    images = []
    for prompt in prompts:
      spec = self.scenes.get(prompt)
      if spec is None:
        spec = shapes.SceneSpec((shapes.ShapeSpec("red", "heart", "large", 0.5, 0.5),))
      elif self.wrong_kind:
        spec = shapes.SceneSpec(tuple(shapes.ShapeSpec(s.color, self.wrong_kind if s.kind == "heart" else s.kind,
                                                       s.size, s.x, s.y) for s in spec.shapes), spec.relation)
      image = shapes.render(spec, 32)
      self.drawn[image.tobytes()] = spec
      images += [image] * num_images
    return np.stack(images)


class Oracle:
  """An evaluator that detects exactly what FakePipe drew."""

  def __init__(self, pipe, kinds):
    self.pipe, self.kinds, self.resolution = pipe, kinds, 32

  def score(self, images, prompts, aliases=None):
    named = [se.prompt_pairs(p, kinds=self.kinds, aliases=aliases) for p in prompts]
    detected = [{(s.color, s.kind): 1.0 for s in self.pipe.drawn[im.tobytes()].shapes if s.kind in self.kinds}
                for im in images]
    matches = np.array([all(p in d for p in n) for n, d in zip(named, detected)], bool)
    return se.ScoreResult(matches, named, detected)


def _old_prompts():
  data = {split: se.regenerate_split(split, 6, 32) for split in ("test", "compositional")}
  return ({split: d.captions for split, d in data.items()},
          {c: s for d in data.values() for c, s in zip(d.captions, d.specs)})


def test_score_model_with_a_fake_model():
  concept = fc.concept_prompts("heart", "zq", 12, TRAIN_COLORS)
  old, old_scenes = _old_prompts()
  settings = dict(word="zq", kind="heart", steps=2, guidance=1.0, seed=0)

  # A perfect fine-tune: every concept prompt drawn right, old prompts untouched.
  pipe = FakePipe({**{p.prompt: p.spec for p in concept}, **old_scenes})
  scores = fc.score_model(pipe, concept, old, Oracle(pipe, CONCEPT_KINDS), Oracle(pipe, shapes.KINDS), **settings)
  c = scores["concept"]
  assert (c["num_one_shape"], c["num_two_shapes"]) == (6, 6)
  for key in ("accuracy", "one_shape", "one_shape_seen", "one_shape_unseen", "two_shape", "two_shape_pairs",
              "two_shape_relation", "kind_shown", "colour_right"):
    assert c[key] == 1.0, key
  for split in ("test", "compositional"):
    assert scores[split]["accuracy"] == scores[split]["standard_accuracy"] == 1.0
    assert scores[split]["kind_leak"] == 0.0 and scores[split]["num_prompts"] == 6

  # The base: a circle where the prompt says zq, and a heart for every old prompt (as if it leaked).
  pipe = FakePipe({p.prompt: p.spec for p in concept}, wrong_kind="circle")
  scores = fc.score_model(pipe, concept, old, Oracle(pipe, CONCEPT_KINDS), Oracle(pipe, shapes.KINDS), **settings)
  c = scores["concept"]
  assert c["accuracy"] == c["kind_shown"] == 0.0 and c["two_shape_relation"] == 1.0  # right places, wrong shape
  assert scores["test"]["kind_leak"] == 1.0 and scores["test"]["accuracy"] == 0.0

  # Relations: the two-shape scenes drawn mirrored fail the relation half only.
  mirrored = {}
  for p in concept:
    if p.two_shapes:
      a, b = p.spec.shapes
      mirrored[p.prompt] = shapes.SceneSpec((shapes.ShapeSpec(a.color, a.kind, a.size, b.x, b.y),
                                             shapes.ShapeSpec(b.color, b.kind, b.size, a.x, a.y)), p.spec.relation)
  pipe = FakePipe({**{p.prompt: p.spec for p in concept}, **mirrored, **old_scenes})
  c = fc.score_model(pipe, concept, old, Oracle(pipe, CONCEPT_KINDS), Oracle(pipe, shapes.KINDS), **settings)[
      "concept"]
  assert c["one_shape"] == 1.0 and c["two_shape_pairs"] == 1.0 and c["two_shape_relation"] == c["two_shape"] == 0.0


def test_grid_prompts_and_markdown(tmp_path):
  concept = fc.concept_prompts("heart", "zq", 20, TRAIN_COLORS)
  old, old_scenes = _old_prompts()
  picks = fc.grid_prompts(concept, old)
  assert len(picks) == 10 and picks[6:] == old["test"][:2] + old["compositional"][:2]
  assert sum("zq" in p for p in picks) == 6
  pipe = FakePipe({**{p.prompt: p.spec for p in concept}, **old_scenes})
  fc.draw_grid(pipe, picks, tmp_path / "g.png", steps=2, guidance=1.0, seed=0, label="x")
  assert (tmp_path / "g.png").stat().st_size > 1000

  def model(acc, finetune=None):
    m = {"concept": dict.fromkeys(("accuracy", "one_shape", "one_shape_seen", "one_shape_unseen", "two_shape",
                                   "two_shape_pairs", "two_shape_relation", "kind_shown"), acc),
         "test": {"accuracy": 0.7, "standard_accuracy": 0.71, "kind_leak": 0.0},
         "compositional": {"accuracy": 0.6 - acc / 10, "standard_accuracy": 0.6, "kind_leak": 0.1}}
    if finetune:
      m["finetune"] = finetune
    return m
  results = {"settings": dict(word="zq", kind="heart", num_images=20, num_prompts=100, num_old_prompts=100, steps=25,
                              guidance=4.0, seed=0, class_prompt="a shape", heldout_colors=["cyan", "white"]),
             "concept_evaluator": {"novel_heart prompt": 0.99},
             "models": {"base": model(0.0),
                        "dreambooth_lora": model(0.5, {"wall_seconds": 120.4, "cpu_seconds": 200.0,
                                                       "bytes": {"diffusers_lora": 3 * 1024}}),
                        "full": model(0.8, {"wall_seconds": 300, "cpu_seconds": 500,
                                            "bytes": {"model_unet": 5 * 2 ** 20}})}}
  table = fc.markdown(results)
  assert "| base | – | – | 0.00 |" in table
  assert "| dreambooth_lora | 120 s / 200 s | 3.0 KiB | 0.50 |" in table and "0.55 (-0.05)" in table
  assert "none (U-Net 5.00 MiB)" in table and "0.52 (-0.08)" in table
  assert "novel_heart prompt 0.990" in table


def test_bad_flags():
  for argv in (["--methods", "nope"], ["--heldout_colors", "orange"], ["--heldout_colors", ",".join(shapes.COLORS)]):
    with pytest.raises(SystemExit, match="error"):
      fc.main(["--base", "b", "--out", "o", *argv])
