"""Metrics to the console, ``metrics.jsonl`` and TensorBoard (no TensorFlow needed).

Only process 0 writes; elsewhere the writer does nothing. ``metrics.jsonl``
holds one JSON object per line: ``{"step": …, "split": "train" | "eval", …}``
with scalars and, for per-layer values, lists. TensorBoard gets every scalar
as ``<split>/<name>`` and every per-layer value as one curve per layer,
``<split>/<name>/<ℓ>`` (ℓ from 1, zero-padded so that layers sort in order).
The console shows ``[train] step 100/937: loss=… eta 12m30s``.
"""

import json
import os
import pathlib
import struct

import numpy as np
import tensorboardX
from absl import logging
from tensorboardX.proto import event_pb2


def format_duration(seconds: float) -> str:
  """``seconds`` as the console shows an ETA: 45s, 12m30s, 3h05m."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class MetricWriter:
  """Writes metrics of one run (appending, so a resumed run continues its files).

  Args:
    workdir: the run's folder.
    enabled: False on every process but 0.
    num_steps: the run's total steps, shown as ``step 100/937``.
    purge_step: the first step this writer may log (a resumed run's start + 1):
      TensorBoard hides the events of older files from this step on.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True, num_steps: int | None = None,
               purge_step: int | None = None):
    self.enabled = enabled
    self.num_steps = num_steps
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    if enabled:
      self._jsonl = open(self.path, "a")
      self._tensorboard = tensorboardX.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                                     purge_step=purge_step)

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Logs ``metrics`` (scalars or 1-D per-layer arrays) of ``split`` at ``step``."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    for key, value in metrics.items():
      value = np.asarray(value)
      record[key] = value.tolist() if value.ndim else float(value)
      if value.ndim == 0:
        self._tensorboard.add_scalar(f"{split}/{key}", float(value), step)
      elif value.ndim == 1:  # one curve per layer
        digits = len(str(len(value)))
        for layer, v in enumerate(value, start=1):
          self._tensorboard.add_scalar(f"{split}/{key}/{layer:0{digits}d}", float(v), step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    scalars = " ".join(f"{k}={v:.5g}" for k, v in record.items()
                       if isinstance(v, float) and k != "eta_seconds")
    eta = f" eta {format_duration(record['eta_seconds'])}" if "eta_seconds" in record else ""
    total = f"/{self.num_steps}" if self.num_steps else ""
    logging.info("[%s] step %d%s: %s%s", split, step, total, scalars, eta)

  def flush(self) -> None:
    if self.enabled:
      self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def truncate_after(path: pathlib.Path, step: int) -> None:
  """Drops the records after ``step`` (those of a run killed after its last
  checkpoint), so a resumed run's log reads as one run. Atomic rewrite."""
  if not path.exists():
    return
  lines = [line for line in path.read_text().splitlines()
           if line.strip() and json.loads(line)["step"] <= step]
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(line + "\n" for line in lines))
  os.replace(tmp, path)


def _records(path: pathlib.Path):
  """The TFRecord framing of an event file: (raw record bytes, Event) pairs."""
  payload = path.read_bytes()
  offset = 0
  while offset + 12 <= len(payload):
    (length,) = struct.unpack("<Q", payload[offset:offset + 8])
    end = offset + 12 + length + 4
    if end > len(payload):  # a record cut short by a kill: the rest is unreadable
      return
    yield payload[offset:end], event_pb2.Event.FromString(payload[offset + 12:end - 4])
    offset = end


def truncate_events_after(folder: pathlib.Path, step: int) -> None:
  """Drops the TensorBoard events logged after ``step`` (those of a run killed
  after its last checkpoint), so a resumed run's curves do not overlap the
  old ones for any reader. Records are copied byte for byte (their CRCs stay
  valid); each file is rewritten atomically."""
  for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*")):
    records = list(_records(path))
    kept = [raw for raw, event in records if not (event.summary.value and event.step > step)]
    if len(kept) < len(records):
      tmp = path.with_name(f".{path.name}.tmp")  # not an event file to any glob
      tmp.write_bytes(b"".join(kept))
      os.replace(tmp, path)


def read(path: str | os.PathLike) -> list[dict]:
  """All records of a ``metrics.jsonl``."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
