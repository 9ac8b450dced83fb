"""experiments/feedback_loop.py: the stand-in rater votes through a real gallery server (uvicorn on a local port)
what an oracle evaluator sees, every pair once; the gain and its paired standard error; the report."""


import numpy as np
import pytest

from experiments import feedback_loop as fl
from sd_jax.data import shapes
from sd_jax.feedback import server
from sd_jax.feedback import store as store_lib
from tests import helpers
from tests.experiments.test_finetune_concept import Oracle


class Drawn:
  """What the oracle needs: the scene behind every rendered image."""

  def __init__(self):
    self.drawn = {}

  def render(self, *specs):
    spec = shapes.SceneSpec(tuple(shapes.ShapeSpec(c, k, "large", x, 0.5) for c, k, x in specs))
    image = shapes.render(spec, 32)
    self.drawn[image.tobytes()] = spec
    return image


def test_choose():
  drawn = Drawn()
  oracle = Oracle(drawn, shapes.KINDS)
  red_circle, blue_circle = drawn.render(("red", "circle", 0.5)), drawn.render(("blue", "circle", 0.5))
  assert fl.choose("a red circle", [red_circle, blue_circle], oracle) == "a"
  assert fl.choose("a red circle", [blue_circle, red_circle], oracle) == "b"
  assert fl.choose("a red circle", [red_circle, red_circle], oracle) == "tie"
  assert fl.choose("a green star", [red_circle, blue_circle], oracle) == "both_bad"
  # Neither matches "a red circle left of a green star", but one has one of the two shapes right.
  half = drawn.render(("red", "circle", 0.3), ("blue", "star", 0.7))
  assert fl.choose("a red circle to the left of a green star", [blue_circle, half], oracle) == "b"


@pytest.fixture
def gallery(tmp_path):
  """A gallery server over a store of rendered images: 2 prompts × 3 images (one of each prompt drawn wrong)."""
  drawn = Drawn()
  store = store_lib.FeedbackStore(tmp_path / "feedback.sqlite")
  model = store.add_model("/models/shapes", "0" * 64)
  expected = {}
  for p, (prompt, right, wrong) in enumerate((("a red circle", ("red", "circle", 0.5), ("blue", "square", 0.5)),
                                              ("a green star", ("green", "star", 0.5), ("green", "circle", 0.5)))):
    ids = []
    for i, spec in enumerate((right, right, wrong)):
      file = f"{p}_{i}.png"
      from sd_jax import images as images_lib
      images_lib.save_png(drawn.render(spec), store.image_path(file))
      ids.append(store.add_image(prompt, model, 0, {"index": i}, file))
    # The pairs: (right, right) a tie; (right, wrong) for the right one, whichever side it is on.
    expected.update({(ids[0], ids[1]): "tie", (ids[0], ids[2]): "a", (ids[1], ids[2]): "a"})
  with helpers.serving(server.create_app(store, token="tok")) as url:
    yield fl.Gallery(url, "tok"), Oracle(drawn, shapes.KINDS), store, expected

def test_rate_all_votes_every_pair_once_through_the_http_api(gallery):
  client, oracle, store, expected = gallery

  class Running:
    def poll(self):
      return None

  counts = fl.rate_all(client, oracle, Running(), poll_s=0.01)
  assert counts == {"a": 4, "b": 0, "tie": 2, "both_bad": 0}
  votes = store.votes()
  assert len(votes) == 6 and {v.rater for v in votes} == {fl.RATER}
  got = {}
  for v in votes:  # the server may offer a pair either way round
    key = (min(v.image_a, v.image_b), max(v.image_a, v.image_b))
    got[key] = v.choice if v.choice == "tie" or v.image_a == key[0] else {"a": "b", "b": "a"}[v.choice]
  assert got == expected
  assert client.get(f"/api/progress?rater={fl.RATER}")["pairs_left"] == 0
  # The trainer's view of these votes: 4 preferences (the ties carry none), the right image first.
  pairs = store_lib.read_pairs(store.path)
  assert len(pairs) == 6 and sum(label != 0.5 for *_, label in pairs) == 4


def test_a_stopped_server_is_reported():
  class Stopped:
    returncode = 3

    def poll(self):
      return 3

  with pytest.raises(SystemExit, match=r"exited \(3\)"):
    fl.rate_all(fl.Gallery("http://127.0.0.1:1", "x"), None, Stopped())


def test_gain_and_markdown():
  before = [[1, 0], [0, 0], [1, 1], [0, 1]]
  after = [[1, 1], [1, 0], [1, 1], [0, 1]]
  g = fl.gain(before, after)
  d = np.array([0.5, 0.5, 0.0, 0.0])
  assert g["before"] == 0.5 and g["after"] == 0.75 and g["gain"] == 0.25 and g["num_prompts"] == 4
  np.testing.assert_allclose(g["se"], d.std(ddof=1) / 2)
  results = {"settings": {"num_prompts": 256, "images_per_prompt": 4, "num_eval_prompts": 250, "seeds": [0, 1],
                          "steps": 25, "guidance": 4.0},
             "votes": {"counts": {"a": 10, "b": 12, "tie": 5, "both_bad": 3}, "wall_seconds": 100.0,
                       "server_cpu_seconds": 150.0, "rater_cpu_seconds": 20.0},
             "runs": {"dpo_lora": {"train": {"wall_seconds": 60.0, "cpu_seconds": 90.0},
                                   "gain": {"test": g, "compositional": g}}},
             "command": "python -m experiments.feedback_loop --base B --out O"}
  text = fl.markdown(results)
  assert "30 votes by the stand-in rater (22 preferences, 5 ties, 3 both bad)" in text
  assert "| dpo_lora | 60 s / 90 s | 0.500 → 0.750 | +0.250 ± 0.144 |" in text
  assert "    python -m experiments.feedback_loop --base B --out O" in text

