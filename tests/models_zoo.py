"""Small models shared by the symmetry tests.  Each one is written to exercise a particular rule; the
expected families are derived by hand in the tests, from the architecture, not from the program."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(d_in=6, h1=8, h2=7, classes=3) -> nn.Module:
    """Linear → ReLU → Linear → ReLU → Linear."""
    return nn.Sequential(nn.Linear(d_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, classes))


class PreLNTransformer(nn.Module):
    """Token embedding → one pre-LayerNorm block (multi-head attention, GELU MLP) → final LN → mean over
    tokens → linear head.  Attention is written out by hand (separate q, k, v projections, head split by
    ``view``/``transpose``, ``softmax``) so the value path is visible to the capture."""

    def __init__(self, vocab=11, d=16, heads=2, mlp_dim=32, classes=5):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        with torch.no_grad():   # non-trivial affine parameters, so no check passes by accident
            for ln in (self.ln1, self.ln2, self.ln_f):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.1)

    def forward(self, idx):
        x = self.tok(idx)
        B, T, D = x.shape
        H = self.heads
        h = self.ln1(x)
        q = self.q(h).view(B, T, H, D // H).transpose(1, 2)
        k = self.k(h).view(B, T, H, D // H).transpose(1, 2)
        v = self.v(h).view(B, T, H, D // H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln_f(x).mean(dim=1))


class FunctionalNet(nn.Module):
    """Parameters used through ``F.conv2d``, ``F.relu``, ``Tensor.relu_``, ``F.max_pool2d``,
    ``torch.flatten``/``x.view`` and ``F.linear``, with data-dependent control flow that torch.fx
    cannot trace."""

    def __init__(self, classes=4):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 6, 3, 3) * 0.2)
        self.b2 = nn.Parameter(torch.randn(5) * 0.1)
        self.w3 = nn.Parameter(torch.randn(classes, 5 * 4 * 4) * 0.1)
        self.b3 = nn.Parameter(torch.randn(classes) * 0.1)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.max_pool2d(x, 2)
        if x.sum() > -1e30:     # data-dependent branch: fx.symbolic_trace fails here
            x = F.conv2d(x, self.w2, self.b2, padding=1).relu_()
        x = F.avg_pool2d(x, 2)
        x = torch.flatten(x, 1) if x.dim() == 4 else x
        x = x.view(x.size(0), -1)
        return F.linear(x, self.w3, self.b3)


class NoSymmetry(nn.Module):
    """Linear → tanh → Linear, trained with MSE: no symmetry at all."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class NormZoo(nn.Module):
    """conv → GroupNorm → ReLU → conv → InstanceNorm(affine) → ReLU → global pool → Linear → LayerNorm →
    ReLU → Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.l1 = nn.Linear(6, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, classes)
        with torch.no_grad():
            for m in (self.gn, self.inorm, self.ln):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.inorm(self.c2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(F.relu(self.ln(self.l1(x))))


class GroupedNet(nn.Module):
    """conv → ReLU → depthwise conv (channel multiplier 2) → ReLU → grouped conv (2 groups of 8
    channels) → ReLU → global pool → Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.gc = nn.Conv2d(16, 6, 1, groups=2)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.dw(x))
        x = F.relu(self.gc(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SharedNet(nn.Module):
    """One Linear applied twice, and a decoder whose weight is tied to an encoder's."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.dec = nn.Linear(5, 5)
        self.dec.weight = self.enc.weight          # tied: one tensor, two names
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.enc(x))
        h = F.relu(self.mid(h))
        h = F.relu(self.mid(h))                    # the same module twice
        h = F.relu(self.dec(h))
        return self.out(h)


class ActivationNet(nn.Module):
    """Linear → act → Linear → ReLU → Linear, for manual families across a given activation."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.act = act
        self.l2 = nn.Linear(6, 5)
        self.l3 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l3(F.relu(self.l2(self.act(self.l1(x)))))


class ConvBN(nn.Module):
    """conv → BatchNorm → ReLU → conv → global pool → Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Kitchen(nn.Module):
    """Less common dataflow: reflect padding, nearest upsampling, flatten + transpose into a matmul with
    a bare parameter, chunk, scaled_dot_product_attention, mean over tokens, item assignment into a
    fresh buffer, and a concatenation that permutes units."""

    def __init__(self, C=4, D=6):
        super().__init__()
        self.c0 = nn.Conv2d(3, C, 3, padding=1)
        self.c1 = nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(C, C, 1)
        self.P = nn.Parameter(torch.randn(C, D) * 0.5)
        self.qk = nn.Linear(D, 2 * D)
        self.v = nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.a = nn.Linear(D, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.c0(x))
        h = F.interpolate(F.relu(self.c1(h)), scale_factor=2, mode="nearest")
        h = F.relu(self.c2(h))
        t = h.flatten(2).transpose(1, 2) @ self.P                      # [B, H*W, D]
        q, k = self.qk(t).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), self.v(t).unsqueeze(1)).squeeze(1)
        z = self.o(y).mean(1)
        w = torch.zeros(z.shape, dtype=z.dtype)
        w[:, :] = z
        u = F.relu(self.a(w))
        u = torch.cat([u[:, 3:], u[:, :3]], dim=1)                     # units reach b permuted
        return self.b(u)


class Dims(nn.Module):
    """Conv1d/BatchNorm1d and Conv3d paths, a Linear → BatchNorm1d, two inputs, two heads summed."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Conv1d(4, 5, 3)
        self.l, self.bn2, self.head_a = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.c3, self.c4, self.head_b = nn.Conv3d(2, 3, 2), nn.Conv3d(3, 4, 1), nn.Linear(4, 3)

    def forward(self, x1, x3):
        a = F.relu(self.c2(F.relu(self.bn(self.c1(x1))))).mean(-1)
        a = F.relu(self.bn2(self.l(a)))
        b = F.relu(self.c4(F.relu(self.c3(x3)))).mean((2, 3, 4))
        return self.head_a(a) + self.head_b(b)
