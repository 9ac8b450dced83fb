"""The preference store and the rating gallery's HTTP API (sd_jax/feedback): votes land in SQLite, none is lost
under concurrent raters, a restart continues, the token guards a shared server, bad requests get 4xx JSON and no
traceback, image paths cannot leave the images folder, and the export is Pick-a-Pic's layout."""

import concurrent.futures
import io
import json

import numpy as np
import pytest
from PIL import Image

from fastapi.testclient import TestClient

from sd_jax.feedback import server
from sd_jax.feedback import store as store_lib

PROMPTS = ["a red circle", "a blue square", "a green star"]


def fill(store: store_lib.FeedbackStore, images_per_prompt: int = 3) -> dict[str, list[int]]:
  """Writes small PNGs as a worker would and records them: {prompt: [image ids]}."""
  model = store.add_model("/models/test", "abc123")
  ids = {}
  for p, prompt in enumerate(PROMPTS):
    ids[prompt] = []
    for i in range(images_per_prompt):
      file = f"p{p}_{i}.png"
      Image.fromarray(np.full((8, 8, 3), 40 * i + 10 * p, np.uint8)).save(store.image_path(file))
      ids[prompt].append(store.add_image(prompt, model, 0, {"steps": 2, "index": i}, file))
  return ids


@pytest.fixture
def store(tmp_path):
  s = store_lib.FeedbackStore(tmp_path / "feedback.sqlite")
  fill(s)
  return s


def test_pairs_votes_favourites_and_progress(store):
  client = TestClient(server.create_app(store))
  assert "<title>sd_jax ratings</title>" in client.get("/").text
  pair = client.get("/api/pair", params={"rater": "ann"}).json()
  assert not pair["done"] and pair["a"]["prompt"] == pair["b"]["prompt"] == pair["prompt"]
  png = client.get(pair["a"]["url"])
  assert png.status_code == 200 and png.headers["content-type"] == "image/png"
  assert Image.open(io.BytesIO(png.content)).size == (8, 8)
  response = client.post("/api/vote", json={"image_a": pair["a"]["id"], "image_b": pair["b"]["id"], "choice": "b",
                                            "rater": "ann"})
  assert response.status_code == 200 and response.json()["progress"]["my_votes"] == 1
  (vote,) = store.votes()
  assert (vote.image_a, vote.image_b, vote.choice, vote.rater, vote.prompt) == (
      pair["a"]["id"], pair["b"]["id"], "b", "ann", pair["prompt"])
  again = client.get("/api/pair", params={"rater": "ann"}).json()
  assert {again["a"]["id"], again["b"]["id"]} != {pair["a"]["id"], pair["b"]["id"]}  # never the same pair twice
  assert client.get("/api/pair", params={"rater": "bob"}).json()["a"]["id"] is not None
  assert client.post("/api/favourite", json={"image_id": pair["a"]["id"], "rater": "ann"}).json() == {"ok": True}
  gallery = client.get("/api/gallery", params={"rater": "ann"}).json()["images"]
  assert len(gallery) == 9 and [g["favourite"] for g in gallery].count(True) == 1
  progress = client.get("/api/progress", params={"rater": "ann"}).json()
  assert progress == {"images": 9, "votes": 1, "my_votes": 1, "pairs": 9, "pairs_left": 8, "favourites": 1,
                      "queued": 0}
  # Every pair rated: done.
  while not (pair := client.get("/api/pair", params={"rater": "ann"}).json())["done"]:
    client.post("/api/vote", json={"image_a": pair["a"]["id"], "image_b": pair["b"]["id"], "choice": "tie",
                                   "rater": "ann"})
  assert len(store.votes()) == 9


def test_bad_requests_get_4xx_json_and_no_traceback(store, monkeypatch):
  client = TestClient(server.create_app(store), raise_server_exceptions=False)
  ids = [i.id for i in store.images()]
  cases = [
      (client.post("/api/vote", json={"image_a": ids[0], "image_b": 999, "choice": "a", "rater": "x"}), 404, "999"),
      (client.post("/api/vote", json={"image_a": ids[0], "image_b": ids[1], "choice": "maybe", "rater": "x"}), 400,
       "choice 'maybe'"),
      (client.post("/api/vote", json={"image_a": ids[0], "image_b": ids[3], "choice": "a", "rater": "x"}), 400,
       "different prompts"),
      (client.post("/api/vote", json={"image_a": "one", "choice": "a"}), 422, "bad request"),
      (client.post("/api/vote", content=b"{not json", headers={"content-type": "application/json"}), 422,
       "bad request"),
      (client.get("/images/..%2F..%2Ffeedback.sqlite"), 404, "Not Found"),  # no route takes a path
      (client.get("/images/..%5Cfeedback.sqlite"), 404, "no image"),
      (client.get("/images/12345.png"), 404, "no image"),
      (client.get("/api/gallery", params={"limit": 0}), 400, "limit"),
      (client.post("/api/favourite", json={"image_id": 4242, "rater": "x"}), 404, "4242"),
  ]
  for response, status, message in cases:
    assert response.status_code == status, (response.request.url, response.text)
    assert message in response.json()["error"] and "Traceback" not in response.text
  with pytest.raises(ValueError, match="outside the images folder"):
    store.image_path("../feedback.sqlite")
  monkeypatch.setattr(store, "progress", lambda rater=None: 1 / 0)
  response = client.get("/api/progress")
  assert response.status_code == 500 and response.json() == {"error": "internal error (see the server's log)"}
  assert not store.votes()  # nothing recorded by any of them


def test_token_is_required_when_set(store):
  client = TestClient(server.create_app(store, token="s3cret"))
  assert client.get("/").status_code == 401 and "token" in client.get("/api/progress").json()["error"]
  assert client.get("/", params={"token": "wrong"}).status_code == 401
  assert client.get("/", params={"token": "s3cret"}).status_code == 200
  assert client.get("/api/progress", headers={"X-Token": "s3cret"}).status_code == 200
  assert client.get("/api/progress", headers={"Authorization": "Bearer s3cret"}).status_code == 200
  image_id = store.images()[0].id
  assert client.get(f"/images/{image_id}.png", params={"token": "s3cret"}).status_code == 200


def test_concurrent_raters_lose_no_vote_and_a_restart_continues(store, tmp_path):
  apps = [TestClient(server.create_app(store_lib.FeedbackStore(store.path))) for _ in range(4)]  # 4 "servers"
  ids = {prompt: [i.id for i in store.images() if i.prompt == prompt] for prompt in PROMPTS}
  votes = [(prompt, a, b, rater) for prompt in PROMPTS for a, b in ((0, 1), (0, 2), (1, 2))
           for rater in ("r1", "r2", "r3", "r4", "r5")]

  def send(k):
    prompt, a, b, rater = votes[k]
    response = apps[k % 4].post("/api/vote", json={"image_a": ids[prompt][a], "image_b": ids[prompt][b],
                                                   "choice": "a", "rater": rater})
    return response.status_code

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    assert set(pool.map(send, range(len(votes)))) == {200}
  assert len(store_lib.FeedbackStore(store.path).votes()) == len(votes) == 45
  # A restarted server (a new store on the same file) continues where it was.
  restarted = TestClient(server.create_app(store_lib.FeedbackStore(store.path)))
  assert restarted.get("/api/progress", params={"rater": "r1"}).json()["my_votes"] == 9
  assert restarted.get("/api/pair", params={"rater": "r1"}).json()["done"]


def test_export_is_pick_a_pic_layout(store, tmp_path):
  ids = {prompt: [i.id for i in store.images() if i.prompt == prompt] for prompt in PROMPTS}
  store.record_vote(ids["a red circle"][0], ids["a red circle"][1], "a", "ann")
  store.record_vote(ids["a blue square"][2], ids["a blue square"][0], "b", "ann")
  store.record_vote(ids["a green star"][0], ids["a green star"][1], "tie", "ann")
  store.record_vote(ids["a green star"][1], ids["a green star"][2], "both_bad", "ann")
  out = tmp_path / "prefs.parquet"
  assert store_lib.export_parquet(store, out) == 3
  pairs = store_lib.read_pairs(out)
  assert [(c, label) for c, _, _, label in pairs] == [("a red circle", 1.0), ("a blue square", 0.0),
                                                     ("a green star", 0.5)]
  first = store.image(ids["a red circle"][0])
  assert pairs[0][1] == open(store.image_path(first.file), "rb").read()
  assert [(c, label) for c, _, _, label in store_lib.read_pairs(store.path)] == [(c, label) for c, _, _, label in pairs]
  from sd_jax.feedback import __main__ as feedback_cli
  assert feedback_cli.main(["export", "--db", store.path, "--out", str(tmp_path / "cli.parquet"), "--noties"]) == 0
  assert len(store_lib.read_pairs(tmp_path / "cli.parquet")) == 2
  with pytest.raises(SystemExit):
    feedback_cli.main(["serve", "--model", "m", "--prompts", "p", "--db", "d", "--host", "0.0.0.0"])
  meta = json.loads(json.dumps(store.model(1)))
  assert meta == {"id": 1, "path": "/models/test", "weights_hash": "abc123"}


class FakePipe:
  """generate() as TextToImage's, drawing a flat image per (prompt, seed, index); records its calls."""

  def __init__(self, fail_on: str | None = None):
    self.calls, self.fail_on = [], fail_on

  def generate(self, prompts, *, num_images, seed, **settings):
    self.calls.append((tuple(prompts), num_images, seed, settings))
    if prompts[0] == self.fail_on:
      raise RuntimeError("out of memory")
    return np.stack([np.full((8, 8, 3), (seed + i) % 251, np.uint8) for _ in prompts for i in range(num_images)])


def test_worker_draws_each_prompt_with_its_own_seed_and_a_restart_draws_only_what_is_missing(tmp_path):
  from sd_jax.feedback import worker as worker_lib
  store = store_lib.FeedbackStore(tmp_path / "feedback.sqlite")
  model = store.add_model("/models/test", "abc")
  settings = {"steps": 2, "guidance": 3.0}
  pipe = FakePipe()
  work = worker_lib.Worker(store, pipe, model, PROMPTS[:2] + [PROMPTS[0], " "], images_per_prompt=3, seed=5,
                           settings=settings)
  assert work.queued == 6  # the duplicate and the blank line are dropped
  work.start()
  work.join(timeout=30)
  assert work.error is None and work.queued == 0
  seeds = [worker_lib.prompt_seed(5, p) for p in PROMPTS[:2]]
  assert pipe.calls == [((p,), 3, s, settings) for p, s in zip(PROMPTS[:2], seeds)]
  assert len(set(seeds)) == 2 and seeds[0] == worker_lib.prompt_seed(5, PROMPTS[0])  # per prompt, stable
  images = store.images(limit=100)
  assert [(i.prompt, i.seed, i.settings["index"]) for i in images] == [
      (p, s, k) for p, s in zip(PROMPTS[:2], seeds) for k in range(3)]
  for image in images:
    assert image.sha256 == store_lib.file_sha256(store.image_path(image.file))
  # A restarted server with one more prompt draws that one only; a failing draw is kept for the server to report.
  pipe = FakePipe(fail_on=PROMPTS[2])
  again = worker_lib.Worker(store, pipe, model, PROMPTS, images_per_prompt=3, seed=5, settings=settings)
  assert again.queued == 3
  again.start()
  again.join(timeout=30)
  assert [c[0] for c in pipe.calls] == [(PROMPTS[2],)]
  assert isinstance(again.error, RuntimeError) and again.queued == 0


@pytest.mark.parametrize("args, message", [
    (["--host=0.0.0.0"], "give --token SECRET too"),
    (["--images_per_prompt=1"], "comparisons need at least 2 images per prompt"),
    (["--prompts=/nonexistent/prompts.txt"], "does not exist"),
    (["--model=/nonexistent/model"], "/nonexistent/model"),
])
def test_serve_refuses_bad_flags_by_name(tmp_path, capsys, args, message):
  from sd_jax.feedback import __main__ as cli
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n")
  base = [f"--model={tmp_path}", f"--prompts={prompts}", f"--db={tmp_path / 'f.sqlite'}"]
  try:
    code = cli.main(["serve", *base, *args])
  except SystemExit as e:
    code = e.code
  assert code == 1
  assert message in capsys.readouterr().err
