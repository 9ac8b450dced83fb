"""The kit for the first accelerator hour (tools/): the wheels carried to the device machine, with what its image
holds, cover what sd_jax needs there; and tools/device_suite.sh runs the bench's GPU suite and leaves its files."""

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# Needed by setup.py but not by the GPU suite, training or sampling: the rating page's web server.
NOT_ON_THE_DEVICE = {"fastapi", "uvicorn"}
# The device machine: CPython 3.12 on x86-64 Linux.
DEVICE_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _names(path: Path) -> list[str]:
  return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _requirements(dist: str, extras=()) -> list[Requirement]:
  """`dist`'s requirements (as installed here, at constraints.txt's version) that apply on the device machine."""
  out = []
  for text in md.requires(dist) or []:
    req = Requirement(text)
    if req.marker is None or any(req.marker.evaluate({**DEVICE_ENV, "extra": e}) for e in ("", *extras)):
      out.append(req)
  return out


def test_the_carried_wheels_and_the_device_image_cover_what_sd_jax_needs_there():
  image = {_norm(n) for n in _names(REPO / "tools/device_image.txt")}
  carried = [_norm(n) for n in _names(REPO / "tools/device_wheels.txt")]
  pins = {_norm(line.split("==")[0]): line.split("==")[1] for line in _names(REPO / "constraints.txt")}
  assert len(image) > 150 and {"jax", "flax", "optax", "orbax-checkpoint", "torch", "transformers"} <= image
  assert not set(carried) & image, "carried although the image has it"
  assert [n for n in carried if n not in pins] == [], "tools/device_wheels.sh takes each version from constraints.txt"
  assert "diffusers" in carried  # the bench's baseline

  needed = [r for r in _requirements("sd_jax") if _norm(r.name) not in NOT_ON_THE_DEVICE]
  assert {"grain", "ml-collections", "tensorflow-datasets", "jax"} <= {_norm(r.name) for r in needed}
  todo, seen, missing = [*needed, Requirement("diffusers")], set(), []
  while todo:  # the closure over what is carried; the image's packages come with their own requirements
    req = todo.pop()
    name = _norm(req.name)
    if name in image:
      continue
    if name not in carried:
      missing.append(f"{req} (for {req.marker or 'sd_jax'})")
      continue
    key = (name, tuple(sorted(req.extras)))
    if key not in seen:
      seen.add(key)
      assert md.version(name) == pins[name], f"{name}: installed here {md.version(name)}, pinned {pins[name]}"
      todo.extend(_requirements(name, tuple(req.extras)))
  assert missing == [], f"add to tools/device_wheels.txt (and constraints.txt): {missing}"
  assert {n for n, _ in seen} == set(carried), "carried but not needed"


def test_the_device_suite_script_prints_the_versions_runs_the_suite_and_leaves_its_files_in_out(tmp_path):
  """tools/device_suite.sh as `run` calls it, here with no wheels and a spent budget: every point is reported as
  skipped in the JSON, and the log holds the machine and the versions the rows were measured with."""
  env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none"),
         "SD_JAX_COMMIT": "abc1234", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(["bash", str(REPO / "tools/device_suite.sh"), "--suite_tiny", "--suite_budget_s=0"],
                        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  log = (tmp_path / "out/suite.log").read_text()
  assert "commit: abc1234" in log and "reference_conv_gflops:" in log
  for name in ("python", "jax", "flax", "torch", "diffusers"):
    assert re.search(rf"^{name} \d+\.\d+", log, re.M), (name, log[:2000])
  suite = json.loads((tmp_path / "out/gpu_suite.json").read_text())
  assert len(suite["points"]) == 7 and {p["status"] for p in suite["points"]} == {"skipped"}
  assert not (tmp_path / "out/rows.md").exists()  # no point measured, no table
