"""Unit tests of neural_mechanics_ext.theory against independent computations (no trained network).

* a property test: random exactly-symmetric gradients, real torch.optim.SGD with settings that change at
  every step (momentum on/off, dampening, Nesterov, weight decay, lr), exact integrator within 1e-10;
* the exact recursion never reads the symmetry-violating columns (THEORY §4: it must not use xy or y);
* state_dict round trips; derived quantities (angular update vs the real step, equilibrium norm vs
  iterating the recursion, time); argument checks.
"""
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neural_mechanics_ext import MOMENTS
from neural_mechanics_ext.theory import (ExactIntegrator, PaperIntegrator, StepHyper, angular_update, effective_lr,
                                         equilibrium_norm, time_elapsed)

COLS = ("x", "y", "z", "xx", "yy", "zz", "xy", "xz", "yz")
I = {c: i for i, c in enumerate(COLS)}


def test_moment_columns_are_the_package_layout():
    assert tuple(MOMENTS) == COLS


# ----------------------------------------------------------------------------------------------------
# groups made of explicit vectors; moments computed the obvious way
# ----------------------------------------------------------------------------------------------------
def group_moments(parts):
    """parts: list over groups of [(θ, g, v, sign), ...] -> [G, 9] in COLS order (signed sums)."""
    rows = []
    for members in parts:
        row = torch.zeros(9, dtype=torch.float64)
        for th, g, v, sgn in members:
            vals = {"x": th, "y": g, "z": v, "xx": th * th, "yy": g * g, "zz": v * v, "xy": th * g, "xz": th * v,
                    "yz": g * v}
            row += sgn * torch.stack([vals[c].sum() for c in COLS])
        rows.append(row)
    return torch.stack(rows)


SIZES = {"scale": [(6, +1)], "translation": [(5, +1)], "rescale": [(4, +1), (3, -1)]}


def symmetric_gradient(kind, thetas, gen):
    """A random gradient of one group satisfying the group's constraint exactly (THEORY §1.1)."""
    g = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in thetas]
    if kind == "translation":
        return [gi - gi.mean() for gi in g]
    signs = [s for _, s in SIZES[kind]]
    w = torch.cat([s * t for s, t in zip(signs, thetas)])  # θ_A, or (θ_A1, −θ_A2)
    flat = torch.cat(g)
    flat = flat - (flat @ w) / (w @ w) * w
    return list(flat.split([t.numel() for t in thetas]))


step_setting = st.tuples(
    st.sampled_from([0.01, 0.1, 0.3]),  # lr
    st.sampled_from([0.0, 0.5, 0.9]),  # momentum
    st.sampled_from([0.0, 0.3]),  # dampening
    st.sampled_from([0.0, 1e-3, 0.05]),  # weight decay
    st.booleans(),  # nesterov
)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["scale", "translation", "rescale"]), schedule=st.lists(step_setting, min_size=1,
       max_size=25), seed=st.integers(0, 2 ** 31 - 1))
def test_exact_matches_torch_sgd_with_arbitrary_per_step_settings(kind, schedule, seed):
    gen = torch.Generator().manual_seed(seed)
    G = 3
    params = [[torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n, _ in SIZES[kind]]
              for _ in range(G)]
    signs = [s for _, s in SIZES[kind]]
    opt = torch.optim.SGD([p for grp in params for p in grp], lr=0.1)
    value_col = "x" if kind == "translation" else "xx"
    integ, emp, pred = None, [], []
    for lr, beta, damp, wd, nest in schedule:
        grads = [symmetric_gradient(kind, [p.detach() for p in grp], gen) for grp in params]
        for grp, gs in zip(params, grads):
            for p, gi in zip(grp, gs):
                p.grad = gi.clone()
        pg = opt.param_groups[0]
        pg.update(lr=lr, momentum=beta, dampening=damp, weight_decay=wd, nesterov=nest)
        bufs = [[opt.state[p].get("momentum_buffer") for p in grp] for grp in params]
        first = bufs[0][0] is None
        bufs = [[torch.zeros_like(p) if b is None else b.clone() for p, b in zip(grp, bs)]
                for grp, bs in zip(params, bufs)]
        M = group_moments([[(p.detach().clone(), gi, b, s) for p, gi, b, s in zip(grp, gs, bs, signs)]
                           for grp, gs, bs in zip(params, grads, bufs)])
        if integ is None:
            integ = ExactIntegrator(kind, M)
        emp.append(M[:, I[value_col]])
        pred.append(integ.prediction())
        integ.advance(StepHyper(lr, beta, damp, wd, nest, first), M)
        opt.step()
    zero = [[torch.zeros_like(p) for p in grp] for grp in params]
    last = group_moments([[(p.detach(), z, z, s) for p, z, s in zip(grp, zs, signs)] for grp, zs in zip(params, zero)])
    emp.append(last[:, I[value_col]])
    pred.append(integ.prediction())
    scale = max(max(e.abs().max().item() for e in emp), 1.0)
    err = max((p - e).abs().max().item() for p, e in zip(pred, emp)) / scale
    assert err < 1e-10


# ----------------------------------------------------------------------------------------------------
# the recursion must not read the symmetry-violating columns
# ----------------------------------------------------------------------------------------------------
def random_moment_sequence(K, G=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Ms = torch.randn(K, G, 9, generator=gen, dtype=torch.float64)
    for c in ("xx", "yy", "zz"):
        Ms[:, :, I[c]] = Ms[:, :, I[c]].abs()
    return Ms


def run(integ, Ms, hps):
    out = [integ.prediction()]
    for M, hp in zip(Ms, hps):
        integ.advance(hp, M)
        out.append(integ.prediction())
    return torch.stack(out)


HPS = [StepHyper(0.1, 0.9, 0.1, 1e-2, False, k == 0) for k in range(20)] + \
      [StepHyper(0.05, 0.9, 0.0, 5e-2, True, False) for _ in range(10)] + \
      [StepHyper(0.1, 0.0, 0.0, 1e-2) for _ in range(10)]


@pytest.mark.parametrize("kind", ["scale", "rescale", "translation"])
def test_exact_ignores_symmetry_violating_columns(kind):
    """Drivers are only yy = |g|²_A and yz = ⟨v,g⟩_A (translation: none).  Junk in every other column of the
    per-step moments, in particular a nonzero xy = ⟨θ,g⟩_A or y = Σ_A g, must not change the prediction."""
    Ms = random_moment_sequence(len(HPS))
    used = {"translation": (), "scale": ("yy", "yz"), "rescale": ("yy", "yz")}[kind]
    junk = Ms.clone()
    gen = torch.Generator().manual_seed(1)
    for c in COLS:
        if c not in used:
            junk[:, :, I[c]] = 1e3 * torch.randn(junk.shape[:2], generator=gen, dtype=torch.float64)
    assert (junk[:, :, I["xy"]] != 0).all() and (junk[:, :, I["y"]] != 0).all()
    a = run(ExactIntegrator(kind, Ms[0]), Ms, HPS)
    b = run(ExactIntegrator(kind, Ms[0]), junk, HPS)
    assert torch.equal(a, b)
    if used:  # and the drivers it does use matter
        drv = Ms.clone()
        drv[:, :, I["yy"]] *= 2
        assert not torch.allclose(run(ExactIntegrator(kind, Ms[0]), drv, HPS), a)


# ----------------------------------------------------------------------------------------------------
# state_dict
# ----------------------------------------------------------------------------------------------------
FACTORIES = [("exact", kind, lambda k, M: ExactIntegrator(k, M)) for kind in ("scale", "rescale", "translation")] + \
    [(variant, kind, (lambda v: lambda k, M: PaperIntegrator(k, M, variant=v))(variant))
     for variant in ("paper", "modified") for kind in ("scale", "rescale", "translation")]


@pytest.mark.parametrize("name,kind,make", FACTORIES, ids=[f"{n}-{k}" for n, k, _ in FACTORIES])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_round_trip(name, kind, make, momentum):
    K = 100
    Ms = random_moment_sequence(K, seed=3)
    Ms[:, :, I["xz"]] *= 0.1
    hps = [StepHyper(0.05 + 0.001 * k, momentum, 0.1, 1e-2 if k < 70 else 3e-2, False, k == 0) for k in range(K)]
    whole = make(kind, Ms[0])
    full = run(whole, Ms, hps)
    first = make(kind, Ms[0])
    run(first, Ms[:50], hps[:50])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    fresh = make(kind, Ms[7])  # built from other moments: everything must come from the state_dict
    fresh.load_state_dict(torch.load(buf))
    rest = run(fresh, Ms[50:], hps[50:])
    assert torch.equal(rest, full[50:])
    assert torch.isfinite(full).all()


def test_load_state_dict_rejects_other_kind():
    M = random_moment_sequence(1)[0]
    with pytest.raises(ValueError):
        ExactIntegrator("scale", M).load_state_dict(ExactIntegrator("rescale", M).state_dict())
    with pytest.raises(ValueError):
        PaperIntegrator("scale", M).load_state_dict(PaperIntegrator("scale", M, "modified").state_dict())


def test_argument_checks():
    M = random_moment_sequence(1)[0]
    with pytest.raises(ValueError):
        ExactIntegrator("shift", M)
    with pytest.raises(ValueError):
        PaperIntegrator("scale", M, variant="exact")
    with pytest.raises(ValueError):
        ExactIntegrator("scale", M[:, :8])
    e = ExactIntegrator("scale", M)
    with pytest.raises(ValueError):
        e.advance(StepHyper(0.1), M[:2])
    f32 = ExactIntegrator("scale", M.float())
    assert f32.prediction().dtype == torch.float64


def test_paper_nesterov_is_unsupported_and_nan():
    Ms = random_moment_sequence(5)
    p = PaperIntegrator("scale", Ms[0])
    p.advance(StepHyper(0.1, 0.9, weight_decay=1e-2), Ms[0])
    assert p.unsupported is None and torch.isfinite(p.prediction()).all()
    p.advance(StepHyper(0.1, 0.9, nesterov=True, first_step=False), Ms[1])
    assert "Nesterov" in p.unsupported
    p.advance(StepHyper(0.1, 0.9, first_step=False), Ms[2])  # sticky: the run has seen Nesterov
    assert torch.isnan(p.prediction()).all()


# ----------------------------------------------------------------------------------------------------
# derived quantities
# ----------------------------------------------------------------------------------------------------
def kahan_angle(a, b):
    """Angle between vectors, accurate for tiny angles (W. Kahan)."""
    ua, ub = a / a.norm(), b / b.norm()
    return 2 * torch.atan2((ua - ub).norm(), (ua + ub).norm())


@pytest.mark.parametrize("hp", [
    StepHyper(0.1),
    StepHyper(0.1, weight_decay=0.05),
    StepHyper(0.1, 0.9, weight_decay=1e-2, first_step=True),
    StepHyper(0.05, 0.9, 0.2, 1e-2, first_step=False),
    StepHyper(0.05, 0.9, 0.0, 1e-2, nesterov=True, first_step=False),
    StepHyper(0.05, 0.9, 0.0, 1e-2, nesterov=True, first_step=True),
], ids=["sgd", "wd", "mom-first", "mom-damp", "nesterov", "nesterov-first"])
def test_angular_update_matches_real_torch_step(hp):
    """Groups are separate parameters with generic (non-symmetric) θ, g, v; the angle is measured on θ_k and
    θ_{k+1} produced by torch.optim.SGD itself."""
    gen = torch.Generator().manual_seed(5)
    G = 5
    ps = [torch.nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64)) for _ in range(G)]
    opt = torch.optim.SGD(ps, lr=hp.lr, momentum=hp.momentum, dampening=hp.dampening,
                          weight_decay=hp.weight_decay, nesterov=hp.nesterov)
    parts = []
    for i, p in enumerate(ps):
        p.grad = (0.1 * (i + 1)) * torch.randn(7, generator=gen, dtype=torch.float64)
        v = torch.zeros(7, dtype=torch.float64)
        if hp.momentum and not hp.first_step:
            v = torch.randn(7, generator=gen, dtype=torch.float64)
            opt.state[p]["momentum_buffer"] = v.clone()
        parts.append([(p.detach().clone(), p.grad.clone(), v, +1)])
    before = [p.detach().clone() for p in ps]
    M = group_moments(parts)
    opt.step()
    expected = torch.stack([kahan_angle(b, p.detach()) for b, p in zip(before, ps)])
    got = angular_update(M, hp)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-15)


def test_effective_lr():
    n = torch.tensor([4.0, 0.5], dtype=torch.float64)
    assert torch.equal(effective_lr(0.1, n), torch.tensor([0.1 / 4.0, 0.1 / 0.5], dtype=torch.float64))


@pytest.mark.parametrize("eta,lam,G_hat", [(0.1, 1e-2, 3.0), (0.5, 5e-4, 0.2), (1.0, 0.3, 1.0)])
def test_equilibrium_norm_sgd_is_fixed_point_of_the_exact_map(eta, lam, G_hat):
    """THEORY §4.1: iterate n' = (1−ηλ)² n + η² Ĝ/n (scale invariance |g|² = Ĝ/n) to convergence."""
    n = 1.0
    for _ in range(200000):
        n = (1 - eta * lam) ** 2 * n + eta ** 2 * G_hat / n
    assert equilibrium_norm(eta, lam, G_hat).item() == pytest.approx(n, rel=1e-12)
    assert equilibrium_norm(eta, lam, G_hat).item() == pytest.approx(math.sqrt(eta * G_hat / (2 * lam)),
                                                                      rel=eta * lam)  # §3(b), 1st order


@pytest.mark.parametrize("eta,lam,beta,damp", [(0.1, 1e-2, 0.9, 0.0), (0.05, 5e-2, 0.8, 0.1), (0.1, 1e-3, 0.5, 0.0)])
def test_equilibrium_norm_momentum_is_fixed_point_of_full_form(eta, lam, beta, damp):
    """THEORY §4.2 full form with a = Ĝ/n and b = ⟨v,g⟩ = 0 (the documented assumption), iterated here."""
    G_hat, c = 2.0, 1 - damp
    n, q, m = 1.0, 0.0, 0.0
    for _ in range(200000):
        a = G_hat / n
        m = beta ** 2 * m + c ** 2 * a + c ** 2 * lam ** 2 * n + 2 * beta * c * lam * q
        n, q = n - 2 * eta * (beta * q + c * lam * n) + eta ** 2 * m, beta * q + c * lam * n - eta * m
    assert equilibrium_norm(eta, lam, G_hat, momentum=beta, dampening=damp).item() == pytest.approx(n, rel=1e-10)


def test_equilibrium_norm_vectorised():
    G = torch.tensor([1.0, 4.0], dtype=torch.float64)
    out = equilibrium_norm(0.1, 1e-2, G)
    assert out.shape == (2,) and out[1].item() == pytest.approx(2 * out[0].item(), rel=1e-15)


def test_time_elapsed():
    hps = [StepHyper(0.1), StepHyper(0.2, 0.9, 0.5), StepHyper(0.3, 0.9)]
    assert torch.allclose(time_elapsed(hps), torch.tensor([0.0, 0.1, 0.2, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["scale", "rescale", "translation"])
def test_state_does_not_alias_the_callers_moments(kind):
    """λ = 0, momentum 0: n' = n + η²·yy has a coefficient-1 term; a tracker that reuses its moment buffer
    in place after advance() must not change the integrators' state."""
    Ms = random_moment_sequence(3)
    hp = StepHyper(1.0)  # η = 1, λ = 0
    for make in (lambda: ExactIntegrator(kind, Ms[0].clone()),
                 lambda: PaperIntegrator(kind, Ms[0].clone()),
                 lambda: PaperIntegrator(kind, Ms[0].clone(), "modified")):
        buf = Ms[0].clone()
        integ = make()
        integ.advance(hp, buf)
        before = integ.prediction().clone()
        buf.fill_(7.0)
        assert torch.equal(integ.prediction(), before)
        integ.advance(StepHyper(1.0, 0.9), Ms[1])
        before = {k: v.clone() for k, v in integ.state_dict().items() if isinstance(v, torch.Tensor)}
        Ms[1].fill_(3.0)
        after = {k: v for k, v in integ.state_dict().items() if isinstance(v, torch.Tensor)}
        assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------------
# device-agnostic and free of host synchronisation
# ----------------------------------------------------------------------------------------------------
class NoHostSync(torch.overrides.TorchFunctionMode):
    """Fails on every tensor method that copies a value to the host (a device sync on an accelerator)."""

    SYNCING = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.SYNCING:
            raise AssertionError(f"host sync inside advance/prediction: Tensor.{name}")
        return func(*args, **(kwargs or {}))


SYNC_HPS = [StepHyper(0.1, 0.9, 0.1, 1e-2, False, True), StepHyper(0.1, 0.9, 0.1, 1e-2, False, False),
            StepHyper(0.05, 0.0, 0.0, 1e-2), StepHyper(0.05, 0.9, 0.0, 5e-2, True, False), StepHyper(0.0, 0.9)]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kind", ["scale", "rescale", "translation"])
def test_integrators_are_device_agnostic_and_never_sync(kind, device):
    """On the meta device any host read fails and any CPU-made tensor mixed in fails too; the mode catches
    the syncing methods on CPU.  Covers SGD, momentum, first step, Nesterov (paper: unsupported) and η = 0."""
    Ms = random_moment_sequence(len(SYNC_HPS)).to(device)
    integs = [ExactIntegrator(kind, Ms[0]), PaperIntegrator(kind, Ms[0]), PaperIntegrator(kind, Ms[0], "modified")]
    with NoHostSync():
        for integ in integs:
            for hp, M in zip(SYNC_HPS, Ms):
                integ.advance(hp, M)
                pred = integ.prediction()
                assert pred.device.type == device and pred.dtype == torch.float64 and pred.shape == (4,)
        f = angular_update(Ms[0], SYNC_HPS[1])
        assert f.device.type == device
