"""Load the compiled extension ``_C``; without it, register the reference kernels under the same op names.

Either way ``torch.ops.neural_mechanics_ext`` holds the same ops with the same schemas, so every caller
(and ``torch.compile``) sees one interface.  ``NMX_DISABLE_EXTENSION=1`` forces the fallback, which is
how the tests exercise it.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

NAMESPACE = "neural_mechanics_ext"
BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the source tree "
    "(or `pip install --no-build-isolation neural-mechanics-ext`)"
)

_C = None
load_error: BaseException | None = None

if os.environ.get("NMX_DISABLE_EXTENSION", "") not in ("", "0"):
    load_error = RuntimeError("disabled by NMX_DISABLE_EXTENSION")
elif importlib.util.find_spec(f"{__package__}._C") is None:
    load_error = ImportError("neural_mechanics_ext._C has not been built")
else:
    try:
        from . import _C  # noqa: F401  (registers the ops with the dispatcher on import)
    except ImportError as exc:  # built against another torch, or a missing shared library
        load_error = exc

if _C is None:
    from .reference import adam_moments_reference, lion_moments_reference, slice_moments_reference

    _lib = torch.library.Library(NAMESPACE, "DEF")
    _lib.define("slice_moments(Tensor[] xs, Tensor?[] ys, Tensor?[] zs, int[] views) -> Tensor")
    _lib.define("adam_moments(Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, "
                "Tensor?[] max_exp_avg_sqs, int[] views, float[] scalars) -> Tensor")
    _lib.define("lion_moments(Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, int[] views, "
                "float[] scalars) -> Tensor")
    _lib.impl("slice_moments", slice_moments_reference, "CompositeExplicitAutograd")
    _lib.impl("adam_moments", adam_moments_reference, "CompositeExplicitAutograd")
    _lib.impl("lion_moments", lion_moments_reference, "CompositeExplicitAutograd")
    warnings.warn(
        f"neural_mechanics_ext: the compiled extension is not available ({load_error}); "
        f"using the plain-torch reference kernels, which are correct but slow. To {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )

ops = getattr(torch.ops, NAMESPACE)
compiled = _C is not None


def build_info() -> dict:
    """How this installation was built: version, torch, CUDA kernels and archs, the emulated CUDA kernels
    (the CUDA kernel source compiled for the host, which the tests run without a GPU), OpenMP, the CPU
    kernel chosen for this processor (avx512, avx2 or baseline), compiled or not."""
    from ._version import __version__

    info = {"version": __version__, "torch": torch.__version__, "cuda": False, "cuda_arch": [],
            "cuda_emulated": False, "openmp": False, "compiled": compiled}
    if compiled:
        native = _C.build_info()
        info.update(cuda=bool(native["cuda"]), cuda_arch=list(native["cuda_arch"]),
                    cuda_emulated=bool(native.get("cuda_emulated", False)),
                    openmp=bool(native["openmp"]), cpu_kernel=str(native["cpu_isa"]))
        info["torch_built_against"] = native["torch"]
    else:
        info["load_error"] = str(load_error)
    return info
