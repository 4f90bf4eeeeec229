"""slice_moments: the compiled kernels against the plain-torch reference, and every way to call it wrong.

The kernel tests run on every backend of the `backend` fixture (conftest.py): the CPU kernels, the CUDA
kernels on the host SIMT emulation (every machine), and the CUDA kernels on a GPU (where there is one)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

import neural_mechanics_ext as nmx
from neural_mechanics_ext import _backend
from neural_mechanics_ext.ops import _check_inputs
from neural_mechanics_ext.reference import slice_moments_reference
from neural_mechanics_ext.views import full

from conftest import CPU, DTYPES, EMULATED, needs_emulation
from samples import LAYOUTS, sample_inputs


def reference(xs, views, ys=None, zs=None):
    return slice_moments_reference(*_check_inputs(xs, views, ys, zs))


def assert_close_to_reference(xs, views, ys=None, zs=None, op=nmx.slice_moments):
    got = op(xs, views, ys, zs)
    want = reference(xs, views, ys, zs)
    assert got.dtype == torch.float64 and got.device == (xs[0].device if xs else torch.device("cpu"))
    assert got.shape == want.shape
    # Both sum in double, in different orders: the difference is bounded by a few ulps of the sum of
    # absolute values of the terms, which is the reference applied to |x|, |y|, |z|.
    absolute = lambda ts: None if ts is None else [None if t is None else t.abs() for t in ts]
    scale = reference([x.abs() for x in xs], views, absolute(ys), absolute(zs))
    err = (got.cpu() - want.cpu()).abs()
    assert torch.all(err <= 1e-13 * scale.cpu() + 1e-300), f"max error {err.max()} at scale {scale.max()}"
    return got


@pytest.mark.parametrize("case", list(sample_inputs("cpu", DTYPES)), ids=lambda c: c[0])
def test_matches_reference_cpu(case):
    _, xs, views, ys, zs = case
    assert_close_to_reference(xs, views, ys, zs)


@needs_emulation
@pytest.mark.parametrize("case", list(sample_inputs("cpu", DTYPES)), ids=lambda c: c[0])
def test_matches_reference_cuda_emulated(case):
    _, xs, views, ys, zs = case
    assert_close_to_reference(xs, views, ys, zs, op=EMULATED.slice_moments)


@pytest.mark.cuda
def test_matches_reference_cuda():
    for _, xs, views, ys, zs in sample_inputs("cuda", DTYPES):
        assert_close_to_reference(xs, views, ys, zs)


@pytest.mark.cuda
def test_cuda_graph_capture_is_refused():
    # A captured call would replay with the addresses of the tensors it was captured with.
    x = torch.randn(8, 8, device="cuda")
    nmx.slice_moments([x], [[(1, 8, 8)]])  # plan and device tables exist before the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="slice_moments .* cannot run during CUDA graph capture"):
        with torch.cuda.graph(graph):
            nmx.slice_moments([x], [[(1, 8, 8)]])


def test_rows_are_ordered_by_tensor_view_and_slice(backend):
    x = torch.arange(12.0, device=backend.device).view(3, 4)
    out = backend.slice_moments([x, x[0].clone()], [[(1, 3, 4), (3, 4, 1)], [(1, 4, 1)]])
    sums = out[:, 0].cpu().tolist()
    assert sums == [6.0, 22.0, 38.0, 12.0, 15.0, 18.0, 21.0, 0.0, 1.0, 2.0, 3.0]
    assert out[:, 3].cpu().tolist()[:3] == [14.0, 126.0, 366.0]


def _factor_views(numel, draw):
    """Random (A, K, B) factorisations of numel."""
    divisors = [d for d in range(1, numel + 1) if numel % d == 0]
    views = []
    for _ in range(draw(st.integers(1, 3))):
        a = draw(st.sampled_from(divisors))
        rest = numel // a
        k = draw(st.sampled_from([d for d in divisors if rest % d == 0]))
        views.append((a, k, rest // k))
    return views


def _partial_views(numel, draw):
    """Random views of part of a tensor: blocks of rows or columns of a random [R, L] reading of it (what
    fused weights need), and arbitrary (A, K, B, offset, a_stride) that fit, empty ones included."""
    divisors = [d for d in range(1, numel + 1) if numel % d == 0]
    views = []
    for _ in range(draw(st.integers(1, 3))):
        L = draw(st.sampled_from(divisors))
        R = numel // L
        shape = draw(st.sampled_from(["columns", "rows", "any"]))
        if shape == "columns":  # rows [r0, r0 + A), columns [c0, c0 + K*B)
            c0 = draw(st.integers(0, L - 1))
            k = draw(st.integers(1, L - c0))
            b = draw(st.integers(1, (L - c0) // k))
            r0 = draw(st.integers(0, R - 1))
            views.append((draw(st.integers(0, R - r0)), k, b, r0 * L + c0, L))
        elif shape == "rows":  # K*B = a whole number of rows, a_stride a whole number of rows
            rows = [d for d in divisors if d <= R]
            p = draw(st.sampled_from(rows))        # rows per slice
            k = draw(st.integers(1, max(1, R // p)))
            stride = draw(st.integers(k * p, max(k * p, R)))
            a_max = 1 + (R - k * p) // stride if k * p <= R else 0
            a = draw(st.integers(0, a_max))
            r0 = draw(st.integers(0, R - ((a - 1) * stride + k * p) if a else R))
            views.append((a, k, p * L, r0 * L, stride * L))
        else:
            k = draw(st.integers(0, 5))
            b = draw(st.integers(0, max(0, numel // max(k, 1))))
            a_stride = k * b + draw(st.integers(0, 4))
            extent = lambda a: 0 if a * k * b == 0 else (a - 1) * a_stride + k * b
            a_max = 4
            while a_max > 0 and extent(a_max) > numel:
                a_max -= 1
            a = draw(st.integers(0, a_max))
            views.append((a, k, b, draw(st.integers(0, numel - extent(a))), a_stride))
    return views


@pytest.mark.parametrize("impl", [CPU, pytest.param(EMULATED, marks=needs_emulation)], ids=lambda b: b.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_partial_views_against_reference(impl, data):
    draw = data.draw
    xs, views, ys, zs = [], [], [], []
    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)))
        numel = 1
        for s in shape:
            numel *= s
        dx, dy = (draw(st.sampled_from(DTYPES)) for _ in range(2))
        xs.append(torch.randn(shape).to(dx))
        ys.append(torch.randn(shape).to(dy) if draw(st.booleans()) else None)
        zs.append(torch.randn(shape).to(dx) if draw(st.booleans()) else None)
        mixed = _partial_views(numel, draw) + (_factor_views(numel, draw) if draw(st.booleans()) else [])
        views.append(draw(st.permutations(mixed)))
    assert_close_to_reference(xs, views, ys, zs, op=impl.slice_moments)


@pytest.mark.parametrize("impl", [CPU, pytest.param(EMULATED, marks=needs_emulation)], ids=lambda b: b.name)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_against_reference(impl, data):
    draw = data.draw
    xs, views, ys, zs = [], [], [], []
    for _ in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        numel = 1
        for s in shape:
            numel *= s
        dx, dy, dz = (draw(st.sampled_from(DTYPES)) for _ in range(3))
        xs.append(torch.randn(shape).to(dx))
        ys.append(torch.randn(shape).to(dy) if draw(st.booleans()) else None)
        zs.append(torch.randn(shape).to(dz) if draw(st.booleans()) else None)
        views.append(_factor_views(numel, draw))
    assert_close_to_reference(xs, views, ys, zs, op=impl.slice_moments)


@pytest.mark.parametrize("dx", DTYPES, ids=str)
@pytest.mark.parametrize("dy", DTYPES, ids=str)
def test_every_dtype_pair(backend, dx, dy):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, 70, generator=gen).to(dx).to(backend.device)
    y = torch.randn(33, 70, generator=gen).to(dy).to(backend.device)
    z = torch.randn(33, 70, generator=gen).to(dx).to(backend.device)
    assert_close_to_reference([x], [[(1, 33, 70), (33, 70, 1)]], [y], [z], op=backend.slice_moments)


def test_more_than_2_24_elements_accumulate_in_double(backend):
    if backend is EMULATED:
        pytest.skip("2**24 elements take minutes on the emulation (its arithmetic is the GPU source's)")
    n = (1 << 24) + 17  # a float32 running sum of ones stops at 2**24
    x = torch.ones(n, device=backend.device)
    out = backend.slice_moments([x], [[(1, 1, n), (n, 1, 1)]])   # one row of n, n rows of one
    assert out[:, 0].tolist() == [n, n] and out[:, 3].tolist() == [n, n]
    w = torch.randn(4097, 4099, generator=torch.Generator().manual_seed(0)).to(backend.device)  # > 2**24, rows + columns
    assert_close_to_reference([w], [[(1, 4097, 4099), (4097, 4099, 1), (1, 1, w.numel())]], op=backend.slice_moments)


def test_nan_and_inf_stay_in_their_slices(backend):
    x = torch.randn(6, 8, device=backend.device)
    y = torch.randn(6, 8, device=backend.device)
    x[2, 5] = float("nan")
    y[4, 1] = float("inf")
    out = backend.slice_moments([x], [[(1, 6, 8)]], ys=[y]).cpu()
    finite = out.isfinite()
    assert not finite[2, [0, 3, 6]].any() and finite[2, [1, 4]].all()   # x, xx, xy of row 2
    assert not finite[4, [1, 4, 6]].any() and finite[4, [0, 3]].all()   # y, yy, xy of row 4
    assert finite[[0, 1, 3, 5]].all()


def test_moments_with_an_absent_factor_are_zero_even_next_to_nan(backend):
    # An absent y or z is not measured: its moments are 0, not NaN * 0, on every implementation.
    x = torch.randn(4, 8, device=backend.device)
    x[1, 3] = float("nan")
    y = torch.randn(4, 8, device=backend.device)
    for ys, zs, zero_cols in ((None, None, [1, 2, 4, 5, 6, 7, 8]), ([y], None, [2, 5, 7, 8]), (None, [y], [1, 4, 6, 8])):
        for out in (backend.slice_moments([x], [[(1, 4, 8)]], ys, zs).cpu(),
                    reference([x], [[(1, 4, 8)]], ys, zs).cpu()):
            assert out[:, zero_cols].eq(0).all()
            assert out[1, [0, 3]].isnan().all() and out[[0, 2, 3]].isfinite().all()


def test_empty(backend):
    assert backend.slice_moments([], []).shape == (0, 9)
    e = torch.empty(0, 5, device=backend.device)
    out = backend.slice_moments([e, torch.ones(2, device=backend.device)], [[(0, 5, 1), (1, 0, 0)], [(1, 2, 1)]])
    assert out.shape == (7, 9) and out[:5].abs().sum() == 0 and out[5:, 0].tolist() == [1.0, 1.0]


def test_non_contiguous_inputs_follow_logical_order(backend):
    base = torch.randn(20, 30, device=backend.device)
    x = base.t()               # [30, 20], non-contiguous
    y = torch.randn(60, 20, device=backend.device)[::2]  # strided rows
    got = assert_close_to_reference([x], [[(1, 30, 20), (30, 20, 1)]], [y], op=backend.slice_moments)
    want = backend.slice_moments([x.contiguous()], [[(1, 30, 20), (30, 20, 1)]], [y.contiguous()])
    assert torch.equal(got, want)


def test_deterministic(backend):
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=gen).to(backend.device) for s in [(300, 700), (64, 3, 3, 3), (1000,)]]
    views = [[(1, 300, 700), (300, 700, 1)], [(1, 64, 27), (64, 3, 9)], [(1, 1, 1000)]]
    ys = [torch.randn_like(x) for x in xs]
    first = backend.slice_moments(xs, views, ys, ys)
    for _ in range(3):
        assert torch.equal(backend.slice_moments(xs, views, ys, ys), first)


def test_inputs_requiring_grad_are_fine():
    p = torch.nn.Parameter(torch.randn(4, 5))
    out = nmx.slice_moments([p], [[(1, 4, 5)]])
    assert not out.requires_grad


# ---- the plan: one read of each tensor, also with views of parts of it ---------------------------------
def _plan(numels, views):
    """csrc/plan.h's plan of a call: entries (tensor, R, L), views (kind, first row), elements read."""
    return _backend._C.plan_summary(numels, [x for t, vs in enumerate(views) for v in vs for x in (t, *full(v))])


@pytest.mark.skipif(not _backend.compiled, reason="the plan is the compiled op's")
def test_partial_views_keep_one_read_per_tensor():
    E = 64
    # GPT-2 c_attn [E, 3E]: rows, the Q, K, V column blocks and the whole tensor share the layout [E, 3E].
    plan = _plan([3 * E * E], [[(1, E, 3 * E), (E, E, 1, 0, 3 * E), (E, E, 1, E, 3 * E), (E, E, 1, 2 * E, 3 * E),
                                (1, 1, 3 * E * E)]])
    assert plan["entries"] == [(0, E, 3 * E)] and plan["elements_read"] == 3 * E * E
    assert [k for k, _ in plan["views"]] == ["run", "run", "col", "col", "col"]
    # in_proj_weight [3E, E], Q and K rows: one entry, and the V rows, which no view needs, are not read.
    plan = _plan([3 * E * E], [[(1, E, E, 0, E * E), (1, E, E, E * E, E * E)]])
    assert plan["entries"] == [(0, 3 * E, E)] and plan["elements_read"] == 2 * E * E
    # Llama o_proj [E, 4 heads * 16]: the columns of every head and the rows, one read.
    plan = _plan([E * E], [[(E, 16, 1, 16 * h, E) for h in range(4)] + [(1, E, E)]])
    assert plan["entries"] == [(0, E, E)] and plan["elements_read"] == E * E
    # RoPE pairs of q_proj [4 heads * 16, E] for 2 kv heads: RUN views with gaps, one read.
    plan = _plan([E * E], [[(4, 8, E, g * 2 * 16 * E, 8 * E) for g in range(2)] + [(1, E, E)]])
    assert plan["entries"] == [(0, E, E)] and [k for k, _ in plan["views"]] == ["run"] * 3
    # Views with no layout in common still need two reads: (2, 2, 3) and (3, 2, 2) of 12 elements.
    assert len(_plan([12], [[(2, 2, 3), (3, 2, 2)]])["entries"]) == 2


# ---- bad input: a clear Python exception naming the problem -------------------------------------------
BAD = [
    (lambda x: nmx.slice_moments(x, [[(1, 4, 5)]]), TypeError, "list or tuple of tensors"),
    (lambda x: nmx.slice_moments([x, x], [[(1, 4, 5)]]), ValueError, "one sequence of"),
    (lambda x: nmx.slice_moments([x], [(1, 4, 5)]), ValueError, "wrap a single view"),
    (lambda x: nmx.slice_moments([x], [[(1, 4, 6)]]), ValueError, "covers 24 elements but xs\\[0\\] has 20"),
    (lambda x: nmx.slice_moments([x], [[(-1, -4, 5)]]), ValueError, "negative size"),
    (lambda x: nmx.slice_moments([x], [[(1, 4)]]), ValueError, "is not \\(A, K, B\\) or \\(A, K, B, offset, a_stride\\)"),
    (lambda x: nmx.slice_moments([x], [[(1, 4, 1.5)]]), ValueError, "of integers"),
    (lambda x: nmx.slice_moments([x], [(2, 2, 5, 0, 10)]), ValueError, "wrap a single view"),
    (lambda x: nmx.slice_moments([x], [[(1, 4, 5), (2, 2, 1, -1, 5)]]), ValueError,
     "views\\[0\\]\\[1\\] = \\(2, 2, 1, -1, 5\\) has a negative offset"),
    (lambda x: nmx.slice_moments([x], [[(2, 2, 1, 0, -5)]]), ValueError, "negative offset or a_stride"),
    (lambda x: nmx.slice_moments([x], [[(2, 2, 3, 0, 5)]]), ValueError, "a_stride 5 < K\\*B = 6"),
    (lambda x: nmx.slice_moments([x], [[(2, 2, 5, 12, 10)]]), ValueError,
     "views\\[0\\]\\[0\\] = \\(2, 2, 5, 12, 10\\) runs past the end of xs\\[0\\]: it reaches flat index 31"),
    (lambda x: nmx.slice_moments([x], [[(0, 2, 5, 21, 10)]]), ValueError, "runs past the end"),
    (lambda x: nmx.slice_moments([x], [[(1, 4, 5)]], ys=[x, x]), ValueError, "ys must be None or a list with one entry"),
    (lambda x: nmx.slice_moments([x], [[(1, 4, 5)]], ys=[x.t()]), ValueError, "ys\\[0\\] has shape \\(5, 4\\)"),
    (lambda x: nmx.slice_moments([x], [[(1, 4, 5)]], zs=[3.0]), TypeError, "zs\\[0\\] is a float"),
    (lambda x: nmx.slice_moments([x.long()], [[(1, 4, 5)]]), TypeError, "xs\\[0\\] has dtype torch.int64"),
    (lambda x: nmx.slice_moments([x], [[(1, 4, 5)]], ys=[x.to(torch.complex64)]), TypeError, "ys\\[0\\] has dtype"),
    (lambda x: nmx.slice_moments([x, x.to("meta")], [[(1, 4, 5)], [(1, 4, 5)]]), ValueError, "one device"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 5))


def test_direct_op_call_is_checked_too():
    op = torch.ops.neural_mechanics_ext.slice_moments
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="6-tuples"):
        op([x], [], [], [0, 1, 4, 5])
    with pytest.raises(IndexError, match="view 0 names tensor 1 of 1"):
        op([x], [], [], [1, 1, 4, 5, 0, 20])
    # The op's table is (tensor, A, K, B, offset, a_stride); every error names the view.
    for view, match in [((-1, 4, 5, 0, 20), "has a negative size"),
                        ((2, 2, 1, -1, 5), "has a negative offset or a_stride"),
                        ((2, 2, 1, 0, -5), "has a negative offset or a_stride"),
                        ((2, 2, 3, 0, 5), "a_stride < K\\*B = 6, so its rows a overlap"),
                        ((2, 2, 5, 12, 10), "runs past the end of the tensor \\(20 elements\\)"),
                        ((1, 4, 5, 1, 20), "runs past the end"),
                        ((0, 4, 5, 21, 20), "runs past the end"),
                        ((1 << 40, 1 << 40, 1, 0, 1 << 40), "too large"),
                        ((3, 1, 1, 0, 1 << 62), "runs past the end")]:
        text = ", ".join(str(v) for v in view)
        with pytest.raises(ValueError, match=f"view \\(A, K, B, offset, a_stride\\) = \\({text}\\) of xs\\[0\\].*{match}"):
            op([x], [], [], [0, *view])
    # A prefix (A, K, B, 0, K*B) of a tensor is valid for the op (the wrapper's (A, K, B) must cover it).
    assert torch.allclose(op([x], [], [], [0, 1, 2, 5, 0, 10])[:, 0], x.flatten()[:10].double().view(2, 5).sum(1))


# ---- registration, torch.compile, the fallback path ---------------------------------------------------
def test_opcheck(device):
    for _, xs, views, ys, zs in list(sample_inputs(device))[:3]:
        args = _check_inputs(xs, views, ys, zs)
        torch.library.opcheck(torch.ops.neural_mechanics_ext.slice_moments.default, args)


def test_torch_compile(device):
    x = torch.randn(16, 12, device=device)
    g = torch.randn(16, 12, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, g):
        return nmx.slice_moments([x * 2], [[(1, 16, 12), (16, 12, 1)]], ys=[g])

    assert torch.allclose(f(x, g), nmx.slice_moments([x * 2], [[(1, 16, 12), (16, 12, 1)]], ys=[g]), rtol=1e-12)


def test_build_info():
    info = nmx.build_info()
    for key in ("version", "torch", "cuda", "cuda_arch", "cuda_emulated", "openmp", "compiled"):
        assert key in info
    if info["compiled"] and info["cuda"]:
        assert info["cuda_arch"]
    if info["compiled"] and os.name == "posix":  # setup.py and CMake build the emulation on every POSIX system
        assert info["cuda_emulated"] is True


FALLBACK_SCRIPT = textwrap.dedent("""
    import warnings, torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import neural_mechanics_ext as nmx
        import neural_mechanics_ext.ops
    assert nmx.build_info()["compiled"] is False
    messages = [str(w.message) for w in caught if "compiled extension" in str(w.message)]
    assert len(messages) == 1 and "pip install --no-build-isolation" in messages[0], messages
    torch.manual_seed(0)
    x = torch.randn(30, 40); g = torch.randn(30, 40)
    torch.save(nmx.slice_moments([x], [[(1, 30, 40), (30, 40, 1)]], ys=[g]), {out!r})
""")


NARROW_KERNEL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = {paths!r}
    import neural_mechanics_ext as nmx
    from conftest import CPU, DTYPES, EMULATED, needs_emulation
    from samples import sample_inputs
    from test_slice_moments import assert_close_to_reference
    assert nmx.build_info()["cpu_kernel"] == {isa!r}, nmx.build_info()
    for name, xs, views, ys, zs in sample_inputs("cpu", DTYPES):
        assert_close_to_reference(xs, views, ys, zs)
""")


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_cpu_kernels_match_reference(isa):
    # The machine runs its widest kernel; the others are compiled in and must be right too.
    if nmx.build_info()["cpu_kernel"] != "avx512" and isa == "avx2":
        pytest.skip("this processor has no AVX-512: its default kernel is tested already")
    env = dict(os.environ, NMX_CPU_ISA=isa)
    here = os.path.dirname(os.path.abspath(__file__))
    script = NARROW_KERNEL_SCRIPT.format(paths=[here], isa=isa)
    subprocess.run([sys.executable, "-c", script], check=True, env=env)


def test_fallback_path_agrees_with_compiled(tmp_path):
    out = tmp_path / "fallback.pt"
    env = dict(os.environ, NMX_DISABLE_EXTENSION="1")
    subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT.format(out=str(out))], check=True, env=env)
    torch.manual_seed(0)
    x = torch.randn(30, 40)
    g = torch.randn(30, 40)
    ours = nmx.slice_moments([x], [[(1, 30, 40), (30, 40, 1)]], ys=[g])
    assert torch.allclose(torch.load(out), ours, rtol=1e-13, atol=1e-12)
