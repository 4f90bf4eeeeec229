"""The gradient check itself, the manual API, errors, describe, and the building blocks."""
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import models_zoo as Z  # noqa: E402

from neural_mechanics_ext.plan import MomentPlan  # noqa: E402
from neural_mechanics_ext.symmetry import (SymmetryFamily, describe, find_symmetries,  # noqa: E402
                                           prove_families)
from neural_mechanics_ext.symmetry.prove import plan_moments  # noqa: E402
from neural_mechanics_ext.symmetry.rules import fit_view  # noqa: E402

warnings.filterwarnings("ignore", message=".*compiled extension is not available.*")


def rescale_l1_l2(model):
    """Hidden unit k between l1 and l2: (l1.W[k], l1.b[k]) against l2.W[:, k]."""
    return SymmetryFamily("rescale", "l1 → l2 (manual)", [
        ("l1.weight", (1, 6, 4), 1), ("l1.bias", (1, 6, 1), 1), ("l2.weight", (5, 6, 1), -1)])


def test_manual_rescale_across_relu_passes():
    torch.manual_seed(0)
    model = Z.ActivationNet(nn.ReLU())
    passed, rejected = prove_families(model, [rescale_l1_l2(model)], torch.randn(8, 4))
    assert len(passed) == 1 and not rejected
    assert passed[0].residual < 1e-12 and passed[0].tolerance == 1e-8


# ReLU6 equals ReLU below 6, so the check only sees its saturation with large pre-activations; GELU
# and SiLU look like ReLU for large |x| and differ most near 0, so they keep the default init.
@pytest.mark.parametrize("act,gain", [(nn.ReLU6(), 20.0), (nn.GELU(), 1.0), (nn.SiLU(), 1.0), (nn.Tanh(), 1.0)],
                         ids=["ReLU6", "GELU", "SiLU", "Tanh"])
def test_manual_family_across_non_homogeneous_activation_is_rejected(act, gain):
    torch.manual_seed(0)
    model = Z.ActivationNet(act)
    with torch.no_grad():
        model.l1.weight.mul_(gain)
    passed, rejected = prove_families(model, [rescale_l1_l2(model)], torch.randn(8, 4))
    assert not passed and len(rejected) == 1
    fam, res, reason = rejected[0]
    assert res > 1e-3 and "gradient check failed" in reason
    assert fam.residual == res


def test_manual_scale_with_batchnorm_in_eval_mode_is_rejected():
    torch.manual_seed(0)
    model = Z.ConvBN()
    fam = SymmetryFamily("scale", "conv (manual scale)", [("conv.weight", (1, 4, 27), 1), ("conv.bias", (1, 4, 1), 1)])
    x = torch.randn(4, 3, 8, 8)
    # train mode: exact as eps -> 0, approximate at eps=1e-5: rejected at the exact tolerance, and the
    # reason says that the normaliser's eps is what breaks it; accepted with a family tolerance.
    passed, rejected = prove_families(model, [fam], x)
    assert not passed and "holds exactly as normaliser eps → 0" in rejected[0].reason
    fam.tolerance = 1e-3
    passed, rejected = prove_families(model, [fam], x)
    assert passed == [fam] and 1e-8 < fam.residual < 1e-3
    # eval mode: running statistics do not follow the scaling: a large residual, in both checks
    model.eval()
    fam.tolerance = None
    passed, rejected = prove_families(model, [fam], x)
    assert not passed and rejected[0].residual > 1e-2
    assert "eps → 0" not in rejected[0].reason


def test_manual_families_discovery_cannot_see():
    """q/k rescale and the key-bias translation of attention: real symmetries the rules do not
    derive (they go through a product of two activations), declared by hand and proved."""
    torch.manual_seed(0)
    d = 16
    model = Z.PreLNTransformer(d=d)
    x = torch.randint(0, 11, (3, 7))
    qk = SymmetryFamily("rescale", "q ↔ k (manual)", [
        ("q.weight", (1, d, d), 1), ("q.bias", (1, d, 1), 1), ("k.weight", (1, d, d), -1), ("k.bias", (1, d, 1), -1)])
    kb = SymmetryFamily("translation", "k bias (manual)", [("k.bias", (1, d, 1), 1)])
    wrong = SymmetryFamily("translation", "q bias (wrong)", [("q.bias", (1, d, 1), 1)])
    passed, rejected = prove_families(model, [qk, kb, wrong], x)
    assert passed == [qk, kb]
    assert qk.residual < 1e-12 and kb.residual < 1e-12
    assert [r.family for r in rejected] == [wrong] and rejected[0].residual > 1e-3


def test_manual_api_errors():
    model = Z.ConvBN()
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(KeyError, match="no parameter named 'conv.wieght'.*conv.weight"):
        prove_families(model, [SymmetryFamily("scale", "typo", [("conv.wieght", (1, 4, 27), 1)])], x)
    with pytest.raises(ValueError, match="covers 100 elements.*108"):
        prove_families(model, [SymmetryFamily("scale", "size", [("conv.weight", (1, 4, 25), 1)])], x)
    model.conv.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="conv.bias is frozen"):
        prove_families(model, [SymmetryFamily("translation", "frozen", [("conv.bias", (1, 4, 1), 1)])], x)
    with pytest.raises(ValueError, match="same number of groups"):
        SymmetryFamily("rescale", "k", [("conv.weight", (1, 4, 27), 1), ("conv2.weight", (5, 3, 12), -1)])
    with pytest.raises(TypeError, match="SymmetryFamily"):
        prove_families(model, ["conv.weight"], x)


def test_frozen_parameters_in_discovery_are_refused():
    torch.manual_seed(0)
    model = Z.mlp()
    model[2].weight.requires_grad_(False)
    fams, rejected = find_symmetries(model, torch.randn(5, 6), return_rejected=True)
    assert {f.name for f in fams} == {"4 (translation, columns)", "4 (translation, bias)"}
    assert len(rejected) == 2 and all("frozen" in r.reason for r in rejected)


def test_describe_table():
    torch.manual_seed(0)
    fams = find_symmetries(Z.mlp(), torch.randn(5, 6))
    table = describe(fams)
    lines = table.splitlines()
    for col in ("kind", "name", "groups", "members", "residual", "tolerance"):
        assert col in lines[0]
    assert len(lines) == 2 + len(fams)
    assert "0.weight(1,8,6)+0.bias(1,8,1) | -2.weight(7,8,1)" in table
    assert "4 (translation, columns)" in table and "1.0e-08" in table
    assert describe([]) == "(no symmetry families)"
    _, rejected = find_symmetries(Z.SharedNet(), torch.randn(4, 5), return_rejected=True)
    assert "enc → mid (rescale): parameter enc.weight is tied" in describe(rejected)


def test_verbose_prints_tables(capsys):
    torch.manual_seed(0)
    find_symmetries(Z.SharedNet(), torch.randn(4, 5), verbose=True)
    out = capsys.readouterr().out
    assert "out (translation, columns)" in out and "rejected:" in out and "is tied" in out


def test_prove_false_returns_unproved_candidates():
    torch.manual_seed(0)
    fams = find_symmetries(Z.mlp(), torch.randn(5, 6), prove=False)
    assert len(fams) == 4 and all(f.residual is None for f in fams)
    passed, rejected = prove_families(Z.mlp(), fams, torch.randn(5, 6))
    assert not rejected


def test_lean_moments_match_slice_moments():
    """Without the compiled op the proof computes the columns it needs itself: they must agree with
    the fused op's contract (columns x, y, z, xx, yy, zz, xy, xz)."""
    torch.manual_seed(0)
    model = Z.ConvBN().double()
    fams = find_symmetries(Z.ConvBN(), torch.randn(4, 3, 8, 8), prove=False)
    plan = MomentPlan(fams, dict(model.named_parameters()))
    ys = [torch.randn_like(p) for p in plan.params]
    zs = [torch.randn_like(p) if i % 2 else None for i, p in enumerate(plan.params)]
    full = plan.slice_moments(ys, zs)
    lean = plan_moments(plan, ys, zs)
    assert torch.allclose(full[:, :8], lean[:, :8], rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.integers(1, 4), st.booleans())
def test_fit_view_roundtrip(a, k, b, permute):
    cmap = torch.arange(k).view(1, k, 1).expand(a, k, b).reshape(-1)
    if permute:
        perm = torch.randperm(k)
        if torch.equal(perm, torch.arange(k)):
            perm = perm.flip(0)
        assert fit_view(perm[cmap], k) is None
    else:
        assert fit_view(cmap, k) == (a, k, b)
    assert fit_view(torch.zeros(a * b, dtype=torch.long), 1) == (1, 1, a * b)
    assert fit_view(torch.full((a * k * b,), -1), k) is None


def test_proof_inputs_and_outputs():
    # a dict of keyword inputs and a model that returns a tuple need a callable loss
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x, scale=1.0):
            h = self.b(F.relu(self.a(x * scale)))
            return h, h.sum()

    torch.manual_seed(0)
    x = torch.randn(5, 3)
    with pytest.raises(TypeError, match="one tensor"):
        find_symmetries(Two(), {"x": x})
    fams = find_symmetries(Two(), {"x": x, "scale": 2.0}, lambda out, t: F.cross_entropy(out[0], t),
                           targets=torch.tensor([0, 1, 0, 1, 1]))
    assert {f.kind for f in fams} == {"rescale", "translation"} and len(fams) == 3


def test_keep_float64_suppresses_down_casts_only():
    """The proof's float64 pass stays float64 where model code casts down on purpose (HF's RMSNorm, eager
    softmax with dtype=float32); integer casts and other dtypes are untouched."""
    from neural_mechanics_ext.symmetry.float64 import KeepFloat64
    x = torch.randn(3, dtype=torch.float64)
    with KeepFloat64():
        assert x.to(torch.float32).dtype == torch.float64
        assert x.float().dtype == torch.float64 and x.half().dtype == torch.float64
        assert torch.softmax(x, 0, dtype=torch.float32).dtype == torch.float64
        assert x.to(torch.int64).dtype == torch.int64
        assert torch.randn(2).to(torch.float16).dtype == torch.float16      # not float64: left alone
    assert x.to(torch.float32).dtype == torch.float32
