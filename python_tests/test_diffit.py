"""DiffiT on the fused kernels (ditkernels.models.diffit) against the plain-PyTorch
DiffiT in ditkernels.reference.diffit.

Accuracy: conftest.assert_matches_reference (STYLE.md rule 7, at most 2x eager's error).
"""

import functools

import pytest
import torch
import torch.nn as nn

import conftest
import ditkernels.nn.tmsa as tmsa_module
from conftest import DEVICES, assert_same_state, ditkernels_copy, image_model_inputs
from ditkernels.reference import diffit as ref
from ditkernels.models.diffit import (DIFFIT_CONFIGS, DIFFIT_IMAGE_CONFIGS, TMSA, DiffiT,
                                      DiffiTBlock, DiffiT_models, DiffiTUNet)

# TMSA: a square grid (head_dim 32); a non-square grid after one leading token with
# head_dim 72 (as DiffiT-XL) and an explicit scale; 4 x 4 windows on an 8 x 4 grid
# with a time embedding narrower than the tokens.
TMSA_CASES = {
    "global": dict(dim=64, num_heads=2, grid_size=4),
    "leading": dict(dim=144, num_heads=2, grid_size=(3, 5), num_leading=1, qk_scale=0.1),
    "windowed": dict(dim=64, num_heads=2, grid_size=(8, 4), window_size=4, temb_dim=48),
}

# Latent: a 4 x 4 token grid, head_dim 72, an MLP ratio that is not 4, label dropout.
LATENT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=144, depth=2,
              num_heads=2, mlp_ratio=2.5, class_dropout_prob=0.25, num_classes=7)

# Image space. "uncond": 16 -> 8 -> 4, windowed (4 x 4) at 16 and 8, global at 4.
# "cond": 8 -> 4, windowed then global, two ResBlocks per level, labels, learned sigma.
IMAGE = {
    "uncond": dict(img_size=16, in_channels=3, base_channels=32, channel_mult=(1, 2, 2),
                   num_res_blocks=1, num_heads=1, window_size=4, num_groups=8),
    "cond": dict(img_size=8, in_channels=3, base_channels=32, channel_mult=(1, 2),
                 num_res_blocks=2, num_heads=1, window_size=4, num_groups=8, num_classes=5,
                 class_dropout_prob=0.2, learn_sigma=True),
}


def _diffit_scale(name: str, owner: nn.Module):
    """A bias table and label embeddings large enough to shape the output; GroupNorm
    gains about 1."""
    if name.endswith(("relative_position_bias_table", "embedding_table.weight")):
        return 0.0, 0.5
    if isinstance(owner, nn.GroupNorm) and name.endswith("weight"):
        return 1.0, 0.1
    return None


randomize_ = functools.partial(conftest.randomize_, scale=_diffit_scale)
# DiffiT's inputs after x (timesteps, time embeddings) are floating and differentiable:
# their gradients are judged too.
assert_matches_reference = functools.partial(conftest.assert_matches_reference,
                                             every_input=True)
assert_compiled_matches_eager = functools.partial(conftest.assert_compiled_matches_eager,
                                                  every_input=True)


def tmsa_inputs(config: dict, batch: int, device):
    gen = torch.Generator().manual_seed(7)
    gh, gw = tmsa_module._pair(config["grid_size"])
    tokens = config.get("num_leading", 0) + gh * gw
    x = torch.randn(batch, tokens, config["dim"], generator=gen)
    temb = torch.randn(batch, config.get("temb_dim", config["dim"]), generator=gen)
    return x.to(device), temb.to(device)


def model_inputs(config: dict, batch: int, device, dtype=torch.float32):
    size = config.get("input_size", config.get("img_size"))
    return image_model_inputs(batch, config.get("in_channels", 4), size,
                              config.get("num_classes", 0), device, dtype)


# ---------------------------------------------------------------------------
# structure: state_dicts, initialisation, configs
# ---------------------------------------------------------------------------

STRUCTURES = {
    "tmsa": (TMSA, ref.TMSA, TMSA_CASES["windowed"]),
    "block": (DiffiTBlock, ref.DiffiTBlock, dict(hidden_size=64, num_heads=2, grid_size=4)),
    "latent": (DiffiT, ref.DiffiT, LATENT),
    "image": (DiffiTUNet, ref.DiffiTUNet, IMAGE["cond"]),
}


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_state_dict_loads_strictly_both_ways(kind):
    cls, ref_cls, config = STRUCTURES[kind]
    reference, ours = randomize_(ref_cls(**config)), cls(**config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert_same_state(ours, reference)
    fresh_reference = ref_cls(**config)
    fresh_reference.load_state_dict(randomize_(ours).state_dict(), strict=True)
    assert_same_state(fresh_reference, ours)


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_initialization_is_the_reference_one(kind):
    # Same construction order and init calls: a seed gives the reference's exact weights.
    cls, ref_cls, config = STRUCTURES[kind]
    torch.manual_seed(3)
    reference = ref_cls(**config)
    torch.manual_seed(3)
    assert_same_state(cls(**config), reference)


def test_state_dict_names_are_the_public_diffits():
    keys = set(DiffiT(**LATENT).state_dict())
    attn = "blocks.1.attn."
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight", "pos_embed", "final_layer.linear.weight",
            "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias",
            attn + "qkv.weight", attn + "qkv.bias", attn + "qkv_temb.weight",
            attn + "qkv_temb.bias", attn + "proj.weight", attn + "relative_position_bias_table",
            attn + "relative_position_index"} <= keys
    # LayerNorms without affine parameters; no adaLN.
    assert not any(".norm" in k or "adaLN" in k for k in keys)


def test_initial_weights():
    model = DiffiT(**LATENT)
    tables = [b.attn.relative_position_bias_table for b in model.blocks]
    assert all(t.shape == (7 * 7, 2) for t in tables)
    assert torch.cat([t.flatten() for t in tables]).std().item() == pytest.approx(0.02, rel=0.3)
    assert not model.final_layer.linear.weight.any()
    assert not model.blocks[0].attn.qkv_temb.bias.any() and model.blocks[0].attn.qkv.weight.any()
    assert not model(*model_inputs(LATENT, 2, "cpu")).any()  # zero final layer
    index = model.blocks[0].attn.relative_position_index
    # Query (row 0, col 0) and key (row 3, col 2): offset (-3, -2) in a 4 x 4 grid.
    assert index[0, 3 * 4 + 2].item() == (-3 + 3) * 7 + (-2 + 3)
    image = DiffiTUNet(**IMAGE["cond"])
    assert not image.conv_out.weight.any() and not image.conv_out.bias.any()


def test_configs_by_name():
    assert set(DiffiT_models) == set(DIFFIT_CONFIGS) | set(DIFFIT_IMAGE_CONFIGS)
    for name, constructor in DiffiT_models.items():
        assert constructor.__name__ == name.replace("-", "_").replace("/", "_")
    with torch.device("meta"):  # shapes only: nothing allocated
        xl2 = DiffiT_models["DiffiT-XL/2"]()
        xl2_512 = DiffiT_models["DiffiT-XL/2-512"]()
        reference_xl2 = ref.DiffiT(**DIFFIT_CONFIGS["DiffiT-XL/2"])
        cifar = DiffiT_models["DiffiT-CIFAR10"]()
        ffhq = DiffiT_models["DiffiT-FFHQ64"](num_classes=3)  # kwargs override
    assert len(xl2.blocks) == 28 and xl2.pos_embed.shape == (1, 256, 1152)
    assert xl2.blocks[0].attn.head_dim == 72
    assert xl2.blocks[0].attn.relative_position_bias_table.shape == (31 * 31, 16)
    assert xl2_512.blocks[0].attn.relative_position_bias_table.shape == (63 * 63, 16)
    # The paper: 16.88% fewer parameters than DiT-XL/2 (675M), i.e. 561M.
    assert round(sum(p.numel() for p in xl2.parameters()) / 1e6) == round(675 * (1 - 0.1688))
    assert {k: v.shape for k, v in xl2.state_dict().items()} == {
        k: v.shape for k, v in reference_xl2.state_dict().items()}
    # Windowed (8 x 8) TMSA above 8 x 8 feature maps, global at 8 x 8 and below.
    for model, top in ((cifar, 32), (ffhq, 64)):
        for level, blocks in enumerate(lvl.blocks for lvl in model.encoder):
            attn = blocks[0].block.attn
            size = top >> level
            assert attn.grid_size == (size, size)
            assert attn.window_size == (min(size, 8),) * 2
            assert attn.windowed == (size > 8)
        assert len(model.encoder[0].blocks) == len(model.decoder[-1].blocks) == 4
    assert ffhq.y_embedder is not None and cifar.y_embedder is None


# ---------------------------------------------------------------------------
# numerics against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(TMSA_CASES))
def test_tmsa_matches_reference(device, case):
    config = TMSA_CASES[case]
    reference = randomize_(ref.TMSA(**config)).to(device)
    ours = ditkernels_copy(reference, TMSA, config)
    oracle_grads = assert_matches_reference(ours, reference, tmsa_inputs(config, 3, device))
    # The bias table gets a real gradient, so its check above is not vacuous.
    assert oracle_grads["relative_position_bias_table"].abs().min() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_block_matches_reference(device):
    config = dict(hidden_size=144, num_heads=2, grid_size=(2, 3), mlp_ratio=3.0,
                  num_leading=1)
    reference = randomize_(ref.DiffiTBlock(**config)).to(device)
    ours = ditkernels_copy(reference, DiffiTBlock, config)
    inputs = tmsa_inputs(dict(dim=144, grid_size=(2, 3), num_leading=1), 2, device)
    assert_matches_reference(ours, reference, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_latent_model_matches_reference(device):
    reference = randomize_(ref.DiffiT(**LATENT)).to(device).train()  # label dropout on
    ours = ditkernels_copy(reference, DiffiT, LATENT)
    assert_matches_reference(ours, reference, model_inputs(LATENT, 2, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config_name", list(IMAGE))
def test_image_model_matches_reference(device, config_name):
    config = IMAGE[config_name]
    reference = randomize_(ref.DiffiTUNet(**config)).to(device).train()
    ours = ditkernels_copy(reference, DiffiTUNet, config)
    assert_matches_reference(ours, reference, model_inputs(config, 2, device))


MODELS = {"latent": (DiffiT, ref.DiffiT, LATENT), "image": (DiffiTUNet, ref.DiffiTUNet,
                                                           IMAGE["cond"])}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_autocast_forward_backward(device, kind):
    cls, ref_cls, config = MODELS[kind]
    reference = randomize_(ref_cls(**config)).to(device).eval()
    ours = ditkernels_copy(reference, cls, config)
    assert_matches_reference(ours, reference, model_inputs(config, 3, device),
                             autocast_dtype=torch.bfloat16)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_model(device, kind):
    cls, ref_cls, config = MODELS[kind]
    reference = randomize_(ref_cls(**config)).to(device, torch.bfloat16).eval()
    ours = ditkernels_copy(reference, cls, config)
    assert_matches_reference(ours, reference, model_inputs(config, 3, device, torch.bfloat16))


def test_kernels_are_fused_and_blocks_chained(monkeypatch):
    reference = randomize_(ref.DiffiT(**LATENT)).eval()
    ours = ditkernels_copy(reference, DiffiT, LATENT)
    inputs = model_inputs(LATENT, 2, "cpu")
    expected = reference(*inputs)
    calls = []
    fused_tmsa = tmsa_module.tmsa

    def counted(qkv, *args):
        calls.append(tuple(qkv.shape))
        return fused_tmsa(qkv, *args)

    def not_called(self, x, temb):
        raise AssertionError("DiffiT.forward should chain the blocks' parts")

    with monkeypatch.context() as patch:
        patch.setattr(tmsa_module, "tmsa", counted)
        patch.setattr(DiffiTBlock, "forward", not_called)
        torch.testing.assert_close(ours(*inputs), expected, atol=1e-4, rtol=1e-4)
    assert calls == [(2, 16, 3, 2, 72)] * LATENT["depth"]

    # A hook expects the block to be called: DiffiT then runs the blocks one by one.
    seen = []
    ours.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(ours(*inputs), expected, atol=1e-4, rtol=1e-4)
    assert seen == [(2, 16, 144)]

    windowed = []
    fused_windowed = tmsa_module.tmsa_windowed
    monkeypatch.setattr(tmsa_module, "tmsa_windowed",
                        lambda qkv, *a: windowed.append(a[3]) or fused_windowed(qkv, *a))
    image = DiffiTUNet(**IMAGE["uncond"])
    image(*model_inputs(IMAGE["uncond"], 1, "cpu"))
    assert windowed == [(4, 4)] * 4  # levels 16 and 8, encoder and decoder


@pytest.mark.parametrize("device", DEVICES)
def test_forward_with_cfg(device):
    config = dict(LATENT, learn_sigma=True)
    reference = randomize_(ref.DiffiT(**config)).to(device).eval()
    ours = ditkernels_copy(reference, DiffiT, config)
    x, t, _ = model_inputs(config, 4, device)
    y = torch.tensor([1, 6, 7, 7], device=device)  # [cond; uncond] with the null class 7
    guided = ours.forward_with_cfg(x, t, y, cfg_scale=4.0)
    torch.testing.assert_close(guided, reference.forward_with_cfg(x, t, y, 4.0),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.forward_with_cfg(x, t, y), ours(x, t, y))

    # The scale ramps from 1 at t = steps to cfg_scale at t = 0 (input_size <= 32).
    for t_value, scale in ((1000.0, 1.0), (0.0, 4.0)):
        t_fixed = torch.full_like(t, t_value)
        plain = ours(torch.cat([x[:2], x[:2]]), t_fixed, y)
        cond, uncond = plain[:2, :3], plain[2:, :3]
        guided = ours.forward_with_cfg(x, t_fixed, y, cfg_scale=4.0)
        torch.testing.assert_close(guided[:2, :3], uncond + scale * (cond - uncond))
        torch.testing.assert_close(guided[2:, :3], guided[:2, :3])
        torch.testing.assert_close(guided[:, 3:], plain[:, 3:])


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["global", "windowed"])
def test_tmsa_compiles_fullgraph(device, case):
    config = TMSA_CASES[case]
    module = randomize_(TMSA(**config)).to(device)
    inputs = tmsa_inputs(config, 2, device)
    assert_compiled_matches_eager(module, inputs)


def test_models_have_no_graph_breaks():
    for model, config in ((DiffiT(**LATENT), LATENT), (DiffiTUNet(**IMAGE["cond"]),
                                                       IMAGE["cond"])):
        explanation = torch._dynamo.explain(model)(*model_inputs(config, 2, "cpu"))
        assert explanation.graph_break_count == 0, explanation.break_reasons


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    attn = TMSA(64, 2, (3, 5), num_leading=1, temb_dim=32)
    x, temb = torch.randn(2, 16, 64), torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"x must be \[B, 16, 64\].*1 leading \+ a 3 x 5 grid"
                                         r".*\(2, 15, 64\)"):
        attn(x[:, 1:], temb)
    with pytest.raises(ValueError, match=r"x must be \[B, 16, 64\].*\(16, 64\)"):
        attn(x[0], temb)
    with pytest.raises(ValueError, match=r"temb must be \[B, temb_dim\] = \[2, 32\].*\(2, 64\)"):
        attn(x, torch.randn(2, 64))
    with pytest.raises(ValueError, match="num_heads"):
        TMSA(64, 3, 4)
    with pytest.raises(ValueError, match=r"window_size \(3, 3\) must divide grid_size \(8, 8\)"):
        TMSA(64, 2, 8, window_size=3)
    with pytest.raises(ValueError, match="leading tokens need global attention"):
        TMSA(64, 2, 8, window_size=4, num_leading=1)

    model = DiffiT(**LATENT)
    x, t, y = model_inputs(LATENT, 2, "cpu")
    with pytest.raises(ValueError, match=r"x must be \[B, 4, 8, 8\].*\(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"t must be a \[B\] = \[2\].*\(3,\)"):
        model(x, t[:1].repeat(3), y)
    with pytest.raises(ValueError, match=r"y must be a \[B\] = \[2\].*\(2, 1\)"):
        model(x, t, y[:, None])
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        DiffiT(input_size=9, patch_size=2)

    image = DiffiTUNet(**IMAGE["uncond"])
    x, t = model_inputs(IMAGE["uncond"], 2, "cpu")
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 16, 16\].*\(2, 3, 32, 32\)"):
        image(torch.randn(2, 3, 32, 32), t)
    with pytest.raises(ValueError, match=r"t must be a \[B\] = \[2\].*\(2, 1\)"):
        image(x, t[:, None])
    with pytest.raises(ValueError, match="unconditional.*y must be None"):
        image(x, t, torch.tensor([0, 1]))
    conditional = DiffiTUNet(**IMAGE["cond"])
    x, t, y = model_inputs(IMAGE["cond"], 2, "cpu")
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=5\).*got None"):
        conditional(x, t)
    with pytest.raises(ValueError, match=r"must be divisible by 2 \*\* \(len\(channel_mult\) "
                                         r"- 1\) = 4"):
        DiffiTUNet(img_size=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"x must be a \[B, 32, 8, 8\] feature map"):
        conditional.encoder[0].blocks[0](torch.randn(2, 32, 4, 4), torch.randn(2, 128))
