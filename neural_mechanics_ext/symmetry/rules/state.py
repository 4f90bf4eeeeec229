"""What every op handler works on: the label tensors of one propagation, and the helpers they share.

A propagation follows one :class:`Source` forward.  Each activation it reaches gets a *label tensor*
``g`` (same shape; each element holds the group that perturbs it, ``-1`` for none) and, for a shift, a
tensor ``p`` saying which shift value each element receives.  Handlers read and write these through
:class:`Propagation`, merge groups that an op forces to move together (:meth:`Propagation.merge_rows`),
record compensators (:meth:`Propagation.consume`) and absorbers, and raise :class:`Dead` when the
perturbation reaches something that neither preserves nor absorbs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from ..capture import SIGNATURES, Graph, Node, Value, bind_args

F64 = torch.float64
SCALE, SHIFT = "scale", "shift"
DROPOUT = {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"}
NORM_TAG = {"batch_norm": "BN", "instance_norm": "IN", "group_norm": "GN", "layer_norm": "LN",
            "rms_norm": "RMSNorm", "normalize": "normalize", "cross_entropy": "cross-entropy",
            "softmax": "softmax", "log_softmax": "log-softmax",
            # a hand-written normaliser absorbs where the scaling cancels (x·rsqrt(...)) or the shift (x − μ)
            "mul": "norm", "div": "norm", "sub": "norm", "var": "norm"}


class Dead(Exception):
    """The perturbation reached something that does not preserve or absorb it.  ``needs``: activations
    that, scaled with it by their own writers, would let a scaling pass (the other term of a residual
    join; :mod:`.joint`).  ``prop``: the propagation it ended (set by :func:`.engine.propagate`)."""

    def __init__(self, msg: str, needs=()):
        super().__init__(msg)
        self.needs = list(needs)
        self.prop = None


class UnionFind:
    """Groups that must move together.  Each label also has a parity relative to its group: even labels
    are scaled by the group's α, odd ones by 1/α (the key side of a query·key product whose query side is
    scaled by α).  Joining two labels with a parity that contradicts what is known raises :class:`Dead`."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.odd = [0] * n          # parity relative to the parent
        self.mixtures: Dict[int, List[int]] = {}     # mixture label → the labels it sums, until joined
        self.mixture_of: Dict[Tuple[int, ...], int] = {}

    def find(self, a: int) -> Tuple[int, int]:
        """``(root, parity of a relative to root)``, compressing the path."""
        path = []
        while self.parent[a] != a:
            path.append(a)
            a = self.parent[a]
        acc = 0
        for x in reversed(path):    # nearest the root first: its parity is already relative to the root
            acc ^= self.odd[x]
            self.odd[x], self.parent[x] = acc, a
        return a, (self.odd[path[0]] if path else 0)

    def mixture(self, labels) -> int:
        """A label for an element that receives a sum of the shifts of ``labels`` (a key bias met by a
        query: q·c = Σ_j q_j c_j), each of which is absorbed, or not, on its own; the labels stay separate
        groups unless the mixture label is joined with something, which joins all of them."""
        labels = tuple(sorted({int(x) for x in labels}))
        if len(labels) == 1:
            return labels[0]
        if labels not in self.mixture_of:
            n = len(self.parent)
            self.parent.append(n)
            self.odd.append(0)
            self.mixtures[n] = list(labels)
            self.mixture_of[labels] = n
        return self.mixture_of[labels]

    def union(self, a: int, b: int, odd: int = 0) -> None:
        """``a`` and ``b`` move together: by the same α (``odd`` 0) or by inverse ones (``odd`` 1)."""
        for x in (int(a), int(b)):
            for y in self.mixtures.pop(x, ()):
                self.union(x, y)
        (ra, pa), (rb, pb) = self.find(int(a)), self.find(int(b))
        if ra == rb:
            if pa ^ pb != odd:
                raise Dead("a group would have to be scaled by α and by 1/α at once")
            return
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.odd[hi] = pa ^ pb ^ odd

    def union_all(self, labels) -> None:
        labels = [int(x) for x in labels]
        for x in labels[1:]:
            self.union(labels[0], x)

    def table(self) -> torch.Tensor:
        return torch.tensor([self.find(i)[0] for i in range(len(self.parent))], dtype=F64)

    def parities(self) -> torch.Tensor:
        return torch.tensor([self.find(i)[1] for i in range(len(self.parent))], dtype=torch.long)


@dataclass
class Source:
    """Where a candidate starts: a call whose parameter slices act on one axis of its output."""

    mode: str                       # SCALE or SHIFT
    node: Node
    layer: str
    what: str                       # scale: "units"; shift: "bias", "columns", "rows"
    k0: int                         # number of initial labels
    g: torch.Tensor                 # labels of node.outputs[0]
    p: Optional[torch.Tensor]       # shift only: which shift value each element receives
    members: List[Tuple[str, Optional[torch.Tensor], int, Optional[Tuple[int, int, int]]]]
    # further activations perturbed from the start, with their labels (a query·key source starts at both
    # projections)
    more: List[Tuple[Value, torch.Tensor]] = field(default_factory=list)
    # compensated inside the call (attention in one call): the output is unchanged, ``g`` is None
    inside: bool = False
    # joint candidates (:mod:`.joint`): further outputs perturbed, each (value, labels, shifts or None) set
    # once the call producing it has run (a parameter's from the start); label pairs (a, b, odd) joined from
    # the start; and the (parameter, call) uses the candidate accounts for
    later: List[Tuple[Value, torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=list)
    links: List[Tuple[int, int, int]] = field(default_factory=list)
    covers: List[Tuple[str, int]] = field(default_factory=list)


class Propagation:
    """The state of one source's propagation: labels per reached value, merged groups, the compensators
    (consumers) and absorbers met so far."""

    def __init__(self, graph: Graph, src: Source):
        self.graph = graph
        self.src = src
        self.mode = src.mode
        self.uf = UnionFind(src.k0)
        for a, b, odd in src.links:
            self.uf.union(a, b, odd)
        self.g: Dict[Value, torch.Tensor] = {}
        self.p: Dict[Value, torch.Tensor] = {}
        self.absorbers: List[Node] = []
        self.consumers: List[Tuple[Node, str, torch.Tensor]] = []
        self.joined: List[Tuple[str, torch.Tensor]] = []     # parameters scaled with the source
        self.covered: set = set()          # (parameter, call index) of every consumer and joined use
        self.wants: List[Value] = []       # unperturbed parts met beside perturbed ones (a concatenation)
        self.paired: List[Node] = []       # products where a query-side scaling meets its inverse key side
        # A scaling reaches an element as α^d: d = 1 from a source, other powers after pow/sqrt/rsqrt or a
        # product of two scaled tensors (a hand-written normaliser); d = 0 is invariance.
        self.deg: Dict[Value, float] = {}
        self.in_degrees = {1.0}                               # of the reached inputs of the current call
        self.forced: Optional[str] = None
        self.approx: List[Tuple[str, float, float, int]] = []
        self.composite = float(2 ** 40)     # next fresh shift label for a mixture of shifts

    # -- labels
    def reached(self, v) -> bool:
        return isinstance(v, Value) and v in self.g

    def lab(self, v: Value) -> torch.Tensor:
        return self.g[v] if v in self.g else torch.full(v.shape, -1.0, dtype=F64)

    def plab(self, v: Value) -> torch.Tensor:
        return self.p[v] if v in self.p else torch.full(v.shape, -1.0, dtype=F64)

    def degree(self, v: Value) -> float:
        return self.deg.get(v, 1.0)

    def set(self, v: Optional[Value], g: torch.Tensor, p: Optional[torch.Tensor] = None,
            degree: Optional[float] = None) -> None:
        """Give ``v`` the labels ``g`` (and shifts ``p``), scaled to the power ``degree`` (default: the
        power of the call's reached inputs, which must agree)."""
        if v is None:
            return
        if tuple(g.shape) != tuple(v.shape):
            raise Dead(f"internal: label shape {tuple(g.shape)} != {tuple(v.shape)}")
        if degree is None:
            if len(self.in_degrees) != 1:
                raise Dead(f"{describe_op(v.producer)} combines tensors scaled to different powers")
            degree = next(iter(self.in_degrees))
        self.deg[v] = degree
        self.g[v] = g
        if self.mode == SHIFT:
            self.p[v] = p

    def set_bcast(self, node: Node, out: Value, lab: torch.Tensor) -> None:
        try:
            self.set(out, torch.broadcast_to(lab, out.shape).clone())
        except RuntimeError:
            raise Dead(f"cannot follow {describe_op(node)} on labels") from None

    def canon(self, g: torch.Tensor) -> torch.Tensor:
        """Each label as its group, odd labels (scaled by 1/α) set apart: equal iff scaled alike."""
        t = self.uf.table() + self.uf.parities().to(F64) * len(self.uf.parent)
        out = g.clone()
        m = g >= 0
        out[m] = t[g[m].long()]
        return out

    def only_first_reached(self, node: Node, first) -> None:
        for v in node.inputs:
            if v in self.g and v is not first:
                raise Dead(f"{describe_op(node)} reads the perturbed tensor through a second argument")

    def no_shift(self, node: Node) -> None:
        if self.mode == SHIFT:
            raise Dead(f"{describe_op(node)} does not preserve a shift")

    # -- merging
    def merge_rows(self, rows: torch.Tensor, what: str, allow_unreached: bool = False) -> torch.Tensor:
        """Groups in one row must move together: merge them.  Returns one label per row."""
        if rows.numel() == 0:
            return rows.new_full((rows.shape[0],), -1.0)
        lo, hi = rows.min(1).values, rows.max(1).values
        if not allow_unreached and bool(((lo < 0) & (hi >= 0)).any()):
            raise Dead(f"{what} mixes elements that are perturbed with elements that are not")
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

    def columns(self, lab: torch.Tensor, where: str) -> torch.Tensor:
        """One label per index of the last axis, merged over all other axes."""
        rows = lab.reshape(-1, lab.shape[-1]).t()
        return self.merge_rows(rows, where)

    def channels(self, lab: torch.Tensor, where: str) -> torch.Tensor:
        """One label per index of axis 1 (channels), merged over all other axes."""
        rows = lab.transpose(0, 1).reshape(lab.shape[1], -1)
        return self.merge_rows(rows, where)

    def combine(self, prow: torch.Tensor, mean: bool) -> torch.Tensor:
        """Shift label after averaging/summing a row: a new label per distinct multiset of shifts."""
        srt = prow.sort(1).values
        const = srt[:, 0] == srt[:, -1]
        uniq, inv = torch.unique(srt, dim=0, return_inverse=True)
        out = self.composite + inv.to(F64)
        self.composite += len(uniq)
        if mean:
            out = torch.where(const, srt[:, 0], out)
        return torch.where(srt.max(1).values < 0, torch.full_like(out, -1.0), out)

    # -- outcomes
    def consume(self, node: Node, w: Value, cmap: torch.Tensor) -> None:
        """``w``'s slices ``cmap`` compensate the scaling: they join the family with sign −1."""
        if self.in_degrees != {1.0}:
            raise Dead(f"{describe_op(node)} reads a tensor scaled to a power other than 1, which its weights "
                       f"cannot compensate")
        self.consumers.append((node, w.name, cmap.to(F64)))
        self.covered.add((w.name, node.index))

    def join(self, node: Node, w: Value, cmap: torch.Tensor) -> None:
        """``w``'s slices ``cmap`` scale with the source (a bias added after a scaled weight): they join
        the family with sign +1."""
        if self.in_degrees != {1.0}:
            raise Dead(f"{describe_op(node)} adds {w.name} to a tensor scaled to a power other than 1")
        self.joined.append((w.name, cmap.to(F64)))
        self.covered.add((w.name, node.index))

    def rerun(self, node: Node, labels: Dict[Value, torch.Tensor]):
        """Replay a data-movement call on label tensors; returns its flattened outputs."""
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
            raise Dead(f"cannot follow {describe_op(node)} on labels ({exc})") from None
        leaves = tree_flatten(res)[0]
        if len(leaves) != len(node.outputs):
            raise Dead(f"cannot follow {describe_op(node)}: unexpected outputs")
        return leaves


# ---------------------------------------------------------------------- helpers shared by handlers
def layer_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def describe_op(node: Node) -> str:
    return f"{node.op} in {node.module}" if node.module else node.op


def op_layer(node: Node, graph: Graph) -> str:
    """The module that ran the call (forward hooks), else the owner of its weight, else the op."""
    if node.module:
        return node.module
    a = bind(node)
    for key in ("weight", "in_proj_weight", "q_proj_weight", "bias"):
        v = param(a.get(key))
        if v is not None:
            return layer_name(v.name)
    for v in node.inputs:
        if v.kind == "param":
            return layer_name(v.name)
    return f"{node.op}#{node.index}"


def signature(op: str) -> Tuple[str, ...]:
    """The positional argument names of ``op`` (by family: every conv shares one signature)."""
    if op.startswith("conv_transpose"):
        return SIGNATURES["conv_transpose"]
    if op.startswith("conv"):
        return SIGNATURES["conv"]
    if op in ("softmax", "log_softmax"):
        return SIGNATURES["softmax"]
    if op in DROPOUT or op in ("alpha_dropout", "feature_alpha_dropout"):
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


def bind(node: Node, args=None, kwargs=None) -> dict:
    """The call's arguments by name (Values kept)."""
    if args is None:
        args, kwargs = node.call_args()
    return bind_args(signature(node.op), args, kwargs)


def param(v) -> Optional[Value]:
    return v if isinstance(v, Value) and v.kind == "param" else None


def fibers(lab: torch.Tensor, dims) -> Tuple[torch.Tensor, List[int]]:
    """``lab`` as rows over ``dims`` (one row per index of the other axes) and the other axes' sizes."""
    nd = lab.dim()
    dims = [d % nd for d in dims]
    keep = [d for d in range(nd) if d not in dims]
    size = math.prod(lab.shape[d] for d in dims)
    rows = lab.permute(keep + dims).reshape(-1, size) if nd else lab.reshape(1, 1)
    return rows, [lab.shape[d] for d in keep]


def constant_rows(rows: torch.Tensor) -> bool:
    return bool((rows.min(1).values == rows.max(1).values).all())


def axis_labels(shape, dim: int, n: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = n
    return torch.arange(n, dtype=F64).view(view).expand(shape).clone()


def position_labels(shape, cdim: int) -> torch.Tensor:
    """Label of the position an element sits at, ignoring the channel/feature axis ``cdim``."""
    sizes = list(shape)
    sizes[cdim] = 1
    pos = torch.arange(math.prod(sizes), dtype=F64).view(sizes)
    return pos.expand(shape).clone()


def is_zero(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0
