"""One run per workdir: WORKDIR/run.lock names the run that holds the workdir.

Two runs on one workdir would interleave their metrics and fight over the checkpoints, so a run takes the lock
before it writes anything there and gives it back when it ends:

  * The lock is a small JSON file: host, process id, start time, a token, and a heartbeat the holder refreshes every
    `heartbeat_s` seconds. A second run on the same workdir stops at once with a message naming the holder.
  * A lock whose holder is gone is taken over, with a warning: on the same host, when its process no longer exists
    (a run killed with kill -9); from any host, when its heartbeat is older than `stale_s` (a machine that died).
  * The processes of one multi-host run share it: process 0 takes it and tells the others whether it could.
  * Local disks create it atomically (O_EXCL); object stores (gs://) have no such create, so there the run writes
    it, reads it back and checks its own token (a race within a second can still let two runs start: say so in a
    sweep's launcher rather than start two runs on one gs:// workdir at the same instant).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
from absl import logging
from etils import epath

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0   # how often a holder refreshes its heartbeat
STALE_S = 600.0      # a heartbeat older than this: the holder is gone, whatever host it ran on


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _now() -> float:
  return time.time()


def _iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def describe(holder: dict[str, Any]) -> str:
  """'pid 123 on host h, started 2026-12-03 13:47:29 UTC (heartbeat 12 s ago)'."""
  beat = _now() - float(holder.get("heartbeat", 0))
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {_iso(float(holder.get('started', 0)))} "
          f"(heartbeat {beat:.0f} s ago)")


class WorkdirLock:
  """The lock of one workdir; a context manager (acquire on enter, release on exit)."""

  def __init__(self, workdir, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.heartbeat_s = heartbeat_s
    self.stale_s = stale_s
    self.token = uuid.uuid4().hex
    self.started = _now()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._held = False

  # -- the file ----------------------------------------------------------------------------------------------------

  def _record(self) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started, "heartbeat": _now(),
            "token": self.token, "processes": jax.process_count()}

  def _read(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # half-written by a holder that died mid-write: treat as stale
      return {}

  def _write(self, exclusive: bool) -> bool:
    """Writes our record; with `exclusive`, only if no lock file exists (atomically on local disks)."""
    text = json.dumps(self._record(), indent=2)
    if not _is_local(self.path):
      if exclusive and self.path.exists():
        return False
      self.path.write_text(text)
      return (self._read() or {}).get("token") == self.token
    if exclusive:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    tmp = self.path.parent / f".{LOCK_FILE}.{self.token}"
    tmp.write_text(text)
    os.replace(tmp, self.path)  # atomic: readers never see a half-written lock
    return True

  def _stale_reason(self, holder: dict[str, Any]) -> str | None:
    """Why `holder` is gone, or None if it may still be running."""
    if not holder:
      return "its lock file is unreadable"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
      return f"its process {holder.get('pid')} no longer exists on this host"
    if _now() - float(holder.get("heartbeat", 0)) > self.stale_s:
      return f"its heartbeat is {_now() - float(holder.get('heartbeat', 0)):.0f} s old (more than {self.stale_s:.0f} s)"
    return None

  def _try_acquire(self) -> str | None:
    """Takes the lock (process 0); returns None, or the message of a refusal."""
    if self._write(exclusive=True):
      return None
    holder = self._read()
    if holder is None:  # released between our attempt and the read
      return None if self._write(exclusive=True) else f"{self.path} appeared while this run was taking it."
    if holder.get("token") == self.token:
      return None
    reason = self._stale_reason(holder)
    if reason is None:
      return (f"{self.path.parent} is in use by another run: {describe(holder)}. Wait for it to finish, stop it, "
              f"or use another --workdir. (If that run is gone, delete {self.path}.)")
    logging.warning("Taking over %s: the run that held it (%s) is gone: %s.", self.path, describe(holder) if holder
                    else "unknown", reason)
    self._write(exclusive=False)
    return None if (self._read() or {}).get("token") == self.token else f"another run took {self.path} first."

  # -- acquire / release -------------------------------------------------------------------------------------------

  def acquire(self) -> None:
    """Takes the workdir for this run (every process calls it; process 0 holds the file). Raises
    WorkdirLockedError naming the holder when another live run has it."""
    refusal = self._try_acquire() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      refused = multihost_utils.broadcast_one_to_all(jax.numpy.int32(refusal is not None))
      if int(refused) and refusal is None:
        refusal = f"{self.path.parent} is in use by another run (process 0 could not take {self.path})."
    if refusal is not None:
      raise WorkdirLockedError(refusal)
    self._held = jax.process_index() == 0
    if self._held:
      self._thread = threading.Thread(target=self._beat, name="sd_jax_workdir_lock", daemon=True)
      self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with contextlib.suppress(OSError):
        if (self._read() or {}).get("token") == self.token:
          self._write(exclusive=False)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if self._held and (self._read() or {}).get("token") == self.token:
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()
    self._held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
