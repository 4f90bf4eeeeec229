"""The tracker never breaks a run and never lies: skipped AMP steps, non-finite gradients, accumulation,
a run killed with SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import neural_mechanics_ext as nmx
from neural_mechanics_ext.sinks import read_run

from test_tracker import BN_MLP_FAMILIES, bn_mlp


def _float32_model():
    torch.manual_seed(0)
    return bn_mlp().float()


def test_grad_scaler_skipped_steps_leave_no_record():
    model = _float32_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    tracker = nmx.SymmetryTracker(model, opt, families=BN_MLP_FAMILIES)
    X, Y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    skipped = 0
    for step in range(10):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(X), Y)).backward()
        if step in (3, 7):  # an overflow: the scaler skips optimizer.step()
            model[0].weight.grad[0, 0] = float("inf")
            skipped += 1
        scaler.step(opt)
        scaler.update()
    assert tracker.step == 10 - skipped
    h = tracker.history()["0 (scale)"]
    assert len(h["step"]) == 10 - skipped and np.isfinite(h["empirical"]).all()
    for row in tracker.summary():
        # float32 parameters, BN eps ~ 0: exact up to float32 rounding of the updates; the moments see
        # the unscaled gradients (the hook runs inside scaler.step, after unscale_).
        assert row["error_exact"] < 1e-5 and not any(a.startswith("from step") for a in row["assumptions"]), row


def test_bf16_autocast_is_tracked_with_its_precision():
    model = _float32_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    tracker = nmx.SymmetryTracker(model, opt, families=BN_MLP_FAMILIES)
    X, Y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    for _ in range(10):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(X), Y)
        loss.backward()
        opt.step()
    for row in tracker.summary():
        # A bf16 forward keeps the symmetries only to bf16 precision (~4e-3): the residual says so and
        # the exact prediction drifts by about that much, no more.
        assert row["residual"] < 5e-2 and row["error_exact"] < 1e-2, row


def test_non_finite_gradient_is_flagged_from_its_step():
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = nmx.SymmetryTracker(model, opt, families=BN_MLP_FAMILIES)
    X, Y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    for step in range(6):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        if step == 2:
            model[3].weight.grad[1, 1] = float("nan")
        opt.step()
    rows = {r["family"]: r for r in tracker.summary()}
    for name in ("3 (columns)", "1 -> 3"):
        assert rows[name]["assumptions"][0].startswith("from step 2: non-finite"), rows[name]
        assert np.isnan(tracker.history()[name]["exact"][3:]).all()
    # Families whose tensors stayed finite keep their exact prediction up to the step where the NaN
    # reached them through the forward pass (step 3 here).
    assert np.isfinite(tracker.history()["0 (scale)"]["exact"][:3]).all()


def test_gradient_accumulation_gives_one_record_per_optimizer_step():
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = nmx.SymmetryTracker(model, opt, families=BN_MLP_FAMILIES)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        for _ in range(4):
            X, Y = torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (16,), generator=gen)
            (F.cross_entropy(model(X), Y) / 4).backward()
        opt.step()
    assert tracker.step == 5
    for row in tracker.summary():
        assert row["steps"] == 5 and row["error_exact"] < 1e-12


KILLED_RUN = textwrap.dedent("""
    import sys, time, torch, torch.nn.functional as F
    sys.path.insert(0, {tests!r})
    import neural_mechanics_ext as nmx
    from test_tracker import BN_MLP_FAMILIES, bn_mlp
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = nmx.SymmetryTracker(model, opt, families=BN_MLP_FAMILIES, flush_every=10, out_dir={out!r})
    X, Y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    step = 0
    while True:
        opt.zero_grad(); F.cross_entropy(model(X), Y).backward(); opt.step(); step += 1
        if step == 35:
            print("ready", flush=True)
        time.sleep(0.002)
""")


def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path):
    out = str(tmp_path / "run")
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), out=out)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    history = read_run(out)
    steps = history["0 (scale)"]["step"]
    # Blocks of 10 steps are processed one flush late: at least 20 of the 35+ steps are on disk, in
    # whole blocks, and every file parses.
    assert len(steps) >= 20 and len(steps) % 10 == 0 and np.array_equal(steps, np.arange(len(steps)))
    # The sinks write a block one file after the other (csv, jsonl, then the npz): a kill between two of
    # them leaves the earlier files one block ahead, never half a block.
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    csv_lines = open(os.path.join(out, "metrics.csv")).read().splitlines()[1:]
    import json
    for line in lines:
        json.loads(line)
    per_step = len(BN_MLP_FAMILIES)
    for rows in (lines, csv_lines):
        assert len(rows) % (10 * per_step) == 0
    assert len(steps) <= len(lines) // per_step <= len(csv_lines) // per_step <= len(steps) + 10
