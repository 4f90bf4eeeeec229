"""The device ring buffer of per-step moments and its asynchronous hand-off to the host.

Each step's ``[slices, 9]`` moments are copied into the next row of a ``[flush_every, slices, 9]`` buffer
on the parameters' device, beside the step's host-side record (its optimizer settings, read without a
sync).  A full block is handed off: on CUDA a non-blocking copy into pinned memory, marked by an event,
while the next steps fill the second buffer; on CPU a copy.  The block stays *pending* until the next
hand-off (or a sync) processes it, by which time the copy is long done, so the step never waits.
Blocks are processed in order, each at most once: one whose processing raised (Ctrl-C) stays pending,
with any handed off after it, until the next sync.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch


class Block(NamedTuple):
    """A block of steps on its way to the host."""

    moments: torch.Tensor               # [steps, slices, 9] float64 (pinned host memory on CUDA)
    records: List[Dict[str, Any]]       # one record per step (the theory's ``record``)
    ready: Optional[Any]                # CUDA event that marks the end of the copy, None on CPU


class DeviceRing:
    """Per-step moments on the device, handed to the host a block at a time (module docstring)."""

    def __init__(self, steps: int, slices: int, device: torch.device):
        buffers = 2 if device.type == "cuda" else 1   # CUDA: the next steps fill one while the other copies
        self._buffers = [torch.empty((steps, slices, 9), dtype=torch.float64, device=device)
                         for _ in range(buffers)]
        self._device = device
        self._index = 0
        self.fill = 0                   # steps in the current buffer
        self._records: List[Dict[str, Any]] = []
        self.pending: List[Block] = []  # oldest first

    def push(self, moments: torch.Tensor, record: Dict[str, Any]) -> bool:
        """Add one step; True when the buffer is full (then call :meth:`flush`)."""
        self._buffers[self._index][self.fill].copy_(moments)
        self._records.append(record)
        self.fill += 1
        return self.fill == len(self._buffers[self._index])

    def flush(self, integrate: Callable, commit: Callable) -> None:
        """Hand the filled steps to the host (asynchronously on CUDA) and process the blocks before them."""
        if self.fill == 0:
            return
        filled = self._buffers[self._index][: self.fill]
        if self._device.type == "cuda":
            host = torch.empty(filled.shape, dtype=filled.dtype, pin_memory=True)
            host.copy_(filled, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            block = Block(host, self._records, event)
            self._index = 1 - self._index  # the next steps fill the other buffer meanwhile
        else:
            block = Block(filled.clone(), self._records, None)
        self.fill, self._records = 0, []
        self.pending.append(block)
        self.process_pending(integrate, commit, keep=1)  # the new block waits for its copy

    def process_pending(self, integrate: Callable, commit: Callable, keep: int = 0) -> None:
        """``commit(integrate(moments, records))`` of the pending blocks, oldest first, all but the last
        ``keep``.  If ``integrate`` raises, that block and the later ones stay pending (``integrate``
        must then leave no trace, see ``state.snapshot``)."""
        while len(self.pending) > keep:
            host, records, ready = self.pending[0]
            if ready is not None:
                ready.synchronize()  # long done: it was enqueued a whole block ago
            columns = integrate(host, records)
            self.pending.pop(0)
            commit(columns)
