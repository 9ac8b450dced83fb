"""Tests for sd_jax.data.input_pipeline: batches, sharding across hosts, exact resume.

Most tests read `sd_jax_test_shapes`, a tiny stand-in TFDS builder defined here
(same feature names as `shapes`, plus an `index` feature used as the label so a
batch row can be traced back to its example), through `dataset.name="tfds"`.
"""

import io
import json
import os

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from sd_jax.data import input_pipeline
from sd_jax.data import shapes
from sd_jax.data import tokenizer as tokenizer_lib

NUM_TRAIN, NUM_TEST = 24, 10
KIND_NAMES = ["circle", "square", "triangle"]


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


class SdJaxTestShapes(tfds.core.GeneratorBasedBuilder):
  """Stand-in for sd_jax.data.shapes: random non-square images + captions."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "caption": tfds.features.Text(),
        "kind": tfds.features.ClassLabel(names=KIND_NAMES),
        "index": np.int32,
    }), disable_shuffling=True)  # stored in generation order: position == index

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(NUM_TRAIN, 0),
            "test": self._generate_examples(NUM_TEST, 1)}

  def _generate_examples(self, n, seed):
    for i in range(n):
      rng = np.random.default_rng([seed, i])
      h, w = 12 + i % 3 * 4, 16  # non-square: exercises resize + crop
      kind = KIND_NAMES[i % 3]
      yield i, {"image": _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                "caption": f"a {kind} item {chr(97 + i)}", "kind": kind, "index": i}


class CocoCaptionsStandIn(tfds.core.GeneratorBasedBuilder,
                          skip_registration=True):
  """Writes files laid out as TFDS coco_captions/2014 (image + captions list).

  The real `coco_captions` builder needs TensorFlow even to be constructed, so
  the pipeline reads a prepared copy from its files; this makes such a copy.
  """

  name = "coco_captions"
  VERSION = tfds.core.Version("1.1.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "image/id": np.int64,
        "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(6), "val": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      image = np.full((20, 30, 3), 40 * i, np.uint8)
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format="JPEG")
      yield i, {"image": buf.getvalue(), "image/id": i,
                "captions": [{"text": f"Photo {i} caption {j}", "id": j}
                             for j in range(3)]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  # Prepared on first use by the pipeline (it needs no download).
  return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok"))
  captions = [f"a {k} item {chr(97 + i)}" for k in KIND_NAMES for i in range(26)]
  tokenizer_lib.train_tokenizer(captions, path, vocab_size=600, max_length=12)
  return path


def make_config(data_dir, **overrides):
  cfg = input_pipeline.default_config()
  cfg.name = "tfds"
  cfg.tfds_name = "sd_jax_test_shapes"
  cfg.data_dir = data_dir
  cfg.resolution = 8
  cfg.label_key = "index"
  cfg.update(overrides)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batches(data_dir, tokenizer_dir):
  cfg = make_config(data_dir, tokenizer=tokenizer_dir, max_text_len=12)
  it = input_pipeline.create_iterator(cfg, split="train", global_batch_size=6, seed=0)
  batch = next(it)
  assert set(batch) == {"image", "label", "tokens"}
  assert batch["image"].shape == (6, 8, 8, 3)
  assert batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (6,)
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (6, 12)
  tok = tokenizer_lib.load_clip_tokenizer(tokenizer_dir)
  info = input_pipeline.dataset_info(cfg, "train")
  for label, tokens in zip(batch["label"], batch["tokens"]):
    assert tok.decode(tokens) == info.captions(int(label))
  json.dumps(it.get_state())


def test_epochs_are_reshuffled_permutations(data_dir):
  cfg = make_config(data_dir)
  it = input_pipeline.create_iterator(cfg, split="train", global_batch_size=8, seed=3)
  epochs = [np.concatenate([b["label"] for b in take(it, 3)]) for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(NUM_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  # Deterministic in the seed.
  again = input_pipeline.create_iterator(cfg, split="train", global_batch_size=8, seed=3)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in take(again, 3)]), epochs[0])
  other = input_pipeline.create_iterator(cfg, split="train", global_batch_size=8, seed=4)
  assert not np.array_equal(
      np.concatenate([b["label"] for b in take(other, 3)]), epochs[0])


@pytest.mark.parametrize("process_count", [2, 3])
def test_hosts_split_the_one_process_batches(data_dir, process_count):
  """Host p's batch s is rows [p*B, (p+1)*B) of the 1-process batch s."""
  cfg = make_config(data_dir, crop="random", random_flip=True)
  kwargs = dict(split="train", global_batch_size=6, seed=1)
  single = take(input_pipeline.create_iterator(cfg, **kwargs, process_index=0,
                                         process_count=1), 7)  # crosses epochs
  hosts = [take(input_pipeline.create_iterator(cfg, **kwargs, process_index=p,
                                         process_count=process_count), 7)
           for p in range(process_count)]
  for step, expected in enumerate(single):
    local = [h[step] for h in hosts]
    assert local[0]["image"].shape[0] == 6 // process_count
    merged = {k: np.concatenate([b[k] for b in local]) for k in expected}
    assert_batches_equal([merged], [expected])


def test_eval_hosts_and_remainder(data_dir):
  cfg = make_config(data_dir)
  kwargs = dict(split="test", global_batch_size=4, seed=0, train=False)
  single = list(input_pipeline.create_iterator(cfg, **kwargs, process_count=1,
                                         process_index=0))
  # In order, one pass, last partial batch kept.
  assert [b["label"].tolist() for b in single] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                   [8, 9]]
  dropped = list(input_pipeline.create_iterator(cfg, **kwargs, drop_remainder=True))
  assert len(dropped) == 2
  # Padded: every host yields 3 batches of 2 rows; masks mark the real rows.
  hosts = [list(input_pipeline.create_iterator(cfg, **kwargs, process_index=p,
                                         process_count=2, pad_remainder=True))
           for p in range(2)]
  assert [len(h) for h in hosts] == [3, 3]
  for step, expected in enumerate(single):
    merged = {k: np.concatenate([h[step][k] for h in hosts])
              for k in hosts[0][step]}
    n = len(expected["label"])
    assert merged["mask"].tolist() == [True] * n + [False] * (4 - n)
    np.testing.assert_array_equal(merged["label"][:n], expected["label"])
    np.testing.assert_array_equal(merged["image"][:n], expected["image"])
  # No augmentation in evaluation, even if configured.
  aug = make_config(data_dir, crop="random", random_flip=True)
  assert_batches_equal(list(input_pipeline.create_iterator(aug, **kwargs)), single)


def test_exact_resume_with_augmentation(data_dir):
  cfg = make_config(data_dir, crop="random", random_flip=True)
  kwargs = dict(split="train", global_batch_size=5, seed=7)
  it = input_pipeline.create_iterator(cfg, **kwargs)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  expected = take(it, 6)
  resumed = input_pipeline.create_iterator(cfg, **kwargs)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)
  # Augmentation is on: an example's image differs between epochs.
  first = input_pipeline.create_iterator(cfg, **kwargs)
  seen = {}
  differs = False
  for batch in take(first, 15):
    for label, image in zip(batch["label"], batch["image"]):
      if label in seen and not np.array_equal(seen[label], image):
        differs = True
      seen[label] = image
  assert differs


def test_grain_orbax_checkpoint(data_dir, tmp_path):
  cfg = make_config(data_dir, crop="random")
  kwargs = dict(split="train", global_batch_size=4, seed=2)
  it = input_pipeline.create_iterator(cfg, **kwargs)
  take(it, 3)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  mngr.save(3, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = take(it, 3)
  fresh = input_pipeline.create_iterator(cfg, **kwargs)
  restored = mngr.restore(3, args=ocp.args.Composite(
      data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored["data_iter"] is fresh
  assert_batches_equal(take(fresh, 3), expected)
  assert os.path.exists(tmp_path / "ckpt/3/data_iter/process_0-of-1.json")


def test_worker_processes_give_the_same_batches_and_states(data_dir,
                                                          tokenizer_dir):
  cfg = make_config(data_dir, crop="random", random_flip=True,
                    tokenizer=tokenizer_dir, max_text_len=12)
  kwargs = dict(split="train", global_batch_size=4, seed=5)
  in_process = input_pipeline.create_iterator(cfg, **kwargs)
  expected = take(in_process, 5)
  cfg.num_workers = 2
  it = input_pipeline.create_iterator(cfg, **kwargs)
  try:
    got = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  assert_batches_equal(got, expected[:3])
  assert state == {"examples_seen": 12, "global_batch_size": 4}
  # The state does not depend on num_workers: resume in-process.
  cfg.num_workers = 0
  resumed = input_pipeline.create_iterator(cfg, **kwargs)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 2), expected[3:])


def test_resume_with_other_process_count_or_batch_size(data_dir):
  cfg = make_config(data_dir, crop="random", random_flip=True)
  kwargs = dict(split="train", seed=9)
  single = input_pipeline.create_iterator(cfg, **kwargs, global_batch_size=6)
  take(single, 4)
  state = single.get_state()
  expected = take(single, 2)
  # 2 hosts, same global batch: host blocks of the same global batches.
  hosts = []
  for p in range(2):
    it = input_pipeline.create_iterator(cfg, **kwargs, global_batch_size=6,
                                  process_index=p, process_count=2)
    it.set_state(state)
    hosts.append(take(it, 2))
  for step in range(2):
    merged = {k: np.concatenate([h[step][k] for h in hosts])
              for k in expected[step]}
    assert_batches_equal([merged], [expected[step]])
  # Doubled global batch: one batch holds the next two 6-example batches.
  big = input_pipeline.create_iterator(cfg, **kwargs, global_batch_size=12)
  big.set_state(state)  # 24 examples seen = 2 batches of 12
  merged = {k: np.concatenate([e[k] for e in expected]) for k in expected[0]}
  assert_batches_equal([next(big)], [merged])
  odd = input_pipeline.create_iterator(cfg, **kwargs, global_batch_size=5)
  with pytest.raises(ValueError, match="consumed 24 examples.*global batch size 5"):
    odd.set_state(state)


def test_config_errors(data_dir, tokenizer_dir):
  kwargs = dict(split="train", global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"unknown dataset.name 'imagenet'.*"
                     r"\['shapes', 'folder', 'tfds', 'preferences'\]"):
    input_pipeline.create_iterator(make_config(data_dir, name="imagenet"), **kwargs)
  with pytest.raises(ValueError, match="global batch size 6 is not divisible "
                     "by the process count 4"):
    input_pipeline.create_iterator(make_config(data_dir), split="train",
                             global_batch_size=6, seed=0, process_index=0,
                             process_count=4)
  with pytest.raises(ValueError, match=r"unknown split 'validation'.*"
                     r"\['test', 'train'\]"):
    input_pipeline.create_iterator(make_config(data_dir), **{**kwargs,
                                                      "split": "validation"})
  with pytest.raises(ValueError, match=r"dataset.text_key='captions.text' is not"
                     r".*\['image', 'caption', 'kind', 'index'\]"):
    input_pipeline.create_iterator(make_config(data_dir, text_key="captions.text"),
                             **kwargs)
  with pytest.raises(ValueError, match="no caption source"):
    input_pipeline.create_iterator(make_config(data_dir, text_key="", label_key="",
                                         tokenizer=tokenizer_dir), **kwargs)
  with pytest.raises(ValueError, match="unknown dataset.crop"):
    input_pipeline.create_iterator(make_config(data_dir, crop="middle"), **kwargs)


def test_tfds_dataset_needing_download_is_not_downloaded(tmp_path):
  cfg = make_config(str(tmp_path), tfds_name="cifar10")
  with pytest.raises(FileNotFoundError,
                     match=r"not prepared .* nothing is downloaded.*tfds build"):
    input_pipeline.create_iterator(cfg, split="train", global_batch_size=2, seed=0)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                 "horse", "ship", "truck"]


def _write_cifar10_metadata(data_dir):
  """dataset_info.json etc. of a prepared cifar10 (for MockPolicy.USE_FILES).

  TFDS's cifar10 builder learns its class names from the downloaded archive,
  so code-only mocking has no names; mocking from metadata files has them.
  """
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("cifar10", data_dir=data_dir)
  builder.info.features["label"].names = CIFAR10_NAMES
  template = naming.ShardedFileTemplate(data_dir=builder.data_path,
                                        dataset_name="cifar10",
                                        filetype_suffix="array_record")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0,
                          filename_template=template.replace(split=name))
      for name, n in (("train", 12), ("test", 12))]))
  builder.info.set_file_format("array_record", override=True)
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


def test_tfds_cifar10_class_name_captions(tmp_path, tokenizer_dir):
  _write_cifar10_metadata(str(tmp_path))
  cfg = make_config(str(tmp_path), tfds_name="cifar10", text_key="",
                    label_key="label", resolution=16, tokenizer=tokenizer_dir,
                    max_text_len=40)
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    info = input_pipeline.dataset_info(cfg, "test")
    it = input_pipeline.create_iterator(cfg, split="train", global_batch_size=4,
                                  seed=0)
    batch = next(it)
    eval_batch = next(input_pipeline.create_iterator(cfg, split="test",
                                               global_batch_size=12, seed=0,
                                               train=False))
  assert info.label_names == CIFAR10_NAMES and info.num_examples == 12
  assert batch["image"].shape == (4, 16, 16, 3)
  labels = eval_batch["label"]
  captions = [info.captions(i) for i in range(12)]
  assert captions == [f"a photo of a {CIFAR10_NAMES[label]}" for label in labels]
  tok = tokenizer_lib.load_clip_tokenizer(tokenizer_dir, max_length=40)
  assert [tok.decode(t) for t in eval_batch["tokens"]] == captions
  assert "a photo of a airplane" in captions  # mock data is seeded: label 0 occurs


def test_tfds_coco_captions_from_prepared_files(tmp_path, tokenizer_dir):
  CocoCaptionsStandIn(data_dir=str(tmp_path)).download_and_prepare(
      file_format="array_record")
  cfg = make_config(str(tmp_path), tfds_name="coco_captions",
                    text_key="captions.text", label_key="", resolution=10,
                    tokenizer=tokenizer_dir, max_text_len=40)
  info = input_pipeline.dataset_info(cfg, "val")
  assert info.num_examples == 3 and info.label_names is None
  assert sorted(info.captions(i) for i in range(3)) == [
      f"Photo {i} caption 0" for i in range(3)]  # eval: the first caption
  tok = tokenizer_lib.load_clip_tokenizer(tokenizer_dir, max_length=40)
  it = input_pipeline.create_iterator(cfg, split="train", global_batch_size=6, seed=0)
  picked = []
  for batch in take(it, 4):
    assert batch["image"].shape == (6, 10, 10, 3)
    for image, tokens in zip(batch["image"], batch["tokens"]):
      photo = round((image[0, 0, 0] + 1) * 127.5 / 40)  # flat image = 40 * i
      text = tok.decode(tokens)
      assert text.startswith(f"photo {photo} caption ")
      picked.append(text[-1])
  assert set(picked) == {"0", "1", "2"}  # train: a seeded random caption
  with pytest.raises(ValueError, match=r"unknown split 'test'.*\['train', 'val'\]"):
    input_pipeline.dataset_info(cfg, "test")


def test_folder_dataset(tmp_path):
  records = []
  for i, mode in enumerate(["RGB", "L", "RGBA", "RGB", "RGB"]):
    size = (10 + i, 14)
    arr = np.full((size[1], size[0], len(mode) if mode != "L" else 1), 30 * i,
                  np.uint8).squeeze()
    Image.fromarray(arr, mode).save(tmp_path / f"{i}.png")
    records.append({"file_name": f"{i}.png", "text": f"image {i}"})
  records[-1]["split"] = "test"
  (tmp_path / "metadata.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records))
  cfg = input_pipeline.default_config()
  cfg.update(name="folder", folder=str(tmp_path), resolution=6)
  info = input_pipeline.dataset_info(cfg, "train")
  assert info.num_examples == 4 and info.captions(2) == "image 2"
  batches = list(input_pipeline.create_iterator(cfg, split="train", global_batch_size=3,
                                          seed=0, train=False))
  assert [b["image"].shape for b in batches] == [(3, 6, 6, 3), (1, 6, 6, 3)]
  assert batches[0]["image"][1].min() == batches[0]["image"][1].max()  # gray
  assert input_pipeline.dataset_info(cfg, "test").num_examples == 1


def test_real_shapes_builder(tmp_path):
  cfg = input_pipeline.default_config()
  cfg.update(name="shapes", data_dir=str(tmp_path), resolution=16,
             shapes_config="r32-train12-test4-comp4", crop="random",
             random_flip=True)
  batch = next(input_pipeline.create_iterator(cfg, split="train", global_batch_size=4,
                                        seed=0))
  assert batch["image"].shape == (4, 16, 16, 3)
  # The same build, named by a ShapesConfig object instead.
  as_object = ml_collections.ConfigDict({**cfg.to_dict(), "shapes_config":
                                         shapes.make_config(32, num_train=12,
                                                            num_test=4,
                                                            num_compositional=4)})
  same = next(input_pipeline.create_iterator(as_object, split="train",
                                       global_batch_size=4, seed=0))
  assert_batches_equal([same], [batch])
  info = input_pipeline.dataset_info(cfg, "compositional")
  assert info.num_examples == 4 and isinstance(info.captions(0), str)
  assert info.captions(0) and "caption" in info.feature_keys
  with pytest.raises(ValueError, match="unknown split 'val'.*compositional"):
    input_pipeline.dataset_info(cfg, "val")
  bad = cfg.copy_and_resolve_references()
  bad.shapes_config = "tiny"
  with pytest.raises(ValueError, match="unknown dataset.shapes_config 'tiny'"):
    input_pipeline.dataset_info(bad, "train")


def test_resize_and_crop():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 18:22] = 255  # a bright vertical bar in the middle
  out = input_pipeline.resize_and_crop(image, 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  assert out[:, 4:6].mean() > 200 and out[:, :3].max() == 0  # centred
  rng = np.random.default_rng(0)
  crops = {input_pipeline.resize_and_crop(image, 10, random_crop=True, rng=rng)
           .tobytes() for _ in range(20)}
  assert len(crops) > 1
  np.testing.assert_array_equal(
      input_pipeline.resize_and_crop(image, 10, flip=True), out[:, ::-1])
