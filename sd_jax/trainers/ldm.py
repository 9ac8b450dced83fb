"""Latent diffusion (Rombach et al. 2022): the Stable Diffusion U-Net trained on a frozen VAE's latents, conditioned
on a CLIP text tower (frozen, or fine-tuned with `ldm.train_text_encoder`).

One step, per example and from that example's key only (so every mesh gives the same losses):

    z ~ q(z | image) (VAE encoder, frozen)            latents = vae.scale_latents(z)
    context = text.encode(tokens, clip_skip)          with probability ldm.caption_dropout: the empty prompt's
                                                      context instead (what classifier-free guidance needs)
    t ~ U{0..T-1}, ε (+ offset noise)                 x_t = sqrt(ᾱ_t) latents + sqrt(1 - ᾱ_t) ε
    loss = (min-SNR-γ weighted) MSE of U-Net(x_t, t, context) against ε or v

The VAE and the text tower (with its tokenizer) come from sd_jax model directories, `ldm.vae_from` and
`ldm.text_from`: a VAE / CLIP run's WORKDIR/export, or `python -m sd_jax.convert --from_diffusers DIR --out OUT`.
A missing or wrong directory fails before anything compiles; nothing here ever falls back to random weights. The U-Net
fields that the frozen networks decide (in/out channels, context width, latent size) are taken from them when the
config leaves them None, and checked against them when it sets them.

Params are the U-Net's own tree, so `--config.init_from=MODEL_DIR/unet` fine-tunes an imported Stable Diffusion; with
`ldm.train_text_encoder` they are {"unet": ..., "text_encoder": ...}. Evaluation: held-out loss, and sample grids of
fixed prompts drawn with the EMA params (DDIM + classifier-free guidance, sd_jax/diffusion/ddim.py) and decoded by the
VAE. At the end `export` writes WORKDIR/export, a complete sd_jax model directory (U-Net, VAE, text tower, tokenizer,
scheduler) that `load_model` and `python -m sd_jax.convert --to_diffusers` read.

Precomputed latents: with `ldm.precompute_dir` (tied to `dataset.precomputed_dir` in configs/shapes_ldm.py) the
run first encodes the train and eval splits once (`precompute`, sd_jax/data/precomputed.py: VAE posteriors and text
contexts), and then trains from them; a later run with the same networks and data reuses them, one with other
networks or data is refused. Each step still draws its own posterior sample. The stored tokens let a run that
fine-tunes the text tower (`ldm.train_text_encoder`) read the latents too: it encodes the tokens with its own tower
and ignores the stored contexts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from sd_jax import images as images_lib
from sd_jax import train as train_lib
from sd_jax.data import input_pipeline
from sd_jax.data import precomputed as precomputed_lib
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.diffusion import ddim
from sd_jax.diffusion import losses
from sd_jax.diffusion import schedules
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.trainers import ddpm
from sd_jax.weights import common as weights_common
from sd_jax.weights import model_dir as model_dir_lib
from sd_jax.weights import store

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json")
# The per-example random draws of one step, in the order the example key is split.
_DRAWS = ("latent", "caption_drop", "timestep", "noise", "dropout")


# ---------------------------------------------------------------------------------------------------------------
# The frozen networks


def _model_dir(path: str, component: str, key: str, producer: str) -> epath.Path:
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
    self.vae_dir = _model_dir(ldm.vae_from, "vae", "config.ldm.vae_from", "a VAE run's WORKDIR/export")
    self.text_dir = _model_dir(ldm.text_from, "text_encoder", "config.ldm.text_from", "a CLIP run's WORKDIR/export")
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


def _unet_fields(config, nets: FrozenNetworks) -> dict[str, Any]:
  """config.model with the fields the frozen networks decide filled in (None) or checked (set)."""
  fields = config.model.to_dict()
  derived = {
      "in_channels": (nets.vae.latent_channels, "the VAE's latent_channels"),
      "out_channels": (nets.vae.latent_channels, "the VAE's latent_channels"),
      "cross_attention_dim": (nets.text.config.hidden_size, "the text tower's hidden_size"),
      "sample_size": (nets.latent_size, "dataset.resolution / the VAE's downsampling factor"),
  }
  for key, (value, source) in derived.items():
    given = fields.get(key)
    if given is None:
      fields[key] = value
      continue
    values = set(given) if isinstance(given, (list, tuple)) else {given}
    if values != {value}:
      raise ValueError(f"config.model.{key}={given!r}, but {source} is {value}. Set --config.model.{key}={value}, "
                       "or None to take it from the frozen networks.")
  return fields


def _check_config(config) -> None:
  """Value checks that need no files. Raises ValueError naming the key."""
  ldm, d, s = config.ldm, config.diffusion, config.sample
  if not 0.0 <= ldm.caption_dropout <= 1.0:
    raise ValueError(f"config.ldm.caption_dropout={ldm.caption_dropout}: a probability in [0, 1].")
  if ldm.clip_skip < 0:
    raise ValueError(f"config.ldm.clip_skip={ldm.clip_skip}: must be >= 0 (0 = the last layer).")
  schedules.check_prediction_type(d.prediction_type)
  if d.zero_terminal_snr and d.prediction_type == "epsilon":
    raise ValueError("config.diffusion.zero_terminal_snr=True with prediction_type='epsilon': at zero SNR an epsilon "
                     "model cannot recover x0 (sampling divides by sqrt(ᾱ) = 0). Use prediction_type='v_prediction'.")
  if s.timestep_spacing not in ddim.TIMESTEP_SPACINGS:
    raise ValueError(f"config.sample.timestep_spacing={s.timestep_spacing!r}: use one of {ddim.TIMESTEP_SPACINGS}.")
  if not 1 <= s.num_steps <= d.num_train_timesteps:
    raise ValueError(f"config.sample.num_steps={s.num_steps}: must be in [1, {d.num_train_timesteps}].")


def _with_boxes(abstract, values):
  """`values` (host arrays) wrapped in the logical-axis boxes of `abstract` (the same tree, from eval_shape)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(
      lambda box, value: (box.replace_boxed(jnp.asarray(value, box.unbox().dtype)) if is_box(box)
                          else jnp.asarray(value, box.dtype)), abstract, values, is_leaf=is_box)


# ---------------------------------------------------------------------------------------------------------------
# The trainer


class Task:
  """The ldm trainer's model, loss, evaluation and export (see sd_jax/trainers/__init__.py for the interface)."""

  def __init__(self, config):
    self.config = config
    _check_config(config)
    self.nets = FrozenNetworks(config)
    if config.ldm.precompute_dir != config.dataset.get("precomputed_dir", ""):
      raise ValueError(
          f"config.ldm.precompute_dir={config.ldm.precompute_dir!r} but config.dataset.precomputed_dir="
          f"{config.dataset.get('precomputed_dir', '')!r}: the batches must be read from where the latents are "
          "written. configs/shapes_ldm.py ties the two; set both to the same directory (or both to '').")
    self.vae, self.text = self.nets.vae, self.nets.text
    self.train_text = bool(config.ldm.train_text_encoder)
    self.model = unet_lib.create_unet(_unet_fields(config, self.nets))
    if not self.model.has_cross_attention:
      raise ValueError("config.model has no cross-attention block: an ldm U-Net must attend to the text context.")
    self.schedule = ddpm.make_schedule(config.diffusion)
    self.text_len = config.dataset.max_text_len
    rng = jax.random.PRNGKey(0)  # shapes only
    self._vae_abstract = jax.eval_shape(self.vae.init, rng, **self.vae.example_inputs())["params"]
    self._text_abstract = jax.eval_shape(self.text.init, rng, **self.text.example_inputs())["params"]
    self._sample_fn = None  # jitted sample grid, compiled at the first evaluation
    self._prompts = None
    self._evaluator = None  # the shapes evaluator, loaded at the first evaluation that uses it

  def prepare_data(self) -> None:
    """With ldm.precompute_dir: encodes the train and eval splits once (reused by later runs; see `precompute`)."""
    if self.config.ldm.precompute_dir:
      precompute(self.config, nets=self.nets)

  # -- params --------------------------------------------------------------------------------------------------

  def init_params(self, rng):
    unet_params = self.model.init(rng, **self.model.example_inputs(1, self.text_len))["params"]
    if not self.train_text:
      return unet_params
    # The tuned text tower starts from its pretrained weights (they enter the jitted init as constants).
    return {"unet": unet_params, "text_encoder": _with_boxes(self._text_abstract, self.nets.text_params)}

  def frozen_abstract(self):
    frozen = {"vae": self._vae_abstract}
    if not self.train_text:
      frozen["text_encoder"] = self._text_abstract
    return frozen

  def load_frozen(self):
    check = lambda abstract, params, what: weights_common.check_params(  # noqa: E731
        nn.meta.unbox(abstract), weights_common.flatten(params), what=what)
    frozen = {"vae": check(self._vae_abstract, self.nets.vae_params, f"{self.nets.vae_dir}/vae weights")}
    if not self.train_text:
      frozen["text_encoder"] = check(self._text_abstract, self.nets.text_params,
                                     f"{self.nets.text_dir}/text_encoder weights")
    return frozen

  def split_params(self, params, frozen):
    """(U-Net params, text tower params) from the trained params and the frozen networks."""
    if self.train_text:
      return params["unet"], params["text_encoder"]
    return params, frozen["text_encoder"]

  # -- loss ----------------------------------------------------------------------------------------------------

  def _draw_keys(self, keys) -> dict[str, jax.Array]:
    """Each example's key [B, 2] split into one key per random draw of the step (see _DRAWS)."""
    split = jax.vmap(lambda k: jax.random.split(k, len(_DRAWS)))(keys)  # [B, len(_DRAWS), 2]
    return {name: split[:, i] for i, name in enumerate(_DRAWS)}

  def caption_drop_mask(self, keys, rate) -> jax.Array:
    """bool [B]: the examples whose caption the step replaces by the empty prompt (probability `rate` each)."""
    return jax.vmap(lambda k: jax.random.uniform(k) < rate)(self._draw_keys(keys)["caption_drop"])

  def _posterior(self, frozen, batch) -> vae_lib.DiagonalGaussian:
    if "latent_mean" in batch:  # a precomputed batch (sd_jax/data/precomputed.py)
      return vae_lib.DiagonalGaussian(mean=batch["latent_mean"].astype(jnp.float32),
                                      logvar=batch["latent_logvar"].astype(jnp.float32))
    return self.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")

  def per_example_loss(self, params, frozen, batch, keys, caption_dropout):
    """Per-example losses [B] and batch metrics. `batch` holds images + tokens, or precomputed posteriors +
    contexts; `caption_dropout` may be traced."""
    d = self.config.diffusion
    draws = self._draw_keys(keys)
    unet_params, text_params = self.split_params(params, frozen)

    posterior = self._posterior(frozen, batch)
    z = jax.vmap(lambda p, k: p.sample(k))(posterior, draws["latent"])  # one posterior sample per example
    latents = self.vae.scale_latents(z)                                  # [B, h, w, c]

    if "context" in batch and not self.train_text:
      context = batch["context"]  # precomputed by the frozen tower
    else:
      context = self.nets.encode_text(text_params, batch["tokens"])
    empty = self.nets.encode_text(text_params, self.nets.empty_tokens)   # [1, L, D]
    drop = self.caption_drop_mask(keys, caption_dropout)
    context = jnp.where(drop[:, None, None], empty.astype(context.dtype), context)

    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, d.num_train_timesteps))(draws["timestep"])
    noise = jax.vmap(lambda k: losses.offset_noise(k, (1,) + latents.shape[1:], d.offset_noise)[0])(draws["noise"])
    x_t = schedules.add_noise(self.schedule, latents, noise, t)
    train_kwargs = {}
    if self.model.dropout > 0:
      train_kwargs = dict(train=True, rngs={"dropout": draws["dropout"][0]})
    model_output = self.model.apply({"params": unet_params}, x_t, t, context, **train_kwargs)
    per_example = losses.diffusion_loss(model_output, latents, noise, t, self.schedule,
                                        prediction_type=d.prediction_type, min_snr_gamma=d.min_snr_gamma,
                                        reduce=False)
    # latents_std ≈ 1 when the VAE's scaling_factor is right (SD measured 0.18215 this way).
    metrics = {"latents_std": jnp.std(latents), "caption_dropout_rate": jnp.mean(drop.astype(jnp.float32))}
    return per_example, metrics

  def loss(self, params, frozen, batch, keys):
    per_example, metrics = self.per_example_loss(params, frozen, batch, keys, self.config.ldm.caption_dropout)
    return jnp.mean(per_example), metrics

  def eval_metrics(self, params, frozen, batch, keys):
    per_example, _ = self.per_example_loss(params, frozen, batch, keys, 0.0)  # conditional held-out loss
    return {"loss": jnp.mean(per_example)}

  # -- sampling ------------------------------------------------------------------------------------------------

  def sample_prompts(self) -> list[str]:
    """config.sample.prompts, else the first sample.num_prompts captions of the held-out split."""
    if self._prompts is None:
      s = self.config.sample
      if s.prompts:
        self._prompts = [str(p) for p in s.prompts]
      else:
        info = input_pipeline.dataset_info(self.config.dataset, self.config.dataset.eval_split)
        self._prompts = [info.captions(i) for i in range(min(s.num_prompts, info.num_examples))]
    return self._prompts

  def _sample_images(self, params, frozen, tokens, rng):
    """tokens [N, L] -> images [N, H, W, 3] in [-1, 1]: DDIM with classifier-free guidance, then the VAE decoder."""
    s, d = self.config.sample, self.config.diffusion
    unet_params, text_params = self.split_params(params, frozen)
    context = self.nets.encode_text(text_params, tokens)
    uncond = self.nets.encode_text(text_params, self.nets.empty_tokens)
    model_fn = lambda x, t, c: self.model.apply({"params": unet_params}, x, t, c)  # noqa: E731
    guided = ddim.classifier_free_guidance(model_fn, context, uncond, s.guidance_scale)
    shape = (tokens.shape[0], self.nets.latent_size, self.nets.latent_size, self.vae.latent_channels)
    latents = ddim.ddim_sample(guided, self.schedule, rng, shape, num_inference_steps=s.num_steps, eta=s.eta,
                               prediction_type=d.prediction_type, timestep_spacing=s.timestep_spacing,
                               steps_offset=s.steps_offset, set_alpha_to_one=s.set_alpha_to_one)
    images = self.vae.apply({"params": frozen["vae"]}, self.vae.unscale_latents(latents), method="decode")
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

  def sample(self, params, frozen, prompts: Sequence[str], rng, mesh=None, images_per_prompt: int | None = None
             ) -> np.ndarray:
    """uint8 [P, K, H, W, 3]: K = sample.images_per_prompt images for each prompt (EMA params in evaluation)."""
    k = images_per_prompt or self.config.sample.images_per_prompt
    tokens = np.repeat(self.nets.tokenizer(list(prompts)), k, axis=0)
    if self._sample_fn is None:
      # Replicated output: every process can read the images (multi-host).
      out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
      self._sample_fn = jax.jit(self._sample_images, out_shardings=out)
    images = np.asarray(jax.device_get(self._sample_fn(params, frozen, tokens, rng)))
    return images_lib.to_uint8(images).reshape(len(prompts), k, *images.shape[1:])

  def shapes_accuracy(self, params, frozen, rng, mesh=None) -> dict[str, float]:
    """eval_shapes_acc_{split}: the fraction of images drawn for the first sample.shapes_eval_prompts captions of
    each held-out split that show every shape the caption names, colour and kind (sd_jax/eval/shapes_eval.py)."""
    from sd_jax.eval import shapes_eval  # pylint: disable=import-outside-toplevel
    s = self.config.sample
    if self._evaluator is None:
      self._evaluator = shapes_eval.load_evaluator(s.shapes_evaluator)
    results = {}
    for split in (self.config.dataset.eval_split, "compositional"):
      info = input_pipeline.dataset_info(self.config.dataset, split)
      prompts = [info.captions(i) for i in range(min(s.shapes_eval_prompts, info.num_examples))]
      images = self.sample(params, frozen, prompts, rng, mesh, images_per_prompt=1)[:, 0]
      results[f"eval_shapes_acc_{split}"] = float(self._evaluator.score(images, prompts).accuracy)
    return results

  def on_eval(self, step, state, ctx):
    """Shapes accuracy of samples (with sample.shapes_evaluator) and a labelled sample grid with the EMA params:
    WORKDIR/samples/step_*.png and TensorBoard."""
    params = state.ema_params if state.ema_params is not None else state.params
    results = {}
    s = self.config.sample
    if s.get("shapes_evaluator") and s.get("shapes_eval_prompts", 0) > 0 and self.config.dataset.name == "shapes":
      results = self.shapes_accuracy(params, ctx.frozen, jax.random.PRNGKey(self.config.seed + 1), ctx.mesh)
    if not train_lib.due(step, self.config.sample_every_steps, step == self.config.total_steps):
      return results
    prompts = self.sample_prompts()
    images = self.sample(params, ctx.frozen, prompts, jax.random.PRNGKey(self.config.seed), ctx.mesh)
    grid = images_lib.labeled_grid(images, prompts, tile=self.config.sample.tile_size)
    if jax.process_index() == 0:
      out = epath.Path(ctx.workdir) / "samples"
      out.mkdir(parents=True, exist_ok=True)
      images_lib.save_png(grid, out / f"step_{step:07d}.png")
      ctx.writer.write_image(step, "samples", grid)
    return results

  # -- export --------------------------------------------------------------------------------------------------

  def scheduler_config(self) -> dict[str, Any]:
    """diffusers DDIMScheduler config describing the training schedule (and the grid sampler's settings)."""
    d, s = self.config.diffusion, self.config.sample
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": d.num_train_timesteps,
              "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(d.schedule, d.schedule),
              "beta_start": d.beta_start, "beta_end": d.beta_end, "prediction_type": d.prediction_type,
              "rescale_betas_zero_snr": bool(d.zero_terminal_snr), "timestep_spacing": s.timestep_spacing,
              "steps_offset": s.steps_offset, "set_alpha_to_one": bool(s.set_alpha_to_one), "clip_sample": False}
    snr_shift = float(d.get("snr_shift", 1.0))
    if snr_shift != 1.0:  # diffusers has no SNR shift: the shifted table itself (rescaled after, as in training)
      config["trained_betas"] = [float(b) for b in schedules.shifted_betas(
          d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end, snr_shift)]
    return config

  def export(self, host_state, ctx):
    """WORKDIR/export: the EMA U-Net (and tuned text tower), the VAE, text tower and tokenizer it was trained with,
    and the scheduler: a complete sd_jax model directory. Written beside and renamed into place when complete."""
    from jax.experimental import multihost_utils
    workdir = epath.Path(ctx.workdir)
    final, tmp = workdir / "export", workdir / "export.tmp"
    primary = jax.process_index() == 0
    params = host_state.ema_params if host_state.ema_params is not None else host_state.params
    unet_params = params["unet"] if self.train_text else params
    if primary and tmp.exists():
      store.remove_tree(tmp)
    multihost_utils.sync_global_devices("ldm_export_start")
    fields = {f: getattr(self.model, f) for f in self.model.__dataclass_fields__ if f not in ("parent", "name")}
    # orbax coordinates the processes: all of them call save_component.
    store.save_component(tmp, "unet", unet_lib.unet_config_to_diffusers(fields), unet_params)
    if self.train_text:
      store.save_component(tmp, "text_encoder", clip_lib.clip_config_to_transformers(self.text.config),
                           params["text_encoder"])
    if primary:
      store.copy_tree(self.nets.vae_dir / "vae", tmp / "vae")
      if not self.train_text:
        store.copy_tree(self.nets.text_dir / "text_encoder", tmp / "text_encoder")
      store.copy_tree(self.nets.text_dir / "tokenizer", tmp / "tokenizer")
      (tmp / "scheduler").mkdir()
      (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config(), indent=2))
      store.write_index(tmp, {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"},
                        source=f"sd_jax ldm run {workdir} at step {int(host_state.step)}",
                        text_clip_skip=self.nets.clip_skip)
      if final.exists():
        store.remove_tree(final)
      tmp.rename(final)
      logging.info("Exported the model to %s.", final)
    multihost_utils.sync_global_devices("ldm_export_done")


# ---------------------------------------------------------------------------------------------------------------
# Precomputed latents (one-off)


def _fingerprint(config, nets: FrozenNetworks, split: str) -> dict[str, Any]:
  """What precomputed data depends on; a mismatch on reuse is an error."""
  ds = config.dataset
  keys = ("name", "shapes_config", "tfds_name", "folder", "image_key", "text_key", "label_key", "caption_template",
          "resolution", "crop", "max_text_len")
  fingerprint = {"vae_from": str(nets.vae_dir), "text_from": str(nets.text_dir), "clip_skip": nets.clip_skip,
                 "frozen_dtype": str(config.ldm.frozen_dtype), "split": split, **{k: ds[k] for k in keys}}
  return json.loads(json.dumps(fingerprint, default=str))


def precompute(config, out_dir: str | None = None, splits: Sequence[str] | None = None,
               nets: FrozenNetworks | None = None) -> epath.Path:
  """Encodes the training and held-out splits once: VAE posteriors (mean, log-variance) and text contexts, stored
  with the captions' tokens.

  Written to `out_dir` (default config.ldm.precompute_dir) in sd_jax/data/precomputed.py's layout; a split already
  there from the same networks and data is reused, one from others is an error. Runs on process 0's default device.
  """
  from jax.experimental import multihost_utils
  out = out_dir or config.ldm.precompute_dir
  if not out:
    raise ValueError("precompute needs an output directory: set config.ldm.precompute_dir or pass out_dir.")
  if config.dataset.crop == "random" or config.dataset.random_flip:
    raise ValueError("config.dataset.crop='random' / random_flip would be frozen into the precomputed latents; "
                     "precompute from centre crops without flips.")
  nets = nets or FrozenNetworks(config)
  encode = jax.jit(nets.encode)
  for split in splits or (config.dataset.train_split, config.dataset.eval_split):
    if precomputed_lib.check_fingerprint(out, split, _fingerprint(config, nets, split)):
      if config.ldm.train_text_encoder and not precomputed_lib.PrecomputedSource(out, split).has_tokens:
        raise ValueError(f"{precomputed_lib.split_dir(out, split)} was written without the tokens that "
                         "config.ldm.train_text_encoder=True re-encodes (an older sd_jax). Delete it to recompute, "
                         "or choose another config.ldm.precompute_dir.")
      logging.info("Precomputed %s split found in %s; reusing it.", split, out)
      continue
    if jax.process_index() == 0:
      logging.info("Precomputing the %s split into %s.", split, out)
      info = input_pipeline.dataset_info(config.dataset, split)
      source = ml_collections.ConfigDict(config.dataset.to_dict())
      source.precomputed_dir = ""  # read the images themselves
      batches = input_pipeline.create_iterator(source, split=split, global_batch_size=config.batch_size,
                                              seed=config.seed, train=False, process_index=0, process_count=1)
      try:
        precomputed_lib.write_split(
            out, split, batches, lambda b: encode(nets.vae_params, nets.text_params, b),
            num_examples=info.num_examples, fingerprint=_fingerprint(config, nets, split),
            captions_fn=lambda tokens: [nets.tokenizer.decode(t) for t in tokens], dtype=config.ldm.precompute_dtype)
      finally:
        batches.close()
    multihost_utils.sync_global_devices(f"ldm_precompute_{split}")
  return epath.Path(out)
