"""The command line of every `python -m sd_jax.*` command: absl flags, one usage text, one error format.

Two kinds of command use it:

  * sample, evaluate, stages, machine, eval.shapes_eval: their `main(argv)` is also called in-process, many times
    in one process and beside the other commands' modules (the tests do). Their flags are defined on a fresh
    `flags.FlagValues` per call (`Command`), never on the global `flags.FLAGS`, which sd_jax.main fills when it is
    imported: so --workdir, say, is its own flag in each command, without a DuplicateFlagError.
  * main, convert, bench: absl's `app.run` on the global FLAGS (`run_app`), defined when run as a program.

For both, --help (or -h) prints the usage text, the module docstring followed by the flags' help as absl renders
it, to stdout and exits 0; a flag that does not parse or fails a check prints `error: MESSAGE` to stderr and exits
1, as for every other mistake a user can make.

  cmd = cli.Command("python -m sd_jax.sample", __doc__)
  flags.DEFINE_string("out", None, "Output directory.", flag_values=cmd.flags)
  flags.DEFINE_multi_string("prompt", None, "One or more prompts.", flag_values=cmd.flags)
  cmd.require("out")
  cmd.several_values("prompt")                 # --prompt "a" "b", as well as --prompt "a" --prompt "b"
  cmd.one_of("prompt", "prompts_file", required=True)
  args = cmd.parse(argv)                       # the FlagValues, parsed; exits on --help and on a bad flag
  if args.steps < 1:
    cmd.error(f"--steps={args.steps}: must be >= 1.")
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import flags

HELP_FLAGS = ("-h", "--help", "--helpshort", "-?")
# The exit status of a bad command line: 1, as for every other mistake a user can make (absl's own status too).
USAGE_ERROR = 1
# Tokens argparse took as values, not flags: negative numbers.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")

# absl gives a flag to the module that called DEFINE_*: with this, DEFINE_choice's flags belong to its caller, and
# --help lists them with that module's other flags.
flags.disclaim_key_flags()


class _ChoiceParser(flags.EnumParser):
  """absl's enum parser with argparse's message for a bad value (`invalid choice: 'x' (choose from ...)`)."""

  def parse(self, argument):
    if argument not in self.enum_values:
      choices = ", ".join(repr(c) for c in self.enum_values)
      raise ValueError(f"invalid choice: {argument!r} (choose from {choices})")
    return argument


def DEFINE_choice(name: str, default: str | None, choices: Sequence[str], help: str,
                  flag_values: flags.FlagValues) -> flags.FlagHolder:
  """A string flag that takes one of `choices` (absl's DEFINE_enum, with argparse's error message)."""
  return flags.DEFINE(_ChoiceParser(list(choices)), name, default, f"<{'|'.join(choices)}>: {help}",
                      flag_values=flag_values)


def _is_flag(token: str) -> bool:
  return token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.match(token)


def _wants_help(argv: Sequence[str]) -> bool:
  """Whether a help flag comes before the end of the flags (`--`)."""
  for token in argv:
    if token == "--":
      return False
    if token in HELP_FLAGS:
      return True
  return False


def usage_text(doc: str | None, flag_help: str) -> str:
  """The module docstring, then the flags' help as absl renders it (without its module headings: a command's
  flags all come from its own module)."""
  lines = [line for line in flag_help.splitlines() if line.startswith(" ")]
  text = (doc or "").strip("\n")
  return f"{text}\n\nflags:\n" + "\n".join(lines) + "\n"


class Command:
  """One command's flags, on a FlagValues of its own: build one per call of the command (see the module
  docstring), define the flags on `.flags`, declare the required and mutually exclusive ones, then `parse`."""

  def __init__(self, prog: str, doc: str | None):
    self.prog = prog
    self.doc = doc
    self.flags = flags.FlagValues()
    self._required: list[str] = []
    self._groups: list[tuple[tuple[str, ...], bool]] = []
    self._several: set[str] = set()

  def require(self, *names: str) -> None:
    """These flags must be given, with a non-empty value."""
    self._required += names

  def one_of(self, *names: str, required: bool = False) -> None:
    """At most one of these flags may be given; with `required`, exactly one."""
    self._groups.append((names, required))

  def several_values(self, name: str) -> None:
    """The multi-string flag `name` also takes several values after one flag, `--name A B` (argparse's nargs="+",
    which the command had), besides absl's `--name A --name B`."""
    self._several.add(name)

  def usage(self) -> str:
    """The usage text --help prints."""
    return usage_text(self.doc, self.flags.get_help(include_special_flags=False))

  def error(self, message: str) -> NoReturn:
    """Prints `error: message` to stderr and exits with USAGE_ERROR."""
    print(f"error: {message}\n(`{self.prog} --help` describes the flags.)", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)

  def _expand(self, argv: Sequence[str]) -> list[str]:
    """argv with `--name A B` of a `several_values` flag rewritten as `--name=A --name=B`, for absl."""
    out: list[str] = []
    i = 0
    while i < len(argv):
      token = argv[i]
      i += 1
      if token == "--":
        out += argv[i - 1:]
        break
      name = token.lstrip("-")
      if name not in self._several or token not in (f"--{name}", f"-{name}"):
        out.append(token)
        continue
      values = []
      while i < len(argv) and not _is_flag(argv[i]):
        values.append(argv[i])
        i += 1
      if not values:
        self.error(f"argument --{name}: expected at least one argument")
      out += [f"--{name}={value}" for value in values]
    return out

  def parse(self, argv: Sequence[str] | None = None) -> flags.FlagValues:
    """Parses argv (default: sys.argv[1:]; no program name) into `.flags` and returns it. --help prints the usage
    text and exits 0; a bad flag, a missing required one or two exclusive ones exit via `error`."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if _wants_help(argv):
      sys.stdout.write(self.usage())
      raise SystemExit(0)
    try:
      rest = self.flags([self.prog, *self._expand(argv)])
    except flags.Error as e:
      self.error(str(e))
    if len(rest) > 1:
      self.error(f"unrecognized arguments: {' '.join(rest[1:])}")
    for name, value in self.flags.flag_values_dict().items():
      if isinstance(value, float) and not math.isfinite(value):
        self.error(f"--{name}={value}: must be a finite number.")
    missing = [f"--{name}" for name in self._required if self.flags[name].value in (None, "")]
    if missing:
      self.error(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    for names, required in self._groups:
      given = [name for name in names if self.flags[name].present]
      if len(given) > 1:
        self.error(f"argument --{given[1]}: not allowed with argument --{given[0]}")
      if required and not given:
        self.error(f"one of the arguments {' '.join('--' + name for name in names)} is required")
    return self.flags


def _main_module_prog() -> str:
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  return f"python -m {spec.name}" if spec is not None else sys.argv[0]


def config_flag_error(argv: Sequence[str]) -> str | None:
  """One line saying what is wrong with the --config flags of `argv` (a config file that does not exist or load, an
  override of a key the config does not have, with the nearest valid keys), or None if they look right.

  ml_collections' config flag reports these as chained tracebacks; this re-checks them with the config itself."""
  import difflib  # pylint: disable=import-outside-toplevel
  from sd_jax import config_lib  # pylint: disable=import-outside-toplevel
  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not specs:
    return None
  path, _, arg = specs[-1].partition(":")
  import os  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    near = sorted(str(p) for p in _config_files(os.path.dirname(path) or "."))
    where = f" Config files there: {', '.join(near)}." if near else ""
    return f"--config={specs[-1]}: {path} does not exist.{where}"
  try:
    config = config_lib.load_config_file(path, arg)
  except Exception as e:  # noqa: BLE001 - the file's own error, in one line
    return f"--config={specs[-1]}: {type(e).__name__}: {e}"
  keys = sorted(_dotted_keys(config))
  for token in argv:
    if not token.startswith("--config.") or "=" not in token:
      continue
    key, _, value = token[len("--config."):].partition("=")
    if key not in keys and not any(k.startswith(key + ".") for k in keys):
      near = difflib.get_close_matches(key, keys, n=4, cutoff=0.5)
      hint = f" Nearest valid keys: {', '.join(near)}." if near else ""
      return f"unknown config key {key} (--config.{key}={value}).{hint}"
  return None


def _config_files(directory: str) -> list[str]:
  import glob  # pylint: disable=import-outside-toplevel
  return sorted(p for p in glob.glob(f"{directory}/*.py") if not p.endswith("__init__.py"))


def _dotted_keys(config, prefix: str = ""):
  for key, value in config.items():
    yield f"{prefix}{key}"
    if hasattr(value, "items") and not isinstance(value, dict):
      yield from _dotted_keys(value, f"{prefix}{key}.")


def _parse_global_flags(argv: list[str]) -> list[str]:
  """absl's flags parser for app.run, with the `error: ...` format (exit 1, absl's status for a bad flag)."""
  hint = f"\n(`{_main_module_prog()} --help` describes the flags.)"
  try:
    rest = flags.FLAGS(argv)
    # A config file that fails to load is reported by ml_collections only when the config is first used.
    message = config_flag_error(argv[1:])
    if message is not None:
      print(f"error: {message}", file=sys.stderr)
      sys.exit(1)
    return rest
  except flags.Error as e:
    print(f"error: {config_flag_error(argv) or e}{hint}", file=sys.stderr)
    sys.exit(1)
  except Exception:  # noqa: BLE001 - ml_collections' config flag raises plain errors for a bad --config
    message = config_flag_error(argv)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def run_app(main: Callable[[list[str]], Any]) -> None:
  """absl's `app.run(main)` for a command whose flags are on the global FLAGS (defined before this is called),
  with this module's --help (the usage text, exit 0: absl's own exits 1) and error format."""
  from absl import app  # pylint: disable=import-outside-toplevel
  if _wants_help(sys.argv[1:]):
    sys.stdout.write(usage_text(sys.modules["__main__"].__doc__, flags.FLAGS.main_module_help()))
    sys.exit(0)
  app.run(main, flags_parser=_parse_global_flags)


def parse_lora_flag(item: str) -> tuple[str, float]:
  """"FILE" or "FILE:SCALE" -> (file, scale); the scale multiplies the file's own alpha / rank."""
  path, sep, scale = item.rpartition(":")
  if sep and path and not scale.startswith(("/", "\\")):
    try:
      return path, float(scale)
    except ValueError:
      pass
  return item, 1.0
