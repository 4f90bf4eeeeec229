"""The Lightning callback against the real ``lightning.pytorch.Trainer`` on CPU: a small conv net with
BatchNorm (scale, rescale and translation families), SGD with momentum and weight decay (so the exact
predictions run too), gradient accumulation 2, bf16 autocast.

The reference values are recomputed by plain torch in Lightning's ``on_before_optimizer_step`` hook, which
runs after the last micro-batch's backward.  Lightning runs that backward inside ``optimizer.step(closure)``,
after the optimizer's step pre-hooks: a tracker hooked there without the callback's care would see the
gradients of the first micro-batch only, and the |g_A|² check below would fail.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from neural_mechanics_ext.integrations.core import scalar_key  # noqa: E402
from neural_mechanics_ext.integrations.lightning import SymmetryCallback  # noqa: E402
from neural_mechanics_ext.sinks import read_run  # noqa: E402

STEPS, ACCUMULATION, BATCH = 4, 2, 8
BATCHES_PER_EPOCH = 4   # two optimizer steps per epoch: the checkpoint at step 2 closes an epoch


class ConvNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)


def loader():
    g = torch.Generator().manual_seed(1)
    n = BATCH * BATCHES_PER_EPOCH
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


class Reference(pl.Callback):
    """Per step and family: per-group values of the parameters and |g_A|², by plain torch in float64."""

    def __init__(self, symmetry):
        self.symmetry, self.values, self.grad_sq = symmetry, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        named = dict(pl_module.named_parameters())
        values, grads = {}, {}
        for f in self.symmetry.tracker.families:
            v = g = 0
            for name, (a, k, b), sign in f.members:
                p = named[name].detach().double().reshape(a, k, b)
                v = v + (p.sum((0, 2)) if f.kind == "translation" else sign * p.pow(2).sum((0, 2)))
                g = g + named[name].grad.double().reshape(a, k, b).pow(2).sum((0, 2))
            values[f.name], grads[f.name] = v.numpy(), g.numpy()
        self.values.append(values)
        self.grad_sq.append(grads)


def trainer(root, callbacks, checkpoints=False):
    if checkpoints:   # every 2 steps, all kept (the callback's state travels in them)
        callbacks = callbacks + [pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=2,
                                                              save_top_k=-1)]
    return pl.Trainer(default_root_dir=str(root), max_steps=STEPS, accumulate_grad_batches=ACCUMULATION,
                      accelerator="cpu", devices=1, precision="bf16-mixed", log_every_n_steps=2,
                      logger=pl.loggers.CSVLogger(str(root), name="logs"), callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoints,
                      num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl_full")
    symmetry = SymmetryCallback()
    reference = Reference(symmetry)
    t = trainer(root, [symmetry, reference], checkpoints=True)
    t.fit(ConvNet(), loader())
    return root, t, symmetry, reference


def test_one_record_per_optimizer_step_equal_to_the_parameters_and_gradients(full_run):
    root, t, symmetry, reference = full_run
    tracker = symmetry.tracker
    # conv -> BN twice: 2 scale; each BN's affine -> the next linear map across its ReLU (conv, then the
    # classifier through the average pool): 2 rescale; the classifier under cross-entropy: columns and bias.
    assert sorted((f.kind, f.num_groups) for f in tracker.families) == [
        ("rescale", 8), ("rescale", 8), ("scale", 8), ("scale", 8), ("translation", 1), ("translation", 8)]
    assert tracker.step == STEPS and len(reference.values) == STEPS   # 8 micro-batches, 4 steps
    history = tracker.history()
    for f in tracker.families:
        h = history[f.name]
        np.testing.assert_allclose(h["empirical"], np.stack([r[f.name] for r in reference.values]),
                                   rtol=1e-9, atol=1e-12, err_msg=f.name)
        if f.kind == "scale":
            np.testing.assert_allclose(h["grad_sq"], np.stack([r[f.name] for r in reference.grad_sq]),
                                       rtol=1e-9, err_msg=f.name)
    # SGD is inside the theory: the exact predictions ran on every family from the first step on.
    for row in tracker.summary():
        assert np.isfinite(row["error_exact"]), row


def test_the_loggers_receive_the_scalars(full_run):
    root, t, symmetry, reference = full_run
    import csv
    with open(os.path.join(root, "logs", "version_0", "metrics.csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if any(k.startswith("symmetry/") and r[k] for k in r)]
    assert [int(r["step"]) for r in rows] == [2, 4]   # log_every_n_steps=2
    history = symmetry.tracker.history()
    for r in rows:
        for f in symmetry.tracker.families:
            key = f"symmetry/{scalar_key(f.name)}"
            assert float(r[f"{key}/empirical"]) == pytest.approx(history[f.name]["empirical_sum"][int(r["step"]) - 1],
                                                                 rel=1e-6)
            assert r[f"{key}/exact"] != ""   # SGD: predictions are logged


def test_the_run_folder_is_written(full_run):
    root, t, symmetry, reference = full_run
    from neural_mechanics_ext.runfolder import load_run
    run = load_run(os.path.join(root, "symmetry"))
    assert run["summary"]["status"] == "finished" and run["summary"]["steps"] == STEPS
    assert "SGD" in run["config"]["optimizer"]
    for name, h in symmetry.tracker.history().items():
        np.testing.assert_array_equal(run["history"][name]["exact"], h["exact"])


def test_a_resumed_run_continues_the_history_exactly(full_run, tmp_path):
    root, _, straight, _ = full_run
    ckpt = [os.path.join(root, "ckpt", n) for n in os.listdir(os.path.join(root, "ckpt")) if "step=2" in n]
    assert len(ckpt) == 1
    ckpt = ckpt[0]
    assert torch.load(ckpt, weights_only=True)["callbacks"]   # the tracker state is plain tensors and numbers
    resumed = SymmetryCallback()
    trainer(tmp_path, [resumed]).fit(ConvNet(), loader(), ckpt_path=ckpt)
    assert resumed.tracker.step == STEPS
    expected, got = straight.tracker.history(), resumed.tracker.history()
    for name in expected:
        for column in ("step", "empirical", "exact", "paper", "residual", "t"):
            np.testing.assert_allclose(got[name][column], expected[name][column], rtol=1e-12, atol=0,
                                       err_msg=f"{name} {column}")
    assert resumed.tracker.summary() == straight.tracker.summary()
    files = read_run(os.path.join(tmp_path, "symmetry"))
    assert all(list(files[name]["step"]) == list(range(STEPS)) for name in expected)


def test_the_optimizer_step_is_given_back(full_run):
    root, t, symmetry, reference = full_run
    assert "step" not in t.optimizers[0].__dict__   # the closure-first wrapper is removed at the end


def test_unsupported_strategies_are_refused_with_what_to_do():
    callback = SymmetryCallback()

    class FSDPStrategy:   # Lightning's FSDP1 strategy, by name
        pass

    class Fake:
        strategy = FSDPStrategy()

    with pytest.raises(ValueError, match="FSDP2"):
        callback.setup(Fake(), None, "fit")


def test_the_closure_runs_before_the_step_hooks_and_scheduler_marks_survive():
    """What the callback does to the optimizer's step, alone: the hooks see the closure's gradients, the
    result is the closure's loss, an LR scheduler's mark is kept (no 'overridden' warning), and undoing it
    gives back the step that was there."""
    import warnings
    from neural_mechanics_ext.integrations.lightning import _restore_step, _run_closure_before_hooks
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    before = opt.step
    _run_closure_before_hooks(opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(model.weight.grad.clone()))

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(closure)
        scheduler.step()
    assert isinstance(loss, torch.Tensor) and loss.requires_grad   # the closure's loss is returned
    assert torch.equal(seen[0], torch.ones(1, 2))   # d(sum(w·1 + b))/dw = 1: the closure ran first
    _restore_step(opt)
    assert opt.step == before
