"""``neural-mechanics demo / train / report`` end to end, on tiny configurations (seconds each).

The demo runs as a real subprocess (``python -m neural_mechanics_ext``), once for the module; an
interrupted run is made both ways a user makes one: Ctrl-C (SIGINT: the run closes the tracker, writes
summary.json and the report, exits 130) and a kill (SIGKILL: no summary.json; ``report`` recomputes
what it needs from the metrics files).
"""
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from neural_mechanics_ext.app import cli
from neural_mechanics_ext.summary import errors_from_history
from neural_mechanics_ext.runfolder import read_train_log
from neural_mechanics_ext.app.commands import train_config
from neural_mechanics_ext.app.runner import RunConfig, run_training
from neural_mechanics_ext.sinks import read_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "16", "--calibrate-steps", "4", "--flush-every", "5"]


def cli_process(*args, **kw):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "neural_mechanics_ext", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "demo")
    proc = cli_process("demo", "--steps", "12", "--out", out, *TINY)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return out, stdout, stderr


def test_cli_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for name in ("demo", "train", "report"):
        assert name in text


def test_demo_end_to_end(demo_run):
    out, stdout, stderr = demo_run
    for name in ("config.json", "environment.json", "families.txt", "families.json", "summary.json",
                 "metrics.csv", "metrics.jsonl", "train_log.csv", "raw_weights.csv", "raw_weights.json",
                 "report.html", "figures/fig5_scale.png", "figures/fig5_rescale.png",
                 "figures/fig5_translation.png", "figures/fig1_filters.png", "figures/residuals.png",
                 "figures/scale_rates.png", "figures/training.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert len(glob.glob(os.path.join(out, "groups", "block-*.npz"))) >= 3   # 12 steps, a block per 5
    assert not os.path.exists(os.path.join(out, "tensorboard"))              # only with --tensorboard
    # The printed summary: families per kind, the error table, both overheads, the report's path.
    assert "Families found: 19 (5 scale, 7 translation, 7 rescale)" in stdout
    assert "classifier.fc1 → classifier.fc2 (rescale)" in stdout
    assert "Tracking overhead:" in stdout and "measured directly (median over " in stdout
    assert "interleaved blocks of" in stdout
    assert f"Report: {os.path.join(out, 'report.html')}" in stdout
    assert "training" in stderr            # the progress bar
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["model"], config["steps"], config["batch_size"], config["momentum"]) == ("demo", 12, 16, 0.9)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "finished" and summary["steps"] == 12
    assert summary["overhead"]["direct"]["steps"] == 4 and summary["overhead"]["timers"]["percent"] > 0
    env = json.load(open(os.path.join(out, "environment.json")))
    assert env["neural_mechanics_ext"]["compiled"] is True and env["torch"]
    log = read_train_log(out)
    assert log["step"].tolist() == list(range(12)) and np.all(np.isfinite(log["loss"]))
    assert "features.conv1_1 (scale, BN features.bn1_1)" in open(os.path.join(out, "families.txt")).read()


def test_metrics_files_agree_with_the_summary(demo_run):
    out = demo_run[0]
    summary = json.load(open(os.path.join(out, "summary.json")))
    families = json.load(open(os.path.join(out, "families.json")))
    history = read_run(out)
    lines = open(os.path.join(out, "metrics.csv")).read().splitlines()
    assert len(lines) == 1 + 12 * len(families)
    recomputed = {r["family"]: r for r in errors_from_history(history, families)}
    for row in summary["families"]:
        again = recomputed[row["family"]]
        assert again["steps"] == row["steps"] == 12
        for key in ("error_exact", "error_paper", "error_modified", "residual"):
            if row[key] is None:
                assert again[key] is None
            else:  # every step is logged (log_every=1), so the maxima are the same numbers
                assert again[key] == pytest.approx(row[key], rel=1e-12, abs=1e-300), (row["family"], key)


def test_report_command_redraws_a_finished_run(demo_run, capsys):
    out = demo_run[0]
    before = os.path.getmtime(os.path.join(out, "report.html"))
    os.remove(os.path.join(out, "figures", "training.png"))
    time.sleep(0.01)
    assert cli.main(["report", out]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "report.html")
    assert os.path.getmtime(os.path.join(out, "report.html")) > before
    assert os.path.exists(os.path.join(out, "figures", "training.png"))


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


# ---- interrupted runs -----------------------------------------------------------------------------
def _wait_for_blocks(out, count, proc, timeout=120):
    start = time.time()
    while len(glob.glob(os.path.join(out, "groups", "block-*.npz"))) < count:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - start < timeout, "the run wrote no metrics"
        time.sleep(0.2)


def test_ctrl_c_closes_the_run_cleanly(tmp_path):
    out = str(tmp_path / "run")
    proc = cli_process("demo", "--steps", "1500", "--out", out, "--no-progress", "--batch-size", "8",
                       "--calibrate-steps", "0", "--flush-every", "3", "--no-report")
    _wait_for_blocks(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and f"neural-mechanics report {out}" in stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "interrupted" and 6 <= summary["steps"] < 1500
    # The tracker was closed: every step taken is in the metrics (1500 steps: every step logged),
    # not only the flushed blocks.
    history = read_run(out)
    assert all(len(h["step"]) == summary["steps"] for h in history.values())


def test_report_on_a_killed_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    proc = cli_process("demo", "--steps", "1500", "--out", out, "--no-progress", "--batch-size", "8",
                       "--calibrate-steps", "0", "--flush-every", "3")
    _wait_for_blocks(out, 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert not os.path.exists(os.path.join(out, "summary.json"))
    assert cli.main(["report", out]) == 0
    html = open(os.path.join(out, "report.html")).read()
    assert "This run has no summary.json" in html and "computed from the logged history" in html
    assert os.path.exists(os.path.join(out, "figures", "fig5_scale.png"))
    families = json.load(open(os.path.join(out, "families.json")))
    rows = errors_from_history(read_run(out), families)
    for r in rows:
        if r["error_exact"] is not None:
            assert f'data-value="{float(r["error_exact"])!r}"' in html


def test_keyboard_interrupt_in_process_writes_summary_and_report(tmp_path):
    def stop(step):
        if step == 7:
            raise KeyboardInterrupt

    c = RunConfig(command="train", model="mlp", out=str(tmp_path / "run"), steps=50, batch_size=8,
                  train_samples=128, test_samples=16, image_size=8, calibrate_steps=0, flush_every=5,
                  progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_training(c, on_step=stop, log=lambda s: None)
    out = str(tmp_path / "run")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["status"] == "interrupted" and summary["steps"] == 7 and summary["test_accuracy"] is None
    assert len(read_train_log(out)["step"]) == 7
    assert "This run was interrupted" in open(os.path.join(out, "report.html")).read()


# ---- train ----------------------------------------------------------------------------------------
def _train_args(*args):
    return cli.build_parser().parse_args(["train", *args])


def test_train_errors_are_clear(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "no-such-dir"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no-such-dir does not exist" in err and "cifar-10-batches-py" in err
    assert cli.main(["train", "--model", "vgg19", "--steps", "1"]) == 2
    assert "unknown model 'vgg19'; known models: demo, vgg16, vgg16_bn, resnet18, mlp" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "paper-vgg16-bn"]) == 2
    assert "needs --data DIR: Tiny ImageNet" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "paper-vgg16", "--data", str(tmp_path / "tiny")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "paper-resnet"])
    if not torch.cuda.is_available():
        assert cli.main(["train", "--device", "cuda", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_presets_follow_the_paper_and_explicit_options_win():
    c = train_config(_train_args("--preset", "paper-vgg16-bn", "--data", "/data/tiny-imagenet-200"))
    assert (c.model, c.lr, c.momentum, c.batch_size, c.epochs, c.weight_decay, c.image_size) == \
        ("vgg16_bn", 0.1, 0.0, 256, 100, 5e-4, 64)
    c = train_config(_train_args("--preset", "paper-vgg16-momentum", "--data", "d", "--weight-decay", "1e-3",
                                 "--dampening", "0.01", "--momentum", "0.99"))
    assert (c.model, c.momentum, c.dampening, c.batch_size, c.weight_decay) == ("vgg16", 0.99, 0.01, 128, 1e-3)
    c = train_config(_train_args("--model", "resnet18", "--lr", "0.2", "--nesterov", "--schedule", "multistep",
                                 "--milestones", "3", "6", "--epochs", "9"))
    assert (c.model, c.lr, c.nesterov, c.schedule, c.milestones, c.epochs, c.data) == \
        ("resnet18", 0.2, True, "multistep", [3.0, 6.0], 9.0, "generated")


def test_adaptive_optimizers_get_their_own_defaults_and_explicit_options_win():
    from neural_mechanics_ext.app.models import build_model
    from neural_mechanics_ext.app.report import optimizer_text
    from neural_mechanics_ext.app.runner import make_optimizer
    model = build_model("mlp", 10, image_size=8)
    c = train_config(_train_args("--optimizer", "adamw")).resolved()
    assert (c.lr, c.weight_decay, c.betas, c.eps) == (1e-3, 1e-2, [0.9, 0.999], 1e-8)
    opt = make_optimizer(model, c)
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 1e-2
    assert optimizer_text(dataclasses.asdict(c)) == "AdamW lr 0.001, betas (0.9, 0.999), eps 1e-08, decoupled weight decay 0.01"
    c = train_config(_train_args("--optimizer", "adam", "--lr", "3e-4", "--betas", "0.8", "0.99", "--eps", "1e-6",
                                 "--weight-decay", "1e-4")).resolved()
    opt = make_optimizer(model, c)
    assert type(opt) is torch.optim.Adam
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == \
        (3e-4, (0.8, 0.99), 1e-6, 1e-4)
    assert train_config(_train_args()).resolved().optimizer == "sgd"
    assert train_config(_train_args()).resolved().lr == 0.05
    lion = pytest.importorskip("lion_pytorch")
    c = train_config(_train_args("--optimizer", "lion", "--weight-decay", "0.1")).resolved()
    opt = make_optimizer(model, c)
    assert isinstance(opt, lion.Lion) and opt.defaults["lr"] == 1e-4 and opt.defaults["betas"] == (0.9, 0.99)


def test_train_on_an_image_folder(tmp_path, capsys):
    from test_data_models import make_tiny_imagenet
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200", per_class=8)
    out = str(tmp_path / "run")
    rc = cli.main(["train", "--model", "mlp", "--data", str(root), "--steps", "6", "--batch-size", "4",
                   "--workers", "0", "--out", out, "--no-progress", "--no-report", "--calibrate-steps", "0",
                   "--momentum", "0", "--schedule", "cosine", "--lr", "0.1"])
    assert rc == 0, capsys.readouterr().err
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["num_classes"], config["image_size"], config["schedule"]) == (2, 8, "cosine")
    log = read_train_log(out)
    assert log["lr"][0] == 0.1 and log["lr"][-1] < 0.1          # the cosine schedule ran per step
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["test_accuracy"] is not None                    # val/ with val_annotations.txt
    kinds = {r["kind"] for r in summary["families"]}
    assert kinds == {"rescale", "translation"}
    # The exact prediction follows a schedule (t = Σ η, THEORY D1): rounding-level for an MLP.
    assert max(r["error_exact"] for r in summary["families"]) < 1e-4


def test_train_exact_mode_agrees_to_rounding(tmp_path):
    c = RunConfig(command="train", model="demo", out=str(tmp_path / "run"), steps=8, batch_size=8,
                  train_samples=64, test_samples=0, image_size=16, calibrate_steps=0, progress=False,
                  report=False, exact=True)
    out = run_training(c, log=lambda s: None)
    summary = json.load(open(os.path.join(out, "summary.json")))
    for r in summary["families"]:
        if not r["near_zero"]:
            assert r["error_exact"] < 1e-9, r
