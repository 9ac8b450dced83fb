"""Test setup: 8 fake CPU devices (sharding tests), float32, no network, datasets built into a per-session dir."""

import os
import tempfile

# The test programs are tiny and compiling them dominates the suite: skip LLVM's optimisations (as sd_jax.bench
# --aot does). XLA's HLO passes still run, so the programs compute the same things (and cost/memory analyses are
# unchanged); CPU compiles are several times faster. Subprocesses inherit these flags (helpers.xla_flags).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")  # nothing downloads at run time
# Many tests compile the same tiny train step (in this process and in the subprocesses they start): share the
# compiled programs through JAX's persistent cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sd_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session: the tiny shapes configs are built once."""
  path = tmp_path_factory.mktemp("tfds")
  os.environ["SD_JAX_DATA_DIR"] = str(path)
  return str(path)
