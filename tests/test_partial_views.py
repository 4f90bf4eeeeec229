"""Views of part of a tensor, (A, K, B, offset, a_stride), through everything that takes views: families,
the MomentPlan and the tracker, the proof, the Hessian check, describe.  (The FSDP2 shard pieces of partial views: test_distributed.py.)

The model is one attention layer with a fused [E, 3E] projection written as GPT-2's Conv1D
(y = x @ W + b; q, k, v = the three column blocks of y).  Two exact symmetries live in parts of W:
  * Q/K, per dimension j: W[:, j], b[j] × α and W[:, E + j], b[E + j] × 1/α keep every q·k;
  * V/O, per dimension j: W[:, 2E + j], b[2E + j] × α and head.weight[:, j] × 1/α (the attention
    weights do not depend on v; the head reads the mean of the attention output).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics_ext as nmx
from neural_mechanics_ext.plan import MomentPlan

E, T, C = 4, 5, 3


class FusedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(1, 1)  # replaced: a Conv1D-style [E, 3E] weight and [3E] bias
        self.c_attn.weight = nn.Parameter(torch.randn(E, 3 * E, dtype=torch.float64) * 0.5)
        self.c_attn.bias = nn.Parameter(torch.randn(3 * E, dtype=torch.float64) * 0.1)
        self.head = nn.Linear(E, C).double()

    def forward(self, x):  # x [N, T, E]
        y = torch.addmm(self.c_attn.bias, x.reshape(-1, E), self.c_attn.weight).view(x.shape[0], T, 3 * E)
        q, k, v = y.split(E, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / E ** 0.5, dim=-1)
        return self.head((att @ v).mean(1))


QK = nmx.SymmetryFamily("rescale", "c_attn Q/K", [
    ("c_attn.weight", (E, E, 1, 0, 3 * E), 1), ("c_attn.bias", (1, E, 1, 0, 3 * E), 1),
    ("c_attn.weight", (E, E, 1, E, 3 * E), -1), ("c_attn.bias", (1, E, 1, E, 3 * E), -1)])
VO = nmx.SymmetryFamily("rescale", "c_attn V/O", [
    ("c_attn.weight", (E, E, 1, 2 * E, 3 * E), 1), ("c_attn.bias", (1, E, 1, 2 * E, 3 * E), 1),
    ("head.weight", (C, E, 1), -1)])


def plain_groups(model, fam):
    """|θ_A1|² − |θ_A2|² per dimension j, by plain indexing of the named blocks (no view code)."""
    W, b, H = (t.detach() for t in (model.c_attn.weight, model.c_attn.bias, model.head.weight))
    sq = lambda t: (t * t).sum(0) if t.dim() == 2 else t * t
    if fam is QK:
        return sq(W[:, :E]) + sq(b[:E]) - sq(W[:, E:2 * E]) - sq(b[E:2 * E])
    return sq(W[:, 2 * E:]) + sq(b[2 * E:]) - sq(H)


def batch(gen, n=16):
    return torch.randn(n, T, E, generator=gen, dtype=torch.float64), torch.randint(0, C, (n,), generator=gen)


def test_symmetries_of_parts_of_a_fused_weight_are_exact():
    # The premise of the tests below: the finite transformation leaves the loss unchanged.
    torch.manual_seed(0)
    model = FusedAttention()
    x, y = batch(torch.Generator().manual_seed(1))
    before = F.cross_entropy(model(x), y).detach()
    alpha = torch.linspace(0.5, 2.0, E, dtype=torch.float64)
    with torch.no_grad():
        W, b = model.c_attn.weight, model.c_attn.bias
        W[:, :E] *= alpha
        b[:E] *= alpha
        W[:, E:2 * E] /= alpha
        b[E:2 * E] /= alpha
        W[:, 2 * E:] *= alpha
        b[2 * E:] *= alpha
        model.head.weight /= alpha
    assert abs(float(F.cross_entropy(model(x), y).detach() - before)) < 1e-13


def test_tracker_follows_families_over_parts_of_one_tensor():
    torch.manual_seed(0)
    model = FusedAttention()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    tracker = nmx.SymmetryTracker(model, opt, families=[QK, VO])
    # One tensor read once with all four of its partial views (the plan lists c_attn.weight once).
    assert tracker.plan.names.count("c_attn.weight") == 1
    gen = torch.Generator().manual_seed(1)
    seen = {QK.name: [], VO.name: []}
    for _ in range(8):
        for fam in (QK, VO):
            seen[fam.name].append(plain_groups(model, fam))
        x, y = batch(gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    history = tracker.history()
    for fam in (QK, VO):
        h, want = history[fam.name], torch.stack(seen[fam.name]).numpy()
        scale = np.abs(want).max()
        assert np.abs(h["empirical"] - want).max() <= 1e-13 * scale, fam.name
        # Exact symmetries: the open-loop prediction follows the parameters to rounding (THEORY §4).
        assert np.abs(h["exact"] - want).max() <= 1e-9 * h["magnitude"].max(), fam.name
    for row in tracker.summary():
        assert row["residual"] < 1e-10, row
    # The Hessian constraints hold for both (they scatter coefficients into parts of c_attn.weight).
    report = tracker.hessian_check(F.cross_entropy, batch(gen))
    assert [r["passed"] for r in report] == [True, True], report
    tracker.close()


def test_proof_accepts_true_and_rejects_wrong_partial_families():
    torch.manual_seed(0)
    model = FusedAttention()
    x, _ = batch(torch.Generator().manual_seed(2))
    # Q ↔ V instead of Q ↔ K is not a symmetry.
    wrong = nmx.SymmetryFamily("rescale", "Q/V (wrong)", [
        ("c_attn.weight", (E, E, 1, 0, 3 * E), 1), ("c_attn.weight", (E, E, 1, 2 * E, 3 * E), -1)])
    proved, rejected = nmx.prove_families(model, [QK, VO, wrong], x)
    assert [f.name for f in proved] == [QK.name, VO.name]
    assert all(f.residual < 1e-12 for f in proved)
    assert [r.family.name for r in rejected] == [wrong.name] and rejected[0].residual > 1e-3


def test_family_validation_and_describe():
    text = nmx.describe([QK])
    assert "c_attn.weight(4,4,1)@0/12+c_attn.bias(1,4,1)@0/12 | -c_attn.weight(4,4,1)@4/12" in text
    assert QK.num_groups == E
    with pytest.raises(ValueError, match="same number of groups"):
        nmx.SymmetryFamily("scale", "k", [("w", (2, 3, 1, 0, 6), 1), ("w", (1, 2, 3, 6, 6), 1)])
    with pytest.raises(ValueError, match="view of w = \\(2, 3, 1, 0\\) is not"):
        nmx.SymmetryFamily("scale", "bad", [("w", (2, 3, 1), 1), ("w", (2, 3, 1, 0), 1)])
    with pytest.raises(ValueError, match="a_stride 2 < K\\*B = 3"):
        nmx.SymmetryFamily("scale", "overlap", [("w", (2, 3, 1, 0, 2), 1)])
    model = FusedAttention()
    named = dict(model.named_parameters())
    past = nmx.SymmetryFamily("scale", "past", [("c_attn.weight", (E, E, 1, 2 * E + 1, 3 * E), 1)])
    with pytest.raises(ValueError, match="family 'past': view of c_attn.weight .* runs past the end of "
                                         "c_attn.weight \\(shape \\(4, 12\\)\\)"):
        MomentPlan([past], named)
    # Saved runs keep members as lists: a family rebuilt from them equals the original.
    again = nmx.SymmetryFamily(QK.kind, QK.name, [(n, list(v), s) for n, v, s in QK.members])
    assert again.members == QK.members


def test_moment_plan_groups_equal_plain_sums():
    # Overlapping views of one tensor (Q block, Q+K blocks, the whole) in three families.
    torch.manual_seed(3)
    model = FusedAttention()
    named = dict(model.named_parameters())
    fams = [QK, nmx.SymmetryFamily("scale", "Q and K columns, 2 groups", [
        ("c_attn.weight", (E, 2, E, 0, 3 * E), 1)]), nmx.SymmetryFamily("scale", "all", [("c_attn.weight", (1, 1, 3 * E * E), 1)])]
    plan = MomentPlan(fams, named)
    assert plan.names == ["c_attn.weight", "c_attn.bias"] and len(plan.views[0]) == 4
    signed, unsigned = plan.group_moments(plan.slice_moments())
    W, b = named["c_attn.weight"].detach(), named["c_attn.bias"].detach()
    want_xx = torch.cat([plain_groups(model, QK),
                         torch.stack([(W[:, :E] ** 2).sum(), (W[:, E:2 * E] ** 2).sum()]), (W ** 2).sum()[None]])
    assert torch.allclose(signed[:, 3], want_xx, rtol=1e-13, atol=0)
    n = [2 * (E + 1)] * E + [E * E] * 2 + [3 * E * E]  # elements per group: 2 columns of E and 2 bias entries
    assert plan.counts.tolist() == n
