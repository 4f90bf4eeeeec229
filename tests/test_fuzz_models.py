"""Random networks: every family find_symmetries reports holds, and the tracker's exact prediction follows
the empirical values in float64."""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import neural_mechanics_ext as nmx

EPS = 1e-300  # BatchNorm with eps ~ 0 keeps the scale symmetries exact (torch refuses eps=0)


@st.composite
def random_network(draw):
    """A random composition of conv / BN / activation / pooling blocks, flatten, then linear blocks."""
    layers, channels, size = [], draw(st.integers(1, 3)), 8
    in_shape = (channels, size, size)
    for _ in range(draw(st.integers(0, 3))):
        out = draw(st.integers(1, 5))
        k = draw(st.sampled_from([1, 3]))
        layers.append(nn.Conv2d(channels, out, k, padding=k // 2, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out, eps=EPS, affine=draw(st.booleans())))
        layers.append(draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.1), nn.Identity(), nn.Tanh()])))
        if size >= 4 and draw(st.booleans()):
            layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2)])))
            size //= 2
        channels = out
    layers.append(nn.Flatten())
    features = channels * size * size
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(2, 9))
        layers.append(nn.Linear(features, out, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm1d(out, eps=EPS))
        layers.append(draw(st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.GELU()])))
        features = out
    layers.append(nn.Linear(features, 4))
    seed = draw(st.integers(0, 2 ** 16))
    return nn.Sequential(*layers).double(), in_shape, seed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(random_network(), st.sampled_from(["sgd+wd", "momentum", "nesterov"]))
def test_random_networks(net, optimizer):
    model, in_shape, seed = net
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn((64,) + in_shape, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,), generator=gen)
    families = nmx.find_symmetries(model, X[:16], loss="cross_entropy")
    # Every final layer feeds the softmax: its columns and bias are translation groups at least.
    assert any(f.kind == "translation" for f in families), nmx.describe(families)
    for f in families:
        assert f.residual is not None and f.residual <= f.tolerance, f
    settings_ = {"sgd+wd": dict(lr=0.1, weight_decay=1e-2),
                 "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
                 "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)}[optimizer]
    opt = torch.optim.SGD(model.parameters(), **settings_)
    tracker = nmx.SymmetryTracker(model, opt, families=families, flush_every=7)
    for _ in range(20):
        idx = torch.randint(0, 64, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    for row in tracker.summary():
        assert row["error_exact"] < 1e-9, (row, nmx.describe(families))
        assert row["residual"] < 1e-9, row
