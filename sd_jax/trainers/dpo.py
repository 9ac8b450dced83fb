"""Diffusion-DPO (Wallace et al. 2023): a text-to-image model trained on people's preferences between two images.

For a pair (w = the preferred image, l = the other) of one prompt, both noised with the same timestep t and noise ε,
with e_θ(x) = ‖target − model_θ(x_t, t, c)‖² (the per-example mean, target ε or v as the model was trained) and
e_ref the same for the frozen reference model:

    loss = −log σ(−β/2 · [(e_θ(w) − e_θ(l)) − (e_ref(w) − e_ref(l))])

(SalesforceAIResearch/DiffusionDPO train.py: `inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)`). The loss
falls as the model lowers its error on preferred images relative to rejected ones, more than the reference does.
Logged with it: the implicit reward accuracy (the fraction of pairs with inside_term > 0: the model prefers the
winner more than the reference does) and margin (the mean inside_term), and model_diff / ref_diff.

It is a fine-tune (sd_jax/trainers/finetune.py): the base model, what trains (finetune.unet "lora" or "full",
optionally a text-tower LoRA) and the exports are the fine-tune trainer's. The reference is the base itself, held
once: with a LoRA it is the frozen U-Net (and text tower) without its adapters (no second copy), with a full
fine-tune a frozen copy of the base U-Net. The data is `dataset.name="preferences"`: the votes of a feedback
database (`python -m sd_jax.feedback serve`) or a Pick-a-Pic-layout parquet file (sd_jax/data/preferences.py); ties
carry no preference and are left out.
β: dpo.beta (the paper's SD 1.5 setting 5000; diffusers' LoRA recipe 2500).

dpo.loss="kto" trains on single favourites instead (Diffusion-KTO, Li et al. 2024, simplified): the preferred image
of each pair is a "desirable" example, the other an "undesirable" one, each scored against the reference alone:
loss = 1 − σ(β/2 · (e_ref(x) − e_θ(x))) for desirable and 1 − σ(β/2 · (e_θ(x) − e_ref(x))) for undesirable x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sd_jax.diffusion import losses
from sd_jax.diffusion import schedules
from sd_jax.trainers import finetune

LOSSES = ("dpo", "kto")


class Task(finetune.Task):
  """The dpo trainer (the interface: sd_jax/trainers/base.py; the model: the fine-tune trainer's)."""

  image_folder = False  # pairs from dataset.preferences, not finetune.data

  def __init__(self, config):
    d = config.dpo
    if d.loss not in LOSSES:
      raise ValueError(f"config.dpo.loss={d.loss!r}: use one of {LOSSES}.")
    if not d.beta > 0:
      raise ValueError(f"config.dpo.beta={d.beta}: must be > 0 (the paper's SD 1.5 value: 5000).")
    if config.dataset.name != "preferences" or not config.dataset.preferences:
      raise ValueError("the dpo trainer reads preference pairs: set --config.dataset.preferences to a feedback "
                       "database (python -m sd_jax.feedback serve) or a Pick-a-Pic-layout parquet file.")
    super().__init__(config)
    if self.f.new_tokens or self.f.prior_preservation:
      raise ValueError("config.finetune.new_tokens / prior_preservation are not part of preference training.")
    if self.f.text_encoder == "full":  # the reference would need a second copy of the text tower
      raise ValueError("config.finetune.text_encoder='full': preference training tunes the text tower by LoRA only "
                       "(text_encoder=lora) or not at all (frozen).")

  # -- data: preference pairs ------------------------------------------------------------------------------------

  def prepare_data(self, workdir) -> None:
    del workdir  # the pairs are read where they are

  def dataset_config(self) -> ml_collections.ConfigDict:
    dataset = ml_collections.ConfigDict(self.config.dataset.to_dict())
    dataset.name = "preferences"
    dataset.text_key = "caption"
    dataset.label_key = ""
    dataset.tokenizer = str(self.base_dir / "tokenizer")
    dataset.resolution = self.resolution
    dataset.max_text_len = self.text_len
    if not int(dataset.preferences_test):
      dataset.eval_split = dataset.train_split
    return dataset

  # -- frozen: the reference --------------------------------------------------------------------------------------

  def frozen_abstract(self):
    frozen = super().frozen_abstract()
    if self.f.unet == "full":  # the reference: a frozen copy of the base U-Net
      frozen["ref_unet"] = self._unet_abstract
    return frozen

  def load_frozen(self):
    frozen = super().load_frozen()
    if self.f.unet == "full":
      frozen["ref_unet"] = self.unet_params
    return frozen

  # -- loss ------------------------------------------------------------------------------------------------------

  def errors(self, params, frozen, batch, keys):
    """Per-pair squared errors of the model and of the reference on the preferred and the other image, each [B]:
    (e_θ(w), e_θ(l), e_ref(w), e_ref(l)); w and l share t and ε (each pair from its own key)."""
    draws = losses.example_draws(keys)
    d_keys = jax.vmap(lambda k: jax.random.split(k))(draws["latent"])  # a posterior sample per image
    posterior_w = self.vae.apply({"params": frozen["vae"]}, batch["image"], method="encode")
    posterior_l = self.vae.apply({"params": frozen["vae"]}, batch["image_l"], method="encode")
    latents_w = self.vae.scale_latents(jax.vmap(lambda p, k: p.sample(k))(posterior_w, d_keys[:, 0]))
    latents_l = self.vae.scale_latents(jax.vmap(lambda p, k: p.sample(k))(posterior_l, d_keys[:, 1]))
    context = self.encode_text(params, frozen, batch["tokens"])
    if self.f.text_encoder == "lora":  # the reference reads the text through the base tower, without the adapters
      ref_context = self.text.apply({"params": frozen["text_encoder"]}, batch["tokens"],
                                    clip_skip=self.clip_skip or None, method="encode")
    else:
      ref_context = context
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.schedule.num_train_timesteps))(draws["timestep"])
    noise = jax.vmap(lambda k: losses.offset_noise(k, (1,) + latents_w.shape[1:], self.f.offset_noise)[0])(
        draws["noise"])
    x = jnp.concatenate([schedules.add_noise(self.schedule, latents_w, noise, t),
                         schedules.add_noise(self.schedule, latents_l, noise, t)])      # [2B, h, w, c]
    t2, context2 = jnp.concatenate([t, t]), jnp.concatenate([context, context])
    target = jnp.concatenate([losses.prediction_target(self.schedule, latents_w, noise, t,
                                                       self.sampler_config.prediction_type),
                              losses.prediction_target(self.schedule, latents_l, noise, t,
                                                       self.sampler_config.prediction_type)])

    def error(output):
      return jnp.mean(jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))

    model = error(self.unet_fn(params, frozen)(x, t2, context2, draws["dropout"][0]))
    reference_params = frozen["ref_unet"] if self.f.unet == "full" else frozen["unet"]  # LoRA: the base itself
    ref_context2 = jnp.concatenate([ref_context, ref_context])
    reference = error(jax.lax.stop_gradient(self.unet.apply({"params": reference_params}, x, t2, ref_context2)))
    b = t.shape[0]
    return model[:b], model[b:], reference[:b], reference[b:]

  def pair_loss(self, errors):
    """(per-pair loss [B], inside_term [B]) of the configured loss from `errors`."""
    e_w, e_l, r_w, r_l = errors
    beta = self.config.dpo.beta
    inside = -0.5 * beta * ((e_w - e_l) - (r_w - r_l))
    if self.config.dpo.loss == "dpo":
      return -jax.nn.log_sigmoid(inside), inside
    desirable = 1.0 - jax.nn.sigmoid(0.5 * beta * (r_w - e_w))
    undesirable = 1.0 - jax.nn.sigmoid(0.5 * beta * (e_l - r_l))
    return 0.5 * (desirable + undesirable), inside

  def loss(self, params, frozen, batch, keys, step=None):
    errors = self.errors(params, frozen, batch, keys)
    per_pair, inside = self.pair_loss(errors)
    e_w, e_l, r_w, r_l = errors
    metrics = {"implicit_accuracy": jnp.mean((inside > 0).astype(jnp.float32)), "reward_margin": jnp.mean(inside),
               "model_diff": jnp.mean(e_w - e_l), "ref_diff": jnp.mean(r_w - r_l), "model_error": jnp.mean(e_w)}
    return jnp.mean(per_pair), metrics

  def eval_metrics(self, params, frozen, batch, keys):
    loss, metrics = self.loss(params, frozen, batch, keys)
    return {"loss": loss, "implicit_accuracy": metrics["implicit_accuracy"], "reward_margin": metrics["reward_margin"]}

  def sample_prompts(self) -> list[str]:
    s = self.config.sample
    if s.prompts:
      return [str(p) for p in s.prompts]
    info_source = self.dataset_config()
    from sd_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
    info = input_pipeline.dataset_info(info_source, info_source.eval_split)
    return [info.captions(i) for i in range(min(4, info.num_examples))]
