"""Fine-tuning a Stable Diffusion model on one's own images: LoRA, DreamBooth, textual inversion, full fine-tuning.

One trainer with switches (configs/finetune.py has a preset per method):

  finetune.unet          "lora" | "full" | "frozen"     the U-Net: adapters (sd_jax/lora.py), all its weights, or none
  finetune.text_encoder  "frozen" | "lora" | "full"     the text tower, likewise
  finetune.new_tokens    ("<sks-shape>", ...)           textual inversion: tokens added to the tokenizer; only their
                                                        embedding rows train (the rest of the table stays in `frozen`)
  finetune.instance_prompt                              DreamBooth: every image's caption ("a photo of sks dog")
  finetune.prior_preservation, class_prompt, ...        DreamBooth's prior: class images drawn once by the base model

The base model (finetune.base) is an sd_jax model directory, a training workdir (its export/), a diffusers directory
or an original single file; the last two are converted once into a cache (weights/model_dir.py `resolve_model`).
Nothing of the base is modified: what is frozen lives in the loop's `frozen` networks (sharded once, never saved),
and a run's checkpoints hold only what trains (adapters: a few MB).

One step, per example from its own key (sd_jax/diffusion/losses.py `latent_diffusion_loss`, the ldm trainer's loss):
x_t from the VAE latents of the image, ε or v target from the base model's scheduler config, and the loss

    loss = mean over instance examples + prior_loss_weight · mean over class (prior) examples

(DreamBooth, Ruiz et al. 2023; diffusers' train_dreambooth.py concatenates the two halves of a batch, here each
example carries a "prior" flag, and the training list repeats the instance images to as many as the class images).

Data (`prepare_data`, into WORKDIR/finetune_data): finetune.data is a folder with metadata.jsonl captions, or a bare
folder of images (with finetune.instance_prompt); images of any size and aspect are resized and cropped to the
dataset's resolution (dataset.crop, random_flip); a folder with fewer images than the batch is repeated. Class
images are drawn with the one generation path (sd_jax/generate.py) into finetune_data/class_images, once: a
restarted run draws only the missing ones, the same as an uninterrupted one would have.

Export (WORKDIR/export): LoRA adapters as `pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights`) and
`lora_kohya.safetensors` (kohya / A1111); new tokens as `learned_embeds.safetensors` (diffusers'
`load_textual_inversion`); a full fine-tune as an sd_jax model directory; and `finetune.json` (base, method, files).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from sd_jax import generate
from sd_jax import images as images_lib
from sd_jax import lora as lora_lib
from sd_jax import parallel
from sd_jax.data import folder as folder_lib
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.diffusion import losses
from sd_jax.diffusion import samplers
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.trainers import base
from sd_jax.weights import common as weights_common
from sd_jax.weights import lora as lora_weights
from sd_jax.weights import model_dir as model_dir_lib
from sd_jax.weights import store

MODES = ("frozen", "lora", "full")
DATA_DIR = "finetune_data"          # WORKDIR/finetune_data: metadata.jsonl, class_images/, tokenizer/
CLASS_IMAGES = "class_images"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXPORT_DIR = "export"
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
EMBEDDINGS_FILE = "learned_embeds.safetensors"
SUMMARY_FILE = "finetune.json"
_TOKEN_TABLE = ("embeddings", "token_embedding", "embedding")  # the text tower's token embedding table


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  """A copy of the nested dict `tree` with `value` at `path`."""
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _image_files(folder: str) -> list[str]:
  return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                if name.lower().endswith(IMAGE_SUFFIXES) and CLASS_IMAGES not in root.split(os.sep))


def check_config(config, *, image_folder: bool = True) -> None:
  """Value checks that need no files; ValueError naming the key (`image_folder`: the data is finetune.data)."""
  f = config.finetune
  for key in ("unet", "text_encoder"):
    if f[key] not in MODES:
      raise ValueError(f"config.finetune.{key}={f[key]!r}: use one of {MODES}.")
  if f.unet == "frozen" and f.text_encoder == "frozen" and not f.new_tokens:
    raise ValueError("config.finetune: nothing trains (unet and text_encoder 'frozen', no new_tokens). Set "
                     "finetune.unet='lora' (or 'full'), finetune.text_encoder, or finetune.new_tokens.")
  if not f.base:
    raise ValueError("config.finetune.base is empty: point it at the model to fine-tune (an sd_jax model directory, a "
                     "training workdir, a diffusers directory or a single .safetensors file).")
  if image_folder and not f.data:
    raise ValueError("config.finetune.data is empty: point it at a folder of images (with metadata.jsonl captions, "
                     "or with finetune.instance_prompt as every image's caption).")
  if f.prior_preservation:
    if not f.class_prompt:
      raise ValueError("config.finetune.prior_preservation=True needs finetune.class_prompt (e.g. 'a photo of a dog').")
    if f.num_class_images < 1:
      raise ValueError(f"config.finetune.num_class_images={f.num_class_images}: must be >= 1 with prior preservation.")
    if not f.prior_loss_weight >= 0:
      raise ValueError(f"config.finetune.prior_loss_weight={f.prior_loss_weight}: must be >= 0.")
  if not 0.0 <= f.caption_dropout <= 1.0:
    raise ValueError(f"config.finetune.caption_dropout={f.caption_dropout}: a probability in [0, 1].")
  for token in f.new_tokens:
    if token != token.lower() or " " in token.strip() or not token.strip():
      raise ValueError(f"config.finetune.new_tokens: {token!r} must be one lowercase word such as '<sks-shape>'.")


def _zeros_like_abstract(abstract):
  """Zeros in the shapes and dtypes of a `jax.eval_shape` of a Flax init, keeping its logical axis-name boxes."""
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


class Task(base.Task):
  """The fine-tune trainer (the interface: sd_jax/trainers/base.py)."""

  image_folder = True  # the data is finetune.data (a preference trainer reads pairs instead)

  def __init__(self, config):
    super().__init__(config)
    check_config(config, image_folder=self.image_folder)
    f = self.f = config.finetune
    self.base_dir = model_dir_lib.resolve_model(f.base, what="config.finetune.base", allow_pickle=f.allow_pickle)
    index = store.read_index(self.base_dir)
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in index["components"]]
    if missing or not (self.base_dir / "tokenizer" / "vocab.json").exists():
      raise ValueError(f"config.finetune.base={f.base}: {self.base_dir} is not a text-to-image Stable Diffusion model "
                       f"(missing {missing or ['tokenizer/']}).")
    compute = dict(dtype=f.frozen_dtype)
    nets = model_dir_lib.load_model(self.base_dir, ("unet", "vae", "text_encoder"), **compute)
    self.unet, self.unet_params = nets["unet"]
    self.vae, self.vae_params = nets["vae"]
    text, self.text_params = nets["text_encoder"]
    if not self.unet.has_cross_attention:
      raise ValueError(f"config.finetune.base={f.base}: its U-Net has no cross-attention (a pixel-space model?); "
                       "fine-tuning here is text-to-image.")
    self.clip_skip = store.read_clip_skip(self.base_dir)
    self.tokenizer = tokenizer_lib.load_clip_tokenizer(str(self.base_dir / "tokenizer"),
                                                       max_length=text.config.max_position_embeddings)
    self.base_vocab = text.config.vocab_size
    if f.new_tokens:
      ids = self.tokenizer.add_tokens(list(f.new_tokens))
      if ids != list(range(self.base_vocab, self.base_vocab + len(ids))):
        raise ValueError(f"config.finetune.new_tokens get ids {ids}, but the text tower embeds "
                         f"{self.base_vocab} ids: the base's tokenizer and text tower do not match.")
      text = text.clone(config=dataclasses.replace(text.config, vocab_size=self.base_vocab + len(ids)))
    self.text = text
    self._warn_known_instance_token()
    scheduler_file = self.base_dir / "scheduler" / "scheduler_config.json"
    self.scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}
    self.sampler_config = samplers.config_from_diffusers(self.scheduler_config, sampler=config.sample.sampler)
    self.schedule = samplers.noise_schedule(self.sampler_config)
    self.resolution = int(f.resolution or self.unet.sample_size * self.vae.downsample_factor)
    multiple = self.vae.downsample_factor * 2 ** (len(self.unet.block_out_channels) - 1)
    if self.resolution % multiple:
      raise ValueError(f"config.finetune.resolution={self.resolution}: the base's VAE and U-Net take multiples of "
                       f"{multiple}; e.g. {max(multiple, round(self.resolution / multiple) * multiple)}.")
    self.unet_spec = lora_lib.LoraSpec(rank=f.lora.rank, alpha=f.lora.alpha or None, dropout=f.lora.dropout,
                                       targets=tuple(lora_lib.UNET_TARGETS[f.lora.unet_targets]))
    self.text_spec = lora_lib.LoraSpec(rank=f.lora.rank, alpha=f.lora.alpha or None, dropout=f.lora.dropout,
                                       targets=tuple(lora_lib.TEXT_TARGETS))
    rng = jax.random.PRNGKey(0)  # shapes only
    self._unet_abstract = jax.eval_shape(self.unet.init, rng, **self.unet.example_inputs(1, self.text_len))["params"]
    self._vae_abstract = jax.eval_shape(self.vae.init, rng, **self.vae.example_inputs())["params"]
    base_text = self.text.clone(config=dataclasses.replace(self.text.config, vocab_size=self.base_vocab))
    self._text_abstract = jax.eval_shape(base_text.init, rng, **base_text.example_inputs())["params"]
    self.empty_tokens = self.tokenizer([""])  # [1, L]: the unconditional prompt
    self.data_dir: epath.Path | None = None  # WORKDIR/finetune_data, set by prepare_data
    self._generators: dict[Any, generate.TextToImage] = {}

  @property
  def text_len(self) -> int:
    return self.text.config.max_position_embeddings

  def _warn_known_instance_token(self) -> None:
    """DreamBooth's identifier should be a word the text tower knows little of ("sks"): warn when each word of the
    instance prompt is one common token of the tokenizer's vocabulary."""
    prompt = self.f.instance_prompt
    if not prompt or self.f.new_tokens:
      return
    rare = [w for w in prompt.lower().split() if len(self.tokenizer.tokenize(w)) > 1]
    if not rare:
      logging.warning("config.finetune.instance_prompt=%r: every word is a single known token of the tokenizer, so "
                      "the concept will be bound to words the model already uses (DreamBooth picks a rare "
                      "identifier, e.g. 'sks', or add a new token with finetune.new_tokens).", prompt)

  # -- data ----------------------------------------------------------------------------------------------------

  def prepare_data(self, workdir) -> None:
    """WORKDIR/finetune_data: metadata.jsonl listing the instance images (repeated to as many as the class images
    and at least one batch) and the class images (drawn here once, with prior preservation), and the tokenizer."""
    f = self.f
    out = epath.Path(workdir) / DATA_DIR
    self.data_dir = out
    instances = self._instance_records()
    class_records = self._class_images(out) if f.prior_preservation else []
    repeats = max(1, math.ceil(len(class_records) / len(instances)), math.ceil(self.config.batch_size / len(instances)))
    records = [r for _ in range(repeats) for r in instances] + class_records
    if jax.process_index() == 0:
      out.mkdir(parents=True, exist_ok=True)
      text = "".join(json.dumps(r) + "\n" for r in records)
      if not (out / folder_lib.METADATA_FILE).exists() or (out / folder_lib.METADATA_FILE).read_text() != text:
        (out / folder_lib.METADATA_FILE).write_text(text)
      tokenizer_dir = out / "tokenizer"
      store.copy_tree(self.base_dir / "tokenizer", tokenizer_dir)
      if self.tokenizer.added_tokens:
        self.tokenizer.save_added_tokens(str(tokenizer_dir))
    parallel.sync_processes("sd_jax_finetune_data")
    logging.info("Fine-tuning data: %d instance image(s) x %d, %d class image(s), in %s.", len(instances), repeats,
                 len(class_records), out)

  def _instance_records(self) -> list[dict[str, Any]]:
    """{"file_name": absolute path, "text": caption, "prior": 0} for every image of finetune.data."""
    f = self.f
    folder = os.path.abspath(os.path.expanduser(f.data))
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"config.finetune.data={f.data} is not a directory of images.")
    if os.path.exists(os.path.join(folder, folder_lib.METADATA_FILE)):
      source = folder_lib.ImageFolderSource(folder, folder_lib.DEFAULT_SPLIT, skip_corrupt=True)
      files = [os.path.join(source.folder, name) for name in source.file_names]
      captions = [f.instance_prompt or source.caption(i) for i in range(len(files))]
    else:
      files = _image_files(folder)
      if not files:
        raise ValueError(f"config.finetune.data={f.data} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no "
                         f"{folder_lib.METADATA_FILE}.")
      if not f.instance_prompt:
        raise ValueError(f"config.finetune.data={f.data} has no {folder_lib.METADATA_FILE} with captions: set "
                         "finetune.instance_prompt (e.g. 'a photo of sks dog') to caption every image with it.")
      captions = [f.instance_prompt] * len(files)
    return [{"file_name": path, "text": caption, "prior": 0} for path, caption in zip(files, captions)]

  def _class_images(self, out: epath.Path) -> list[dict[str, Any]]:
    """The class images of prior preservation, drawn by the base model with the one generation path: image i of
    finetune.class_seed, so the images drawn after a restart are those an uninterrupted run draws."""
    f = self.f
    directory = out / CLASS_IMAGES
    names = [f"{i:05d}.png" for i in range(f.num_class_images)]
    missing = [i for i, name in enumerate(names) if not (directory / name).exists()]
    if missing and jax.process_index() == 0:
      directory.mkdir(parents=True, exist_ok=True)
      pipe = generate.TextToImage.from_model_dir(self.base_dir)
      batch = max(1, int(f.class_batch_size))
      logging.info("Drawing %d class image(s) of %r with the base model into %s.", len(missing), f.class_prompt,
                   directory)
      done = f.num_class_images - len(missing)
      for start in range(0, len(missing), batch):
        chunk = missing[start:start + batch]
        # Each image is keyed by its own index (first_index), so a run of missing ones is drawn as one call draws it.
        runs = np.split(np.asarray(chunk), np.flatnonzero(np.diff(chunk) != 1) + 1)
        for run in runs:
          images = pipe.generate([f.class_prompt] * len(run), steps=f.class_steps, guidance=f.class_guidance,
                                 seed=f.class_seed, first_index=int(run[0]), sampler=self.config.sample.sampler,
                                 height=self.resolution, width=self.resolution, batch_size=batch)
          for i, image in zip(run, images, strict=True):
            images_lib.save_png(image, directory / names[int(i)])
        done += len(chunk)
        logging.info("Class images: %d / %d.", done, f.num_class_images)
    parallel.sync_processes("sd_jax_finetune_class_images")
    return [{"file_name": f"{CLASS_IMAGES}/{name}", "text": f.class_prompt, "prior": 1} for name in names]

  def dataset_config(self) -> ml_collections.ConfigDict:
    dataset = ml_collections.ConfigDict(self.config.dataset.to_dict())
    if self.data_dir is not None:  # after prepare_data
      dataset.folder = str(self.data_dir)
      dataset.tokenizer = str(self.data_dir / "tokenizer")
    dataset.name = "folder"
    dataset.text_key = "caption"
    dataset.label_key = "prior"
    dataset.train_split = dataset.eval_split = folder_lib.DEFAULT_SPLIT
    dataset.resolution = self.resolution
    dataset.max_text_len = self.text_len
    return dataset

  # -- params --------------------------------------------------------------------------------------------------

  def init_params(self, rng):
    f = self.f
    unet_rng, text_rng = jax.random.split(rng)
    params: dict[str, Any] = {}
    # A full network: zeros with the init's shapes, dtypes and axis names (`initial_params` puts the base's weights
    # in). Drawing random weights that are thrown away would cost a random draw per array and, far more, compiling
    # it (the tiny ddpm test U-Net's init: 4.7 s of XLA compiling on the CPU with its random draws, 0.2 s without).
    if f.unet == "full":
      params["unet"] = _zeros_like_abstract(self._unet_abstract)
    elif f.unet == "lora":
      params["unet_lora"] = lora_lib.init(unet_rng, self.unet_params, self.unet_spec)
    if f.text_encoder == "full":
      params["text_encoder"] = _zeros_like_abstract(self._text_abstract)
    elif f.text_encoder == "lora":
      params["text_lora"] = lora_lib.init(text_rng, self.text_params, self.text_spec)
    if f.new_tokens:
      params["token_embeddings"] = jnp.asarray(self._initial_token_rows())
    return params

  def initial_params(self, params, shardings):
    """A full U-Net / text tower starts from the base's weights, restored onto the params' shardings."""
    f, out = self.f, None
    for name, mode in (("unet", f.unet), ("text_encoder", f.text_encoder)):
      if mode == "full":
        out = dict(params) if out is None else out
        _, out[name] = store.load_component(self.base_dir, name, shardings=shardings[name])
    return out

  def _initial_token_rows(self) -> np.ndarray:
    """[n, D]: each new token starts as the mean embedding of finetune.initializer's tokens (textual inversion's
    initializer word), or of the whole table when it is empty."""
    table = np.asarray(_get(self.text_params, _TOKEN_TABLE), np.float32)
    if self.f.initializer:
      ids = [i for i in self.tokenizer([self.f.initializer])[0] if i not in (self.tokenizer.bos_id,
                                                                            self.tokenizer.eos_id,
                                                                            self.tokenizer.pad_id)]
      row = table[ids].mean(axis=0)
    else:
      row = table.mean(axis=0)
    return np.repeat(row[None], len(self.f.new_tokens), axis=0)

  def frozen_abstract(self):
    frozen = {"vae": self._vae_abstract}
    if self.f.unet != "full":
      frozen["unet"] = self._unet_abstract
    if self.f.text_encoder != "full":
      frozen["text_encoder"] = self._text_abstract
    return frozen

  def load_frozen(self):
    def check(abstract, params, what):
      return weights_common.check_params(nn.meta.unbox(abstract), weights_common.flatten(params), what=what)

    frozen = {"vae": check(self._vae_abstract, self.vae_params, f"{self.base_dir}/vae weights")}
    if self.f.unet != "full":
      frozen["unet"] = check(self._unet_abstract, self.unet_params, f"{self.base_dir}/unet weights")
    if self.f.text_encoder != "full":
      frozen["text_encoder"] = check(self._text_abstract, self.text_params, f"{self.base_dir}/text_encoder weights")
    return frozen

  # -- the networks with what trains applied --------------------------------------------------------------------

  def text_params_of(self, params, frozen):
    """The text tower's params: the trained or frozen tower, with the new tokens' rows appended to its table."""
    text = params["text_encoder"] if self.f.text_encoder == "full" else frozen["text_encoder"]
    if self.f.new_tokens:
      table = _get(text, _TOKEN_TABLE)
      text = _set(text, _TOKEN_TABLE, jnp.concatenate([table, params["token_embeddings"].astype(table.dtype)]))
    return text

  def encode_text(self, params, frozen, tokens):
    """Context [B, L, D] of token ids, with the text LoRA (if any) applied."""
    text = self.text_params_of(params, frozen)

    def run():
      return self.text.apply({"params": text}, tokens, clip_skip=self.clip_skip or None, method="encode")

    if self.f.text_encoder == "lora":
      with lora_lib.applied(params["text_lora"], self.text_spec.scale):
        return run()
    return run()

  def unet_fn(self, params, frozen):
    """(x_t, t, context, dropout key) -> the U-Net's output, with the U-Net LoRA (and its dropout) applied."""
    unet_params = params["unet"] if self.f.unet == "full" else frozen["unet"]

    def fn(x_t, t, context, dropout_key):
      kwargs = dict(train=True, rngs={"dropout": dropout_key}) if self.unet.dropout > 0 else {}
      if self.f.unet == "lora":
        with lora_lib.applied(params["unet_lora"], self.unet_spec.scale, dropout=self.unet_spec.dropout,
                              rng=jax.random.fold_in(dropout_key, 1)):
          return self.unet.apply({"params": unet_params}, x_t, t, context, **kwargs)
      return self.unet.apply({"params": unet_params}, x_t, t, context, **kwargs)

    return fn

  # -- loss ----------------------------------------------------------------------------------------------------

  def per_example_loss(self, params, frozen, batch, keys, caption_dropout):
    posterior = self.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
    context = self.encode_text(params, frozen, batch["tokens"])
    empty = self.encode_text(params, frozen, self.empty_tokens)
    return losses.latent_diffusion_loss(
        self.unet_fn(params, frozen), self.schedule, posterior, context, empty, keys,
        scale_latents=self.vae.scale_latents, caption_dropout=caption_dropout,
        prediction_type=self.sampler_config.prediction_type, min_snr_gamma=self.f.min_snr_gamma,
        offset_noise_strength=self.f.offset_noise)

  def _combine(self, per_example, prior_flags):
    """mean over instance examples + prior_loss_weight · mean over class examples (each 0 when absent)."""
    prior = prior_flags.astype(jnp.float32)
    instance = 1.0 - prior
    instance_loss = jnp.sum(instance * per_example) / jnp.maximum(jnp.sum(instance), 1.0)
    prior_loss = jnp.sum(prior * per_example) / jnp.maximum(jnp.sum(prior), 1.0)
    return instance_loss + self.f.prior_loss_weight * prior_loss, instance_loss, prior_loss

  def loss(self, params, frozen, batch, keys, step=None):
    per_example, metrics = self.per_example_loss(params, frozen, batch, keys, self.f.caption_dropout)
    loss, instance_loss, prior_loss = self._combine(per_example, batch["label"])
    metrics = dict(metrics, instance_loss=instance_loss)
    if self.f.prior_preservation:
      metrics["prior_loss"] = prior_loss
    return loss, metrics

  def eval_metrics(self, params, frozen, batch, keys):
    per_example, _ = self.per_example_loss(params, frozen, batch, keys, 0.0)
    loss, instance_loss, _ = self._combine(per_example, batch["label"])
    return {"loss": loss, "instance_loss": instance_loss}

  # -- sampling ------------------------------------------------------------------------------------------------

  def sample_prompts(self) -> list[str]:
    s = self.config.sample
    if s.prompts:
      return [str(p) for p in s.prompts]
    prompts = [self.f.instance_prompt] if self.f.instance_prompt else []
    prompts += [f"a photo of {t}" for t in self.f.new_tokens]
    if self.f.prior_preservation:
      prompts.append(self.f.class_prompt)
    return prompts or [""]

  def generator(self, mesh=None) -> generate.TextToImage:
    """The one generation path over the fine-tuned networks (parameters passed per call: `generation_params`)."""
    key = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
    if key not in self._generators:
      components = {"unet": (self.unet, None), "vae": (self.vae, None), "text_encoder": (self.text, None)}
      self._generators[key] = generate.TextToImage(components, self.tokenizer, self.scheduler_config,
                                                   clip_skip=self.clip_skip, mesh=mesh)
    return self._generators[key]

  def generation_params(self, params, frozen) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder"}: the trained state merged into plain networks (LoRA merged at its scale)."""
    unet = params["unet"] if self.f.unet == "full" else frozen["unet"]
    if self.f.unet == "lora":
      unet = lora_lib.merge(unet, params["unet_lora"], self.unet_spec.scale)
    text = self.text_params_of(params, frozen)
    if self.f.text_encoder == "lora":
      text = lora_lib.merge(text, params["text_lora"], self.text_spec.scale)
    return {"unet": unet, "vae": frozen["vae"], "text_encoder": text}

  def sample_grid(self, params, ctx):
    s = self.config.sample
    prompts = self.sample_prompts()
    merged = jax.jit(self.generation_params)(params, ctx.frozen)
    images = self.generator(ctx.mesh).generate(prompts, num_images=s.images_per_prompt, steps=s.num_steps,
                                               guidance=s.guidance_scale, seed=self.config.seed,
                                               sampler=self.sampler_config.sampler, params=merged)
    images = images.reshape(len(prompts), s.images_per_prompt, *images.shape[1:])
    return images_lib.labeled_grid(images, prompts, tile=s.tile_size)

  # -- export --------------------------------------------------------------------------------------------------

  def export(self, host_state, ctx):
    """WORKDIR/export: LoRA files, embeddings, or a model directory (module docstring), and finetune.json."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    f = self.f
    params = host_state.ema_params if host_state.ema_params is not None else host_state.params
    out = epath.Path(ctx.workdir) / EXPORT_DIR
    primary = jax.process_index() == 0
    files: dict[str, str] = {}
    if primary:
      out.mkdir(parents=True, exist_ok=True)
      adapters = {}
      if f.unet == "lora":
        adapters["unet"] = jax.tree.map(np.asarray, params["unet_lora"])
      if f.text_encoder == "lora":
        adapters["text_encoder"] = jax.tree.map(np.asarray, params["text_lora"])
      if adapters:
        lora_weights.save_diffusers(out / LORA_FILE, adapters, self.unet_spec.scale)
        lora_weights.save_kohya(out / KOHYA_FILE, adapters, self.unet_spec)
        files.update(diffusers_lora=LORA_FILE, kohya_lora=KOHYA_FILE)
      if f.new_tokens:
        rows = np.asarray(params["token_embeddings"], np.float32)
        lora_weights.save_embeddings(out / EMBEDDINGS_FILE, {t: rows[i:i + 1] for i, t in enumerate(f.new_tokens)})
        files["embeddings"] = EMBEDDINGS_FILE
    multihost_utils.sync_global_devices("finetune_export_files")
    if f.unet == "full" or f.text_encoder == "full":
      self._export_model_dir(params, ctx, out)
      files["model"] = "."
    if primary:
      summary = {"base": str(f.base), "base_dir": str(self.base_dir), "unet": f.unet, "text_encoder": f.text_encoder,
                 "new_tokens": list(f.new_tokens), "instance_prompt": f.instance_prompt,
                 "lora": {"rank": self.unet_spec.rank, "alpha": self.unet_spec.alpha or self.unet_spec.rank,
                          "unet_targets": f.lora.unet_targets} if "diffusers_lora" in files else None,
                 "step": int(np.asarray(host_state.step)), "files": files,
                 "bytes": {k: (out / v).stat().length for k, v in files.items() if v != "."}}
      (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
      logging.info("Exported %s to %s.", ", ".join(files) or "nothing", out)
    multihost_utils.sync_global_devices("finetune_export_done")

  def _export_model_dir(self, params, ctx, out: epath.Path) -> None:
    """A full fine-tune (U-Net and/or text tower) as an sd_jax model directory beside the other files."""
    f = self.f
    primary = jax.process_index() == 0
    unet_params = params["unet"] if f.unet == "full" else self.unet_params
    if f.unet == "lora":  # a full text tower with a LoRA U-Net: the model directory holds the merged U-Net
      unet_params = jax.device_get(lora_lib.merge(unet_params, params["unet_lora"], self.unet_spec.scale))
    fields = {k: getattr(self.unet, k) for k in self.unet.__dataclass_fields__ if k not in ("parent", "name")}
    store.save_component(out, "unet", unet_lib.unet_config_to_diffusers(fields), unet_params, overwrite=True)
    text = self.text_params_of(params, {"text_encoder": self.text_params})
    if f.text_encoder == "lora":
      text = lora_lib.merge(text, params["text_lora"], self.text_spec.scale)
    text = jax.device_get(text)
    store.save_component(out, "text_encoder", clip_lib.clip_config_to_transformers(self.text.config), text,
                         overwrite=True)
    if primary:
      for name in ("vae", "scheduler"):
        if (self.base_dir / name).exists():
          if (out / name).exists():
            store.remove_tree(out / name)
          store.copy_tree(self.base_dir / name, out / name)
      if (out / "tokenizer").exists():
        store.remove_tree(out / "tokenizer")
      store.copy_tree(self.base_dir / "tokenizer", out / "tokenizer")
      if self.tokenizer.added_tokens:
        self.tokenizer.save_added_tokens(str(out / "tokenizer"))
      store.write_index(out, {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"},
                        source=f"sd_jax fine-tune of {f.base} in {ctx.workdir}", text_clip_skip=self.clip_skip)
