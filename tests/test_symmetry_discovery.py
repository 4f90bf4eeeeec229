"""find_symmetries on real architectures: the exact families, derived by hand from each architecture.

Every expected family below is written from the rules of THEORY.md §1.2 applied to the architecture
(the comments give the reasoning), never copied from the program's output.  A family is compared as
``(kind, {(parameter, (A, K, B), sign)})``, which pins the groups exactly.  Every returned family must
also pass its gradient check, and for the small models an independent plain-autograd oracle recomputes
the constraint group by group.
"""
import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import models_zoo as Z  # noqa: E402

from neural_mechanics_ext.symmetry import find_symmetries  # noqa: E402
from neural_mechanics_ext.symmetry.eps_limit import NormaliserWatch  # noqa: E402
from neural_mechanics_ext.views import full  # noqa: E402

torchvision = pytest.importorskip("torchvision")
warnings.filterwarnings("ignore", message=".*compiled extension is not available.*")


def find_quiet(model, x, **kw):
    """find_symmetries, with any warning (e.g. too few values per BatchNorm set) turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return find_symmetries(model, x, **kw)


def sig(fam):
    return fam.kind, frozenset(fam.members)


def fam_set(families):
    sigs = [sig(f) for f in families]
    assert len(sigs) == len(set(sigs)), "duplicate families"
    return set(sigs)


def S(kind, *members):
    return kind, frozenset(members)


def W(name, view, sign=1):
    return (name, tuple(view), sign)


def check_all_pass(families):
    assert families, "expected families"
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "family names must be unique"
    for f in families:
        assert f.residual is not None and f.tolerance is not None
        assert f.residual <= f.tolerance, (f.name, f.residual, f.tolerance)
        assert f.layer
        if f.extra.get("approx"):
            # proved exactly with normaliser eps -> 0, and measured with the real eps
            assert f.extra["residual_eps_limit"] <= 1e-8, f.name
            assert f.note and f.note.startswith("approximate:")
        else:
            assert f.tolerance == 1e-8


def oracle_residuals(model, fam, x, loss_fn):
    """Independent check: plain autograd on a float64 copy, groups cut with as_strided (A, K, B) windows of
    the flat tensor (views of part of a tensor: offset and a_stride); with normaliser eps → 0 for a family
    that their eps makes approximate (the residual stream's scale)."""
    m = copy.deepcopy(model).double()
    x = x.double() if x.is_floating_point() else x
    torch.manual_seed(0)
    with NormaliserWatch("approx" in fam.extra):
        loss = loss_fn(m(x))
    named = dict(m.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
    k = fam.num_groups
    dot = torch.zeros(k, dtype=torch.float64)
    s = torch.zeros(k, dtype=torch.float64)
    gg = torch.zeros(k, dtype=torch.float64)
    tt = torch.zeros(k, dtype=torch.float64)
    n = torch.zeros(k, dtype=torch.float64)
    for name, view, sign in fam.members:
        a, kk, b, off, a_stride = full(view)

        def cut(t):
            return t.reshape(-1).as_strided((a, kk, b), (a_stride, b, 1), off)
        th = cut(named[name].detach())
        g = grads[name]
        g = torch.zeros_like(th) if g is None else cut(g)
        dot += sign * (th * g).sum((0, 2))
        s += g.sum((0, 2))
        gg += (g * g).sum((0, 2))
        tt += (th * th).sum((0, 2))
        n += a * b
    # A negligible group gradient is measured against the RMS gradient element (documented rule):
    # the bias in front of a normaliser has zero gradient up to rounding.
    flat = torch.cat([g.reshape(-1) for g in grads.values() if g is not None])
    gnorm = torch.maximum(torch.sqrt(gg), flat.pow(2).mean().sqrt() * n.sqrt())
    num = s.abs() if fam.kind == "translation" else dot.abs()
    den = gnorm * (n.sqrt() if fam.kind == "translation" else tt.sqrt())
    return torch.where(num == 0, torch.zeros_like(num), num / den)


def ce(out, n_classes):
    g = torch.Generator().manual_seed(3)
    return F.cross_entropy(out, torch.randint(n_classes, (out.shape[0],), generator=g))


# ---------------------------------------------------------------------------------------------- MLP
def test_mlp():
    torch.manual_seed(0)
    model = Z.mlp()                      # 0: Linear(6,8)  2: Linear(8,7)  4: Linear(7,3)
    x = torch.randn(5, 6)
    fams = find_symmetries(model, x)
    # hidden units of 0 (8) and 2 (7) sit between Linear layers joined by ReLU only: rescale;
    # the classifier 4 feeds cross-entropy: one translation group per input column (7), plus its bias.
    expected = {
        S("rescale", W("0.weight", (1, 8, 6)), W("0.bias", (1, 8, 1)), W("2.weight", (7, 8, 1), -1)),
        S("rescale", W("2.weight", (1, 7, 8)), W("2.bias", (1, 7, 1)), W("4.weight", (3, 7, 1), -1)),
        S("translation", W("4.weight", (3, 7, 1))),
        S("translation", W("4.bias", (1, 1, 3))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)
    names = {f.name for f in fams}
    assert {"0 → 2 (rescale)", "2 → 4 (rescale)", "4 (translation, columns)", "4 (translation, bias)"} == names
    for f in fams:
        assert float(oracle_residuals(model, f, x, lambda o: ce(o, 3)).max()) < 1e-10


def test_mlp_losses():
    torch.manual_seed(0)
    model = Z.mlp()
    x = torch.randn(5, 6)
    rescale_only = {S("rescale", W("0.weight", (1, 8, 6)), W("0.bias", (1, 8, 1)), W("2.weight", (7, 8, 1), -1)),
                    S("rescale", W("2.weight", (1, 7, 8)), W("2.bias", (1, 7, 1)), W("4.weight", (3, 7, 1), -1))}
    # MSE, BCE and an unknown loss are not shift-invariant: no translation symmetry of the classifier.
    for loss in ("mse", "bce", None):
        assert fam_set(find_symmetries(model, x, loss)) == rescale_only, loss
    # A callable loss is captured too: cross-entropy with label smoothing keeps the translation groups.
    t = torch.tensor([0, 1, 2, 1, 0])
    fams = find_symmetries(model, x, lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1), targets=t)
    assert len(fams) == 4 and {f.kind for f in fams} == {"rescale", "translation"}
    # ... and so is a hand-written NLL of log_softmax.
    fams = find_symmetries(model, x, lambda o, y: -o.log_softmax(1).gather(1, y[:, None]).mean(), targets=t)
    assert len(fams) == 4
    with pytest.raises(TypeError, match="targets"):
        find_symmetries(model, x, lambda o, y: F.mse_loss(o, y))
    with pytest.raises(ValueError, match="loss"):
        find_symmetries(model, x, "hinge")


def test_no_symmetry_gives_empty_list_and_warning():
    torch.manual_seed(0)
    # a → tanh → b with MSE: tanh is not homogeneous, there is no normaliser and MSE is not shift-invariant
    with pytest.warns(RuntimeWarning, match="no symmetry found in NoSymmetry"):
        fams = find_symmetries(Z.NoSymmetry(), torch.randn(4, 4), loss="mse")
    assert fams == []


# ---------------------------------------------------------------------------------- functional code
def test_functional_model_with_control_flow():
    torch.manual_seed(0)
    model = Z.FunctionalNet()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(Exception):       # fx cannot trace it; the runtime capture can
        torch.fx.symbolic_trace(model)
    fams = find_symmetries(model, x)
    # w1 → ReLU → maxpool → w2: 6 units, conv consumer slices w2[:, k] (B = 3*3);
    # w2 → ReLU (Tensor.relu_) → avgpool → flatten → view → F.linear(w3): 5 units, a flatten block of
    # 4*4 = 16 columns per channel; w3 is the classifier: 80 columns + the bias b3.
    expected = {
        S("rescale", W("w1", (1, 6, 27)), W("b1", (1, 6, 1)), W("w2", (5, 6, 9), -1)),
        S("rescale", W("w2", (1, 5, 54)), W("b2", (1, 5, 1)), W("w3", (4, 5, 16), -1)),
        S("translation", W("w3", (4, 80, 1))),
        S("translation", W("b3", (1, 1, 4))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)
    for f in fams:
        assert float(oracle_residuals(model, f, x, lambda o: ce(o, 4)).max()) < 1e-10


# -------------------------------------------------------------------------------------- transformer
def test_pre_ln_transformer():
    torch.manual_seed(0)
    d, mlp_dim, vocab, C = 16, 32, 11, 5
    model = Z.PreLNTransformer(vocab=vocab, d=d, heads=2, mlp_dim=mlp_dim, classes=C)
    x = torch.randint(0, vocab, (3, 7))
    fams = find_symmetries(model, x)
    # Reasoning (THEORY §1.2):
    # * ln1's (γ_k, β_k) feeds q, k and v through linear maps only: one rescale group per feature with
    #   A2 = q.W[:, k] ∪ k.W[:, k] ∪ v.W[:, k] (all consumers).  Same for ln2 → fc1.
    # * v's output unit k (row k + bias) goes through the head split (view/transpose), the attention
    #   average (linear in v: the weights do not depend on v), the head merge and into proj: rescale
    #   v.W[k], v.b[k] against proj.W[:, k].
    # * ln_f → mean over tokens (linear) → head: rescale per feature.
    # * The residual stream is read only by LayerNorms (ln1, ln2, ln_f), which remove a shift that is
    #   the same for every feature of a token: every writer to the stream has translation groups —
    #   the embedding rows (one per token id), proj's columns and bias, fc2's columns and bias.
    # * head feeds cross-entropy: columns + bias.
    # * The residual stream's scale (joint, one group): tok, proj (W, b) and fc2 (W, b) scaled together
    #   scale the whole stream, which only LayerNorms read (ln1, ln2, ln_f): a scale group.  No single
    #   writer's scale (the residual adds), no rescale through GELU (fc1 → fc2).
    # * Q/K: q's unit k (row + bias) × α against k's unit k × 1/α leaves every logit q·k unchanged (no
    #   rotary embedding: one group per feature, whole views).
    # * Key bias: k.b[j] + α shifts every logit of a query by q_j·α over all keys; softmax does not see
    #   it (translation, one group per element).  Not q's or v's bias.
    expected = {
        S("translation", W("k.bias", (1, d, 1))),
        S("rescale", W("q.weight", (1, d, d)), W("q.bias", (1, d, 1)), W("k.weight", (1, d, d), -1),
          W("k.bias", (1, d, 1), -1)),
        S("rescale", W("ln1.weight", (1, d, 1)), W("ln1.bias", (1, d, 1)), W("q.weight", (d, d, 1), -1),
          W("k.weight", (d, d, 1), -1), W("v.weight", (d, d, 1), -1)),
        S("rescale", W("v.weight", (1, d, d)), W("v.bias", (1, d, 1)), W("proj.weight", (d, d, 1), -1)),
        S("rescale", W("ln2.weight", (1, d, 1)), W("ln2.bias", (1, d, 1)), W("fc1.weight", (mlp_dim, d, 1), -1)),
        S("rescale", W("ln_f.weight", (1, d, 1)), W("ln_f.bias", (1, d, 1)), W("head.weight", (C, d, 1), -1)),
        S("translation", W("tok.weight", (1, vocab, d))),
        S("translation", W("proj.weight", (d, d, 1))),
        S("translation", W("proj.bias", (1, 1, d))),
        S("translation", W("fc2.weight", (d, mlp_dim, 1))),
        S("translation", W("fc2.bias", (1, 1, d))),
        S("translation", W("head.weight", (C, d, 1))),
        S("translation", W("head.bias", (1, 1, C))),
        S("scale", W("tok.weight", (1, 1, vocab * d)), W("proj.weight", (1, 1, d * d)), W("proj.bias", (1, 1, d)),
          W("fc2.weight", (1, 1, mlp_dim * d)), W("fc2.bias", (1, 1, d))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)
    for f in fams:
        assert float(oracle_residuals(model, f, x, lambda o: ce(o, C)).max()) < 1e-10, f.name


def test_multihead_attention_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.ln(x)
            a, _ = self.attn(h, h, h)
            return self.head(a.mean(1))

    torch.manual_seed(0)
    fams = find_symmetries(Block(), torch.randn(3, 5, 8))
    # ln's (γ, β) feed q, k and v through the fused in_proj: A2 = in_proj_weight[:, k] (3*8 rows).
    # out_proj lives inside the fused attention call, so its rescale with head is not visible.
    # Inside the call (E = 8, in_proj_weight [3E, E], flat row r = elements 8r … 8r+7): Q/K, query row j
    # (+ bias j) × α against key row 8 + j (+ bias 8 + j) × 1/α, and V/O, value row 16 + j (+ bias) against
    # out_proj column j.  And the key bias: in_proj_bias[8 + j] shifted shifts each query's logits alike over
    # all keys (translation, one group per element).
    expected = {
        S("translation", W("attn.in_proj_bias", (1, 8, 1, 8, 8))),
        S("rescale", W("attn.in_proj_weight", (1, 8, 8, 0, 64)), W("attn.in_proj_bias", (1, 8, 1, 0, 8)),
          W("attn.in_proj_weight", (1, 8, 8, 64, 64), -1), W("attn.in_proj_bias", (1, 8, 1, 8, 8), -1)),
        S("rescale", W("attn.in_proj_weight", (1, 8, 8, 128, 64)), W("attn.in_proj_bias", (1, 8, 1, 16, 8)),
          W("attn.out_proj.weight", (8, 8, 1), -1)),
        S("rescale", W("ln.weight", (1, 8, 1)), W("ln.bias", (1, 8, 1)), W("attn.in_proj_weight", (24, 8, 1), -1)),
        S("translation", W("head.weight", (3, 8, 1))),
        S("translation", W("head.bias", (1, 1, 3))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)


# ------------------------------------------------------------------------------ normalisers, groups
def test_norm_zoo():
    torch.manual_seed(0)
    model = Z.NormZoo()
    x = torch.randn(3, 3, 8, 8)
    fams = find_symmetries(model, x)
    # c1 → GroupNorm(2 groups of 4): scale per channel group (K=2, 4 filters each); its bias per group
    #   is a translation group (GN subtracts the group mean).  GN's (γ,β) → ReLU → c2: rescale per channel.
    # c2 → InstanceNorm: per-channel scale, per-channel bias translation; IN's (γ,β) → ReLU → pool →
    #   flatten → l1: rescale per channel.
    # l1 → LayerNorm over its 12 features: one scale group for the whole layer; translation groups
    #   l1.W[:, j] and l1.b (LN subtracts the feature mean).  LN's (γ,β) → ReLU → head: rescale.
    # head → cross-entropy: columns + bias.
    expected = {
        S("scale", W("c1.weight", (1, 2, 4 * 27)), W("c1.bias", (1, 2, 4))),
        S("translation", W("c1.bias", (1, 2, 4))),
        S("rescale", W("gn.weight", (1, 8, 1)), W("gn.bias", (1, 8, 1)), W("c2.weight", (6, 8, 9), -1)),
        S("scale", W("c2.weight", (1, 6, 72)), W("c2.bias", (1, 6, 1))),
        S("translation", W("c2.bias", (1, 6, 1))),
        S("rescale", W("inorm.weight", (1, 6, 1)), W("inorm.bias", (1, 6, 1)), W("l1.weight", (12, 6, 1), -1)),
        S("scale", W("l1.weight", (1, 1, 72)), W("l1.bias", (1, 1, 12))),
        S("translation", W("l1.weight", (12, 6, 1))),
        S("translation", W("l1.bias", (1, 1, 12))),
        S("rescale", W("ln.weight", (1, 12, 1)), W("ln.bias", (1, 12, 1)), W("head.weight", (3, 12, 1), -1)),
        S("translation", W("head.weight", (3, 12, 1))),
        S("translation", W("head.bias", (1, 1, 3))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)
    approx = {f.name for f in fams if f.extra.get("approx")}
    assert approx == {"c1 (scale, GN gn)", "c2 (scale, IN inorm)", "l1 (scale, LN ln)"}
    for f in fams:
        r = float(oracle_residuals(model, f, x, lambda o: ce(o, 3)).max())
        assert r <= f.tolerance, f.name


def test_grouped_and_depthwise_consumers():
    torch.manual_seed(0)
    fams, rejected = find_symmetries(Z.GroupedNet(), torch.randn(2, 3, 8, 8), return_rejected=True)
    # stem unit k feeds the depthwise conv's filters 2k and 2k+1 (channel multiplier 2): the slice
    # dw.W[2k:2k+2] is the view (1, 8, 2*9).  dw → gc: gc has 2 groups of 8 input channels and 3
    # outputs each (1×1 kernel: gc.W is [6, 8], flat r*8 + c), so unit k is read by gc.W[3*(k//8):3*(k//8)+3,
    # k%8]: no view of the whole tensor with K=16 expresses that, but each group of gc is one: units
    # 8g … 8g+7 (dw.W rows, (1, 8, 9, 72g, ·), and bias) ↔ gc rows 3g … 3g+2, column k%8: (3, 8, 1, 24g, 8).
    # Two families.  gc → pool → fc: rescale; fc: translation.
    expected = {
        S("rescale", W("stem.weight", (1, 8, 27)), W("stem.bias", (1, 8, 1)), W("dw.weight", (1, 8, 18), -1)),
        S("rescale", W("gc.weight", (1, 6, 8)), W("gc.bias", (1, 6, 1)), W("fc.weight", (3, 6, 1), -1)),
        S("translation", W("fc.weight", (3, 6, 1))),
        S("translation", W("fc.bias", (1, 1, 3))),
    }
    for g in range(2):
        expected.add(S("rescale", W("dw.weight", (1, 8, 9, 72 * g, 72)), W("dw.bias", (1, 8, 1, 8 * g, 8)),
                       W("gc.weight", (3, 8, 1, 24 * g, 8), -1)))
    assert fam_set(fams) == expected
    check_all_pass(fams)
    assert rejected == []


def test_shared_and_tied_parameters_are_refused():
    torch.manual_seed(0)
    fams, rejected = find_symmetries(Z.SharedNet(), torch.randn(4, 5), return_rejected=True)
    # enc.weight is dec.weight (tied) and mid runs twice: every rescale candidate touches one of
    # them and is refused; only the classifier's translation groups remain.
    assert fam_set(fams) == {S("translation", W("out.weight", (3, 5, 1))), S("translation", W("out.bias", (1, 1, 3)))}
    check_all_pass(fams)
    assert len(rejected) == 4
    for fam, res, reason in rejected:
        assert res is None and fam.kind == "rescale"
        assert "tied" in reason or "used by 2 calls" in reason


def test_less_common_dataflow():
    torch.manual_seed(0)
    model = Z.Kitchen()
    x = torch.randn(2, 3, 4, 4)
    fams, rejected = find_symmetries(model, x, return_rejected=True)
    # c0 → ReLU → reflect pad (inside c1) → c1; c1 → ReLU → nearest upsampling → c2 (1x1);
    # c2 → ReLU → flatten/transpose → tokens @ P: rows of P compensate (P[k, :], view (1, 4, 6)).
    # v → scaled_dot_product_attention (linear in the value) → o; o → mean over tokens → item
    # assignment into a zero buffer → a.  q and k (rows 0-5 and 6-11 of the fused qk, [12, 6], flat
    # r*6 + c) meet in the attention logits: query row j (+ bias) × α against key row 6 + j × 1/α; the key
    # part of qk's bias, elements 6 + j, shifted (translation, one group each: the softmax absorbs q·c).
    # a → ReLU → cat([u[:, 3:], u[:, :3]]) → b: unit k reaches b's column (k+3) % 6, which no view of the
    # whole b with the units in order expresses, but each half is one: units 0-2 ↔ b columns 3-5
    # ((3, 3, 1, 3, 6): rows of b [3, 6]), units 3-5 ↔ columns 0-2.  b → CE: columns + bias.
    # P, a parameter used through `@` ([in 4, out 6]), is a source like a Linear: its column j makes
    # feature j of t, read by qk and v (their columns j compensate): P (4, 6, 1) ↔ qk, v.
    expected = {
        S("rescale", W("P", (4, 6, 1)), W("qk.weight", (12, 6, 1), -1), W("v.weight", (6, 6, 1), -1)),
        S("rescale", W("c0.weight", (1, 4, 27)), W("c0.bias", (1, 4, 1)), W("c1.weight", (4, 4, 9), -1)),
        S("rescale", W("c1.weight", (1, 4, 36)), W("c1.bias", (1, 4, 1)), W("c2.weight", (4, 4, 1), -1)),
        S("rescale", W("c2.weight", (1, 4, 4)), W("c2.bias", (1, 4, 1)), W("P", (1, 4, 6), -1)),
        S("rescale", W("v.weight", (1, 6, 6)), W("v.bias", (1, 6, 1)), W("o.weight", (6, 6, 1), -1)),
        S("rescale", W("o.weight", (1, 6, 6)), W("o.bias", (1, 6, 1)), W("a.weight", (6, 6, 1), -1)),
        S("translation", W("b.weight", (3, 6, 1))),
        S("translation", W("b.bias", (1, 1, 3))),
        S("translation", W("qk.bias", (1, 6, 1, 6, 6))),
        S("rescale", W("qk.weight", (1, 6, 6, 0, 36)), W("qk.bias", (1, 6, 1, 0, 6)),
          W("qk.weight", (1, 6, 6, 36, 36), -1), W("qk.bias", (1, 6, 1, 6, 6), -1)),
        S("rescale", W("a.weight", (1, 3, 6, 0, 18)), W("a.bias", (1, 3, 1, 0, 3)), W("b.weight", (3, 3, 1, 3, 6), -1)),
        S("rescale", W("a.weight", (1, 3, 6, 18, 18)), W("a.bias", (1, 3, 1, 3, 3)), W("b.weight", (3, 3, 1, 0, 6), -1)),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)
    assert any(f.name == "c2 → P (rescale)" for f in fams)
    assert rejected == []
    for f in fams:
        assert float(oracle_residuals(model, f, x, lambda o: ce(o, 3)).max()) < 1e-10, f.name


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per-pixel"])
def test_conv_classifier(pooled):
    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 5, 3, padding=1)

        def forward(self, x):
            z = self.head(F.relu(self.c(x)))
            return z.mean((2, 3)) if pooled else z      # image logits, or per-pixel logits [N, 5, H, W]

    torch.manual_seed(0)
    fams = find_symmetries(ConvHead(), torch.randn(2, 3, 6, 6))
    # head feeds cross-entropy (directly per pixel, or after averaging over positions): shifting
    # head.W[:, c, i, j] adds α·x[c, p+(i,j)] to every class at position p, the same for all classes:
    # one translation group per input position (c, i, j) -> K = 4*3*3, plus the bias.
    expected = {
        S("rescale", W("c.weight", (1, 4, 27)), W("c.bias", (1, 4, 1)), W("head.weight", (5, 4, 9), -1)),
        S("translation", W("head.weight", (5, 36, 1))),
        S("translation", W("head.bias", (1, 1, 5))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)


def test_conv1d_conv3d_batchnorm1d_two_inputs():
    torch.manual_seed(0)
    model = Z.Dims()
    x = (torch.randn(8, 3, 8), torch.randn(8, 2, 3, 3, 3))
    fams = find_quiet(model, x)
    # c1 (Conv1d, k=3) → BatchNorm1d: scale per filter + bias translation; bn → ReLU → c2: rescale
    # (B = 3); c2 → ReLU → mean over length → l: rescale; l → BatchNorm1d over the batch: scale per
    # feature + bias translation; bn2 → ReLU → head_a: rescale.  c3 (Conv3d, 2x2x2) → ReLU → c4 (1x1x1):
    # rescale (B = 1); c4 → ReLU → mean → head_b: rescale.  The logits are head_a + head_b: a shift of
    # either head passes the addition unchanged, so both heads keep their translation groups.
    expected = {
        S("scale", W("c1.weight", (1, 4, 9)), W("c1.bias", (1, 4, 1))),
        S("translation", W("c1.bias", (1, 4, 1))),
        S("rescale", W("bn.weight", (1, 4, 1)), W("bn.bias", (1, 4, 1)), W("c2.weight", (5, 4, 3), -1)),
        S("rescale", W("c2.weight", (1, 5, 12)), W("c2.bias", (1, 5, 1)), W("l.weight", (6, 5, 1), -1)),
        S("scale", W("l.weight", (1, 6, 5)), W("l.bias", (1, 6, 1))),
        S("translation", W("l.bias", (1, 6, 1))),
        S("rescale", W("bn2.weight", (1, 6, 1)), W("bn2.bias", (1, 6, 1)), W("head_a.weight", (3, 6, 1), -1)),
        S("rescale", W("c3.weight", (1, 3, 16)), W("c3.bias", (1, 3, 1)), W("c4.weight", (4, 3, 1), -1)),
        S("rescale", W("c4.weight", (1, 4, 3)), W("c4.bias", (1, 4, 1)), W("head_b.weight", (3, 4, 1), -1)),
        S("translation", W("head_a.weight", (3, 6, 1))),
        S("translation", W("head_a.bias", (1, 1, 3))),
        S("translation", W("head_b.weight", (3, 4, 1))),
        S("translation", W("head_b.bias", (1, 1, 3))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)


def test_in_place_update_through_a_view_is_not_trusted():
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = F.relu(self.l1(x)).clone()
            h[:, :2].add_(1.0)          # writes into h through a view: h is no longer homogeneous
            return self.l3(F.relu(self.l2(h)))

    torch.manual_seed(0)
    fams, rejected = find_symmetries(Alias(), torch.randn(5, 4), return_rejected=True)
    # The capture sees h's version counter change behind its back, so l1 → l2 is not even proposed.
    assert {f.name for f in fams} == {"l2 → l3 (rescale)", "l3 (translation, columns)", "l3 (translation, bias)"}
    assert rejected == []
    check_all_pass(fams)


# ---------------------------------------------------------------------------------------- BatchNorm
def test_conv_bn_train_and_eval():
    torch.manual_seed(0)
    model = Z.ConvBN()
    x = torch.randn(4, 3, 8, 8)
    # conv → BN: per-filter scale (approximate: eps) and per-channel bias translation (exact: the bias
    # gradient is zero).  BN (γ,β) → ReLU → conv2: rescale.  conv2 → avgpool → fc: rescale.  fc: CE.
    exact_in_eval = {
        S("rescale", W("bn.weight", (1, 4, 1)), W("bn.bias", (1, 4, 1)), W("conv2.weight", (5, 4, 9), -1)),
        S("rescale", W("conv2.weight", (1, 5, 36)), W("conv2.bias", (1, 5, 1)), W("fc.weight", (3, 5, 1), -1)),
        S("translation", W("fc.weight", (3, 5, 1))),
        S("translation", W("fc.bias", (1, 1, 3))),
    }
    bn_train = {S("scale", W("conv.weight", (1, 4, 27)), W("conv.bias", (1, 4, 1))),
                S("translation", W("conv.bias", (1, 4, 1)))}
    fams = find_symmetries(model, x)
    assert fam_set(fams) == exact_in_eval | bn_train
    check_all_pass(fams)
    scale = next(f for f in fams if f.kind == "scale")
    assert "approximate: BatchNorm bn eps=1e-05" in scale.note
    assert 1e-8 < scale.residual <= scale.tolerance < 1e-2

    # In eval mode BN uses running statistics: no scale and no bias translation; both candidates are
    # measured and reported as rejected with the reason.
    model.eval()
    fams, rejected = find_symmetries(model, x, return_rejected=True)
    assert fam_set(fams) == exact_in_eval
    assert {sig(f) for f, _, _ in rejected} == bn_train
    for fam, res, reason in rejected:
        assert "eval mode" in reason and res is not None and res > 1e-3
    assert not model.training


# ------------------------------------------------------------------------------------- torchvision
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg_layout(batch_norm):
    """(index, in, out) of each conv in `features`, and the index of the module after it."""
    convs, i, cin = [], 0, 3
    for v in VGG16_CFG:
        if v == "M":
            i += 1
            continue
        convs.append((i, cin, v))
        i += 3 if batch_norm else 2
        cin = v
    return convs


def vgg_classifier(C, first_in_view):
    """classifier: 0 Linear(25088,4096) 1 ReLU 2 Dropout 3 Linear(4096,4096) 4 ReLU 5 Dropout 6 Linear."""
    return {
        S("rescale", W("classifier.0.weight", (1, 4096, 25088)), W("classifier.0.bias", (1, 4096, 1)),
          W("classifier.3.weight", (4096, 4096, 1), -1)),
        S("rescale", W("classifier.3.weight", (1, 4096, 4096)), W("classifier.3.bias", (1, 4096, 1)),
          W("classifier.6.weight", (C, 4096, 1), -1)),
        S("translation", W("classifier.6.weight", (C, 4096, 1))),
        S("translation", W("classifier.6.bias", (1, 1, C))),
    }


def test_vgg16():
    torch.manual_seed(0)
    C = 10
    model = torchvision.models.vgg16(num_classes=C)
    fams = find_quiet(model, torch.randn(2, 3, 32, 32))
    # 13 convs, each → ReLU (→ MaxPool) → next conv: 12 rescale pairs with the next conv's input
    # channels (B = 3*3).  The last conv → ReLU → MaxPool → AdaptiveAvgPool(7x7) → flatten →
    # classifier.0: a flatten block of 49 columns per channel.  classifier.0 → ReLU → Dropout →
    # classifier.3 and classifier.3 → classifier.6: rescale.  classifier.6 → CE: columns + bias.
    convs = vgg_layout(batch_norm=False)
    expected = set()
    for (i, cin, cout), (j, _, cnext) in zip(convs, convs[1:]):
        expected.add(S("rescale", W(f"features.{i}.weight", (1, cout, cin * 9)), W(f"features.{i}.bias", (1, cout, 1)),
                       W(f"features.{j}.weight", (cnext, cout, 9), -1)))
    i, cin, cout = convs[-1]
    expected.add(S("rescale", W(f"features.{i}.weight", (1, cout, cin * 9)), W(f"features.{i}.bias", (1, cout, 1)),
                   W("classifier.0.weight", (4096, 512, 49), -1)))
    expected |= vgg_classifier(C, None)
    assert len(expected) == 17
    assert fam_set(fams) == expected
    check_all_pass(fams)
    assert any(f.name == "features.0 → features.2 (rescale)" for f in fams)
    assert any(f.name == "classifier.6 (translation, columns)" for f in fams)


def test_vgg16_bn():
    torch.manual_seed(0)
    C = 10
    model = torchvision.models.vgg16_bn(num_classes=C)
    fams = find_quiet(model, torch.randn(4, 3, 32, 32))
    # Each of the 13 convs (with bias) → BN: per-filter scale {W[k], b[k]} and a per-channel bias
    # translation (13 + 13).  The rescale pair moves to the BN affine: BN (γ,β) → ReLU (→ MaxPool) →
    # next conv (12), the last BN → ... → flatten → classifier.0 (49 columns per channel).  The
    # classifier is as in vgg16 (2 rescale + 2 translation): 13 scale + 15 rescale + 15 translation.
    convs = vgg_layout(batch_norm=True)
    expected = set()
    for i, cin, cout in convs:
        expected.add(S("scale", W(f"features.{i}.weight", (1, cout, cin * 9)), W(f"features.{i}.bias", (1, cout, 1))))
        expected.add(S("translation", W(f"features.{i}.bias", (1, cout, 1))))
    for (i, _, cout), (j, _, cnext) in zip(convs, convs[1:]):
        expected.add(S("rescale", W(f"features.{i + 1}.weight", (1, cout, 1)), W(f"features.{i + 1}.bias", (1, cout, 1)),
                       W(f"features.{j}.weight", (cnext, cout, 9), -1)))
    i = convs[-1][0]
    expected.add(S("rescale", W(f"features.{i + 1}.weight", (1, 512, 1)), W(f"features.{i + 1}.bias", (1, 512, 1)),
                   W("classifier.0.weight", (4096, 512, 49), -1)))
    expected |= vgg_classifier(C, None)
    assert len(expected) == 43
    assert fam_set(fams) == expected
    check_all_pass(fams)
    assert any(f.name == "features.0 (scale, BN features.1)" for f in fams)


def resnet_expected(model, bottleneck, C):
    """Hand rules for torchvision ResNets (see the test docstrings)."""
    exp = {S("scale", W("conv1.weight", (1, 64, 3 * 49)))}
    inplanes = 64
    for li, (n_blocks, planes) in enumerate(zip(model._nmx_layers, (64, 128, 256, 512)), start=1):
        for b in range(n_blocks):
            p = f"layer{li}.{b}"
            if bottleneck:
                width, out = planes, planes * 4
                exp |= {
                    S("scale", W(f"{p}.conv1.weight", (1, width, inplanes))),
                    S("scale", W(f"{p}.conv2.weight", (1, width, width * 9))),
                    S("scale", W(f"{p}.conv3.weight", (1, out, width))),
                    S("rescale", W(f"{p}.bn1.weight", (1, width, 1)), W(f"{p}.bn1.bias", (1, width, 1)),
                      W(f"{p}.conv2.weight", (width, width, 9), -1)),
                    S("rescale", W(f"{p}.bn2.weight", (1, width, 1)), W(f"{p}.bn2.bias", (1, width, 1)),
                      W(f"{p}.conv3.weight", (out, width, 1), -1)),
                }
            else:
                out = planes
                exp |= {
                    S("scale", W(f"{p}.conv1.weight", (1, planes, inplanes * 9))),
                    S("scale", W(f"{p}.conv2.weight", (1, planes, planes * 9))),
                    S("rescale", W(f"{p}.bn1.weight", (1, planes, 1)), W(f"{p}.bn1.bias", (1, planes, 1)),
                      W(f"{p}.conv2.weight", (planes, planes, 9), -1)),
                }
            if b == 0 and (li > 1 or inplanes != out):
                exp.add(S("scale", W(f"{p}.downsample.0.weight", (1, out, inplanes))))
            inplanes = out
    exp |= {S("translation", W("fc.weight", (C, inplanes, 1))), S("translation", W("fc.bias", (1, 1, C)))}
    return exp


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
            [m.training for m in model.modules()], torch.random.get_rng_state())


def test_resnet18_and_model_untouched():
    torch.manual_seed(0)
    C = 10
    model = torchvision.models.resnet18(num_classes=C)
    model._nmx_layers = (2, 2, 2, 2)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)   # an existing gradient must survive
    x = torch.randn(4, 3, 64, 64)
    before = snapshot(model)
    fams = find_quiet(model, x)
    after = snapshot(model)
    # Stem conv1 → bn1: scale.  Every conv → BN: scale (20 convs: stem, 16 in blocks, 3 downsample).
    # Inside each BasicBlock, bn1 (γ,β) → ReLU → conv2: rescale (8).  bn2 and the downsample BN end in
    # the residual join `out += identity`, and the stem's bn1 → maxpool also feeds layer1.0's identity
    # path: no local symmetry across a residual join.  fc → CE: columns + bias.  20 + 8 + 2.
    expected = resnet_expected(model, bottleneck=False, C=C)
    assert len(expected) == 30
    assert fam_set(fams) == expected
    check_all_pass(fams)
    # find_symmetries works on a copy: parameters, buffers (BN running stats), gradients, modes and
    # the global RNG state are exactly as before.
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    for n in before[1]:
        assert (before[1][n] is None and after[1][n] is None) or torch.equal(before[1][n], after[1][n]), n
    assert before[2] == after[2] and torch.equal(before[3], after[3])
    assert next(model.parameters()).dtype == torch.float32


def test_resnet50():
    torch.manual_seed(0)
    C = 10
    model = torchvision.models.resnet50(num_classes=C)
    model._nmx_layers = (3, 4, 6, 3)
    fams = find_quiet(model, torch.randn(4, 3, 64, 64))
    # 53 convs, each → BN: scale.  Inside each of the 16 Bottlenecks: bn1 → ReLU → conv2 and
    # bn2 → ReLU → conv3: rescale (32).  One more: the stem's bn1 → ReLU → maxpool feeds layer1.0's
    # conv1 AND its downsample conv (a projection shortcut, not an identity), so scaling stem channel
    # k is compensated in both consumers: rescale with A2 = conv1[:, k] ∪ downsample.0[:, k].
    # Every later block input is a residual sum.  fc: 2 translation.  53 + 33 + 2 = 88.
    expected = resnet_expected(model, bottleneck=True, C=C)
    expected.add(S("rescale", W("bn1.weight", (1, 64, 1)), W("bn1.bias", (1, 64, 1)),
                   W("layer1.0.conv1.weight", (64, 64, 1), -1), W("layer1.0.downsample.0.weight", (256, 64, 1), -1)))
    assert len(expected) == 88
    assert fam_set(fams) == expected
    check_all_pass(fams)


def test_mobilenet_v2():
    torch.manual_seed(0)
    C = 10
    model = torchvision.models.mobilenet_v2(num_classes=C)
    fams = find_quiet(model, torch.randn(4, 3, 64, 64))
    # Every Conv2d (no bias) is followed by BatchNorm: 1 stem + 2 (block 1: depthwise, project) +
    # 16 blocks * 3 (expand, depthwise, project) + 1 last 1x1 = 52 scale families; depthwise filters
    # are (1, C, 1*3*3).  Activations are ReLU6 (not homogeneous): no rescale through them.  The
    # project BN of a block is linear (no activation); its output is a residual sum unless the block
    # and the next one are both non-residual: features.1 → features.2 (16 channels) and
    # features.17 → features.18 (320): there the BN affine (γ,β) rescales against the next 1x1 conv.
    # classifier = Dropout → Linear(1280, C): columns + bias.  52 + 2 + 2 = 56.
    expected = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            kk = m.kernel_size[0] * m.kernel_size[1]
            expected.add(S("scale", W(f"{name}.weight", (1, m.out_channels, m.in_channels // m.groups * kk))))
    assert len(expected) == 52
    expected |= {
        S("rescale", W("features.1.conv.2.weight", (1, 16, 1)), W("features.1.conv.2.bias", (1, 16, 1)),
          W("features.2.conv.0.0.weight", (96, 16, 1), -1)),
        S("rescale", W("features.17.conv.3.weight", (1, 320, 1)), W("features.17.conv.3.bias", (1, 320, 1)),
          W("features.18.0.weight", (1280, 320, 1), -1)),
        S("translation", W("classifier.1.weight", (C, 1280, 1))),
        S("translation", W("classifier.1.bias", (1, 1, C))),
    }
    assert fam_set(fams) == expected
    check_all_pass(fams)


def test_squeezenet_fire_modules_read_part_of_a_concatenation():
    """SqueezeNet 1.0: a fire module concatenates expand1x1 and expand3x3 (ReLU after each), and the next
    squeeze conv (or the final conv) reads the concatenation: each expand conv's units are rescaled against
    ITS part of the reader's input channels — views of part of the reader's weight (issue 13 item 1).  Per
    fire (8 of them): squeeze → expand1x1 + expand3x3 (both read the squeeze output), expand1x1 → next
    reader, expand3x3 → next reader; plus the stem features.0 → the first squeeze (a max-pool in between
    is homogeneous).  No BatchNorm, ReLU everywhere, the classifier conv is followed by ReLU (no
    translation): 1 + 3·8 = 25 rescales."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(num_classes=5)
    fams = find_quiet(model, torch.randn(2, 3, 64, 64))
    fires = [n for n, m in model.named_modules() if type(m).__name__ == "Fire"]
    assert len(fires) == 8 and len(fams) == 25 and {f.kind for f in fams} == {"rescale"}
    readers = [f"{n}.squeeze" for n in fires[1:]] + ["classifier.1"]
    W_ = dict(model.named_parameters())
    for fire, reader in zip(fires, readers):
        e1 = W_[f"{fire}.expand1x1.weight"].shape[0]
        r = W_[f"{reader}.weight"]
        tail = r.shape[2] * r.shape[3]
        for part, first in (("expand1x1", 0), ("expand3x3", e1)):
            (fam,) = [f for f in fams if f.name.startswith(f"{fire}.{part} →")]
            n = W_[f"{fire}.{part}.weight"].shape[0]
            (member,) = [m for m in fam.members if m[0] == f"{reader}.weight"]
            # reader columns first … first + n − 1 of [out, in, kh, kw]: flat elements o·in·tail + (first + k)·tail + t
            assert member[2] == -1 and full(member[1], r.numel()) == (r.shape[0], n, tail, first * tail,
                                                                       r.shape[1] * tail)
    check_all_pass(fams)
