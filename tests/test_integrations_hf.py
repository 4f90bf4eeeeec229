"""The transformers.Trainer callback against the real Trainer: a tiny Llama, AdamW with weight decay off for
norms, warmup + cosine, gradient accumulation 2, bf16 autocast on CPU.

The reference values are recomputed by plain torch in the Trainer's own ``on_pre_optimizer_step`` event
(after accumulation and clipping, before the step), independently of the tracker's hook.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from neural_mechanics_ext import SymmetryFamily, find_symmetries  # noqa: E402
from neural_mechanics_ext.integrations.core import STATE_FILE, scalar_key  # noqa: E402
from neural_mechanics_ext.integrations.huggingface import SymmetryCallback  # noqa: E402
from neural_mechanics_ext.sinks import read_run  # noqa: E402
from neural_mechanics_ext.views import full, strided  # noqa: E402

STEPS, ACCUMULATION, BATCH = 4, 2, 2


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def dataset():
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(STEPS * ACCUMULATION * BATCH):
        ids = torch.randint(0, 64, (16,), generator=g)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def arguments(out, **kw) -> TrainingArguments:
    base = dict(max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=1,
                optim="adamw_torch", bf16=True, use_cpu=True, logging_steps=2, save_strategy="no", report_to=[],
                disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(str(out), **base)


class Reference(TrainerCallback):
    """Per step and family: the per-group values of the parameters and of their gradients, by plain torch in
    float64, when the Trainer is about to step (the tracker's families are read when they exist)."""

    def __init__(self, symmetry: SymmetryCallback):
        self.symmetry, self.values, self.grad_sq = symmetry, [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = dict(model.named_parameters())
        values, grads = {}, {}
        for f in self.symmetry.tracker.families:
            v = g = 0
            for name, view, sign in f.members:     # views of part of a tensor too (Q/K, V/O under GQA)
                cut = full(view, named[name].numel())
                p = strided(named[name].detach().double().reshape(-1), cut)
                v = v + (sign * p.pow(2).sum((0, 2)) if f.kind != "translation" else p.sum((0, 2)))
                g = g + strided(named[name].grad.double().reshape(-1), cut).pow(2).sum((0, 2))
            values[f.name], grads[f.name] = v.numpy(), g.numpy()
        self.values.append(values)
        self.grad_sq.append(grads)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(out, callbacks, resume=None, **kw):
    trainer = Trainer(model=tiny_llama(), args=arguments(out, **kw), train_dataset=dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_full")
    symmetry = SymmetryCallback()
    reference = Reference(symmetry)
    reporters = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    trainer = train(out, [symmetry, reference], report_to=reporters)
    return out, trainer, symmetry, reference


def test_one_record_per_optimizer_step_equal_to_the_parameters(full_run):
    out, trainer, symmetry, reference = full_run
    tracker = symmetry.tracker
    # 4 optimizer steps of 2 micro-batches each: 4 records, not 8.
    assert tracker.step == STEPS and len(reference.values) == STEPS
    assert len(tracker.families) >= 2   # the two SwiGLU rescale families (up_proj -> down_proj) at least
    history = tracker.history()
    for f in tracker.families:
        h = history[f.name]
        assert list(h["step"]) == list(range(STEPS))
        expected = np.stack([r[f.name] for r in reference.values])
        np.testing.assert_allclose(h["empirical"], expected, rtol=1e-9, atol=1e-12)
        # AdamW is inside the theory (THEORY_ADAPTIVE): the exact replay is there from the first step.
        assert np.isfinite(h["exact"]).all()
    assert not any("outside the theory" in " ".join(r["assumptions"]) for r in tracker.summary())


def test_the_trainer_log_holds_the_scalars(full_run):
    out, trainer, symmetry, reference = full_run
    history = symmetry.tracker.history()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]   # logging_steps=2
    for entry in logged:
        for f in symmetry.tracker.families:
            key = f"symmetry/{scalar_key(f.name)}/empirical"
            # global step s closes the tracker's step s - 1
            assert entry[key] == pytest.approx(history[f.name]["empirical_sum"][entry["step"] - 1], rel=1e-12)
            assert f"symmetry/{scalar_key(f.name)}/exact" in entry        # AdamW's exact replay
            # NaN under AdamW (the stream carries p and u, not g): not logged
            assert f"symmetry/{scalar_key(f.name)}/residual" not in entry


def test_report_to_receives_the_scalars(full_run):
    """TensorBoard (a report_to callback, listed before the user's callbacks) got them: the callback puts
    them in the logs before the reporters read them."""
    out, trainer, symmetry, reference = full_run
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(out, "runs")) for f in files
              if f.startswith("events.out.tfevents")]
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for f in symmetry.tracker.families:
        assert f"train/symmetry/{scalar_key(f.name)}/empirical" in tags


def test_the_run_folder_is_a_report_run(full_run):
    out, trainer, symmetry, reference = full_run
    from neural_mechanics_ext.runfolder import load_run
    run = load_run(os.path.join(out, "symmetry"))
    assert run["summary"]["status"] == "finished" and run["summary"]["steps"] == STEPS
    assert {f["name"] for f in run["families"]} == {f.name for f in symmetry.tracker.families}
    assert "AdamW" in run["config"]["optimizer"]
    for name, h in symmetry.tracker.history().items():
        np.testing.assert_array_equal(run["history"][name]["empirical"], h["empirical"])
    assert list(run["train_log"]["step"]) == [2, 4]


def test_a_resumed_run_continues_the_history_exactly(full_run, tmp_path):
    _, _, straight, _ = full_run
    first = SymmetryCallback()
    train(tmp_path, [first, StopAt(2)], save_strategy="steps", save_steps=2)
    assert first.tracker.step == 2 and os.path.exists(tmp_path / "checkpoint-2" / STATE_FILE)
    resumed = SymmetryCallback()
    train(tmp_path, [resumed], resume=True, save_strategy="steps", save_steps=2)
    assert resumed.tracker.step == STEPS
    expected, got = straight.tracker.history(), resumed.tracker.history()
    assert set(got) == set(expected)
    for name in expected:
        for column in ("step", "empirical", "magnitude", "residual", "t", "lr"):
            np.testing.assert_allclose(got[name][column], expected[name][column], rtol=1e-12, atol=0,
                                       err_msg=f"{name} {column}")
    # The run folder holds every step once: the part after the checkpoint was rewritten, not appended.
    files = read_run(os.path.join(tmp_path, "symmetry"))
    for name in expected:
        assert list(files[name]["step"]) == list(range(STEPS))


def test_resume_without_a_saved_tracker_says_what_to_do(tmp_path):
    train(tmp_path, [StopAt(2)], save_strategy="steps", save_steps=2)
    with pytest.raises(FileNotFoundError, match="resume_from"):
        train(tmp_path, [SymmetryCallback()], resume=True, save_strategy="steps", save_steps=2)


def test_given_families_and_the_gradients_the_optimizer_steps_with(tmp_path):
    """families= skips discovery; a (declared) scale family also records |g_A|², which must be the gradient
    after both micro-batches, unscaled and clipped: what on_pre_optimizer_step sees.  SGD: under AdamW the
    tracker streams (p, u), not g."""
    rows = SymmetryFamily("scale", "declared rows of down_proj",
                          [("model.layers.0.mlp.down_proj.weight", (1, 32, 64), 1)], manual=True)
    symmetry = SymmetryCallback(families=[rows], log_fields=("empirical",))
    reference = Reference(symmetry)
    train(tmp_path, [symmetry, reference], max_grad_norm=0.05, optim="sgd")
    h = symmetry.tracker.history()[rows.name]
    np.testing.assert_allclose(h["grad_sq"], np.stack([r[rows.name] for r in reference.grad_sq]), rtol=1e-9)
    np.testing.assert_allclose(h["empirical"], np.stack([r[rows.name] for r in reference.values]), rtol=1e-9)


def test_discovery_uses_the_models_own_loss_and_matches_find_symmetries():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    direct = find_symmetries(model, {"input_ids": ids, "labels": ids}, loss=lambda o, _: o.loss, targets=ids)
    from neural_mechanics_ext.integrations.core import discover
    via = discover(model, {"input_ids": ids, "labels": ids})
    assert [f.name for f in via] == [f.name for f in direct]
    with pytest.raises(ValueError, match="labels"):
        discover(model, {"input_ids": ids})   # no labels: the model computes no loss
