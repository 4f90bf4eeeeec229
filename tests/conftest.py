"""Shared test settings: the devices, dtypes and kernel backends every op test runs on."""
import itertools
from typing import Callable, NamedTuple

import pytest
import torch

import neural_mechanics_ext as nmx
from neural_mechanics_ext import testing

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


class Backend(NamedTuple):
    """One implementation of slice_moments: where its inputs live and the function that runs it."""
    name: str
    device: torch.device
    slice_moments: Callable


_schedule_seeds = itertools.count(1)


def _cuda_emulated(xs, views, ys=None, zs=None):
    # A new thread schedule at every call: repeated calls (test_deterministic) compare schedules too.
    return testing.slice_moments_cuda_emulated(xs, views, ys, zs, schedule_seed=next(_schedule_seeds))


CPU = Backend("cpu", torch.device("cpu"), nmx.slice_moments)
EMULATED = Backend("cuda-emulated", torch.device("cpu"), _cuda_emulated)
CUDA = Backend("cuda", torch.device("cuda"), nmx.slice_moments)
@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two spinning ones (restored after).  A module asks
    for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


needs_emulation = pytest.mark.skipif(not nmx.build_info()["cuda_emulated"],
                                     reason="this build has no emulated CUDA kernels")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[CPU, pytest.param(EMULATED, marks=needs_emulation), pytest.param(CUDA, marks=pytest.mark.cuda)],
                ids=lambda b: b.name)
def backend(request):
    return request.param
