"""A run never corrupts itself: one run per workdir, damaged checkpoints are stepped over, errors name the file."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sd_jax import checkpoint as ckpt_lib
from sd_jax import cli
from sd_jax import metrics
from sd_jax import train
from sd_jax import workdir_lock
from sd_jax.data import input_pipeline
from sd_jax.data import shapes
from tests import helpers

CONFIG = f"--config={helpers.REPO}/configs/shapes_ddpm.py:runlocal"


def _config(**overrides):
  base = {"total_steps": 2, "log_every_steps": 1, "save_every_steps": 1, "eval_every_steps": -1,
          "optim.schedule": "constant", "mesh.data": 1}
  base.update(overrides)
  return helpers.load_config(**base)


def _write_lock(workdir, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
            "token": "someone-else", "processes": 1, **fields}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------------------
# One run per workdir


def test_a_live_holder_keeps_the_workdir(data_dir, tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    _write_lock(tmp_path, pid=sleeper.pid)
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"in use by another run: pid {sleeper.pid} on host"):
      train.train_and_evaluate(_config(), str(tmp_path), devices=jax.devices()[:1])
  finally:
    sleeper.kill()
  assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.LOCK_FILE]  # nothing written
  # Another host's run with a fresh heartbeat holds it too.
  _write_lock(tmp_path, host="elsewhere", pid=1)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="on host elsewhere"):
    workdir_lock.WorkdirLock(tmp_path).acquire()


def test_a_dead_holder_is_taken_over_and_the_lock_released(data_dir, tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lock(tmp_path, pid=dead.pid)
  train.train_and_evaluate(_config(), str(tmp_path), devices=jax.devices()[:1])
  assert [r["step"] for r in metrics.read_metrics(tmp_path) if "loss" in r] == [1, 2]
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()  # released at the end
  # A holder on another host whose heartbeat stopped long ago is gone too; an unreadable lock file as well.
  for stale in ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 2 * workdir_lock.STALE_S}, None):
    if stale is None:
      (tmp_path / workdir_lock.LOCK_FILE).write_text("{not json")
    else:
      _write_lock(tmp_path, **stale)
    lock = workdir_lock.WorkdirLock(tmp_path, heartbeat_s=0.05)
    with lock:
      held = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
      assert held["token"] == lock.token and held["pid"] == os.getpid()
      time.sleep(0.3)
      assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["heartbeat"] > held["heartbeat"]
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_an_object_store_lock_is_written_read_back_and_checked(tmp_path, monkeypatch):
  """gs:// has no atomic create: the lock is written, read back and its token checked. Run here on a local folder
  treated as an object store."""
  monkeypatch.setattr(workdir_lock, "_is_local", lambda path: False)
  first = workdir_lock.WorkdirLock(tmp_path, heartbeat_s=60)
  first.acquire()
  try:
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["token"] == first.token
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"in use by another run: pid {os.getpid()}"):
      workdir_lock.WorkdirLock(tmp_path).acquire()
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["token"] == first.token  # left alone
  finally:
    first.release()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  # A stale holder (a dead process on this host) is taken over here too.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lock(tmp_path, pid=dead.pid)
  with workdir_lock.WorkdirLock(tmp_path) as lock:
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["token"] == lock.token


def test_a_second_run_on_a_busy_workdir_refuses(data_dir, tmp_path):
  """Two real `python -m sd_jax.main` on one workdir: the second stops with one line naming the first; the first
  trains on, and its metrics hold every step once."""
  shapes.build(data_dir, config="r32_tiny")
  env = {**os.environ, "XLA_FLAGS": helpers.xla_flags(1), "JAX_PLATFORMS": "cpu", "SD_JAX_DATA_DIR": data_dir}
  args = [CONFIG, f"--workdir={tmp_path}", "--config.total_steps=100000", "--config.save_every_steps=100000",
          "--config.log_every_steps=1", "--config.eval_every_steps=-1"]
  first = subprocess.Popen([sys.executable, "-m", "sd_jax.main", *args], cwd=helpers.REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not any("loss" in r for r in metrics.read_metrics(tmp_path)):
      assert first.poll() is None and time.time() < deadline, "the first run did not start training"
      time.sleep(0.5)
    second = helpers.run_main(args, env=env, timeout=300)
    assert second.returncode == 1
    assert f"error: {tmp_path} is in use by another run: pid {first.pid} on host {socket.gethostname()}" in \
        second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None  # the first run goes on
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=300)
  steps = [r["step"] for r in metrics.read_metrics(tmp_path) if "loss" in r]
  assert steps == list(range(1, len(steps) + 1))
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------------------
# A damaged latest checkpoint


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_dir):
  """A 3-step run with a checkpoint at every step."""
  workdir = tmp_path_factory.mktemp("saved_run")
  config = _config(total_steps=3, save_every_steps=1)
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  return config, workdir


def _truncate_largest_data_file(step_dir):
  files = sorted(step_dir.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
  os.truncate(files[-1], 100)


DAMAGES = {  # how a checkpoint is damaged -> what the message must name
    "truncated data file": (_truncate_largest_data_file, "3/state/ cannot be read"),
    "no manifest": (lambda d: (d / "state" / "manifest.ocdbt").unlink(), "3/state/manifest.ocdbt is missing"),
    "no _METADATA": (lambda d: (d / "state" / "_METADATA").unlink(), "3/state/_METADATA is missing"),
    "no state": (lambda d: shutil.rmtree(d / "state"), "3/state/ is missing"),
    "no data iterator file": (lambda d: (d / "data" / "process_0-of-1.json").unlink(),
                              "3/data/process_0-of-1.json is missing"),
}


def _restore_latest(config, workdir, strict):
  setup = train.cached_setup(config, devices=jax.devices()[:1])  # the saved run's: nothing traced again
  data = input_pipeline.create_iterator(config.dataset, split="train", global_batch_size=config.batch_size,
                                        seed=config.seed)
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=config.keep)
  try:
    return checkpointer.restore_latest(setup.abstract_state, data, strict=strict)
  finally:
    checkpointer.close()
    data.close()


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_named_moved_aside_and_stepped_over(saved_run, damage, tmp_path, caplog):
  config, original = saved_run
  workdir = tmp_path / "w"
  shutil.copytree(original, workdir)
  damage_fn, named = DAMAGES[damage]
  damage_fn(workdir / "checkpoints" / "3")
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=re.escape(named) + ".*strict_restore=True"):
    _restore_latest(config, workdir, strict=True)
  assert (workdir / "checkpoints" / "3").is_dir()  # strict: nothing moved
  with caplog.at_level(logging.ERROR):
    state, step = _restore_latest(config, workdir, strict=False)
  assert step == 2 and int(state.step) == 2
  assert (workdir / "checkpoints" / f"3{ckpt_lib.DAMAGED_SUFFIX}").is_dir()
  assert not (workdir / "checkpoints" / "3").exists()
  assert any(named in r.getMessage() and "3.damaged" in r.getMessage() for r in caplog.records)
  wanted = ckpt_lib.Checkpointer(str(original), keep=config.keep, with_data=False)
  try:
    step2 = wanted.restore(2, train.cached_setup(config, devices=jax.devices()[:1]).abstract_state)
  finally:
    wanted.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(step2.params))


def test_the_loop_resumes_exactly_past_a_damaged_checkpoint_and_never_starts_fresh(saved_run, tmp_path):
  config, original = saved_run
  workdir = tmp_path / "w"
  shutil.copytree(original, workdir)
  _truncate_largest_data_file(workdir / "checkpoints" / "3")
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])  # redoes step 3 from checkpoint 2
  assert helpers.losses(workdir) == pytest.approx(helpers.losses(original), rel=1e-6)
  assert (workdir / "checkpoints" / "3").is_dir() and (workdir / "checkpoints" / "3.damaged").is_dir()
  # Every checkpoint damaged: an error, not a fresh start.
  for step in (1, 2, 3):
    (workdir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="every checkpoint .* is damaged .* not starting from"):
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# No silent bad output


def test_zero_steps_on_a_fresh_workdir_refuses_to_export_an_untrained_model(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"total_steps=0 in a workdir with no checkpoint: nothing would be trained"):
    train.train_and_evaluate(_config(total_steps=0), str(tmp_path), devices=jax.devices()[:1])
  assert not (tmp_path / "export").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("key,value", [("optim.lr", float("nan")), ("optim.b2", 1.0), ("diffusion.beta_end", 0.0),
                                       ("ema_decay", float("inf")), ("optim.eps", 0.0)])
def test_config_values_out_of_range_or_not_finite_fail_naming_the_key(data_dir, tmp_path, key, value):
  with pytest.raises(ValueError, match=re.escape(f"config.{key}=")):
    train.train_and_evaluate(_config(**{key: value}), str(tmp_path), devices=jax.devices()[:1])
  assert not tmp_path.joinpath("checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------
# Errors that name what to fix


def test_command_line_mistakes_name_the_flag_or_path(tmp_path):
  config = f"--config={helpers.REPO}/configs/shapes_ddpm.py:runlocal"
  assert cli.config_flag_error([config, "--config.nope=1"]) == "unknown config key nope (--config.nope=1)."
  assert "Nearest valid keys: optim.lr" in cli.config_flag_error([config, "--config.optim.lrr=3e-4"])
  assert cli.config_flag_error([config, "--config.optim.lr=3e-4", "--config.ema_decay=0.99"]) is None
  missing = cli.config_flag_error([f"--config={helpers.REPO}/configs/nope.py"])
  assert "configs/nope.py does not exist" in missing and "shapes_ddpm.py" in missing
  afile = tmp_path / "afile"
  afile.write_text("")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    train.prepare_workdir(afile)
  with pytest.raises(ValueError, match="cannot be created"):
    train.prepare_workdir("/sys/sd_jax_not_allowed")  # not even root may create directories in sysfs
  # The real command: one line on stderr, exit status 1, no traceback.
  for args, message in (([config, "--config.nope=1", f"--workdir={tmp_path / 'w'}"], "unknown config key nope"),
                        ([f"--config={helpers.REPO}/configs/nope.py", f"--workdir={tmp_path / 'w'}"],
                         "nope.py does not exist"),
                        ([config, f"--workdir={afile}"], "is a file, not a directory")):
    result = helpers.run_main(args, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_caption_that_is_not_utf8_names_its_metadata_line(tmp_path):
  from PIL import Image
  from sd_jax.data import folder as folder_lib
  for name in ("a.png", "b.png"):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
  (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "fine"}\n'
                                           b'{"file_name": "b.png", "text": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"metadata.jsonl, line 2: not UTF-8 \(byte 0xe9 at column 36\)"):
    folder_lib.ImageFolderSource(str(tmp_path))


def test_a_truncated_safetensors_file_is_named_and_a_failed_convert_leaves_no_out(tmp_path):
  from sd_jax.models import vae as vae_models
  from sd_jax.weights import common
  source = tmp_path / "sd" / "vae"
  source.mkdir(parents=True)
  (source / "config.json").write_text(json.dumps(vae_models.vae_config_to_diffusers(vae_models.create_vae("tiny"))))
  weights = source / "diffusion_pytorch_model.safetensors"
  common.save_state_dict({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)}, weights)
  os.truncate(weights, 40)
  with pytest.raises(ValueError, match=re.escape(f"{weights} is not a readable safetensors file")):
    common.load_state_dict(weights)
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "sd_jax.convert", f"--from_diffusers={tmp_path / 'sd'}",
                           f"--out={out}"], cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and f"error: {weights} is not a readable safetensors file" in result.stderr
  assert "Traceback" not in result.stderr
  assert not out.exists()
