"""Test-only entry points; not part of the public API.

``slice_moments_cuda_emulated`` runs the CUDA kernels of ``slice_moments`` (the same source nvcc
compiles) on a host emulation of the CUDA execution model, so that machines without a GPU test their
logic: the threads of a block are fibers switched at every ``__syncthreads`` and warp shuffle, in an
order drawn from ``schedule_seed``.  It is slow (the emulation is for logic, not speed): small inputs only.
What it cannot see is listed in ``csrc/cuda/emulation.h``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _backend
from .ops import View, _adam_args, _check_inputs, _lion_args


def cuda_emulation_available() -> bool:
    """Whether the compiled extension carries the emulated CUDA kernels (``build_info()["cuda_emulated"]``)."""
    return _backend.build_info()["cuda_emulated"]


def slice_moments_cuda_emulated(
    xs: Sequence[torch.Tensor],
    views: Sequence[Sequence[View]],
    ys: Optional[Sequence[Optional[torch.Tensor]]] = None,
    zs: Optional[Sequence[Optional[torch.Tensor]]] = None,
    schedule_seed: int = 0,
) -> torch.Tensor:
    """``nmx.slice_moments`` computed by the emulated CUDA kernels, on CPU tensors (same contract)."""
    if not cuda_emulation_available():
        raise RuntimeError(
            "slice_moments_cuda_emulated: this build of neural_mechanics_ext has no emulated CUDA kernels "
            f"(build_info: {_backend.build_info()})")
    if not isinstance(schedule_seed, int) or not 0 <= schedule_seed < 2**64:
        raise ValueError(f"slice_moments_cuda_emulated: schedule_seed must be an int in [0, 2**64), got {schedule_seed!r}")
    xs, ys, zs, table = _check_inputs(xs, views, ys, zs)
    if not xs:
        return torch.zeros((0, 9), dtype=torch.float64)
    if xs[0].device.type != "cpu":
        raise ValueError(f"slice_moments_cuda_emulated: the emulation reads CPU tensors, got {xs[0].device}")
    return _backend._C.slice_moments_cuda_emulated(xs, ys, zs, table, schedule_seed)


def adam_moments_cuda_emulated(params, views, grads, exp_avgs=None, exp_avg_sqs=None, max_exp_avg_sqs=None, *,
                               step, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                               maximize=False, schedule_seed: int = 0) -> torch.Tensor:
    """``nmx.adam_moments`` computed by the emulated CUDA kernels, on CPU tensors (same contract)."""
    args = _adam_args(params, views, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, betas, eps, weight_decay,
                      decoupled_weight_decay, maximize)
    return _stream_emulated(1, args[:5], args[5], args[6], schedule_seed)


def lion_moments_cuda_emulated(params, views, grads, exp_avgs=None, *, betas=(0.9, 0.99),
                               schedule_seed: int = 0) -> torch.Tensor:
    """``nmx.lion_moments`` computed by the emulated CUDA kernels, on CPU tensors (same contract)."""
    params, grads, ms, table, scalars = _lion_args(params, views, grads, exp_avgs, betas)
    return _stream_emulated(2, (params, grads, ms, [], []), table, scalars, schedule_seed)


def _stream_emulated(mode, tensors, table, scalars, schedule_seed):
    if not cuda_emulation_available():
        raise RuntimeError("this build of neural_mechanics_ext has no emulated CUDA kernels")
    if not isinstance(schedule_seed, int) or not 0 <= schedule_seed < 2**64:
        raise ValueError(f"schedule_seed must be an int in [0, 2**64), got {schedule_seed!r}")
    if not tensors[0]:
        return torch.zeros((0, 9), dtype=torch.float64)
    return _backend._C.stream_moments_cuda_emulated(mode, *tensors, table, scalars, schedule_seed)
