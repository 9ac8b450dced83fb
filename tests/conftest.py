"""Test setup: 8 fake CPU devices (sharding tests), float32, no network, datasets built into a per-session dir."""

import json
import os
import shutil
import tempfile

# The test programs are tiny and compiling them dominates the suite: skip LLVM's optimisations (as sd_jax.bench
# --aot does). XLA's HLO passes still run, so the programs compute the same things (and cost/memory analyses are
# unchanged); CPU compiles are several times faster. XLA's classic loop emitters instead of its newer fusion
# emitters: a quarter less compile time again (the ldm trainer's programs: 50.7 -> 38.6 s). LLVM code generation in
# one piece rather than split for threads: the suite keeps both cores busy anyway, and the split's overhead goes
# (the ddpm test U-Net's init + train step, 3 runs each: 10.7 -> 9.2 CPU-s of compiling). Subprocesses inherit these
# flags (helpers.xla_flags).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")  # nothing downloads at run time
# The commands' subprocesses start with glibc's huge-page malloc already (sd_jax/machine.py), so they do not restart
# themselves to get it.
_hugepages = None
try:
  from sd_jax import machine as _machine
  _hugepages = _machine.hugepage_malloc_env()
except ImportError:
  pass
if _hugepages is not None:
  os.environ["GLIBC_TUNABLES"] = _hugepages["GLIBC_TUNABLES"]
# Many tests compile the same tiny train step (in this process and in the subprocesses they start): share the
# compiled programs through JAX's persistent cache. Every program, however fast it compiles: op-by-op (eager) model
# calls and jax.jit of a fresh function compile hundreds of small programs per test, and reading them back is cheaper
# (tests/{models,weights,eval,diffusion,data} + tests/test_sample.py under -n 2, warm cache: 463 CPU-s with a 0.5 s
# threshold, 378 with none; tests/weights/test_model_dir.py alone 109 -> 67).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "sd_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data dir shared by the session: the tiny shapes configs are built once."""
  path = tmp_path_factory.mktemp("tfds")
  os.environ["SD_JAX_DATA_DIR"] = str(path)
  return str(path)


# ---------------------------------------------------------------------------------------------------------------
# pytest-xdist (`-n auto`): tests that share a module-scoped fixture (a training run, a converted model, compiled
# samplers) run on one worker, so the fixture is built once rather than once per worker; every other test is
# scheduled on its own, as `--dist load` does. (xdist's own `--dist loadgroup` cannot group with pytest 9: it renames
# node ids through an attribute pytest no longer reads.) The workers write which tests share a module's fixtures
# to a file; the controller's scheduler reads it once every worker has collected. An explicit --dist other than
# load is left alone.

_GROUPS_FILE = "sd_jax_groups_file"
# Tests that take minutes on 2 cores and share no fixture: started first, so that none of them is left for the end.
_SLOW_FIRST = ("tests/test_multiprocess.py::test_sigterm", "tests/experiments/test_launch.py::",
               "tests/test_bench.py::test_train_mode", "tests/test_bench.py::test_aot",
               "tests/test_train.py::test_nonfinite", "tests/test_train.py::test_resharded")


def _module_group(item) -> str | None:
  """The test's module if it uses a module-scoped fixture."""
  info = getattr(item, "_fixtureinfo", None)
  if info is None:
    return None
  if any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
    return item.nodeid.split("::")[0]
  return None


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "load" or not getattr(config, "sd_jax_groups_file", None):
    return None
  from xdist.scheduler import LoadScopeScheduling

  class ModuleFixtureScheduling(LoadScopeScheduling):
    """LoadScopeScheduling whose scope is the group the workers wrote, else the test itself (`load`)."""

    groups = None

    def _split_scope(self, nodeid):
      if self.groups is None:  # first called once every worker has collected (and written the file)
        try:
          with open(config.sd_jax_groups_file) as f:
            self.groups = json.load(f)
        except (OSError, ValueError):
          self.groups = {}
      return self.groups.get(nodeid, nodeid)

  return ModuleFixtureScheduling(config, log)


def pytest_configure(config):
  if getattr(config.option, "dist", "no") == "load" and not hasattr(config, "workerinput"):  # the xdist controller
    config.sd_jax_groups_file = os.path.join(tempfile.mkdtemp(prefix="sd_jax_xdist_"), "groups.json")


@pytest.hookimpl(optionalhook=True)  # an xdist hook
def pytest_configure_node(node):
  path = getattr(node.config, "sd_jax_groups_file", None)
  if path:
    node.workerinput[_GROUPS_FILE] = path


def pytest_unconfigure(config):
  path = getattr(config, "sd_jax_groups_file", None)
  if path:
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  path = getattr(config, "workerinput", {}).get(_GROUPS_FILE)
  if path:
    items.sort(key=lambda item: not item.nodeid.startswith(_SLOW_FIRST))  # stable
    groups = {item.nodeid: group for item in items if (group := _module_group(item)) is not None}
    tmp = f"{path}.{config.workerinput['workerid']}"
    with open(tmp, "w") as f:
      json.dump(groups, f)
    os.replace(tmp, path)  # the workers write the same mapping


def pytest_collection_finish(session):
  """Python's cyclic GC: once every test module (jax, flax, torch, diffusers, ...) is imported, move what exists to
  the permanent generation, so full collections during the tests do not re-scan it; and a full collection every 100
  young-generation ones instead of every 10 (CPython's default): tracing and compiling make millions of objects,
  and each full pass walks all of them (tests/trainers/test_ldm_trainer.py alone, one process: 13.3 -> 2.8 s in
  full collections, 218 -> 202 CPU-s in all). SD_JAX_TEST_GC_THRESHOLD="700,10,10" restores the default."""
  import gc

  import jax
  # JAX's CPU backend starts now, with this file's 8 devices: a test that sets XLA_FLAGS for the commands it starts
  # (tests/test_stages.py, tests/experiments/test_launch.py) and first touches JAX itself would otherwise start it
  # with their device count, for every later test in the process.
  jax.devices()
  if os.environ.get("SD_JAX_TEST_GC_FREEZE", "1") == "1":
    gc.collect()
    gc.freeze()
  gc.set_threshold(*map(int, os.environ.get("SD_JAX_TEST_GC_THRESHOLD", "700,10,100").split(",")))


# ---------------------------------------------------------------------------------------------------------------
# SD_JAX_TEST_COMPILE_REPORT=<dir>: each worker writes, per test, the seconds JAX spent tracing, lowering and
# compiling (persistent-cache misses) or reading compiled programs back (hits), one JSON line per test, to
# <dir>/<worker>.jsonl. Where the suite's time goes: python tests/compile_report.py <dir>.

_compile_log = None


def _compile_listeners():
  import collections

  from jax import monitoring
  state = {"hit": False, "test": collections.Counter(), "programs": []}

  def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
      state["hit"] = True

  def on_duration(event, duration, **kwargs):
    name = kwargs.get("fun_name", "")
    if event.endswith("/backend_compile_duration"):
      kind = "read" if state["hit"] else "compile"
      state["hit"] = False
      state["test"][kind + "_s"] += duration
      state["test"]["n_" + kind] += 1
      state["programs"].append((kind, name, round(duration, 3), state.pop("key", "")))
    elif event.endswith("/jaxpr_trace_duration"):
      state["test"]["trace_s"] += duration
    elif event.endswith("/jaxpr_to_mlir_module_duration"):
      state["test"]["lower_s"] += duration

  monitoring.register_event_listener(on_event)
  monitoring.register_event_duration_secs_listener(on_duration)

  import functools
  import time

  from jax._src import compilation_cache

  def timed(name, fn):  # the cache's own costs, inside the compile times above
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        state["test"][name] += time.perf_counter() - start
    return wrapper

  import gc
  started = {}

  def on_gc(phase, info):  # Python's cyclic collector, by generation
    if phase == "start":
      started["t"] = time.perf_counter()
    elif "t" in started:
      state["test"][f"gc{info['generation']}_s"] += time.perf_counter() - started.pop("t")

  gc.callbacks.append(on_gc)
  def keyed(fn):  # the program's persistent-cache key: the same key compiled twice is a compile wasted
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      key = fn(*args, **kwargs)
      state["key"] = str(key)[-16:]
      return key
    return wrapper

  compilation_cache.put_executable_and_time = timed("cache_write_s", compilation_cache.put_executable_and_time)
  compilation_cache.get_cache_key = timed("cache_key_s", keyed(compilation_cache.get_cache_key))
  return state


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  global _compile_log
  directory = os.environ.get("SD_JAX_TEST_COMPILE_REPORT")
  if not directory:
    yield
    return
  import time
  if _compile_log is None:
    os.makedirs(directory, exist_ok=True)
    worker = getattr(item.config, "workerinput", {}).get("workerid", "main")
    _compile_log = (open(os.path.join(directory, f"{worker}.jsonl"), "a"), _compile_listeners())
  out, state = _compile_log
  state["test"].clear()
  state["programs"].clear()
  import resource

  def cpu_s():
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))
  start, cpu_start = time.perf_counter(), cpu_s()
  yield
  record = {"test": item.nodeid, "wall_s": round(time.perf_counter() - start, 3),
            "cpu_s": round(cpu_s() - cpu_start, 3),
            **{k: round(v, 3) for k, v in state["test"].items()}, "programs": state["programs"]}
  out.write(json.dumps(record) + "\n")
  out.flush()
