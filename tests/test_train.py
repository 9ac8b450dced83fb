"""The shared training loop on 8 fake CPU devices: meshes, pmap, resume, restore, init_from, bad runs."""

import contextlib
import functools
import logging
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from sd_jax import checkpoint as ckpt_lib
from sd_jax import metrics
from sd_jax import train
from tests import helpers

STEPS = 4
RELATIVE_WORKDIR = "runs/reference"


def _config(**overrides):
  base = {"total_steps": STEPS, "log_every_steps": 1, "save_every_steps": 2, "eval_every_steps": -1,
          "optim.schedule": "constant"}
  base.update(overrides)
  return helpers.load_config(**base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """One uninterrupted run on a single device: the losses every other layout must reproduce. Its --workdir is
  relative, as in README's command (test_relative_workdir)."""
  root = tmp_path_factory.mktemp("reference")
  with contextlib.chdir(root):
    train.train_and_evaluate(_config(eval_every_steps=0, **{"mesh.data": 1}), RELATIVE_WORKDIR,
                             devices=jax.devices()[:1])
  return root / RELATIVE_WORKDIR


MESHES = {"data8": dict(data=8, fsdp=1, tensor=1), "fsdp8": dict(data=1, fsdp=8, tensor=1),
          "data2fsdp2tensor2": dict(data=2, fsdp=2, tensor=2)}


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory, data_dir):
  """mesh_run(name): the workdir of the run of the reference's config on 8 devices laid out as MESHES[name], trained
  on first use (test_sharding_equivalence, and test_resharded_restore restores the fsdp8 run's checkpoint). Saved at
  the end only: a save of 8-device state costs several seconds, and the losses do not depend on it."""
  runs = {}

  def get(name):
    if name not in runs:
      workdir = tmp_path_factory.mktemp(name)
      config = _config(save_every_steps=STEPS, **{f"mesh.{k}": v for k, v in MESHES[name].items()})
      train.train_and_evaluate(config, str(workdir))
      runs[name] = workdir
    return runs[name]
  return get


def _assert_same_losses(workdir, reference, rtol=1e-5):
  got, want = helpers.losses(workdir), helpers.losses(reference)
  assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=rtol)


def test_workdir_contract(reference):
  rows = metrics.read_metrics(reference)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  for row in rows:
    if "loss" in row:
      for key in ("loss", "learning_rate", "grad_norm", "steps_per_sec"):
        assert key in row and np.isfinite(row[key]), key
  assert any("eval_loss" in row for row in rows)  # held-out loss at the end
  config = json.loads((reference / "config.json").read_text())
  assert config["trainer"] == "ddpm" and config["total_steps"] == STEPS
  assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  assert list(reference.glob("events.out.tfevents.*")), "TensorBoard events missing"
  # The loss goes down on a fixed batch size with a high learning rate (the loop trains something).
  losses = helpers.losses(reference)
  assert losses[STEPS] < losses[1]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharding_equivalence(mesh, reference, mesh_run):
  _assert_same_losses(mesh_run(mesh), reference)


def test_fsdp_actually_shards_params(data_dir):
  setup = train.setup(_config(**{"mesh.data": 1, "mesh.fsdp": 8}))
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
  assert any("fsdp" in str(spec) for spec in specs)
  tensor = train.setup(_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
  assert any("tensor" in str(s.spec) for s in jax.tree.leaves(tensor.state_shardings.params))


def test_setup_traces_the_model_init_once(data_dir):
  """The shapes (eval_shape) and the jitted init share one trace of the model's init."""
  from sd_jax import trainers
  config = _config(**{"mesh.data": 1})
  task = trainers.get(config.trainer).Task(config)
  calls, real = [], task.init_params
  task.init_params = lambda rng: (calls.append(rng), real(rng))[1]
  setup = train.setup(config, devices=jax.devices()[:1], task=task)
  state = jax.eval_shape(setup.init_fn, jax.random.PRNGKey(0))  # traces the jitted init, compiles nothing
  assert len(calls) == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                          setup.abstract_state)


def test_pmap_matches_jit(reference, tmp_path):
  train.train_and_evaluate(_config(parallelism="pmap", save_every_steps=STEPS), str(tmp_path))
  _assert_same_losses(tmp_path, reference)


def test_exact_resume_after_interruption(reference, tmp_path):
  """Lose everything after step 2 (as a crash would), rerun: the metrics equal the uninterrupted run's."""
  shutil.copytree(reference, tmp_path / "w")
  shutil.rmtree(tmp_path / "w" / "checkpoints" / "4")
  # The reference's own config, as rerunning its command would: the process reuses its setup (no new trace).
  train.train_and_evaluate(_config(eval_every_steps=0, **{"mesh.data": 1}), str(tmp_path / "w"),
                           devices=jax.devices()[:1])
  got, want = helpers.losses(tmp_path / "w"), helpers.losses(reference)
  assert got == want  # bitwise on CPU with the same device count
  rows = metrics.read_metrics(tmp_path / "w")
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # no duplicated rows after the resume
  # The whole final state (params, optimizer state, EMA params, RNG) is bitwise the uninterrupted run's.
  setup = train.setup(_config(**{"mesh.data": 1}), devices=jax.devices()[:1])
  final = []
  for workdir in (reference, tmp_path / "w"):
    checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=3, with_data=False)
    final.append(jax.device_get(checkpointer.restore(STEPS, setup.abstract_state)))
    checkpointer.close()
  assert final[0].ema_params is not None
  jax.tree.map(np.testing.assert_array_equal, final[0], final[1])


def test_resharded_restore(mesh_run):
  """A checkpoint saved on 8 devices with fsdp restores onto 1 and 4 devices with identical parameters."""
  workdir = mesh_run("fsdp8")
  saved = train.setup(_config(**{"mesh.data": 1, "mesh.fsdp": 8}))
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(saved.state_shardings.params))
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=3, with_data=False)
  original = jax.device_get(checkpointer.restore(STEPS, saved.abstract_state).params)
  for devices, mesh in ((jax.devices()[:1], dict(data=1, fsdp=1)), (jax.devices()[:4], dict(data=1, fsdp=4))):
    target = train.setup(_config(**{"mesh.data": mesh["data"], "mesh.fsdp": mesh["fsdp"]}), devices=devices)
    restored = checkpointer.restore(STEPS, target.abstract_state)
    leaves = jax.tree.leaves(restored.params)
    assert all(len(x.sharding.device_set) == len(devices) for x in leaves)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), original)
  checkpointer.close()


def test_a_small_eval_split_is_evaluated_and_what_is_left_out_is_said(mesh_run, tmp_path, caplog):
  """13 held-out examples with batch 8 on the data2fsdp2tensor2 layout (4 data-parallel devices): a full batch,
  then the last 5 trimmed to 4. Then 5 examples on one device: a split smaller than the batch is evaluated as one
  smaller batch (it used to give no eval_loss at all). Both runs are the sharding runs' and the reference's configs
  but for the evaluation (2 steps keep the warmup), so their train steps come from the compilation cache."""
  mesh_run("data2fsdp2tensor2")  # compiles the 8-device programs first, when this test runs alone
  layout = {f"mesh.{k}": v for k, v in MESHES["data2fsdp2tensor2"].items()}
  config = _config(total_steps=2, eval_every_steps=0, eval_batches=-1, save_every_steps=STEPS,
                   **{"dataset.eval_split": "test[:13]", **layout})
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(tmp_path / "mesh"))
  (row,) = [r for r in metrics.read_metrics(tmp_path / "mesh") if "eval_loss" in r]
  assert np.isfinite(row["eval_loss"])
  assert any("1 example(s) of the test[:13] split were not evaluated (not a multiple of the 4 data-parallel devices)"
             in r.getMessage() for r in caplog.records)
  config = _config(total_steps=2, eval_every_steps=0, eval_batches=-1, **{"dataset.eval_split": "test[:5]",
                                                                          "mesh.data": 1})
  train.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  (row,) = [r for r in metrics.read_metrics(tmp_path / "one") if "eval_loss" in r]
  assert np.isfinite(row["eval_loss"])


def test_half_written_checkpoint_is_never_restored(reference, tmp_path):
  """A save killed midway leaves orbax's temporary directory; resume uses the last complete checkpoint."""
  shutil.copytree(reference, tmp_path / "w")
  ckpts = tmp_path / "w" / "checkpoints"
  # What a kill during the save of step 6 leaves behind: a partial copy under orbax's temporary name.
  partial = ckpts / "6.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(ckpts / "4", partial)
  shutil.rmtree(partial / "state" / "d")
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "w"), keep=3)
  assert checkpointer.latest_step() == 4
  checkpointer.close()
  config = _config(total_steps=6, **{"mesh.data": 1})
  train.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  got = helpers.losses(tmp_path / "w")
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  assert {s: got[s] for s in range(1, 5)} == helpers.losses(reference)
  assert not partial.exists()


def test_replicated_arrays_are_saved_whole_on_cpu_without_slicing_programs(tmp_path, caplog):
  """On CPU devices orbax writes a replicated array from one replica: no per-replica slicing programs are compiled
  (sd_jax/checkpoint.py write_whole_replicas_on_cpu), and the checkpoint restores onto another sharding."""
  import logging

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  params = {"a": jax.device_put(np.arange(24 * 7, dtype=np.float32).reshape(24, 7), replicated),
            "b": jax.device_put(np.arange(40, dtype=np.int32).reshape(8, 5), sharded)}
  step = jax.device_put(np.int32(1), replicated)
  state = train.TrainState(step=step, params=params, opt_state={}, ema_params=None, rng=step)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=False, with_data=False)
  assert ckpt_lib.write_whole_replicas_on_cpu()
  with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles():
    checkpointer.save(1, state)
  compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert not compiled, compiled
  swapped = {"a": sharded, "b": replicated}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  abstract = abstract.replace(params={k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=swapped[k])
                                      for k, v in params.items()})
  restored = checkpointer.restore(1, abstract)
  checkpointer.close()
  for key in params:
    np.testing.assert_array_equal(np.asarray(restored.params[key]), np.asarray(params[key]))
    assert restored.params[key].sharding == swapped[key]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  # Gradient clipping and the warmup are the reference run's, so the initial state's program is too (compiled
  # already); Adam's steps are about lr in size whatever the gradients' scale, and the second one diverges.
  config = _config(total_steps=30, save_every_steps=1, **{"optim.lr": 1e30, "mesh.data": 1})
  with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as info:
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and max(steps) < bad_step
  assert f"last good checkpoint ({max(steps)})" in str(info.value)


def test_init_from_loads_params_and_reports_mismatch(reference, tmp_path):
  # 2 steps, so that the warmup (2 steps) and hence the train step are the reference run's: compiled already.
  config = _config(init_from=str(reference), total_steps=2, **{"mesh.data": 1})
  setup = train.cached_setup(config, devices=jax.devices()[:1])  # the run below takes it up
  loaded, mask = ckpt_lib.load_params(str(reference), jax.tree.map(lambda x: x, setup.abstract_state.params),
                                      setup.state_shardings.params, allow_partial=False)
  assert all(jax.tree.leaves(mask))
  checkpointer = ckpt_lib.Checkpointer(str(reference), keep=3, with_data=False)
  final = checkpointer.restore(4, setup.abstract_state).params
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(final))
  train.train_and_evaluate(config, str(tmp_path / "finetune"), devices=jax.devices()[:1])

  # A wider model does not match: the error names the mis-shaped keys; a partial load is opt-in.
  wider = _config(init_from=str(reference), total_steps=1, **{"mesh.data": 1})
  wider.model.block_out_channels = tuple(2 * c for c in wider.model.block_out_channels)
  with pytest.raises(ValueError, match=r"does not match the model:(.|\n)*wrong shape(.|\n)*conv_in"):
    train.train_and_evaluate(wider, str(tmp_path / "wider"), devices=jax.devices()[:1])
  wider.init_allow_partial = True
  train.train_and_evaluate(wider, str(tmp_path / "wider"), devices=jax.devices()[:1])


def test_init_from_missing_path_is_clear(data_dir, tmp_path):
  config = _config(init_from=str(tmp_path / "nope"), **{"mesh.data": 1})
  with pytest.raises(FileNotFoundError, match="init_from=.*nope.*does not exist"):
    train.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])


def test_resume_with_a_different_model_names_the_keys(reference, tmp_path):
  shutil.copytree(reference, tmp_path / "w")
  wider = _config(**{"mesh.data": 1})
  wider.model.block_out_channels = tuple(2 * c for c in wider.model.block_out_channels)
  expected = r"written by a run with a different model:(.|\n)*wrong shape(.|\n)*new --workdir"
  with pytest.raises(ValueError, match=expected):
    train.train_and_evaluate(wider, str(tmp_path / "w"), devices=jax.devices()[:1])
  assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_relative_workdir(reference):
  """README's command uses a relative --workdir; orbax needs absolute paths internally. The reference run had one."""
  assert not pathlib.Path(RELATIVE_WORKDIR).is_absolute()
  assert reference.parts[-2:] == pathlib.Path(RELATIVE_WORKDIR).parts
  assert (reference / "checkpoints" / "2").is_dir()
  assert len(helpers.losses(reference)) == STEPS


def test_a_config_run_again_in_the_process_reuses_its_setup_and_trains_the_same(reference, tmp_path, monkeypatch):
  """The reference's config run again on the same device, in another workdir: the loop takes the earlier run's Setup,
  so the train step is not traced again, and the run is bitwise the reference's."""
  traced = []
  real_step = train.train_step

  @functools.wraps(real_step)  # its name too: the compiled program (and so its persistent-cache entry) is the same
  def counted_step(*args, **kwargs):
    traced.append(1)
    return real_step(*args, **kwargs)

  monkeypatch.setattr(train, "train_step", counted_step)
  train._SETUPS.clear()
  config = _config(eval_every_steps=0, **{"mesh.data": 1})
  for name in ("a", "b"):
    train.train_and_evaluate(config, str(tmp_path / name), devices=jax.devices()[:1])
  assert len(traced) == 1 and len(train._SETUPS) == 1
  assert helpers.losses(tmp_path / "a") == helpers.losses(tmp_path / "b") == helpers.losses(reference)
  # The caller's config changed for the next run: a setup of its own (traced again); the first kept its copy. Two
  # steps keep the warmup (2 steps) and so the programs the same: they come from the persistent compilation cache.
  config.total_steps = 2
  train.train_and_evaluate(config, str(tmp_path / "c"), devices=jax.devices()[:1])
  assert len(traced) == 2 and len(train._SETUPS) == 2
  assert [exp.config.total_steps for exp in train._SETUPS.values()] == [STEPS, 2]
  assert helpers.losses(tmp_path / "c") == {s: v for s, v in helpers.losses(reference).items() if s <= 2}


def test_a_changed_file_the_config_names_makes_a_new_setup(tmp_path):
  """The setups are keyed on the files a config names (a Task reads base and frozen networks when it is built)."""
  import ml_collections
  model = tmp_path / "model"
  (model / "unet").mkdir(parents=True)
  (model / "unet" / "weights.safetensors").write_bytes(b"1234")
  config = ml_collections.ConfigDict({"finetune": {"base": str(model)}, "name": "shapes"})
  before = train._files_fingerprint(config)
  assert [p for p, *_ in before] == [str(model / "unet" / "weights.safetensors")]
  assert train._files_fingerprint(config) == before
  (model / "unet" / "weights.safetensors").write_bytes(b"12345")
  assert train._files_fingerprint(config) != before
  config.finetune.base = "gs://bucket/model"  # cannot be checked cheaply: never reused
  assert train._files_fingerprint(config) is None


def test_ema_decay_warms_up_then_holds():
  """EMA decay: 0 before ema_start_step, then min(ema_decay, (1+k)/(10+k)) with warmup, ema_decay without."""
  config = _config(ema_decay=0.99, ema_start_step=5)
  got = [float(train.ema_decay(step, config)) for step in (0, 4, 5, 6, 95, 10_000)]
  np.testing.assert_allclose(got, [0.0, 0.0, 0.1, 2 / 11, 91 / 100, 0.99], rtol=1e-6)
  config.ema_warmup = False
  got = [float(train.ema_decay(step, config)) for step in (4, 5, 6)]
  np.testing.assert_allclose(got, [0.0, 0.99, 0.99], rtol=1e-6)
