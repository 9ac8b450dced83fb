"""Fréchet and kernel distances between image sets in a feature space: FID, KID and their CLIP-feature variants.

Fréchet distance (Heusel et al. 2017) between Gaussians fitted to two feature sets, N(μ1, Σ1) and N(μ2, Σ2):

    d² = ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½)

computed as pytorch-fid does: float64, scipy.linalg.sqrtm of the product; when the product is singular enough
that its square root is not finite, ε = 1e-6 is added to both diagonals and the root taken again; an imaginary
part of (Σ1 Σ2)^½ from round-off is dropped if its diagonal is below 1e-3 (else it is an error). μ is the feature
mean and Σ the unbiased covariance (np.cov).

Kernel distance (KID, Bińkowski et al. 2018): the unbiased estimate of the squared MMD with the cubic polynomial
kernel k(x, y) = (xᵀy / d + 1)³ (d = feature width), on `num_subsets` random pairs of subsets of m =
min(subset_size, n1, n2) features each (drawn without replacement, first from set 1 then from set 2, with
np.random.default_rng(seed)):

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (m(m-1)) - 2 Σ_{i,j} k(x_i, y_j) / m²

reported as the mean and the standard deviation over subsets (torch-fidelity's definition; clean-fid's `kid` is the
same estimator with its own subset draws). Defaults: 100 subsets of 1000.

Which features: a `FeatureExtractor`. `inception_extractor(path)` is the FID network (sd_jax.eval.inception)
with pytorch-fid's weights file; its distances are reported as `fid` and `kid`; the FID is pytorch-fid's on the
same 8-bit images (same network, resize and formula). Without that file, `clip_extractor(model,
params, name=...)` uses a CLIP image tower (the projected image embedding, like clean-fid's CLIP features); its
distances are reported as `fd_<name>` and `kd_<name>` (e.g. `fd_clip`), never as FID: they are a different metric
on a different scale. Extractors take uint8 images or floats in [-1, 1], quantized to 8 bits first as if read back
from PNGs (sd_jax.eval.clip_score.to_unit_range).

    extractor = select_feature_extractor(inception_weights=path_or_empty, clip=(model, params), clip_name="clip")
    reference = reference_statistics(extractor, real_batches, cache_dir=workdir / "fid_stats", dataset="shapes",
                                     split="test", resolution=32, keep_features=True)   # computed once, then read
    generated = FeatureStats.from_features(extractor(samples))
    distance_metrics(extractor, generated, reference)   # {"fid": ..., "kid": ..., "kid_std": ...}
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import logging
from etils import epath

from sd_jax.eval import clip_score as clip_score_lib
from sd_jax.eval import inception as inception_lib
from sd_jax.models import clip as clip_lib

INCEPTION = "inception"
FRECHET_EPS = 1e-6  # pytorch-fid's diagonal offset for a singular covariance product
CACHE_FORMAT = 1  # bump when the cached file's content changes meaning


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = FRECHET_EPS) -> float:
  """||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), exactly as pytorch-fid's calculate_frechet_distance."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape} and {sigma2.shape} do not fit means of shape {mu1.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("Fréchet distance: singular covariance product; adding %g to the diagonal of both", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):  # round-off can leave a small imaginary part
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Fréchet distance: (Σ1 Σ2)^½ has an imaginary component of {np.abs(covmean.imag).max():g}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Gaussian statistics of a feature set, and optionally the features themselves (KID needs them)."""

  mu: np.ndarray  # [D] float64 mean
  sigma: np.ndarray  # [D, D] float64 unbiased covariance
  num_images: int
  features: np.ndarray | None = None  # [N, D] float32

  @classmethod
  def from_features(cls, features: Any, *, keep_features: bool = True) -> FeatureStats:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) < 2:
      raise ValueError(f"need at least 2 feature vectors [N, D] for a covariance, got shape {features.shape}")
    as64 = features.astype(np.float64)
    return cls(mu=as64.mean(axis=0), sigma=np.cov(as64, rowvar=False), num_images=len(features),
               features=features if keep_features else None)

  def to_bytes(self, metadata: Mapping[str, Any]) -> bytes:
    arrays = dict(mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images),
                  metadata=np.array(json.dumps(dict(metadata), sort_keys=True)))
    if self.features is not None:
      arrays["features"] = self.features
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()

  @classmethod
  def from_bytes(cls, data: bytes) -> tuple[FeatureStats, dict[str, Any]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      stats = cls(mu=f["mu"], sigma=f["sigma"], num_images=int(f["num_images"]),
                  features=f["features"] if "features" in f.files else None)
      return stats, json.loads(str(f["metadata"]))


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """(μ [D], Σ [D, D]) in float64, as pytorch-fid's calculate_activation_statistics."""
  stats = FeatureStats.from_features(features, keep_features=False)
  return stats.mu, stats.sigma


# ----------------------------------------------------------------------------------------------------------------
# Kernel distance


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
  """k(x, y) = (xᵀy / d + coef0)^degree for all rows of x [n, d] and y [m, d] -> [n, m]."""
  return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD² between two equal-size samples [m, d] with the cubic polynomial kernel (diagonals of k(x, x)
  and k(y, y) excluded; the cross term keeps all m² pairs, as torch-fidelity and clean-fid)."""
  m = len(x)
  if len(y) != m or m < 2:
    raise ValueError(f"need two samples of the same size >= 2, got {len(x)} and {len(y)}")
  k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2 * k_xy.sum() / m**2)


@dataclasses.dataclass(frozen=True)
class KernelDistance:
  mean: float  # mean MMD² over subsets: the reported KID
  std: float  # standard deviation over subsets (ddof 0, as torch-fidelity)
  subset_size: int
  num_subsets: int


def kernel_distance(features1: Any, features2: Any, *, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> KernelDistance:
  """KID between two feature sets [n1, D], [n2, D]: see the module docstring for the subsets and the estimator."""
  f1 = np.asarray(features1, np.float64)
  f2 = np.asarray(features2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"feature sets must be [N, D] with the same D, got {f1.shape} and {f2.shape}")
  m = min(subset_size, len(f1), len(f2))
  if m < 2:
    raise ValueError(f"KID needs at least 2 features in each set, got {len(f1)} and {len(f2)}")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  rng = np.random.default_rng(seed)
  mmds = np.empty(num_subsets)
  for s in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    mmds[s] = mmd2_unbiased(x, y)
  return KernelDistance(mean=float(mmds.mean()), std=float(mmds.std()), subset_size=m, num_subsets=num_subsets)


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """Images -> features, and the names under which distances in its feature space are reported.

  Build with inception_extractor / clip_extractor / select_feature_extractor. Call with uint8 [N, H, W, 3] or
  float [N, H, W, 3] in [-1, 1] -> float32 [N, dim].
  """

  name: str  # identifies network + weights (cache keys): "inception", or the CLIP's name ("clip", "clip_vit_l14")
  fd_metric: str  # "fid" for the Inception, else "fd_<name>"
  kd_metric: str  # "kid" for the Inception, else "kd_<name>"
  dim: int
  embed: Callable[[np.ndarray], Any]  # [B, H, W, 3] float32 in [0, 1] -> [B, dim] (jitted)
  batch_size: int = 50  # images per call of `embed` (the last batch is padded: one compilation per image size)
  quantize: bool = True  # round float images to 8 bits first (see clip_score.to_unit_range)

  def __call__(self, images: Any) -> np.ndarray:
    unit = clip_score_lib.to_unit_range(images, quantize=self.quantize)
    return clip_score_lib.run_batched(self.embed, unit, self.batch_size).astype(np.float32)


def inception_extractor(weights_path, *, batch_size: int = 50, dtype: Any = jnp.float32) -> FeatureExtractor:
  """The FID Inception-v3 (pool3, 2048-d) with pytorch-fid's weights file: distances reported as fid / kid.
  Images of any size are resized to 299×299 inside the network (as pytorch-fid)."""
  model, variables = inception_lib.load_inception(weights_path, dtype=dtype)
  variables = jax.device_put(variables)
  apply = jax.jit(model.apply)  # the weights are an argument, not constants folded into the program
  return FeatureExtractor(name=INCEPTION, fd_metric="fid", kd_metric="kid", dim=inception_lib.FEATURE_DIM,
                          embed=lambda images: apply(variables, images), batch_size=batch_size)


def clip_extractor(model, params: Any, *, name: str = "clip", normalization: clip_score_lib.Normalization = "openai",
                   batch_size: int = 50) -> FeatureExtractor:
  """A CLIP image tower as the feature space (an sd_jax CLIPModel, CLIPVisionModelWithProjection or
  CLIPVisionTransformer; see clip_score.image_embedding_fn for which output). `name` should say which CLIP (it
  keys cached statistics: give different weights different names); distances are reported as fd_<name> /
  kd_<name>. `normalization`: "openai" for imported OpenAI / OpenCLIP weights, "sd_jax" for sd_jax's trainer."""
  if not re.fullmatch(r"[a-z0-9_]+", name) or name in (INCEPTION, "fid") or name.startswith(("fid", "kid")):
    raise ValueError(f"CLIP feature extractor name {name!r}: use lowercase letters, digits and '_' (e.g. 'clip', "
                     "'clip_vit_l14'); names of the Inception metrics are reserved, since a CLIP Fréchet distance "
                     "is not FID")
  embed = clip_score_lib.image_embedding_fn(model, normalization)
  params = jax.device_put(params)
  config = model.config
  dim = config.projection_dim if not isinstance(model, clip_lib.CLIPVisionTransformer) else (
      config.hidden_size)
  return FeatureExtractor(name=name, fd_metric=f"fd_{name}", kd_metric=f"kd_{name}", dim=dim,
                          embed=lambda images: embed(params, images), batch_size=batch_size)


def select_feature_extractor(*, inception_weights=None, clip: tuple[Any, Any] | None = None, clip_name: str = "clip",
                             clip_normalization: clip_score_lib.Normalization = "openai", batch_size: int = 50
                             ) -> FeatureExtractor:
  """The Inception (FID, KID) when `inception_weights` (a path) is given, else the CLIP image tower of `clip` =
  (model, params), reported as fd_<clip_name>. Neither: a ValueError saying what to pass."""
  if inception_weights:
    return inception_extractor(inception_weights, batch_size=batch_size)
  if clip is not None:
    model, params = clip
    return clip_extractor(model, params, name=clip_name, normalization=clip_normalization, batch_size=batch_size)
  raise ValueError("no feature extractor for FID/KID: pass the path of pytorch-fid's "
                   f"{inception_lib.WEIGHTS_FILE} ({inception_lib.WEIGHTS_URL}) as the Inception weights, or a CLIP "
                   "model (its Fréchet distance is reported as fd_<name>, not FID)")


# ----------------------------------------------------------------------------------------------------------------
# Features of a dataset, and cached reference statistics


def _images_of(batch: Any) -> np.ndarray:
  if isinstance(batch, Mapping):
    if "image" not in batch:
      raise ValueError(f"a batch dict needs an 'image' entry, got keys {sorted(batch)}")
    batch = batch["image"]
  return np.asarray(jax.device_get(batch))


def compute_features(extractor: FeatureExtractor, batches: Iterable[Any], num_images: int | None = None
                     ) -> np.ndarray:
  """Features [N, dim] of the images of `batches` (arrays [B, H, W, 3], or dicts with an "image" entry, as the
  input pipeline yields), the first `num_images` of them (None: all; a ValueError if there are fewer)."""
  features, count = [], 0
  for batch in batches:
    images = _images_of(batch)
    if num_images is not None:
      images = images[:num_images - count]
    if len(images):
      features.append(extractor(images))
      count += len(images)
    if num_images is not None and count >= num_images:
      break
  if num_images is not None and count < num_images:
    raise ValueError(f"asked for features of {num_images} images but the data gave only {count}")
  if not features:
    raise ValueError("no images to compute features of")
  return np.concatenate(features)


def _slug(value: Any) -> str:
  return re.sub(r"[^A-Za-z0-9_.]+", "_", str(value)).strip("_") or "_"


def cache_path(cache_dir, *, dataset: str, split: str, resolution: int, extractor: FeatureExtractor | str,
               num_images: int | None = None) -> epath.Path:
  """cache_dir/<dataset>-<split>-r<resolution>-<extractor name>-n<num_images or all>.npz."""
  name = extractor if isinstance(extractor, str) else extractor.name
  count = "all" if num_images is None else int(num_images)
  return epath.Path(cache_dir) / (f"{_slug(dataset)}-{_slug(split)}-r{int(resolution)}-{_slug(name)}-"
                                  f"n{count}.npz")


def reference_statistics(extractor: FeatureExtractor, batches: Iterable[Any], *, cache_dir, dataset: str,
                         split: str, resolution: int, num_images: int | None = None, keep_features: bool = False
                         ) -> FeatureStats:
  """Feature statistics of a dataset split, computed once and cached as an .npz (see cache_path), then read.

  The key is (dataset, split, resolution, extractor name, num_images); `batches` is only iterated on a miss (pass
  a generator or an iterator, which reads nothing until iterated). `keep_features` stores the features too (KID
  needs them; [N, dim] float32): a cached file without them is recomputed when they are asked for. The file is
  written atomically (a temporary file renamed), so an interrupted run leaves no partial cache. Statistics are of
  what `batches` yields: in a multi-process run, give every process the whole split (or call it on one process).
  """
  path = cache_path(cache_dir, dataset=dataset, split=split, resolution=resolution, extractor=extractor,
                    num_images=num_images)
  metadata = dict(format=CACHE_FORMAT, dataset=str(dataset), split=str(split), resolution=int(resolution),
                  extractor=extractor.name, dim=int(extractor.dim),
                  num_images=None if num_images is None else int(num_images))
  if path.exists():
    stats, cached = FeatureStats.from_bytes(path.read_bytes())
    if cached != metadata:
      raise ValueError(f"{path} holds statistics for {cached}, not {metadata}: delete it or use another cache_dir")
    if not keep_features or stats.features is not None:
      logging.info("reference feature statistics read from %s (%d images)", path, stats.num_images)
      return stats
    logging.info("%s has no features (needed for KID): recomputing", path)
  features = compute_features(extractor, batches, num_images)
  stats = FeatureStats.from_features(features, keep_features=keep_features)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_bytes(stats.to_bytes(metadata))
  tmp.replace(path)
  logging.info("reference feature statistics of %d images written to %s", stats.num_images, path)
  return stats


def distance_metrics(extractor: FeatureExtractor, generated: FeatureStats, reference: FeatureStats, *,
                     kid: bool | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     seed: int = 0) -> dict[str, float]:
  """{fd_metric: Fréchet distance} plus, with features on both sides (kid=None: whenever they are there),
  {kd_metric: KID mean, kd_metric + "_std": its std over subsets}. E.g. {"fid", "kid", "kid_std"} or
  {"fd_clip", "kd_clip", "kd_clip_std"}."""
  out = {extractor.fd_metric: frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)}
  have_features = generated.features is not None and reference.features is not None
  if kid and not have_features:
    raise ValueError("KID needs the features of both sets: FeatureStats.from_features(..., keep_features=True) and "
                     "reference_statistics(..., keep_features=True)")
  if kid or (kid is None and have_features):
    distance = kernel_distance(generated.features, reference.features, num_subsets=kid_subsets,
                               subset_size=kid_subset_size, seed=seed)
    out[extractor.kd_metric] = distance.mean
    out[f"{extractor.kd_metric}_std"] = distance.std
  return out
