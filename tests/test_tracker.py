"""SymmetryTracker on float64 models with exact symmetries, checked against a plain loop over parameters."""
import contextlib
import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics_ext as nmx
from neural_mechanics_ext.sinks import read_run

SEED = 0


def bn_mlp():
    # eps=1e-300: torch refuses eps=0, and var + 1e-300 == var in float64, so the symmetry is exact.
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12, eps=1e-300), nn.ReLU(), nn.Linear(12, 4)).double()


BN_MLP_FAMILIES = [
    nmx.SymmetryFamily("scale", "0 (scale)", [("0.weight", (1, 12, 6), 1), ("0.bias", (1, 12, 1), 1)]),
    nmx.SymmetryFamily("rescale", "1 -> 3", [("1.weight", (1, 12, 1), 1), ("1.bias", (1, 12, 1), 1),
                                             ("3.weight", (4, 12, 1), -1)]),
    nmx.SymmetryFamily("translation", "3 (columns)", [("3.weight", (4, 12, 1), 1)]),
    nmx.SymmetryFamily("translation", "3 (bias)", [("3.bias", (1, 1, 4), 1)]),
]


def conv_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()


CONV_FAMILIES = [
    nmx.SymmetryFamily("rescale", "0 -> 4", [("0.weight", (1, 4, 18), 1), ("0.bias", (1, 4, 1), 1),
                                             ("4.weight", (3, 4, 4), -1)]),
    nmx.SymmetryFamily("translation", "4 (columns)", [("4.weight", (3, 16, 1), 1)]),
    nmx.SymmetryFamily("translation", "4 (bias)", [("4.bias", (1, 1, 3), 1)]),
]

MODELS = {"bn_mlp": (bn_mlp, BN_MLP_FAMILIES, (6,), 4), "conv": (conv_net, CONV_FAMILIES, (2, 6, 6), 3)}


def independent_quantity(model, family):
    """s, n or r per group, straight from the parameters (no package code)."""
    params = dict(model.named_parameters())
    out = torch.zeros(family.num_groups, dtype=torch.float64)
    for name, (a, k, b), sign in family.members:
        w = params[name].detach().reshape(a, k, b)
        for j in range(k):
            block = w[:, j, :]
            out[j] += block.sum() if family.kind == "translation" else sign * (block * block).sum()
    return out


def train(model_name, make_opt, steps=120, schedule=None, tracker_kw=None, split=None):
    """Train with the tracker; return (tracker, independent quantities per step per family)."""
    make_model, families, shape, classes = MODELS[model_name]
    torch.manual_seed(SEED)
    model = make_model()
    opt = make_opt(model)
    sched = schedule(opt) if schedule else None
    tracker = nmx.SymmetryTracker(model, opt, families=copy.deepcopy(families), **(tracker_kw or {}))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn((128,) + shape, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, classes, (128,), generator=gen)
    seen = {f.name: [] for f in families}
    for step in range(steps):
        for f in families:
            seen[f.name].append(independent_quantity(model, f))
        idx = torch.randint(0, 128, (32,), generator=gen)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
    return tracker, {k: torch.stack(v).numpy() for k, v in seen.items()}


def relative_error(pred, emp, magnitude):
    return np.nanmax(np.abs(pred - emp)) / np.nanmax(magnitude)


SGD_CONFIGS = {
    "sgd": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1), None),
    "sgd+wd": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-2), None),
    "momentum+wd": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3), None),
    "dampening": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, dampening=0.2,
                                            weight_decay=1e-3), None),
    "nesterov": (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.8, nesterov=True,
                                           weight_decay=1e-3), None),
    "steplr": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5, weight_decay=1e-3),
               lambda o: torch.optim.lr_scheduler.StepLR(o, 40, 0.3)),
    "cosine": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-3),
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 120)),
}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("config", sorted(SGD_CONFIGS))
def test_exact_prediction_matches_independent_values(model_name, config):
    make_opt, schedule = SGD_CONFIGS[config]
    tracker, seen = train(model_name, make_opt, schedule=schedule, tracker_kw={"flush_every": 17})
    history = tracker.history()
    for name, values in seen.items():
        h = history[name]
        assert np.array_equal(h["step"], np.arange(len(values)))
        # The tracker's empirical values are those of the parameters (a plain loop agrees to rounding).
        assert relative_error(h["empirical"], values, h["magnitude"]) < 1e-13
        # And the open-loop exact prediction follows them (THEORY §4: rounding-level when exact).
        assert relative_error(h["exact"], values, h["magnitude"]) < 1e-9, name
    for row in tracker.summary():
        assert row["error_exact"] < 1e-9 and row["residual"] < 1e-10, row
        # Only the paper's formulas may decline (Nesterov); the exact prediction never stopped.
        assert all(a.startswith(("paper:", "modified:")) for a in row["assumptions"]), row
        assert ("nesterov" in config) == bool(row["assumptions"])


def test_paper_and_modified_errors_are_what_theory_says():
    # SGD + WD, eta=0.1, lambda=1e-2: MF1 is off by O(eta*lambda) (THEORY D3), MF2 much less.
    tracker, _ = train("bn_mlp", SGD_CONFIGS["sgd+wd"][0], steps=200)
    rows = {r["family"]: r for r in tracker.summary()}
    scale = rows["0 (scale)"]
    assert 1e-5 < scale["error_paper"] < 3.5e-3
    assert scale["error_modified"] < scale["error_paper"] / 10


def test_history_columns_and_layer_sums():
    tracker, _ = train("bn_mlp", SGD_CONFIGS["momentum+wd"][0], steps=30)
    h = tracker.history()["0 (scale)"]
    for key in ("step", "t", "lr", "empirical", "exact", "paper", "modified", "magnitude", "residual",
                "effective_lr", "angular_update", "grad_sq", "empirical_sum", "exact_sum"):
        assert key in h, key
    assert h["empirical"].shape == (30, 12)
    np.testing.assert_allclose(h["empirical_sum"], h["empirical"].sum(1))
    np.testing.assert_allclose(h["t"], 0.05 * np.arange(30))
    np.testing.assert_allclose(h["effective_lr"], 0.05 / h["empirical"])
    assert np.all(h["angular_update"] > 0)
    # Equilibrium of §4.2's full form (b = 0): n*² = ηcĜ(1+β) / (λ(1−β)(2(1+β) − ηcλ)), Ĝ = |g_A|²·n.
    eta, beta, lam = 0.05, 0.9, 5e-3
    G_hat = h["grad_sq"] * h["empirical"]
    np.testing.assert_allclose(h["equilibrium"] ** 2,
                               eta * G_hat * (1 + beta) / (lam * (1 - beta) * (2 * (1 + beta) - eta * lam)), rtol=1e-12)
    assert "effective_lr" not in tracker.history()["3 (columns)"]


def test_log_every_keeps_every_kth_row_but_integrates_every_step():
    full, _ = train("bn_mlp", SGD_CONFIGS["momentum+wd"][0], steps=50)
    sparse, _ = train("bn_mlp", SGD_CONFIGS["momentum+wd"][0], steps=50, tracker_kw={"log_every": 10})
    hf, hs = full.history()["1 -> 3"], sparse.history()["1 -> 3"]
    assert hs["step"].tolist() == [0, 10, 20, 30, 40]
    np.testing.assert_array_equal(hs["exact"], hf["exact"][::10])
    assert sparse.summary()[1]["error_exact"] == full.summary()[1]["error_exact"]


def test_resume_gives_the_same_history():
    def run(split):
        make_model, families, _, _ = MODELS["bn_mlp"]
        torch.manual_seed(SEED)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        tracker = nmx.SymmetryTracker(model, opt, families=families, flush_every=7)
        gen = torch.Generator().manual_seed(1)
        X, Y = torch.randn(64, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (64,), generator=gen)
        for step in range(40):
            if step == split:  # checkpoint, throw everything away, rebuild, resume
                ck = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "nmx": tracker.state_dict()})
                tracker.close()
                model = make_model()
                model.load_state_dict(ck["model"])
                opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
                opt.load_state_dict(ck["opt"])
                tracker = nmx.SymmetryTracker(model, opt, families=families, flush_every=7)
                tracker.load_state_dict(ck["nmx"])
            idx = torch.randint(0, 64, (16,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
        return tracker.history(), tracker.summary()

    (ha, sa), (hb, sb) = run(None), run(23)
    for fam in ha:
        for key in ha[fam]:
            np.testing.assert_array_equal(ha[fam][key], hb[fam][key], err_msg=f"{fam}/{key}")
    assert sa == sb


# ---- the theory's assumptions, and what the tracker says when they fail ------------------------------
def _one_step_run(model, opt, families, steps=5):
    tracker = nmx.SymmetryTracker(model, opt, families=families)
    X = torch.randn(16, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (16,))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    return tracker


def test_adam_gets_empirical_values_and_a_reason():
    model = bn_mlp()
    tracker = _one_step_run(model, torch.optim.Adam(model.parameters(), lr=1e-3), BN_MLP_FAMILIES)
    h = tracker.history()["0 (scale)"]
    assert np.isfinite(h["empirical"]).all() and np.isnan(h["exact"]).all()
    row = tracker.summary()[0]
    assert math.isnan(row["error_exact"]) and "Adam is outside the theory" in row["assumptions"][0]


def test_unequal_weight_decay_inside_a_group_is_flagged():
    model = bn_mlp()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1)
    tracker = _one_step_run(model, opt, BN_MLP_FAMILIES)
    rows = {r["family"]: r for r in tracker.summary()}
    assert rows["0 (scale)"]["assumptions"][0].startswith("from step 0:")
    assert "weight_decay" in rows["0 (scale)"]["assumptions"][0]
    assert np.isnan(tracker.history()["0 (scale)"]["exact"][1:]).all()  # step 0 is the initial value
    assert rows["3 (columns)"]["error_exact"] < 1e-12   # all members decay alike: still exact


def test_frozen_and_unoptimized_parameters_are_excluded_with_the_reason():
    model = bn_mlp()
    model[3].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n != "1.weight"], lr=0.1)
    with pytest.warns(UserWarning, match="not tracking"):
        tracker = _one_step_run(model, opt, BN_MLP_FAMILIES)
    rows = {r["family"]: r for r in tracker.summary()}
    assert "frozen" in rows["3 (bias)"]["assumptions"][0]
    assert "not in the optimizer" in rows["1 -> 3"]["assumptions"][0]
    assert rows["0 (scale)"]["error_exact"] < 1e-12


def test_missing_gradient_stops_the_prediction_from_that_step():
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = nmx.SymmetryTracker(model, opt, families=BN_MLP_FAMILIES)
    X, Y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    for step in range(6):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        if step == 3:
            model[3].bias.grad = None
        opt.step()
    rows = {r["family"]: r for r in tracker.summary()}
    assert rows["3 (bias)"]["assumptions"][0].startswith("from step 3:") and "no gradient" in rows["3 (bias)"]["assumptions"][0]
    exact = tracker.history()["3 (bias)"]["exact"]
    assert np.isfinite(exact[:4]).all() and np.isnan(exact[4:]).all()


def test_replacing_a_parameter_is_an_error_at_the_next_step():
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nmx.SymmetryTracker(model, opt, families=BN_MLP_FAMILIES)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced after the tracker was built"):
        opt.step()


def test_no_families_is_a_clear_error():
    model = bn_mlp()
    with pytest.raises(ValueError, match="no symmetry to track"):
        nmx.SymmetryTracker(model, torch.optim.SGD(model.parameters(), lr=0.1), families=[])
    with pytest.raises(ValueError, match="example_inputs"):
        nmx.SymmetryTracker(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_run_folder_sinks_agree_with_history(tmp_path):
    out = str(tmp_path / "run")
    tracker, _ = train("conv", SGD_CONFIGS["momentum+wd"][0], steps=23,
                       tracker_kw={"flush_every": 5, "out_dir": out})
    tracker.close()
    history = tracker.history()
    on_disk = read_run(out)
    for fam, cols in history.items():
        for key, v in cols.items():
            np.testing.assert_array_equal(on_disk[fam][key], v)
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 23 * len(history)
    csv_rows = open(os.path.join(out, "metrics.csv")).read().splitlines()
    assert csv_rows[0].startswith("family,step,t") and len(csv_rows) == 1 + 23 * len(history)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    make_opt = SGD_CONFIGS["momentum+wd"][0]
    cpu_tracker, _ = train("conv", make_opt, steps=40)
    make_model, families, shape, classes = MODELS["conv"]
    torch.manual_seed(SEED)
    model = make_model().cuda()
    opt = make_opt(model)
    tracker = nmx.SymmetryTracker(model, opt, families=copy.deepcopy(families), flush_every=9)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn((128,) + shape, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, classes, (128,), generator=gen)
    for _ in range(40):
        idx = torch.randint(0, 128, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[idx].cuda()), Y[idx].cuda()).backward()
        opt.step()
    for row in tracker.summary():
        assert row["error_exact"] < 1e-9, row
    a, b = tracker.history(), cpu_tracker.history()
    for fam in a:
        np.testing.assert_allclose(a[fam]["empirical"], b[fam]["empirical"], rtol=1e-8, atol=1e-10)


def test_backward_mode_records_the_same_numbers():
    make_opt = SGD_CONFIGS["momentum+wd"][0]
    a, _ = train("conv", make_opt, steps=30)
    b, _ = train("conv", make_opt, steps=30, tracker_kw={"hook": "backward", "bucket_elems": 40})
    assert len(b._buckets) > 1
    ha, hb = a.history(), b.history()
    for fam in ha:
        np.testing.assert_array_equal(ha[fam]["empirical"], hb[fam]["empirical"])
        np.testing.assert_array_equal(ha[fam]["exact"], hb[fam]["exact"])


def test_backward_mode_sees_clipping_and_accumulation():
    """Gradients changed after backward (clipping) or accumulated over two passes are re-read."""
    make_model, families, _, _ = MODELS["bn_mlp"]
    results = []
    for hook in ("optimizer", "backward"):
        torch.manual_seed(SEED)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tracker = nmx.SymmetryTracker(model, opt, families=families, hook=hook)
        gen = torch.Generator().manual_seed(2)
        expect = pytest.warns(UserWarning, match="accumulated") if hook == "backward" else contextlib.nullcontext()
        with expect:
            for step in range(8):
                opt.zero_grad()
                for _ in range(2 if step % 2 else 1):
                    X = torch.randn(16, 6, generator=gen, dtype=torch.float64)
                    F.cross_entropy(model(X), torch.randint(0, 4, (16,), generator=gen)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
        results.append(tracker.history())
    for fam in results[0]:
        np.testing.assert_array_equal(results[0][fam]["empirical"], results[1][fam]["empirical"])
        np.testing.assert_array_equal(results[0][fam]["grad_sq" if "grad_sq" in results[0][fam] else "residual"],
                                      results[1][fam]["grad_sq" if "grad_sq" in results[1][fam] else "residual"])


def test_an_interrupt_while_integrating_loses_nothing(monkeypatch):
    """Ctrl-C inside the host processing of a block: the block stays pending and close() processes it."""
    full, _ = train("bn_mlp", SGD_CONFIGS["momentum+wd"][0], steps=20, tracker_kw={"flush_every": 5})
    tracker, _ = train("bn_mlp", SGD_CONFIGS["momentum+wd"][0], steps=20, tracker_kw={"flush_every": 5})
    real = tracker._integrate_block
    calls = {"n": 0}

    def flaky(block, hypers):
        calls["n"] += 1
        if calls["n"] == 1:
            real(block, hypers)       # integrators advance part of the way...
            raise KeyboardInterrupt   # ...and the user presses Ctrl-C
        return real(block, hypers)

    monkeypatch.setattr(tracker, "_integrate_block", flaky)
    with pytest.raises(KeyboardInterrupt):
        tracker.sync()
    tracker.close()
    a, b = full.history(), tracker.history()
    for fam in a:
        for key in a[fam]:
            np.testing.assert_array_equal(a[fam][key], b[fam][key], err_msg=f"{fam}/{key}")


def test_an_interrupt_while_a_step_integrates_loses_no_step(monkeypatch):
    """Ctrl-C inside the processing that a step's flush starts (step 15 of flush_every=5 processes steps
    5-9 while steps 10-14 are handed off): both blocks stay pending and close() integrates them, so the
    history holds every step the hook saw, equal to an uninterrupted run's first 15 steps."""
    full = train("bn_mlp", SGD_CONFIGS["momentum+wd"][0], steps=20, tracker_kw={"flush_every": 5})[0].history()
    real = nmx.SymmetryTracker._integrate_block
    seen = []

    def flaky(self, block, hypers):
        seen.append(self)
        if len(seen) == 2:          # the second block's integration, inside the 15th optimizer step
            raise KeyboardInterrupt
        return real(self, block, hypers)

    monkeypatch.setattr(nmx.SymmetryTracker, "_integrate_block", flaky)
    with pytest.raises(KeyboardInterrupt):
        train("bn_mlp", SGD_CONFIGS["momentum+wd"][0], steps=20, tracker_kw={"flush_every": 5})
    tracker = seen[0]
    assert tracker.step == 15
    tracker.close()
    got = tracker.history()
    for fam in full:
        assert got[fam].keys() == full[fam].keys()
        for key in full[fam]:
            np.testing.assert_array_equal(got[fam][key], full[fam][key][:15], err_msg=f"{fam}/{key}")


def test_tensorboard_sink_writes_one_event_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tracker, _ = train("bn_mlp", SGD_CONFIGS["sgd+wd"][0], steps=12, tracker_kw={"out_dir": str(tmp_path)})
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("0 (scale)/empirical_sum")
    assert [e.step for e in events] == list(range(12))
    np.testing.assert_allclose([e.value for e in events], tracker.history()["0 (scale)"]["empirical_sum"], rtol=1e-6)
