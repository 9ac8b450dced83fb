"""Metrics: `WORKDIR/metrics.jsonl` (one JSON object per logged step, host 0), TensorBoard events, console progress."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir) -> list[dict[str, Any]]:
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(workdir, step: int) -> None:
  """Drops rows logged after `step`, so a resumed run rewrites them exactly as an uninterrupted run would."""
  import jax  # local: keeps this module importable by report tools without initialising JAX
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return
  rows = read_metrics(workdir)
  kept = [r for r in rows if r.get("step", 0) <= step]
  if len(kept) != len(rows):
    logging.info("Resuming at step %d: dropping %d metric rows logged after it.", step, len(rows) - len(kept))
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class MetricWriter:
  """Appends scalars to metrics.jsonl and TensorBoard; images to TensorBoard. A no-op on hosts other than 0."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / METRICS_FILE
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=str(workdir), flush_secs=30)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _to_py(v) for k, v in scalars.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self.enabled:
      self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def _to_py(v):
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  return v


class Progress:
  """Steps per second over the last logging window, and the time left."""

  def __init__(self, start_step: int, total_steps: int):
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time = time.time()
    self._start_time = self._last_time

  def update(self, step: int) -> dict[str, float]:
    now = time.time()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return {"steps_per_sec": rate, "eta_sec": (self.total_steps - step) / max(rate, 1e-9)}

  def console(self, step: int, row: dict[str, Any]) -> None:
    eta = row.get("eta_sec", 0.0)
    eta_text = f"{int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"
    width = len(str(self.total_steps))
    logging.info("step %*d/%d  loss %.5f  lr %.3g  grad_norm %.3f  %.2f it/s  ETA %s", width, step,
                 self.total_steps, row["loss"], row.get("learning_rate", float("nan")),
                 row.get("grad_norm", float("nan")), row.get("steps_per_sec", 0.0), eta_text)
