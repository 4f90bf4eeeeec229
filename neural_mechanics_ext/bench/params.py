"""The parameter sets the suite reads: named shapes of real models (written out, so that no model is
built and no torchvision is needed) and the views the tracker reads them with, plus synthetic sets for
the scaling and tensor-count sweeps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from ..app.models import VGG16_CFG

View = Tuple[int, int, int]


@dataclass
class ParamSet:
    """Named parameter shapes and the views the tracker would read them with (no tensors yet)."""
    name: str
    shapes: List[Tuple[str, Tuple[int, ...]]]
    views: List[List[View]]
    note: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    @property
    def num_slices(self) -> int:
        return sum(v[1] for vs in self.views for v in vs)

    def table(self) -> List[int]:
        """The op's flat ``(tensor, A, K, B, offset, a_stride)`` table (what the reference takes)."""
        from ..views import full
        out = []
        for i, vs in enumerate(self.views):
            for v in vs:
                out += [i, *full(v)]
        return out


def rows_view(shape: Sequence[int]) -> View:
    """Rows of a weight (one slice per output unit) or the entries of a vector: ``(1, out, rest)``."""
    n = math.prod(shape)
    out = shape[0] if len(shape) else 1
    return (1, out, n // out if out else 0)


def columns_view(shape: Sequence[int]) -> View:
    """Input columns of a Linear weight ``(out, in)``: ``(out, in, 1)``."""
    return (shape[0], shape[1], 1)


def _make_set(name, shapes, column_params, note) -> ParamSet:
    views = []
    for pname, shape in shapes:
        vs = [rows_view(shape)]
        if pname in column_params:
            vs.append(columns_view(shape))
        views.append(vs)
    return ParamSet(name, list(shapes), views, note)


def vgg16_bn_shapes(num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """torchvision ``vgg16_bn`` parameter names and shapes, written out (no torchvision needed)."""
    shapes, i, cin = [], 0, 3
    for v in VGG16_CFG:
        if v == "M":
            i += 1
            continue
        shapes += [(f"features.{i}.weight", (v, cin, 3, 3)), (f"features.{i}.bias", (v,)),
                   (f"features.{i + 1}.weight", (v,)), (f"features.{i + 1}.bias", (v,))]
        i, cin = i + 3, v
    shapes += [("classifier.0.weight", (4096, 512 * 7 * 7)), ("classifier.0.bias", (4096,)),
               ("classifier.3.weight", (4096, 4096)), ("classifier.3.bias", (4096,)),
               ("classifier.6.weight", (num_classes, 4096)), ("classifier.6.bias", (num_classes,))]
    return shapes


def resnet50_shapes(num_classes: int = 1000) -> List[Tuple[str, Tuple[int, ...]]]:
    """torchvision ``resnet50`` parameter names and shapes, written out (no torchvision needed)."""
    shapes = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for li, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p, out = f"layer{li}.{b}", planes * 4
            for c, (co, ci, k) in enumerate(((planes, inplanes, 1), (planes, planes, 3), (out, planes, 1)), start=1):
                shapes += [(f"{p}.conv{c}.weight", (co, ci, k, k)), (f"{p}.bn{c}.weight", (co,)),
                           (f"{p}.bn{c}.bias", (co,))]
            if b == 0:
                shapes += [(f"{p}.downsample.0.weight", (out, inplanes, 1, 1)),
                           (f"{p}.downsample.1.weight", (out,)), (f"{p}.downsample.1.bias", (out,))]
            inplanes = out
    shapes += [("fc.weight", (num_classes, 2048)), ("fc.bias", (num_classes,))]
    return shapes


def gpt2_shapes(vocab: int = 50257, positions: int = 1024, d: int = 768, layers: int = 12):
    """GPT-2 small in nn.Linear convention (weights ``(out, in)``); the LM head is tied to ``wte``."""
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (positions, d))]
    for b in range(layers):
        p = f"h.{b}"
        shapes += [(f"{p}.ln_1.weight", (d,)), (f"{p}.ln_1.bias", (d,)),
                   (f"{p}.attn.c_attn.weight", (3 * d, d)), (f"{p}.attn.c_attn.bias", (3 * d,)),
                   (f"{p}.attn.c_proj.weight", (d, d)), (f"{p}.attn.c_proj.bias", (d,)),
                   (f"{p}.ln_2.weight", (d,)), (f"{p}.ln_2.bias", (d,)),
                   (f"{p}.mlp.c_fc.weight", (4 * d, d)), (f"{p}.mlp.c_fc.bias", (4 * d,)),
                   (f"{p}.mlp.c_proj.weight", (d, 4 * d)), (f"{p}.mlp.c_proj.bias", (d,))]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def vgg16_bn_set() -> ParamSet:
    shapes = vgg16_bn_shapes()
    cols = {n for n, s in shapes if n.startswith("classifier.") and len(s) == 2}
    return _make_set("vgg16_bn", shapes, cols,
                     "rows of every weight and bias; columns of classifier.0/3/6")


def resnet50_set() -> ParamSet:
    return _make_set("resnet50", resnet50_shapes(), {"fc.weight"}, "rows of every weight and bias; columns of fc")


def gpt2_set() -> ParamSet:
    shapes = gpt2_shapes()
    # A pre-LN block's LayerNorm gain γ rescales against the input columns of the Linear that reads
    # the LN output (γ_i·α, W[:, i]/α): c_attn and c_fc; ln_f feeds the tied LM head, whose columns are
    # also the cross-entropy translation groups.  c_proj reads attention / GELU outputs: rows only.
    cols = {n for n, _ in shapes if n.endswith(("c_attn.weight", "c_fc.weight"))} | {"wte.weight"}
    return _make_set("gpt2", shapes, cols,
                     "rows of every weight and bias; columns of c_attn, c_fc (LN → Linear) and wte (tied head)")


SET_BUILDERS: Dict[str, Callable[[], ParamSet]] = {"vgg16_bn": vgg16_bn_set, "resnet50": resnet50_set,
                                                   "gpt2": gpt2_set}


def shrink(pset: ParamSet, factor: int) -> ParamSet:
    """The same architecture with every dimension above 8 divided by ``factor`` (quick runs, tests)."""
    if factor <= 1:
        return pset
    names = {n for n, _ in pset.shapes}
    small = [(n, tuple(max(1, d // factor) if d > 8 else d for d in s)) for n, s in pset.shapes]
    cols = {n for (n, _), vs in zip(pset.shapes, pset.views) if len(vs) > 1} & names
    return _make_set(f"{pset.name}/{factor}", small, cols, pset.note)


def scaling_set(numel: int, width: int = 2048) -> ParamSet:
    """About ``numel`` parameters as square ``width × width`` layers (fewer, smaller ones below one
    layer), rows on every layer and columns on the last (a classifier): a model-like mix whose tensor
    count grows with its size."""
    if numel >= width * width:
        shapes = [(f"layer{i}.weight", (width, width)) for i in range(max(1, round(numel / (width * width))))]
    else:
        side = max(1, int(math.isqrt(numel)))
        shapes = [("layer0.weight", (side, max(1, numel // side)))]
    return _make_set(f"scale-{fmt_count(numel)}", shapes, {shapes[-1][0]}, "rows of every layer; columns of the last")


def count_set(total: int, count: int, inner: int = 256) -> ParamSet:
    """``total`` elements in ``count`` equal tensors of shape ``(total/count/inner, inner)``, rows view."""
    per = max(1, total // count)
    rows, cols = (per // inner, inner) if per >= inner else (1, per)
    shapes = [(f"t{i}", (rows, cols)) for i in range(count)]
    return _make_set(f"count-{count}", shapes, set(), "rows of every tensor")


def fmt_count(n: float) -> str:
    """1234567 -> '1.2M': parameter and element counts in names and tables."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v >= 10 or v == int(v) else f"{v:.1f}{unit}"
    return str(int(n))
