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



@pytest.fixture(autouse=True)
def _float64():
    """Labels are float64: literal expectations are written in the default dtype, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


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


CH = torch.arange(4.0, dtype=F64)          # one group per channel of a [*, 4] activation


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
    # x + flip(x) (a rotary embedding adds q·cos and rotate_half(q)·sin): channel k and 3 − k merge
    prop, _ = run(g, "add", [CH, CH.flip(0)])
    assert roots(prop)[:4] == [0, 1, 1, 0]
    with pytest.raises(Dead, match="does not scale"):
        run(g, "add", [CH, None])
    prop, node = run(g, "add", [CH, None], mode=SHIFT, shifts=[[0.0], None])    # a shifted stream + x
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    with pytest.raises(Dead, match="two shifted"):
        run(g, "add", [CH, CH], mode=SHIFT, shifts=[[0.0], [0.0]])


def test_query_key_product_pairs_each_query_index_with_the_inverse_key_index():
    # q @ kᵀ with q's feature j labelled j and k's feature j labelled 4 + j: joined with odd parity, the
    # product is unchanged (not reached); the same key meeting a scaled and an unscaled query index is not
    g = trace(lambda m, q, k: q @ k.transpose(-1, -2), torch.randn(3, 4), torch.randn(5, 4))
    kt = (CH + 4).view(4, 1)                 # labels of kᵀ [4, 5]: feature j on the rows
    prop, node = run(g, "matmul", [CH, kt], nth=0)
    assert node.outputs[0] not in prop.g and prop.paired == [node]
    table, odd = roots(prop), prop.uf.parities().tolist()
    assert table == [0, 1, 2, 3, 0, 1, 2, 3] and odd == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(Dead, match="unperturbed"):
        run(g, "matmul", [torch.tensor([0.0, 1, 2, -1], dtype=F64), kt], nth=0)


def test_sdpa_with_grouped_query_heads_pairs_every_query_head_with_its_kv_head():
    # 4 query heads, 2 kv heads (enable_gqa): query head h, dim i ↔ kv head h // 2, dim i
    q, k = torch.randn(1, 4, 3, 2), torch.randn(1, 2, 3, 2)
    g = trace(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k, k.clone())
    ql = torch.arange(8.0, dtype=F64).view(1, 4, 1, 2)
    kl = (8 + torch.arange(4.0, dtype=F64)).view(1, 2, 1, 2)
    prop, node = run(g, "scaled_dot_product_attention", [ql, kl, None], k0=12)
    table, odd = roots(prop), prop.uf.parities().tolist()
    assert table == [0, 1, 0, 1, 4, 5, 4, 5, 0, 1, 4, 5] and odd == [0] * 8 + [1] * 4
    with pytest.raises(Dead, match="alone"):
        run(g, "scaled_dot_product_attention", [ql, None, None], k0=12)


def test_a_group_cannot_be_scaled_by_alpha_and_its_inverse():
    from neural_mechanics_ext.symmetry.rules.state import UnionFind
    uf = UnionFind(3)
    uf.union(0, 1, odd=1)
    uf.union(1, 2, odd=1)
    assert uf.find(2) == (0, 0)
    with pytest.raises(Dead, match="1/α"):
        uf.union(0, 2, odd=1)


def test_mul_div_carry_a_scaling_through_an_unperturbed_factor():
    g = trace(lambda m, x, y: (x * y) / y, torch.randn(2, 4), torch.rand(2, 4) + 1)
    prop, node = run(g, "mul", [CH, None])
    assert torch.equal(out_labels(prop, node), CH.expand(2, 4))
    prop, node = run(g, "mul", [CH, CH])                   # x·x: scaled to the power 2
    assert prop.degree(node.outputs[0]) == 2.0
    with pytest.raises(Dead, match="different groups"):
        run(g, "mul", [CH, CH.flip(0)])
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
    with pytest.raises(Dead, match="α and by 1/α"):    # x @ y, both scaled by the same groups: not invariant
        run(g, "matmul", [CH, CH.view(4, 1)], nth=2)


def test_layer_and_embedding_sources():
    g = trace(lambda m, x, i: F.linear(x, m.w, m.b) + F.embedding(i, m.e)[:, :3], torch.randn(2, 4),
              torch.tensor([0, 2]), w=torch.randn(3, 4), b=torch.randn(3), e=torch.randn(5, 6))
    srcs = find_sources(g)
    assert [(s.mode, s.what, s.k0) for s in srcs] == [
        (SCALE, "units", 3), (SHIFT, "columns", 1), (SHIFT, "bias", 3),      # linear
        (SCALE, "units", 6), (SHIFT, "rows", 1)]                             # embedding
    assert srcs[1].members == [("w", None, 1, (3, 4, 1))] and srcs[4].members == [("e", None, 1, (1, 5, 6))]


def test_addmm_conv1d_sources_read_the_weight_as_in_out():
    """GPT-2's Conv1D: ``addmm(b, x, W)`` with W [in, out]: output unit k is W's COLUMN k (+ b[k]); the
    input shift of feature j is W's ROW j."""
    g = trace(lambda m, x: torch.addmm(m.b, x, m.w), torch.randn(2, 4), w=torch.randn(4, 3), b=torch.randn(3))
    units, rows, bias = find_sources(g)
    assert (units.mode, units.what, units.k0) == (SCALE, "units", 3)
    assert units.members[0][0] == "w" and torch.equal(units.members[0][1], torch.arange(3).view(1, 3).expand(4, 3))
    assert units.members[1][0] == "b"
    assert (rows.mode, rows.what, rows.members) == (SHIFT, "rows", [("w", None, 1, (1, 4, 3))])
    assert (bias.mode, bias.what, bias.k0) == (SHIFT, "bias", 3)


def test_addmm_reading_a_scaled_input_compensates_with_the_rows_of_w():
    g = trace(lambda m, x: torch.addmm(m.b, x, m.w), torch.randn(2, 4), w=torch.randn(4, 3), b=torch.randn(3))
    prop, node = run(g, "addmm", [CH])
    (_, name, cmap), = prop.consumers
    assert name == "w" and torch.equal(cmap, CH.view(4, 1).expand(4, 3))
    assert node.outputs[0] not in prop.g
    g2 = trace(lambda m, x, y: torch.addmm(m.b, x, y), torch.randn(2, 4), torch.randn(4, 3), b=torch.randn(3))
    with pytest.raises(Dead, match="does not scale"):        # activation @ activation + a bias
        run(g2, "addmm", [torch.arange(2.0).view(2, 1), None])


def test_einsum_with_a_parameter_in_any_orientation():
    g = trace(lambda m, x: torch.einsum("bsi,oi->bso", x, m.w).sum() + torch.einsum("io,bsi->bos", m.v, x).sum(),
              torch.randn(2, 3, 4), w=torch.randn(5, 4), v=torch.randn(4, 5))
    (u1, c1), (u2, c2) = find_sources(g)[:2], find_sources(g)[2:]
    assert torch.equal(u1.members[0][1], torch.arange(5).view(5, 1).expand(5, 4)) and c1.members[0][3] == (5, 4, 1)
    assert torch.equal(u2.g[0, :, 0], torch.arange(5.0))                 # units on axis 1 of "bos"
    assert c2.members[0][3] == (1, 4, 5) and c2.what == "rows"
    prop, _ = run(g, "einsum", [CH])
    assert torch.equal(prop.consumers[0][2], CH.view(1, 4).expand(5, 4))
    prop, _ = run(g, "einsum", [CH], nth=1)
    assert torch.equal(prop.consumers[0][2], CH.view(4, 1).expand(4, 5))


def test_einsum_of_activations_keeps_the_labels_of_the_kept_axes():
    g = trace(lambda m, a, b: torch.einsum("bij,bjk->bki", a, b), torch.randn(1, 2, 3), torch.randn(1, 3, 4))
    prop, node = run(g, "einsum", [torch.arange(2.0).view(1, 2, 1), None])
    assert torch.equal(out_labels(prop, node)[0], torch.tensor([[0.0, 1]]).expand(4, 2))


def test_a_parameter_multiplied_in_is_a_scale_source_and_one_added_joins_it():
    g = trace(lambda m, x: (m.g * x + m.b) @ m.w, torch.randn(3, 4), g=torch.rand(4) + 0.5, b=torch.randn(4),
              w=torch.randn(4, 2))
    src = find_sources(g)[0]
    assert (src.mode, src.k0, src.members[0][0]) == (SCALE, 4, "g")
    cand = build_candidate(g, src)
    assert cand.family.kind == "rescale" and sorted(cand.family.members) == [
        ("b", (1, 4, 1), 1), ("g", (1, 4, 1), 1), ("w", (1, 4, 2), -1)]


def test_a_parameter_added_to_an_activation_is_a_shift_source():
    g = trace(lambda m, x: F.layer_norm(x + m.pos + m.c, (4,)), torch.randn(2, 3, 4), pos=torch.randn(3, 4),
              c=torch.randn(4))
    pos, c = [s for s in find_sources(g) if s.mode == SHIFT]
    assert (pos.what, pos.members) == ("rows", [("pos", None, 1, (1, 3, 4))])
    assert (c.what, c.k0) == ("bias", 4)
    assert build_candidate(g, pos).family.members == [("pos", (1, 3, 4), 1)]     # LayerNorm absorbs it
    assert build_candidate(g, c).family.members == [("c", (1, 1, 4), 1)]         # merged: one group


def test_powers_and_products_track_the_power_of_the_scaling():
    g = trace(lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), torch.randn(3, 4))
    prop, node = run(g, "pow", [CH])
    assert prop.degree(node.outputs[0]) == 2.0
    prop, node = run(g, "rsqrt", [torch.zeros(1)])
    assert prop.degree(node.outputs[0]) == -0.5
    with pytest.raises(Dead, match="not shift-equivariant"):
        run(g, "pow", [CH], mode=SHIFT, shifts=[0.0])
    # x · rsqrt(...): powers 1 and −1 of the same group cancel: invariant, an absorber
    node = node_of(g, "mul")
    prop = Propagation(g, Source(SCALE, node, "test", "units", 1, torch.zeros(1), None, []))
    x, r = node.inputs
    prop.set(x, torch.zeros(x.shape))
    prop.set(r, torch.zeros(r.shape), degree=-1.0)
    prop.in_degrees = {1.0, -1.0}
    PROPAGATE["mul"](prop, node, *node.call_args())
    assert prop.absorbers == [node] and node.outputs[0] not in prop.g


def test_a_layer_cannot_compensate_another_power():
    g = trace(lambda m, x: F.linear(x, m.w), torch.randn(2, 4), w=torch.randn(3, 4))
    node = node_of(g, "linear")
    prop = Propagation(g, Source(SCALE, node, "test", "units", 4, torch.zeros(1), None, []))
    prop.set(node.inputs[0], CH.expand(2, 4).clone(), degree=2.0)
    prop.in_degrees = {2.0}
    with pytest.raises(Dead, match="power other than 1"):
        PROPAGATE["linear"](prop, node, *node.call_args())


def test_the_eps_of_a_hand_written_normaliser_is_accepted_only_after_a_second_moment():
    g = trace(lambda m, x: (x.pow(2).mean(-1, keepdim=True) + 1e-6) + (x.abs().mean(-1, keepdim=True) + 1e-6),
              torch.randn(3, 4))
    prop, node = run(g, "add", [torch.zeros(1)])
    assert prop.approx and prop.approx[0][1] == 1e-6 and 0 < prop.approx[0][2] < 1e-4
    with pytest.raises(Dead, match="does not scale"):      # mean |x| + eps: not a variance
        run(g, "add", [torch.zeros(1)], nth=1)


def test_x_minus_its_mean_and_the_variance_absorb_a_uniform_shift():
    g = trace(lambda m, x: (x - x.mean(-1, keepdim=True)) / x.var(-1, keepdim=True), torch.randn(3, 4))
    prop, node = run(g, "sub", [CH, torch.zeros(1)], mode=SHIFT, shifts=[0.0, 0.0])
    assert prop.absorbers == [node] and roots(prop)[:4] == [0, 0, 0, 0]
    with pytest.raises(Dead, match="two shifted"):
        run(g, "sub", [CH, torch.zeros(1)], mode=SHIFT, shifts=[0.0, 1.0])
    prop, node = run(g, "var", [CH], mode=SHIFT, shifts=[0.0])
    assert prop.absorbers == [node]
    prop, node = run(g, "var", [CH])
    assert prop.degree(node.outputs[0]) == 2.0


class _RMS(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):      # HF's LlamaRMSNorm, written out
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _LN(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class _Net(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a, self.n1, self.b, self.head = nn.Linear(6, 8), norm(8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.b(self.n1(self.a(x)))))


@pytest.mark.parametrize("hand, module", [(_RMS, nn.RMSNorm), (_LN, nn.LayerNorm)], ids=["RMSNorm", "LayerNorm"])
def test_hand_written_normalisers_give_the_families_of_the_module(hand, module):
    """Linear a → norm n1 → Linear b: a's units are one scale group (the norm absorbs them; eps-approximate,
    proved at eps → 0), n1 (γ, β) ↔ b's columns, b ↔ head through the ReLU, and for LayerNorm a's column
    and bias shifts (absorbed: LayerNorm subtracts the mean); head's columns and bias (cross-entropy).  The hand-written versions must give exactly what the torch modules give."""
    from neural_mechanics_ext import find_symmetries
    x = torch.randn(16, 6)
    results = []
    for norm in (hand, module):
        torch.manual_seed(0)
        fams = find_symmetries(_Net(norm), x)
        for f in fams:
            assert f.residual <= f.tolerance
            if f.extra.get("approx"):
                assert f.extra["residual_eps_limit"] <= 1e-8, f.name
        results.append({(f.kind, frozenset(f.members)) for f in fams})
    assert results[0] == results[1]
    assert len(results[0]) == (5 if module is nn.LayerNorm else 3) + 2      # + head columns and bias


# ---------------------------------------------------------------------- attention
def test_sdpa_passes_value_scalings_and_refuses_perturbed_queries():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    g = trace(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    lab = CH.view(1, 1, 1, 4).expand(1, 2, 3, 4)
    prop, node = run(g, "scaled_dot_product_attention", [None, None, lab])
    assert torch.equal(out_labels(prop, node), lab)
    g = trace(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q, k[:, :1], v[:, :1])
    prop, node = run(g, "scaled_dot_product_attention", [None, None, torch.arange(4.0).view(1, 1, 1, 4)])
    assert torch.equal(out_labels(prop, node), lab)           # both query heads read kv head 0
    with pytest.raises(Dead, match="query is perturbed"):
        run(g, "scaled_dot_product_attention", [lab, None, None])


def test_a_key_shift_uniform_over_keys_shifts_each_query_row_of_the_logits():
    # q [3, 4] @ kᵀ [4, 5]: key feature j shifted by c_j at every key (labels j, one shift value each):
    # row s of the logits gains q_s·c at every key: labels a mixture of groups 0..3 (which stay apart),
    # shift values constant along the keys, one per query row
    g = trace(lambda m, q, k: q @ k.transpose(-1, -2), torch.randn(3, 4), torch.randn(5, 4))
    kt, one = CH.view(4, 1), torch.zeros(4, 1)
    prop, node = run(g, "matmul", [None, kt], mode=SHIFT, shifts=[None, one])
    lab, p = prop.g[node.outputs[0]], prop.p[node.outputs[0]]
    mix = prop.uf.mixture([0, 1, 2, 3])
    assert mix == 8 and torch.equal(lab, torch.full((3, 5), 8.0))
    assert torch.equal(p, p[:, :1].expand(3, 5)) and len(p[:, 0].unique()) == 3
    assert roots(prop)[:4] == [0, 1, 2, 3]
    # a query shift, seen from here: the same along the queries, a new value at every key
    prop, node = run(g, "matmul", [CH, None], mode=SHIFT, shifts=[[0.0], None])
    p = prop.p[node.outputs[0]]
    assert torch.equal(p, p[:1].expand(3, 5)) and len(p[0].unique()) == 5
    with pytest.raises(Dead, match="varies along the axis the product keeps"):
        run(g, "matmul", [None, kt], mode=SHIFT, shifts=[None, torch.arange(5.0).view(1, 5)])
    with pytest.raises(Dead, match="does not preserve a shift"):
        run(g, "matmul", [CH, kt], mode=SHIFT, shifts=[[0.0], one])


def test_a_mixture_label_joined_with_anything_joins_its_groups():
    from neural_mechanics_ext.symmetry.rules.state import UnionFind
    uf = UnionFind(4)
    m = uf.mixture([2, 0, 1])
    assert uf.mixture([0, 1, 2]) == m == 4 and uf.mixture([3]) == 3
    assert uf.table().tolist()[:4] == [0, 1, 2, 3]           # apart while nothing joins the mixture
    uf.union(m, 3)
    assert uf.table().tolist() == [0, 0, 0, 0, 0]


def test_sdpa_absorbs_keys_shifted_alike_at_every_position():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    g = trace(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    lab = CH.view(1, 1, 1, 4).expand(1, 2, 3, 4)
    prop, node = run(g, "scaled_dot_product_attention", [None, lab, None], mode=SHIFT, shifts=[None, [0.0], None])
    assert prop.absorbers == [node] and node.outputs[0] not in prop.g and roots(prop)[:4] == [0, 1, 2, 3]
    with pytest.raises(Dead, match="shifted differently at different positions"):
        run(g, "scaled_dot_product_attention", [None, lab, None], mode=SHIFT,
            shifts=[None, torch.arange(3.0).view(1, 1, 3, 1), None])
    for i, what in ((0, "query"), (2, "value")):
        labels, shifts = [None] * 3, [None] * 3
        labels[i], shifts[i] = lab, [0.0]
        with pytest.raises(Dead, match=f"the {what} is shifted"):
            run(g, "scaled_dot_product_attention", labels, mode=SHIFT, shifts=shifts)


def _fused_attention(m, x):
    """A fused q/k/v projection split into heads, then attention (timm, GPT-2 alike); ``m.rope`` multiplies
    the keys by a position-dependent factor first (what a rotary embedding does to a key bias)."""
    q, k, v = F.linear(x, m.w, m.b).view(1, 5, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
    if hasattr(m, "rope"):
        k = k * m.rope.view(1, 1, 5, 1).detach()
    return F.scaled_dot_product_attention(q, k, v)


def test_the_key_part_of_a_fused_bias_is_its_own_translation_source():
    x = torch.randn(1, 5, 4)
    g = trace(_fused_attention, x, w=torch.randn(12, 4), b=torch.randn(12))
    srcs = [s for s in find_sources(g) if s.what == "key bias"]
    assert len(srcs) == 1 and srcs[0].k0 == 4
    (name, cmap, _, _), = srcs[0].members
    assert name == "b" and cmap.tolist() == [-1] * 4 + [0, 1, 2, 3] + [-1] * 4
    cand = build_candidate(g, srcs[0])
    assert cand.family.kind == "translation" and cand.family.members == [("b", (1, 4, 1, 4, 4), 1)]
    bias = next(s for s in find_sources(g) if s.what == "bias")     # the whole bias: q and v parts die
    assert build_candidate(g, bias) is None
    g = trace(_fused_attention, x, w=torch.randn(12, 4), b=torch.randn(12), rope=torch.rand(5) + 0.5)
    assert [s for s in find_sources(g) if s.what == "key bias"] == []


def test_mha_key_bias_is_a_translation_inside_the_call():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(1, 3, 4)
    g = capture(mha, (x, x, x), {"need_weights": False}, lambda out: out[0].sum())
    src, = [s for s in find_sources(g) if s.mode == SHIFT and s.inside]
    assert src.what == "key bias"
    # the out-projection ends the call: its input columns and bias are shift sources of the output
    assert sorted(s.what for s in find_sources(g) if s.mode == SHIFT and not s.inside) == ["bias", "columns"]
    assert src.members[0][0] == "in_proj_bias" and src.members[0][1].tolist() == [-1] * 4 + [0, 1, 2, 3] + [-1] * 4
    assert build_candidate(g, src).family.members == [("in_proj_bias", (1, 4, 1, 4, 4), 1)]


def _qk_norm(m, x):
    """Q/K each normalised per head (Qwen3's QK-norm written out) before attention; with ``m.gq`` absent the
    norm has no weight (``F.rms_norm``)."""
    q, k = (F.linear(x, w).view(1, 3, 2, 2).transpose(1, 2) for w in (m.wq, m.wk))
    if hasattr(m, "gq"):
        q, k = ((t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)) * gam for t, gam in ((q, m.gq), (k, m.gk)))
    else:
        q, k = (F.rms_norm(t, (2,)) for t in (q, k))
    return F.scaled_dot_product_attention(q, k, x.view(1, 3, 2, 2).transpose(1, 2))


def test_qk_norm_weights_are_the_query_key_pair_and_unmet_pairs_die():
    x = torch.randn(1, 3, 4)
    g = trace(_qk_norm, x, wq=torch.randn(4, 4), wk=torch.randn(4, 4), gq=torch.rand(2) + 0.5,
              gk=torch.rand(2) + 0.5)
    src, = [s for s in find_sources(g) if s.what == "query·key"]
    assert [m[0] for m in src.members] == ["gq", "gk"]
    cand = build_candidate(g, src)
    assert cand.family.kind == "rescale" and cand.family.members == [("gq", (1, 2, 1), 1), ("gk", (1, 2, 1), -1)]
    # without a weight the nearest sources are the projections: each side's scaling is absorbed by its
    # norm and the two never meet in the product, so there is no Q/K pair
    g = trace(_qk_norm, x, wq=torch.randn(4, 4), wk=torch.randn(4, 4))
    src, = [s for s in find_sources(g) if s.what == "query·key"]
    with pytest.raises(Dead, match="never meet"):
        propagate(g, src)


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



# ---------------------------------------------------------------------- joint candidates (rules/joint.py)
def test_a_residual_join_names_the_term_that_would_have_to_scale_too():
    g = trace(lambda m, x, y: x + y, torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(Dead) as dead:
        run(g, "add", [CH, None])
    assert dead.value.needs == [node_of(g, "add").inputs[1]]


def test_writers_are_found_back_through_copies_views_sums_and_concatenations():
    from neural_mechanics_ext.symmetry.rules.joint import writers_of

    def fn(m, idx, x):
        e = F.embedding(idx, m.tab)                                            # writer: the table
        h = F.linear(x, m.w, m.b)                                              # writer: w and b
        t = torch.cat([m.cls.expand(2, 1, 4), F.dropout(h, 0.0).view(2, 3, 4)], 1)  # the class token writes itself
        return (e + t).sum(), F.gelu(h)
    g = trace(fn, torch.randint(0, 5, (2, 4)), torch.randn(6, 3), tab=torch.randn(5, 4), w=torch.randn(4, 3),
              b=torch.randn(4), cls=torch.randn(1, 1, 4))
    add = node_of(g, "add")
    ws = writers_of(add.outputs[0])
    assert sorted(w.params for w in ws) == [("cls",), ("tab",), ("w", "b")]
    assert writers_of(node_of(g, "gelu").outputs[0]) is None          # an activation function: no writer
    assert writers_of(node_of(g, "linear").inputs[0]) is None         # a model input: no writer


def test_the_stream_of_a_pre_norm_block_is_one_scale_group_and_a_missing_writer_ends_it():
    """x = emb + lin2(ln(emb)): scaling emb and lin2 together is absorbed by the final LayerNorm; with the
    model input added to the stream instead of a writer, no joint family exists."""
    from neural_mechanics_ext.symmetry.rules import joint_sources

    def block(m, idx, noise):
        x = F.embedding(idx, m.tab)
        x = x + F.linear(F.relu(F.linear(F.layer_norm(x, (4,)), m.w1)), m.w2, m.b2)
        if noise is not None:
            x = x + noise
        return F.linear(F.layer_norm(x, (4,)), m.head)

    params = dict(tab=torch.randn(5, 4), w1=torch.randn(6, 4), w2=torch.randn(4, 6), b2=torch.randn(4),
                  head=torch.randn(3, 4))
    idx = torch.randint(0, 5, (2, 3))
    for noise in (None, torch.randn(2, 3, 4)):
        g = trace(lambda m, i, n=noise: block(m, i, n), idx, **params)
        deaths = []
        for src in find_sources(g):
            build_candidate(g, src, deaths)
        joint = [build_candidate(g, s) for s in joint_sources(g, deaths)]
        if noise is None:
            (cand,) = joint
            assert cand.family.kind == "scale" and "joint" in cand.name
            assert sorted(m[0] for m in cand.family.members) == ["b2", "tab", "w2"]
            assert all(view == (1, 1, n) for (_, view, _), n in zip(sorted(cand.family.members),
                                                                     (4, 20, 24)))
        else:
            assert joint == []
