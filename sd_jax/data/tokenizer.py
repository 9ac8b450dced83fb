"""CLIP byte-level BPE tokenizer (load a CLIP `tokenizer/` directory, or train one).

Built on the HF `tokenizers` library with the same pipeline as transformers'
`CLIPTokenizerFast` (`convert_slow_tokenizer.CLIPConverter`):

  normalizer     NFC -> collapse whitespace runs to " " -> lowercase
  pre-tokenizer  Split on CLIP's regex (contractions | letters | single digits |
                 other non-space runs), whitespace removed -> ByteLevel
  model          BPE, continuing_subword_prefix="", end_of_word_suffix="</w>"
  post-process   <|startoftext|> ... <|endoftext|>

Sequences are truncated to `max_length` keeping bos first and eos last, and padded
to `max_length` with the pad token (SD1 tokenizers pad with <|endoftext|>, SD2 ones
with "!"; taken from special_tokens_map.json / tokenizer_config.json, else eos).

A directory holds vocab.json + merges.txt (+ optional special_tokens_map.json and
tokenizer_config.json, whose `model_max_length` is the default max_length) — the
layout of a diffusers `tokenizer/` folder and of `train_tokenizer`'s output.

  tok = load_clip_tokenizer("sd15/tokenizer")
  tokens = tok(["a red circle"])          # np.int32 [1, 77]
  tok.decode(tokens[0])                   # "a red circle"
"""

from __future__ import annotations

import functools
import json
import os
from typing import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
ADDED_TOKENS_FILE = "added_tokens.json"  # tokens added after the vocabulary ({token: id}), as transformers writes
# CLIP's split pattern (transformers' CLIPConverter / the original CLIP repo).
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SUFFIX = "</w>"
# transformers' slow CLIPTokenizer reads at most this many merges (the merges
# file of the original CLIP vocab is longer than its 49408-token vocab uses).
_MAX_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP byte -> printable unicode table (defines the base vocab order)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def _clip_pipeline(tok: Tokenizer) -> Tokenizer:
  """Sets CLIP's normalizer, pre-tokenizer and decoder on `tok` (in place)."""
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(),
      normalizers.Replace(Regex(r"\s+"), " "),
      normalizers.Lowercase(),
  ])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  tok.decoder = decoders.ByteLevel()
  return tok


class ClipTokenizer:
  """Text -> fixed-length int32 token ids, CLIP style.

  Attributes:
    max_length: length of every output row (bos + at most max_length-2 tokens + eos,
      then padding).
    vocab_size: number of ids (embedding table size).
    bos_id, eos_id, pad_id: ids of <|startoftext|>, <|endoftext|> and the pad token.
  """

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
               max_length: int = DEFAULT_MAX_LENGTH, pad_token: str = EOS_TOKEN,
               unk_token: str = EOS_TOKEN):
    """Builds the tokenizer from a vocab (token -> id) and ordered BPE merges."""
    for name, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN),
                        ("pad", pad_token), ("unk", unk_token)):
      if token not in vocab:
        raise ValueError(f"{name} token {token!r} is not in the vocabulary")
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (bos + eos), got {max_length}")
    self.max_length = int(max_length)
    self.pad_token = pad_token
    self.bos_id = int(vocab[BOS_TOKEN])
    self.eos_id = int(vocab[EOS_TOKEN])
    self.pad_id = int(vocab[pad_token])
    self.vocab_size = int(max(vocab.values()) + 1)
    tok = Tokenizer(models.BPE(
        vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
        continuing_subword_prefix="", end_of_word_suffix=_SUFFIX, fuse_unk=False,
        unk_token=unk_token))
    _clip_pipeline(tok)
    # Only bos/eos are special (matched verbatim in text); an SD2-style pad "!"
    # stays an ordinary token.
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, self.bos_id), (EOS_TOKEN, self.eos_id)])
    # Truncation reserves room for the two special tokens, so eos stays last.
    tok.enable_truncation(max_length=self.max_length)
    tok.enable_padding(length=self.max_length, pad_id=self.pad_id,
                       pad_token=pad_token)
    self._tokenizer = tok
    self.added_tokens: dict[str, int] = {}  # tokens added after the vocabulary (`add_tokens`): token -> id

  def add_tokens(self, tokens: Sequence[str]) -> list[int]:
    """Adds new whole tokens (textual inversion's placeholders, e.g. "<sks-shape>"), matched verbatim in the text
    after lowercasing and never split by BPE, with the ids that follow the vocabulary (as transformers'
    `add_tokens`). Returns their ids; a token already in the vocabulary is an error."""
    ids = []
    for token in tokens:
      if token != token.lower() or not token.strip() or token != token.strip():
        raise ValueError(f"new token {token!r}: use a lowercase token without surrounding spaces (text is "
                         "lowercased before tokens are matched), e.g. '<sks-shape>'.")
      if self._tokenizer.token_to_id(token) is not None:
        raise ValueError(f"new token {token!r} is already in the tokenizer's vocabulary; choose a new one.")
      self._tokenizer.add_tokens([AddedToken(token, single_word=False, lstrip=False, rstrip=False,
                                             normalized=True)])
      ids.append(int(self._tokenizer.token_to_id(token)))
      self.added_tokens[token] = ids[-1]
    self.vocab_size = max(self.vocab_size, max(ids, default=-1) + 1)
    return ids

  def save_added_tokens(self, directory: str) -> None:
    """Writes the added tokens as `added_tokens.json` ({token: id}, transformers' file), which
    `load_clip_tokenizer` reads back."""
    with open(os.path.join(directory, ADDED_TOKENS_FILE), "w", encoding="utf-8") as f:
      json.dump(self.added_tokens, f, indent=2)

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    """Tokenizes a string or a list of N strings -> np.int32 [N, max_length]."""
    if isinstance(texts, str):
      texts = [texts]
    encodings = self._tokenizer.encode_batch(list(texts))
    if not encodings:
      return np.zeros((0, self.max_length), np.int32)
    return np.asarray([e.ids for e in encodings], dtype=np.int32)

  def tokenize(self, text: str) -> list[str]:
    """The BPE pieces of `text` (no bos/eos/padding), e.g. ["a</w>", "red</w>"]."""
    enc = self._tokenizer.encode(text, add_special_tokens=False)
    return [t for t, m in zip(enc.tokens, enc.attention_mask) if m]

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of `__call__` for one row: drops bos, stops at the first eos.

    Text is lowercased and whitespace-normalized by encoding, so
    `decode(tok([s])[0]) == " ".join(s.lower().split())` for plain-ASCII words.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if ids and ids[0] == self.bos_id:
      ids = ids[1:]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    # Added tokens are whole words (no end-of-word suffix marks their end): decode the pieces between them.
    added = {i: token for token, i in self.added_tokens.items()}
    words, piece = [], []
    for i in ids + [None]:
      if i is None or i in added:
        text = self._tokenizer.decode(piece, skip_special_tokens=True) if piece else ""
        # As CLIPTokenizerFast: the end-of-word suffix marks a space.
        words += text.replace(_SUFFIX, " ").split()
        words += [added[i]] if i is not None else []
        piece = []
      else:
        piece.append(i)
    return " ".join(words)

  def __repr__(self) -> str:
    return (f"ClipTokenizer(vocab_size={self.vocab_size}, "
            f"max_length={self.max_length}, pad={self.pad_token!r})")


def _token_content(value) -> str | None:
  """A special-token entry: "tok" or {"content": "tok", ...} (HF json formats)."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_merges(path: str) -> list[tuple[str, str]]:
  """Reads merges.txt (optional "#version" header) as transformers' CLIPTokenizer."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().strip().split("\n")
  if lines and lines[0].startswith("#version"):
    lines = lines[1:]
  merges = []
  for lineno, line in enumerate(lines[:_MAX_MERGES], start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}:{lineno}: expected 'A B', got {line!r}")
    merges.append((parts[0], parts[1]))
  return merges


def load_clip_tokenizer(directory: str,
                        max_length: int | None = None) -> ClipTokenizer:
  """Loads a CLIP tokenizer from `directory` (vocab.json + merges.txt).

  Args:
    directory: a diffusers/transformers CLIP `tokenizer/` folder or the output of
      `train_tokenizer`. Optional special_tokens_map.json / tokenizer_config.json
      give the pad and unk tokens (default <|endoftext|>) and model_max_length.
    max_length: output length; None -> tokenizer_config.json's model_max_length,
      else 77.

  Returns:
    A `ClipTokenizer`.
  """
  vocab_path = os.path.join(directory, "vocab.json")
  merges_path = os.path.join(directory, "merges.txt")
  for path in (vocab_path, merges_path):
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} not found: a CLIP tokenizer directory needs vocab.json and "
          "merges.txt (e.g. the tokenizer/ folder of a diffusers checkpoint, or "
          "the output of sd_jax.data.tokenizer.train_tokenizer)")
  vocab = _read_json(vocab_path)
  merges = read_merges(merges_path)
  special = _read_json(os.path.join(directory, "special_tokens_map.json"))
  config = _read_json(os.path.join(directory, "tokenizer_config.json"))

  def pick(key: str) -> str:
    return (_token_content(special.get(key)) or _token_content(config.get(key))
            or EOS_TOKEN)

  if max_length is None:
    max_length = int(config.get("model_max_length", DEFAULT_MAX_LENGTH))
    if max_length > 100_000:  # transformers' "unset" sentinel (int(1e30))
      max_length = DEFAULT_MAX_LENGTH
  tokenizer = ClipTokenizer(vocab, merges, max_length=max_length,
                            pad_token=pick("pad_token"), unk_token=pick("unk_token"))
  added = _read_json(os.path.join(directory, ADDED_TOKENS_FILE))
  added = {token: i for token, i in added.items() if token not in vocab}  # transformers may list bos/eos there
  for token, want in sorted(added.items(), key=lambda item: item[1]):
    (got,) = tokenizer.add_tokens([token])
    if got != want:
      raise ValueError(f"{directory}/{ADDED_TOKENS_FILE}: token {token!r} has id {want}, but adding the tokens in "
                       f"order gives {got}: the file does not fit vocab.json.")
  return tokenizer


def _trained_merges(tok: Tokenizer) -> list[tuple[str, str]]:
  """The learned merges, in learning order, from a trained BPE `Tokenizer`."""
  merges = json.loads(tok.to_str())["model"]["merges"]
  return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def train_tokenizer(captions: Iterable[str], out_dir: str, vocab_size: int = 1024,
                    *, max_length: int = DEFAULT_MAX_LENGTH,
                    min_frequency: int = 2) -> ClipTokenizer:
  """Trains a CLIP-style byte-level BPE on `captions` and saves it to `out_dir`.

  The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with
  "</w>", one token per merge (in learning order), then <|startoftext|> and
  <|endoftext|>. So every byte is covered and `vocab_size` is at most the
  requested size (fewer if the captions support fewer merges).

  Args:
    captions: training texts (iterated once).
    out_dir: created if needed; receives vocab.json, merges.txt,
      special_tokens_map.json and tokenizer_config.json (model_max_length).
    vocab_size: target vocabulary size, >= 514.
    max_length: model_max_length written to tokenizer_config.json.
    min_frequency: a pair must occur this often to be merged.

  Returns:
    The tokenizer, as `load_clip_tokenizer(out_dir)` would load it.
  """
  base = list(bytes_to_unicode().values())
  num_merges = vocab_size - 2 * len(base) - 2
  if num_merges < 0:
    raise ValueError(f"vocab_size must be >= {2 * len(base) + 2}, got {vocab_size}")
  tok = _clip_pipeline(Tokenizer(models.BPE(
      continuing_subword_prefix="", end_of_word_suffix=_SUFFIX)))
  trainer = trainers.BpeTrainer(
      # Generous target: the trainer counts its own alphabet; we keep the first
      # `num_merges` merges and rebuild the vocab CLIP-style below.
      vocab_size=vocab_size + 2 * len(base), min_frequency=min_frequency,
      show_progress=False, initial_alphabet=base, end_of_word_suffix=_SUFFIX,
      continuing_subword_prefix="")
  tok.train_from_iterator((str(c) for c in captions), trainer=trainer)
  vocab_tokens = base + [b + _SUFFIX for b in base]
  known = set(vocab_tokens)
  merges = []
  for a, b in _trained_merges(tok):
    if len(merges) == num_merges:
      break
    if a in known and b in known and a + b not in known:
      merges.append((a, b))
      vocab_tokens.append(a + b)
      known.add(a + b)
  vocab_tokens += [BOS_TOKEN, EOS_TOKEN]
  vocab = {t: i for i, t in enumerate(vocab_tokens)}

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
             "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": max_length, "do_lower_case": True, **special},
              f, indent=2)
  return ClipTokenizer(vocab, merges, max_length=max_length)
