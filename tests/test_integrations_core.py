"""What both framework callbacks share (integrations/core.py), without any framework: the wrappers they see
through, the setups they refuse, the batch cut for discovery, the checkpoint encoding, the message for a
model without families; and that importing the library imports no framework."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import neural_mechanics_ext as nmx
from neural_mechanics_ext.integrations.core import (TrackedRun, decode, encode, first_samples, plain_model,
                                                    refuse_unsupported, scalar_key, torch_optimizer)


def test_importing_the_library_imports_no_framework():
    code = ("import sys, neural_mechanics_ext, neural_mechanics_ext.integrations.core; print(sorted(m for m in "
            "('transformers', 'lightning', 'accelerate', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _wrapper(module: str, inner, attr="optimizer"):
    cls = type("Wrapper", (), {"__module__": module})
    w = cls()
    setattr(w, attr, inner)
    return w


def test_the_torch_optimizer_is_found_under_framework_wrappers():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert torch_optimizer(opt) is opt
    assert torch_optimizer(_wrapper("accelerate.optimizer", opt)) is opt
    assert torch_optimizer(_wrapper("lightning.pytorch.core.optimizer", _wrapper("accelerate.optimizer", opt),
                                    "_optimizer")) is opt
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        torch_optimizer(_wrapper("accelerate.optimizer", object()))


def test_deepspeed_and_fsdp1_are_refused_with_what_to_do_instead():
    zero = _wrapper("deepspeed.runtime.zero.stage_1_and_2", None)
    with pytest.raises(ValueError, match="DeepSpeed.*FSDP2"):
        torch_optimizer(_wrapper("accelerate.utils.deepspeed", zero))
    fsdp1 = type("FullyShardedDataParallel", (torch.nn.Module,), {})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), fsdp1())
    with pytest.raises(ValueError, match="FSDP1.*FSDP2"):
        plain_model(model)
    ddp_like = torch.nn.DataParallel(torch.nn.Linear(2, 2))
    assert plain_model(ddp_like) is ddp_like.module


def test_fused_optimizer_under_a_grad_scaler_is_refused():
    params = torch.nn.Linear(2, 2).parameters()
    opt = torch.optim.AdamW(params, lr=0.1)
    opt._step_supports_amp_scaling = True   # what fused=True sets (fused needs a device kernel here)
    with pytest.raises(ValueError, match="adamw_torch"):
        refuse_unsupported(opt, scaler_active=True)
    refuse_unsupported(opt, scaler_active=False)   # bf16 / fp32: fine
    with pytest.raises(ValueError, match="LBFGS"):
        refuse_unsupported(torch.optim.LBFGS(torch.nn.Linear(2, 2).parameters()), scaler_active=False)


def test_first_samples_cuts_the_batch_dimension_only():
    batch = {"input_ids": torch.zeros(16, 5), "labels": torch.ones(16, 5), "num_items_in_batch": torch.tensor(80),
             "extra": [torch.zeros(16), "text"]}
    cut = first_samples(batch, 4)
    assert cut["input_ids"].shape == (4, 5) and cut["labels"].shape == (4, 5)
    assert cut["num_items_in_batch"].item() == 80 and cut["extra"][0].shape == (4,) and cut["extra"][1] == "text"
    x, y = first_samples((torch.zeros(3, 2), torch.zeros(3)), 8)   # fewer than asked: unchanged
    assert x.shape == (3, 2) and y.shape == (3,)


def test_checkpoint_state_round_trips_through_weights_only_loading(tmp_path):
    state = {"a": np.arange(6.0).reshape(2, 3), "b": [np.float64(1.5), (np.int64(2), "s")], "c": torch.ones(2),
             "d": None}
    path = tmp_path / "s.pt"
    torch.save(encode(state), path)
    back = decode(torch.load(path, weights_only=True))
    np.testing.assert_array_equal(back["a"], state["a"])
    assert isinstance(back["a"], np.ndarray) and back["b"] == [1.5, (2, "s")] and back["d"] is None
    assert torch.equal(back["c"], state["c"])


def test_scalar_keys_are_logger_safe():
    assert scalar_key("model.layers.0.mlp.up_proj → model.layers.0.mlp.down_proj (rescale)") == \
        "model.layers.0.mlp.up_proj_to_model.layers.0.mlp.down_proj_rescale"
    assert scalar_key("fc (translation, bias)") == "fc_translation_bias"


def test_a_model_without_families_gets_a_clear_message_and_no_tracker(tmp_path):
    model = torch.nn.Linear(3, 3)
    run = TrackedRun(str(tmp_path), ("empirical",), True, {})
    with pytest.warns(UserWarning, match="no symmetry family"):
        assert run.start(model, torch.optim.SGD(model.parameters(), lr=0.1), [], {}) is None
    assert run.scalars() == {} and run.tracker is None
    saved = run.state_dict(3)   # a checkpoint of such a run resumes into the same nothing, without an error
    assert saved["families"] == [] and saved["step"] == 3 and TrackedRun.families_of(saved) == []
    run.finish("finished", {})   # nothing to write, no error


def test_options_the_callback_owns_are_refused():
    with pytest.raises(TypeError, match="sinks"):
        TrackedRun(".", (), False, {"sinks": []})
    with pytest.raises(ValueError, match="log_fields"):
        TrackedRun(".", ("nonsense",), False, {})


def test_a_step_the_grad_scaler_skips_leaves_no_record():
    """What the callbacks rely on for fp16: the hook sits on the torch optimizer's step, which GradScaler does
    not call when a gradient overflowed (CPU GradScaler here; the CUDA one behaves the same)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    tracker = nmx.SymmetryTracker(model, opt, x)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for poison in (False, True, False):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert tracker.step == 2   # three steps asked, the overflowed one skipped
    assert all(len(h["step"]) == 2 for h in tracker.history().values())
