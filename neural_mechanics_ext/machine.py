"""What a run or a measurement was made on: versions, processor, memory, accelerators, load.

One function for the run folder's environment.json (:func:`neural_mechanics_ext.runfolder.environment`)
and the benchmark suite's results (``neural_mechanics_ext.bench.machine``), so that both describe a
machine with the same facts under the same names.
"""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, Optional

import numpy as np
import torch

from ._backend import build_info


def machine_info() -> Dict[str, Any]:
    """Versions (python, torch, numpy, this package's build), processor, memory, GPUs and load average."""
    info: Dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "numpy": np.__version__, "neural_mechanics_ext": build_info(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb(), "cuda_available": torch.cuda.is_available(),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:   # not on every platform
        pass
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gb() -> Optional[float]:
    """Total RAM in GiB (``/proc/meminfo``), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None
