"""Whole models on the ditkernels modules, loading the original checkpoints unchanged,
and their named configurations (every name in one registry, registry.MODELS)."""

from .dit import (DIT_CONFIGS, DiT, DiT_B_2, DiT_B_4, DiT_B_8, DiT_L_2, DiT_L_4, DiT_L_8,
                  DiT_models, DiT_S_2, DiT_S_4, DiT_S_8, DiT_XL_2, DiT_XL_4, DiT_XL_8)

__all__ = ["DIT_CONFIGS", "DiT", "DiT_B_2", "DiT_B_4", "DiT_B_8", "DiT_L_2", "DiT_L_4",
           "DiT_L_8", "DiT_S_2", "DiT_S_4", "DiT_S_8", "DiT_XL_2", "DiT_XL_4", "DiT_XL_8",
           "DiT_models"]
from .uvit import (UVIT_CONFIGS, UVIT_SIZES, UViT, UViT_H_2, UViT_H_2_uncond,
                   UViT_H_4_imagenet512, UViT_L_2, UViT_L_2_uncond, UViT_L_4_imagenet64,
                   UViT_L_4_imagenet512, UViT_M_2, UViT_M_2_uncond, UViT_M_4_imagenet64,
                   UViT_models, UViT_S_2, UViT_S_2_cifar10, UViT_S_2_uncond,
                   UViT_S_4_celeba64)

__all__ += ["UVIT_CONFIGS", "UVIT_SIZES", "UViT", "UViT_H_2", "UViT_H_2_uncond",
            "UViT_H_4_imagenet512", "UViT_L_2", "UViT_L_2_uncond", "UViT_L_4_imagenet64",
            "UViT_L_4_imagenet512", "UViT_M_2", "UViT_M_2_uncond", "UViT_M_4_imagenet64",
            "UViT_models", "UViT_S_2", "UViT_S_2_cifar10", "UViT_S_2_uncond",
            "UViT_S_4_celeba64"]
from .uvit_t2i import (UVIT_T2I_CONFIGS, UViTT2I, UViTT2I_models, UViTT2I_S_2_deep_mscoco,
                       UViTT2I_S_2_mscoco)

__all__ += ["UVIT_T2I_CONFIGS", "UViTT2I", "UViTT2I_models", "UViTT2I_S_2_deep_mscoco",
            "UViTT2I_S_2_mscoco"]
from .diffit import (DIFFIT_CONFIGS, DIFFIT_IMAGE_CONFIGS, TMSA, DiffiT, DiffiT_CIFAR10,
                     DiffiT_FFHQ64, DiffiT_models, DiffiT_S_2, DiffiT_XL_2, DiffiT_XL_2_512,
                     DiffiTBlock, DiffiTFinalLayer, DiffiTResBlock, DiffiTUNet)

__all__ += ["DIFFIT_CONFIGS", "DIFFIT_IMAGE_CONFIGS", "TMSA", "DiffiT", "DiffiT_CIFAR10",
            "DiffiT_FFHQ64", "DiffiT_models", "DiffiT_S_2", "DiffiT_XL_2", "DiffiT_XL_2_512",
            "DiffiTBlock", "DiffiTFinalLayer", "DiffiTResBlock", "DiffiTUNet"]
from .registry import MODELS, create_model

__all__ += ["MODELS", "create_model"]
