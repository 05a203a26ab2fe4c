"""What the built extension carries: the GPU code and the PTX that build_info() names,
and a default arch list that leaves no NVIDIA GPU from the A100 on without a kernel
image (PTX is what newer GPUs, Blackwell included, compile at first use)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import ditkernels

ROOT = Path(__file__).resolve().parents[1]


def cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit, or the copy triton (a torch dependency)
    ships; None where none is found."""
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__),
                                       "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def embedded(listing: str, kind: str) -> dict:
    """{source file: set of targets} from `cuobjdump --list-elf` ('ELF file 1:
    adaln.sm_80.cubin') or --list-ptx ('PTX file 1: adaln.sm_80.ptx')."""
    found = {}
    for name in re.findall(rf"^{kind} file\s+\d+:\s+(\S+)$", listing, flags=re.M):
        stem, target = re.match(r"(\w+?)(?:\.\d+)?\.(sm_\w+)\.\w+$", name).groups()
        found.setdefault(stem, set()).add(target)
    return found


@pytest.mark.skipif(not ditkernels.build_info()["cuda"], reason="a CPU-only build")
def test_binary_embeds_what_build_info_names():
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton) to read the binary with")
    so = ditkernels._C.__file__
    info = ditkernels.build_info()

    def listing(flag):
        # --list-ptx exits non-zero when there is none; the text says so.
        run = subprocess.run([tool, flag, so], capture_output=True, text=True)
        return run.stdout + run.stderr

    # The embedded file names drop the arch-specific "a" when a build has one target
    # (adaln.sm_90.cubin for 9.0a alone, adaln.sm_90a.cubin beside sm_80); compare the
    # compute capabilities.
    def family(targets):
        return {re.sub(r"a$", "", t) for t in targets}

    sass = {stem: family(t) for stem, t in embedded(listing("--list-elf"), "ELF").items()}
    ptx = {stem: family(t) for stem, t in embedded(listing("--list-ptx"), "PTX").items()}
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    sources = {Path(ln.strip()).stem for ln in lines
               if ln.strip().endswith(".cu") and not ln.lstrip().startswith("#")}
    assert set(sass) == sources, "a CUDA source without GPU code"
    for stem, targets in sass.items():
        assert targets == family(info["cuda_archs"]), stem
    want_ptx = family(p.replace("compute_", "sm_") for p in info["cuda_ptx"])
    for stem in sources:
        assert ptx.get(stem, set()) == want_ptx, stem


def test_default_arch_list_embeds_ptx():
    """setup.py and CMake default to the same list, and it carries PTX."""
    setup_default = re.search(r'^DEFAULT_ARCH_LIST = "([^"]+)"', (ROOT / "setup.py").read_text(),
                              flags=re.M).group(1)
    cmake_default = re.search(r'set\(DITKERNELS_CUDA_ARCH_LIST "([^"]+)"',
                              (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert setup_default == cmake_default
    assert "+PTX" in setup_default
    assert "9.0a" in setup_default.split(";")  # the Hopper wgmma kernels
