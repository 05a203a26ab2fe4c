"""The package layout: the shared LayerNorm wrappers (dtypes under mixed precision),
the one model registry and its override rule, the position index TMSA stores, and the
public names that stay importable where they were documented."""

import ast
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ditkernels
from conftest import NORM_TOL
from ditkernels import reference
from ditkernels.models import (DIFFIT_CONFIGS, DIFFIT_IMAGE_CONFIGS, DIT_CONFIGS, MODELS,
                               UVIT_CONFIGS, DiffiT_models, DiT_models, UViT_models,
                               create_model)
from ditkernels.models.registry import config_constructor
from ditkernels.nn.functional import layer_norm, residual_layer_norm
from ditkernels.nn.tmsa import relative_position_index

PACKAGE = Path(ditkernels.__file__).parent


def _affine_norm(C):
    norm = nn.LayerNorm(C, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    return norm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_layer_norm_wrappers_cast_fp32_parameters_to_x(affine, dtype):
    # U-ViT's out blocks run a bf16 stream under autocast through fp32 LayerNorms;
    # DiT's norms have no parameters and take adaLN shift/scale in x's dtype.
    B, N, C = 2, 5, 24
    norm = _affine_norm(C) if affine else nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
    x = torch.randn(B, N, C).to(dtype).requires_grad_()
    h = torch.randn(B, N, C)  # an fp32 branch output
    gate, shift, scale = (torch.randn(B, C).to(dtype) * 0.5 for _ in range(3))

    y = layer_norm(norm, x, shift, scale)
    x_out, y2 = residual_layer_norm(norm, x, h, gate, shift, scale)
    assert y.dtype == x_out.dtype == y2.dtype == dtype

    def exact(v):
        w = None if norm.weight is None else norm.weight.double()
        b = None if norm.bias is None else norm.bias.double()
        out = F.layer_norm(v.double(), (C,), w, b, norm.eps)
        return out * (1 + scale.double()[:, None]) + shift.double()[:, None]

    torch.testing.assert_close(y.double(), exact(x), **NORM_TOL[dtype])
    x_sum = x.double() + gate.double()[:, None] * h.to(dtype).double()
    torch.testing.assert_close(x_out.double(), x_sum, **NORM_TOL[dtype])
    torch.testing.assert_close(y2.double(), exact(x_out), **NORM_TOL[dtype])

    (y.float().sum() + y2.float().sum()).backward()
    assert x.grad.dtype == dtype
    if affine:
        # The cast is differentiable: the fp32 parameters get fp32 gradients.
        assert norm.weight.grad.dtype == norm.bias.grad.dtype == torch.float32
        assert norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0


def test_old_wrapper_names_are_the_shared_ones():
    from ditkernels.models import uvit
    from ditkernels.nn import dit

    assert dit.ln_modulate_with is uvit.layer_norm is layer_norm
    assert dit.gated_residual_ln_modulate_with is uvit.residual_layer_norm is residual_layer_norm


def test_one_registry_holds_every_named_model():
    families = {**DiT_models, **UViT_models, **DiffiT_models}
    assert set(families) == (set(DIT_CONFIGS) | set(UVIT_CONFIGS) | set(DIFFIT_CONFIGS)
                             | set(DIFFIT_IMAGE_CONFIGS))
    for name, constructor in families.items():
        assert MODELS[name] is constructor
    with pytest.raises(KeyError, match="unknown model 'DiT-XS/2'"):
        create_model("DiT-XS/2")
    with pytest.raises(ValueError, match="'DiT-S/2' is registered twice"):
        config_constructor("DiT-S/2", ditkernels.DiT, DIT_CONFIGS)


@pytest.mark.parametrize("name, override, check", [
    ("DiT-S/2", dict(depth=1, hidden_size=48, num_heads=2),
     lambda m: len(m.blocks) == 1 and m.hidden_size == 48),
    ("U-ViT-S/2", dict(depth=2, embed_dim=32, num_heads=2, num_classes=-1),
     lambda m: len(m.in_blocks) == 1 and m.extras == 1 and m.embed_dim == 32),
    ("DiffiT-S/2", dict(depth=1, hidden_size=48, num_heads=2),
     lambda m: len(m.blocks) == 1 and m.hidden_size == 48),
    ("DiffiT-CIFAR10", dict(base_channels=32, channel_mult=(1,), num_res_blocks=1,
                            num_groups=8, num_classes=3),
     lambda m: len(m.encoder) == 1 and m.y_embedder is not None),
])
def test_keyword_arguments_override_the_configuration_in_every_family(name, override, check):
    # One rule for every family (DiT's constructors used to raise TypeError here).
    model = create_model(name, **override)
    assert check(model)
    assert type(model) is type(MODELS[name](**override))


def test_tmsa_stores_swins_relative_position_index():
    # TMSA's own index (kept for the public state_dict) against the op reference's.
    for gh, gw in [(4, 4), (3, 5), (1, 2)]:
        torch.testing.assert_close(relative_position_index(gh, gw),
                                   reference.relative_position_index(gh, gw), atol=0, rtol=0)


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


@pytest.mark.parametrize("package", ["nn", "models", "diffusion", "quant"])
def test_library_code_does_not_import_the_references(package):
    for path in (PACKAGE / package).glob("*.py"):
        for module in _imports(path):
            assert "reference" not in module, f"{path.name} imports {module}"


# (old module, new module, names moved; None: every public class and function the
# new module defines).
MOVED = [
    ("ditkernels.reference_models", "ditkernels.reference.dit", None),
    ("ditkernels.reference_uvit", "ditkernels.reference.uvit", None),
    ("ditkernels.reference_diffit", "ditkernels.reference.diffit", None),
    ("ditkernels.reference", "ditkernels.reference.ops", None),
    ("ditkernels.models.uvit", "ditkernels.nn.uvit", ["Attention", "Block", "Mlp", "PatchEmbed"]),
    ("ditkernels.models.uvit", "ditkernels.nn.functional",
     ["layer_norm", "residual_layer_norm", "skip_merge"]),
    ("ditkernels.models.uvit", "ditkernels.nn.embed", ["timestep_embedding"]),
    ("ditkernels.models.diffit", "ditkernels.nn.diffit", None),
    ("ditkernels.models.diffit", "ditkernels.nn.tmsa", ["TMSA"]),
    ("ditkernels.models.dit", "ditkernels.nn.embed",
     ["PatchEmbed", "get_2d_sincos_pos_embed", "unpatchify"]),
    ("ditkernels.models.dit", "ditkernels.nn.functional", ["check_latent_inputs"]),
    ("ditkernels.nn.dit", "ditkernels.nn.embed", ["LabelEmbedder", "TimestepEmbedder"]),
    ("ditkernels.nn.dit", "ditkernels.nn.functional", ["head_dim"]),
]


@pytest.mark.parametrize("old, new, names", MOVED)
def test_moved_names_stay_importable_where_they_were(old, new, names):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    names = names or [n for n, v in vars(new_module).items() if not n.startswith("_")
                      and getattr(v, "__module__", None) == new]
    assert names
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name), name
