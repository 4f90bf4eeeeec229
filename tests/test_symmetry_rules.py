"""Each op handler of the rule table, on a small captured graph: what it propagates (labels of its output),
what it accepts as a compensator or absorber, and what it refuses (``Dead``).

A handler is run alone: the test captures a tiny function, seeds label tensors on the values the handler
reads, calls ``PROPAGATE[op]`` on that one node and inspects the state.  Labels are group numbers (``-1``:
not perturbed); expected labels are written out by hand from the op's semantics.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from neural_mechanics_ext.symmetry.capture import capture
from neural_mechanics_ext.symmetry.rules import build_candidate, find_sources, propagate
from neural_mechanics_ext.symmetry.rules.registry import PROPAGATE
from neural_mechanics_ext.symmetry.rules.state import F64, SCALE, SHIFT, Dead, Propagation, Source

torch.set_default_dtype(torch.float64)


class _Fn(nn.Module):
    def __init__(self, fn, params):
        super().__init__()
        self.fn = fn
        for name, p in params.items():
            self.register_parameter(name, nn.Parameter(p))

    def forward(self, *xs):
        return self.fn(self, *xs)


def trace(fn, *inputs, **params):
    """Capture ``fn(module, *inputs)`` (parameters as attributes of ``module``); loss = sum of the output."""
    model = _Fn(fn, params)
    return capture(model, inputs, {}, lambda out: (out[0] if isinstance(out, tuple) else out).sum())


def node_of(graph, op, nth=0):
    return [n for n in graph.nodes if n.op == op][nth]


def run(graph, op, labels, mode=SCALE, shifts=None, k0=8, nth=0):
    """Seed ``labels`` on the node's tensor inputs (a list, in order; None: not perturbed), run the handler
    of ``op`` on that node, return ``(prop, node)``."""
    node = node_of(graph, op, nth)
    prop = Propagation(graph, Source(mode, node, "test", "units", k0, torch.zeros(1), None, []))
    tensors = [v for v in dict.fromkeys(node.inputs) if v.kind != "param"]
    for i, (v, lab) in enumerate(zip(tensors, labels)):
        if lab is not None:
            p = None if shifts is None else torch.as_tensor(shifts[i], dtype=F64).expand(v.shape).clone()
            prop.set(v, torch.as_tensor(lab, dtype=F64).expand(v.shape).clone(), p)
    args, kwargs = node.call_args()
    PROPAGATE[op](prop, node, args, kwargs)
    return prop, node


def out_labels(prop, node, i=0):
    return prop.canon(prop.g[node.outputs[i]])


def roots(prop):
    return prop.uf.table().tolist()


CH = torch.arange(4.0)          # one group per channel of a [*, 4] activation


# ---------------------------------------------------------------------- elementwise
def test_identity_copies_labels_and_keeps_shifts():
    g = trace(lambda m, x: x.clone(), torch.randn(2, 4))
    prop, node = run(g, "clone", [CH], mode=SHIFT, shifts=[[0.0]])
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    assert torch.equal(prop.p[node.outputs[0]], torch.zeros(2, 4))


def test_homogeneous_activation_passes_a_scaling_but_not_a_shift():
    g = trace(lambda m, x: F.relu(x), torch.randn(2, 4))
    prop, node = run(g, "relu", [CH])
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    with pytest.raises(Dead, match="not shift-equivariant"):
        run(g, "relu", [CH], mode=SHIFT, shifts=[[0.0]])


def test_clamp_is_relu_only_at_zero():
    g = trace(lambda m, x: x.clamp(min=0) + x.clamp(min=-1.0), torch.randn(2, 4))
    run(g, "clamp", [CH])
    with pytest.raises(Dead, match="not positively homogeneous"):
        run(g, "clamp", [CH], nth=1)


def test_dropout_keeps_a_scaling_and_ends_a_shift_in_training():
    g = trace(lambda m, x: F.dropout(x, 0.5, training=True), torch.randn(2, 4))
    prop, node = run(g, "dropout", [CH])
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    with pytest.raises(Dead, match="random mask"):
        run(g, "dropout", [CH], mode=SHIFT, shifts=[[0.0]])


def test_add_joins_equal_scalings_and_refuses_residual_joins():
    g = trace(lambda m, x, y: x + y, torch.randn(2, 4), torch.randn(2, 4))
    prop, node = run(g, "add", [CH, CH])
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    with pytest.raises(Dead, match="different groups"):
        run(g, "add", [CH, CH.flip(0)])
    with pytest.raises(Dead, match="does not scale"):
        run(g, "add", [CH, None])
    prop, node = run(g, "add", [CH, None], mode=SHIFT, shifts=[[0.0], None])    # a shifted stream + x
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    with pytest.raises(Dead, match="two shifted"):
        run(g, "add", [CH, CH], mode=SHIFT, shifts=[[0.0], [0.0]])


def test_mul_div_carry_a_scaling_through_an_unperturbed_factor():
    g = trace(lambda m, x, y: (x * y) / y, torch.randn(2, 4), torch.rand(2, 4) + 1)
    prop, node = run(g, "mul", [CH, None])
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    with pytest.raises(Dead, match="two perturbed"):
        run(g, "mul", [CH, CH])
    with pytest.raises(Dead, match="divides by a perturbed"):
        run(g, "div", [None, CH])
    with pytest.raises(Dead, match="rescales the shift by a tensor"):
        run(g, "mul", [CH, None], mode=SHIFT, shifts=[[0.0], None])
    g2 = trace(lambda m, x: x * 3.0, torch.randn(2, 4))
    prop, node = run(g2, "mul", [CH], mode=SHIFT, shifts=[[0.0]])
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))


def test_value_free_ops_perturb_nothing():
    g = trace(lambda m, x: x + torch.zeros_like(x), torch.randn(2, 4))
    prop, node = run(g, "zeros_like", [CH])
    assert node.outputs[0] not in prop.g


# ---------------------------------------------------------------------- movement
def test_replay_moves_labels_through_views_and_concatenation():
    g = trace(lambda m, x, y: torch.cat([x.view(2, 2, 2).transpose(1, 2).reshape(2, 4), y], 1),
              torch.randn(2, 4), torch.randn(2, 3))
    prop, node = run(g, "view", [CH])
    assert torch.equal(out_labels(prop, node), CH.view(2, 2).expand(2, 2, 2))
    prop, node = run(g, "transpose", [CH.view(2, 2).expand(2, 2, 2)])
    assert torch.equal(out_labels(prop, node)[0], torch.tensor([[0.0, 2.0], [1.0, 3.0]]))
    prop, node = run(g, "cat", [CH, None])
    assert torch.equal(out_labels(prop, node)[0], torch.tensor([0.0, 1, 2, 3, -1, -1, -1]))


def test_setitem_writes_the_labels_of_the_value():
    def fn(m, x, y):
        z = x.clone()
        z[:, 0] = y
        return z
    g = trace(fn, torch.randn(2, 4), torch.randn(2))
    prop, node = run(g, "setitem", [CH, None])
    assert torch.equal(out_labels(prop, node)[0], torch.tensor([-1.0, 1, 2, 3]))


def test_zero_padding_scales_but_does_not_shift():
    g = trace(lambda m, x: F.pad(x, (1, 1)), torch.randn(2, 4))
    prop, node = run(g, "pad", [CH])
    assert torch.equal(out_labels(prop, node)[0], torch.tensor([0.0, 0, 1, 2, 3, 3]))
    with pytest.raises(Dead, match="pads with constants"):
        run(g, "pad", [CH], mode=SHIFT, shifts=[[0.0]])


# ---------------------------------------------------------------------- reductions
def test_reduce_merges_the_groups_of_each_reduced_set():
    g = trace(lambda m, x: x.mean(-1), torch.randn(2, 4))
    prop, node = run(g, "mean", [CH])
    assert roots(prop)[:4] == [0, 0, 0, 0]           # one group: the whole row moves together
    assert torch.equal(out_labels(prop, node), torch.zeros(2))
    # a shift averaged over positions with different shift values becomes one composite shift
    prop, node = run(g, "mean", [torch.zeros(4)], mode=SHIFT, shifts=[[0.0, 1, 2, 3]])
    p = prop.p[node.outputs[0]]
    assert bool((p >= 2 ** 40).all()) and p[0] == p[1]


def test_pool_merges_a_window_and_passes_a_constant_shift():
    g = trace(lambda m, x: F.max_pool2d(x, 2), torch.randn(1, 2, 4, 4))
    lab = torch.arange(2.0).view(1, 2, 1, 1)
    prop, node = run(g, "max_pool2d", [lab], k0=2)
    assert torch.equal(out_labels(prop, node), lab.expand(1, 2, 2, 2))
    run(g, "max_pool2d", [lab], mode=SHIFT, shifts=[0.0], k0=2)
    with pytest.raises(Dead, match="different shifts"):
        run(g, "max_pool2d", [lab], mode=SHIFT, shifts=[torch.arange(4.0)], k0=2)


def test_avg_pool_with_counted_padding_ends_a_shift():
    g = trace(lambda m, x: F.avg_pool2d(x, 3, 1, 1), torch.randn(1, 2, 4, 4))
    with pytest.raises(Dead, match="zero padding"):
        run(g, "avg_pool2d", [torch.zeros(1, 2, 1, 1)], mode=SHIFT, shifts=[0.0], k0=1)


def test_interpolate_copies_channel_labels():
    g = trace(lambda m, x: F.interpolate(x, scale_factor=2.0), torch.randn(1, 2, 3, 3))
    lab = torch.arange(2.0).view(1, 2, 1, 1)
    prop, node = run(g, "interpolate", [lab], k0=2)
    assert torch.equal(out_labels(prop, node), lab.expand(1, 2, 6, 6))


# ---------------------------------------------------------------------- linear / conv / matmul
def test_linear_reading_a_scaled_input_compensates_with_its_columns():
    g = trace(lambda m, x: F.linear(x, m.w, m.b), torch.randn(2, 4), w=torch.randn(3, 4), b=torch.randn(3))
    prop, node = run(g, "linear", [CH])
    (_, name, cmap), = prop.consumers
    assert name == "w" and torch.equal(cmap, CH.view(1, 4).expand(3, 4))
    with pytest.raises(Dead, match="does not preserve a shift"):
        run(g, "linear", [CH], mode=SHIFT, shifts=[[0.0]])


def test_grouped_conv_compensates_per_group():
    g = trace(lambda m, x: F.conv2d(x, m.w, groups=2), torch.randn(1, 4, 3, 3), w=torch.randn(2, 2, 1, 1))
    prop, node = run(g, "conv2d", [CH.view(1, 4, 1, 1)])
    (_, _, cmap), = prop.consumers
    assert torch.equal(cmap[:, :, 0, 0], torch.tensor([[0.0, 1], [2, 3]]))


def test_conv_transpose_compensates_with_its_input_rows():
    g = trace(lambda m, x: F.conv_transpose2d(x, m.w), torch.randn(1, 4, 3, 3), w=torch.randn(4, 2, 2, 2))
    prop, _ = run(g, "conv_transpose2d", [CH.view(1, 4, 1, 1)])
    (_, _, cmap), = prop.consumers
    assert torch.equal(cmap[:, 0, 0, 0], CH)


def test_matmul_with_a_parameter_compensates_and_with_an_activation_carries_labels():
    g = trace(lambda m, x, y: (x @ m.w) + (m.v @ y) + (x @ y), torch.randn(2, 4), torch.randn(4, 2),
              w=torch.randn(4, 2), v=torch.randn(2, 4))
    prop, _ = run(g, "matmul", [CH])                       # x @ W: rows of W
    assert torch.equal(prop.consumers[0][2], CH.view(4, 1).expand(4, 2))
    prop, _ = run(g, "matmul", [CH.view(4, 1)], nth=1)     # W @ y: columns of W
    assert torch.equal(prop.consumers[0][2], CH.view(1, 4).expand(2, 4))
    prop, node = run(g, "matmul", [torch.arange(2.0).view(2, 1), None], nth=2)   # x's rows survive
    assert torch.equal(out_labels(prop, node), torch.tensor([[0.0, 0], [1, 1]]))
    with pytest.raises(Dead, match="two perturbed"):
        run(g, "matmul", [CH, CH.view(4, 1)], nth=2)


def test_layer_and_embedding_sources():
    g = trace(lambda m, x, i: F.linear(x, m.w, m.b) + F.embedding(i, m.e)[:, :3], torch.randn(2, 4),
              torch.tensor([0, 2]), w=torch.randn(3, 4), b=torch.randn(3), e=torch.randn(5, 6))
    srcs = find_sources(g)
    assert [(s.mode, s.what, s.k0) for s in srcs] == [
        (SCALE, "units", 3), (SHIFT, "columns", 1), (SHIFT, "bias", 3),      # linear
        (SCALE, "units", 6), (SHIFT, "rows", 1)]                             # embedding
    assert srcs[1].members == [("w", None, 1, (3, 4, 1))] and srcs[4].members == [("e", None, 1, (1, 5, 6))]


# ---------------------------------------------------------------------- attention
def test_sdpa_passes_value_scalings_and_refuses_perturbed_queries():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    g = trace(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    lab = CH.view(1, 1, 1, 4).expand(1, 2, 3, 4)
    prop, node = run(g, "scaled_dot_product_attention", [None, None, lab])
    assert torch.equal(out_labels(prop, node), lab)
    with pytest.raises(Dead, match="query is perturbed"):
        run(g, "scaled_dot_product_attention", [lab, None, None])


def test_mha_compensates_with_the_packed_input_projection():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(1, 3, 4)
    g = capture(mha, (x, x, x), {"need_weights": False}, lambda out: out[0].sum())
    prop, _ = run(g, "multi_head_attention_forward", [CH])
    (_, name, cmap), = prop.consumers
    assert name == "in_proj_weight" and torch.equal(cmap, CH.view(1, 4).expand(12, 4))


# ---------------------------------------------------------------------- normalisers
def test_layer_norm_absorbs_a_scaling_of_all_its_channels_at_once():
    g = trace(lambda m, x: F.layer_norm(x, (4,), m.g, m.b), torch.randn(3, 4), g=torch.ones(4), b=torch.zeros(4))
    prop, node = run(g, "layer_norm", [CH])
    assert roots(prop)[:4] == [0, 0, 0, 0] and prop.absorbers == [node]
    assert prop.approx and prop.approx[0][1] == 1e-5            # eps makes it approximate
    run(g, "layer_norm", [CH], mode=SHIFT, shifts=[0.0])        # a shift uniform over channels: absorbed
    with pytest.raises(Dead, match="differs inside one normalised set"):
        run(g, "layer_norm", [CH], mode=SHIFT, shifts=[CH])
    kinds = [(s.mode, s.what, [m[0] for m in s.members]) for s in find_sources(g)]
    assert kinds == [(SCALE, "units", ["g", "b"]), (SHIFT, "bias", ["b"])]


def test_rms_norm_does_not_absorb_a_shift():
    g = trace(lambda m, x: F.rms_norm(x, (4,), m.g), torch.randn(3, 4), g=torch.ones(4))
    run(g, "rms_norm", [CH])
    with pytest.raises(Dead, match="does not subtract a mean"):
        run(g, "rms_norm", [CH], mode=SHIFT, shifts=[0.0])


def test_batch_norm_in_eval_mode_forces_a_failure():
    bn = nn.BatchNorm1d(4).eval()
    g = capture(bn, (torch.randn(3, 4),), {}, lambda out: out.sum())
    prop, _ = run(g, "batch_norm", [CH])
    assert "running statistics" in prop.forced


# ---------------------------------------------------------------------- softmax and losses
def test_softmax_absorbs_a_shift_uniform_over_classes_only():
    g = trace(lambda m, x: F.log_softmax(x, -1), torch.randn(2, 4))
    prop, node = run(g, "log_softmax", [CH], mode=SHIFT, shifts=[[0.0]])
    assert prop.absorbers == [node] and roots(prop)[:4] == [0, 0, 0, 0]
    with pytest.raises(Dead, match="same for every class"):
        run(g, "log_softmax", [CH], mode=SHIFT, shifts=[CH])
    with pytest.raises(Dead, match="not scale-invariant"):
        run(g, "log_softmax", [CH])


# ---------------------------------------------------------------------- the table and the engine
def test_an_op_without_a_handler_ends_the_candidate():
    g = trace(lambda m, x: torch.tanh(F.linear(x, m.w)).sum(-1, keepdim=True), torch.randn(2, 4), w=torch.randn(3, 4))
    assert "tanh" not in PROPAGATE
    src = find_sources(g)[0]
    with pytest.raises(Dead, match="tanh does not preserve the scaling"):
        propagate(g, src)
    assert build_candidate(g, src) is None

