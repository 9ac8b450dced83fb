"""Tests for sd_jax.data.tokenizer (CLIP-style BPE via HF `tokenizers`)."""

import json
import os
import pickle

import numpy as np
import pytest

from sd_jax.data import tokenizer as tokenizer_lib

COLORS = ["red", "green", "blue", "yellow", "purple", "cyan", "white"]
KINDS = ["circle", "square", "triangle", "star", "cross"]


def shapes_captions():
  """Shapes-like captions covering every colour, kind and relation."""
  out = []
  for i, c1 in enumerate(COLORS):
    for j, k1 in enumerate(KINDS):
      c2, k2 = COLORS[(i + j + 1) % 7], KINDS[(i + 2 * j + 1) % 5]
      out += [f"a small {c1} {k1}", f"there is a large {c1} {k1}",
              f"a {c1} {k1} to the left of a {c2} {k2}",
              f"an image of a {c1} {k1} above a {c2} {k2}"]
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("tok"))
  tok = tokenizer_lib.train_tokenizer(shapes_captions(), out_dir, vocab_size=700,
                                      max_length=16)
  return tok, out_dir


def test_train_saves_loadable_tokenizer(trained):
  tok, out_dir = trained
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    assert os.path.exists(os.path.join(out_dir, name))
  loaded = tokenizer_lib.load_clip_tokenizer(out_dir)  # max_length from json
  assert loaded.max_length == 16
  assert loaded.vocab_size == tok.vocab_size <= 700
  texts = ["a small red circle", "a cyan star below a white cross"]
  np.testing.assert_array_equal(loaded(texts), tok(texts))
  # Frequent caption words became single tokens.
  assert tok.tokenize("a small red circle") == [
      "a</w>", "small</w>", "red</w>", "circle</w>"]


def test_round_trip_and_padding(trained):
  tok, _ = trained
  ids = tok(["A  Small\tRED circle", "there is a large blue star"])
  assert ids.dtype == np.int32 and ids.shape == (2, 16)
  assert tok.decode(ids[0]) == "a small red circle"
  assert tok.decode(ids[1]) == "there is a large blue star"
  row = ids[0]
  assert row[0] == tok.bos_id
  n = 1 + 4  # bos + 4 word tokens
  assert row[n] == tok.eos_id
  assert (row[n + 1:] == tok.pad_id).all()
  assert tok.pad_id == tok.eos_id  # SD1 convention by default
  # Unseen words and characters still encode (byte-level) and decode.
  longer = tokenizer_lib.load_clip_tokenizer(trained[1], max_length=40)
  # CLIP splits digits into single tokens, hence "4 2".
  assert longer.decode(longer(["zebra ünïcode 42!"])[0]) == "zebra ünïcode 4 2 !"


def test_truncation_keeps_bos_first_and_eos_last(trained):
  tok, _ = trained
  long = " ".join(["a red circle above a blue square"] * 10)
  row = tok([long])[0]
  assert row.shape == (16,)
  assert row[0] == tok.bos_id and row[-1] == tok.eos_id
  assert tok.eos_id not in row[1:-1]
  assert tok.decode(row) == " ".join(long.split()[:14])


def test_training_is_deterministic(tmp_path):
  a = tokenizer_lib.train_tokenizer(shapes_captions(), str(tmp_path / "a"), 650)
  b = tokenizer_lib.train_tokenizer(shapes_captions(), str(tmp_path / "b"), 650)
  for name in ("vocab.json", "merges.txt"):
    assert ((tmp_path / "a" / name).read_text()
            == (tmp_path / "b" / name).read_text())
  np.testing.assert_array_equal(a(["a green cross"]), b(["a green cross"]))
  assert a.max_length == 77


def test_pickles(trained):
  tok, _ = trained
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone(["a red star"]), tok(["a red star"]))


def _write_small_clip_dir(path, pad_token=None, model_max_length=None):
  """A hand-made CLIP-layout vocab: bytes, bytes+</w>, 4 merges, specials."""
  base = list(tokenizer_lib.bytes_to_unicode().values())
  merges = [("r", "e"), ("re", "d</w>"), ("h", "i</w>")]
  tokens = base + [b + "</w>" for b in base] + [a + b for a, b in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  if pad_token:
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
      json.dump({"pad_token": {"content": pad_token, "lstrip": False}}, f)
  if model_max_length:
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump({"model_max_length": model_max_length}, f)
  return {t: i for i, t in enumerate(tokens)}


def test_small_vocab_exact_ids(tmp_path):
  vocab = _write_small_clip_dir(str(tmp_path))
  tok = tokenizer_lib.load_clip_tokenizer(str(tmp_path), max_length=8)
  ids = tok(["  RED\n re"])[0]
  # NFC + whitespace collapse + lowercase; "red" -> "re"+"d</w>" -> "red</w>";
  # "re" at word end -> "r", "e</w>" (no merge "r e</w>").
  expected = [vocab["<|startoftext|>"], vocab["red</w>"], vocab["r"],
              vocab["e</w>"], vocab["<|endoftext|>"]]
  assert ids.tolist() == expected + [vocab["<|endoftext|>"]] * 3
  assert tok.vocab_size == len(vocab)
  # The special tokens in text are recognised as such.
  assert tok(["<|endoftext|>"])[0, 1] == vocab["<|endoftext|>"]


def test_pad_token_and_max_length_from_directory(tmp_path):
  vocab = _write_small_clip_dir(str(tmp_path), pad_token="!", model_max_length=6)
  tok = tokenizer_lib.load_clip_tokenizer(str(tmp_path))
  assert tok.max_length == 6 and tok.pad_id == vocab["!"]
  row = tok(["hi!"])[0]
  # "!" in text stays an ordinary token (SD2 pads with it); CLIP's regex splits
  # it from the letters, so it is the word-final "!</w>", not the pad "!".
  assert row.tolist() == [vocab["<|startoftext|>"], vocab["hi</w>"],
                          vocab["!</w>"], vocab["<|endoftext|>"]] + [vocab["!"]] * 2
  assert tok.decode(row) == "hi !"  # as CLIPTokenizer: word pieces joined by spaces


def test_missing_files_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tokenizer_lib.load_clip_tokenizer(str(tmp_path))
