"""Metrics to the console, ``metrics.jsonl`` and TensorBoard (no TensorFlow needed).

Only process 0 writes; elsewhere the writer does nothing. ``metrics.jsonl``
holds one JSON object per line: ``{"step": …, "split": "train" | "eval", …}``
with scalars and, for per-layer energies, lists.
"""

import json
import os
import pathlib

import numpy as np
import tensorboardX
from absl import logging


class MetricWriter:
  """Writes metrics of one run (appending, so a resumed run continues its files)."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    if enabled:
      self._jsonl = open(self.path, "a")
      self._tensorboard = tensorboardX.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Logs ``metrics`` (scalars or 1-D arrays) of ``split`` at ``step``."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    for key, value in metrics.items():
      value = np.asarray(value)
      record[key] = value.tolist() if value.ndim else float(value)
      if value.ndim == 0:
        self._tensorboard.add_scalar(f"{split}/{key}", float(value), step)
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    scalars = " ".join(f"{k}={v:.5g}" for k, v in record.items()
                       if isinstance(v, float) and k not in ("step",))
    logging.info("[%s] step %d: %s", split, step, scalars)

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


def read(path: str | os.PathLike) -> list[dict]:
  """All records of a ``metrics.jsonl``."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
