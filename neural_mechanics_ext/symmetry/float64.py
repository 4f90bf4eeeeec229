"""Keep a float64 forward pass in float64.

The proof of a family runs on a float64 copy of the model, where an exact symmetry holds to ~1e-15.
Model code that computes part of its forward pass in a lower precision on purpose (Hugging Face's
``LlamaRMSNorm`` casts to float32 and back; its eager attention takes the softmax with
``dtype=torch.float32``) would make every such symmetry float32-exact only (~1e-7) and fail the check.
Under :class:`KeepFloat64`, a cast of a float64 tensor to another floating dtype (``.to``, ``.type``,
``.float``, ``.half``, ``.bfloat16``) returns the tensor unchanged, and a ``dtype=`` argument asking a
call on float64 tensors for a lower floating precision asks for float64.  Integer and bool casts, and
tensors that are not float64, are left alone.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .capture import op_name

_CASTS = {"to", "type", "float", "half", "bfloat16"}


class KeepFloat64(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)
        dtype = kwargs.get("dtype")
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float64:
            kwargs = {**kwargs, "dtype": torch.float64}
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if (isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor) and x.dtype == torch.float64
                and out.dtype.is_floating_point and out.dtype != torch.float64 and op_name(func)[0] in _CASTS):
            return x.to(device=out.device)
        return out
