"""Test setup: 8 fake CPU devices (sharding tests), float32, no network, datasets built into a per-session dir."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")  # nothing downloads at run time

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session: the tiny shapes configs are built once."""
  path = tmp_path_factory.mktemp("tfds")
  os.environ["SD_JAX_DATA_DIR"] = str(path)
  return str(path)
