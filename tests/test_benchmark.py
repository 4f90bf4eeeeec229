"""Smoke test of the benchmark suite's plumbing on tiny sizes (never a timing assertion)."""
import json
import math
import os

import pytest
import torch

import neural_mechanics_ext as nmx
from neural_mechanics_ext import bench as B
from neural_mechanics_ext.app.cli import main


def test_written_out_shapes_match_torchvision():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        for name, build, shapes in (("vgg16_bn", torchvision.models.vgg16_bn, B.vgg16_bn_shapes()),
                                    ("resnet50", torchvision.models.resnet50, B.resnet50_shapes())):
            want = [(n, tuple(p.shape)) for n, p in build().named_parameters()]
            assert shapes == want, name


def test_sets_views_cover_every_tensor():
    gpt2 = B.gpt2_set()
    # GPT-2 small: 124.4 M parameters (the LM head is tied to wte).
    assert abs(gpt2.numel - 124_439_808) == 0
    for pset in (B.vgg16_bn_set(), B.resnet50_set(), gpt2, B.scaling_set(10_000), B.count_set(4096, 16),
                 B.shrink(B.vgg16_bn_set(), 16)):
        assert len(pset.views) == len(pset.shapes)
        for (_, shape), views in zip(pset.shapes, pset.views):
            assert all(math.prod(v) == math.prod(shape) for v in views)
    assert B.vgg16_bn_set().numel == 138_365_992
    # columns where documented: classifier Linear weights of vgg, fc of resnet, c_attn / c_fc / wte of gpt2
    assert sum(len(v) == 2 for v in B.vgg16_bn_set().views) == 3
    assert sum(len(v) == 2 for v in B.resnet50_set().views) == 1
    assert sum(len(v) == 2 for v in gpt2.views) == 25


def test_run_case_records_every_peer():
    pset = B.shrink(B.resnet50_set(), 32)
    rec = B.run_case(pset, torch.device("cpu"), torch.bfloat16, ["ours", "reference", "foreach_norm", "stream"],
                     rounds=2, min_time=0.0, slow_budget=5.0)
    assert rec["grad_dtype"] == "bf16" and rec["tensors"] == pset.num_tensors
    assert rec["bytes"] == pset.numel * (4 + 2 + 4)
    for name in ("ours", "reference", "foreach_norm", "stream"):
        p = rec["peers"][name]
        assert p["status"] == "ok" and p["seconds"]["n"] >= 1 and p["gbps"] > 0
        if name != "ours":
            assert p["ratio"]["median"] > 0
    assert rec["peers"]["ours"]["max_rel_error"] < 1e-12
    assert rec["floor"]["fraction"]["n"] >= 1 and set(rec["floor"]["winner"]) <= set(B.READ_PEERS)


def test_compile_failure_is_reported_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    rec = B.run_case(B.count_set(1024, 2), torch.device("cpu"), torch.float32, ["ours", "compiled"], rounds=1,
                     min_time=0.0)
    assert rec["peers"]["compiled"]["status"] == "compile failed: RuntimeError: inductor exploded"
    assert "compiled" in B.moments_table([rec])


def test_measure_interleaves_and_limits_slow_peers():
    calls = []
    peers = {name: (lambda name=name: calls.append(name)) for name in ("ours", "a", "slow")}
    # "slow" took 1.5 s in a call made before (a reference's check): that call is its round 0, and a
    # round of it (sizing call + timed call, 3 s) fits twice into slow_budget=7: it runs in round 1 only.
    m = B.measure(peers, rounds=4, min_time=0.0, slow_budget=7.0, first={"slow": 1.5})
    assert all(t is not None for t in m.seconds["ours"] + m.seconds["a"]) and len(m.seconds["ours"]) == 4
    assert m.seconds["slow"][0] == 1.5 and m.seconds["slow"][1] is not None and m.seconds["slow"][2:] == [None, None]
    runs = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]   # each timer call is >= 1 call
    # warm-up of ours and a; round 0: ours, a; round 1 (rotated by one): a, slow, ours; rounds 2, 3: ours, a
    assert runs == ["ours", "a", "ours", "a", "slow", "ours", "a", "ours", "a"]
    assert set(m.measurements) == {"ours", "a", "slow"} and m.measurements["ours"].description == "ours"
    r = B.paired_ratios([2.0, None, 6.0], [1.0, 1.0, 2.0])
    assert r["n"] == 2 and r["median"] == 2.5


def tiny_workload(device):
    """A float32 MLP with BatchNorm: the --model factory of the smoke test."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.ReLU(),
                                   torch.nn.Linear(12, 4)).to(device)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=gen).to(device)
    y = torch.randint(0, 4, (16,), generator=gen).to(device)
    families = [nmx.SymmetryFamily("scale", "0 (scale)", [("0.weight", (1, 12, 6), 1), ("0.bias", (1, 12, 1), 1)]),
                nmx.SymmetryFamily("translation", "3 (columns)", [("3.weight", (4, 12, 1), 1)])]
    return B.Workload("tiny mlp", make, x, y, note="tiny", families=families)


def test_tracker_overhead_runs_every_variant_under_each_optimizer():
    rec = B.tracker_overhead(tiny_workload("cpu"), torch.device("cpu"), rounds=2, block_steps=2, warmup_steps=2,
                             flush_every=2, optimizers=("sgd", "adamw"))
    assert rec["families"] == 2 and rec["groups"] == 24
    assert [o["optimizer"] for o in rec["optimizers"]] == ["sgd", "adamw"]
    # SGD with the workload's settings, AdamW with train's defaults (app.runner.OPTIMIZERS)
    assert [o["settings"] for o in rec["optimizers"]] == [
        "SGD lr 0.01, momentum 0.9, weight decay 0.0005",
        "AdamW lr 0.001, betas (0.9, 0.999), eps 1e-08, decoupled weight decay 0.01"]
    for o in rec["optimizers"]:
        assert o["rounds"] == 2 and set(o["variants"]) == set(B.TRACKER_VARIANTS)
        for v, e in o["variants"].items():
            assert e["step_ms"]["n"] == 2 and e["step_ms"]["median"] > 0
            assert ("overhead" in e) == ("cpu_overhead" in e) == (v != "none")
            assert ("hook_ms_per_step" in e) == ("own_share" in e) == v.startswith("ours")
    table = B.tracker_table(rec)
    # header, rule, 4 variants x 2 optimizers; the optimizer is named on its first row
    assert len(table.splitlines()) == 2 + 8 and "| adamw (2 rounds) | none |" in table
    goal = [g for g in B.evaluate_goals({"meta": {"device": "cpu"}, "tracker": rec}) if g["goal"].startswith("tracker")]
    worst = max(o["variants"]["ours-optimizer"]["overhead"]["median"] for o in rec["optimizers"])
    assert goal[0]["measured"] == worst
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        B.tracker_overhead(tiny_workload("cpu"), torch.device("cpu"), rounds=1, block_steps=1, warmup_steps=1,
                           flush_every=1, optimizers=("rmsprop",))


def test_naive_tracker_computes_the_group_moments():
    wl = tiny_workload("cpu")
    model = wl.make_model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    naive = B.NaiveTracker(model, opt, wl.families)
    for _ in range(2):
        opt.zero_grad()
        wl.loss_fn(model(wl.inputs.double()), wl.targets).backward()
        opt.step()
    naive.close()
    # step 2 (momentum buffers exist): scale family, group k: Σ θ² over row k of weight and bias
    # (before the step, which is when the pre-hook reads them) is the xx column.
    assert len(naive.history) == 2 and len(naive.history[1][0]) == 12


def test_naive_tracker_under_adamw_reads_the_update_direction():
    """Under AdamW the naive tracker's third tensor is u with θ_{k+1} = (1 − lr·λ)θ_k − lr·u: its group
    sums must match the realised update of each row (float64: to rounding)."""
    wl = tiny_workload("cpu")
    model = wl.make_model().double()
    lr, wd = 0.01, 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    naive = B.NaiveTracker(model, opt, wl.families)
    w, b = model[0].weight, model[0].bias
    for _ in range(3):
        before = torch.cat([w.detach().clone(), b.detach().clone()[:, None]], 1)   # rows of the scale groups
        opt.zero_grad()
        wl.loss_fn(model(wl.inputs.double()), wl.targets).backward()
        opt.step()
        after = torch.cat([w.detach(), b.detach()[:, None]], 1)
        u = ((1 - lr * wd) * before - after) / lr
        got = torch.tensor(naive.history[-1][0], dtype=torch.float64)   # [12 groups, 9]: x, p, u, xx, ...
        assert torch.allclose(got[:, 2], u.sum(1), rtol=1e-10, atol=1e-12)
        assert torch.allclose(got[:, 3], (before * before).sum(1), rtol=1e-12)
        assert torch.allclose(got[:, 7], (before * u).sum(1), rtol=1e-8, atol=1e-12)
    naive.close()


def test_results_file_sections_are_replaced(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    meta = B.machine_info(torch.device("cpu"))
    res = {"meta": meta, "bandwidth": {"buffer_bytes": 1e6, "read_gbps": 10.0, "read_gbps_best": 11.0,
                                       "copy_gbps": 8.0, "copy_gbps_best": 9.0}}
    res["goals"] = B.evaluate_goals(res)
    B.update_results_file(path, res, None)
    other = dict(res, meta=dict(meta, device="cuda", gpu="Some GPU"), bandwidth=dict(res["bandwidth"], read_gbps=5.0))
    B.update_results_file(path, other, None)
    res["bandwidth"] = dict(res["bandwidth"], read_gbps=20.0)
    B.update_results_file(path, res, None)
    text = open(path).read()
    assert text.startswith("# Benchmark results")
    assert text.count("<!-- nmx-bench begin cpu:") == 1 and text.count("<!-- nmx-bench begin cuda: Some GPU") == 1
    assert "read (sum) 20.0 GB/s" in text and "read (sum) 10.0 GB/s" not in text and "read (sum) 5.0 GB/s" in text


def test_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    results = tmp_path / "RESULTS.md"
    threads = torch.get_num_threads()
    rc = main(["bench", "--device", "cpu", "--quick", "--threads", "1", "--shrink", "64", "--sets", "vgg16_bn",
               "--grad-dtypes", "fp32", "--peers", "ours,foreach_norm,stream", "--repeat", "2",
               "--scaling-sizes", "1e4,4e4", "--counts", "1,4", "--count-total", "4096",
               "--sweep-peers", "ours,reference,stream", "--model", "test_benchmark:tiny_workload",
               "--tracker-rounds", "2", "--tracker-steps", "2", "--out", str(out), "--results", str(results)])
    assert rc == 0 and torch.get_num_threads() == threads
    data = json.loads((out / "results.json").read_text())
    assert [c["set"] for c in data["moments"]] == ["vgg16_bn/64"]
    assert [p["label"] for p in data["scaling"]] == ["10k", "40k"]
    assert [p["tensors"] for p in data["count"]] == [1, 4]
    assert data["tracker"]["workload"] == "tiny mlp"
    assert [o["optimizer"] for o in data["tracker"]["optimizers"]] == ["sgd", "adamw"]   # the default: both
    assert {g["goal"] for g in data["goals"]} == {g for g, _, _ in B.GOALS["cpu"]}
    assert not data["skipped"]
    md = (out / "results.md").read_text()
    assert "slice_moments on model parameter sets" in md and "Tracker overhead" in md
    assert "nmx-bench begin cpu:" in results.read_text()
    printed = capsys.readouterr().out
    assert "goal speed-up vs eager reference" in printed and "ours ms" in printed
    assert "tracker (tiny mlp, adamw): none" in printed


def test_command_refuses_an_unknown_optimizer_or_variant(capsys):
    assert main(["bench", "--device", "cpu", "--parts", "tracker", "--optimizers", "sgd,rmsprop"]) == 2
    assert "unknown optimizer 'rmsprop'" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--parts", "tracker", "--tracker-variants", "ours-optimiser"]) == 2
    assert "unknown tracker variant 'ours-optimiser'" in capsys.readouterr().err


def test_command_tracker_part_with_chosen_optimizer_and_variants(tmp_path):
    out = tmp_path / "out"
    rc = main(["bench", "--device", "cpu", "--quick", "--threads", "1", "--parts", "tracker", "--model",
               "test_benchmark:tiny_workload", "--optimizers", "adamw", "--tracker-variants", "ours-optimizer",
               "--tracker-rounds", "2", "--tracker-steps", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    (o,) = data["tracker"]["optimizers"]
    assert o["optimizer"] == "adamw" and list(o["variants"]) == ["none", "ours-optimizer"]   # the baseline too
    goal = [g for g in data["goals"] if g["goal"].startswith("tracker")][0]
    assert goal["measured"] == o["variants"]["ours-optimizer"]["overhead"]["median"] and "adamw" in goal["where"]
