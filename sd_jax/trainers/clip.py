"""CLIP text and image towers trained contrastively (Radford et al. 2021), or with the sigmoid loss (SigLIP).

Loss over the GLOBAL batch: the step is jitted over the whole mesh with the batch sharded along its first axis, so the
[B, B] similarity matrix built inside the loss pairs every text with every image of the global batch (XLA gathers the
embeddings it needs), and the loss is the same on 1 device as on a pod slice. Under `parallelism="pmap"` each device
would only see its own slice as negatives, so pmap is refused.

  softmax   symmetric InfoNCE, logits = exp(t) cos(text, image), t learnable (CLIPModel's `logit_scale`), clamped at
            log(config.clip.max_logit_scale) as CLIP does (100).
  sigmoid   SigLIP (Zhai et al. 2023): -mean_i sum_j log sigmoid(z_ij (exp(t) cos_ij + b)), z = +1 on the diagonal,
            -1 elsewhere; t and b learnable, initialised to log 10 and -10 as in the paper.

LiT (Zhai et al. 2022, `config.clip.lock_image_tower`): the image tower and its projection are not trained. They are
a *frozen* network of the loop (trainers/__init__.py): not in the params, so no optimizer state, no weight decay, no
EMA and no checkpoint touch them; they stay bitwise what `clip.image_tower_from` (an export of an earlier CLIP run) or
the seeded init gave.

Tokenizer: with `dataset.tokenizer` empty, a CLIP-style BPE is trained on the train split's captions when the Task is
built (deterministic: every process trains the same one, checked across processes) into a local cache directory
named by a hash of the captions and settings; `Task.dataset_config()` is config.dataset with `tokenizer` pointing at
it, so that the loop's data iterators tokenize with it (and WORKDIR/config.json records it). It is copied to
WORKDIR/tokenizer and WORKDIR/export/tokenizer. The text tower's vocab size and special-token ids come from the
tokenizer.

Evaluation: the held-out contrastive loss (eval_metrics); zero-shot colour+kind classification of single-shape
images against every colour x kind prompt (shapes only); text<->image retrieval R@k on held-out pairs.

Export (end of training): WORKDIR/export/ is an sd_jax model directory (weights/store.py) with
  text_encoder/   the text tower (transformers CLIPTextModel layout)  -> model_dir.load_model(..., ("text_encoder",))
  tokenizer/      the tokenizer                                       -> tokenizer.load_clip_tokenizer(...)
  clip/           both towers, projections, logit scale (and bias)    -> clip_weights.load_exported_clip(...) here
`clip/` is not listed in sd_jax_model.json: weights/input_pipeline.py has no codec for a two-tower CLIPModel, and the
index drives `load_model` / `export_diffusers`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sd_jax import parallel
from sd_jax.data import input_pipeline
from sd_jax.data import tokenizer as tokenizer_lib
from sd_jax.models import clip as clip_lib
from sd_jax.trainers import base
from sd_jax.weights import clip as clip_weights
from sd_jax.weights import store

LOSSES = ("softmax", "sigmoid")
VISION_KEYS = ("vision_model", "visual_projection")  # the image tower and its head: what LiT locks
TEXT_COMPONENT = "text_encoder"
CLIP_COMPONENT = clip_weights.CLIP_COMPONENT
_CACHE_DIR = "sd_jax_clip_tokenizers"  # under tempfile.gettempdir(): process-local, always writable


# ----------------------------------------------------------------------------------------------------------------
# Losses (pure, on L2-normalized embeddings)


def softmax_loss(text_embeds, image_embeds, logit_scale):
  """Symmetric InfoNCE: mean of the text->image and image->text cross-entropies; pairs on the diagonal.

  text_embeds, image_embeds: [B, P] unit norm; logit_scale: the (clamped) log of the inverse temperature.
  """
  logits = jnp.exp(logit_scale) * text_embeds @ image_embeds.T  # [B_text, B_image]
  labels = jnp.arange(logits.shape[0])
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return (jnp.mean(t2i) + jnp.mean(i2t)) / 2, logits


def sigmoid_loss(text_embeds, image_embeds, logit_scale, logit_bias):
  """SigLIP: every (text, image) pair is a binary problem, positive on the diagonal; sum over pairs / B."""
  logits = jnp.exp(logit_scale) * text_embeds @ image_embeds.T + logit_bias
  signs = 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0], logits


# ----------------------------------------------------------------------------------------------------------------
# Retrieval metrics (host side, numpy)


def retrieval_metrics(similarity: np.ndarray, relevant: np.ndarray | None = None, ks=(1, 5)) -> dict[str, float]:
  """Recall@k both ways from a [N_text, N_image] similarity matrix.

  `relevant[i, j]` says image j is a correct answer for text i (default: the diagonal, i.e. pair i). A query counts
  as a hit at k when a relevant item ranks in the top k; ties with irrelevant items count against it (pessimistic),
  so identical embeddings never inflate the score. Returns {"t2i_r{k}", "i2t_r{k}"}.
  """
  similarity = np.asarray(similarity, np.float64)
  if relevant is None:
    relevant = np.eye(*similarity.shape, dtype=bool)
  relevant = np.asarray(relevant, bool)
  if not relevant.any(axis=1).all() or not relevant.any(axis=0).all():
    raise ValueError("every text and every image needs at least one relevant item")
  out = {}
  for name, sim, rel in (("t2i", similarity, relevant), ("i2t", similarity.T, relevant.T)):
    best = np.where(rel, sim, -np.inf).max(axis=1, keepdims=True)  # best score of a right answer, per query
    rank = np.sum((sim >= best) & ~rel, axis=1)                      # wrong answers scoring at least as high
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(rank < k))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def _training_captions(dataset_config) -> list[str]:
  info = input_pipeline.dataset_info(dataset_config, dataset_config.train_split)
  return [info.captions(i) for i in range(info.num_examples)]


def prepare_tokenizer(config) -> str:
  """The tokenizer directory of this run: `config.dataset.tokenizer` if set, else one trained on the train captions.

  Training is deterministic (same captions and settings -> same files, checked on several hosts), so every process
  trains its own copy into a process-local cache keyed by a hash of the captions and settings: nothing has to be
  shared between hosts, nor written to the workdir before the loop knows it. Concurrent writers on one host each
  train into a temporary directory and rename it into place; a loser of the race uses the winner's copy.
  """
  if config.dataset.tokenizer:
    return config.dataset.tokenizer
  t = config.clip.tokenizer
  captions = _training_captions(config.dataset)
  import tokenizers  # its version is part of the key: another BPE trainer may learn other merges
  digest = hashlib.sha256(repr((tokenizers.__version__, t.vocab_size, t.min_frequency,
                                config.dataset.max_text_len)).encode())
  for caption in captions:
    digest.update(caption.encode("utf-8") + b"\0")
  cache = os.path.join(tempfile.gettempdir(), _CACHE_DIR)
  directory = os.path.join(cache, digest.hexdigest()[:24])
  if not os.path.exists(os.path.join(directory, "merges.txt")):
    os.makedirs(cache, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=cache)
    tokenizer_lib.train_tokenizer(captions, scratch, vocab_size=t.vocab_size, min_frequency=t.min_frequency,
                                  max_length=config.dataset.max_text_len)
    try:
      os.rename(scratch, directory)
    except OSError:  # another process on this host renamed its identical copy first
      shutil.rmtree(scratch, ignore_errors=True)
    logging.info("Trained a %d-caption BPE tokenizer into %s.", len(captions), directory)
  return directory


def _directory_digest(directory) -> bytes:
  digest = hashlib.sha256()
  for path in sorted(epath.Path(directory).iterdir(), key=lambda p: p.name):
    digest.update(path.name.encode() + b"\0")
    digest.update(path.read_bytes())
  return digest.digest()


def _check_same_on_all_processes(directory: str) -> None:
  """Fails if the hosts hold different tokenizers (they would feed the model different ids)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = np.frombuffer(_directory_digest(directory), np.uint8)
  multihost_utils.assert_equal(digest, f"the processes trained different tokenizers into {directory}")


def _copy_tokenizer(src: str, dst: epath.Path) -> None:
  """Copies the tokenizer files; an existing copy must be identical (a resumed run must use the same ids)."""
  if dst.exists():
    if _directory_digest(str(dst)) != _directory_digest(src):
      raise ValueError(f"{dst} holds a different tokenizer than {src}; this workdir was trained with other "
                       "token ids. Point --config.dataset.tokenizer at it, or use a new workdir.")
    return
  store.copy_tree(src, dst)  # local or gs:// workdirs


# ----------------------------------------------------------------------------------------------------------------
# Model construction and the exported two-tower model


def build_model(config, tokenizer: tokenizer_lib.ClipTokenizer) -> clip_lib.CLIPModel:
  """CLIPModel from `config.model` and `config.clip`, with the tokenizer's vocab size and special ids."""
  m, c = config.model, config.clip
  if m.text.max_position_embeddings != config.dataset.max_text_len:
    raise ValueError(f"config.model.text.max_position_embeddings={m.text.max_position_embeddings} must equal "
                     f"config.dataset.max_text_len={config.dataset.max_text_len} (the token rows the model reads).")
  if m.vision.image_size != config.dataset.resolution:
    raise ValueError(f"config.model.vision.image_size={m.vision.image_size} must equal "
                     f"config.dataset.resolution={config.dataset.resolution}.")
  text = dict(m.text.to_dict(), vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  loss_config = c[c.loss]
  bias = loss_config.logit_bias_init if c.loss == "sigmoid" else None
  return clip_lib.create_clip_model(
      dict(text=text, vision=m.vision.to_dict(), projection_dim=m.projection_dim),
      logit_scale_init_value=float(loss_config.logit_scale_init), logit_bias_init_value=bias,
      dtype=m.dtype, param_dtype=m.param_dtype, attention_impl=m.attention_impl or None, remat_policy=m.remat_policy)


def _shape_diff(want, got) -> str:
  """'path: want (shape) got (shape)' lines for every key missing, unexpected or misshaped."""
  def flat(tree):
    return {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

  want, got = flat(want), flat(got)
  lines = [f"  missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
  lines += [f"  unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
  lines += [f"  shape of {k}: want {want[k]}, got {got[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot prompts (shapes)


def _with_articles(text: str) -> str:
  return re.sub(r"\ba (?=[aeiou])", "an ", text)


def shapes_classes() -> list[tuple[str, str]]:
  """Every colour x kind pair, colour-major (also the pairs held out of `train`)."""
  from sd_jax.data import shapes
  return [(color, kind) for color in shapes.COLORS for kind in shapes.KINDS]


def shapes_prompts(templates) -> list[str]:
  """[num_classes * num_templates] prompts, class-major: "a {color} {kind}" filled per class and template."""
  return [_with_articles(t.format(color=color, kind=kind)) for color, kind in shapes_classes() for t in templates]


# ----------------------------------------------------------------------------------------------------------------
# The task


class Task(base.Task):
  """The clip trainer's model, loss, evaluation and export (the interface: sd_jax/trainers/base.py)."""

  def __init__(self, config):
    c = config.clip
    if c.loss not in LOSSES:
      raise ValueError(f"config.clip.loss={c.loss!r}: use one of {LOSSES}.")
    if config.parallelism != "jit":
      raise ValueError("config.parallelism='pmap' would compute the contrastive loss over each device's slice of the "
                       "batch only; the clip trainer needs the global batch: use parallelism='jit'.")
    if not (config.dataset.text_key or config.dataset.label_key):
      raise ValueError("the clip trainer needs captions: set config.dataset.text_key (or label_key).")
    super().__init__(config)
    # The batches get "tokens" from this run's tokenizer: the dataset the loop reads names it (dataset_config).
    self.dataset = ml_collections.ConfigDict(config.dataset.to_dict())
    self.dataset.tokenizer = prepare_tokenizer(config)
    _check_same_on_all_processes(self.dataset.tokenizer)
    self.tokenizer = tokenizer_lib.load_clip_tokenizer(self.dataset.tokenizer, max_length=self.dataset.max_text_len)
    self.model = build_model(config, self.tokenizer)
    self.locked = bool(c.lock_image_tower)
    if c.image_tower_from and not self.locked:
      raise ValueError("config.clip.image_tower_from is the locked (LiT) image tower's source; set "
                       "config.clip.lock_image_tower=True, or use config.init_from to fine-tune every weight.")
    self._max_log_scale = math.log(c.max_logit_scale) if c.max_logit_scale > 0 else None
    self._eval_fns = {}    # jitted embedding functions, compiled at the first evaluation
    self._ground_truth = {}  # split -> (captions, shapes attributes), read once

  # --- Params.

  def _init_all(self, rng):
    return self.model.init(rng, **self.model.example_inputs(1))["params"]

  def init_params(self, rng):
    params = self._init_all(rng)
    if self.locked:
      params = {k: v for k, v in params.items() if k not in VISION_KEYS}
    return params

  def dataset_config(self):
    return self.dataset

  def frozen_abstract(self):
    """The locked image tower of a LiT run; None (no frozen networks) otherwise."""
    if not self.locked:
      return None
    shapes = jax.eval_shape(self._init_all, jax.random.PRNGKey(0))
    return {k: shapes[k] for k in VISION_KEYS}

  def load_frozen(self):
    """The locked image tower: from an earlier run's export (clip.image_tower_from), else the seeded init."""
    if not self.locked:
      return None
    want = nn.meta.unbox(self.frozen_abstract())
    source = self.config.clip.image_tower_from
    if source:
      _, params = clip_weights.load_exported_clip(source)
      tower = {k: params[k] for k in VISION_KEYS if k in params}
      diff = _shape_diff(want, tower)
      if diff:
        raise ValueError(f"config.clip.image_tower_from={source}: its image tower does not match "
                         f"config.model.vision / projection_dim:\n{diff}")
      return jax.tree.map(np.asarray, tower)
    params = jax.jit(lambda rng: nn.meta.unbox(self._init_all(rng)))(jax.random.PRNGKey(self.config.seed))
    return jax.device_get({k: params[k] for k in VISION_KEYS})

  def _variables(self, params, frozen):
    if frozen is None:
      return {"params": params}
    # LiT: the image tower is an input, not a parameter: no gradient reaches it.
    return {"params": {**params, **jax.lax.stop_gradient(frozen)}}

  # --- Loss.

  def _logit_scale(self, params):
    scale = params["logit_scale"].astype(jnp.float32)
    # CLIP caps the inverse temperature at 100; clamping in the forward pass zeroes the gradient above the cap.
    return scale if self._max_log_scale is None else jnp.minimum(scale, self._max_log_scale)

  def _contrastive(self, params, frozen, batch):
    out = self.model.apply(self._variables(params, frozen), batch["tokens"], batch["image"])
    scale = self._logit_scale(params)
    if self.config.clip.loss == "softmax":
      loss, logits = softmax_loss(out.text_embeds, out.image_embeds, scale)
    else:
      loss, logits = sigmoid_loss(out.text_embeds, out.image_embeds, scale,
                                  params["logit_bias"].astype(jnp.float32))
    labels = jnp.arange(logits.shape[0])
    metrics = {
        "logit_scale": jnp.exp(scale),  # inverse temperature
        "t2i_acc": jnp.mean(jnp.argmax(logits, axis=1) == labels),  # in-batch top-1
        "i2t_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    }
    if self.config.clip.loss == "sigmoid":
      metrics["logit_bias"] = params["logit_bias"]
    return loss, metrics

  def loss(self, params, frozen, batch, keys, step=None):
    del keys  # deterministic: no dropout, no noise
    return self._contrastive(params, frozen, batch)

  def eval_metrics(self, params, frozen, batch, keys):
    del keys
    loss, metrics = self._contrastive(params, frozen, batch)
    return {"loss": loss, "t2i_acc": metrics["t2i_acc"], "i2t_acc": metrics["i2t_acc"]}

  # --- Host-side evaluation: zero-shot classification and retrieval.

  def _eval_fn(self, name, ctx):
    """Jitted embedding functions, replicated outputs (every host reads them whole)."""
    if name not in self._eval_fns:
      replicated = NamedSharding(ctx.mesh, P())
      if name == "pairs":
        def fn(params, frozen, tokens, images):
          out = self.model.apply(self._variables(params, frozen), tokens, images)
          return out.text_embeds, out.image_embeds
      else:
        def fn(params, tokens):
          text = self.model.apply({"params": params}, tokens, method="get_text_features")
          return text / jnp.linalg.norm(text, axis=-1, keepdims=True)
      self._eval_fns[name] = jax.jit(fn, out_shardings=replicated)
    return self._eval_fns[name]

  def _embed_split(self, split, num, params, ctx):
    """Unit text and image embeddings [num, P] of the first `num` examples of `split`, in order."""
    config = self.config
    fn = self._eval_fn("pairs", ctx)
    sharding = parallel.batch_sharding(ctx.mesh, parallel.rules_tuple(config.logical_axis_rules))
    # Padded so every host runs the same number of equal-sized steps; the padding rows lie past `num`.
    it = input_pipeline.create_iterator(self.dataset, split=split, global_batch_size=config.batch_size,
                                        seed=config.seed, train=False, pad_remainder=True)
    texts, images, seen = [], [], 0
    try:
      for local_batch in it:
        batch = parallel.host_batch_to_global({k: local_batch[k] for k in ("tokens", "image")}, sharding)
        text, image = fn(params, ctx.frozen, batch["tokens"], batch["image"])
        texts.append(np.asarray(text))
        images.append(np.asarray(image))
        seen += config.batch_size
        if seen >= num:
          break
    finally:
      it.close()
    return np.concatenate(texts)[:num], np.concatenate(images)[:num]

  def _split_ground_truth(self, split, num):
    """Captions and, for shapes, (num_shapes, colour, kind of the first shape) of the first `num` examples."""
    if split not in self._ground_truth:
      dataset = self.dataset
      info = input_pipeline.dataset_info(dataset, split)
      captions = [info.captions(i) for i in range(num)]
      attributes = None
      if dataset.name == "shapes":
        # Batches carry only arrays: the ground truth is read from the raw examples, which the pipeline
        # exposes only through its private source (a public accessor would be cleaner).
        source = input_pipeline._open_source(input_pipeline._resolve_config(dataset), split).data
        rows = [source[i] for i in range(num)]
        attributes = {"num_shapes": np.array([int(r["num_shapes"]) for r in rows]),
                      "color": np.array([int(r["shapes"]["color"][0]) for r in rows]),
                      "kind": np.array([int(r["shapes"]["kind"][0]) for r in rows])}
      self._ground_truth[split] = (captions, attributes)
    return self._ground_truth[split]

  def _class_embeds(self, params, ctx):
    """[num_classes, P] unit prompt embeddings, averaged over the templates (CLIP's prompt ensembling)."""
    templates = tuple(self.config.clip.zeroshot_templates)
    tokens = self.tokenizer(shapes_prompts(templates))
    tokens = jax.make_array_from_callback(tokens.shape, NamedSharding(ctx.mesh, P()), lambda index: tokens[index])
    text = np.asarray(self._eval_fn("prompts", ctx)(params, tokens)).reshape(len(shapes_classes()), len(templates), -1)
    mean = text.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)

  def evaluate_split(self, split, params, ctx, *, retrieval: bool, class_embeds=None) -> dict[str, float]:
    """Retrieval recalls and, given the prompts' `class_embeds` (shapes), zero-shot accuracies on the first
    clip.eval_examples examples of `split`."""
    from sd_jax.data import shapes
    config = self.config
    size = input_pipeline.dataset_info(self.dataset, split).num_examples
    num = size if config.clip.eval_examples < 0 else min(config.clip.eval_examples, size)
    texts, images = self._embed_split(split, num, params, ctx)
    captions, attributes = self._split_ground_truth(split, num)
    results = {}
    if retrieval:
      # Identical caption texts are equally right answers (shapes repeats "a small red circle" often); with
      # unique captions this is the usual pair-only recall.
      captions = np.asarray(captions, dtype=object)
      relevant = captions[:, None] == captions[None, :]
      results.update(retrieval_metrics(texts @ images.T, relevant, ks=tuple(config.clip.retrieval_ks)))
    if attributes is not None and class_embeds is not None:
      single = attributes["num_shapes"] == 1
      classes = np.asarray([(shapes.COLORS.index(c), shapes.KINDS.index(k)) for c, k in shapes_classes()])
      predicted = classes[np.argmax(images[single] @ class_embeds.T, axis=1)]
      color_ok = predicted[:, 0] == attributes["color"][single]
      kind_ok = predicted[:, 1] == attributes["kind"][single]
      results.update(zeroshot_acc=float(np.mean(color_ok & kind_ok)), zeroshot_color_acc=float(np.mean(color_ok)),
                     zeroshot_kind_acc=float(np.mean(kind_ok)), zeroshot_examples=float(np.sum(single)))
    return results

  def on_eval(self, step, params, ctx):
    """eval_zeroshot_* and eval_{t2i,i2t}_r{k} on dataset.eval_split; eval_{split}_zeroshot_* on the extra splits."""
    del step
    self._save_tokenizer(ctx.workdir / "tokenizer")
    shapes_data = self.config.dataset.name == "shapes"
    class_embeds = self._class_embeds(params, ctx) if shapes_data else None
    results = {f"eval_{k}": v for k, v in self.evaluate_split(
        self.config.dataset.eval_split, params, ctx, retrieval=True, class_embeds=class_embeds).items()}
    for split in self.config.clip.zeroshot_extra_splits if shapes_data else ():
      extra = self.evaluate_split(split, params, ctx, retrieval=False, class_embeds=class_embeds)
      results.update({f"eval_{split}_{k}": v for k, v in extra.items()})
    return results

  # --- Export.

  def _save_tokenizer(self, dst) -> None:
    if jax.process_index() == 0:
      _copy_tokenizer(self.dataset.tokenizer, epath.Path(dst))

  def export(self, host_state, ctx):
    """WORKDIR/export/: text_encoder/ (+ tokenizer/) for the latent-diffusion run, clip/ for scoring and LiT."""
    out = epath.Path(ctx.workdir) / "export"
    params = host_state.ema_params if host_state.ema_params is not None else host_state.params
    if self.locked:
      from jax.experimental import multihost_utils
      params = {**params, **multihost_utils.process_allgather(ctx.frozen, tiled=True)}
    text_config = self.model.config.text
    text_model = clip_lib.create_clip_text_model(text_config)
    want = jax.eval_shape(lambda: nn.meta.unbox(text_model.init(jax.random.PRNGKey(0), **text_model.example_inputs())))
    diff = _shape_diff(want["params"], params["text_model"])
    if diff:  # the CLIPModel's text tower must be exactly a CLIPTextModel
      raise AssertionError(f"the text tower's params do not match create_clip_text_model's layout:\n{diff}")
    # Every process takes part (orbax saves collectively); process 0 writes the files.
    store.save_component(out, TEXT_COMPONENT, clip_lib.clip_config_to_transformers(text_config),
                         params["text_model"], overwrite=True)
    if self.config.clip.export_clip:
      store.save_component(out, CLIP_COMPONENT, clip_weights.clip_component_config(self.model.config), params,
                           overwrite=True)
    self._save_tokenizer(out / "tokenizer")
    self._save_tokenizer(epath.Path(ctx.workdir) / "tokenizer")
    if jax.process_index() == 0:
      store.write_index(out, {TEXT_COMPONENT: "CLIPTextModel"}, source=str(ctx.workdir))
    logging.info("Exported the text tower%s and tokenizer to %s.",
                 " and the two-tower CLIP" if self.config.clip.export_clip else "", out)
