"""Shared test fixtures: the device list, the `cuda` marker and tolerances.

Nothing here touches the GPU at import time: whether CUDA is usable is asked only
when a test that needs it is collected.
"""

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    import ditkernels

    return ditkernels.build_info()["cuda"] and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of ditkernels")
    for item in items:
        if "cuda" in item.keywords and not cuda_usable():
            item.add_marker(skip)


# Parametrize over this to run a test on every device; the CUDA case carries the
# `cuda` marker and is skipped where there is no GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Floating dtypes each backend supports (fp64 is CPU-only).
DTYPES = {
    "cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    "cuda": [torch.float32, torch.bfloat16, torch.float16],
}

# Absolute/relative tolerances for norm-like ops against an fp64 reference
# (STYLE.md rule 7: 1e-2 for fp16/bf16).
NORM_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
