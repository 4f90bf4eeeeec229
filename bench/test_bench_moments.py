"""Micro-benchmarks: slice_moments against its peers on one mid-size parameter set.

    pytest bench/ --benchmark-only                       # resnet50 set on the CPU
    NMX_BENCH_SET=gpt2 NMX_BENCH_DEVICE=cuda pytest bench/ --benchmark-only --benchmark-group-by=group

Every benchmark of one (set, gradient dtype) shares a group, so pytest-benchmark prints them side by
side; ``extra_info`` holds the bytes read and GB/s.  Slow peers (the eager reference, which upcasts
to float64) run a fixed small number of rounds.  The full ratio table is ``neural-mechanics bench``.
"""
import os

import pytest
import torch

from neural_mechanics_ext import bench as B
from neural_mechanics_ext.app.timing import sync

SET = os.environ.get("NMX_BENCH_SET", "resnet50")
DEVICE = torch.device(os.environ.get("NMX_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SHRINK = int(os.environ.get("NMX_BENCH_SHRINK", "1"))
SLOW = {"reference": 2, "compiled": 5}   # rounds of the slow peers (pedantic mode)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def inputs(request):
    pset = B.shrink(B.SET_BUILDERS[SET](), SHRINK)
    inp = B.materialize(pset, DEVICE, B.GRAD_DTYPES[request.param])
    yield request.param, inp
    del inp
    torch._dynamo.reset()


@pytest.mark.parametrize("peer", B.ALL_PEERS)
def test_slice_moments(benchmark, inputs, peer):
    dtype, inp = inputs
    try:
        fn, info = B.make_peer(peer, inp)
    except B.PeerFailed as exc:
        pytest.skip(str(exc))
    benchmark.group = f"slice_moments {inp.pset.name} g={dtype} ({B.fmt_count(inp.pset.numel)} params, " \
                      f"{inp.pset.num_tensors} tensors, {inp.nbytes / B.MB:.0f} MB, {DEVICE.type})"
    benchmark.extra_info.update(bytes=inp.nbytes, **info)

    def run():
        fn()
        sync(DEVICE)

    if peer in SLOW:
        benchmark.pedantic(run, rounds=SLOW[peer], iterations=1, warmup_rounds=1 if peer == "compiled" else 0)
    else:
        benchmark(run)
    benchmark.extra_info["gbps"] = inp.nbytes / benchmark.stats.stats.median / B.GB
