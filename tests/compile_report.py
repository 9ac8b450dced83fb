"""Where the suite's time goes, from the per-test records conftest.py writes under SD_JAX_TEST_COMPILE_REPORT:

  SD_JAX_TEST_COMPILE_REPORT=/tmp/report python -m pytest -q -n auto tests
  python tests/compile_report.py /tmp/report

prints the totals (wall, tracing, lowering, compiling, reading compiled programs back), the tests that compile
most, and the programs compiled most often under one name (candidates for sharing between tests)."""

import collections
import json
import pathlib
import sys


def main(directory: str, top: int = 25) -> None:
  records = [json.loads(line) for path in sorted(pathlib.Path(directory).glob("*.jsonl"))
             for line in path.read_text().splitlines() if line.strip()]
  keys = ("wall_s", "cpu_s", "trace_s", "lower_s", "compile_s", "n_compile", "read_s", "n_read", "cache_key_s",
          "cache_write_s", "gc0_s", "gc1_s", "gc2_s")
  totals = {k: sum(r.get(k, 0) for r in records) for k in keys}
  print(f"{len(records)} tests: " + ", ".join(f"{k} {v:,.1f}" for k, v in totals.items()))
  by_file = collections.defaultdict(collections.Counter)
  for r in records:
    by_file[r["test"].split("::")[0]].update({k: r.get(k, 0) for k in keys})
  print("\nper file (wall, CPU incl. subprocesses, trace, lower, compile s; compiles):")
  for f, c in sorted(by_file.items(), key=lambda kv: -kv[1]["wall_s"])[:top]:
    print(f"  {c['wall_s']:7.1f} {c['cpu_s']:7.1f} {c['trace_s']:6.1f} {c['lower_s']:6.1f} {c['compile_s']:7.1f} "
          f"{c['n_compile']:5d}  {f}")
  print("\ntests by compile seconds (wall, compile s; compiles):")
  for r in sorted(records, key=lambda r: -r.get("compile_s", 0))[:top]:
    print(f"  {r['wall_s']:7.1f} {r.get('compile_s', 0):7.1f} {r.get('n_compile', 0):5d}  {r['test']}")
  programs = collections.defaultdict(lambda: [0, 0.0, set()])
  same_key = collections.defaultdict(list)
  for r in records:
    for kind, name, seconds, *key in r["programs"]:
      if kind == "compile" and key and key[0]:
        same_key[key[0]].append((seconds, name, r["test"]))
      if kind == "compile":
        p = programs[name]
        p[0] += 1
        p[1] += seconds
        p[2].add(r["test"].split("::")[0])
  print("\nprograms by total compile seconds (compiles, seconds, files):")
  for name, (n, seconds, files) in sorted(programs.items(), key=lambda kv: -kv[1][1])[:top]:
    print(f"  {n:5d} {seconds:8.1f}  {name}  [{len(files)} files]")
  # One persistent-cache key compiled more than once: the workers compiled it at the same time, or the cache did not
  # take it. Seconds after the first compile are wasted.
  twice = {k: v for k, v in same_key.items() if len(v) > 1}
  wasted = sum(sum(s for s, *_ in v) - v[0][0] for v in twice.values())
  print(f"\nthe same program compiled more than once: {len(twice)} programs, {wasted:,.1f} s after the first compile")
  for key, compiles in sorted(twice.items(), key=lambda kv: -sum(s for s, *_ in kv[1][1:]))[:top]:
    print(f"  {len(compiles)}x {sum(s for s, *_ in compiles):7.1f} s  {compiles[0][1]}  "
          f"{sorted({t for *_, t in compiles})[:3]}")


if __name__ == "__main__":
  main(*sys.argv[1:2])
