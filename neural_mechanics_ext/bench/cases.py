"""One case of the moments, scaling and count parts: ``slice_moments`` and its peers on one parameter
set, checked against the reference, timed in interleaved rounds, as a JSON-ready record."""
from __future__ import annotations

import gc
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.benchmark as tb

from ..app.timing import spread
from .params import ParamSet
from .peers import DTYPE_NAMES, GB, Inputs, PeerFailed, make_peer, materialize
from .timing import Deadline, Rounds, floor_rounds, measure, paired_ratios


def run_case(pset: ParamSet, device: torch.device, grad_dtype: torch.dtype, peer_names: Sequence[str], *,
             rounds: int, compile_mode: str = "default", deadline: Optional[Deadline] = None,
             min_time: float = 0.05, slow_budget: float = 30.0, check: bool = True,
             log: Callable[[str], None] = lambda s: None, label: str = "slice_moments",
             collect: Optional[List[tb.Measurement]] = None) -> Dict[str, Any]:
    """Time ``slice_moments`` and its peers on one parameter set; a JSON-ready record.  ``collect``
    receives each peer's ``torch.utils.benchmark.Measurement`` (label ``label``, sub-label the case)."""
    inp = materialize(pset, device, grad_dtype)
    rec: Dict[str, Any] = {
        "set": pset.name, "note": pset.note, "grad_dtype": DTYPE_NAMES[grad_dtype], "params": pset.numel,
        "tensors": pset.num_tensors, "slices": pset.num_slices, "bytes": inp.nbytes, "peers": {},
    }
    peers, infos, failed = _set_up(inp, peer_names, compile_mode, log)
    errors, first = _check(peers) if check and "reference" in peers else ({}, {})
    m = measure(peers, rounds, min_time=min_time, slow_budget=slow_budget, deadline=deadline, first=first,
                label=label, sub_label=f"{pset.name} g={rec['grad_dtype']}")
    if collect is not None:
        collect.extend(m.measurements.values())
    for name in peer_names:
        rec["peers"][name] = ({"status": failed[name]} if name in failed else
                              _peer_entry(name, m, inp.nbytes, infos[name], errors.get(name)))
    floor, wins = floor_rounds(m)
    if any(t is not None for t in floor):
        q = spread(floor)
        rec["floor"] = {"seconds": q, "gbps": inp.nbytes / q["median"] / GB, "winner": wins,
                        "fraction": paired_ratios(floor, m.seconds["ours"])}   # floor time / our time
    del peers, inp
    gc.collect()
    return rec


def _set_up(inp: Inputs, peer_names: Sequence[str], compile_mode: str, log: Callable[[str], None]):
    """Every peer's callable and setup facts; the reasons of those that cannot run."""
    peers: Dict[str, Callable[[], Any]] = {}
    infos: Dict[str, Dict[str, Any]] = {}
    failed: Dict[str, str] = {}
    for name in peer_names:
        try:
            start = tb.timer()
            peers[name], infos[name] = make_peer(name, inp, compile_mode)
            if "compile_s" in infos[name]:
                log(f"    {name}: compiled in {infos[name]['compile_s']:.1f} s")
            elif tb.timer() - start > 1:
                log(f"    {name}: set up in {tb.timer() - start:.1f} s")
        except PeerFailed as exc:
            failed[name] = str(exc)
            log(f"    {name}: {exc}")
    if "ours" not in peers:
        raise RuntimeError("the 'ours' peer must be measured (it is every ratio's denominator)")
    return peers, infos, failed


def _check(peers: Dict[str, Callable[[], Any]]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """The reference's result checks ours and the compiled one (largest error relative to each
    column's largest magnitude); its (long) call is also its warm-up, and its time is returned."""
    start = tb.timer()
    want = peers["reference"]()
    first = {"reference": tb.timer() - start}
    scale = want.abs().amax(0).clamp_min(1e-300)
    errors = {}
    for name in ("ours", "compiled"):
        if name in peers:
            got = peers[name]()
            errors[name] = float(((got - want).abs().amax(0) / scale).max())
    return errors, first


def _peer_entry(name: str, m: Rounds, nbytes: int, info: Dict[str, Any], error: Optional[float]) -> Dict[str, Any]:
    q = spread(m.seconds[name])
    entry = {"status": "ok", "seconds": q, "calls": m.calls[name], "gbps": nbytes / q["median"] / GB, **info}
    if name != "ours":
        entry["ratio"] = paired_ratios(m.seconds[name], m.seconds["ours"])   # > 1: ours is faster
    if error is not None:
        entry["max_rel_error"] = error
    return entry
