#!/usr/bin/env bash
# Downloads, into DEST (default .whl, which git ignores), the wheels that the device machine's image lacks for sd_jax
# (tools/device_wheels.txt), each at its version in constraints.txt, built for that machine: CPython 3.12 on
# x86-64 Linux (manylinux). A package published only as source (promise) is built into a pure-Python wheel here.
# Then `run` with carry [".whl"] and the command `bash tools/device_suite.sh` (BENCHMARKS.md, "GPU targets").
# usage: tools/device_wheels.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
normalize() { tr '[:upper:]_.' '[:lower:]--'; }
for name in $(grep -v '^#' tools/device_wheels.txt); do
  key=$(echo "$name" | normalize)
  pin=$(grep -v '^#' constraints.txt | while IFS= read -r line; do
    [ "$(echo "${line%%==*}" | normalize)" = "$key" ] && echo "$line"; done || true)
  if [ -z "$pin" ]; then
    echo "tools/device_wheels.txt names $name, which constraints.txt does not pin: add it there" >&2
    exit 1
  fi
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dest" "$pin" 2>/dev/null; then
    echo "$pin: no wheel for CPython 3.12 on manylinux x86-64; building a pure-Python one from its source"
    python3 -m pip wheel -q --no-deps -w "$dest" "$pin"
  fi
done
for whl in "$dest"/*.whl; do
  case "$whl" in
    *-none-any.whl|*-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl) ;;
    *) echo "$whl will not install on the device (CPython 3.12, x86-64 Linux): remove it" >&2; exit 1 ;;
  esac
done
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1), in $dest"
