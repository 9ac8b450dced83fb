"""The preference store: one SQLite file (WAL) of generated images and people's votes on them.

Tables (every vote keeps what is needed to train on it later, with no other file):

  models      id, path, weights_hash                       the model that drew an image (path + hash of its weights)
  images      id, prompt, model_id, seed, settings, file,  one generated image: its PNG (relative to the images
              sha256, created                              folder beside the database) and the content hash
  votes       id, prompt, image_a, image_b, choice,        a comparison of two images of one prompt: choice "a", "b",
              rater, created                               "tie" or "both_bad"
  favourites  id, image_id, rater, created                 an image someone marked (unique per image and rater)

Several processes and threads may write at once (WAL; each write is one short IMMEDIATE transaction, retried on a
busy database), so concurrent raters lose no vote. A restarted server opens the same file and goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

CHOICES = ("a", "b", "tie", "both_bad")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
  id INTEGER PRIMARY KEY, path TEXT NOT NULL, weights_hash TEXT NOT NULL, UNIQUE (path, weights_hash));
CREATE TABLE IF NOT EXISTS images (
  id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, model_id INTEGER NOT NULL REFERENCES models (id),
  seed INTEGER NOT NULL, settings TEXT NOT NULL, file TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL,
  created REAL NOT NULL, UNIQUE (prompt, model_id, seed, settings));
CREATE TABLE IF NOT EXISTS votes (
  id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, image_a INTEGER NOT NULL REFERENCES images (id),
  image_b INTEGER NOT NULL REFERENCES images (id), choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
  rater TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS favourites (
  id INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images (id), rater TEXT NOT NULL,
  created REAL NOT NULL, UNIQUE (image_id, rater));
CREATE INDEX IF NOT EXISTS images_by_prompt ON images (prompt);
CREATE INDEX IF NOT EXISTS votes_by_rater ON votes (rater);
CREATE INDEX IF NOT EXISTS votes_by_prompt ON votes (prompt);
CREATE INDEX IF NOT EXISTS votes_by_pair ON votes (image_a, image_b);
"""


@dataclasses.dataclass(frozen=True)
class Image:
  id: int
  prompt: str
  model_id: int
  seed: int
  settings: dict[str, Any]
  file: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class Vote:
  id: int
  prompt: str
  image_a: int
  image_b: int
  choice: str
  rater: str
  created: float


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


class FeedbackStore:
  """The database at `path` (created with its schema if new) and its images folder (`images_dir`, default
  PATH without its suffix + "_images" beside it). Thread-safe: one connection per thread."""

  def __init__(self, path, images_dir=None, *, busy_timeout_s: float = 30.0):
    self.path = os.path.abspath(os.path.expanduser(str(path)))
    root = os.path.splitext(self.path)[0]
    self.images_dir = os.path.abspath(str(images_dir)) if images_dir else f"{root}_images"
    self.busy_timeout_s = busy_timeout_s
    parent = os.path.dirname(self.path)
    if not os.path.isdir(parent):
      raise FileNotFoundError(f"--db {path}: its directory {parent} does not exist.")
    os.makedirs(self.images_dir, exist_ok=True)
    self._local = threading.local()
    self._connection().executescript(_SCHEMA)  # idempotent; executescript commits on its own
    with self._write() as db:
      row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
      if row is None:
        db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
      elif int(row[0]) != SCHEMA_VERSION:
        raise ValueError(f"--db {path} has schema version {row[0]}; this sd_jax reads version {SCHEMA_VERSION}.")

  # -- connections -------------------------------------------------------------------------------------------------

  def _connection(self) -> sqlite3.Connection:
    db = getattr(self._local, "db", None)
    if db is None:
      try:
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=True)
      except sqlite3.Error as e:
        raise ValueError(f"--db {self.path} cannot be opened as a SQLite database: {e}") from e
      db.execute("PRAGMA journal_mode=WAL")
      db.execute("PRAGMA synchronous=NORMAL")
      db.execute("PRAGMA foreign_keys=ON")
      self._local.db = db
    return db

  @contextlib.contextmanager
  def _write(self) -> Iterator[sqlite3.Connection]:
    """One IMMEDIATE transaction (the write lock is taken at BEGIN; SQLite waits busy_timeout_s for it)."""
    db = self._connection()
    db.execute("BEGIN IMMEDIATE")
    try:
      yield db
    except BaseException:
      db.execute("ROLLBACK")
      raise
    db.execute("COMMIT")

  def close(self) -> None:
    db = getattr(self._local, "db", None)
    if db is not None:
      db.close()
      self._local.db = None

  # -- models and images ---------------------------------------------------------------------------------------------

  def add_model(self, path: str, weights_hash: str) -> int:
    with self._write() as db:
      db.execute("INSERT OR IGNORE INTO models (path, weights_hash) VALUES (?, ?)", (path, weights_hash))
      return int(db.execute("SELECT id FROM models WHERE path = ? AND weights_hash = ?",
                            (path, weights_hash)).fetchone()[0])

  def model(self, model_id: int) -> dict[str, Any]:
    row = self._connection().execute("SELECT path, weights_hash FROM models WHERE id = ?", (model_id,)).fetchone()
    if row is None:
      raise KeyError(f"no model {model_id}")
    return {"id": model_id, "path": row[0], "weights_hash": row[1]}

  def add_image(self, prompt: str, model_id: int, seed: int, settings: dict[str, Any], file: str) -> int:
    """Records an image already written at images_dir/file (relative); returns its id (an existing row's id when
    the same prompt, model, seed and settings were recorded before)."""
    path = self.image_path(file)
    sha = file_sha256(path)
    settings_text = json.dumps(settings, sort_keys=True)
    with self._write() as db:
      db.execute("INSERT OR IGNORE INTO images (prompt, model_id, seed, settings, file, sha256, created) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)", (prompt, model_id, seed, settings_text, file, sha, time.time()))
      return int(db.execute("SELECT id FROM images WHERE prompt = ? AND model_id = ? AND seed = ? AND settings = ?",
                            (prompt, model_id, seed, settings_text)).fetchone()[0])

  def has_image(self, prompt: str, model_id: int, seed: int, settings: dict[str, Any]) -> bool:
    return self._connection().execute(
        "SELECT 1 FROM images WHERE prompt = ? AND model_id = ? AND seed = ? AND settings = ?",
        (prompt, model_id, seed, json.dumps(settings, sort_keys=True))).fetchone() is not None

  def image(self, image_id: int) -> Image:
    row = self._connection().execute("SELECT id, prompt, model_id, seed, settings, file, sha256 FROM images "
                                     "WHERE id = ?", (int(image_id),)).fetchone()
    if row is None:
      raise KeyError(f"no image {image_id}")
    return Image(id=row[0], prompt=row[1], model_id=row[2], seed=row[3], settings=json.loads(row[4]), file=row[5],
                 sha256=row[6])

  def image_path(self, file: str) -> str:
    """The absolute path of an images-folder file; a name that would leave the folder is a ValueError."""
    path = os.path.realpath(os.path.join(self.images_dir, file))
    if os.path.commonpath([path, os.path.realpath(self.images_dir)]) != os.path.realpath(self.images_dir):
      raise ValueError(f"image file {file!r} is outside the images folder")
    return path

  def images(self, *, offset: int = 0, limit: int = 50) -> list[Image]:
    rows = self._connection().execute(
        "SELECT id, prompt, model_id, seed, settings, file, sha256 FROM images ORDER BY id LIMIT ? OFFSET ?",
        (int(limit), int(offset))).fetchall()
    return [Image(id=r[0], prompt=r[1], model_id=r[2], seed=r[3], settings=json.loads(r[4]), file=r[5],
                  sha256=r[6]) for r in rows]

  # -- votes ---------------------------------------------------------------------------------------------------------

  def next_pair(self, rater: str) -> tuple[Image, Image] | None:
    """Two images of one prompt that `rater` has not compared yet (the least-voted prompt first), or None."""
    db = self._connection()
    rows = db.execute("""
      SELECT a.id, b.id FROM images a JOIN images b ON a.prompt = b.prompt AND a.id < b.id
      WHERE NOT EXISTS (SELECT 1 FROM votes v WHERE v.image_a = a.id AND v.image_b = b.id AND v.rater = ?)
        AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.image_a = b.id AND v.image_b = a.id AND v.rater = ?)
      ORDER BY (SELECT COUNT(*) FROM votes v WHERE v.prompt = a.prompt), a.prompt, a.id, b.id LIMIT 1""",
                      (rater, rater)).fetchall()  # two lookups in votes_by_pair (one OR'ed one scans the rater's votes)
    if not rows:
      return None
    return self.image(rows[0][0]), self.image(rows[0][1])

  def record_vote(self, image_a: int, image_b: int, choice: str, rater: str) -> int:
    """Records a comparison; ValueError for an unknown image, two images of different prompts, or a bad choice."""
    if choice not in CHOICES:
      raise ValueError(f"choice {choice!r}: use one of {', '.join(CHOICES)}.")
    if not rater or len(rater) > 100:
      raise ValueError("rater: give a name of 1 to 100 characters.")
    if int(image_a) == int(image_b):
      raise ValueError("a vote compares two different images.")
    a, b = self.image(image_a), self.image(image_b)  # KeyError for unknown ids
    if a.prompt != b.prompt:
      raise ValueError("the two images were drawn for different prompts.")
    with self._write() as db:
      cursor = db.execute("INSERT INTO votes (prompt, image_a, image_b, choice, rater, created) "
                          "VALUES (?, ?, ?, ?, ?, ?)", (a.prompt, a.id, b.id, choice, rater, time.time()))
      return int(cursor.lastrowid)

  def votes(self) -> list[Vote]:
    rows = self._connection().execute("SELECT id, prompt, image_a, image_b, choice, rater, created FROM votes "
                                      "ORDER BY id").fetchall()
    return [Vote(*r) for r in rows]

  def set_favourite(self, image_id: int, rater: str, favourite: bool = True) -> None:
    self.image(image_id)  # KeyError for an unknown id
    if not rater or len(rater) > 100:
      raise ValueError("rater: give a name of 1 to 100 characters.")
    with self._write() as db:
      if favourite:
        db.execute("INSERT OR IGNORE INTO favourites (image_id, rater, created) VALUES (?, ?, ?)",
                   (int(image_id), rater, time.time()))
      else:
        db.execute("DELETE FROM favourites WHERE image_id = ? AND rater = ?", (int(image_id), rater))

  def favourites(self, rater: str | None = None) -> list[int]:
    if rater is None:
      rows = self._connection().execute("SELECT DISTINCT image_id FROM favourites ORDER BY image_id").fetchall()
    else:
      rows = self._connection().execute("SELECT image_id FROM favourites WHERE rater = ? ORDER BY image_id",
                                        (rater,)).fetchall()
    return [r[0] for r in rows]

  def progress(self, rater: str | None = None) -> dict[str, int]:
    """Counts: images, votes (all, and this rater's), pairs this rater has left, favourites."""
    db = self._connection()
    images = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    votes = db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    pairs = db.execute("SELECT COUNT(*) FROM images a JOIN images b ON a.prompt = b.prompt AND a.id < b.id"
                       ).fetchone()[0]
    mine = db.execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater or "",)).fetchone()[0]
    favourites = db.execute("SELECT COUNT(*) FROM favourites").fetchone()[0]
    return {"images": images, "votes": votes, "my_votes": mine, "pairs": pairs,
            "pairs_left": max(pairs - mine, 0), "favourites": favourites}

  def preference_pairs(self, *, include_ties: bool = True) -> list[tuple[str, Image, Image, float]]:
    """(caption, image 0, image 1, label_0) of every vote, Pick-a-Pic's convention: label_0 = 1 when image 0 was
    preferred, 0 when image 1 was, 0.5 for a tie; "both bad" votes are left out."""
    out = []
    for vote in self.votes():
      if vote.choice == "both_bad" or (vote.choice == "tie" and not include_ties):
        continue
      label = {"a": 1.0, "b": 0.0, "tie": 0.5}[vote.choice]
      out.append((vote.prompt, self.image(vote.image_a), self.image(vote.image_b), label))
    return out


def export_parquet(store: FeedbackStore, out, *, include_ties: bool = True) -> int:
  """Writes the votes as a Pick-a-Pic-layout parquet file (caption, jpg_0, jpg_1: image bytes, label_0; plus the
  images' seeds, files and hashes); returns the number of rows."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  rows: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "seed_0", "seed_1", "file_0",
                                           "file_1", "sha256_0", "sha256_1")}
  for caption, a, b, label in store.preference_pairs(include_ties=include_ties):
    rows["caption"].append(caption)
    for i, image in enumerate((a, b)):
      with open(store.image_path(image.file), "rb") as f:
        rows[f"jpg_{i}"].append(f.read())
      rows[f"seed_{i}"].append(image.seed)
      rows[f"file_{i}"].append(image.file)
      rows[f"sha256_{i}"].append(image.sha256)
    rows["label_0"].append(label)
  pq.write_table(pa.table(rows), str(out))
  return len(rows["caption"])


def read_pairs(path) -> list[tuple[str, bytes, bytes, float]]:
  """(caption, image 0 bytes, image 1 bytes, label_0) of a Pick-a-Pic-layout parquet file, or of a feedback
  database (by its .sqlite / .db suffix)."""
  path = str(path)
  if not os.path.isfile(path):  # never create an empty database where a mistyped path points
    raise FileNotFoundError(f"{path} does not exist.")
  if path.endswith((".sqlite", ".sqlite3", ".db")):
    store = FeedbackStore(path)
    out = []
    for caption, a, b, label in store.preference_pairs():
      with open(store.image_path(a.file), "rb") as fa, open(store.image_path(b.file), "rb") as fb:
        out.append((caption, fa.read(), fb.read(), label))
    return out
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  table = pq.read_table(path)
  missing = [c for c in ("caption", "jpg_0", "jpg_1", "label_0") if c not in table.column_names]
  if missing:
    raise ValueError(f"{path}: not a Pick-a-Pic-layout file (no columns {missing}; it has {table.column_names}).")
  cols = {c: table.column(c).to_pylist() for c in ("caption", "jpg_0", "jpg_1", "label_0")}
  return list(zip(cols["caption"], cols["jpg_0"], cols["jpg_1"], [float(x) for x in cols["label_0"]]))


def images_for(store: FeedbackStore, ids: Sequence[int]) -> list[Image]:
  return [store.image(i) for i in ids]
