"""Where a tracker's history goes: files in a run folder (CSV, JSONL, per-group arrays) and TensorBoard.

Every flush of the tracker writes one block.  The per-step scalar rows (per-layer sums, residuals, mean
effective learning rate, ...) are appended to ``metrics.csv`` and ``metrics.jsonl`` with one ``write``
call per block followed by ``fsync``, so a killed run leaves complete lines up to its last flush.  The
per-group arrays go to ``groups/block-NNNNNN.npz``, each written to a temporary name and renamed, so a
reader never sees half a file.  ``read_run`` puts everything back together.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

SCALAR_FIELDS = ["family", "step", "t", "lr", "residual", "empirical_sum", "exact_sum", "paper_sum",
                 "modified_sum", "effective_lr_mean", "angular_update_mean"]


def scalar_rows(rows: Dict[str, Dict[str, np.ndarray]]) -> List[dict]:
    """One dict per (family, logged step) with the fields of ``SCALAR_FIELDS`` (NaN where absent)."""
    out = []
    for family, r in rows.items():
        for i in range(len(r.get("step", ()))):
            row = {"family": family, "step": int(r["step"][i])}
            for name in SCALAR_FIELDS[2:]:
                if name in r:
                    row[name] = float(r[name][i])
                elif name.endswith("_mean") and name[:-5] in r:
                    row[name] = float(np.nanmean(r[name[:-5]][i])) if np.isfinite(r[name[:-5]][i]).any() else math.nan
                else:
                    row[name] = math.nan
            out.append(row)
    return out


def append_durably(path: str, data: bytes) -> None:
    """Append in one write call and fsync: a crash leaves the file ending at a block boundary."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CSVSink:
    """Scalar rows to ``path`` (header once)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            append_durably(path, (",".join(SCALAR_FIELDS) + "\n").encode())

    def write(self, rows):
        buf = io.StringIO()
        w = csv.DictWriter(buf, SCALAR_FIELDS, lineterminator="\n")
        w.writerows(scalar_rows(rows))
        if buf.tell():
            append_durably(self.path, buf.getvalue().encode())

    def close(self):
        pass


class JSONLSink:
    """Scalar rows to ``path``, one JSON object per line (NaN written as null)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, rows):
        lines = [json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in r.items()}) for r in scalar_rows(rows)]
        if lines:
            append_durably(self.path, ("\n".join(lines) + "\n").encode())

    def close(self):
        pass


class GroupArraysSink:
    """Per-group arrays of every block to ``directory/block-NNNNNN.npz`` (keys ``family/column``)."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.count = len(glob.glob(os.path.join(directory, "block-*.npz")))

    def write(self, rows):
        arrays = {f"{family}/{name}": v for family, r in rows.items() for name, v in r.items()}
        if not arrays or all(len(v) == 0 for v in arrays.values()):
            return
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomically(os.path.join(self.directory, f"block-{self.count:06d}.npz"), buf.getvalue())
        self.count += 1

    def close(self):
        pass


class TensorBoardSink:
    """Per-layer sums and residuals as TensorBoard scalars (needs the ``tensorboard`` package).

    All scalars of one step go into one event: ``add_scalar`` per value costs milliseconds per step on a
    model with tens of families, more than the tracking itself."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        from tensorboard.compat.proto.summary_pb2 import Summary
        self.writer, self.Summary = SummaryWriter(log_dir), Summary

    def write(self, rows):
        by_step: Dict[int, list] = {}
        for r in scalar_rows(rows):
            values = by_step.setdefault(r["step"], [])
            for name in SCALAR_FIELDS[2:]:
                if math.isfinite(r[name]):
                    values.append(self.Summary.Value(tag=f"{r['family']}/{name}", simple_value=r[name]))
        file_writer = self.writer._get_file_writer()
        for step, values in sorted(by_step.items()):
            file_writer.add_summary(self.Summary(value=values), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


def run_sinks(out_dir: str, tensorboard: Optional[bool] = None) -> list:
    """The standard sinks of a run folder: metrics.csv, metrics.jsonl, groups/*.npz, and TensorBoard
    event files under tensorboard/ when the package is installed (or when asked with True)."""
    os.makedirs(out_dir, exist_ok=True)
    sinks = [CSVSink(os.path.join(out_dir, "metrics.csv")), JSONLSink(os.path.join(out_dir, "metrics.jsonl")),
             GroupArraysSink(os.path.join(out_dir, "groups"))]
    if tensorboard is not False:
        try:
            sinks.append(TensorBoardSink(os.path.join(out_dir, "tensorboard")))
        except ImportError:
            if tensorboard:
                raise
    return sinks


def read_run(out_dir: str) -> Dict[str, Dict[str, np.ndarray]]:
    """The per-group history of a run folder, as ``SymmetryTracker.history()`` returns it.  Works on a
    run that was interrupted: it holds every block written before the interruption."""
    blocks = sorted(glob.glob(os.path.join(out_dir, "groups", "block-*.npz")))
    parts: Dict[str, Dict[str, list]] = {}
    for path in blocks:
        with np.load(path) as z:
            for key in z.files:
                family, name = key.rsplit("/", 1)
                parts.setdefault(family, {}).setdefault(name, []).append(z[key])
    return {family: {name: np.concatenate(v) for name, v in cols.items()} for family, cols in parts.items()}
