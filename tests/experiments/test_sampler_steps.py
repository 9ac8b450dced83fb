"""experiments/sampler_steps.py: one sd_jax.evaluate call per (sampler, steps) cell, resumable, gathered in a table."""

import json
import os

import pytest

from experiments import sampler_steps


def _fake_evaluate(calls):
  def fake_main(argv):
    calls.append(argv)
    get = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    steps = int(get("--steps"))
    result = {"shapes_accuracy": steps / 100, "fd_clip": 1.0 / steps, "timing": {"sample_seconds": 2.0},
              "settings": {"split": "test", "guidance": 4.0, "sampler": get("--sampler")}}
    with open(get("--out"), "w") as f:
      json.dump(result, f)
    return 0
  return fake_main


def test_table_cells_and_resume(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(sampler_steps.evaluate, "main", _fake_evaluate(calls))
  out = tmp_path / "table"
  argv = ["--workdir", "W", "--out", str(out), "--samplers", "ddim,euler_a", "--steps", "10,20",
          "--num_samples", "8", "--guidance", "3"]
  assert sampler_steps.main(argv) == 0
  assert len(calls) == 4
  assert calls[0][calls[0].index("--guidance") + 1] == "3.0"
  table = (out / "table.md").read_text()
  assert "| ddim | 0.100 | 0.200 |" in table and "| euler_a | 0.100 | 0.200 |" in table  # shapes_accuracy
  assert "| ddim | 0.100 | 0.050 |" in table  # fd_clip = 1 / steps
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 10), ("ddim", 20), ("euler_a", 10), ("euler_a", 20)]
  assert (out / "table.csv").read_text().splitlines()[0] == "sampler,steps,shapes_accuracy,fd_clip,seconds"

  # Rerun: every cell exists, nothing is recomputed; a removed cell alone is.
  calls.clear()
  os.remove(out / "cells" / "euler_a_20.json")
  assert sampler_steps.main(argv) == 0
  assert [c[c.index("--sampler") + 1] for c in calls] == ["euler_a"]


@pytest.mark.parametrize("flag,value,message", [("--samplers", "ddim,heun", "unknown sampler"),
                                                 ("--steps", "10,many", "comma-separated integers"),
                                                 ("--samplers", " , ", "empty")])
def test_bad_flags_are_named(tmp_path, flag, value, message):
  with pytest.raises(SystemExit, match=message):
    sampler_steps.main(["--workdir", "W", "--out", str(tmp_path), flag, value])
