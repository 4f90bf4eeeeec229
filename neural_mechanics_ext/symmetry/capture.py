"""Runtime dataflow capture: one real forward pass (and the loss), recorded op by op.

Why a runtime capture and not ``torch.fx``: discovery needs to see *every* operation that touches an
activation, including functional calls (``F.relu``, ``torch.flatten``, ``x.view``, ``x += identity``),
custom forward code, data-dependent control flow and the loss itself, and it needs the concrete shapes.
``torch.fx.symbolic_trace`` fails on data-dependent control flow and gives no shapes; a
:class:`~torch.overrides.TorchFunctionMode` sees every ``torch.*``, ``torch.nn.functional.*`` and
``Tensor`` method call of one real forward pass, with shapes, for every model that runs.  It sees the
*outermost* call only (the mode is switched off while a call runs), so ``nn.BatchNorm2d`` shows up as
one ``F.batch_norm`` call with its ``training`` flag and ``eps``, and ``nn.Linear`` as one ``F.linear``.
The price is that only the path taken on the example inputs is recorded; a symmetry that depends on a
branch not taken is not seen (and every candidate is proved on the same inputs anyway).

What is recorded:
* a :class:`Value` per tensor version: model inputs, parameters (with their names), buffers, constants,
  and the result of every recorded call.  An in-place call (``relu_``, ``+=``, ``x[i] = y``,
  ``inplace=True``) makes a new value for the same tensor object.
* a :class:`Node` per call that has at least one tensor among its arguments: the function, its
  arguments with tensors replaced by their values (so the call can be replayed on label tensors), the
  innermost module that was running (forward hooks), and ``opaque`` when the call cannot be trusted.

Aliasing is detected, not assumed away: every time a tensor object is read, its ``_version`` is
compared with the version it had when recorded; a tensor changed behind the capture's back (in place
through a view, or by code the mode cannot see) becomes a fresh value produced by an *opaque* node, and
so does a tensor never produced by a recorded call that shares storage with an activation.  Opaque nodes
stop every symmetry that reaches them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclass(eq=False)
class Value:
    """One version of one tensor seen during the capture."""

    index: int
    kind: str                                 # "input", "param", "buffer", "const", "act"
    shape: Tuple[int, ...]
    dtype: torch.dtype
    producer: Optional["Node"] = None
    name: Optional[str] = None                # parameter or buffer name
    tensor: Optional[torch.Tensor] = None     # kept for integer/bool tensors (indices, masks)
    consumers: List["Node"] = field(default_factory=list)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    def __repr__(self) -> str:
        label = self.name or (self.producer.op if self.producer is not None else self.kind)
        return f"<Value {self.index} {label} {tuple(self.shape)}>"


@dataclass(eq=False)
class Node:
    """One recorded call."""

    index: int
    func: Callable
    op: str                                   # canonical name: "conv2d", "add", "view", ...
    reversed: bool                            # ``__rsub__`` and friends: operands swapped
    leaves: List[Any]                         # flattened (args, kwargs); tensors replaced by Values
    spec: Any
    inputs: List[Value]
    outputs: List[Optional[Value]]            # flattened output leaves (None for non-tensors)
    module: str
    opaque: Optional[str] = None
    stats: dict = field(default_factory=dict)

    def call_args(self, subst: Optional[Callable[[Value], Any]] = None):
        """``(args, kwargs)`` of the call, Values replaced by ``subst(value)`` (default: kept)."""
        leaves = [subst(v) if (subst is not None and isinstance(v, Value)) else v for v in self.leaves]
        return tree_unflatten(leaves, self.spec)

    def __repr__(self) -> str:
        return f"<Node {self.index} {self.op} in {self.module or '<root>'}>"


class Graph:
    """The recorded dataflow of one forward pass plus the loss."""

    def __init__(self, model: torch.nn.Module):
        self.nodes: List[Node] = []
        self.values: List[Value] = []
        self.inputs: List[Value] = []
        self.loss: Optional[Value] = None
        self.outputs: List[Value] = []
        # Every name under which each parameter object is registered; more than one means tied.
        self.param_names: Dict[int, List[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), []).append(n)
        self.buffer_names: Dict[int, str] = {id(b): n for n, b in model.named_buffers(remove_duplicate=False)}
        self.frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        self.params: Dict[str, Value] = {}
        self._bound: Dict[int, Tuple[Value, int]] = {}      # id(tensor) -> (value, _version)
        self._storage: Dict[int, Value] = {}               # storage ptr -> last activation there
        self._keep: List[torch.Tensor] = []                # keep ids unique during the capture

    # ------------------------------------------------------------------ recording
    def _new_value(self, t: torch.Tensor, kind: str, producer=None, name=None) -> Value:
        v = Value(len(self.values), kind, tuple(t.shape), t.dtype, producer, name)
        if not (t.dtype.is_floating_point or t.dtype.is_complex):
            v.tensor = t.detach().cpu()     # indices and masks, replayed on (CPU) label tensors
        self.values.append(v)
        self._bind(t, v)
        if kind in ("act", "input"):
            ptr = _storage_ptr(t)
            if ptr is not None:
                self._storage[ptr] = v
        return v

    def _bind(self, t: torch.Tensor, v: Value) -> None:
        self._keep.append(t)
        self._bound[id(t)] = (v, _version(t))

    def bind_input(self, t: torch.Tensor) -> Value:
        v = self._new_value(t, "input")
        self.inputs.append(v)
        return v

    def value_of(self, t: torch.Tensor, module: str) -> Value:
        """The current value of tensor object ``t``, creating it on first sight."""
        hit = self._bound.get(id(t))
        if hit is not None:
            v, ver = hit
            if v.kind in ("param", "buffer") or _version(t) == ver:
                return v
            return self._opaque_value(t, [v], module, "it was modified in place through an alias (a view "
                                      "or code the capture cannot see)")
        pid = id(t)
        if pid in self.param_names:
            name = self.param_names[pid][0]
            v = self._new_value(t, "param", name=name)
            self.params[name] = v
            return v
        if pid in self.buffer_names:
            return self._new_value(t, "buffer", name=self.buffer_names[pid])
        ptr = _storage_ptr(t)
        if ptr is not None and ptr in self._storage:
            return self._opaque_value(t, [self._storage[ptr]], module,
                                      "it shares storage with an activation but was not produced by a "
                                      "recorded call")
        return self._new_value(t, "const")

    def _opaque_value(self, t, sources, module, why) -> Value:
        node = Node(len(self.nodes), _identity, "opaque", False, list(sources), None, list(sources), [],
                    module, opaque=f"a tensor read in {module or 'the model'}: {why}")
        self.nodes.append(node)
        for s in sources:
            s.consumers.append(node)
        v = self._new_value(t, "act", producer=node)
        node.outputs.append(v)
        return v

    def record(self, func, args, kwargs, module: str, run: Callable[[], Any]):
        """Record one call (``run`` performs it) and return its result."""
        leaves, spec = tree_flatten((args, kwargs))
        if not any(isinstance(x, torch.Tensor) for x in leaves):
            return run()
        op, rev = op_name(func)
        in_leaves = [self.value_of(x, module) if isinstance(x, torch.Tensor) else x for x in leaves]
        out = run()
        out_leaves, _ = tree_flatten(out)
        out_tensors = [o for o in out_leaves if isinstance(o, torch.Tensor)]
        if not out_tensors and op != "setitem":
            return out
        inputs = [x for x in in_leaves if isinstance(x, Value)]
        node = Node(len(self.nodes), func, op, rev, in_leaves, spec, inputs, [], module)
        self.nodes.append(node)
        for v in dict.fromkeys(inputs):
            v.consumers.append(node)
        if op == "setitem":                       # x[idx] = y: a new version of x
            target = args[0]
            node.outputs.append(self._new_value(target, "act", producer=node))
        else:
            for o in out_leaves:
                if not isinstance(o, torch.Tensor):
                    node.outputs.append(None)
                    continue
                # An in-place update of a buffer (BN's num_batches_tracked += 1) stays a buffer.
                prev = self._bound.get(id(o))
                if prev is not None and prev[0].kind in ("param", "buffer"):
                    node.outputs.append(self._new_value(o, prev[0].kind, producer=node, name=prev[0].name))
                else:
                    node.outputs.append(self._new_value(o, "act", producer=node))
        if op in NORM_OPS:
            _norm_stats(node, leaves)
        elif op == "add" and len(args) == 2:
            _eps_stats(node, args)
        return out

    # ------------------------------------------------------------------ queries
    def finish(self, outputs, loss) -> None:
        self.outputs = [self._bound[id(t)][0] for t in tree_flatten(outputs)[0]
                        if isinstance(t, torch.Tensor) and id(t) in self._bound]
        if not isinstance(loss, torch.Tensor) or id(loss) not in self._bound:
            raise TypeError("find_symmetries: the loss must be a tensor computed from the model's outputs "
                            f"with torch operations, got {type(loss).__name__}")
        self.loss = self._bound[id(loss)][0]
        self._bound.clear()
        self._storage.clear()
        self._keep.clear()
        # Values that can change the loss: everything else (logging, asserts, running statistics,
        # unused outputs) is irrelevant to the gradient and is ignored by the rules.
        live = {self.loss.index}
        for node in reversed(self.nodes):
            if any(o is not None and o.index in live for o in node.outputs):
                live.update(v.index for v in node.inputs)
        self.live = live
        self.tied: Dict[str, List[str]] = {}
        for names in self.param_names.values():
            if len(names) > 1:
                for n in names:
                    self.tied[n] = names
        self.param_uses: Dict[str, List[Node]] = {}
        for node in self.nodes:
            if not any(o is not None and o.index in live for o in node.outputs):
                continue
            for v in dict.fromkeys(node.inputs):
                if v.kind == "param":
                    self.param_uses.setdefault(v.name, []).append(node)

    def affects_loss(self, node: Node) -> bool:
        return any(o is not None and o.index in self.live for o in node.outputs)


def _identity(x):
    return x


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except Exception:  # inference tensors have no version counter
        return -1


def _storage_ptr(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr() or None
    except Exception:
        return None


# ---------------------------------------------------------------------- op names
_DUNDER = {"add": "add", "sub": "sub", "mul": "mul", "truediv": "div", "div": "div", "matmul": "matmul",
           "neg": "neg", "pos": "positive", "abs": "abs", "getitem": "getitem", "setitem": "setitem",
           "floordiv": "floordiv", "pow": "pow", "mod": "remainder"}
_ALIASES = {"true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub", "concat": "cat",
            "concatenate": "cat", "swapaxes": "transpose", "swapdims": "transpose", "moveaxis": "movedim",
            "clip": "clamp", "negative": "neg", "absolute": "abs", "max_pool2d_with_indices": "max_pool2d",
            "max_pool1d_with_indices": "max_pool1d", "max_pool3d_with_indices": "max_pool3d",
            "adaptive_max_pool1d_with_indices": "adaptive_max_pool1d",
            "adaptive_max_pool2d_with_indices": "adaptive_max_pool2d",
            "adaptive_max_pool3d_with_indices": "adaptive_max_pool3d", "mm": "matmul", "bmm": "matmul"}
_BY_OBJECT = {F.max_pool1d: "max_pool1d", F.max_pool2d: "max_pool2d", F.max_pool3d: "max_pool3d",
              F.adaptive_max_pool1d: "adaptive_max_pool1d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
              F.adaptive_max_pool3d: "adaptive_max_pool3d", F.batch_norm: "batch_norm",
              F.instance_norm: "instance_norm", F.group_norm: "group_norm", F.layer_norm: "layer_norm",
              F.linear: "linear", F.embedding: "embedding"}
if hasattr(F, "rms_norm"):
    _BY_OBJECT[F.rms_norm] = "rms_norm"
# torch.batch_norm / torch.layer_norm etc. have other signatures than their F twins: keep them apart.
_TORCH_TWINS = {torch.batch_norm: "batch_norm_aten", torch.instance_norm: "instance_norm_aten",
                torch.group_norm: "group_norm_aten", torch.layer_norm: "layer_norm_aten"}


def normaliser_op(func) -> Optional[str]:
    """``"batch_norm"``, ``"layer_norm"``, ... when ``func`` is one of the ``F`` normalisers, else None."""
    try:
        op = _BY_OBJECT.get(func)
    except TypeError:          # unhashable callables
        return None
    return op if op in NORM_OPS else None


def op_name(func) -> Tuple[str, bool]:
    """Canonical op name of a ``__torch_function__`` func, and whether its operands are swapped."""
    try:
        hit = _BY_OBJECT.get(func) or _TORCH_TWINS.get(func)
    except TypeError:
        hit = None
    if hit:
        return hit, False
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":                          # a property such as x.T, x.mT, x.data
        owner = getattr(func, "__self__", None)
        return "property_" + str(getattr(owner, "__name__", "?")), False
    rev = False
    if name.startswith("__") and name.endswith("__"):
        core = name[2:-2]
        if core.startswith("i") and core[1:] in _DUNDER:
            core = core[1:]
        elif core.startswith("r") and core[1:] in _DUNDER:
            core, rev = core[1:], True
        return _DUNDER.get(core, core), rev
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    name = name.lstrip("_")
    return _ALIASES.get(name, name), rev


# ---------------------------------------------------------------------- normaliser statistics
NORM_OPS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")


def norm_fiber_dims(op: str, shape, args) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """How a normaliser groups its input: ``(reshape, dims)`` such that ``x.reshape(reshape)`` reduced
    over ``dims`` gives one row per normalised set.  ``args`` maps argument names to values."""
    nd = len(shape)
    if op == "batch_norm":
        return tuple(shape), (0,) + tuple(range(2, nd))
    if op == "instance_norm":
        return tuple(shape), tuple(range(2, nd))
    if op == "group_norm":
        g = int(args["num_groups"])
        rest = 1
        for s in shape[1:]:
            rest *= s
        return (shape[0], g, rest // g), (2,)
    if op in ("layer_norm", "rms_norm"):
        ns = args["normalized_shape"]
        k = 1 if isinstance(ns, int) else len(ns)
        return tuple(shape), tuple(range(nd - k, nd))
    return None


SIGNATURES = {
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "conv_transpose": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
                      "momentum", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "embedding": ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    "cross_entropy": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                      "label_smoothing"),
    "softmax": ("input", "dim", "_stacklevel", "dtype"),
    "dropout": ("input", "p", "training", "inplace"),
    "pad": ("input", "pad", "mode", "value"),
    "avg_pool": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override"),
    "adaptive_pool": ("input", "output_size", "return_indices"),
    "reduce": ("input", "dim", "keepdim"),
    "leaky_relu": ("input", "negative_slope", "inplace"),
    "clamp": ("input", "min", "max"),
    "normalize": ("input", "p", "dim", "eps"),
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
    "addmm": ("input", "mat1", "mat2", "beta", "alpha"),
    "baddbmm": ("input", "batch1", "batch2", "beta", "alpha"),
    "mha": ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
            "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
            "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
            "k_proj_weight", "v_proj_weight"),
}


def bind_args(names, args, kwargs) -> Dict[str, Any]:
    """Map positional and keyword arguments onto ``names`` (missing ones are absent from the dict)."""
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _norm_stats(node: Node, leaves) -> None:
    """Smallest per-set variance of a normaliser's input, for the eps tolerance rule."""
    args, kwargs = tree_unflatten(leaves, node.spec)
    a = bind_args(SIGNATURES[node.op], args, kwargs)
    x = a.get("input")
    eps = a.get("eps")
    if eps is None:
        eps = 1e-5 if node.op != "rms_norm" else torch.finfo(x.dtype).eps
    node.stats["eps"] = float(eps)
    try:
        shape, dims = norm_fiber_dims(node.op, tuple(x.shape), a)
        size = 1
        for d in dims:
            size *= shape[d]
        node.stats["set_size"] = size
        xr = x.detach().reshape(shape).to(torch.float64)
        if node.op == "rms_norm":
            var = (xr * xr).mean(dim=dims)
        else:
            var = xr.var(dim=dims, unbiased=False)
        node.stats["min_var"] = float(var.min()) if var.numel() else float("nan")
        node.stats["max_ratio"] = float((eps / (var + eps)).max()) if var.numel() else 0.0
    except Exception:  # statistics are advisory; the rules recompute what they need
        node.stats["min_var"] = float("nan")
        node.stats["max_ratio"] = 1.0


def _eps_stats(node: Node, args) -> None:
    """``t + eps`` with a small positive number: max eps/(|t| + eps), for the eps tolerance rule when ``t``
    turns out to be the variance of a normaliser written out by hand."""
    t, c = args if isinstance(args[0], torch.Tensor) else args[::-1]
    if isinstance(t, torch.Tensor) and t.is_floating_point() and isinstance(c, float) and 0 < c < 1 and t.numel():
        with torch._C.DisableTorchFunction():
            node.stats["max_ratio"] = float((c / (t.detach().abs().double() + c)).max())


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        self.stack: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        module = self.stack[-1] if self.stack else ""
        return self.graph.record(func, args, kwargs, module, lambda: func(*args, **kwargs))


@contextlib.contextmanager
def _module_names(model: torch.nn.Module, stack: List[str]):
    handles = []
    for name, mod in model.named_modules():
        def pre(m, a, _n=name):
            stack.append(_n)

        def post(m, a, o, _n=name):
            if stack:
                stack.pop()

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, loss_fn: Callable[[Any], torch.Tensor]) -> Graph:
    """Run ``loss_fn(model(*args, **kwargs))`` once and record its dataflow."""
    graph = Graph(model)
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, torch.Tensor):
            graph.bind_input(t)
    rec = _Recorder(graph)
    with _module_names(model, rec.stack), rec:
        outputs = model(*args, **kwargs)
        loss = loss_fn(outputs)
    graph.finish(outputs, loss)
    return graph
