"""What the suite's numbers were measured on: the library's ``machine_info`` (the facts the run
folder's environment.json records too), plus the date, the device, the measured accelerator's
properties and the checkout that was measured."""
from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
from typing import Any, Dict, Optional

import torch

from .. import machine


def machine_info(device: torch.device) -> Dict[str, Any]:
    """The ``meta`` of results.json: processor, memory, accelerator, versions, date, load."""
    info = machine.machine_info()
    info.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=device.type, build_info=info.pop("neural_mechanics_ext"), git=_git_head(),
                package=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_sms=props.multi_processor_count, cuda_runtime=torch.version.cuda,
                    gpu_capability=f"{props.major}.{props.minor}")
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                info["nvidia_smi"] = out.stdout.strip()
    return info


def section_key(meta: Dict[str, Any]) -> str:
    """The machine's name in RESULTS.md: one section per device and processor (or GPU)."""
    who = meta.get("gpu") if meta["device"] == "cuda" else f"{meta['cpu']} x{meta['cpu_count']}"
    return f"{meta['device']}: {who}"


def _git_head() -> Optional[str]:
    with contextlib.suppress(Exception):
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=10"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    return None
