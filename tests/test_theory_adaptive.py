"""The adaptive-optimizer theory layer (THEORY_ADAPTIVE.md) against float64 training runs with exact symmetries.

Model V of THEORY_ADAPTIVE §7: Linear(12,16)+b -> BatchNorm1d(eps=1e-30, affine=False, train) -> ReLU ->
Linear(16,12)+b -> ReLU -> Linear(12,5)+b -> cross-entropy.  ``nmx.find_symmetries`` finds its families:
scale {W1[k], b1[k]} (16 groups, C = 13), translation b1 (16 groups: zero gradient analytically), rescale
{W3[k], b3[k]} vs W5[:, k] (12 pairs), translation W5[:, j] (12 groups, C = 5) and b5 (1 group).  BN eps =
1e-30 next to a batch variance of order 1 is 0 in float64.  The per-element streams (θ, p, u) are formed
by ``update_direction`` at the pre-hook (never from θ_{k+1}) and summed per group by ``nmx.slice_moments``
(float64), exactly as the tracker's reference path will.  Error metric of the exact replays (as in
test_theory_models): max over steps and groups of |pred − emp| / max over steps and groups of the group
magnitude (n for scale, |θ_A1|² + |θ_A2|² for rescale, max(|s|, |θ_A|) for translation).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neural_mechanics_ext as nmx
from neural_mechanics_ext.theory import (AdaptiveExactIntegrator, AdaptiveHyper, EquilibriumRecursion, StepHyper,
                                         TranslationSetPoint, adaptive_angle, alignment_split, angular_update,
                                         equilibrium_closed_form, group_setting, optimizer_family, state_step,
                                         step_hyper, time_constants, update_direction)

lion_pytorch = pytest.importorskip("lion_pytorch")
COL = {c: i for i, c in enumerate(nmx.MOMENTS)}


pytestmark = pytest.mark.usefixtures("one_thread")


def model_v(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16, eps=1e-30, affine=False), nn.ReLU(),
                         nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).double()


OPTIMIZERS = {
    "adamw": lambda ps, **kw: torch.optim.AdamW(ps, **{"lr": 3e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, **kw}),
    "adam": lambda ps, **kw: torch.optim.Adam(ps, **{"lr": 3e-2, "betas": (0.8, 0.999), "weight_decay": 0.05, **kw}),
    "lion": lambda ps, **kw: lion_pytorch.Lion(ps, **{"lr": 3e-3, "betas": (0.9, 0.99), "weight_decay": 1.0, **kw}),
    "sgdm": lambda ps, **kw: torch.optim.SGD(ps, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, **kw}),
}


def schedule(k, K, group, lr0, wd0):
    """THEORY_ADAPTIVE §7 Part A: cosine lr with a 20-step warmup, oscillating weight decay."""
    group["lr"] = lr0 * min(1.0, (k + 1) / 20) * (0.5 + 0.5 * math.cos(math.pi * k / K))
    group["weight_decay"] = wd0 * (1 + 0.5 * math.sin(k / 7))


def hyper_of(opt, group, p):
    st = opt.state[p]
    family = optimizer_family(opt, group)
    if family == "sgd":
        return step_hyper(opt, group, first_step="momentum_buffer" not in st)
    return step_hyper(opt, group, step=state_step(st) + 1 if family != "lion" else 1 + ("exp_avg" in st))


def streams(opt, params):
    """{name: (θ, p, u, hyper)} at the pre-hook; state, θ and g are cloned before the step moves them."""
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            name = params[id(p)]
            hp = hyper_of(opt, group, p)
            state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
            pre, u = update_direction(p.detach().clone(), p.grad.clone(), state, hp)
            out[name] = (p.detach().clone(), pre, u, hp)
    return out


def family_rows(fam, data):
    """[members, K, 9] signed moments of (θ, p, u) per member slice (nmx.slice_moments, float64 sums)."""
    xs, ys, zs, views = [], [], [], []
    for name, view, _ in fam.members:
        th, pre, u = data[name][:3]
        xs.append(th), ys.append(pre), zs.append(u), views.append([view])
    rows = nmx.slice_moments(xs, views, ys, zs)
    signs = torch.tensor([s for _, _, s in fam.members], dtype=torch.float64)
    return rows.view(len(fam.members), -1, 9) * signs[:, None, None]


def magnitude(kind, rows):
    unsigned = rows[..., COL["xx"]].abs().sum(0)
    if kind == "translation":
        return torch.maximum(rows[..., COL["x"]].sum(0).abs(), unsigned.sqrt())
    return unsigned


def direct_angle(a, b):
    """angle between rows, accurate for small angles: 2 atan2(|â − b̂|, |â + b̂|)"""
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    return 2 * torch.atan2((an - bn).norm(dim=1), (an + bn).norm(dim=1))


def scale_rows(net, which):
    """[16, 13] the scale groups {W1[k], b1[k]} of model V as vectors."""
    return torch.cat([which(net[0].weight), which(net[0].bias)[:, None]], 1)


class Run:
    """Train model V for K steps; record per family the moment rows [K+1, members, G, 9] and per step the
    streams' hypers, the step's (η, ρ) per parameter and the directly measured scale-group angles."""

    def __init__(self, name, K=150, seed=0, groups=None, **kw):
        net = model_v(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        X = torch.randn(K, 32, 12, generator=gen, dtype=torch.float64)
        Y = torch.randint(0, 5, (K, 32), generator=gen)
        self.fams = nmx.find_symmetries(net, X[0])
        named = dict(net.named_parameters())
        self.params = {id(p): n for n, p in named.items()}
        opt = OPTIMIZERS[name](groups(named) if groups else net.parameters(), **kw)
        base = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
        self.rows = {f.name: [] for f in self.fams}
        self.hp, self.angle = [], []
        for k in range(K):
            for g, (lr0, wd0) in zip(opt.param_groups, base):
                schedule(k, K, g, lr0, wd0)
            opt.zero_grad()
            F.cross_entropy(net(X[k]), Y[k]).backward()
            data = streams(opt, self.params)
            for f in self.fams:
                self.rows[f.name].append(family_rows(f, data))
            self.hp.append({n: d[3] for n, d in data.items()})
            before = scale_rows(net, lambda t: t.detach().clone())
            opt.step()
            self.angle.append(direct_angle(before, scale_rows(net, lambda t: t.detach())))
            self.check_update(data, named)
        last = {n: (p.detach(), torch.zeros_like(p), torch.zeros_like(p)) for n, p in named.items()}
        for f in self.fams:
            self.rows[f.name].append(family_rows(f, last))
        self.rows = {n: torch.stack(r) for n, r in self.rows.items()}
        self.kind = {f.name: f.kind for f in self.fams}
        self.members = {f.name: [m[0] for m in f.members] for f in self.fams}

    def check_update(self, data, named):
        """θ_{k+1} = ρθ_k − η u_k per element, to rounding (relative to max|θ_{k+1}| of the tensor)."""
        worst = 0.0
        for n, (th, _, u, hp) in data.items():
            rho = hp.rho if isinstance(hp, AdaptiveHyper) else 1.0
            new = named[n].detach()
            worst = max(worst, ((rho * th - hp.lr * u - new).abs().max() / new.abs().max()).item())
        self.update_error = max(getattr(self, "update_error", 0.0), worst)

    def scalars(self, fam, k):
        """Per member row: (η, ρ) of step k as float64 [members*G] tensors."""
        G = self.rows[fam].shape[2]
        hps = [self.hp[k][n] for n in self.members[fam]]
        lr = torch.tensor([h.lr for h in hps], dtype=torch.float64).repeat_interleave(G)
        rho = torch.tensor([h.rho if isinstance(h, AdaptiveHyper) else 1.0 for h in hps],
                           dtype=torch.float64).repeat_interleave(G)
        return lr, rho

    def exact_error(self, fam, per_member=False):
        R = self.rows[fam]
        kind, (K1, nm, G, _) = self.kind[fam], R.shape
        index = torch.arange(G).repeat(nm) if per_member else None
        M = (lambda k: R[k].reshape(-1, 9)) if per_member else (lambda k: R[k].sum(0))
        integ = AdaptiveExactIntegrator(kind, M(0), index=index, num_groups=G)
        col = COL["x" if kind == "translation" else "xx"]
        err = 0.0
        for k in range(K1 - 1):
            lr, rho = self.scalars(fam, k)
            if per_member:
                integ.advance(M(k), lr, rho)
            else:
                integ.advance(M(k), float(lr[0]), float(rho[0]))
            emp = R[k + 1].sum(0)[:, col]
            err = max(err, (integ.prediction() - emp).abs().max().item())
        return err / magnitude(kind, R.transpose(0, 1).reshape(nm, -1, 9)).max().item()


# ----------------------------------------------------------------------------------------------------
# 1. u is formed exactly as the optimizer forms it, in every variant
# ----------------------------------------------------------------------------------------------------
VARIANTS = {
    "adamw": dict(), "adamw foreach": dict(foreach=True), "adamw fused": dict(fused=True),
    "adamw amsgrad": dict(amsgrad=True), "adamw maximize": dict(maximize=True),
    "adamw amsgrad+maximize foreach": dict(amsgrad=True, maximize=True, foreach=True),
    "adamw amsgrad fused": dict(amsgrad=True, fused=True),
    "adam": dict(), "adam foreach": dict(foreach=True), "adam fused": dict(fused=True),
    "adam amsgrad+maximize": dict(amsgrad=True, maximize=True), "adam maximize fused": dict(maximize=True, fused=True),
    "adam decoupled_weight_decay": dict(decoupled_weight_decay=True),
    "lion": dict(), "lion decoupled_weight_decay": dict(decoupled_weight_decay=True),
    "sgdm": dict(), "sgdm nesterov": dict(nesterov=True), "sgdm dampening": dict(dampening=0.3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_update_direction_reproduces_the_optimizer_step(variant):
    """θ_{k+1} − ρθ_k = −η u_k per element to rounding: spec §0 measured 2.2e-16 relative to max|θ| for the
    single-tensor forms and 0 for Lion; foreach/fused order their operations differently (a few ulp)."""
    r = Run(variant.split()[0], K=40, **VARIANTS[variant])
    assert r.update_error <= 1e-15, r.update_error
    fam = "adamw" if variant == "adam decoupled_weight_decay" else variant.split()[0].replace("sgdm", "sgd")
    assert {h.family if isinstance(h, AdaptiveHyper) else "sgd" for h in r.hp[0].values()} == {fam}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable Adam runs only on an accelerator")
@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_update_direction_capturable_on_cuda(name):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, 33, dtype=torch.float64, device="cuda"))
    opt = OPTIMIZERS[name]([p], capturable=True, amsgrad=True)
    for _ in range(5):
        p.grad = torch.randn_like(p)
        state = {k: v.clone() for k, v in opt.state[p].items()}
        hp = step_hyper(opt, opt.param_groups[0], step=state_step(state) + 1)
        _, u = update_direction(p.detach().clone(), p.grad, state, hp)
        th = p.detach().clone()
        opt.step()
        assert ((hp.rho * th - hp.lr * u - p.detach()).abs().max() / p.detach().abs().max()).item() <= 1e-15


# ----------------------------------------------------------------------------------------------------
# 2. exact identities of §2 for every kind, driven by the measured moments
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["adamw", "adam", "lion", "sgdm"])
def run(request):
    return request.param, Run(request.param)


def test_exact_identities_every_kind(run):
    """§2.1, 2.3, 2.4 replayed open loop for 150 steps of schedules: 1e-10 relative (spec: worst 2.7e-15)."""
    name, r = run
    assert set(r.kind.values()) == {"scale", "translation", "rescale"}
    for fam in r.rows:
        err = r.exact_error(fam)
        print(f"{name:6s} {fam:36s} exact {err:.1e}")
        assert err <= 1e-10, (fam, err)


def test_angle_from_moments_equals_the_direct_angle(run):
    """(2.2) from (n, ⟨θ,u⟩, |u|²) against 2 atan2(|θ̂_k − θ̂_{k+1}|, |θ̂_k + θ̂_{k+1}|): spec 2.5e-16 rad absolute."""
    name, r = run
    fam = next(f for f, kind in r.kind.items() if kind == "scale")
    worst = 0.0
    for k, direct in enumerate(r.angle):
        lr, rho = r.scalars(fam, k)
        phi = adaptive_angle(r.rows[fam][k].sum(0), float(lr[0]), float(rho[0]))
        worst = max(worst, (phi - direct).abs().max().item())
    assert 0 < r.angle[-1].max() and worst <= 1e-14, worst


def test_alignment_split_and_symmetry_checks(run):
    """(2.5): alignment = inertial + KSB; KSB = 0 to rounding for SGDM (p = u), clearly nonzero for the adaptive
    optimizers (spec §4: per-step KSB std 0.01–0.1 of |θ||u|).  Translation: Σ_A p = 0 exactly for AdamW and
    Lion (§2.3, the free symmetry check), so ⟨1,u⟩ is pure KSB there."""
    name, r = run
    scale = next(f for f, kind in r.kind.items() if kind == "scale")
    cols = next(f for f in r.kind if "columns" in f)
    ksb_max, p_sum = 0.0, 0.0
    for k in range(10, len(r.hp)):
        s = alignment_split(r.rows[scale][k].sum(0), "scale")
        assert torch.allclose(s["alignment"], s["inertial"] + s["ksb"], rtol=0, atol=1e-15)
        ksb_max = max(ksb_max, s["ksb"].abs().max().item())
        M = r.rows[cols][k].sum(0)
        t = alignment_split(M, "translation", sizes=5)
        p_sum = max(p_sum, (M[:, COL["y"]].abs() / (5 * M[:, COL["yy"]]).sqrt()).max().item())
        if name in ("adamw", "lion"):  # ξ = ⟨1,u⟩ is pure KSB: the inertial part κΣp is rounding
            assert t["inertial"].abs().max() <= 1e-14 and t["ksb"].abs().max() > 1e-2
    if name == "sgdm":
        assert ksb_max <= 1e-15, ksb_max
    else:
        assert ksb_max > 1e-3, ksb_max
    if name in ("adamw", "lion"):
        assert p_sum <= 1e-13, p_sum
    assert torch.isnan(alignment_split(r.rows[scale][0].sum(0), "rescale")["ksb"]).all()


def test_sgdm_alignment_agrees_with_the_step_forms():
    """The (θ, p, u) route and THEORY.md's (θ, g, v) route (step.py forms) give the same angle and cos(θ, u)."""
    torch.manual_seed(3)
    th, g, v = (torch.randn(8, 20, dtype=torch.float64) for _ in range(3))
    hp = StepHyper(0.1, 0.9, 0.2, 1e-2, False, False)
    _, u = update_direction(th, g, {"momentum_buffer": v}, hp)
    ones = [(1, 8, 20)]
    M_pu = nmx.slice_moments([th], [ones], [u], [u])
    M_gv = nmx.slice_moments([th], [ones], [g], [v])
    assert torch.allclose(adaptive_angle(M_pu, 0.1), angular_update(M_gv, hp), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------------------------------
# 3. members of one group with different weight decay (Hugging Face's default: no decay on biases)
# ----------------------------------------------------------------------------------------------------
def no_decay_on_biases(named):
    return [{"params": [p for n, p in named.items() if n.endswith("weight")]},
            {"params": [p for n, p in named.items() if n.endswith("bias")], "weight_decay": 0.0}]


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_mixed_weight_decay_per_member(name):
    """Scale {W1[k], b1[k]} with λ on W1 only: the per-member identity is exact, the closed forms are flagged."""
    r = Run(name, groups=no_decay_on_biases)
    scale = next(f for f, kind in r.kind.items() if kind == "scale")
    assert len({h.weight_decay for h in r.hp[5].values()}) == 2
    for fam in r.rows:
        assert r.exact_error(fam, per_member=True) <= 1e-10, fam
    R, G = r.rows[scale], r.rows[scale].shape[2]
    index = torch.arange(G).repeat(R.shape[1])
    worst = 0.0
    for k, direct in enumerate(r.angle):
        lr, rho = r.scalars(scale, k)
        worst = max(worst, (adaptive_angle(R[k].reshape(-1, 9), lr, rho, index, G) - direct).abs().max().item())
    assert worst <= 1e-12, worst
    # the single-ρ replay is wrong here by the size of the decay the bias does not get
    assert r.exact_error(scale) > 1e-6
    lam = torch.tensor([r.hp[5][n].weight_decay for n in r.members[scale]], dtype=torch.float64).repeat_interleave(G)
    per_group = group_setting(lam, index, G)
    assert torch.isnan(per_group).all()
    rec = EquilibriumRecursion(name, R[0].sum(0), sizes=13, mixed=torch.isnan(per_group))
    rec.advance(r.hp[0]["0.weight"], R[0].sum(0))
    assert torch.isnan(rec.prediction()).all() and torch.isnan(rec.angle).all()


# ----------------------------------------------------------------------------------------------------
# 4. closed forms and recursions agree where they must; time constants
# ----------------------------------------------------------------------------------------------------
def run_recursion(rec, hp, steps, M=None):
    for _ in range(steps):
        rec.advance(hp, M)
        hp = hp._replace(step=hp.step + 1) if isinstance(hp, AdaptiveHyper) else hp._replace(first_step=False)
    return rec


@pytest.mark.parametrize("family,hp,tol", [
    # AdamW: the fixed point of (a) is exactly n*(D) (χ → 1, K → C(1−β₁)/(1+β₁)).
    ("adamw", AdaptiveHyper("adamw", 1e-2, 0.2, (0.9, 0.99)), 1e-9),
    # Lion: (c) expands asin to x⁷; for r₁ = 0.35 the x⁹ remainder is ~3e-6 of S/C.
    ("lion", AdaptiveHyper("lion", 1e-3, 2.0, (0.9, 0.99)), 1e-5),
])
def test_recursion_fixed_point_is_the_closed_form(family, hp, tol):
    C = torch.tensor([32.0, 64.0], dtype=torch.float64)
    M0 = torch.zeros(2, 9, dtype=torch.float64)
    M0[:, COL["xx"]] = 1.0
    tau = time_constants(family, hp.lr, hp.weight_decay, betas=hp.betas)[1]
    steps = int(40 * tau)  # e^{-40}: the start is forgotten to rounding
    rec = run_recursion(EquilibriumRecursion(family, M0, sizes=C), hp, steps)
    n_star, eta_r = equilibrium_closed_form(family, hp.lr, hp.weight_decay, betas=hp.betas, sizes=C)
    assert ((rec.prediction() / n_star - 1).abs().max()) <= tol
    # the expected angle is (2.2) with expected moments: η_r up to the radial part, O(cos²(θ,u)) ≈ 1 %
    assert ((rec.angle / eta_r - 1).abs().max()) <= 0.02
    assert rec.elapsed == pytest.approx(steps / tau)


def test_recursion_and_set_point_resume_from_state_dict():
    """A checkpoint taken mid-run and loaded into a fresh object continues bit for bit."""
    torch.manual_seed(5)
    Ms = [torch.rand(3, 9, dtype=torch.float64) + 0.5 for _ in range(40)]
    hp = AdaptiveHyper("adamw", 1e-2, 0.2, (0.9, 0.99))
    a, sa = EquilibriumRecursion("adamw", Ms[0], sizes=13), TranslationSetPoint(3)
    b, sb = EquilibriumRecursion("adamw", Ms[0], sizes=13), TranslationSetPoint(3)
    for k, M in enumerate(Ms):
        if k == 20:
            b.load_state_dict(a.state_dict())
            sb.load_state_dict(sa.state_dict())
        for rec, sp in ((a, sa), (b, sb)) if k >= 20 else ((a, sa),):
            rec.advance(hp._replace(step=k + 1), M)
            sp.advance(M, hp.lr, hp.weight_decay)
    assert torch.equal(a.prediction(), b.prediction()) and torch.equal(a.prediction_kinetic(), b.prediction_kinetic())
    assert torch.equal(a.angle, b.angle) and a.elapsed == b.elapsed and torch.equal(sa.prediction(), sb.prediction())
    with pytest.raises(ValueError, match="family"):
        EquilibriumRecursion("lion", Ms[0], sizes=13).load_state_dict(a.state_dict())


def test_sgd_recursion_fixed_point_is_the_closed_form():
    """(d) with a constant Ĝ settles at THEORY.md §4.2's n* (b = 0), and its angle at η_r(D) = sqrt(x − x²/4),
    the small-angle form of (2.2) (atan2 and the radial shortening ρn − η⟨θ,u⟩ differ at O(η_r²))."""
    hp = StepHyper(0.1, 0.9, 0.0, 5e-3, False, True)
    M = torch.zeros(1, 9, dtype=torch.float64)
    M[:, COL["xx"]], M[:, COL["yy"]] = 2.0, 3.0  # Ĝ = yy·xx = 6 (scale-free: |g|² ∝ 1/n)
    rec = EquilibriumRecursion("sgd", M)
    for _ in range(2000):  # τ = 37 steps (time_constants): 54 τ
        M[:, COL["yy"]] = 6.0 / rec.prediction()  # keep Ĝ fixed while n moves
        M[:, COL["xx"]] = rec.prediction()
        rec.advance(hp, M)
        hp = hp._replace(first_step=False)
    n_star, eta_r = equilibrium_closed_form("sgd", 0.1, 5e-3, momentum=0.9, G_hat=6.0)
    assert (rec.prediction() / n_star - 1).abs().max() <= 1e-9
    assert (rec.angle / eta_r - 1).abs().max() <= eta_r ** 2


def slowest_tau(step, x, h=1e-6):
    """1/(1 − |λ_max|) of the Jacobian of a recursion at its fixed point x (central differences)."""
    J = torch.zeros(len(x), len(x), dtype=torch.float64)
    for j in range(len(x)):
        xp, xm = list(x), list(x)
        xp[j] += h * abs(x[j])
        xm[j] -= h * abs(x[j])
        fp, fm = (torch.tensor(step(v), dtype=torch.float64) for v in (xp, xm))
        J[:, j] = (fp - fm) / (2 * h * abs(x[j]))
    return 1 / (1 - float(torch.linalg.eigvals(J).abs().max()))


@pytest.mark.parametrize("lr,wd,b2", [(1e-2, 0.2, 0.999), (1e-2, 0.2, 0.99), (3e-4, 0.1, 0.95)])
def test_adamw_time_constant_against_the_jacobian(lr, wd, b2):
    """§3.5: the slow root against the Jacobian of recursion (a) at its fixed point.  The spec says "within
    0.3 %", but its own table (verify_adaptive_out.txt B6) has 385.3 vs 388.4 = 0.8 % for β₂ = .99: 1 %."""
    b1, C = 0.9, 32.0
    rho = 1 - lr * wd

    def step(x):
        N, Q, K, W = x
        W2 = b2 * W + (1 - b2) / N
        K2 = b1 ** 2 * K + (1 - b1) ** 2 * C * (1 / N) / W2
        return [rho ** 2 * N - 2 * lr * rho * b1 * Q + lr ** 2 * K2, rho * b1 * Q - lr * K2, K2, W2]

    n_star, _ = equilibrium_closed_form("adamw", lr, wd, betas=(b1, b2), sizes=C)
    K = (1 - b1) ** 2 * C / (1 - b1 ** 2)
    x = [float(n_star), -lr * K / (1 - rho * b1), K, 1 / float(n_star)]
    assert max(abs(a - b) / abs(b) for a, b in zip(step(x), x)) < 1e-12  # x is the fixed point
    assert time_constants("adamw", lr, wd, betas=(b1, b2))[1] == pytest.approx(slowest_tau(step, x), rel=1e-2)


@pytest.mark.parametrize("lr,wd,beta", [(0.05, 5e-3, 0.9), (0.1, 1e-2, 0.9), (0.05, 1e-2, 0.5), (0.2, 5e-3, 0.0)])
def test_sgdm_time_constant_against_the_jacobian(lr, wd, beta):
    """§3.5 verified the SGD(M) formula within 2.5 % of the Jacobian of recursion (d) (Ĝ = 1, b = 0)."""
    def step(x):
        N, Q, V = x
        V2 = beta ** 2 * V + 1 / N + wd ** 2 * N + 2 * beta * wd * Q
        return [N - 2 * lr * (beta * Q + wd * N) + lr ** 2 * V2, beta * Q + wd * N - lr * V2, V2]

    n = float(equilibrium_closed_form("sgd", lr, wd, momentum=beta, G_hat=1.0)[0])
    x = [n, -wd * n / (1 + beta), 2 * wd * n / (lr * (1 + beta))]
    assert time_constants("sgd", lr, wd, momentum=beta)[1] == pytest.approx(slowest_tau(step, x), rel=0.025)


# ----------------------------------------------------------------------------------------------------
# 5. long runs: measured / predicted equilibrium angle and norm (spec §3.3, §3.4)
# ----------------------------------------------------------------------------------------------------
class Teacher:
    """Online synthetic task of spec §7 Part B: x ~ N(0, I₃₂), label = argmax of a fixed tanh teacher, 20 % noise."""

    def __init__(self, seed=123):
        g = torch.Generator().manual_seed(seed)
        self.W1 = torch.randn(48, 32, generator=g, dtype=torch.float64) / math.sqrt(32)
        self.W2 = torch.randn(10, 48, generator=g, dtype=torch.float64) * 2 / math.sqrt(48)
        self.g = torch.Generator().manual_seed(seed + 1)

    def batch(self, B=128):
        x = torch.randn(B, 32, generator=self.g, dtype=torch.float64)
        y = (torch.tanh(x @ self.W1.T) @ self.W2.T).argmax(1)
        flip = torch.rand(B, generator=self.g) < 0.2
        return x, torch.where(flip, torch.randint(0, 10, (B,), generator=self.g), y)


def model_p(seed=0):
    """Spec §7 Part B's model P, narrowed: scale families W1 rows (C = 32) and W2 rows (C = 32)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32, eps=1e-30, affine=False), nn.ReLU(),
                         nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32, eps=1e-30, affine=False), nn.ReLU(),
                         nn.Linear(32, 10)).double()


def long_run(name, K, **kw):
    """Per step and scale family: measured n, angle and the recursion's predicted n, angle; for the adaptive
    optimizers also s and the set point s* of the classifier's columns (translation, 32 groups of C = 10)."""
    net, data = model_p(), Teacher()
    opt = OPTIMIZERS[name](net.parameters(), **kw)
    group = opt.param_groups[0]
    W = {"W1": net[0].weight, "W2": net[3].weight}
    out = {f: {"n": [], "angle": [], "pred_n": [], "pred_angle": [], "pred_kinetic": []} for f in W}
    recs, before = {}, {}
    cols, set_point, trans = net[6].weight, TranslationSetPoint(32), {"s": [], "s*": []}
    for k in range(K):
        x, y = data.batch()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for f, p in W.items():
            st = opt.state[p]
            if name == "sgdm":  # the sgdm streams (θ, g, v) of THEORY.md drive (d)
                hp = step_hyper(opt, group, first_step="momentum_buffer" not in st)
                v = st.get("momentum_buffer", torch.zeros_like(p))
                M = nmx.slice_moments([p.detach()], [[(1, 32, 32)]], [p.grad], [v])
            else:
                hp = step_hyper(opt, group, step=state_step(st) + 1)
                M = nmx.slice_moments([p.detach()], [[(1, 32, 32)]], *map(lambda t: [t], update_direction(
                    p.detach(), p.grad, st, hp)))
            if f not in recs:
                recs[f] = EquilibriumRecursion("sgd" if name == "sgdm" else name, M, sizes=32)
            out[f]["n"].append(M[:, COL["xx"]].clone())
            out[f]["pred_n"].append(recs[f].prediction())
            out[f]["pred_kinetic"].append(recs[f].prediction_kinetic())
            recs[f].advance(hp, M)
            out[f]["pred_angle"].append(recs[f].angle)
            before[f] = p.detach().clone()
        if name != "sgdm":
            hp = step_hyper(opt, group, step=state_step(opt.state[cols]) + 1)
            pre, u = update_direction(cols.detach(), cols.grad, opt.state[cols], hp)
            M = nmx.slice_moments([cols.detach()], [[(10, 32, 1)]], [pre], [u])
            trans["s"].append(M[:, COL["x"]].clone())
            set_point.advance(M, hp.lr, hp.weight_decay)
            trans["s*"].append(set_point.prediction())
        opt.step()
        for f, p in W.items():
            out[f]["angle"].append(direct_angle(before[f], p.detach()))
    res = {f: {k: torch.stack(v) for k, v in o.items()} for f, o in out.items()}
    return res, recs, {k: torch.stack(v) for k, v in trans.items() if v}


def window(x, frac=0.4):
    """The last 40 % of the steps: the spec's equilibrium window."""
    return x[int(x.shape[0] * (1 - frac)):]


@pytest.mark.parametrize("name,kw,steps,min_elapsed", [
    # AdamW η = 1e-2, λ = 0.2, β = (.9, .99) (spec §3.3 row 2): slow time constant with the β₂ lag 385 steps
    # (1/(1−ρ²) = 250 without it); 2000 steps = 5.2 slow τ = 8/(2ηλ), the spec's run length in its units.
    ("adamw", dict(lr=1e-2, weight_decay=0.2, betas=(0.9, 0.99)), 2000, 5),
    # SGDM η = 0.1, λ = 5e-3, β = 0.9 (spec §3.3 SGDM row 1): τ = 37 steps (§3.5), 1000 steps = 27 τ.
    ("sgdm", dict(lr=0.1, weight_decay=5e-3, momentum=0.9), 1000, 20),
])
def test_long_run_equilibrium(name, kw, steps, min_elapsed):
    """Measured/predicted n and angle in the equilibrium window (ratios of family means).

    Tolerances from THEORY_ADAPTIVE §3.3/§3.4 (model P, same settings): AdamW n/(D) = 0.971–0.979 with the
    C + β₂-lag recursion equal to (D) there, mean angle/η_r(D) = 0.939–0.966; SGDM n/(D) = 0.933–0.968,
    recursion (d) phase-end errors +3..+7 %, mean angle/η_r = 0.973–0.987.  The deficits are the random-walk
    model's (§3.7: anti-correlated minibatch gradients, the KSB mean), so we require the ratios in
    [0.90, 1.03]: the spec's worst deviation (0.067) plus 0.03 for our shorter run and narrower net.
    (Measured here: AdamW n 0.995/0.995, angle 0.972/0.957; SGDM n 0.97/0.96, angle 0.99/0.98.)
    Translation (AdamW, §5.1): the spec measured |s|/|s*| = 0.93 and a correlation of 0.977 over the groups;
    we require [0.85, 1.05] and ≥ 0.95 for the window means of s and of the online set point.
    """
    res, recs, trans = long_run(name, steps, **kw)
    for f, r in res.items():
        n_ratio = (window(r["n"]).mean() / window(r["pred_n"]).mean()).item()
        angle_ratio = (window(r["angle"]).mean() / window(r["pred_angle"]).mean()).item()
        print(f"{name} {f}: n meas/pred {n_ratio:.3f}  angle meas/pred {angle_ratio:.3f}  "
              f"elapsed {recs[f].elapsed:.1f} tau")
        assert 0.90 <= n_ratio <= 1.03, (f, n_ratio)
        assert 0.90 <= angle_ratio <= 1.03, (f, angle_ratio)
        assert recs[f].elapsed >= min_elapsed
        # §3.4(b), driven by the measured |u|²: the spec's max |err| 0.031 / 0.057, always pred < meas (the
        # negative KSB mean grows the norm, §3.7): meas/pred ≤ 1/(1 − 0.057) = 1.06.  Measured here 1.03 / 1.05.
        if name == "adamw":
            kinetic_ratio = (window(r["n"]).mean() / window(r["pred_kinetic"]).mean()).item()
            print(f"{name} {f}: n meas/pred(|u|²-driven) {kinetic_ratio:.3f}")
            assert 0.94 <= kinetic_ratio <= 1.06, (f, kinetic_ratio)
    if trans:
        s, s_star = window(trans["s"]).mean(0), window(trans["s*"]).mean(0)
        ratio, corr = (s.norm() / s_star.norm()).item(), torch.corrcoef(torch.stack([s, s_star]))[0, 1].item()
        print(f"{name} translation: |s|/|s*| {ratio:.3f}  correlation {corr:.3f}")
        assert 0.85 <= ratio <= 1.05 and corr >= 0.95, (ratio, corr)


# ----------------------------------------------------------------------------------------------------
# 6. bad input
# ----------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly():
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="RMSprop"):
        optimizer_family(torch.optim.RMSprop([p]))
    adam = torch.optim.Adam([p])
    with pytest.raises(ValueError, match="step"):
        step_hyper(adam, adam.param_groups[0])
    with pytest.raises(ValueError, match="one shape"):
        update_direction(torch.zeros(3), torch.zeros(4), {}, AdaptiveHyper("adamw", 1e-3))
    M = torch.zeros(2, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="sizes"):
        alignment_split(M, "translation")
    with pytest.raises(ValueError, match="index"):
        AdaptiveExactIntegrator("scale", M, index=torch.zeros(3, dtype=torch.long), num_groups=1)
    with pytest.raises(ValueError, match="sizes"):
        EquilibriumRecursion("adamw", M)
    with pytest.raises(ValueError, match="horizon"):
        TranslationSetPoint(2, horizon=0.5)
    integ = AdaptiveExactIntegrator("scale", M)
    with pytest.raises(ValueError, match="kind"):
        integ.load_state_dict(AdaptiveExactIntegrator("translation", M).state_dict())
    with pytest.raises(ValueError, match="rows"):
        integ.advance(torch.zeros(3, 9, dtype=torch.float64), 0.1)
    rec = EquilibriumRecursion("adam", M)
    rec.advance(AdaptiveHyper("adam", 1e-3, 1e-2))
    assert rec.unsupported and torch.isnan(rec.prediction()).all()
