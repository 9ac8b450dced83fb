"""Shared converter utilities: safetensors round trips, pickle refusal, key diffs."""

import numpy as np
import pytest

from sd_jax.weights import common


def test_save_load_keeps_scalars_and_shapes(tmp_path):
  tensors = {"logit_scale": np.asarray(2.5, np.float32), "w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  common.save_state_dict(tensors, tmp_path / "m.safetensors")
  loaded = common.load_state_dict(tmp_path / "m.safetensors")
  assert loaded["logit_scale"].shape == () and loaded["logit_scale"] == 2.5
  np.testing.assert_array_equal(loaded["w"], tensors["w"])


def test_pickle_files_are_refused_with_a_way_out(tmp_path):
  (tmp_path / "model.ckpt").write_bytes(b"not read")
  with pytest.raises(ValueError, match="(?s)pickle-based.*safetensors.*allow_pickle"):
    common.load_state_dict(tmp_path / "model.ckpt")


def test_check_params_names_every_bad_key():
  expected = {"a": {"kernel": np.zeros((2, 3))}, "b": {"bias": np.zeros(3)}}
  with pytest.raises(common.WeightsMismatchError) as info:
    common.check_params(expected, {"a/kernel": np.zeros((3, 2)), "c/bias": np.zeros(1)}, what="test weights")
  message = str(info.value)
  assert "missing from the weights (1):\n    b/bias" in message
  assert "unexpected in the weights (1):\n    c/bias" in message
  assert "a/kernel: model (2, 3) vs weights (3, 2)" in message
