"""Symmetry rules (THEORY.md §1.2) as perturbation propagation over the captured graph.

Every candidate starts at one *source*: a call with parameters whose slices act on one axis of its
output.  Scaling output channel ``k`` of a Linear/Conv (``W[k], b[k]``) or of a normaliser's affine
(``γ_k, β_k``) multiplies that channel by ``α``; shifting the bias ``b[k]`` adds ``α`` to it; shifting
column ``j`` of a Linear weight adds ``α·x_j`` to *every* output feature.  The perturbation is then
followed forward, op by op, on *label tensors* (same shape as the activation; each element holds the
group that perturbs it, ``-1`` for none), until every path has ended in one of:

* an **absorber**, which makes the loss blind to it: a normaliser in training mode for a scaling
  (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm, ``F.normalize``); a normaliser, softmax,
  log-softmax or cross-entropy for a shift that is uniform over the set it normalises;
* a **compensator** (scalings only): a Linear/Conv/matmul/attention input projection that reads the
  scaled channel; its slice for that channel is the outgoing side ``A2`` of a rescale group.

Anything else (a non-homogeneous activation, a residual join, the loss itself, an unknown op) ends the
candidate.  Data movement (view, flatten, permute, indexing, cat, padding) is replayed on the label
tensors, so flatten blocks, head splits and channel concatenations are followed exactly rather than
pattern-matched.  Where an op needs several groups to move together (a GroupNorm or LayerNorm that
normalises many channels at once, a reduction over channels) the groups are merged (union-find), which
is how "one scale group per channel group" or "the whole layer" falls out.

The result is a candidate family: kind ``scale`` (only absorbers), ``rescale`` (compensators) or
``translation`` (shifts), whose members are obtained by writing, for every parameter involved, the
group of each of its elements and fitting an ``(A, K, B)`` view to that map.  A map that no view
expresses (a grouped conv consumer, a permuted consumer, a partially covered tensor) is refused with a
reason, never approximated.

Choices (all follow from starting with the finest groups and merging only what an op forces):

* Translation of a bias starts with one group per element.  In front of BatchNorm / InstanceNorm every
  ``b[k]`` stays its own group (view ``(1, C, 1)``): each has zero gradient by itself, and the whole-bias
  group is just their sum.  GroupNorm merges the biases of a channel group, LayerNorm and
  cross-entropy merge all of them (view ``(1, 1, C)``).  Weight columns are a separate family
  ("columns", one group per input position); both are named ``"<layer> (translation, bias|columns)"``.
* Scale of a Linear/Conv is ``{W[k], b[k]}`` per output channel (``W`` rows ``(1, out, rest)``, ``b``
  ``(1, out, 1)``), merged to channel groups by GroupNorm and to the whole layer by LayerNorm.
* A shift passes through additions of unperturbed tensors (a shift of the residual stream stays a
  shift), a scaling does not (a residual join ends it).
* A unit read by several layers is compensated in all of them (all join ``A2``); a unit that is also
  read by anything else is not a symmetry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from .capture import NORM_OPS, SIGNATURES, Graph, Node, Value, bind_args, norm_fiber_dims
from .family import SymmetryFamily

F64 = torch.float64
SCALE, SHIFT = "scale", "shift"

_IDENTITY = {"contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu",
             "cuda", "requires_grad", "positive", "alias", "identity"}
_VALUE_FREE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
               "new_zeros", "new_ones", "new_empty", "new_full", "size", "numel", "dim"}
_HOMOGENEOUS = {"relu", "leaky_relu", "rrelu", "prelu", "abs"}   # σ(αx) = ασ(x) for α > 0
_DROPOUT = {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"}
_MOVE = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t",
         "movedim", "squeeze", "unsqueeze", "expand", "expand_as", "broadcast_to", "repeat", "tile",
         "narrow", "select", "getitem", "chunk", "split", "split_with_sizes", "tensor_split", "unbind",
         "cat", "stack", "hstack", "vstack", "flip", "roll", "index_select", "gather", "masked_select",
         "property_T", "property_mT", "ravel"}
_NORM_TAG = {"batch_norm": "BN", "instance_norm": "IN", "group_norm": "GN", "layer_norm": "LN",
             "rms_norm": "RMSNorm", "normalize": "normalize", "cross_entropy": "cross-entropy",
             "softmax": "softmax", "log_softmax": "log-softmax"}


class _Dead(Exception):
    """The perturbation reached something that does not preserve or absorb it."""


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union_all(self, labels) -> None:
        labels = [int(x) for x in labels]
        r0 = self.find(labels[0])
        for x in labels[1:]:
            r = self.find(x)
            if r != r0:
                self.parent[max(r, r0)] = min(r, r0)
                r0 = min(r, r0)

    def table(self) -> torch.Tensor:
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=F64)


@dataclass
class Source:
    mode: str                       # SCALE or SHIFT
    node: Node
    layer: str
    what: str                       # scale: "units"; shift: "bias", "columns", "rows"
    k0: int                         # number of initial labels
    g: torch.Tensor                 # labels of node.outputs[0]
    p: Optional[torch.Tensor]       # shift only: which shift value each element receives
    members: List[Tuple[str, Optional[torch.Tensor], int, Optional[Tuple[int, int, int]]]]


@dataclass
class Candidate:
    """A structurally derived family, before the gradient check."""

    family: Optional[SymmetryFamily]
    source: Source
    name: str = ""
    refusal: Optional[str] = None        # structural reason not to track it (shared, unexpressible)
    forced: Optional[str] = None         # reason it cannot hold (BN in eval mode); still measured
    # (normaliser, eps, max eps/(var+eps), values per normalised set) for each absorber with eps > 0
    approx: List[Tuple[str, float, float, int]] = field(default_factory=list)


def layer_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _op_layer(node: Node, graph: Graph) -> str:
    """The module that ran the call (forward hooks), else the owner of its weight, else the op."""
    if node.module:
        return node.module
    args, kwargs = node.call_args()
    for key in ("weight", "in_proj_weight", "q_proj_weight", "bias"):
        a = _bind(node, args, kwargs).get(key)
        if isinstance(a, Value) and a.kind == "param":
            return layer_name(a.name)
    for v in node.inputs:
        if v.kind == "param":
            return layer_name(v.name)
    return f"{node.op}#{node.index}"


def _sig(op: str) -> Tuple[str, ...]:
    if op.startswith("conv_transpose"):
        return SIGNATURES["conv_transpose"]
    if op.startswith("conv"):
        return SIGNATURES["conv"]
    if op in ("softmax", "log_softmax"):
        return SIGNATURES["softmax"]
    if op in _DROPOUT or op in ("alpha_dropout", "feature_alpha_dropout"):
        return SIGNATURES["dropout"]
    if op.startswith("avg_pool"):
        return SIGNATURES["avg_pool"]
    if op.startswith("adaptive_"):
        return SIGNATURES["adaptive_pool"]
    if op in ("mean", "sum"):
        return SIGNATURES["reduce"]
    if op in ("clamp", "clamp_min"):
        return SIGNATURES["clamp"]
    if op == "scaled_dot_product_attention":
        return SIGNATURES["sdpa"]
    if op == "multi_head_attention_forward":
        return SIGNATURES["mha"]
    return SIGNATURES.get(op, ("input",))


def _bind(node: Node, args, kwargs) -> dict:
    return bind_args(_sig(node.op), args, kwargs)


def _is_conv(op: str) -> bool:
    return op in ("conv1d", "conv2d", "conv3d")


def _is_convt(op: str) -> bool:
    return op in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def _pooled_dims(op: str) -> int:
    return int(op[-2]) if op.endswith("d") and op[-2].isdigit() else 0


def _param(v) -> Optional[Value]:
    return v if isinstance(v, Value) and v.kind == "param" else None


# ---------------------------------------------------------------------- sources
def find_sources(graph: Graph) -> List[Source]:
    """Every place where a slice of parameters perturbs one axis of an op's output."""
    out: List[Source] = []
    for node in graph.nodes:
        if not graph.affects_loss(node) or node.opaque or not node.outputs or node.outputs[0] is None:
            continue
        y = node.outputs[0]
        args, kwargs = node.call_args()
        a = _bind(node, args, kwargs)
        op = node.op
        if op == "linear" or _is_conv(op) or _is_convt(op):
            w, b = _param(a.get("weight")), _param(a.get("bias"))
            if w is None:
                continue
            layer = _op_layer(node, graph)
            cdim = len(y.shape) - 1 if op == "linear" else 1
            C = y.shape[cdim]
            g = _axis_labels(y.shape, cdim, C)
            if op == "linear":
                wmap = torch.arange(C).view(C, 1).expand(w.shape)
            elif _is_conv(op):
                wmap = torch.arange(C).view(C, *([1] * (len(w.shape) - 1))).expand(w.shape)
            else:
                groups = int(a.get("groups", 1))
                cin, opg = w.shape[0], w.shape[1]
                grp = torch.arange(cin) // (cin // groups)
                wmap = (grp.view(-1, 1) * opg + torch.arange(opg).view(1, -1))
                wmap = wmap.view(cin, opg, *([1] * (len(w.shape) - 2))).expand(w.shape)
            members = [(w.name, wmap, 1, None)]
            if b is not None:
                members.append((b.name, torch.arange(C), 1, None))
            out.append(Source(SCALE, node, layer, "units", C, g, None, members))
            groups = int(a.get("groups", 1)) if not op == "linear" else 1
            if (op == "linear" or _is_conv(op)) and groups == 1:
                n_in = math.prod(w.shape) // w.shape[0]
                p = _position_labels(y.shape, cdim)
                out.append(Source(SHIFT, node, layer, "columns", 1, torch.zeros(y.shape, dtype=F64), p,
                                  [(w.name, None, 1, (w.shape[0], n_in, 1))]))
            if b is not None:
                out.append(Source(SHIFT, node, layer, "bias", C, g.clone(), torch.zeros(y.shape, dtype=F64),
                                  [(b.name, torch.arange(C), 1, None)]))
        elif op == "embedding":
            w = _param(a.get("weight"))
            if w is None or a.get("max_norm") is not None:
                continue
            layer = _op_layer(node, graph)
            V, D = w.shape
            g = _axis_labels(y.shape, len(y.shape) - 1, D)
            out.append(Source(SCALE, node, layer, "units", D, g, None,
                              [(w.name, torch.arange(D).view(1, D).expand(V, D), 1, None)]))
            p = _position_labels(y.shape, len(y.shape) - 1)
            out.append(Source(SHIFT, node, layer, "rows", 1, torch.zeros(y.shape, dtype=F64), p,
                              [(w.name, None, 1, (1, V, D))]))
        elif op in NORM_OPS:
            gamma, beta = _param(a.get("weight")), _param(a.get("bias"))
            if gamma is None and beta is None:
                continue
            ref = gamma if gamma is not None else beta
            layer = _op_layer(node, graph)
            n = math.prod(ref.shape)
            if op in ("layer_norm", "rms_norm"):
                g = torch.arange(n, dtype=F64).view(ref.shape).expand(y.shape).clone()
            else:
                g = _axis_labels(y.shape, 1, n)
            cmap = torch.arange(n).view(ref.shape)
            if gamma is not None:
                members = [(gamma.name, cmap, 1, None)]
                if beta is not None:
                    members.append((beta.name, cmap, 1, None))
                out.append(Source(SCALE, node, layer, "units", n, g, None, members))
            if beta is not None:
                out.append(Source(SHIFT, node, layer, "bias", n, g.clone(), torch.zeros(y.shape, dtype=F64),
                                  [(beta.name, cmap, 1, None)]))
    return out


def _axis_labels(shape, dim: int, n: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = n
    return torch.arange(n, dtype=F64).view(view).expand(shape).clone()


def _position_labels(shape, cdim: int) -> torch.Tensor:
    """Label of the position an element sits at, ignoring the channel/feature axis ``cdim``."""
    sizes = list(shape)
    sizes[cdim] = 1
    pos = torch.arange(math.prod(sizes), dtype=F64).view(sizes)
    return pos.expand(shape).clone()


# ---------------------------------------------------------------------- propagation
class _Propagation:
    def __init__(self, graph: Graph, src: Source):
        self.graph = graph
        self.src = src
        self.mode = src.mode
        self.uf = _UnionFind(src.k0)
        self.g: Dict[Value, torch.Tensor] = {}
        self.p: Dict[Value, torch.Tensor] = {}
        self.absorbers: List[Node] = []
        self.consumers: List[Tuple[Node, str, torch.Tensor]] = []
        self.forced: Optional[str] = None
        self.approx: List[Tuple[str, float, float, int]] = []
        self._composite = float(2 ** 40)

    # -- labels
    def reached(self, v) -> bool:
        return isinstance(v, Value) and v in self.g

    def lab(self, v: Value) -> torch.Tensor:
        return self.g[v] if v in self.g else torch.full(v.shape, -1.0, dtype=F64)

    def plab(self, v: Value) -> torch.Tensor:
        return self.p[v] if v in self.p else torch.full(v.shape, -1.0, dtype=F64)

    def set(self, v: Optional[Value], g: torch.Tensor, p: Optional[torch.Tensor] = None) -> None:
        if v is None:
            return
        if tuple(g.shape) != tuple(v.shape):
            raise _Dead(f"internal: label shape {tuple(g.shape)} != {tuple(v.shape)}")
        self.g[v] = g
        if self.mode == SHIFT:
            self.p[v] = p

    def canon(self, g: torch.Tensor) -> torch.Tensor:
        t = self.uf.table()
        out = g.clone()
        m = g >= 0
        out[m] = t[g[m].long()]
        return out

    def where(self, node: Node) -> str:
        return f"{_describe_op(node)}"

    # -- merging
    def merge_rows(self, rows: torch.Tensor, what: str, allow_unreached: bool = False) -> torch.Tensor:
        """Groups in one row must move together: merge them.  Returns one label per row."""
        if rows.numel() == 0:
            return rows.new_full((rows.shape[0],), -1.0)
        lo, hi = rows.min(1).values, rows.max(1).values
        if not allow_unreached and bool(((lo < 0) & (hi >= 0)).any()):
            raise _Dead(f"{what} mixes elements that are perturbed with elements that are not")
        if allow_unreached:
            lo = torch.where(rows >= 0, rows, torch.full_like(rows, float("inf"))).min(1).values
            lo = torch.where(hi >= 0, lo, hi)
        mixed = (lo != hi) & (hi >= 0)
        if bool(mixed.any()):
            for row in torch.unique(rows[mixed], dim=0):
                vals = torch.unique(row[row >= 0])
                if len(vals) > 1:
                    self.uf.union_all(vals.tolist())
        return hi

    # -- main loop
    def run(self) -> None:
        src = self.src
        y = src.node.outputs[0]
        self.set(y, src.g, src.p)
        nodes = self.graph.nodes
        for node in nodes[src.node.index + 1:]:
            if not any(v in self.g for v in node.inputs):
                continue
            if not self.graph.affects_loss(node):
                continue
            if node.opaque:
                raise _Dead(node.opaque)
            self.step(node)
        if self.graph.loss in self.g:
            raise _Dead("the perturbation reaches the loss")

    def step(self, node: Node) -> None:
        op = node.op
        args, kwargs = node.call_args()
        if op in _VALUE_FREE:
            return None         # the result does not depend on the values: nothing is perturbed
        if op in _IDENTITY:
            return self.unary(node, args)
        if op in _MOVE:
            return self.move(node)
        if op == "setitem":
            return self.setitem(node, args)
        if op in ("add", "sub", "rsub", "mul", "div"):
            return self.binary(node, args, kwargs)
        if op == "neg":
            return self.unary(node, args)
        if op in _HOMOGENEOUS or op in ("clamp", "clamp_min"):
            if self.mode == SHIFT:
                raise _Dead(f"{self.where(node)} is not shift-equivariant")
            if op in ("clamp", "clamp_min"):
                a = _bind(node, args, kwargs)
                if not (_is_zero(a.get("min")) and a.get("max") is None):
                    raise _Dead(f"{self.where(node)} is not positively homogeneous")
            return self.unary(node, args)
        if op in _DROPOUT:
            a = _bind(node, args, kwargs)
            if self.mode == SHIFT and a.get("training", True) and float(a.get("p", 0.5)) > 0:
                raise _Dead(f"{self.where(node)} in training mode multiplies by a random mask")
            return self.unary(node, args)
        if op in ("mean", "sum"):
            return self.reduce(node, args, kwargs)
        if _pooled_dims(op) and op.startswith(("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")):
            return self.pool(node, args, kwargs)
        if op == "pad":
            return self.pad(node, args, kwargs)
        if op == "interpolate":
            return self.interpolate(node, args)
        if op == "matmul":
            return self.matmul(node, args)
        if op == "linear" or _is_conv(op) or _is_convt(op):
            return self.layer(node, args, kwargs)
        if op == "multi_head_attention_forward":
            return self.mha(node, args, kwargs)
        if op == "scaled_dot_product_attention":
            return self.sdpa(node, args, kwargs)
        if op in NORM_OPS or op == "normalize":
            return self.normaliser(node, args, kwargs)
        if op in ("cross_entropy", "softmax", "log_softmax"):
            return self.shift_absorber(node, args, kwargs)
        raise _Dead(f"{self.where(node)} does not preserve the {'scaling' if self.mode == SCALE else 'shift'}")

    # -- op families
    def _only_first_reached(self, node: Node, first) -> None:
        for v in node.inputs:
            if v in self.g and v is not first:
                raise _Dead(f"{self.where(node)} reads the perturbed tensor through a second argument")

    def unary(self, node: Node, args) -> None:
        x = args[0]
        if not self.reached(x):
            raise _Dead(f"{self.where(node)}: perturbed tensor in an unsupported argument")
        self._only_first_reached(node, x)
        out = node.outputs[0]
        if out is None or tuple(out.shape) != tuple(x.shape):
            raise _Dead(f"{self.where(node)} changes the shape")
        self.set(out, self.g[x], self.p.get(x))

    def _rerun(self, node: Node, labels: Dict[Value, torch.Tensor]):
        def sub(v: Value):
            if v in labels:
                return labels[v]
            if v.tensor is not None:
                return v.tensor
            return torch.full(v.shape, -1.0, dtype=F64)

        args, kwargs = node.call_args(sub)
        try:
            res = node.func(*args, **kwargs)
        except Exception as exc:
            raise _Dead(f"cannot follow {self.where(node)} on labels ({exc})") from None
        leaves = tree_flatten(res)[0]
        if len(leaves) != len(node.outputs):
            raise _Dead(f"cannot follow {self.where(node)}: unexpected outputs")
        return leaves

    def move(self, node: Node) -> None:
        gl = self._rerun(node, self.g)
        pl = self._rerun(node, self.p) if self.mode == SHIFT else [None] * len(gl)
        for out, g, p in zip(node.outputs, gl, pl):
            if out is not None and isinstance(g, torch.Tensor) and out.is_float:
                if bool((g >= 0).any()):
                    self.set(out, g.to(F64), None if p is None else p.to(F64))

    def setitem(self, node: Node, args) -> None:
        x = args[0]
        idx = node.call_args(lambda v: v.tensor if v.tensor is not None else v)[0][1]
        g = self.lab(x).clone()
        p = self.plab(x).clone() if self.mode == SHIFT else None
        val = args[2]
        try:
            g[idx] = self.lab(val) if isinstance(val, Value) else -1.0
            if p is not None:
                p[idx] = self.plab(val) if isinstance(val, Value) else -1.0
        except Exception as exc:
            raise _Dead(f"cannot follow {self.where(node)} on labels ({exc})") from None
        self.set(node.outputs[0], g, p)

    def binary(self, node: Node, args, kwargs) -> None:
        op = node.op
        a = args[0]
        b = args[1] if len(args) > 1 else kwargs.get("other")
        if node.reversed or op == "rsub":
            a, b = b, a
            op = "sub" if op == "rsub" else op
        out = node.outputs[0]
        ra, rb = self.reached(a), self.reached(b)
        where = self.where(node)
        if self.mode == SCALE:
            if op in ("add", "sub"):
                if ra and rb:
                    la = torch.broadcast_to(self.canon(self.g[a]), out.shape)
                    lb = torch.broadcast_to(self.canon(self.g[b]), out.shape)
                    if not torch.equal(la, lb):
                        raise _Dead(f"{where} adds tensors scaled by different groups")
                    return self.set(out, la.clone())
                other = b if ra else a
                if _is_zero(other):
                    return self.set(out, torch.broadcast_to(self.g[a if ra else b], out.shape).clone())
                raise _Dead(f"{where} adds a tensor that does not scale (a residual join, or a bias)")
            if op == "mul":
                if ra and rb:
                    raise _Dead(f"{where} multiplies two perturbed tensors")
                return self.set(out, torch.broadcast_to(self.g[a if ra else b], out.shape).clone())
            if op == "div":
                if rb:
                    raise _Dead(f"{where} divides by a perturbed tensor")
                return self.set(out, torch.broadcast_to(self.g[a], out.shape).clone())
        else:
            if op in ("add", "sub"):
                if ra and rb:
                    raise _Dead(f"{where} adds two shifted tensors")
                r = a if ra else b
                return self.set(out, torch.broadcast_to(self.g[r], out.shape).clone(),
                                torch.broadcast_to(self.p[r], out.shape).clone())
            if op in ("mul", "div"):
                other = b if ra else a
                if (op == "div" and rb) or isinstance(other, (Value, torch.Tensor)):
                    raise _Dead(f"{where} rescales the shift by a tensor")
                r = a if ra else b
                return self.set(out, self.g[r].clone(), self.p[r].clone())
        raise _Dead(f"{where} is not supported")

    def reduce(self, node: Node, args, kwargs) -> None:
        a = _bind(node, args, kwargs)
        x = a["input"]
        self._only_first_reached(node, x)
        nd = len(x.shape)
        dim = a.get("dim")
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            dims = list(range(nd))
        else:
            dims = sorted({d % nd for d in ([dim] if isinstance(dim, int) else dim)})
        out = node.outputs[0]
        where = self.where(node)
        rows, kept = _fibers(self.g[x], dims)
        if self.mode == SCALE:
            rep = self.merge_rows(rows, where)
            g = rep.view(kept) if kept else rep.view(())
            return self.set(out, g.reshape(out.shape).clone())
        rep = self.merge_rows(rows, where, allow_unreached=True)
        prow, _ = _fibers(self.p[x], dims)
        p = self._combine(prow, mean=(node.op == "mean"))
        self.set(out, rep.reshape(out.shape).clone(), p.reshape(out.shape).clone())

    def _combine(self, prow: torch.Tensor, mean: bool) -> torch.Tensor:
        """Shift label after averaging/summing a row: a new label per distinct multiset of shifts."""
        srt = prow.sort(1).values
        const = srt[:, 0] == srt[:, -1]
        uniq, inv = torch.unique(srt, dim=0, return_inverse=True)
        out = self._composite + inv.to(F64)
        self._composite += len(uniq)
        if mean:
            out = torch.where(const, srt[:, 0], out)
        return torch.where(srt.max(1).values < 0, torch.full_like(out, -1.0), out)

    def pool(self, node: Node, args, kwargs) -> None:
        op = node.op
        k = _pooled_dims(op)
        x = args[0]
        self._only_first_reached(node, x)
        out = node.outputs[0]
        nd = len(x.shape)
        dims = list(range(nd - k, nd))
        rows, kept = _fibers(self.g[x], dims)
        where = self.where(node)
        bshape = list(kept) + [1] * k
        if self.mode == SCALE:
            rep = self.merge_rows(rows, where)
            return self.set(out, rep.view(bshape).expand(out.shape).clone())
        prow, _ = _fibers(self.p[x], dims)
        pconst = bool((prow.min(1).values == prow.max(1).values).all())
        gconst = bool((rows.min(1).values == rows.max(1).values).all())
        if op.startswith("avg_pool"):
            a = _bind(node, args, kwargs)
            if _nonzero(a.get("padding", 0)) and a.get("count_include_pad", True):
                raise _Dead(f"{where} averages in zero padding, which is not shifted")
        if pconst and gconst:
            return self.set(out, rows[:, 0].view(bshape).expand(out.shape).clone(),
                            prow[:, 0].view(bshape).expand(out.shape).clone())
        if op.startswith("adaptive_avg") and all(s == 1 for s in out.shape[-k:]):
            rep = self.merge_rows(rows, where, allow_unreached=True)
            p = self._combine(prow, mean=True)
            return self.set(out, rep.view(bshape).expand(out.shape).clone(),
                            p.view(bshape).expand(out.shape).clone())
        raise _Dead(f"{where} mixes positions that receive different shifts")

    def pad(self, node: Node, args, kwargs) -> None:
        a = bind_args(SIGNATURES["pad"], args, kwargs)
        x = a["input"]
        self._only_first_reached(node, x)
        mode = a.get("mode", "constant")
        import torch.nn.functional as F
        where = self.where(node)
        if mode == "constant":
            if self.mode == SHIFT:
                raise _Dead(f"{where} pads with constants, which are not shifted")
            if not _is_zero(a.get("value")) and a.get("value") is not None:
                raise _Dead(f"{where} pads with a non-zero constant")
            try:   # zeros scale with anything: give them the label of their neighbour
                g = F.pad(self.g[x], a["pad"], mode="replicate")
            except Exception:
                raise _Dead(f"cannot follow {where} on labels") from None
            return self.set(node.outputs[0], g)
        try:
            g = F.pad(self.g[x], a["pad"], mode=mode)
            p = F.pad(self.p[x], a["pad"], mode=mode) if self.mode == SHIFT else None
        except Exception:
            raise _Dead(f"cannot follow {where} on labels") from None
        self.set(node.outputs[0], g, p)

    def interpolate(self, node: Node, args) -> None:
        x = args[0]
        self._only_first_reached(node, x)
        out = node.outputs[0]
        nd = len(x.shape)
        dims = list(range(2, nd))
        rows, kept = _fibers(self.g[x], dims)
        bshape = list(kept) + [1] * len(dims)
        where = self.where(node)
        if self.mode == SCALE:
            rep = self.merge_rows(rows, where)
            return self.set(out, rep.view(bshape).expand(out.shape).clone())
        prow, _ = _fibers(self.p[x], dims)
        if not (bool((prow.min(1).values == prow.max(1).values).all())
                and bool((rows.min(1).values == rows.max(1).values).all())):
            raise _Dead(f"{where} mixes positions that receive different shifts")
        self.set(out, rows[:, 0].view(bshape).expand(out.shape).clone(),
                 prow[:, 0].view(bshape).expand(out.shape).clone())

    def matmul(self, node: Node, args) -> None:
        a, b = args[0], args[1]
        if node.reversed:
            a, b = b, a
        where = self.where(node)
        if self.mode == SHIFT:
            raise _Dead(f"{where} does not preserve a shift")
        ra, rb = self.reached(a), self.reached(b)
        out = node.outputs[0]
        if ra and rb:
            raise _Dead(f"{where} multiplies two perturbed tensors")
        if ra and len(a.shape) >= 2:
            if _param(b) is not None and len(b.shape) == 2:      # x @ W: rows of W compensate
                rep = self._columns(self.g[a], where)
                return self.consume(node, b, rep.view(-1, 1).expand(b.shape))
            if isinstance(b, Value) and len(b.shape) >= 2:
                rows, kept = _fibers(self.g[a], [len(a.shape) - 1])
                rep = self.merge_rows(rows, where).view(kept)
                return self._set_bcast(node, out, rep.unsqueeze(-1))
        if rb and len(b.shape) >= 2:
            if _param(a) is not None and len(a.shape) == 2:      # W @ x: columns of W compensate
                lb = self.g[b]
                rows = lb.movedim(-2, 0).reshape(lb.shape[-2], -1)
                rep = self.merge_rows(rows, where)
                return self.consume(node, a, rep.view(1, -1).expand(a.shape))
            if isinstance(a, Value) and len(a.shape) >= 2:
                rows, kept = _fibers(self.g[b], [len(b.shape) - 2])
                rep = self.merge_rows(rows, where).view(kept)
                return self._set_bcast(node, out, rep.unsqueeze(-2))
        raise _Dead(f"{where}: unsupported operand layout")

    def _set_bcast(self, node, out, lab) -> None:
        try:
            self.set(out, torch.broadcast_to(lab, out.shape).clone())
        except RuntimeError:
            raise _Dead(f"cannot follow {self.where(node)} on labels") from None

    def _columns(self, lab: torch.Tensor, where: str) -> torch.Tensor:
        """One label per index of the last axis, merged over all other axes."""
        rows = lab.reshape(-1, lab.shape[-1]).t()
        return self.merge_rows(rows, where)

    def _channels(self, lab: torch.Tensor, where: str) -> torch.Tensor:
        rows = lab.transpose(0, 1).reshape(lab.shape[1], -1)
        return self.merge_rows(rows, where)

    def consume(self, node: Node, w: Value, cmap: torch.Tensor) -> None:
        self.consumers.append((node, w.name, cmap.to(F64)))

    def layer(self, node: Node, args, kwargs) -> None:
        a = _bind(node, args, kwargs)
        x = a["input"]
        where = self.where(node)
        if self.mode == SHIFT:
            raise _Dead(f"{where} does not preserve a shift")
        self._only_first_reached(node, x)
        w = _param(a.get("weight"))
        if w is None:
            raise _Dead(f"{where} has a computed (not parameter) weight")
        if node.op == "linear":
            rep = self._columns(self.g[x], where)
            return self.consume(node, w, rep.view(1, -1).expand(w.shape))
        rep = self._channels(self.g[x], where)
        if _is_convt(node.op):
            return self.consume(node, w, rep.view(-1, *([1] * (len(w.shape) - 1))).expand(w.shape))
        groups = int(a.get("groups", 1))
        out_c, m = w.shape[0], w.shape[1]
        opg = out_c // groups
        idx = (torch.arange(out_c) // opg).view(-1, 1) * m + torch.arange(m).view(1, -1)
        cmap = rep[idx].view(out_c, m, *([1] * (len(w.shape) - 2))).expand(w.shape)
        self.consume(node, w, cmap)

    def mha(self, node: Node, args, kwargs) -> None:
        a = _bind(node, args, kwargs)
        where = self.where(node)
        if self.mode == SHIFT:
            raise _Dead(f"{where} does not preserve a shift")
        for key in ("attn_mask", "key_padding_mask", "in_proj_weight", "in_proj_bias", "out_proj_weight"):
            if self.reached(a.get(key)):
                raise _Dead(f"{where} reads the perturbed tensor as {key}")
        reps = []
        for key in ("query", "key", "value"):
            t = a.get(key)
            reps.append(self._columns(self.g[t], where) if self.reached(t) else None)
        if a.get("use_separate_proj_weight", False):
            for rep, key in zip(reps, ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                if rep is not None:
                    w = _param(a.get(key))
                    if w is None:
                        raise _Dead(f"{where}: {key} is not a parameter")
                    self.consume(node, w, rep.view(1, -1).expand(w.shape))
            return
        w = _param(a.get("in_proj_weight"))
        if w is None:
            raise _Dead(f"{where}: in_proj_weight is not a parameter")
        E = w.shape[0] // 3
        cmap = torch.full(w.shape, -1.0, dtype=F64)
        for s, rep in enumerate(reps):
            if rep is not None:
                cmap[s * E:(s + 1) * E] = rep.view(1, -1).expand(E, w.shape[1])
        self.consume(node, w, cmap)

    def sdpa(self, node: Node, args, kwargs) -> None:
        a = _bind(node, args, kwargs)
        where = self.where(node)
        if self.mode == SHIFT:
            raise _Dead(f"{where} does not preserve a shift")
        for key in ("query", "key", "attn_mask"):
            if self.reached(a.get(key)):
                raise _Dead(f"{where}: the {key} is perturbed (attention weights would change)")
        v = a["value"]
        rows, kept = _fibers(self.g[v], [len(v.shape) - 2])
        rep = self.merge_rows(rows, where).view(kept)
        self._set_bcast(node, node.outputs[0], rep.unsqueeze(-2))

    def normaliser(self, node: Node, args, kwargs) -> None:
        op = node.op
        where = self.where(node)
        if op == "normalize":
            a = bind_args(SIGNATURES["normalize"], args, kwargs)
        else:
            a = bind_args(SIGNATURES[op], args, kwargs)
        x = a["input"]
        self._only_first_reached(node, x)
        if op in ("rms_norm", "normalize") and self.mode == SHIFT:
            raise _Dead(f"{where} does not subtract a mean, so it does not absorb a shift")
        if op == "normalize":
            dims = [int(a.get("dim", 1)) % len(x.shape)]
            shape = tuple(x.shape)
        else:
            shape, dims = norm_fiber_dims(op, tuple(x.shape), a)
            dims = list(dims)
        lab = self.g[x].reshape(shape)
        rows, _ = _fibers(lab, dims)
        if self.mode == SHIFT:
            prow, _ = _fibers(self.p[x].reshape(shape), dims)
            if not bool((prow.min(1).values == prow.max(1).values).all()):
                raise _Dead(f"{where}: the shift differs inside one normalised set")
            self.merge_rows(rows, where, allow_unreached=False)
        else:
            self.merge_rows(rows, where)
        stats_free = ((op == "batch_norm" and not a.get("training", False)
                       and a.get("running_mean") is not None and a.get("running_var") is not None)
                      or (op == "instance_norm" and not a.get("use_input_stats", True)))
        if stats_free:
            what = "scale" if self.mode == SCALE else "translation"
            self.forced = (f"{_NORM_TAG[op]} {_op_layer(node, self.graph)} normalises with running statistics "
                           f"(eval mode), which do not follow the perturbation: no {what} symmetry")
        elif self.mode == SCALE and op != "normalize":
            eps = node.stats.get("eps", 0.0)
            if eps > 0:
                self.approx.append((f"{_NORM_TAG[op]} {_op_layer(node, self.graph)}", eps,
                                    node.stats.get("max_ratio", 1.0), node.stats.get("set_size", 0)))
        self.absorbers.append(node)

    def shift_absorber(self, node: Node, args, kwargs) -> None:
        where = self.where(node)
        if self.mode == SCALE:
            raise _Dead(f"{where} is not scale-invariant")
        a = _bind(node, args, kwargs)
        x = a["input"]
        self._only_first_reached(node, x)
        nd = len(x.shape)
        if node.op == "cross_entropy":
            dim = 1 if nd >= 2 else 0
        else:
            dim = a.get("dim")
            if dim is None:
                dim = 0 if nd in (0, 1, 3) else 1
        rows, _ = _fibers(self.g[x], [dim % nd])
        prow, _ = _fibers(self.p[x], [dim % nd])
        if not bool((prow.min(1).values == prow.max(1).values).all()):
            raise _Dead(f"{where}: the shift is not the same for every class")
        self.merge_rows(rows, where, allow_unreached=False)
        self.absorbers.append(node)


def _fibers(lab: torch.Tensor, dims) -> Tuple[torch.Tensor, List[int]]:
    nd = lab.dim()
    dims = [d % nd for d in dims]
    keep = [d for d in range(nd) if d not in dims]
    size = math.prod(lab.shape[d] for d in dims)
    rows = lab.permute(keep + dims).reshape(-1, size) if nd else lab.reshape(1, 1)
    return rows, [lab.shape[d] for d in keep]


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _nonzero(pad) -> bool:
    if isinstance(pad, (list, tuple)):
        return any(int(p) != 0 for p in pad)
    return isinstance(pad, int) and pad != 0


def _describe_op(node: Node) -> str:
    return f"{node.op} in {node.module}" if node.module else node.op


# ---------------------------------------------------------------------- candidates
def fit_view(cmap: torch.Tensor, k: int) -> Optional[Tuple[int, int, int]]:
    """The ``(A, K, B)`` view whose slice ``j`` is exactly the elements labelled ``j`` (or None)."""
    flat = cmap.reshape(-1)
    n = flat.numel()
    if n == 0 or k <= 0 or bool((flat < 0).any()) or n % k:
        return None
    if k == 1:
        return (1, 1, n) if bool((flat == 0).all()) else None
    nz = (flat != flat[0]).nonzero()
    b = int(nz[0]) if len(nz) else n
    if flat[0] != 0 or b == 0 or n % (k * b):
        return None
    a = n // (k * b)
    ok = torch.equal(flat.view(a, k, b), torch.arange(k, dtype=flat.dtype).view(1, k, 1).expand(a, k, b))
    return (a, k, b) if ok else None


def build_candidate(graph: Graph, src: Source) -> Optional[Candidate]:
    """Propagate one source; return its candidate family, or None when there is no symmetry."""
    prop = _Propagation(graph, src)
    try:
        prop.run()
    except _Dead:
        return None
    if not prop.absorbers and not prop.consumers:
        return None
    cand = Candidate(None, src, forced=prop.forced, approx=prop.approx)
    layer = src.layer
    consumers = list(dict.fromkeys(_op_layer(n, graph) for n, _, _ in prop.consumers))
    if src.mode == SCALE:
        kind = "rescale" if prop.consumers else "scale"
        if kind == "scale":
            tags = list(dict.fromkeys(f"{_NORM_TAG.get(n.op, n.op)} {_op_layer(n, graph)}" for n in prop.absorbers))
            name = f"{layer} (scale, {', '.join(tags)})"
        else:
            name = f"{layer} → {', '.join(consumers)} (rescale)"
    else:
        kind = "translation"
        name = f"{layer} (translation, {src.what})"
    cand.name = name
    table = prop.uf.table().long()
    maps = [(pn, cm, sign, view) for pn, cm, sign, view in src.members]
    maps += [(pn, cm, -1, None) for _, pn, cm in prop.consumers]
    members, problems = [], []
    lut = None
    for pn, cm, sign, view in maps:
        if view is None:
            # Label maps are broadcast views (a row label repeated over a whole filter, a column label
            # over every output): fit the view on the compact core and stretch it.
            lead, core, trail = _compact(cm)
            core = core.long()
            roots = torch.where(core >= 0, table[core.clamp(min=0)], torch.full_like(core, -1))
            if lut is None:
                seen = [r for r in dict.fromkeys(roots.reshape(-1).tolist()) if r >= 0]
                lut = torch.full((len(table) + 1,), -1, dtype=torch.long)
                lut[torch.tensor(seen, dtype=torch.long)] = torch.arange(len(seen))
                k = len(seen)
            canon = lut[torch.where(roots >= 0, roots, torch.full_like(roots, len(table)))]
            core_view = fit_view(canon, k)
            if core_view is None:
                problems.append(_unexpressible(pn, cm, canon, k, sign))
                continue
            a, kk, b = core_view
            view = (lead * a, kk, b * trail) if kk > 1 else (1, 1, lead * a * b * trail)
        members.append((pn, view, sign))
    if problems:
        cand.refusal = "; ".join(problems)
        return cand
    if len({v[1] for _, v, _ in members}) != 1:
        cand.refusal = "members have different numbers of groups"
        return cand
    fam = SymmetryFamily(kind, name, members, layer=layer)
    fam.extra.update(absorbers=[_describe_op(n) for n in prop.absorbers], consumers=consumers,
                     source=src.node.index)
    cand.family = fam
    # Shared or tied parameters: the rules assume each parameter is used by exactly one call.
    for pn, _, _ in members:
        if pn in graph.tied:
            cand.refusal = (f"parameter {pn} is tied: the same tensor is also registered as "
                            f"{', '.join(x for x in graph.tied[pn] if x != pn)}")
            break
        uses = graph.param_uses.get(pn, [])
        if len(uses) > 1:
            cand.refusal = (f"parameter {pn} is used by {len(uses)} calls in the forward pass "
                            f"({', '.join(_describe_op(n) for n in uses[:4])}); a shared parameter "
                            f"receives the sum of several gradients and the one-call rule does not apply")
            break
        if pn in graph.frozen:
            cand.refusal = f"parameter {pn} is frozen (requires_grad=False)"
            break
    return cand


def _compact(cm: torch.Tensor) -> Tuple[int, torch.Tensor, int]:
    """Split a label map into (leading repeats, core, trailing repeats) using its broadcast strides."""
    shape, stride = list(cm.shape), list(cm.stride())
    nd = len(shape)
    i, lead = 0, 1
    while i < nd and (shape[i] == 1 or stride[i] == 0):
        lead *= shape[i]
        i += 1
    j, trail = nd, 1
    while j > i and (shape[j - 1] == 1 or stride[j - 1] == 0):
        trail *= shape[j - 1]
        j -= 1
    core = cm[tuple([0] * i + [slice(None)] * (j - i) + [0] * (nd - j))]
    return lead, core.reshape(-1), trail


def _unexpressible(pn: str, cmap: torch.Tensor, canon: torch.Tensor, k: int, sign: int) -> str:
    side = "consumer" if sign < 0 else "source"
    if bool((canon < 0).any()):
        return (f"{side} {pn}: only part of the tensor belongs to the groups, and an (A, K, B) view must "
                f"cover the whole tensor")
    return (f"{side} {pn} (shape {tuple(cmap.shape)}): its slices for the {k} groups do not form an "
            f"(A, K, B) view (e.g. a grouped conv whose groups hold several channels, or a permuted "
            f"consumer)")
