"""Tests for sd_jax.data.folder (image folders with metadata.jsonl)."""

import json
import logging
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from sd_jax.data import folder as folder_lib


def write_image(path, mode="RGB", size=(12, 8), fmt=None, value=100):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
  arr = np.full((size[1], size[0], channels), value, np.uint8).squeeze()
  Image.fromarray(arr, mode).save(path, format=fmt)


def write_metadata(folder, records, raw_lines=()):
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    for line in raw_lines:
      f.write(line + "\n")


@pytest.fixture
def image_folder(tmp_path):
  folder = str(tmp_path)
  write_image(f"{folder}/a.png", "RGB", (12, 8))
  write_image(f"{folder}/b.png", "L", (10, 10))
  write_image(f"{folder}/sub/c.png", "RGBA", (8, 16))
  write_image(f"{folder}/sub/d.jpg", "RGB", (20, 10), fmt="JPEG")
  write_image(f"{folder}/e.png", "RGB", (9, 9))
  write_metadata(folder, [
      {"file_name": "a.png", "text": "first"},
      {"file_name": "b.png", "text": "gray"},
      {"file_name": "sub/c.png", "text": "alpha"},
      {"file_name": "sub/d.jpg", "text": "jpeg"},
      {"file_name": "e.png", "text": "held out", "split": "test"},
  ])
  return folder


def test_reads_images_and_captions(image_folder):
  src = folder_lib.ImageFolderSource(image_folder)
  assert len(src) == 4 and src.split == "train"
  assert [src.caption(i) for i in range(4)] == ["first", "gray", "alpha", "jpeg"]
  shapes = []
  for i in range(4):
    ex = src[i]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape[-1] == 3
    shapes.append(ex["image"].shape)
    assert ex["caption"] == src.caption(i)
  assert shapes == [(8, 12, 3), (10, 10, 3), (16, 8, 3), (10, 20, 3)]
  np.testing.assert_array_equal(src[1]["image"], 100)  # gray -> 3 equal channels
  # Picklable for grain worker processes.
  assert pickle.loads(pickle.dumps(src))[0]["caption"] == "first"


def test_transparent_pixels_become_white(tmp_path):
  arr = np.zeros((4, 4, 4), np.uint8)
  arr[..., 0] = 200
  arr[:2, :, 3] = 255  # top half opaque red, bottom half transparent
  Image.fromarray(arr, "RGBA").save(tmp_path / "x.png")
  rgb = folder_lib.load_rgb(str(tmp_path / "x.png"))
  np.testing.assert_array_equal(rgb[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(rgb[3, 0], [255, 255, 255])


def test_splits(image_folder):
  assert folder_lib.available_splits(image_folder) == ["test", "train"]
  test = folder_lib.ImageFolderSource(image_folder, "test")
  assert len(test) == 1 and test[0]["caption"] == "held out"
  with pytest.raises(ValueError, match=r"unknown split 'val'.*\['test', 'train'\]"):
    folder_lib.ImageFolderSource(image_folder, "val")


def test_split_subfolders(tmp_path):
  for split, n in (("train", 3), ("test", 2)):
    write_image(f"{tmp_path}/{split}/img0.png")
    write_metadata(f"{tmp_path}/{split}",
                   [{"file_name": "img0.png", "text": f"{split} {i}"}
                    for i in range(n)])
  assert folder_lib.available_splits(str(tmp_path)) == ["test", "train"]
  src = folder_lib.ImageFolderSource(str(tmp_path), "test")
  assert len(src) == 2 and src.caption(1) == "test 1"


def test_missing_metadata(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=f"{tmp_path}/metadata.jsonl not found"):
    folder_lib.ImageFolderSource(str(tmp_path))


def test_missing_file_names_line(image_folder):
  write_metadata(image_folder, [{"file_name": "a.png", "text": "x"},
                                {"file_name": "nope/z.png", "text": "y"}])
  with pytest.raises(FileNotFoundError, match=r"line 2: file_name 'nope/z.png'"):
    folder_lib.ImageFolderSource(image_folder)


def test_malformed_json_names_line(image_folder):
  write_metadata(image_folder, [{"file_name": "a.png", "text": "x"}],
                 raw_lines=["", '{"file_name": "b.png", "text": '])
  with pytest.raises(ValueError, match="line 3: malformed JSON"):
    folder_lib.ImageFolderSource(image_folder)


def test_text_missing_from_some_lines(image_folder):
  write_metadata(image_folder, [{"file_name": "a.png", "text": "x"},
                                {"file_name": "b.png"}])
  with pytest.raises(ValueError, match="line 2: no 'text' field"):
    folder_lib.ImageFolderSource(image_folder)
  write_metadata(image_folder, [{"file_name": "a.png"}, {"file_name": "b.png"}])
  assert folder_lib.ImageFolderSource(image_folder).caption(1) == ""


def test_corrupt_images(image_folder, caplog):
  with open(f"{image_folder}/bad.png", "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n this is not a png")
  write_image(f"{image_folder}/trunc.png", size=(16, 16))
  data = open(f"{image_folder}/trunc.png", "rb").read()
  with open(f"{image_folder}/trunc.png", "wb") as f:
    f.write(data[:len(data) // 2])
  write_metadata(image_folder, [
      {"file_name": "a.png", "text": "ok"},
      {"file_name": "bad.png", "text": "bad"},
      {"file_name": "trunc.png", "text": "truncated"},
      {"file_name": "b.png", "text": "ok too"},
  ])
  with caplog.at_level(logging.WARNING):
    src = folder_lib.ImageFolderSource(image_folder, skip_corrupt=True)
  assert len(src) == 2 and [src.caption(i) for i in range(2)] == ["ok", "ok too"]
  assert [name for name, _ in src.skipped] == ["bad.png", "trunc.png"]
  assert "skipped 2 unreadable image(s) of 4: bad.png" in caplog.text
  assert "trunc.png" in caplog.text
  with pytest.raises(ValueError, match=r"corrupt or unreadable image .*bad\.png"):
    folder_lib.ImageFolderSource(image_folder, skip_corrupt=False)


def test_decode_failure_after_validation(image_folder, caplog):
  src = folder_lib.ImageFolderSource(image_folder)
  with open(f"{image_folder}/b.png", "wb") as f:  # breaks after validation
    f.write(b"garbage")
  with caplog.at_level(logging.WARNING):
    ex = src[1]
  assert ex["caption"] == "alpha"  # the next example, deterministically
  assert "cannot decode image" in caplog.text and "b.png" in caplog.text
  strict = pickle.loads(pickle.dumps(src))
  strict.skip_corrupt = False
  with pytest.raises(ValueError, match=r"cannot decode image .*b\.png"):
    strict[1]
