"""Latent diffusion (Rombach et al. 2022): the Stable Diffusion U-Net trained on a frozen VAE's latents, conditioned
on a CLIP text tower (frozen, or fine-tuned with `ldm.train_text_encoder`).

One step, per example and from that example's key only (so every mesh gives the same losses; the loss itself is
sd_jax/diffusion/losses.py `latent_diffusion_loss`, which the bench's U-Net step shares):

    z ~ q(z | image) (VAE encoder, frozen)            latents = vae.scale_latents(z)
    context = text.encode(tokens, clip_skip)          with probability ldm.caption_dropout: the empty prompt's
                                                      context instead (what classifier-free guidance needs)
    t ~ U{0..T-1}, ε (+ offset noise)                 x_t = sqrt(ᾱ_t) latents + sqrt(1 - ᾱ_t) ε
    loss = (min-SNR-γ weighted) MSE of U-Net(x_t, t, context) against ε or v

The VAE and the text tower (with its tokenizer) come from sd_jax model directories (sd_jax/frozen.py), `ldm.vae_from`
and `ldm.text_from`: a VAE / CLIP run's WORKDIR/export, or `python -m sd_jax.convert --from_diffusers DIR --out OUT`.
A missing or wrong directory fails before anything compiles; nothing here ever falls back to random weights. The U-Net
fields that the frozen networks decide (in/out channels, context width, latent size) are taken from them when the
config leaves them None, and checked against them when it sets them.

Params are the U-Net's own tree, so `--config.init_from=MODEL_DIR/unet` fine-tunes an imported Stable Diffusion; with
`ldm.train_text_encoder` they are {"unet": ..., "text_encoder": ...}. Evaluation: held-out loss, and sample grids of
fixed prompts drawn with the EMA params through the one generation path (sd_jax/generate.py: the sampler named by
sample.sampler with classifier-free guidance, then the VAE decoder), so a grid shows what `python -m sd_jax.sample`
draws from the export with the same seed. At the end `export` writes WORKDIR/export, a complete sd_jax model
directory (U-Net, VAE, text tower, tokenizer, scheduler) that `load_model` and `python -m sd_jax.convert
--to_diffusers` read.

Precomputed latents: with `ldm.precompute_dir` (tied to `dataset.precomputed_dir` in configs/shapes_ldm.py) the
run first encodes the train and eval splits once (sd_jax/precompute.py, in sd_jax/data/precomputed.py's layout: VAE
posteriors and text contexts), and then trains from them; a later run with the same networks and data reuses them,
one with other networks or data is refused. Each step still draws its own posterior sample. The stored tokens let a
run that fine-tunes the text tower (`ldm.train_text_encoder`) read the latents too: it encodes the tokens with its
own tower and ignores the stored contexts.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from sd_jax import frozen as frozen_lib
from sd_jax import generate
from sd_jax import images as images_lib
from sd_jax import precompute as precompute_lib
from sd_jax.data import input_pipeline
from sd_jax.diffusion import losses
from sd_jax.diffusion import samplers
from sd_jax.diffusion import schedules
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.trainers import base
from sd_jax.weights import common as weights_common
from sd_jax.weights import store


def _unet_fields(config, nets: frozen_lib.FrozenNetworks) -> dict[str, Any]:
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
  if s.timestep_spacing not in samplers.TIMESTEP_SPACINGS:
    raise ValueError(f"config.sample.timestep_spacing={s.timestep_spacing!r}: use one of "
                     f"{samplers.TIMESTEP_SPACINGS}.")
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


class Task(base.Task):
  """The ldm trainer's model, loss, evaluation and export (the interface: sd_jax/trainers/base.py)."""

  def __init__(self, config):
    super().__init__(config)
    _check_config(config)
    self.nets = frozen_lib.FrozenNetworks(config)
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
    self.schedule = schedules.schedule_from_config(config.diffusion)
    # The sampler settings of the grids, and the scheduler_config.json of the export (the same dict, so the export
    # draws what the grids show).
    self.sampler_config = samplers.config_from_training(config.diffusion, config.sample,
                                                        sampler=config.sample.get("sampler", "ddim"))
    self.text_len = config.dataset.max_text_len
    rng = jax.random.PRNGKey(0)  # shapes only
    self._vae_abstract = jax.eval_shape(self.vae.init, rng, **self.vae.example_inputs())["params"]
    self._text_abstract = jax.eval_shape(self.text.init, rng, **self.text.example_inputs())["params"]
    self._generators: dict[Any, generate.TextToImage] = {}  # per mesh: sampling compiles once per mesh
    self._prompts = None
    self._evaluator = None  # the shapes evaluator, loaded at the first evaluation that uses it

  def prepare_data(self, workdir) -> None:
    """With ldm.precompute_dir: encodes the train and eval splits once (reused by later runs; sd_jax/precompute.py)."""
    if self.config.ldm.precompute_dir:
      precompute_lib.precompute(self.config, nets=self.nets)

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

  def caption_drop_mask(self, keys, rate) -> jax.Array:
    """bool [B]: the examples whose caption the step replaces by the empty prompt (probability `rate` each)."""
    return losses.caption_drop_mask(keys, rate)

  def _posterior(self, frozen, batch) -> vae_lib.DiagonalGaussian:
    if "latent_mean" in batch:  # a precomputed batch (sd_jax/data/precomputed.py)
      return vae_lib.DiagonalGaussian(mean=batch["latent_mean"].astype(jnp.float32),
                                      logvar=batch["latent_logvar"].astype(jnp.float32))
    return self.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")

  def per_example_loss(self, params, frozen, batch, keys, caption_dropout):
    """Per-example losses [B] and batch metrics (sd_jax/diffusion/losses.py `latent_diffusion_loss`). `batch` holds
    images + tokens, or precomputed posteriors + contexts; `caption_dropout` may be traced."""
    d = self.config.diffusion
    unet_params, text_params = self.split_params(params, frozen)
    if "context" in batch and not self.train_text:
      context = batch["context"]  # precomputed by the frozen tower
    else:
      context = self.nets.encode_text(text_params, batch["tokens"])
    empty = self.nets.encode_text(text_params, self.nets.empty_tokens)   # [1, L, D]

    def model_fn(x_t, t, context, dropout_key):
      if self.model.dropout > 0:
        return self.model.apply({"params": unet_params}, x_t, t, context, train=True, rngs={"dropout": dropout_key})
      return self.model.apply({"params": unet_params}, x_t, t, context)

    return losses.latent_diffusion_loss(
        model_fn, self.schedule, self._posterior(frozen, batch), context, empty, keys,
        scale_latents=self.vae.scale_latents, caption_dropout=caption_dropout, prediction_type=d.prediction_type,
        min_snr_gamma=d.min_snr_gamma, offset_noise_strength=d.offset_noise)

  def loss(self, params, frozen, batch, keys, step=None):
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

  def generator(self, mesh=None) -> generate.TextToImage:
    """The one generation path (sd_jax/generate.py) over this run's networks; parameters are passed per call."""
    key = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
    if key not in self._generators:
      components = {"unet": (self.model, None), "vae": (self.vae, None), "text_encoder": (self.text, None)}
      self._generators[key] = generate.TextToImage(
          components, self.nets.tokenizer, samplers.to_diffusers_config(self.sampler_config),
          clip_skip=self.nets.clip_skip, mesh=mesh)
    return self._generators[key]

  def sample(self, params, frozen, prompts: Sequence[str], seed: int, mesh=None,
             images_per_prompt: int | None = None) -> np.ndarray:
    """uint8 [P, K, H, W, 3]: K = sample.images_per_prompt images for each prompt, drawn as `python -m sd_jax.sample`
    draws them from the export with --seed `seed` (sample.sampler, num_steps, guidance_scale, eta)."""
    s = self.config.sample
    k = images_per_prompt or s.images_per_prompt
    unet_params, text_params = self.split_params(params, frozen)
    images = self.generator(mesh).generate(
        list(prompts), num_images=k, steps=s.num_steps, guidance=s.guidance_scale, seed=seed, eta=s.eta,
        sampler=self.sampler_config.sampler,
        params={"unet": unet_params, "vae": frozen["vae"], "text_encoder": text_params})
    return images.reshape(len(prompts), k, *images.shape[1:])

  def shapes_accuracy(self, params, frozen, seed: int, mesh=None) -> dict[str, float]:
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
      images = self.sample(params, frozen, prompts, seed, mesh, images_per_prompt=1)[:, 0]
      results[f"eval_shapes_acc_{split}"] = float(self._evaluator.score(images, prompts).accuracy)
    return results

  def on_eval(self, step, params, ctx):
    """Shapes accuracy of samples (with sample.shapes_evaluator and sample.shapes_eval_prompts > 0)."""
    del step
    s = self.config.sample
    if s.get("shapes_evaluator") and s.get("shapes_eval_prompts", 0) > 0 and self.config.dataset.name == "shapes":
      return self.shapes_accuracy(params, ctx.frozen, self.config.seed + 1, ctx.mesh)
    return {}

  def sample_grid(self, params, ctx):
    """The labelled grid of the sample prompts (sample.images_per_prompt images each, seed config.seed)."""
    prompts = self.sample_prompts()
    images = self.sample(params, ctx.frozen, prompts, self.config.seed, ctx.mesh)
    return images_lib.labeled_grid(images, prompts, tile=self.config.sample.tile_size)

  # -- export --------------------------------------------------------------------------------------------------

  def scheduler_config(self) -> dict[str, Any]:
    """diffusers scheduler config of the training schedule and the grids' sampler settings (samplers.py
    `to_diffusers_config` of `config_from_training`)."""
    return samplers.to_diffusers_config(self.sampler_config)

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
