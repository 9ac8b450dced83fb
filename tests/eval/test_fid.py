"""sd_jax.eval.fid: the Fréchet distance against closed forms and scipy, KID against a naive implementation,
cached reference statistics, and the feature extractors' naming (a CLIP Fréchet distance is never "fid")."""

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from sd_jax.eval import fid, inception
from sd_jax.models import clip as clip_lib
from sd_jax.weights import common


def random_spd(rng, dim, rank=None):
  rank = rank or dim
  a = rng.standard_normal((dim, rank))
  return a @ a.T / rank + (0 if rank < dim else 0.1 * np.eye(dim))


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_diagonal_closed_form():
  # For commuting (here diagonal) covariances, Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) = Σ (√a - √b)².
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)
  assert expected > 1.0  # not a trivially small case


def test_frechet_distance_known_values():
  # N(0, I) vs N(1, 4I) in d dims: d * 1² + d * (1 - 2)² = 2d.
  assert fid.frechet_distance(np.zeros(5), np.eye(5), np.ones(5), 4 * np.eye(5)) == pytest.approx(10.0, rel=1e-12)
  rng = np.random.default_rng(1)
  sigma = random_spd(rng, 8)
  mu = rng.standard_normal(8)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
  # Same covariance: only the means differ.
  assert fid.frechet_distance(mu, sigma, mu + 0.5, sigma) == pytest.approx(8 * 0.25, abs=1e-8)
  # Scalars (1-d features), as pytorch-fid's atleast_1d / atleast_2d accept: (0 - 3)² + (1 - 2)².
  assert fid.frechet_distance(0.0, 1.0, 3.0, 4.0) == pytest.approx(10.0, rel=1e-12)


def test_frechet_distance_against_symmetric_scipy_formula():
  # Tr((Σ1 Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½): the same quantity through a different (symmetric) scipy path.
  rng = np.random.default_rng(2)
  for dim in (3, 16, 64):
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
    root1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(root1 @ s2 @ root1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_distance_of_sample_statistics_matches_direct_scipy():
  rng = np.random.default_rng(3)
  f1 = rng.standard_normal((300, 10))
  f2 = 0.5 * rng.standard_normal((250, 10)) @ rng.standard_normal((10, 10)) + 1.0
  mu1, s1 = fid.feature_statistics(f1)
  mu2, s2 = fid.feature_statistics(f2)
  np.testing.assert_allclose(mu1, f1.mean(0), rtol=1e-6)
  np.testing.assert_allclose(s1, np.cov(f1, rowvar=False), rtol=1e-5)
  f1_64 = f1.astype(np.float32).astype(np.float64)  # feature_statistics keeps features in float32, as pytorch-fid
  f2_64 = f2.astype(np.float32).astype(np.float64)
  m1, c1, m2, c2 = f1_64.mean(0), np.cov(f1_64, rowvar=False), f2_64.mean(0), np.cov(f2_64, rowvar=False)
  expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_singular_product_retries_with_eps_on_the_diagonals():
  rng = np.random.default_rng(4)
  s1, s2 = random_spd(rng, 4, rank=2), random_spd(rng, 4, rank=2)
  mu1, mu2 = rng.standard_normal(4), rng.standard_normal(4)
  calls = []
  real_sqrtm = scipy.linalg.sqrtm

  def sqrtm(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

  with mock.patch.object(scipy.linalg, "sqrtm", sqrtm):
    got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
  offset = 1e-3 * np.eye(4)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
      real_sqrtm((s1 + offset) @ (s2 + offset)).real)
  assert got == pytest.approx(expected, rel=1e-12)


def test_imaginary_parts():
  sigma = np.eye(3)
  small = lambda m: real_sqrtm(m) + 1e-6j  # noqa: E731  round-off: dropped
  large = lambda m: real_sqrtm(m) + 0.1j  # noqa: E731  a real error: raised
  real_sqrtm = scipy.linalg.sqrtm
  with mock.patch.object(scipy.linalg, "sqrtm", small):
    assert fid.frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma) == pytest.approx(0.0, abs=1e-9)
  with mock.patch.object(scipy.linalg, "sqrtm", large), pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(np.zeros(3), sigma, np.zeros(3), sigma)


def test_shape_errors():
  with pytest.raises(ValueError, match="mean vectors"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="covariances"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# ----------------------------------------------------------------------------------------------------------------
# KID


def naive_mmd2(x, y):
  """Unbiased MMD² with k(a, b) = (a·b / d + 1)³, by explicit loops over pairs."""
  m, d = x.shape
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_mmd2_matches_naive_implementation():
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((15, 7)), rng.standard_normal((15, 7)) * 1.5 + 0.3
  assert fid.mmd2_unbiased(x, y) == pytest.approx(naive_mmd2(x, y), rel=1e-10)


def test_kid_one_subset_of_everything_is_the_mmd_of_the_sets():
  # A subset of all n features is a permutation, and MMD² does not depend on the order.
  rng = np.random.default_rng(6)
  f1, f2 = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
  result = fid.kernel_distance(f1, f2, num_subsets=1, subset_size=1000)
  assert result.subset_size == 12
  assert result.mean == pytest.approx(naive_mmd2(f1, f2), rel=1e-10)
  assert result.std == 0.0


def test_kid_subsets_mean_and_std():
  rng = np.random.default_rng(7)
  f1, f2 = rng.standard_normal((30, 4)), rng.standard_normal((25, 4)) * 2
  result = fid.kernel_distance(f1, f2, num_subsets=6, subset_size=10, seed=3)
  draws = np.random.default_rng(3)  # the documented draw order: set 1 then set 2, per subset
  expected = []
  for _ in range(6):
    x = f1[draws.choice(30, 10, replace=False)]
    y = f2[draws.choice(25, 10, replace=False)]
    expected.append(naive_mmd2(x, y))
  assert result.mean == pytest.approx(np.mean(expected), rel=1e-10)
  assert result.std == pytest.approx(np.std(expected), rel=1e-8)
  assert result.std > 0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
  rng = np.random.default_rng(8)
  same = fid.kernel_distance(rng.standard_normal((400, 16)), rng.standard_normal((400, 16)), num_subsets=20,
                             subset_size=200)
  shifted = fid.kernel_distance(rng.standard_normal((400, 16)), rng.standard_normal((400, 16)) + 0.5,
                                num_subsets=20, subset_size=200)
  assert abs(same.mean) < 3 * same.std + 1e-3
  assert shifted.mean > 10 * abs(same.mean) and shifted.mean > 5 * shifted.std


# ----------------------------------------------------------------------------------------------------------------
# Extractors, metric names and the statistics cache


@pytest.fixture(scope="module")
def tiny_clip():
  model = clip_lib.create_clip_model("tiny")
  params = jax.jit(lambda: model.init(jax.random.key(0), **model.example_inputs())["params"])()
  return model, jax.tree_util.tree_map(np.asarray, params)


def fake_extractor(name="fake", dim=3):
  """Features = per-channel means and a constant: cheap and deterministic."""
  def embed(images):
    return jnp.concatenate([images.mean(axis=(1, 2)), jnp.ones((len(images), dim - 3))], axis=1)
  return fid.FeatureExtractor(name=name, fd_metric=f"fd_{name}", kd_metric=f"kd_{name}", dim=dim, embed=embed,
                              batch_size=4)


def test_clip_extractor_names_and_features(tiny_clip):
  model, params = tiny_clip
  extractor = fid.select_feature_extractor(clip=(model, params), clip_name="clip", clip_normalization="sd_jax",
                                           batch_size=4)
  assert (extractor.name, extractor.fd_metric, extractor.kd_metric, extractor.dim) == ("clip", "fd_clip", "kd_clip",
                                                                                        24)
  images = np.random.default_rng(9).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
  features = extractor(images)
  # The image tower's projected embeddings of the 8-bit-rounded images, whatever the batching.
  pixels = np.round((images + 1) * 127.5) / 127.5 - 1
  direct = model.apply({"params": params}, pixels, method="get_image_features")
  np.testing.assert_allclose(features, np.asarray(direct), rtol=1e-4, atol=1e-5)
  generated = fid.FeatureStats.from_features(features)
  reference = fid.FeatureStats.from_features(extractor(images[::-1].copy() * 0.5))
  metrics = fid.distance_metrics(extractor, generated, reference, kid_subsets=3, kid_subset_size=5)
  assert set(metrics) == {"fd_clip", "kd_clip", "kd_clip_std"}
  assert not any(key.startswith(("fid", "kid")) for key in metrics)


@pytest.mark.parametrize("name", ["fid", "inception", "kid_clip", "CLIP-L"])
def test_clip_extractor_refuses_fid_names(tiny_clip, name):
  with pytest.raises(ValueError, match="CLIP feature extractor name"):
    fid.clip_extractor(*tiny_clip, name=name)


def test_no_extractor_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="pt_inception-2015-12-05-6726825d.pth"):
    fid.select_feature_extractor()
  with pytest.raises(FileNotFoundError, match="downloads nothing"):
    fid.select_feature_extractor(inception_weights=tmp_path / "missing.pth")


def flax_variables_to_torch_state(variables) -> dict[str, np.ndarray]:
  """Inverse of inception.torch_key_to_flax (test helper), plus the logits layer the real file has."""
  state = {}
  for path, value in common.flatten(variables).items():
    collection, *names, leaf = path.split("/")
    base = ".".join(names)
    key = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
           ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[(collection, leaf)]
    state[f"{base}.{key}"] = common.conv_to_torch(np.asarray(value)) if leaf == "kernel" else np.asarray(value)
  state["fc.weight"], state["fc.bias"] = np.zeros((1008, 2048), np.float32), np.zeros(1008, np.float32)
  return state


def random_inception_variables(seed=0):
  """He-scaled random conv kernels (activations keep their scale through the ReLUs), BatchNorm off identity."""
  rng = np.random.default_rng(seed)
  shapes = jax.tree_util.tree_map(lambda x: x.shape, inception.abstract_variables())
  def draw(path, shape):
    leaf = path[-1].key
    if leaf == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape).astype(np.float32)
    if leaf in ("scale", "var"):
      return rng.uniform(0.8, 1.2, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)  # bias, mean
  return jax.tree_util.tree_map_with_path(draw, shapes, is_leaf=lambda x: isinstance(x, tuple))


def test_inception_extractor_from_safetensors(tmp_path):
  variables = random_inception_variables()
  path = tmp_path / "fid_inception.safetensors"
  common.save_state_dict(flax_variables_to_torch_state(variables), path)
  extractor = fid.select_feature_extractor(inception_weights=str(path), batch_size=2)
  assert (extractor.name, extractor.fd_metric, extractor.kd_metric, extractor.dim) == ("inception", "fid", "kid",
                                                                                        2048)
  images = np.random.default_rng(10).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
  features = extractor(images)  # two calls of the compiled network: 2 images, then 1 padded to 2
  assert features.shape == (3, 2048) and features.std() > 1e-3
  # The same network on the same [0, 1] images, two at a time (the shape the extractor compiled for).
  apply = jax.jit(inception.FIDInceptionV3().apply)
  unit = images.astype(np.float32) / 255
  direct = np.concatenate([apply(variables, unit[:2]), apply(variables, unit[1:])[1:]])
  np.testing.assert_allclose(features, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())


def batches_of(images, batch_size, as_dict=False):
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    yield {"image": chunk, "label": np.zeros(len(chunk))} if as_dict else chunk


def must_not_be_read():
  raise AssertionError("the dataset was read although its statistics are cached")
  yield  # a generator


def test_reference_statistics_are_computed_once_and_cached(tmp_path):
  extractor = fake_extractor()
  images = np.random.default_rng(11).uniform(-1, 1, (10, 8, 8, 3)).astype(np.float32)
  key = dict(cache_dir=tmp_path, dataset="shapes/r32", split="test", resolution=8)
  first = fid.reference_statistics(extractor, batches_of(images, 3, as_dict=True), num_images=7, **key)
  path = fid.cache_path(tmp_path, dataset="shapes/r32", split="test", resolution=8, extractor=extractor,
                        num_images=7)
  assert path.exists() and path.name == "shapes_r32-test-r8-fake-n7.npz"
  assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
  assert first.num_images == 7 and first.features is None
  expected = extractor(images[:7])
  np.testing.assert_allclose(first.mu, expected.mean(0), rtol=1e-6)
  np.testing.assert_allclose(first.sigma, np.cov(expected.astype(np.float64), rowvar=False), rtol=1e-6)
  mtime = os.stat(path).st_mtime_ns
  again = fid.reference_statistics(extractor, must_not_be_read(), num_images=7, **key)
  np.testing.assert_array_equal(again.mu, first.mu)
  np.testing.assert_array_equal(again.sigma, first.sigma)
  assert os.stat(path).st_mtime_ns == mtime
  # Another resolution, extractor or count is another entry.
  fid.reference_statistics(extractor, batches_of(images, 4), **dict(key, resolution=16))
  fid.reference_statistics(fake_extractor("other"), batches_of(images, 4), num_images=7, **key)
  assert len(list(tmp_path.glob("*.npz"))) == 3
  # Asking for features (KID) recomputes an entry cached without them, once.
  with_features = fid.reference_statistics(extractor, batches_of(images, 5), num_images=7, keep_features=True, **key)
  np.testing.assert_allclose(with_features.features, expected, rtol=1e-6)
  cached = fid.reference_statistics(extractor, must_not_be_read(), num_images=7, keep_features=True, **key)
  np.testing.assert_array_equal(cached.features, with_features.features)
  # Not enough images: an error, and nothing cached.
  with pytest.raises(ValueError, match="only 10"):
    fid.reference_statistics(extractor, batches_of(images, 4), num_images=20, **key)


def test_cached_file_for_other_settings_is_refused(tmp_path):
  extractor = fake_extractor()
  images = np.random.default_rng(12).uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  fid.reference_statistics(extractor, batches_of(images, 3), cache_dir=tmp_path, dataset="a", split="test",
                           resolution=8)
  src = fid.cache_path(tmp_path, dataset="a", split="test", resolution=8, extractor=extractor)
  dst = fid.cache_path(tmp_path, dataset="b", split="test", resolution=8, extractor=extractor)
  src.rename(dst)
  with pytest.raises(ValueError, match="holds statistics for"):
    fid.reference_statistics(extractor, must_not_be_read(), cache_dir=tmp_path, dataset="b", split="test",
                             resolution=8)


def test_distance_metrics_kid_needs_features():
  extractor = fake_extractor()
  rng = np.random.default_rng(13)
  with_features = fid.FeatureStats.from_features(rng.standard_normal((20, 3)))
  without = fid.FeatureStats.from_features(rng.standard_normal((20, 3)), keep_features=False)
  assert set(fid.distance_metrics(extractor, with_features, without)) == {"fd_fake"}
  with pytest.raises(ValueError, match="KID needs the features"):
    fid.distance_metrics(extractor, with_features, without, kid=True)
  metrics = fid.distance_metrics(extractor, with_features, with_features, kid_subsets=2, kid_subset_size=20)
  assert metrics["fd_fake"] == pytest.approx(0.0, abs=1e-9)
