"""The run folder of a tracked training run (`neural-mechanics demo/train`, the framework callbacks): its
files, their writers and their reader.

The run folder is written as the run goes, so that an interrupted run (Ctrl-C, a killed job) can still
be reported on:

    config.json        every setting, resolved (written first)
    environment.json   versions (python, torch, build_info), CPU/GPU, date, command line
    families.txt       the table of symmetry families (``describe``); families.json, the same as data
    metrics.csv, metrics.jsonl, groups/block-*.npz   the tracker's sinks, every flush (+ tensorboard/)
    train_log.csv      step, epoch, loss, accuracy, lr, step and data-loading seconds (every flush)
    raw_weights.csv    a few raw weights of one layer per logged step (the paper's Fig. 1, left)
    summary.json       tracker.summary(), overhead, final loss/accuracy, status (written at the end,
                       also after Ctrl-C; missing only when the process was killed)
    figures/*.png, report.html     written at the end by ``report.write_report``

The tracker's own files (metrics.*, groups/, tensorboard/) are written and read by
:mod:`neural_mechanics_ext.sinks`; everything else here.  :func:`load_run` is what ``report`` reads.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .machine import machine_info
from .sinks import append_durably, read_run, write_atomically
from .summary import add_magnitudes, errors_from_history
from .symmetry import describe


def default_out_dir(command: str) -> str:
    return os.path.join("runs", f"{command}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def _json_safe(x):
    """NaN/inf → None and numpy scalars → Python numbers, so the files are strict JSON."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: str, obj) -> None:
    """Strict JSON, written atomically (a reader never sees half a file)."""
    write_atomically(path, (json.dumps(_json_safe(obj), indent=2) + "\n").encode())


def environment() -> Dict[str, Any]:
    """Versions and hardware (``machine.machine_info``), the date and the command line: environment.json."""
    env: Dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command_line": " ".join(["neural-mechanics"] + sys.argv[1:]) if sys.argv and "neural" in sys.argv[0] else None,
        **machine_info(),
    }
    for mod in ("torchvision", "matplotlib"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def write_config(run_dir: str, config: Dict[str, Any]) -> None:
    """config.json (every setting, resolved) and environment.json: the first files of a run folder."""
    os.makedirs(run_dir, exist_ok=True)
    write_json(os.path.join(run_dir, "config.json"), config)
    write_json(os.path.join(run_dir, "environment.json"), environment())


def write_families(run_dir: str, families) -> None:
    """families.txt (the ``describe`` table) and families.json (the same as data, what ``report`` reads)."""
    with open(os.path.join(run_dir, "families.txt"), "w") as f:
        f.write(describe(families) + "\n")
    write_json(os.path.join(run_dir, "families.json"), [
        {"name": fam.name, "kind": fam.kind, "groups": fam.num_groups, "layer": fam.layer,
         "members": [[n, list(v), s] for n, v, s in fam.members], "residual": fam.residual,
         "tolerance": fam.tolerance, "note": fam.note} for fam in families])


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_raw_weights(run_dir: str) -> Optional[Dict[str, np.ndarray]]:
    """raw_weights.csv as columns (None if absent)."""
    path = os.path.join(run_dir, "raw_weights.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        header = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f if line.strip()]
    rows = [r for r in rows if len(r) == len(header)]
    return {h: np.array([float(r[i]) for r in rows]) for i, h in enumerate(header)}


class RunLog:
    """train_log.csv and raw_weights.csv, appended in blocks (same durability as the tracker's sinks)."""

    FIELDS = ["step", "epoch", "loss", "accuracy", "lr", "step_seconds", "data_seconds"]

    def __init__(self, run_dir: str, raw: Optional[dict]):
        self.path = os.path.join(run_dir, "train_log.csv")
        self.raw_path = os.path.join(run_dir, "raw_weights.csv")
        self.rows: List[list] = []
        self.raw_rows: List[list] = []
        append_durably(self.path, (",".join(self.FIELDS) + "\n").encode())
        if raw:
            append_durably(self.raw_path, (",".join(["step"] + [f"w{i}" for i in raw["indices"]]) + "\n").encode())

    def add(self, row: list, raw_values: Optional[torch.Tensor]):
        self.rows.append(row)
        if raw_values is not None:
            self.raw_rows.append([row[0], raw_values])

    def flush(self):
        if self.rows:
            append_durably(self.path, "".join(",".join(_fmt(v) for v in r) + "\n" for r in self.rows).encode())
            self.rows = []
        if self.raw_rows:
            values = torch.stack([v for _, v in self.raw_rows]).double().cpu().tolist()  # one sync per block
            text = "".join(",".join([str(s)] + [repr(x) for x in vals]) + "\n"
                           for (s, _), vals in zip(self.raw_rows, values))
            append_durably(self.raw_path, text.encode())
            self.raw_rows = []


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))


def read_train_log(run_dir: str) -> Dict[str, np.ndarray]:
    """train_log.csv as columns (empty dict if absent)."""
    path = os.path.join(run_dir, "train_log.csv")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        header = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f if line.strip()]
    rows = [r for r in rows if len(r) == len(header)]
    return {h: np.array([float(r[i]) for r in rows]) for i, h in enumerate(header)}


def load_run(run_dir: str) -> Dict[str, Any]:
    """Everything a report needs from a run folder; ``summary`` is None for a killed (or running) run, and then
    ``rows`` (the per-family error table) is computed from the history."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"no run folder {run_dir}")
    config = _read_json(os.path.join(run_dir, "config.json"))
    families = _read_json(os.path.join(run_dir, "families.json"))
    if config is None or families is None:
        raise FileNotFoundError(f"{run_dir} is not a run folder (config.json and families.json are written "
                                "first by `neural-mechanics demo/train`)")
    history = read_run(run_dir)
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    rows = summary["families"] if summary else errors_from_history(history, families)
    if rows and "near_zero" not in rows[0]:
        add_magnitudes(rows, history)
    return {"dir": os.path.abspath(run_dir), "config": config, "families": families, "history": history,
            "summary": summary, "rows": rows, "environment": _read_json(os.path.join(run_dir, "environment.json")),
            "train_log": read_train_log(run_dir), "raw": _read_json(os.path.join(run_dir, "raw_weights.json")),
            "raw_values": read_raw_weights(run_dir)}
