"""sd_jax.stages: the batch sizes it reads from the stage configs and the CPU device count it picks from them."""

import pytest

from sd_jax import machine, stages


def test_stage_batch_sizes_come_from_the_configs(tmp_path):
  sizes = {s: stages.stage_batch_size(s, "demo", tmp_path) for s in stages.STAGES}
  assert sizes == {"vae": 16, "clip": 64, "ldm": 32}
  assert stages.stage_batch_size("vae", "full", tmp_path) == 32
  # A --stage_override of the batch size wins (the last one, as on a command line).
  assert stages.stage_batch_size("ldm", "demo", tmp_path, ["--config.batch_size=24", "--config.batch_size=12"]) == 12


def test_choose_cpu_devices(tmp_path, monkeypatch):
  overrides = {s: [] for s in stages.STAGES}
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert stages.choose_cpu_devices(None, "demo", tmp_path, overrides) is None   # the environment's count is kept
  assert stages.choose_cpu_devices(3, "demo", tmp_path, overrides) == 3         # --cpu_devices wins
  with pytest.raises(SystemExit, match="--cpu_devices=0"):
    stages.choose_cpu_devices(0, "demo", tmp_path, overrides)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(machine, "usable_cores", lambda: 2)
  assert stages.choose_cpu_devices(None, "demo", tmp_path, overrides) == 2
  # A batch size that one device per core would not divide lowers the count.
  overrides["clip"] = ["--config.batch_size=63"]
  assert stages.choose_cpu_devices(None, "demo", tmp_path, overrides) == 1


def test_folder_trains_the_three_stages_and_ends_with_a_grid(tmp_path, monkeypatch):
  """`python -m sd_jax.stages --folder DIR` (runlocal sizes): VAE, CLIP and LDM train on a captioned folder with a
  test split, and the run ends with a labelled grid of samples for the test captions."""
  import json

  import numpy as np
  from PIL import Image

  from tests import helpers

  folder = tmp_path / "photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
  lines = []
  for i in range(40):
    name = list(colours)[i % 4]
    image = np.full((24 + i % 3 * 8, 32, 3), 255, np.uint8)  # any size and aspect
    top, left = rng.integers(0, 12, 2)
    image[top:top + 12, left:left + 12] = colours[name]
    Image.fromarray(image).save(folder / f"{i:02d}.png")
    lines.append({"file_name": f"{i:02d}.png", "text": f"a {name} square", "split": "test" if i >= 32 else "train"})
  (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  monkeypatch.setenv("XLA_FLAGS", helpers.xla_flags(1))  # the stages' processes: one device each
  workdir = tmp_path / "run"
  short = [f"--stage_override={stage}:--config.total_steps=2" for stage in stages.STAGES]
  assert stages.main(["--preset=runlocal", f"--folder={folder}", f"--workdir={workdir}", "--num_prompts=3",
                      "--steps=2", *short]) == 0
  for stage in stages.STAGES:
    assert (workdir / stage / "export").is_dir(), stage
  ldm_config = json.loads((workdir / "ldm" / "config.json").read_text())
  assert ldm_config["dataset"]["name"] == "folder" and ldm_config["dataset"]["folder"] == str(folder)
  grid = np.asarray(Image.open(workdir / "samples_heldout.png"))
  assert grid.ndim == 3 and grid.shape[0] > 32
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["grid_prompts"] == ["a red square", "a green square", "a blue square"]
  assert "folder" in (workdir / "summary.md").read_text()


def test_folder_without_a_test_split_is_refused(tmp_path, capsys):
  import json
  folder = tmp_path / "photos"
  folder.mkdir()
  (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
  with pytest.raises(SystemExit) as e:
    stages.main([f"--folder={folder}", f"--workdir={tmp_path / 'run'}"])
  assert e.value.code == 1 and "has no 'test' split" in capsys.readouterr().err
