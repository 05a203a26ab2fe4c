"""Build ditkernels._C from csrc/sources.txt.

CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit (nvcc) is
found; otherwise the extension is CPU-only. Whether a GPU is visible never
matters. Environment:
  DITKERNELS_FORCE_CPU=1   build CPU-only even with a CUDA toolkit
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0+PTX;9.0a": SASS for A100 and
                           H100/H200, whose wgmma kernels need 9.0a (with plain 9.0
                           Hopper runs the mma.sync kernels), and compute_80 PTX that
                           the driver compiles for every later GPU, Blackwell included)
  MAX_JOBS                 parallel compile jobs (read by torch's ninja builder)
  CUDA_HOME                toolkit root (default: CUDA_PATH, /usr/local/cuda, or nvcc's)
"""

import os
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
# PTX of the oldest target runs on every newer GPU (the driver compiles it once and
# caches it), so no NVIDIA GPU from the A100 on meets "no kernel image".
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _locate_cuda_home():
    """The toolkit root, found before torch.utils.cpp_extension guesses it.

    torch guesses from `which nvcc`; a wrapper script on PATH (as in
    /usr/local/bin/nvcc) then yields a wrong root such as /usr/local.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return root
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(os.path.realpath(nvcc)).parent.parent
        if (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


CUDA_ROOT = None if _truthy("DITKERNELS_FORCE_CPU") else _locate_cuda_home()
if CUDA_ROOT:
    os.environ["CUDA_HOME"] = CUDA_ROOT

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension is imported)
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

WITH_CUDA = CUDA_ROOT is not None and torch.version.cuda is not None
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # Without it torch queries the visible GPUs, and fails when there are none.
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST


def read_sources():
    lines = (CSRC / "sources.txt").read_text().splitlines()
    files = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    cpp = [f"csrc/{f}" for f in files if not f.endswith(".cu")]
    cuda = [f"csrc/{f}" for f in files if f.endswith(".cu")]
    return cpp, cuda


def read_nvcc_flags():
    """csrc/nvcc_flags.txt, shared with benchmarks/static_report.py --compile."""
    lines = (CSRC / "nvcc_flags.txt").read_text().splitlines()
    return [f for f in (ln.split("#")[0].strip() for ln in lines) if f]


def arch_token(arch_list):
    """'8.0;9.0a;9.0+PTX' -> '80_90a_90ptx', a preprocessor token build_info() decodes."""
    archs = [a for a in re.split(r"[;\s,]+", arch_list) if a]
    return "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in archs)


def has_sm90a(arch_list):
    """Whether the list builds sm_90a code, which the wgmma kernels need."""
    return any(a.replace("+PTX", "") == "9.0a" for a in re.split(r"[;\s,]+", arch_list))


def cuda_wheel_include_dirs():
    """cuBLAS/cuSPARSE headers that ATen's CUDA headers include.

    With torch from pip they ship in the nvidia-* wheels rather than the toolkit.
    """
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in map(Path, nvidia.__path__):
        dirs += sorted(str(p) for p in base.glob("*/include") if p.is_dir())
    return dirs


def openmp_flags():
    """-fopenmp where torch parallelises with OpenMP. ATen's at::parallel_for is a header
    template whose OpenMP region exists only in files compiled with it: without the flag
    every parallel_for in csrc/cpu runs on one thread. The runtime is the libgomp.so.1
    torch has already loaded (one soname, so one OpenMP runtime in the process)."""
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def make_extension():
    cpp, cuda = read_sources()
    version = torch.__version__.split("+")[0].replace(".", "_")
    macros = [("DITKERNELS_TORCH_VERSION", version)]
    include_dirs = [str(CSRC / "include")]
    cxx_flags = ["-O3"] + openmp_flags()
    if not WITH_CUDA:
        return CppExtension(
            "ditkernels._C",
            cpp,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp_flags(),
        )
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    macros += [
        ("DITKERNELS_WITH_CUDA", None),
        ("DITKERNELS_CUDA_ARCHS", arch_token(arch_list)),
    ]
    if has_sm90a(arch_list):
        macros.append(("DITKERNELS_SM90A", None))
    nvcc_flags = read_nvcc_flags()
    return CUDAExtension(
        "ditkernels._C",
        cpp + cuda,
        include_dirs=include_dirs + cuda_wheel_include_dirs(),
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=openmp_flags(),
    )


setup(
    packages=find_packages(include=["ditkernels", "ditkernels.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
