"""Integrators on real float64 torch models with exact symmetries, trained with torch.optim.SGD.

Models (THEORY §1.2, §7.4: BN eps = 0 in train mode, float64, one weight decay for every parameter; torch
2.14 refuses eps = 0 in training, so BN gets eps = 1e-300, which vanishes against var ~ 1 in float64:
var + eps == var bitwise, i.e. the same numbers as eps = 0):
  bn:  Linear(D,H) -> BatchNorm1d(H, eps=0) -> ReLU -> Linear(H,C) -> cross-entropy
       scale {W1[k,:], b1[k]}; translation W2[:,j]; translation b2 (one group); translation b1[k] (zero grad);
       rescale {γ_k, β_k} vs W2[:,k]
  mlp: Linear(D,H) -> LeakyReLU(0.1) -> Linear(H,C) -> cross-entropy
       rescale {W1[k,:], b1[k]} vs W2[:,k]; translation W2[:,j]; translation b2
The per-group moments are computed here with plain torch reductions per parameter, from θ, p.grad and
optimizer.state[p]["momentum_buffer"] read right before optimizer.step().  Error metric (THEORY / DESIGN
§3): max over steps and groups of |pred − emp| / max over steps and groups of the group magnitude.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neural_mechanics_ext.theory import ExactIntegrator, PaperIntegrator, StepHyper

COLS = ("x", "y", "z", "xx", "yy", "zz", "xy", "xz", "yz")
I = {c: i for i, c in enumerate(COLS)}
D, H, C, N = 10, 8, 4, 256
BN_EPS = 1e-300  # == 0 in float64 next to a batch variance of order 1 (see the module docstring)

rows = lambda t: t.sum(1)  # noqa: E731   W[k, :]
cols = lambda t: t.sum(0)  # noqa: E731   W[:, k]
each = lambda t: t  # noqa: E731          b[k]
whole = lambda t: t.sum().reshape(1)  # noqa: E731


def make_data(seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    T = torch.randn(D, C, generator=gen, dtype=torch.float64)
    y = (X @ T + 0.5 * torch.randn(N, C, generator=gen, dtype=torch.float64)).argmax(1)
    return X, y


def bn_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H, eps=BN_EPS), nn.ReLU(), nn.Linear(H, C)).double()
    with torch.no_grad():
        model[0].bias.copy_(0.5 * torch.randn(H))
        model[1].weight.copy_(1 + 0.3 * torch.randn(H))
        model[1].bias.copy_(0.3 * torch.randn(H))
    families = {
        "scale W1[k]+b1[k]": ("scale", [("0.weight", rows, +1), ("0.bias", each, +1)]),
        "translation W2[:,j]": ("translation", [("3.weight", cols, +1)]),
        "translation b2": ("translation", [("3.bias", whole, +1)]),
        "translation b1[k]": ("translation", [("0.bias", each, +1)]),
        "rescale (γ,β)[k] vs W2[:,k]": ("rescale", [("1.weight", each, +1), ("1.bias", each, +1),
                                                      ("3.weight", cols, -1)]),
    }
    return model, families


def mlp_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, H), nn.LeakyReLU(0.1), nn.Linear(H, C)).double()
    with torch.no_grad():
        model[0].bias.copy_(0.3 * torch.randn(H))
    families = {
        "rescale {W1[k],b1[k]} vs W2[:,k]": ("rescale", [("0.weight", rows, +1), ("0.bias", each, +1),
                                                          ("2.weight", cols, -1)]),
        "translation W2[:,j]": ("translation", [("2.weight", cols, +1)]),
        "translation b2": ("translation", [("2.bias", whole, +1)]),
    }
    return model, families


MODELS = {"bn": bn_model, "mlp": mlp_model}


def family_moments(members, th, g, v):
    pairs = {"x": (th, None), "y": (g, None), "z": (v, None), "xx": (th, th), "yy": (g, g), "zz": (v, v),
             "xy": (th, g), "xz": (th, v), "yz": (g, v)}
    out = []
    for c in COLS:
        a, b = pairs[c]
        out.append(sum(sgn * red(a[name] if b is None else a[name] * b[name]) for name, red, sgn in members))
    return torch.stack(out, 1)


def family_magnitude(kind, members, th):
    unsigned = sum(red(th[name] ** 2) for name, red, _ in members)
    if kind == "translation":
        s = sum(red(th[name]) for name, red, _ in members)
        return torch.maximum(s.abs(), unsigned.sqrt())
    return unsigned  # n for scale, |θ_A1|² + |θ_A2|² for rescale


class Run:
    """Per family: moments [K+1, G, 9] (last row: θ_K only), magnitudes [K+1, G]; hps [K]; v_next_sq [K, G]."""

    def __init__(self, model, K, batch=32, seed=0, schedule=None, on_step=None, **sgd):
        net, fams = MODELS[model](seed)
        X, y = make_data(seed + 1)
        opt = torch.optim.SGD(net.parameters(), **sgd)
        sched = schedule(opt) if schedule else None
        gen = torch.Generator().manual_seed(seed + 2)
        params = dict(net.named_parameters())
        self.kinds = {name: kind for name, (kind, _) in fams.items()}
        Ms = {name: [] for name in fams}
        mags = {name: [] for name in fams}
        vsq = {name: [] for name in fams}
        self.hps = []
        net.train()
        for k in range(K):
            if on_step:
                on_step(opt, k)
            idx = torch.randperm(N, generator=gen)[:batch] if batch else torch.arange(N)
            opt.zero_grad()
            F.cross_entropy(net(X[idx]), y[idx]).backward()
            pg = opt.param_groups[0]
            th = {n: p.detach().clone() for n, p in params.items()}
            g = {n: p.grad.detach().clone() for n, p in params.items()}
            bufs = {n: opt.state[p].get("momentum_buffer") for n, p in params.items()}
            v = {n: torch.zeros_like(p) if bufs[n] is None else bufs[n].clone() for n, p in params.items()}
            first = pg["momentum"] != 0 and all(b is None for b in bufs.values())
            self.hps.append(StepHyper(pg["lr"], pg["momentum"], pg["dampening"], pg["weight_decay"], pg["nesterov"],
                                      first))
            for name, (kind, members) in fams.items():
                Ms[name].append(family_moments(members, th, g, v))
                mags[name].append(family_magnitude(kind, members, th))
            opt.step()
            if pg["momentum"] != 0:  # |v_{k+1}|²_A straight from torch's buffer after the step
                vn = {n: opt.state[p]["momentum_buffer"] for n, p in params.items()}
                for name, (_, members) in fams.items():
                    vsq[name].append(sum(sgn * red(vn[n] * vn[n]) for n, red, sgn in members))
            if sched:
                sched.step()
        th = {n: p.detach().clone() for n, p in params.items()}
        zero = {n: torch.zeros_like(p) for n, p in params.items()}
        for name, (kind, members) in fams.items():
            Ms[name].append(family_moments(members, th, zero, zero))
            mags[name].append(family_magnitude(kind, members, th))
        self.M = {name: torch.stack(m) for name, m in Ms.items()}
        self.mag = {name: torch.stack(m) for name, m in mags.items()}
        self.vsq = {name: torch.stack(m) if m else None for name, m in vsq.items()}

    def empirical(self, name):
        return self.M[name][:, :, I["x" if self.kinds[name] == "translation" else "xx"]]

    def predict(self, name, make, start=0):
        M = self.M[name]
        integ = make(self.kinds[name], M[start])
        out = [integ.prediction()]
        for k in range(start, len(self.hps)):
            integ.advance(self.hps[k], M[k])
            out.append(integ.prediction())
        return torch.stack(out), integ

    def rel_err(self, name, pred, start=0):
        emp = self.empirical(name)[start:]
        return ((pred - emp).abs().max() / self.mag[name][start:].max()).item()


pytestmark = pytest.mark.usefixtures("one_thread")


exact = lambda kind, M: ExactIntegrator(kind, M)  # noqa: E731
paper = lambda kind, M: PaperIntegrator(kind, M, "paper")  # noqa: E731
modified = lambda kind, M: PaperIntegrator(kind, M, "modified")  # noqa: E731


# ----------------------------------------------------------------------------------------------------
# 1. exact recursions: 1e-9 relative on every family
# ----------------------------------------------------------------------------------------------------
def wd_change(opt, k):  # weight decay, momentum and dampening all change mid-run
    pg = opt.param_groups[0]
    if k == 150:
        pg["weight_decay"] = 5e-2
    if k == 220:
        pg.update(momentum=0.5, dampening=0.2)


def momentum_on_off(opt, k):  # buffer created at 100 (first step), left stale at 200, reused at 250
    pg = opt.param_groups[0]
    pg["momentum"] = {100: 0.9, 200: 0.0, 250: 0.8}.get(k, pg["momentum"])


EXACT_RUNS = {
    "sgd": dict(lr=0.1),
    "sgd+wd full-batch": dict(lr=0.1, weight_decay=1e-2, batch=None),
    "momentum 0.9 + wd": dict(lr=0.05, momentum=0.9, weight_decay=5e-2),
    "dampening 0.1": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "steplr + momentum": dict(lr=0.1, momentum=0.9, weight_decay=5e-3,
                              schedule=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=100, gamma=0.3)),
    "cosine sgd+wd": dict(lr=0.2, weight_decay=1e-2,
                          schedule=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=300)),
    "wd/momentum/dampening change": dict(lr=0.05, momentum=0.9, weight_decay=1e-2, on_step=wd_change),
    "momentum on/off": dict(lr=0.1, weight_decay=1e-2, on_step=momentum_on_off),
}
EXACT_CASES = [("bn", r) for r in EXACT_RUNS] + [("mlp", r) for r in ("sgd+wd full-batch", "momentum 0.9 + wd",
                                                                       "nesterov", "cosine sgd+wd")]


@pytest.mark.parametrize("model,run", EXACT_CASES, ids=[f"{m}-{r}" for m, r in EXACT_CASES])
def test_exact_on_trained_models(model, run):
    r = Run(model, K=300, **EXACT_RUNS[run])
    for name in r.M:
        pred, _ = r.predict(name, exact)
        err = r.rel_err(name, pred)
        print(f"{model} {run:30s} {name:36s} exact {err:.1e}")
        assert err < 1e-9, name


def test_exact_started_mid_run_with_a_full_buffer():
    """M0 at step 100 of a momentum run: q0 = xz, m0 = zz, p0 = z carry the non-empty buffer."""
    r = Run("bn", K=300, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=5e-2)
    for name in r.M:
        assert r.M[name][100, :, I["zz"]].abs().max() > 0
        pred, _ = r.predict(name, exact, start=100)
        assert r.rel_err(name, pred, start=100) < 1e-9, name


# ----------------------------------------------------------------------------------------------------
# 2. paper / modified: THEORY's error sizes, and the authors' closed forms
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sgd_wd_run():
    return Run("bn", K=1500, lr=0.1, weight_decay=1e-2)


def test_mf1_and_mf2_error_sizes_sgd_wd(sgd_wd_run):
    """η = 0.1, λ = 1e-2, 1500 steps (THEORY §3(d) D3 reports MF1 1.5e-3, MF2 3.2e-7 at 3000 steps).

    Bounds, with x = ηλ, t_K = Kη, and the exact map's per-step factor (1−x)² = e^{2 ln(1−x)}:
    * MF1 scale: decay e^{−2x} per step instead of (1−x)², plus the code's one-step weight shift e^{−2x}:
      relative error ≤ 2x + x·λt_K (D3: "~2ηλ in the integral plus ηλ²t in the decay").
    * MF2 scale: 2 ln(1−x) + 2x + x² = −(2/3)x³ − O(x⁴) per step, right-point weights remove the shift:
      relative error ≤ (2/3)x³K, with 10% slack for the O(x⁴) terms.
    * translation, MF1: |ρ^k − e^{−kx}| ≤ e^{−kx} k x²/2 ≤ x/(2e) (max at k = 1/x), relative to |s0|;
      MF2 (rate λ(1+x/2)): per step x³/3, so ≤ x²/(3e).  5% slack for higher orders.
    Rescale groups have no sign-definite magnitude, so for them the same bounds are a sanity check only.
    """
    r, x, K = sgd_wd_run, 0.1 * 1e-2, 1500
    t_K = 0.1 * K
    for name, kind in r.kinds.items():
        e1 = r.rel_err(name, r.predict(name, paper)[0])
        e2 = r.rel_err(name, r.predict(name, modified)[0])
        print(f"sgd+wd {name:36s} MF1 {e1:.1e}  MF2 {e2:.1e}")
        if kind == "translation":
            assert e1 <= 1.05 * x / (2 * math.e), name
            assert e2 <= 1.05 * x ** 2 / (3 * math.e), name
        else:
            assert e1 <= 2 * x + x * 1e-2 * t_K, name
            assert e2 <= 1.1 * (2 / 3) * x ** 3 * K, name
        assert e2 < 1e-2 * e1, name  # MF2 is one order beyond MF1
    scale = "scale W1[k]+b1[k]"
    assert r.rel_err(scale, r.predict(scale, paper)[0]) > 0.1 * x  # MF1 really is first order in ηλ


def test_mf1_equals_exact_when_lambda_is_zero():
    """THEORY §3(b)/D3: with λ = 0 the MF1 sum and the exact recursion are the same numbers (rounding)."""
    r = Run("bn", K=300, lr=0.1)
    for name in r.M:
        ex, p1, p2 = (r.predict(name, f)[0] for f in (exact, paper, modified))
        scale = r.mag[name].max()
        assert ((p1 - ex).abs().max() / scale).item() < 1e-14, name
        assert ((p2 - ex).abs().max() / scale).item() < 1e-14, name


def closed_form_sgd(n0, a, etas, lam, variant):
    """The authors' `compute_theoretical` with integrand |g|² (left point, cumulative time), or MF2
    (right point, κ = 2λ(1+ηλ/2)), written as the sums THEORY §3(b) quotes."""
    t = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(etas, 0)])
    out = [n0]
    for K in range(1, len(etas) + 1):
        if variant == "paper":
            w = torch.exp(-2 * lam * (t[K] - t[:K]))
            out.append(math.exp(-2 * lam * t[K]) * n0 + ((etas[:K] ** 2 * w)[:, None] * a[:K]).sum(0))
        else:
            kappa = 2 * lam * (1 + etas[0] * lam / 2)
            w = torch.exp(-kappa * (t[K] - t[1:K + 1]))
            out.append(math.exp(-kappa * t[K]) * n0 + ((etas[:K] ** 2 * w)[:, None] * a[:K]).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["paper", "modified"])
def test_paper_sgd_equals_the_closed_form(sgd_wd_run, variant):
    r = sgd_wd_run
    K = 400
    etas = torch.tensor([hp.lr for hp in r.hps[:K]], dtype=torch.float64)
    for name, kind in r.kinds.items():
        if kind == "translation":
            continue
        M = r.M[name]
        ref = closed_form_sgd(M[0, :, I["xx"]], M[:K, :, I["yy"]], etas, 1e-2, variant)
        pred = r.predict(name, paper if variant == "paper" else modified)[0][:K + 1]
        assert ((pred - ref).abs().max() / ref.abs().max()).item() < 1e-12, name


def test_paper_sgd_cumulative_time_with_step_lr():
    """D1: with a schedule, t_k = Σ η_j and weights η_j² e^{−2λ(t_K − t_j)} (THEORY's 'cumtime' variant)."""
    r = Run("bn", K=300, lr=0.05, weight_decay=1e-2,
            schedule=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=150, gamma=0.1))
    etas = torch.tensor([hp.lr for hp in r.hps], dtype=torch.float64)
    assert etas[0] != etas[-1]
    for name, kind in r.kinds.items():
        M = r.M[name]
        if kind == "translation":
            t = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(etas, 0)])
            ref = torch.exp(-1e-2 * t)[:, None] * M[0, :, I["x"]]
        else:
            ref = closed_form_sgd(M[0, :, I["xx"]], M[:-1, :, I["yy"]], etas, 1e-2, "paper")
        pred = r.predict(name, paper)[0]
        assert ((pred - ref).abs().max() / ref.abs().max()).item() < 1e-12, name


def oscillator_closed_form(t, gamma, omega2):
    """Hm(t), G(t) from THEORY §3(c)'s table; the regime decided with a relative tolerance."""
    if abs(gamma ** 2 - omega2) <= 1e-12 * gamma ** 2:
        e = torch.exp(-gamma * t)
        return e * (1 + gamma * t), t * e
    if gamma ** 2 < omega2:
        wd = math.sqrt(omega2 - gamma ** 2)
        e = torch.exp(-gamma * t)
        return e * (torch.cos(wd * t) + gamma / wd * torch.sin(wd * t)), e * torch.sin(wd * t) / wd
    rr = math.sqrt(gamma ** 2 - omega2)
    ap, am = -gamma + rr, -gamma - rr
    return ((ap * torch.exp(am * t) - am * torch.exp(ap * t)) / (ap - am),
            (torch.exp(ap * t) - torch.exp(am * t)) / (ap - am))


CRITICAL_LAM = (1 - 0.9) ** 2 / (4 * 0.05 * (1 + 0.9))  # (1−β)² = 4η'λ(1+β)
OSC_RUNS = {
    "overdamped": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "underdamped": dict(lr=0.05, momentum=0.9, weight_decay=5e-2),
    "critical": dict(lr=0.05, momentum=0.9, weight_decay=CRITICAL_LAM),
    "dampening 0.1": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=5e-2),
}


@pytest.mark.parametrize("regime", list(OSC_RUNS))
@pytest.mark.parametrize("start", [0, 60])
def test_paper_momentum_equals_the_authors_closed_form(regime, start):
    """x(t) = Hm(t)x0 + G(t)ẋ0 + 2η' Σ_j G(t − τ_j)|v_{j+1}|² (custom_sgd / metrics code, THEORY §3(c)),
    |v_{j+1}|² read from torch's buffer after each step; ẋ0 = −2⟨θ,v⟩/(1−δ) when started mid-run (D10).
    Modified variant: the kinetic term divided by (1−δ)² (D4).  Translation: Hm_T(t)s0 + G_T(t)ṡ0."""
    cfg = OSC_RUNS[regime]
    K = 150
    r = Run("bn", K=start + K, **cfg)
    etap = cfg["lr"] * (1 - cfg.get("dampening", 0.0))
    beta, lam, damp = cfg["momentum"], cfg["weight_decay"], cfg.get("dampening", 0.0)
    gamma = (1 - beta) / (etap * (1 + beta))
    t = etap * torch.arange(K + 1, dtype=torch.float64)
    for name, kind in r.kinds.items():
        M = r.M[name][start:]
        if kind == "translation":
            hm, G = oscillator_closed_form(t, gamma, 2 * lam / (etap * (1 + beta)))
            ref = hm[:, None] * M[0, :, I["x"]] + G[:, None] * (-M[0, :, I["z"]] / (1 - damp))
            refs = {"paper": ref, "modified": ref}
        else:
            hm, G = oscillator_closed_form(t, gamma, 4 * lam / (etap * (1 + beta)))
            vsq = r.vsq[name][start:]
            hom = hm[:, None] * M[0, :, I["xx"]] + G[:, None] * (-2 * M[0, :, I["xz"]] / (1 - damp))
            drive = torch.stack([torch.zeros_like(hom[0])] + [
                2 * etap * (G[k - torch.arange(k)][:, None] * vsq[:k]).sum(0) for k in range(1, K + 1)])
            refs = {"paper": hom + drive, "modified": hom + drive / (1 - damp) ** 2}
        for variant, make in (("paper", paper), ("modified", modified)):
            pred = r.predict(name, make, start=start)[0]
            ref = refs[variant]
            err = ((pred - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-10, (name, variant, err)


def test_paper_momentum_error_sizes():
    """THEORY §3(d) (BN-MLP, 3000 steps): underdamped β=.9 λ=5e-2 η=.05 paper error 3.6e-2 (scale),
    8.6e-3 (rescale), 9.3e-3 (translation); with δ = 0.1 the paper form errs by 0.17 and the D4 correction
    brings it to 0.035.  These are measured sizes, not bounds: we assert the same order (≤ 2× THEORY's
    value) on 1000 steps of the comparable torch run, and that D4 improves the damped run at least 2×."""
    r = Run("bn", K=1000, lr=0.05, momentum=0.9, weight_decay=5e-2)
    limits = {"scale": 2 * 3.6e-2, "rescale": 2 * 8.6e-3, "translation": 2 * 9.3e-3}
    for name, kind in r.kinds.items():
        err = r.rel_err(name, r.predict(name, paper)[0])
        print(f"momentum underdamped {name:36s} paper {err:.1e}")
        assert err < limits[kind], (name, err)
        assert err > 1e-4, name  # a continuous approximation, not the exact map
    rd = Run("bn", K=1000, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=5e-2)
    name = "scale W1[k]+b1[k]"
    e_paper = rd.rel_err(name, rd.predict(name, paper)[0])
    e_mod = rd.rel_err(name, rd.predict(name, modified)[0])
    print(f"momentum dampening 0.1 {name}: paper {e_paper:.1e}  modified (D4) {e_mod:.1e}")
    assert e_paper < 2 * 0.17 and e_mod < 2 * 0.035 and e_mod < 0.5 * e_paper


def test_paper_nesterov_unsupported_exact_fine():
    r = Run("bn", K=50, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for name in r.M:
        pred, integ = r.predict(name, paper)
        assert integ.unsupported is not None and "Nesterov" in integ.unsupported
        assert torch.isnan(pred[1:]).all()
        assert r.rel_err(name, r.predict(name, exact)[0]) < 1e-9
