"""adam_moments / lion_moments: the fused stream modes (THEORY_ADAPTIVE.md §1) against three independent
computations: the plain-torch twins in reference.py, the theory's update_direction fed to slice_moments,
and the step a real torch / lion-pytorch optimizer takes.

Tolerances.  float64 parameters: the kernels form u in float64 like torch, so everything agrees to
~1e-16 per element; the moments are compared at 1e-13 (reference, same formula) and 1e-12 (theory) of
the moments of |θ|, |p|, |u| (the scale of the sums' rounding).  float32 and 16-bit parameters: the
arithmetic is float32, and a compiler may fuse a product and a sum where torch does not (or the other
way round), so p and u may differ from torch's in the last bits of float32 — relative to the inputs: where
m' = lerp(m, g̃, 1 − β₁) nearly cancels, a last-bit difference is a large part of a small p (measured: up
to 6e-4 of such an element, 1e-7 typically, for torch's own float32 result as much as for the kernels).
Compared at FLOAT_TOL = 1e-5 of the scale.
"""
import itertools
import os
import subprocess
import sys
import textwrap
import zlib
from typing import Callable, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import neural_mechanics_ext as nmx
from neural_mechanics_ext import MOMENTS, testing
from neural_mechanics_ext.ops import _adam_args, _lion_args
from neural_mechanics_ext.reference import (adam_moments_reference, adam_streams, lion_moments_reference, lion_streams,
                                            slice_moments_reference)
from neural_mechanics_ext.theory.adaptive_forms import AdaptiveHyper, update_direction

from conftest import needs_emulation

XZ, ZZ, Z = MOMENTS.index("xz"), MOMENTS.index("zz"), MOMENTS.index("z")
FLOAT_TOL = 1e-5


class StreamBackend(NamedTuple):
    name: str
    device: torch.device
    adam: Callable
    lion: Callable


_seeds = itertools.count(1)
CPU = StreamBackend("cpu", torch.device("cpu"), nmx.adam_moments, nmx.lion_moments)
EMULATED = StreamBackend(
    "cuda-emulated", torch.device("cpu"),
    lambda *a, **k: testing.adam_moments_cuda_emulated(*a, **k, schedule_seed=next(_seeds)),
    lambda *a, **k: testing.lion_moments_cuda_emulated(*a, **k, schedule_seed=next(_seeds)))
CUDA = StreamBackend("cuda", torch.device("cuda"), nmx.adam_moments, nmx.lion_moments)
BACKENDS = [CPU, pytest.param(EMULATED, marks=needs_emulation), pytest.param(CUDA, marks=pytest.mark.cuda)]


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request):
    return request.param


# Shapes with the views the symmetry families use: rows and columns of a weight, a conv's input channels,
# a bias, a whole tensor, and the wide and tall layouts the planner tiles.
LAYOUTS = [
    ((24, 40), [(1, 24, 40), (24, 40, 1)]),
    ((16, 8, 3, 3), [(1, 16, 72), (16, 8, 9)]),
    ((37,), [(1, 37, 1), (1, 1, 37)]),
    ((12, 20), [(1, 1, 240), (12, 20, 1)]),
    ((3, 2500), [(1, 3, 2500), (3, 2500, 1)]),
    ((700, 3), [(700, 3, 1), (1, 700, 3)]),
]

# Adam settings: AdamW, Adam with coupled L2, amsgrad, maximize, the other side of torch's lerp (β₁ < 0.5).
ADAM_CASES = {
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "adam-l2": dict(weight_decay=0.1),
    "amsgrad": dict(amsgrad=True, weight_decay=0.01, decoupled_weight_decay=True),
    "maximize": dict(maximize=True, weight_decay=0.05),
    "beta1<0.5": dict(betas=(0.3, 0.95), eps=1e-3, step=2),
}


def optimizer_state(shape, dtype, gen, fresh, amsgrad, device="cpu"):
    if fresh:
        return {}
    r = lambda: torch.randn(shape, generator=gen, dtype=torch.float64)
    v = r() ** 2
    state = {"exp_avg": r(), "exp_avg_sq": v}
    if amsgrad:
        state["max_exp_avg_sq"] = v + r().abs() * (r() > 0)  # above v' in some elements, not in others
    return {k: t.to(dtype).to(device) for k, t in state.items()}


def problem(dtype, gen, fresh=False, amsgrad=False, nan=False, device="cpu"):
    """(params, views, grads, states) over LAYOUTS."""
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s, _ in LAYOUTS]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s, _ in LAYOUTS]
    if nan:  # one NaN in the second row of the first weight: only the slices holding it may see it
        grads[0][1, 3] = float("nan")
    states = [optimizer_state(s, dtype, gen, fresh, amsgrad, device) for s, _ in LAYOUTS]
    return params, [v for _, v in LAYOUTS], grads, states


def adam_kwargs(case):
    kw = dict(ADAM_CASES[case])
    kw.setdefault("step", 1 if case == "amsgrad" else 5)
    return kw


def run_adam(fn, params, views, grads, states, kw):
    kw = dict(kw)
    amsgrad = kw.pop("amsgrad", False)
    get = lambda key: [s.get(key) for s in states]
    return fn(params, views, grads, get("exp_avg"), get("exp_avg_sq"), get("max_exp_avg_sq") if amsgrad else None,
              **kw)


def theory_moments(params, views, grads, states, hps, dtype=None):
    """slice_moments(θ, p, u) with (p, u) from theory.update_direction (in `dtype`, default the inputs'),
    and the same moments of |θ|, |p|, |u| (the rounding scale)."""
    ps, us = [], []
    for th, g, st_, hp in zip(params, grads, states, hps):
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        p, u = update_direction(cast(th), cast(g), {k: cast(t) for k, t in st_.items()}, hp)
        ps.append(p)
        us.append(u)
    want = nmx.slice_moments(params, views, ps, us)
    scale = nmx.slice_moments([t.abs() for t in params], views, [p.abs() for p in ps], [u.abs() for u in us])
    return want, scale


def hyper(kw, family=None):
    wd = kw.get("weight_decay", 0.0)
    family = family or ("adamw" if kw.get("decoupled_weight_decay") else "adam")
    return AdaptiveHyper(family, 1e-3, wd, kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8), kw["step"],
                         kw.get("amsgrad", False), kw.get("maximize", False))


def assert_moments_close(got, want, scale, tol):
    got, want, scale = got.cpu(), want.cpu(), scale.cpu()
    assert got.shape == want.shape and got.dtype == torch.float64
    assert torch.equal(got.isnan(), want.isnan()), "NaN in different slices"
    ok = ~want.isnan()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(want)  # a number, or one per row
    err = (got[ok] - want[ok]).abs()
    assert torch.all(err <= tol[ok] * scale[ok] + 1e-300), f"max error {err.max()} (tolerance {tol.max()} of the scale)"


# ---- against the theory's update_direction (independent plain-torch code) -----------------------------
@pytest.mark.parametrize("fresh", [False, True], ids=["state", "fresh"])
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_float64_equals_update_direction(backend, case, fresh):
    # A fixed seed per case (str hash() changes per process).  Rare draws put an element where g̃ = ±g + λθ
    # cancels to ~eps: u then follows the last bit of g̃, which a fused multiply-add rounds once and torch's
    # add(alpha=λ) may round twice (seed 39 of 'maximize': 2.8e-11 of the scale); these seeds have none.
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()) % 1000)
    kw = adam_kwargs(case)
    params, views, grads, states = problem(torch.float64, gen, fresh, kw.get("amsgrad", False), device=backend.device)
    got = run_adam(backend.adam, params, views, grads, states, kw)
    want, scale = theory_moments(params, views, grads, states, [hyper(kw)] * len(params))
    assert_moments_close(got, want, scale, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["adamw", "adam-l2", "amsgrad", "maximize"])
def test_adam_low_precision_matches_torch_in_float32(backend, case, dtype):
    # torch's step on float32 parameters computes in float32: so does the kernel.  On bfloat16 ones torch
    # rounds every intermediate to bfloat16; the kernel keeps them in float32, so it is compared with the
    # float32 computation on the same (bfloat16) values.
    gen = torch.Generator().manual_seed(7)
    kw = adam_kwargs(case)
    params, views, grads, states = problem(dtype, gen, amsgrad=kw.get("amsgrad", False), device=backend.device)
    got = run_adam(backend.adam, params, views, grads, states, kw)
    want, scale = theory_moments(params, views, grads, states, [hyper(kw)] * len(params), dtype=torch.float32)
    assert_moments_close(got, want, scale, FLOAT_TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fresh", [False, True], ids=["state", "fresh"])
def test_lion_equals_update_direction(backend, dtype, fresh):
    gen = torch.Generator().manual_seed(3)
    params, views, grads, states = problem(dtype, gen, fresh, device=backend.device)
    states = [{k: v for k, v in s.items() if k == "exp_avg"} for s in states]
    got = backend.lion(params, views, grads, [s.get("exp_avg") for s in states], betas=(0.95, 0.98))
    hp = AdaptiveHyper("lion", 1e-4, 1.0, (0.95, 0.98))
    want, scale = theory_moments(params, views, grads, states, [hp] * len(params),
                                 dtype=None if dtype == torch.float64 else torch.float32)
    assert_moments_close(got, want, scale, 1e-12 if dtype == torch.float64 else FLOAT_TOL)
    # sign c is ±1 wherever c ≠ 0: zz counts the elements of each slice.
    counts = nmx.slice_moments([torch.ones_like(p) for p in params], views)[:, 0]
    assert torch.equal(got[:, ZZ].cpu(), counts.cpu())


def test_nan_in_a_gradient_stays_in_its_slices(backend):
    gen = torch.Generator().manual_seed(5)
    kw = adam_kwargs("adamw")
    params, views, grads, states = problem(torch.float64, gen, nan=True, device=backend.device)
    got = run_adam(backend.adam, params, views, grads, states, kw)
    want, scale = theory_moments(params, views, grads, states, [hyper(kw)] * len(params))
    assert_moments_close(got, want, scale, 1e-12)
    # Rows of the first weight: only row 1 has NaN, in p and u (not in x or xx); columns: only column 3.
    rows, cols = got[:24].cpu(), got[24:64].cpu()
    assert rows[1, 1:].isnan().any() and not rows[1, [0, 3]].isnan().any()
    assert rows[[0] + list(range(2, 24))].isfinite().all() and cols[[c for c in range(40) if c != 3]].isfinite().all()
    lion = backend.lion(params, views, grads, [s["exp_avg"] for s in states])
    assert lion[1, 1].isnan() and not lion[1, 2].isnan()  # c is NaN there, torch's sign(NaN) is 0


# ---- against the plain-torch twins (any dtype mix), on random problems --------------------------------
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _views(numel, draw):
    divisors = [d for d in range(1, numel + 1) if numel % d == 0]
    out = []
    for _ in range(draw(st.integers(1, 3))):
        a = draw(st.sampled_from(divisors))
        k = draw(st.sampled_from([d for d in divisors if (numel // a) % d == 0]))
        out.append((a, k, numel // a // k))
    return out


@pytest.mark.parametrize("backend_", [CPU, pytest.param(EMULATED, marks=needs_emulation)], ids=lambda b: b.name)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_against_reference(backend_, data):
    draw = data.draw
    params, grads, ms, vs, vmaxs, views = [], [], [], [], [], []
    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        numel = torch.Size(shape).numel()
        dt = lambda: draw(st.sampled_from(DTYPES))
        params.append(torch.randn(shape).to(dt()))
        grads.append(torch.randn(shape).to(dt()))
        state = draw(st.sampled_from(["fresh", "state", "amsgrad"]))
        ms.append(None if state == "fresh" else torch.randn(shape).to(dt()))
        vs.append(None if state == "fresh" else torch.rand(shape).to(dt()))
        vmaxs.append(torch.rand(shape).to(dt()) if state == "amsgrad" else None)
        views.append(_views(numel, draw))
    n = len(params)
    kw = dict(step=[draw(st.integers(1, 50)) for _ in range(n)],
              betas=[(draw(st.floats(0, 0.99)), draw(st.floats(0, 0.9999))) for _ in range(n)],
              eps=draw(st.sampled_from([0.0, 1e-8, 1e-3])),
              weight_decay=[draw(st.sampled_from([0.0, 0.1])) for _ in range(n)],
              decoupled_weight_decay=draw(st.booleans()), maximize=[draw(st.booleans()) for _ in range(n)])
    got = backend_.adam(params, views, grads, ms, vs, vmaxs, **kw)
    args = _adam_args(params, views, grads, ms, vs, vmaxs, kw["step"], kw["betas"], kw["eps"], kw["weight_decay"],
                      kw["decoupled_weight_decay"], kw["maximize"])
    want = adam_moments_reference(*args)
    table = args[5]
    tol = row_tolerance(table, [*zip(params, grads, ms, vs, vmaxs)])
    assert_moments_close(got, want, rounding_scale(args[0], table, *adam_streams(*args[:5], args[6])), tol)

    got = backend_.lion(params, views, grads, ms, betas=kw["betas"])
    largs = _lion_args(params, views, grads, ms, kw["betas"])
    want = lion_moments_reference(*largs)
    tol = row_tolerance(table, [*zip(params, grads, ms)])
    assert_moments_close(got, want, rounding_scale(largs[0], table, *lion_streams(*largs[:3], largs[4])), tol)


def row_tolerance(table, inputs):
    """Per output row: 1e-13 where the tensor's arithmetic is float64 (any input float64), else FLOAT_TOL."""
    f64 = [any(t is not None and t.dtype == torch.float64 for t in ts) for ts in inputs]
    return torch.tensor([1e-13 if f64[table[q]] else FLOAT_TOL for q in range(0, len(table), 6)
                         for _ in range(table[q + 2])], dtype=torch.float64)[:, None]


def rounding_scale(params, table, ps, us):
    """The moments of |θ|, |p|, |u|: what the rounding of the sums is relative to."""
    return slice_moments_reference([x.abs() for x in params], [p.abs() for p in ps], [u.abs() for u in us], table)


# ---- against the step a real optimizer takes: θ' = ρθ − lr·u -----------------------------------------
def _model(dtype, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)
    views = [[(1, p.shape[0], p[0].numel()), (p.shape[0], p[0].numel(), 1)] if p.dim() == 2 else [(1, p.numel(), 1)]
             for p in net.parameters()]
    return net, views


def _train_and_check(net, views, opt, moments_of, rho, lr, dtype, tol, steps=4):
    """At each step's pre-hook, the kernel's moments; after it, xz, zz and z against (ρθ − θ')/lr."""
    params = list(net.parameters())
    for k in range(steps):
        x = torch.randn(8, 5, dtype=dtype)
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        got = moments_of(params, [p.grad for p in params])
        before = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            # Double precision, so that forming u back from the step adds no rounding of its own.
            us = [(rho * b.double() - p.double()) / lr for b, p in zip(before, params)]
        want = nmx.slice_moments([b.double() for b in before], views, None, us)
        scale = nmx.slice_moments([b.double().abs() for b in before], views, None, [u.abs() for u in us])
        for col in (Z, XZ, ZZ):
            err = (got[:, col] - want[:, col]).abs()
            assert torch.all(err <= tol * scale[:, col]), f"step {k}, {MOMENTS[col]}: max error {err.max()}"


ADAM_OPTIMIZERS = {
    "AdamW": dict(cls=torch.optim.AdamW, weight_decay=0.1),
    "Adam-L2": dict(cls=torch.optim.Adam, weight_decay=0.1),
    "AdamW-amsgrad": dict(cls=torch.optim.AdamW, weight_decay=0.1, amsgrad=True),
    "Adam-maximize": dict(cls=torch.optim.Adam, maximize=True),
    "AdamW-foreach": dict(cls=torch.optim.AdamW, weight_decay=0.1, foreach=True),
    "AdamW-fused": dict(cls=torch.optim.AdamW, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("name", list(ADAM_OPTIMIZERS))
def test_real_adam_step_float64(name):
    # lr = 1e-2: (ρθ − θ')/lr loses ulp(θ)/lr ≈ 1e-14 of |u| (THEORY_ADAPTIVE §0's caution).
    spec = dict(ADAM_OPTIMIZERS[name])
    cls = spec.pop("cls")
    net, views = _model(torch.float64)
    lr, betas, eps = 1e-2, (0.8, 0.99), 1e-8
    opt = cls(net.parameters(), lr=lr, betas=betas, eps=eps, **spec)
    group = opt.param_groups[0]
    decoupled = group["decoupled_weight_decay"]

    def moments_of(params, grads):
        states = [opt.state[p] for p in params]
        step = [int(s["step"]) + 1 if "step" in s else 1 for s in states]  # 1 before the first step
        get = lambda key: [s.get(key) for s in states]
        return nmx.adam_moments(params, views, grads, get("exp_avg"), get("exp_avg_sq"),
                                get("max_exp_avg_sq") if group["amsgrad"] else None, step=step, betas=betas, eps=eps,
                                weight_decay=group["weight_decay"], decoupled_weight_decay=decoupled,
                                maximize=group["maximize"])

    rho = 1 - lr * group["weight_decay"] if decoupled else 1.0
    _train_and_check(net, views, opt, moments_of, rho, lr, torch.float64, 1e-10)


def test_real_adamw_step_float32():
    # float32: torch's own step rounds θ' to float32, ulp(θ)/lr ≈ 6e-8/0.1 of |u| per element.
    net, views = _model(torch.float32)
    lr = 0.1
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.1)

    def moments_of(params, grads):
        states = [opt.state[p] for p in params]
        return nmx.adam_moments(params, views, grads, [s.get("exp_avg") for s in states],
                                [s.get("exp_avg_sq") for s in states],
                                step=[int(s["step"]) + 1 if "step" in s else 1 for s in states],
                                weight_decay=0.1, decoupled_weight_decay=True)

    _train_and_check(net, views, opt, moments_of, 1 - lr * 0.1, lr, torch.float32, 1e-5)


def test_real_lion_step():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    net, views = _model(torch.float64)
    lr, wd, betas = 1e-3, 0.5, (0.9, 0.99)
    opt = lion_pytorch.Lion(net.parameters(), lr=lr, betas=betas, weight_decay=wd)

    def moments_of(params, grads):
        return nmx.lion_moments(params, views, grads, [opt.state[p].get("exp_avg") for p in params], betas=betas)

    _train_and_check(net, views, opt, moments_of, 1 - lr * wd, lr, torch.float64, 1e-10)


# ---- bad input: a clear Python exception naming the problem -------------------------------------------
def _adam(x, **kw):
    args = dict(params=[x], views=[[(1, 4, 5)]], grads=[x], exp_avgs=None, exp_avg_sqs=None, step=1)
    args.update(kw)
    return nmx.adam_moments(**args)


BAD = [
    (lambda x: _adam(x, grads=None), ValueError, "every parameter needs its gradient"),
    (lambda x: _adam(x, grads=[x.t()]), ValueError, "grads\\[0\\] has shape \\(5, 4\\) but params\\[0\\]"),
    (lambda x: _adam(x, exp_avgs=[x]), ValueError, "has exp_avg but not exp_avg_sq"),
    (lambda x: _adam(x, exp_avg_sqs=[x]), ValueError, "has exp_avg_sq but not exp_avg"),
    (lambda x: _adam(x, max_exp_avg_sqs=[x]), ValueError, "max_exp_avg_sq but no exp_avg_sq"),
    (lambda x: _adam(x, exp_avgs=[x], exp_avg_sqs=[x[:2]]), ValueError, "exp_avg_sqs\\[0\\] has shape"),
    (lambda x: _adam(x, exp_avgs=[x], exp_avg_sqs=[x.long()]), TypeError, "exp_avg_sqs\\[0\\] has dtype torch.int64"),
    (lambda x: _adam(x, exp_avgs=[x.to("meta")], exp_avg_sqs=[x]), ValueError, "one device"),
    (lambda x: _adam(x, step=0), ValueError, "step must be an int >= 1"),
    (lambda x: _adam(x, step=[1, 2]), ValueError, "step must be one value or one per parameter \\(1\\)"),
    (lambda x: _adam(x, betas=(0.9, 1.0)), ValueError, "betas must be a pair of numbers in \\[0, 1\\)"),
    (lambda x: _adam(x, eps=-1.0), ValueError, "eps must be a number >= 0"),
    (lambda x: _adam(x, weight_decay=float("nan")), ValueError, "weight_decay must be a number >= 0"),
    (lambda x: _adam(x, maximize=1), ValueError, "maximize must be a bool"),
    (lambda x: _adam(x, views=[[(1, 4, 6)]]), ValueError, "covers 24 elements but params\\[0\\] has 20"),
    (lambda x: nmx.lion_moments([x], [[(1, 4, 5)]], [x], betas=(1.5, 0.9)), ValueError, "betas must be a pair"),
    (lambda x: nmx.lion_moments([x], [[(1, 4, 5)]], [x], [x, x]), ValueError, "exp_avgs must be None or a list"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 5))


def test_direct_op_calls_are_checked_too():
    x = torch.randn(4, 5)
    adam, lion = torch.ops.neural_mechanics_ext.adam_moments, torch.ops.neural_mechanics_ext.lion_moments
    good = [0.9, 0.999, 1e-8, 0.1, 0.001, 0.0, 0.0]
    with pytest.raises((ValueError, RuntimeError), match="7 numbers per tensor"):
        adam([x], [x], [], [], [], [0, 1, 4, 5, 0, 20], good[:6])
    with pytest.raises((ValueError, RuntimeError), match="exp_avg but no exp_avg_sq"):
        adam([x], [x], [x], [], [], [0, 1, 4, 5, 0, 20], good)
    with pytest.raises((ValueError, RuntimeError), match="out of range"):
        adam([x], [x], [], [], [], [0, 1, 4, 5, 0, 20], good[:3] + [0.0] + good[4:])
    with pytest.raises((ValueError, RuntimeError), match="beta1"):
        lion([x], [x], [], [0, 1, 4, 5, 0, 20], [1.0])


# ---- registration, torch.compile, the other CPU kernels, the fallback path ----------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    params, views, grads, states = problem(torch.float32, gen, amsgrad=True, device=device)
    get = lambda key: [s[key] for s in states]
    args = _adam_args(params, views, grads, get("exp_avg"), get("exp_avg_sq"), get("max_exp_avg_sq"), 3,
                      (0.9, 0.999), 1e-8, 0.1, False, True)
    torch.library.opcheck(torch.ops.neural_mechanics_ext.adam_moments.default, args)
    args = _lion_args(params, views, grads, None, (0.9, 0.99))
    torch.library.opcheck(torch.ops.neural_mechanics_ext.lion_moments.default, args)


def test_torch_compile():
    th, g, m, v = (torch.randn(16, 12) for _ in range(4))
    v = v.abs()
    views = [[(1, 16, 12), (16, 12, 1)]]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(th, g, m, v):
        return nmx.adam_moments([th], views, [g * 2], [m], [v], step=4), nmx.lion_moments([th], views, [g * 2], [m])

    a, b = f(th, g, m, v)
    assert torch.allclose(a, nmx.adam_moments([th], views, [g * 2], [m], [v], step=4), rtol=1e-12)
    assert torch.allclose(b, nmx.lion_moments([th], views, [g * 2], [m]), rtol=1e-12)


def moments_list():
    """adam and lion moments of a few problems: float64 ones (6 results), then float32 ones (6)."""
    out = []
    for dtype in (torch.float64, torch.float32):
        for fresh, amsgrad in ((True, False), (False, False), (False, True)):
            params, views, grads, states = problem(dtype, torch.Generator().manual_seed(11), fresh, amsgrad)
            get = lambda key: [s.get(key) for s in states]
            out.append(nmx.adam_moments(params, views, grads, get("exp_avg"), get("exp_avg_sq"),
                                        get("max_exp_avg_sq"), step=3, weight_decay=0.1, maximize=amsgrad))
            out.append(nmx.lion_moments(params, views, grads, get("exp_avg")))
    return out


SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys, warnings
    sys.path[:0] = {paths!r}
    warnings.simplefilter("ignore")
    import torch
    import neural_mechanics_ext as nmx
    from test_stream_modes import moments_list
    assert nmx.build_info().get("cpu_kernel", "none") == {isa!r}, nmx.build_info()
    torch.save(moments_list(), {out!r})
""")


def _compare_in_subprocess(tmp_path, isa, **env):
    """moments_list() in a subprocess with `env`, against this process's."""
    out = tmp_path / "moments.pt"
    here = os.path.dirname(os.path.abspath(__file__))
    script = SUBPROCESS_SCRIPT.format(paths=[here], isa=isa, out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, **env))
    for got, want, tol in zip(torch.load(out), moments_list(), [1e-13] * 6 + [FLOAT_TOL] * 6):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_cpu_kernels_agree(tmp_path, isa):
    if nmx.build_info()["cpu_kernel"] != "avx512" and isa == "avx2":
        pytest.skip("this processor has no AVX-512: its default kernel is tested already")
    _compare_in_subprocess(tmp_path, isa, NMX_CPU_ISA=isa)


def test_fallback_path_agrees_with_compiled(tmp_path):
    _compare_in_subprocess(tmp_path, "none", NMX_DISABLE_EXTENSION="1")
