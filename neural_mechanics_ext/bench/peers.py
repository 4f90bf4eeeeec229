"""The inputs of one case (θ, g, v of a parameter set) and the peers that read them: ``ours``
(``slice_moments``), the eager ``reference``, its ``torch.compile``, ``foreach_norm`` and ``stream``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.utils.benchmark as tb

from .. import ops
from ..reference import slice_moments_reference
from .params import ParamSet

MB = 1e6
GB = 1e9

ALL_PEERS = ("ours", "reference", "compiled", "foreach_norm", "stream")
READ_PEERS = ("stream", "foreach_norm")      # peers that only read the bytes: candidates for the floor
GRAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass
class Inputs:
    """Materialised θ, g, v for one parameter set."""
    pset: ParamSet
    xs: List[torch.Tensor]
    gs: List[torch.Tensor]
    vs: List[torch.Tensor]
    grad_dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.xs + self.gs + self.vs)


def materialize(pset: ParamSet, device, grad_dtype=torch.float32, seed: int = 0) -> Inputs:
    """Random θ (fp32), g (``grad_dtype``) and v (fp32) of the set's shapes, on ``device``."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    xs, gs, vs = [], [], []
    for _, shape in pset.shapes:
        xs.append(torch.randn(shape, device=device, generator=gen))
        gs.append((torch.randn(shape, device=device, generator=gen) * 1e-3).to(grad_dtype))
        vs.append(torch.randn(shape, device=device, generator=gen) * 1e-2)
    return Inputs(pset, xs, gs, vs, grad_dtype, device)


class PeerFailed(Exception):
    """A peer that cannot run on a case (compile failure, not enough memory): reported, not raised."""


def reference_peak_bytes(inp: Inputs) -> int:
    """Memory the eager reference needs beyond its inputs: per view, three float64 copies and six
    float64 products of the largest tensor (the reference keeps all nine columns alive at once)."""
    return max(t.numel() for t in inp.xs) * 8 * 10


def available_bytes(device: torch.device) -> int:
    """Free accelerator memory, or the host's MemAvailable (unlimited where it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def make_peer(name: str, inp: Inputs, compile_mode: str = "default") -> Tuple[Callable[[], Any], Dict[str, Any]]:
    """The zero-argument callable that runs peer ``name`` on ``inp``, and facts about its setup
    (``compile_s`` for compiled peers).  Raises PeerFailed with a readable reason."""
    xs, gs, vs, views = inp.xs, inp.gs, inp.vs, inp.pset.views
    if name == "ours":
        return (lambda: ops.slice_moments(xs, views, gs, vs)), {}
    if name in ("reference", "compiled"):
        need, avail = reference_peak_bytes(inp), available_bytes(inp.device)
        if name == "reference" and need > 0.8 * avail:
            raise PeerFailed(f"skipped: needs ~{need / GB:.1f} GB of float64 temporaries, "
                             f"{avail / GB:.1f} GB available")
        table = inp.pset.table()
        if name == "reference":
            return (lambda: slice_moments_reference(xs, gs, vs, table)), {}
        return _compiled(xs, gs, vs, table, compile_mode)
    if name == "foreach_norm":
        return (lambda: (torch._foreach_norm(xs), torch._foreach_norm(gs), torch._foreach_norm(vs))), {}
    if name == "stream":
        tensors = xs + gs + vs
        return (lambda: [t.sum() for t in tensors]), {}
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(ALL_PEERS)}")


def _compiled(xs, gs, vs, table, compile_mode: str) -> Tuple[Callable[[], Any], Dict[str, Any]]:
    """``torch.compile`` of the reference, compiled (and timed) here so that no round pays for it."""
    try:
        torch._dynamo.reset()
        fn = torch.compile(slice_moments_reference, mode=None if compile_mode == "default" else compile_mode,
                           dynamic=False)
        start = tb.timer()
        fn(xs, gs, vs, table)
        compile_s = tb.timer() - start
    except Exception as exc:  # inductor errors come in many types; any of them is a failed peer
        raise PeerFailed(f"compile failed: {type(exc).__name__}: {first_line(exc)}") from None
    return (lambda: fn(xs, gs, vs, table)), {"compile_s": compile_s}


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (for table cells)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
