#!/usr/bin/env bash
# The first accelerator hour in one command, run on the device machine from the repository's root:
#   run(command="bash tools/device_suite.sh", carry=[".whl"], timeout_s=600)   after tools/device_wheels.sh here.
# It installs the carried wheels (.whl) into /tmp/site, puts them and this checkout on PYTHONPATH (nothing is
# fetched there, so sd_jax is not pip-installed), prints the machine and the versions it runs with, then runs
# `python -m sd_jax.bench --suite=gpu` (BENCHMARKS.md, "GPU targets"). Into $OUT (default /tmp/sd_jax_device) go
# gpu_suite.json (rewritten after every point), rows.md (the suite's tables, to paste into BENCHMARKS.md) and
# suite.log. Extra arguments go to the bench, e.g. --suite_tiny or --suite_budget_s=420. WHEELS=DIR: the wheels
# from another folder than .whl; SD_JAX_COMMIT: the commit to print where the copy has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/sd_jax_device}
mkdir -p "$out"
py=${PYTHON:-python3}
site=""
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  site=/tmp/site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || { echo "installing the carried wheels ($wheels) failed" >&2; exit 1; }
fi
export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  echo "commit: ${SD_JAX_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git here: set SD_JAX_COMMIT)")}"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$py" -m sd_jax.machine
  "$py" - <<'PY'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "diffusers", "transformers"):
  try:
    print(name, md.version(name))
  except md.PackageNotFoundError:
    print(name, "not installed")
PY
  "$py" -m sd_jax.bench --suite=gpu --suite_json="$out/gpu_suite.json" --benchmarks="$out/rows.md" "$@"
} 2>&1 | tee "$out/suite.log"
exit "${PIPESTATUS[0]}"
