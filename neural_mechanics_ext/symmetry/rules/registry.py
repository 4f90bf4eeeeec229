"""The rule table: op name → handler (BackPACK's ``module_exts`` pattern).

``PROPAGATE[op](prop, node, args, kwargs)`` follows a perturbation through one call of ``op`` (or raises
:class:`~.state.Dead`); ``SOURCES[op](node, graph)`` lists the candidates that start at one call.  An op
without a propagation handler ends every candidate that reaches it.  Adding an op is one handler in the
module of its family plus one line here.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from . import attention, elementwise, linear, movement, normalisers, query_key, reductions, softmax_losses
from .state import DROPOUT, Source

Handler = Callable[..., None]

PROPAGATE: Dict[str, Handler] = {
    **dict.fromkeys(elementwise.VALUE_FREE, elementwise.value_free),
    **dict.fromkeys(elementwise.IDENTITY, elementwise.identity),
    **dict.fromkeys(elementwise.HOMOGENEOUS, elementwise.homogeneous),
    **dict.fromkeys(DROPOUT, elementwise.dropout),
    "clamp": elementwise.clamp,
    "clamp_min": elementwise.clamp,
    "add": elementwise.add_sub,
    "sub": elementwise.add_sub,
    "rsub": elementwise.add_sub,
    "mul": elementwise.mul_div,
    "div": elementwise.mul_div,
    **dict.fromkeys(elementwise.POWERS, elementwise.power),
    "var": normalisers.variance,
    **dict.fromkeys(movement.MOVE, movement.replay),
    "setitem": movement.setitem,
    "pad": movement.pad,
    "mean": reductions.reduce,
    "sum": reductions.reduce,
    **dict.fromkeys(reductions.POOLS, reductions.pool),
    "interpolate": reductions.interpolate,
    **dict.fromkeys(linear.LAYERS, linear.layer),
    "matmul": linear.matmul,
    "addmm": linear.addmm,
    "baddbmm": linear.addmm,
    "einsum": linear.einsum,
    "multi_head_attention_forward": attention.mha,
    "scaled_dot_product_attention": attention.sdpa,
    **dict.fromkeys(normalisers.NORMALISERS, normalisers.normaliser),
    "cross_entropy": softmax_losses.shift_absorber,
    "softmax": softmax_losses.shift_absorber,
    "log_softmax": softmax_losses.shift_absorber,
}

SOURCES: Dict[str, Callable[..., List[Source]]] = {
    **dict.fromkeys(linear.LAYERS, linear.layer_sources),
    **dict.fromkeys(("addmm", "einsum"), linear.contraction_sources),
    "matmul": query_key.matmul_sources,
    "scaled_dot_product_attention": query_key.sdpa_sources,
    "multi_head_attention_forward": attention.mha_sources,
    "embedding": linear.embedding_sources,
    "cat": movement.cat_sources,
    "mul": elementwise.mul_sources,
    "add": elementwise.add_sources,
    **dict.fromkeys(normalisers.NORMALISERS - {"normalize"}, normalisers.sources),
}
