"""U-ViT on the fused kernels (ditkernels.models.uvit) against the plain-PyTorch U-ViT
in ditkernels.reference.uvit.

Accuracy: conftest.assert_matches_reference (STYLE.md rule 7, at most 2x eager's error).
"""

import functools

import pytest
import torch
import torch.nn as nn

import conftest
import ditkernels.models.uvit as uvit
import ditkernels.nn.functional as fused
from conftest import (DEVICES, assert_compiled_matches_eager, assert_matches_reference,
                      assert_same_state, ditkernels_copy, forward_backward, image_model_inputs)
from ditkernels.reference import uvit as ref
from ditkernels.models.uvit import UVIT_CONFIGS, UVIT_SIZES, Block, UViT, UViT_models

# Small configs that still cover every path. "cond": label + time tokens (27 tokens),
# head_dim 72 (as U-ViT-H), an MLP ratio that is not 4, two skips, the final conv.
# "uncond": time token only (17 tokens), odd depth (one skip), qkv bias, an explicit
# qk_scale, the time-embedding MLP, no final conv.
CONFIGS = {
    "cond": dict(img_size=10, patch_size=2, in_chans=3, embed_dim=144, depth=4, num_heads=2,
                 mlp_ratio=2.5, num_classes=7),
    "uncond": dict(img_size=8, patch_size=2, in_chans=4, embed_dim=64, depth=3, num_heads=4,
                   qkv_bias=True, qk_scale=0.3, mlp_time_embed=True, conv=False),
}


def _uvit_scale(name: str, owner: nn.Module):
    """LayerNorm gains about 1; pos_embed and the label embedding, which U-ViT
    initialises small, large enough to matter."""
    if isinstance(owner, nn.LayerNorm) and name.endswith("weight"):
        return 1.0, 0.1
    if name in ("pos_embed", "label_emb.weight"):
        return 0.0, 0.5
    return None


randomize_ = functools.partial(conftest.randomize_, scale=_uvit_scale)


def reference_uvit(config: dict, device) -> ref.UViT:
    return randomize_(ref.UViT(**config)).to(device)


def uvit_inputs(config: dict, batch: int, device, dtype=torch.float32):
    return image_model_inputs(batch, config["in_chans"], config["img_size"],
                              config.get("num_classes", -1), device, dtype)


# ---------------------------------------------------------------------------
# structure: state_dicts, initialisation, configs
# ---------------------------------------------------------------------------


def assert_loads_strictly_both_ways(reference_cls, cls, config: dict):
    """Random reference weights load into cls(**config) with strict=True, and back."""
    reference, ours = randomize_(reference_cls(**config)), cls(**config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert_same_state(ours, reference)
    fresh_reference = reference_cls(**config)
    fresh_reference.load_state_dict(randomize_(ours).state_dict(), strict=True)
    assert_same_state(fresh_reference, ours)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_state_dict_loads_strictly_both_ways(config_name):
    assert_loads_strictly_both_ways(ref.UViT, UViT, CONFIGS[config_name])


def test_state_dict_names_are_u_vits():
    keys = set(UViT(**CONFIGS["cond"]).state_dict())
    half = CONFIGS["cond"]["depth"] // 2
    assert {"pos_embed", "patch_embed.proj.weight", "label_emb.weight", "norm.weight",
            "decoder_pred.weight", "final_layer.weight", "mid_block.norm1.weight",
            "mid_block.attn.qkv.weight", "mid_block.mlp.fc2.bias"} <= keys
    assert {k for k in keys if "skip_linear" in k} == {
        f"out_blocks.{i}.skip_linear.{p}" for i in range(half) for p in ("weight", "bias")}
    assert not any(k.startswith("time_embed") or k.endswith("qkv.bias") for k in keys)

    keys = set(UViT(**CONFIGS["uncond"]).state_dict())
    assert {"time_embed.0.weight", "time_embed.2.bias", "in_blocks.0.attn.qkv.bias"} <= keys
    assert not any(k.startswith(("label_emb", "final_layer")) for k in keys)
    assert not any("skip_linear" in k
                   for k in UViT(**CONFIGS["cond"], skip=False).state_dict())


def test_initialization_is_the_reference_one():
    # Same construction order and init calls: a seed gives the reference's exact weights.
    for config in CONFIGS.values():
        torch.manual_seed(3)
        reference = ref.UViT(**config)
        torch.manual_seed(3)
        ours = UViT(**config)
        assert_same_state(ours, reference)
    assert ours.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)
    assert not ours.in_blocks[0].attn.proj.bias.any()
    assert torch.all(ours.norm.weight == 1) and not ours.norm.bias.any()


def test_configs_by_name():
    assert set(UViT_models) == set(UVIT_CONFIGS)
    for name, constructor in UViT_models.items():
        size = name[len("U-ViT-")]
        embed_dim, depth, heads = UVIT_SIZES[size]
        with torch.device("meta"):  # shapes only: nothing allocated
            model = constructor()
        assert constructor.__name__ == name.replace("U-ViT", "UViT").replace("-", "_").replace(
            "/", "_")
        assert (model.embed_dim, model.in_blocks[0].attn.num_heads) == (embed_dim, heads)
        assert len(model.in_blocks) == len(model.out_blocks) == depth // 2
        assert model.extras == (1 if name.endswith(("-uncond", "cifar10", "celeba64")) else 2)
        if name.startswith(("U-ViT-S/2", "U-ViT-M/2", "U-ViT-L/2", "U-ViT-H/2")):
            # 32x32x4 latents, patch 2: 256 patches and the extra tokens.
            assert model.pos_embed.shape == (1, 256 + model.extras, embed_dim)
    # The paper's parameter counts (millions) for its four sizes.
    counts = {"U-ViT-S/2-cifar10": 44, "U-ViT-M/4-imagenet64": 131, "U-ViT-L/2": 287,
              "U-ViT-H/2": 501}
    for name, millions in counts.items():
        with torch.device("meta"):
            model = UViT_models[name]()
            reference = ref.UViT(**UVIT_CONFIGS[name])
        assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions, name
        # A checkpoint of the original has exactly these keys and shapes.
        assert {k: v.shape for k, v in model.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()}
    with torch.device("meta"):
        assert UViT_models["U-ViT-M/2"](num_classes=-1).extras == 1  # kwargs override


def test_timestep_embedding_is_u_vits():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (64, 33):
        torch.testing.assert_close(uvit.timestep_embedding(t, dim),
                                   ref.timestep_embedding(t, dim), atol=0, rtol=0)
    assert uvit.timestep_embedding(torch.zeros(1), 8).tolist() == [[1.0] * 4 + [0.0] * 4]


# ---------------------------------------------------------------------------
# numerics against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_model_matches_reference(device, config_name):
    config = CONFIGS[config_name]
    reference = reference_uvit(config, device).train()
    ours = ditkernels_copy(reference, UViT, config)
    assert_matches_reference(ours, reference, uvit_inputs(config, 2, device))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_forward_backward(device):
    config = CONFIGS["cond"]
    reference = reference_uvit(config, device)
    ours = ditkernels_copy(reference, UViT, config)
    assert_matches_reference(ours, reference, uvit_inputs(config, 3, device),
                             autocast_dtype=torch.bfloat16)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_without_skips_matches_reference(device):
    config = dict(CONFIGS["cond"], skip=False)
    reference = reference_uvit(config, device)
    ours = ditkernels_copy(reference, UViT, config)
    assert_matches_reference(ours, reference, uvit_inputs(config, 2, device))


def assert_skips_fused_and_blocks_chained(monkeypatch, model, reference, inputs, skip_shape):
    """model(*inputs) gives reference(*inputs), each out block's skip merge running as one
    skip_concat_linear on [B, L, D] = skip_shape tokens, and no block called whole
    (forward chains the blocks' parts)."""
    expected = reference(*inputs)
    skip_concat_linear = fused.skip_concat_linear
    fused_calls = []

    def counted(*args):
        fused_calls.append(args[0].shape)
        return skip_concat_linear(*args)

    def not_called(self, x, skip=None):
        raise AssertionError(f"{type(model).__name__}.forward should chain the blocks' parts")

    with monkeypatch.context() as patch:
        patch.setattr(fused, "skip_concat_linear", counted)
        patch.setattr(Block, "forward", not_called)
        torch.testing.assert_close(model(*inputs), expected, atol=1e-4, rtol=1e-4)
    assert fused_calls == [skip_shape] * len(model.out_blocks)


def test_skips_use_the_fused_op_and_blocks_are_chained(monkeypatch):
    config = CONFIGS["cond"]
    reference = reference_uvit(config, "cpu")
    ours = ditkernels_copy(reference, UViT, config)
    assert_skips_fused_and_blocks_chained(monkeypatch, ours, reference,
                                          uvit_inputs(config, 2, "cpu"), (2, 27, 144))


def test_hooks_and_checkpointing_fall_back_to_block_calls():
    config = CONFIGS["cond"]
    reference = reference_uvit(config, "cpu")
    inputs = uvit_inputs(config, 2, "cpu")
    expected_out, expected_grads = forward_backward(reference, inputs)

    # A hook expects the block to be called: U-ViT then runs the blocks one by one.
    ours = ditkernels_copy(reference, UViT, config)
    seen = []
    ours.out_blocks[0].register_forward_hook(lambda module, args, out: seen.append(len(args)))
    torch.testing.assert_close(ours(*inputs), expected_out, atol=1e-4, rtol=1e-4)
    assert seen == [2]  # called with (x, skip)

    checkpointed = ditkernels_copy(reference, UViT, dict(config, use_checkpoint=True))
    out, grads = forward_backward(checkpointed, inputs)
    torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-4)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_without_graph_breaks(device):
    # aot_eager traces forward and backward through the fake kernels and the autograd
    # formulas without generating code, which keeps this test fast on CPU.
    config = CONFIGS["cond"]
    ours = ditkernels_copy(reference_uvit(config, device), UViT, config)
    inputs = uvit_inputs(config, 2, device)
    explanation = torch._dynamo.explain(ours)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_compiled_matches_eager(ours, inputs, backend="aot_eager")


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = UViT(**CONFIGS["cond"])
    x, t, y = uvit_inputs(CONFIGS["cond"], 2, "cpu")
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 10, 10\].*\(3, 10, 10\)"):
        model(x[0], t, y)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 10, 10\].*\(2, 4, 10, 10\)"):
        model(torch.randn(2, 4, 10, 10), t, y)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 10, 10\].*\(2, 3, 12, 12\)"):
        model(torch.randn(2, 3, 12, 12), t, y)
    with pytest.raises(ValueError, match=r"timesteps must be a \[B\] = \[2\].*\(2, 1\)"):
        model(x, t[:, None], y)
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=7\): pass y"):
        model(x, t)
    with pytest.raises(ValueError, match=r"y must be a \[B\] = \[2\].*\(3,\)"):
        model(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"integer class ids.*torch.float32"):
        model(x, t, y.float())

    unconditional = UViT(**CONFIGS["uncond"])
    x, t = uvit_inputs(CONFIGS["uncond"], 2, "cpu")
    with pytest.raises(ValueError, match="unconditional.*y must be None"):
        unconditional(x, t, torch.tensor([0, 1]))

    block = Block(64, 2, skip=True)
    tokens = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match=r"block\(x, skip\)"):
        block(tokens)
    with pytest.raises(ValueError, match=r"skip must have x's shape \(2, 5, 64\).*\(2, 4, 64\)"):
        block(tokens, tokens[:, :4])
    with pytest.raises(ValueError, match=r"x must be \[B, L, 64\].*\(5, 64\)"):
        block(tokens[0], tokens[0])

    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        UViT(img_size=10, patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        UViT(img_size=8, patch_size=2, embed_dim=64, depth=2, num_heads=3)
    with pytest.raises(ValueError, match="norm_layer must build an nn.LayerNorm"):
        UViT(img_size=8, patch_size=2, embed_dim=64, depth=2, num_heads=2,
             norm_layer=nn.RMSNorm)
