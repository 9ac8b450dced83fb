"""Entry point: `python -m sd_jax.main --config=configs/X.py[:k=v,...] --workdir=DIR [--config.a.b=v]`.

Parses flags, initialises multi-host JAX when asked, and calls `train.train_and_evaluate(config, workdir)`.
Rerunning the same command on the same workdir resumes exactly.

Multi-host:
  * TPU pods: `--jax_distributed` (JAX finds the coordinator itself).
  * GPU/CPU clusters: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the environment
    variables SD_JAX_COORDINATOR_ADDRESS / SD_JAX_NUM_PROCESSES / SD_JAX_PROCESS_ID, as a launcher sets them).
  * SLURM: `srun ... python -m sd_jax.main ... --slurm` (or SD_JAX_SLURM=1), one process per srun task: the
    coordinator is the first host of the step's node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST) on
    `--coordinator_port` (SD_JAX_COORDINATOR_PORT; default derived from SLURM_JOB_ID), the process id is
    SLURM_PROCID and the process count SLURM_NTASKS. Explicit flags above take precedence.
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
flags.DEFINE_bool("slurm", os.environ.get("SD_JAX_SLURM", "").lower() in ("1", "true", "yes"),
                  "Take the multi-process set-up from SLURM's environment (one process per srun task).")
flags.DEFINE_integer("coordinator_port", int(os.environ.get("SD_JAX_COORDINATOR_PORT", "0")) or None,
                     "Coordinator port for --slurm (default: 61440 + SLURM_JOB_ID mod 4096).")
flags.mark_flags_as_required(["config", "workdir"])


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: "node[003-005,009],gpu1" -> "node003", "r[1-2]-n[07-08]" -> "r1-n07"."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += (ch == "[") - (ch == "]")
    if ch == "," and depth == 0:
      end = i
      break
  host, text = "", nodelist[:end]
  while "[" in text:
    before, _, rest = text.partition("[")
    inside, _, text = rest.partition("]")
    host += before + inside.split(",")[0].split("-")[0]
  return (host + text).strip()


def slurm_settings(environ, port: int | None = None) -> tuple[str | None, int | None, int | None]:
  """(coordinator address, process count, process id) of this srun task; (None, None, None) for a single task."""
  missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS") if k not in environ]
  nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
  if missing or not nodelist:
    missing += [] if nodelist else ["SLURM_JOB_NODELIST"]
    raise ValueError(f"--slurm: {', '.join(missing)} not set. Start one process per task with srun inside an "
                     "allocation (sbatch / salloc), or drop --slurm and pass --coordinator_address, "
                     "--num_processes and --process_id.")
  num_processes = int(environ["SLURM_NTASKS"])
  if num_processes == 1:
    return None, None, None
  if not port:
    port = 61440 + int(environ.get("SLURM_JOB_ID", "0")) % 4096  # the top of the ephemeral range, per job
  return f"{first_host(nodelist)}:{port}", num_processes, int(environ["SLURM_PROCID"])


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
  address, num_processes, process_id = FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  if FLAGS.slurm:
    try:
      slurm = slurm_settings(os.environ, FLAGS.coordinator_port)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    address = address or slurm[0]
    num_processes = num_processes or slurm[1]
    process_id = process_id if process_id is not None else slurm[2]
  if not (address or (num_processes or 1) > 1 or FLAGS.jax_distributed):  # one process: every core on a CPU
    from sd_jax import machine
    machine.use_every_core([FLAGS.config.batch_size])
  initialize_distributed(address, num_processes, process_id, FLAGS.jax_distributed)
  import jax
  from sd_jax import checkpoint as ckpt_lib
  from sd_jax import train
  from sd_jax import workdir_lock
  logging.info("JAX %s, process %d of %d, %d local / %d global devices.", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError, workdir_lock.WorkdirLockedError,
          ckpt_lib.DamagedCheckpointError) as e:
    # Bad input: print the message, not a traceback, and exit non-zero.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  from sd_jax import machine as _machine
  _machine.reexec_with_hugepage_malloc()  # large CPU buffers in huge pages (sd_jax/machine.py)
  from sd_jax import cli
  cli.run_app(main)  # app.run(main), with the --help and error format of every sd_jax command
