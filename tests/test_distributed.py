"""DDP and FSDP2 runs (2 ranks, gloo, CPU) record the same history as one process on the same batches."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import neural_mechanics_ext as nmx
from neural_mechanics_ext.distributed import view_pieces
from neural_mechanics_ext.reference import slice_moments_reference
from neural_mechanics_ext.views import full

WORLD = 2
STEPS = 12

FAMILIES = [
    nmx.SymmetryFamily("rescale", "0 -> 2", [("0.weight", (1, 7, 6), 1), ("0.bias", (1, 7, 1), 1),
                                             ("2.weight", (5, 7, 1), -1)]),
    nmx.SymmetryFamily("rescale", "2 -> 4", [("2.weight", (1, 5, 7), 1), ("2.bias", (1, 5, 1), 1),
                                             ("4.weight", (3, 5, 1), -1)]),
    nmx.SymmetryFamily("translation", "4 (columns)", [("4.weight", (3, 5, 1), 1)]),
    nmx.SymmetryFamily("translation", "4 (bias)", [("4.bias", (1, 1, 3), 1)]),
    nmx.SymmetryFamily("scale", "whole 2 (for the test)", [("2.weight", (1, 1, 35), 1)]),
    # Parts of 2.weight [5, 7] that the row shards (rows 0-2 | 3-4) cut: columns 2-4, rows 2-3.
    nmx.SymmetryFamily("scale", "2 columns 2-4 (for the test)", [("2.weight", (5, 3, 1, 2, 7), 1)]),
    nmx.SymmetryFamily("scale", "2 rows 2-3 (for the test)", [("2.weight", (1, 2, 7, 14, 14), 1)]),
]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(STEPS)]


def train(model, opt, data, rank=0, world=1):
    for X, Y in data:
        lo, hi = rank * len(X) // world, (rank + 1) * len(X) // world
        opt.zero_grad()
        F.cross_entropy(model(X[lo:hi]), Y[lo:hi]).backward()
        opt.step()


def _worker(rank, mode, port, out):
    import torch.distributed as dist
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = make_model()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
        families = [nmx.SymmetryFamily(f.kind, f.name, [("module." + n, v, s) for n, v, s in f.members])
                    for f in FAMILIES]
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        families = FAMILIES
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    tracker = nmx.SymmetryTracker(model, opt, families=families, out_dir=os.path.join(out, f"run-rank{rank}"),
                                  flush_every=5)
    train(model, opt, batches(), rank, WORLD)
    history = tracker.history()
    tracker.close()
    if rank == 0:
        torch.save({k: {c: torch.from_numpy(np.asarray(v)) for c, v in h.items()} for k, h in history.items()},
                   os.path.join(out, "history.pt"))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_history_equals_single_process(mode, tmp_path):
    mp.spawn(_worker, args=(mode, free_port(), str(tmp_path)), nprocs=WORLD)
    distributed = torch.load(tmp_path / "history.pt")
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    tracker = nmx.SymmetryTracker(model, opt, families=FAMILIES)
    train(model, opt, batches())
    single = tracker.history()
    for family, cols in single.items():
        for name in ("empirical", "exact", "paper", "magnitude", "residual"):
            got, want = distributed[family][name].numpy(), cols[name]
            # Residuals of true symmetries are rounding noise (~1e-16): they agree in size, not in digits.
            slack = 1e-14 if name == "residual" else 0.0
            assert np.nanmax(np.abs(got - want)) <= 1e-10 * np.nanmax(np.abs(want)) + slack, (family, name)
    # Sinks are written by rank 0 only.
    assert (tmp_path / "run-rank0" / "metrics.csv").exists()
    assert not (tmp_path / "run-rank1").exists()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_view_pieces_cover_a_shard_exactly(data):
    # FSDP2 holds a contiguous range [e0, e1) of the flat tensor: the pieces of a view inside it, as views
    # of that range, sum to the view's moments restricted to the range (whole and partial views alike).
    draw = data.draw
    a, k, b = (draw(st.integers(0, 4)) for _ in range(3))
    a_stride = k * b + draw(st.integers(0, 3))
    extent = (a - 1) * a_stride + k * b if a * k * b else 0
    n = max(1, extent) + draw(st.integers(0, 6))
    view = full((a, k, b, draw(st.integers(0, n - extent)), a_stride), n)
    e0 = draw(st.integers(0, n))
    e1 = draw(st.integers(e0, n))
    x = torch.randn(n, dtype=torch.float64)
    got = torch.zeros(k, 9, dtype=torch.float64)
    for piece, first in view_pieces(e0, e1, view):
        part = slice_moments_reference([x[e0:e1]], [], [], [0, *full(piece, e1 - e0)])
        got[first:first + piece[1]] += part
    masked = torch.zeros_like(x)
    masked[e0:e1] = x[e0:e1]
    want = slice_moments_reference([masked], [], [], [0, *view])
    assert torch.allclose(got, want, atol=1e-12)


def test_fsdp1_is_refused():
    model = make_model()

    class FlatParameter(nn.Parameter):
        pass

    model.register_parameter("flat", FlatParameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="FSDP1"):
        nmx.SymmetryTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), families=FAMILIES)
