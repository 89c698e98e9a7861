"""Build of b2fast with its optional compiled extension ``b2fast._C`` (csrc/).

Install (torch must already be installed)::

    pip install --no-build-isolation -e .

Why ``--no-build-isolation``: the extension is compiled against torch's C++ headers and
libraries, and its binary interface is tied to that exact torch build.  With build isolation
pip would download a fresh torch (often another version, or a CPU/CUDA build other than yours,
several GB) into a throw-away environment and compile against it; the installed ``b2fast._C``
then fails to load in your environment with undefined symbols.  Without isolation the build
uses the torch you run with.

What is built:

* always a C++ CPU extension from ``csrc/*.cpp`` (OpenMP-parallel through ``at::parallel_for``
  when torch itself uses OpenMP);
* CUDA kernels from ``csrc/cuda/*.cu`` when torch is a CUDA build, nvcc is found
  (``torch.utils.cpp_extension.CUDA_HOME``) and such files exist.  Whether a GPU is visible
  does not matter, so GPU wheels can be built on CPU-only machines.

Environment variables:

* ``B2FAST_CUDA=0|1``: force the CUDA part off, or on (an error if it cannot be built).
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures; default "8.0;9.0" (A100, H100).
* ``MAX_JOBS``: parallel compile jobs (ninja).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("b2fast: torch must be installed before building b2fast; install torch, then run "
             "`pip install --no-build-isolation -e .`")

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def read_version() -> str:
    """``__version__`` from b2fast/__init__.py, read as text (importing it would need deps)."""
    text = (ROOT / "b2fast" / "__init__.py").read_text()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


def sources(pattern: str) -> list[str]:
    """Sorted source paths relative to setup.py, as setuptools requires."""
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root.  torch guesses it from the first nvcc on PATH, which is wrong when
    that nvcc is a wrapper script (/usr/local/bin/nvcc gives /usr/local, where libcudart is not);
    as in CMakeLists.txt, take the first of torch's guess, $CUDA_HOME, $CUDA_PATH and
    /usr/local/cuda that holds include/cuda_runtime.h."""
    guess = cpp_extension.CUDA_HOME
    if torch.version.cuda is None:
        return guess
    candidates = (guess, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return root
    return guess


# torch's include, library and nvcc paths all derive from cpp_extension.CUDA_HOME.
CUDA_HOME = cpp_extension.CUDA_HOME = find_cuda_home()


def want_cuda(cuda_sources: list[str]) -> bool:
    """Build the CUDA kernels?  Decided by the toolchain, never by whether a GPU is visible."""
    flag = os.environ.get("B2FAST_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"B2FAST_CUDA: expected 0 or 1, got {flag!r}")
    nvcc = CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    if flag == "1":
        why = ("this torch is not a CUDA build" if torch.version.cuda is None else
               f"nvcc was not found (CUDA_HOME={CUDA_HOME}); install the CUDA toolkit or set "
               "CUDA_HOME" if not nvcc else
               "csrc/cuda/ has no .cu files" if not cuda_sources else None)
        if why:
            sys.exit(f"B2FAST_CUDA=1 but the CUDA extension cannot be built: {why}")
        return True
    return flag == "" and torch.version.cuda is not None and nvcc and bool(cuda_sources)


def openmp_flags() -> list[str]:
    """-fopenmp where torch parallelises with OpenMP: at::parallel_for is inline in the headers
    and runs serially when the extension is compiled without it."""
    linux_omp = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
    return ["-fopenmp"] if linux_omp else []


def extension():
    """The b2fast._C extension: CPU always, plus CUDA when want_cuda() says so."""
    version = read_version()
    cxx = ["-O3", f"-DB2FAST_VERSION={version}"] + openmp_flags()
    # b2fast/_C loads libtorch by itself (`import b2fast._C` before `import torch`): look next to
    # an installed torch first, then in the torch it was built against.
    link = openmp_flags() + ["-Wl,-rpath,$ORIGIN/../torch/lib",
                             f"-Wl,-rpath,{Path(torch.__file__).parent / 'lib'}"]
    cpp, cu = sources("csrc/*.cpp"), sources("csrc/cuda/*.cu")
    if not want_cuda(cu):
        return CppExtension("b2fast._C", cpp, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc = ["-O3", f"-DB2FAST_VERSION={version}", "-DB2FAST_WITH_CUDA"]
    return CUDAExtension("b2fast._C", cpp + cu, extra_link_args=link,
                         extra_compile_args={"cxx": cxx + ["-DB2FAST_WITH_CUDA"], "nvcc": nvcc})


setup(
    version=read_version(),
    # The Triton kernels live in b2fast/kernels/, not in a top-level kernels/ package: that name is
    # Hugging Face's ``kernels`` (a transformers dependency), which a kernels/ folder in the checkout
    # would shadow whenever Python runs from the checkout root.
    packages=find_packages(include=["b2fast", "b2fast.*"]),
    package_data={"b2fast": ["configs/*.yaml", "toy/pretrained/*", "toy/pretrained/*/*",
                            "toy/pretrained_lcm/*", "toy/pretrained_lcm/*/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
