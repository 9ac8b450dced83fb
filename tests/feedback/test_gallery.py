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
