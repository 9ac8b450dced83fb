"""Entry point: `python -m sd_jax.main --config=configs/X.py[:k=v,...] --workdir=DIR [--config.a.b=v]`.

Parses flags, initialises multi-host JAX when asked, and calls `train.train_and_evaluate(config, workdir)`.
Rerunning the same command on the same workdir resumes exactly.

Multi-host:
  * TPU pods: `--jax_distributed` (JAX finds the coordinator itself).
  * GPU/CPU clusters: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the environment
    variables SD_JAX_COORDINATOR_ADDRESS / SD_JAX_NUM_PROCESSES / SD_JAX_PROCESS_ID, as a launcher sets them).
"""

from __future__ import annotations

import logging as logging_std
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/X.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods).")
flags.DEFINE_string("coordinator_address", os.environ.get("SD_JAX_COORDINATOR_ADDRESS"),
                    "host:port of process 0, for multi-process runs on GPU or CPU clusters.")
flags.DEFINE_integer("num_processes", int(os.environ.get("SD_JAX_NUM_PROCESSES", "0")) or None,
                     "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", int(os.environ["SD_JAX_PROCESS_ID"]) if "SD_JAX_PROCESS_ID" in os.environ
                     else None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, auto=False) -> None:
  """Starts multi-process JAX. On CPU the collectives go through gloo."""
  import jax
  if coordinator_address or (num_processes and num_processes > 1):
    if not (coordinator_address and num_processes and process_id is not None):
      raise ValueError("A multi-process run needs --coordinator_address, --num_processes and --process_id.")
    # CPU collectives go through gloo (harmless on GPU/TPU, where they are not used for training).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif auto:
    jax.distributed.initialize()


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's and grain's per-save INFO chatter off the console; their warnings still show."""

  def filter(self, record):
    noisy = ("/orbax/", "/grain/", "/tensorflow_datasets/")
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.jax_distributed)
  import jax
  from sd_jax import train
  logging.info("JAX %s, process %d of %d, %d local / %d global devices.", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
    # Bad input: print the message, not a traceback, and exit non-zero.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
