"""The tracker's parts on their own: the optimizer seam (which theory, which tensors a step reads) and the
device ring's contract that a block whose integration fails stays pending."""
import pytest
import torch
import torch.nn as nn

from neural_mechanics_ext.tracker.optimizers import theory_for
from neural_mechanics_ext.tracker.ring import DeviceRing
from neural_mechanics_ext.tracker.sgd import SGDTheory


class _SGDSubclass(torch.optim.SGD):
    pass


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("make, reason", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), None),
    (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize=True is not covered"),
    (lambda p: torch.optim.Adam(p, lr=1e-3), "Adam is outside the theory"),
    # A subclass may change the update rule: the SGD theory does not vouch for it.
    (lambda p: _SGDSubclass(p, lr=0.1), "_SGDSubclass is outside the theory"),
])
def test_the_theory_is_chosen_from_the_optimizer_type(make, reason):
    theory = theory_for(make(_model().parameters()))
    assert isinstance(theory, SGDTheory)
    assert (theory.reason is None) if reason is None else (reason in theory.reason)


def test_sgd_stream_is_the_gradient_and_the_momentum_buffer_before_the_update():
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(SGDTheory.stream(o, params)))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
        before = [opt.state[p]["momentum_buffer"].clone() for p in params] if opt.state else None
        opt.step()
    first, second = seen
    assert all(y is p.grad for y, p in zip(second.y, params))      # the tensor itself, not a copy
    assert first.z == [None] * len(params)                          # no buffer before the first step
    # The second step's z is the buffer the step then updates in place: it held `before` at the hook.
    assert all(z is opt.state[p]["momentum_buffer"] for z, p in zip(second.z, params))
    assert all(not torch.equal(z, b) for z, b in zip(second.z, before))
    record = SGDTheory.record(opt, first)
    assert record["groups"] == [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
                                 "nesterov": False}]
    assert record["no_grad"] == set() and record["no_buffer"] == set(range(len(params)))
    part = second.part(range(1, 3))
    assert part.y == second.y[1:3] and part.z == second.z[1:3]


def test_ring_keeps_blocks_pending_until_they_are_integrated():
    """A block whose integration raises (Ctrl-C) stays pending, and so does the block handed off with it;
    both are integrated, in order, at the next sync."""
    ring = DeviceRing(steps=2, slices=3, device=torch.device("cpu"))
    committed = []

    def failing(moments, records):
        raise KeyboardInterrupt

    def integrate(moments, records):
        return moments[:, 0, 0].tolist(), [r["step"] for r in records]

    rows = [torch.full((3, 9), float(i), dtype=torch.float64) for i in range(4)]
    assert not ring.push(rows[0], {"step": 0})
    assert ring.push(rows[1], {"step": 1})              # full after flush_every = 2 steps
    ring.flush(failing, committed.append)               # hands the block off; the older ones (none) are processed
    assert ring.fill == 0 and len(ring.pending) == 1 and committed == []
    ring.push(rows[2], {"step": 2})
    ring.push(rows[3], {"step": 3})
    with pytest.raises(KeyboardInterrupt):
        ring.flush(failing, committed.append)           # integrating the older block fails ...
    assert committed == [] and [[r["step"] for r in b.records] for b in ring.pending] == [[0, 1], [2, 3]]
    ring.flush(integrate, committed.append)             # nothing new to hand off: no-op
    assert committed == []
    ring.process_pending(integrate, committed.append)   # ... a sync integrates both, in order
    assert ring.pending == [] and committed == [([0.0, 1.0], [0, 1]), ([2.0, 3.0], [2, 3])]
