"""Build neural_mechanics_ext._C with torch.utils.cpp_extension.

CUDA kernels are compiled whenever nvcc and a CUDA build of torch are present, also on a machine without
a GPU.  The same CUDA kernel source is always compiled a second time by the host compiler, against a SIMT
emulation (csrc/cuda/emulation.h), so that the tests run its logic on machines without a GPU (POSIX
only: the emulation's threads are ucontext fibers).  Environment:
  NMX_FORCE_CPU=1          build the CPU kernels only
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0+PTX")
  CUDA_HOME                CUDA toolkit (default: $CUDA_HOME, /usr/local/cuda, or the toolkit of `nvcc`)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;9.0+PTX"


def find_cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:  # follow wrapper scripts and links to the real toolkit
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvidia_wheel_includes():
    """Headers that torch's CUDA headers include (cuBLAS, cuSPARSE, ...) ship in torch's nvidia wheels."""
    dirs = []
    for site in sys.path:
        root = os.path.join(site, "nvidia")
        if os.path.isdir(root):
            dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return dirs


# cpp_extension reads CUDA_HOME when it is imported: settle it first.
cuda_home = None if os.environ.get("NMX_FORCE_CPU", "") not in ("", "0") else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None

sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
define_macros = []
with_emulation = os.name == "posix"
if with_emulation:  # host-compiled (.cpp): the emulated CUDA kernels
    sources += sorted(glob.glob("csrc/cuda/*.cpp"))
    define_macros.append(("NMX_WITH_CUDA_EMULATION", None))
# -fno-math-errno: the stream modes' sqrt vectorises only when it need not set errno (never read here).
cxx_flags = ["-O3", "-fopenmp", "-Wno-psabi", "-fno-math-errno"]
nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
include_dirs = [os.path.abspath("csrc")]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    define_macros += [("NMX_WITH_CUDA", None), ("NMX_CUDA_ARCHS", '"' + archs.replace(";", " ") + '"')]
    include_dirs += nvidia_wheel_includes()
    Extension = cpp_extension.CUDAExtension
else:
    Extension = cpp_extension.CppExtension

print(f"neural_mechanics_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels"
      + (f" (CUDA_HOME={cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else "")
      + (" and the emulated CUDA kernels" if with_emulation else ""),
      file=sys.stderr)

ext = Extension(
    name="neural_mechanics_ext._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
