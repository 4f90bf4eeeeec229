"""The oscillator propagator of THEORY §3(c) against independent computations.

References: ``torch.linalg.matrix_exp`` (Padé), a classical RK4 integration of the ODE with tiny steps, the
closed forms of THEORY §3(c)'s table, and long runs where the authors' separable buffers overflow (D7).
"""
import math

import pytest
import torch

from neural_mechanics_ext.theory import PaperIntegrator, StepHyper, oscillator_propagator

# (dt, γ, ω²) per regime; dt ranges over short and long steps
CASES = {
    "underdamped": [(0.05, 1.05, 21.0), (0.5, 0.2, 3.0), (3.0, 0.01, 0.5)],
    "overdamped": [(0.05, 1.05, 0.42), (0.5, 10.0, 1.0), (2.0, 3.0, 8.9)],
    "lambda=0": [(0.05, 1.05, 0.0), (0.5, 40.0, 0.0), (10.0, 0.3, 0.0)],
    "critical": [(0.05, 1.05, 1.05 ** 2), (0.7, 2.0, 4.0), (3.0, 0.5, 0.25)],
}
ALL = [(regime, *c) for regime, cs in CASES.items() for c in cs]


def expm_reference(dt, gamma, omega2):
    A = torch.tensor([[0.0, 1.0], [-omega2, -2.0 * gamma]], dtype=torch.float64)
    return torch.linalg.matrix_exp(A * dt)


def as_matrix(p):
    return torch.tensor([[p[0], p[1]], [p[2], p[3]]], dtype=torch.float64)


def rk4_flow(dt, gamma, omega2, substeps=4000):
    """Columns: (x, ẋ)(dt) from (1, 0) and from (0, 1), by RK4 on ẍ + 2γẋ + ω²x = 0."""
    h = dt / substeps
    out = []
    for x, v in ((1.0, 0.0), (0.0, 1.0)):
        f = lambda x, v: (v, -omega2 * x - 2.0 * gamma * v)  # noqa: E731
        for _ in range(substeps):
            k1 = f(x, v)
            k2 = f(x + 0.5 * h * k1[0], v + 0.5 * h * k1[1])
            k3 = f(x + 0.5 * h * k2[0], v + 0.5 * h * k2[1])
            k4 = f(x + h * k3[0], v + h * k3[1])
            x += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            v += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        out.append((x, v))
    return torch.tensor([[out[0][0], out[1][0]], [out[0][1], out[1][1]]], dtype=torch.float64)


@pytest.mark.parametrize("regime,dt,gamma,omega2", ALL)
def test_propagator_matches_matrix_exp(regime, dt, gamma, omega2):
    P = as_matrix(oscillator_propagator(dt, gamma, omega2))
    R = expm_reference(dt, gamma, omega2)
    scale = R.abs().max().item()
    assert (P - R).abs().max().item() <= 1e-13 * max(scale, 1.0)


@pytest.mark.parametrize("regime", ["underdamped", "overdamped", "critical", "lambda=0"])
def test_propagator_matches_rk4(regime):
    dt, gamma, omega2 = CASES[regime][1]
    P = as_matrix(oscillator_propagator(dt, gamma, omega2))
    R = rk4_flow(dt, gamma, omega2)
    assert (P - R).abs().max().item() <= 1e-11


@pytest.mark.parametrize("regime,dt,gamma,omega2", ALL)
def test_propagator_matches_theory_closed_forms(regime, dt, gamma, omega2):
    """Φ11 = Hm(dt), Φ12 = G(dt) of THEORY §3(c)'s table, each regime with its own formula."""
    t = dt
    if regime == "critical":
        hm, G = math.exp(-gamma * t) * (1 + gamma * t), t * math.exp(-gamma * t)
    elif regime == "underdamped":
        wd = math.sqrt(omega2 - gamma ** 2)
        hm = math.exp(-gamma * t) * (math.cos(wd * t) + gamma / wd * math.sin(wd * t))
        G = math.exp(-gamma * t) * math.sin(wd * t) / wd
    elif regime == "lambda=0":  # THEORY: Hm = 1, G = (1 − e^{−2γt})/(2γ)
        hm, G = 1.0, (1 - math.exp(-2 * gamma * t)) / (2 * gamma)
    else:
        r = math.sqrt(gamma ** 2 - omega2)
        ap, am = -gamma + r, -gamma - r
        hm = (ap * math.exp(am * t) - am * math.exp(ap * t)) / (ap - am)
        G = (math.exp(ap * t) - math.exp(am * t)) / (ap - am)
    p11, p12, _, _ = oscillator_propagator(dt, gamma, omega2)
    assert p11 == pytest.approx(hm, rel=1e-13, abs=1e-15)
    assert p12 == pytest.approx(G, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("eps", [1e-15, 1e-12, 1e-9, 1e-6])
@pytest.mark.parametrize("dt,gamma", [(0.05, 1.05), (1.0, 2.0), (20.0, 0.3)])
def test_continuous_across_critical_point(eps, dt, gamma):
    """ω = γ(1 ± eps): both sides agree with the critical closed form to O(eps·(γdt)²)."""
    crit = torch.tensor([[math.exp(-gamma * dt) * (1 + gamma * dt), dt * math.exp(-gamma * dt)],
                         [-gamma ** 2 * dt * math.exp(-gamma * dt), math.exp(-gamma * dt) * (1 - gamma * dt)]],
                        dtype=torch.float64)
    at = as_matrix(oscillator_propagator(dt, gamma, gamma ** 2))
    assert (at - crit).abs().max().item() <= 1e-14 * max(1.0, crit.abs().max().item())
    for side in (+1, -1):
        omega2 = gamma ** 2 * (1 + side * eps) ** 2
        P = as_matrix(oscillator_propagator(dt, gamma, omega2))
        bound = 4 * eps * (1 + gamma * dt) ** 2 * max(1.0, dt) + 1e-14
        assert (P - crit).abs().max().item() <= bound


def test_long_run_stays_finite_beta_099():
    """1e6 steps of β = 0.99 (underdamped, λ = 5e-4): the authors' buffers overflow float64 after ~1.4e5
    steps (γτ > 709, D7).  The propagator applied step by step with a constant impulse (the integrator's
    update) stays finite and converges to the discrete fixed point (I − Φ)x = Φ(0, f·dt), solved with the
    independent matrix_exp."""
    eta, beta, lam, f = 0.1, 0.99, 5e-4, 3.0
    gamma, omega2 = (1 - beta) / (eta * (1 + beta)), 4 * lam / (eta * (1 + beta))
    p11, p12, p21, p22 = oscillator_propagator(eta, gamma, omega2)
    x, v = 1.0, 0.0
    kick = f * eta
    for _ in range(1_000_000):
        v += kick
        x, v = p11 * x + p12 * v, p21 * x + p22 * v
    assert math.isfinite(x) and math.isfinite(v)
    Phi = expm_reference(eta, gamma, omega2)
    fixed = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - Phi, Phi @ torch.tensor([0.0, kick],
                                                                                              dtype=torch.float64))
    assert x == pytest.approx(fixed[0].item(), rel=1e-9)
    assert fixed[0].item() == pytest.approx(f / omega2, rel=0.05)  # the ODE's static equilibrium f/ω²


def test_integrator_long_run_overdamped_stays_finite():
    """β = 0.9, η = 0.1, λ = 1e-4: the authors' buffer 2 (e^{−α₋τ}) overflows float64 after ~6.8e3 steps and
    float32 after ~840 (D7).  The integrator runs 2e4 steps with constant moments and stays finite, equal to
    the same recursion written with matrix_exp."""
    eta, beta, lam = 0.1, 0.9, 1e-4
    M = torch.zeros(3, 9, dtype=torch.float64)
    M[:, 3] = torch.tensor([1.0, 2.0, 3.0])  # xx = n
    M[:, 4] = torch.tensor([0.5, 0.1, 2.0])  # yy = |g|²; with zero z-columns |v_{k+1}|² = yy + λ²xx each step
    integ = PaperIntegrator("scale", M)
    hp = StepHyper(lr=eta, momentum=beta, weight_decay=lam, first_step=False)
    for _ in range(20000):
        integ.advance(hp, M)
    pred = integ.prediction()
    assert torch.isfinite(pred).all()
    vsq = M[:, 4] + lam ** 2 * M[:, 3]
    gamma, omega2 = (1 - beta) / (eta * (1 + beta)), 4 * lam / (eta * (1 + beta))
    Phi = expm_reference(eta, gamma, omega2)
    state = torch.stack([M[:, 3], torch.zeros(3, dtype=torch.float64)])
    for _ in range(20000):
        state[1] += 2 * eta * vsq
        state = Phi @ state
    assert torch.allclose(pred, state[0], rtol=1e-9, atol=0)
