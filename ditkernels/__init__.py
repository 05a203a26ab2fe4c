"""ditkernels: fused CUDA/CPU kernels for diffusion transformers, as PyTorch custom ops."""

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "ditkernels._C is not built. Install with `pip install --no-build-isolation .` "
        "(and run from outside the source tree), or build in place with "
        "`python setup.py build_ext --inplace`."
    ) from exc

from . import ops, reference  # noqa: E402
from .ops import (gated_residual_ln_modulate, int8_gemm_dequant, int8_linear,  # noqa: E402
                  ln_modulate, ln_modulate_int8, quantize_per_sample, skip_concat_linear, tmsa,
                  tmsa_windowed)
from . import diffusion, models, nn, quant  # noqa: E402
from .diffusion import as_denoiser, create_diffusion, ddim_sample, ddpm_sample  # noqa: E402
from .models import (DiffiT, DiffiT_models, DiffiTBlock, DiffiTUNet, DiT,  # noqa: E402
                     DiT_models, TMSA, UViT, UViT_models, UViTT2I, UViTT2I_models)
from .nn import DiTBlock, FinalLayer, LabelEmbedder, TimestepEmbedder  # noqa: E402
from .patching import patch_dit  # noqa: E402
from .integrations import patch_diffusers  # noqa: E402

__version__ = "0.1.0"


def build_info():
    """How the extension was compiled, plus the torch it runs with.

    Returns a dict: ``cuda`` (bool, CUDA kernels compiled), ``cuda_archs`` (the GPU
    code embedded, e.g. ``['sm_80', 'sm_90a']``: these GPUs, and newer minor versions
    of the same major, run it as built), ``cuda_ptx`` (the PTX embedded, e.g.
    ``['compute_80']``: the driver compiles it for any newer GPU at first use),
    ``cuda_runtime_version`` (e.g. ``'13.0'`` or None), ``torch_compiled`` (torch
    version at build time) and ``torch_runtime``.
    """
    raw = _C.build_info()
    archs, ptx = [], []
    for tok in filter(None, raw["cuda_archs"].split("_")):
        if tok.endswith("ptx"):  # TORCH_CUDA_ARCH_LIST's "8.0+PTX": SASS and PTX
            tok = tok[:-3]
            ptx.append(f"compute_{tok}")
        archs.append(f"sm_{tok}")
    rt = raw["cuda_runtime_version"]
    return {
        "cuda": bool(raw["cuda"]),
        "cuda_archs": archs,
        "cuda_ptx": ptx,
        "cuda_runtime_version": None if rt is None else f"{rt // 1000}.{rt % 1000 // 10}",
        "torch_compiled": raw["torch_version"].replace("_", "."),
        "torch_runtime": torch.__version__,
    }


__all__ = ["DiT", "DiTBlock", "DiT_models", "DiffiT", "DiffiTBlock", "DiffiTUNet", "DiffiT_models",
           "TMSA", "UViT", "UViT_models", "UViTT2I", "UViTT2I_models", "FinalLayer",
           "LabelEmbedder", "TimestepEmbedder",
           "as_denoiser", "build_info", "create_diffusion", "ddim_sample", "ddpm_sample", "diffusion",
           "gated_residual_ln_modulate", "int8_gemm_dequant", "int8_linear",
           "ln_modulate", "ln_modulate_int8", "quantize_per_sample", "models", "nn", "ops",
           "patch_diffusers", "patch_dit", "quant", "reference", "skip_concat_linear", "tmsa", "tmsa_windowed"]
