"""Swap DiT blocks of an existing model for ditkernels DiTBlocks, in place.

Blocks are recognised by structure, not by class, so DiT forks (facebookresearch/DiT,
fast-DiT, SiT, ...) are patched without importing them. The new block takes over the
original's Parameter objects themselves, so device, dtype, requires_grad and an
optimizer already holding those parameters all carry over.
"""

import warnings
from typing import List, Optional

import torch
import torch.nn as nn

from .nn.dit import DiTBlock, Mlp


def _mismatch(module: nn.Module) -> Optional[str]:
    """Why module cannot be replaced by a ditkernels DiTBlock, or None if it can.

    Only called on modules that have all of a DiT block's children.
    """
    norm1, norm2, attn, mlp = module.norm1, module.norm2, module.attn, module.mlp
    ada = module.adaLN_modulation
    if not (isinstance(ada, nn.Sequential) and len(ada) == 2 and isinstance(ada[0], nn.SiLU)
            and isinstance(ada[1], nn.Linear)):
        return "adaLN_modulation is not Sequential(SiLU, Linear)"
    hidden = ada[1].in_features
    if ada[1].out_features != 6 * hidden:
        return f"adaLN_modulation outputs {ada[1].out_features} features, not 6 * {hidden}"
    for name, norm in (("norm1", norm1), ("norm2", norm2)):
        if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (hidden,):
            return f"{name} is not an nn.LayerNorm({hidden})"
    if not isinstance(getattr(attn, "num_heads", None), int):
        return "attn has no integer num_heads attribute"
    if not (isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)):
        return "attn.qkv / attn.proj are not nn.Linear"
    if (attn.qkv.in_features, attn.qkv.out_features) != (hidden, 3 * hidden):
        return f"attn.qkv is not Linear({hidden}, {3 * hidden})"
    if attn.qkv.bias is None:
        return "attn.qkv has no bias"
    if not all(isinstance(getattr(attn, n, None), nn.Identity) for n in ("q_norm", "k_norm")
               if hasattr(attn, n)):
        return "attn normalises q/k (qk_norm), which DiTBlock does not"
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        return "mlp.fc1 / mlp.fc2 are not nn.Linear"
    act = getattr(mlp, "act", None)
    if not (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "mlp.act is not nn.GELU(approximate='tanh')"
    return None


def _dropout_p(module: nn.Module, name: str) -> float:
    """Dropout probability of a timm-style attribute: an nn.Dropout, a float, or absent."""
    dropout = getattr(module, name, 0.0)
    return dropout.p if isinstance(dropout, nn.Dropout) else float(dropout)


def _is_dit_block_shaped(module: nn.Module) -> bool:
    children = dict(module.named_children())
    return (all(n in children for n in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"))
            and all(hasattr(module.attn, n) for n in ("qkv", "proj"))
            and all(hasattr(module.mlp, n) for n in ("fc1", "fc2")))


def _ditkernels_block_on_meta(module: nn.Module) -> DiTBlock:
    """A DiTBlock with module's hyperparameters, its parameters placeholders on the meta
    device (nothing allocated or initialised) until the original's are assigned."""
    hidden = module.adaLN_modulation[1].in_features
    with torch.device("meta"):
        block = DiTBlock(hidden, module.attn.num_heads,
                         attn_drop=_dropout_p(module.attn, "attn_drop"),
                         proj_drop=_dropout_p(module.attn, "proj_drop"))
        # The MLP width is taken exactly rather than through a float mlp_ratio.
        block.mlp = Mlp(hidden, module.mlp.fc1.out_features,
                        drop=_dropout_p(module.mlp, "drop1"))
        for name in ("norm1", "norm2"):
            norm = getattr(module, name)
            block.register_module(name, nn.LayerNorm(
                hidden, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                bias=norm.bias is not None))
    return block


def _state_mismatch(module: nn.Module, block: DiTBlock) -> Optional[str]:
    theirs = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    ours = {k: v.shape for k, v in block.state_dict(keep_vars=True).items()}
    if theirs != ours:
        return f"its parameters and buffers {theirs} differ from a DiTBlock's {ours}"
    return None


def patch_dit(model: nn.Module) -> List[str]:
    """Replace, in place, every DiT-block-shaped submodule of model with a ditkernels
    DiTBlock holding the same Parameter objects; returns the qualified names replaced.

    A block qualifies when it has children norm1 and norm2 (nn.LayerNorm, affine or
    not), attn (qkv, proj and num_heads), mlp (fc1, tanh GELU, fc2) and
    adaLN_modulation = Sequential(SiLU, Linear(D, 6D)), and no other parameters or
    buffers; its forward is assumed to be DiT's adaLN-Zero block, not inspected. Modules
    with those children that differ in a detail are left alone, with a warning. Hooks
    registered on a replaced block do not carry over.
    """
    if _is_dit_block_shaped(model) and not isinstance(model, DiTBlock):
        raise ValueError("patch_dit replaces submodules in place and model itself is a DiT "
                         "block: pass its parent, or build ditkernels.nn.DiTBlock and load "
                         "its state_dict")
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, DiTBlock) or not _is_dit_block_shaped(module):
            continue
        reason = _mismatch(module)
        if reason is None:
            block = _ditkernels_block_on_meta(module)
            reason = _state_mismatch(module, block)
        if reason is not None:
            warnings.warn(f"patch_dit: leaving {name} ({type(module).__name__}) unpatched: "
                          f"{reason}")
            continue
        # keep_vars + assign: the block takes the original Parameter objects themselves.
        block.load_state_dict(module.state_dict(keep_vars=True), strict=True, assign=True)
        block.train(module.training)
        parent_name, _, child_name = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child_name, block)
        replaced.append(name)
    return replaced
