"""The frozen networks of a latent-diffusion run: a VAE, a text tower and its tokenizer, read from sd_jax model
directories and checked against each other and against the config.

Used by every trainer that diffuses in a frozen VAE's latent space conditioned on a text tower (the ldm trainer, and
precomputing latents, sd_jax/precompute.py): nothing here trains, and nothing here ever falls back to random weights.
A missing or wrong directory fails before anything compiles, with a message that says what to point the key at.
"""

from __future__ import annotations

import os

import jax
from etils import epath

from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.models import clip as clip_lib
from sd_jax.weights import model_dir as model_dir_lib
from sd_jax.weights import store

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json")


def model_dir_with(path: str, component: str, key: str, producer: str) -> epath.Path:
  """An sd_jax model directory holding `component`, or an error that says what to point `key` at."""
  how = (f"Point it at an sd_jax model directory with {component}/: {producer}, or the output of "
         "`python -m sd_jax.convert --from_diffusers DIR --out OUT`. The ldm trainer never uses random weights for "
         "its frozen networks.")
  if not path:
    raise ValueError(f"{key} is empty. {how}")
  directory = epath.Path(path if "://" in path else os.path.abspath(os.path.expanduser(path)))
  if not directory.exists():
    raise FileNotFoundError(f"{key}={path!r} does not exist. {how}")
  if not (directory / store.INDEX_FILE).exists():
    hint = (f" It looks like a training workdir: use {directory / 'export'}."
            if (directory / "export" / store.INDEX_FILE).exists() else "")
    raise FileNotFoundError(f"{key}={path!r} is not an sd_jax model directory (no {store.INDEX_FILE}).{hint} {how}")
  components = store.read_index(directory)["components"]
  if component not in components:
    raise FileNotFoundError(f"{key}={path!r} holds {sorted(components)} but no {component!r}. {how}")
  return directory


def _same_tokenizer(a, b) -> bool:
  a, b = epath.Path(a), epath.Path(b)
  for name in _TOKENIZER_FILES:
    if (a / name).exists() != (b / name).exists():
      return False
    if (a / name).exists() and (a / name).read_bytes() != (b / name).read_bytes():
      return False
  return True


def _load_tokenizer(config, text_dir: epath.Path, text_config: clip_lib.CLIPTextConfig):
  """The text tower's own tokenizer (<text_from>/tokenizer), checked against the one the data pipeline uses."""
  expected = text_dir / "tokenizer"
  if not (expected / "vocab.json").exists():
    raise FileNotFoundError(f"{text_dir} has no tokenizer/ (vocab.json, merges.txt): an ldm run tokenizes with the "
                            "text tower's own tokenizer, which must be stored next to it.")
  given = config.dataset.tokenizer
  if not given:
    raise ValueError(f"config.dataset.tokenizer is empty; the batches need tokens. Set it to {expected} (configs/"
                     "shapes_ldm.py ties it to ldm.text_from).")
  if not _same_tokenizer(given, expected):
    raise ValueError(f"config.dataset.tokenizer={given!r} is not the tokenizer of the text tower in "
                     f"ldm.text_from ({expected}): its vocab.json / merges.txt / special_tokens_map.json differ. "
                     f"Set --config.dataset.tokenizer={expected}.")
  max_len = config.dataset.max_text_len
  if max_len > text_config.max_position_embeddings:
    raise ValueError(f"config.dataset.max_text_len={max_len} is longer than the text tower's "
                     f"max_position_embeddings={text_config.max_position_embeddings}; set "
                     f"--config.dataset.max_text_len={text_config.max_position_embeddings}.")
  tok = tokenizer_lib.load_clip_tokenizer(str(expected), max_length=max_len)
  if tok.vocab_size > text_config.vocab_size:
    raise ValueError(f"the tokenizer in {expected} has {tok.vocab_size} ids but the text tower embeds only "
                     f"{text_config.vocab_size}: they were not trained together.")
  return tok


class FrozenNetworks:
  """The VAE, text tower and tokenizer of an ldm run, read from `ldm.vae_from` / `ldm.text_from` (host numpy)."""

  def __init__(self, config):
    ldm = config.ldm
    self.vae_dir = model_dir_with(ldm.vae_from, "vae", "config.ldm.vae_from", "a VAE run's WORKDIR/export")
    self.text_dir = model_dir_with(ldm.text_from, "text_encoder", "config.ldm.text_from", "a CLIP run's WORKDIR/export")
    compute = dict(dtype=ldm.frozen_dtype)
    self.vae, self.vae_params = model_dir_lib.load_model(self.vae_dir, ("vae",), **compute)["vae"]
    self.text, self.text_params = model_dir_lib.load_model(self.text_dir, ("text_encoder",),
                                                              **compute)["text_encoder"]
    if not 0 <= ldm.clip_skip < self.text.config.num_hidden_layers:
      raise ValueError(f"config.ldm.clip_skip={ldm.clip_skip}: the text tower has "
                       f"{self.text.config.num_hidden_layers} layers; use 0 (last layer) to "
                       f"{self.text.config.num_hidden_layers - 1}.")
    self.clip_skip = ldm.clip_skip
    self.tokenizer = _load_tokenizer(config, self.text_dir, self.text.config)
    self.empty_tokens = self.tokenizer([""])  # [1, L]: bos, eos, padding: the unconditional prompt
    resolution = config.dataset.resolution
    if resolution % self.vae.downsample_factor:
      raise ValueError(f"config.dataset.resolution={resolution} is not a multiple of the VAE's downsampling factor "
                       f"{self.vae.downsample_factor}.")
    self.latent_size = resolution // self.vae.downsample_factor

  def encode_text(self, text_params, tokens):
    """Context [B, L, D]: last_hidden_state, or with clip_skip = k the output of layer N - k, final-normed."""
    return self.text.apply({"params": text_params}, tokens, clip_skip=self.clip_skip or None, method="encode")

  def encode(self, vae_params, text_params, batch) -> dict[str, jax.Array]:
    """The posterior and context of an image batch: what sd_jax/data/precomputed.py stores."""
    posterior = self.vae.apply({"params": vae_params}, batch["image"], method="encode")
    return {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar,
            "context": self.encode_text(text_params, batch["tokens"])}
