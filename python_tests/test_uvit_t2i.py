"""Text-to-image U-ViT on the fused kernels (ditkernels.models.uvit_t2i) against the
plain-PyTorch one in ditkernels.reference_uvit_t2i, and through the diffusion adapter.

Accuracy: conftest.assert_matches_reference (STYLE.md rule 7, at most 2x eager's error).
"""

import pytest
import torch

from conftest import (DEVICES, assert_compiled_matches_eager, assert_matches_reference,
                      assert_same_state, ditkernels_copy)
from ditkernels import reference_uvit_t2i as ref
from ditkernels.diffusion import as_denoiser, cfg_forward, create_diffusion, ddim_sample
from ditkernels.models.uvit_t2i import UVIT_T2I_CONFIGS, UViTT2I, UViTT2I_models
from test_uvit import (assert_loads_strictly_both_ways, assert_skips_fused_and_blocks_chained,
                       randomize_)

# Small configs that cover every path, with odd sizes. "wide": 1 + 5 + 25 = 31 tokens,
# head_dim 72 (as U-ViT-H), an MLP ratio that is not 4, two skips, the final conv, an
# odd text width. "one_token": 1 + 1 + 16 = 18 tokens, odd depth (one skip), qkv bias,
# an explicit qk_scale, the time-embedding MLP, no final conv.
CONFIGS = {
    "wide": dict(img_size=10, patch_size=2, in_chans=3, embed_dim=144, depth=4, num_heads=2,
                 mlp_ratio=2.5, clip_dim=13, num_clip_token=5),
    "one_token": dict(img_size=8, patch_size=2, in_chans=4, embed_dim=64, depth=3, num_heads=4,
                      qkv_bias=True, qk_scale=0.3, mlp_time_embed=True, clip_dim=7,
                      num_clip_token=1, conv=False),
}


def reference_t2i(config: dict, device) -> ref.UViT:
    return randomize_(ref.UViT(**config)).to(device)


def t2i_inputs(config: dict, batch: int, device, dtype=torch.float32):
    """(x, t, context): timesteps in [0, 999), context of unit scale like CLIP's tokens
    after its final LayerNorm. The same values at every call."""
    gen = torch.Generator().manual_seed(99)
    size, channels = config["img_size"], config["in_chans"]
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    context = torch.randn(batch, config["num_clip_token"], config["clip_dim"], generator=gen)
    return x.to(device, dtype), t.to(device), context.to(device, dtype)


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# structure: state_dicts, initialisation, configs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_state_dict_loads_strictly_both_ways(config_name):
    config = CONFIGS[config_name]
    assert list(shapes(UViTT2I(**config)).items()) == list(shapes(ref.UViT(**config)).items())
    assert_loads_strictly_both_ways(ref.UViT, UViTT2I, config)


def test_state_dict_names_are_u_vit_t2is():
    config = CONFIGS["wide"]
    keys = shapes(UViTT2I(**config))
    assert keys["context_embed.weight"] == (144, 13) and keys["context_embed.bias"] == (144,)
    assert keys["pos_embed"] == (1, 1 + 5 + 25, 144)
    assert {"patch_embed.proj.weight", "norm.weight", "decoder_pred.weight",
            "final_layer.weight", "mid_block.attn.qkv.weight"} <= set(keys)
    assert {k for k in keys if "skip_linear" in k} == {
        f"out_blocks.{i}.skip_linear.{p}" for i in range(2) for p in ("weight", "bias")}
    assert not any(k.startswith(("label_emb", "time_embed")) for k in keys)
    assert not any("skip_linear" in k for k in UViTT2I(**config, skip=False).state_dict())


def test_initialization_is_the_reference_one():
    # Same construction order and init calls: a seed gives the reference's exact weights.
    for config in CONFIGS.values():
        torch.manual_seed(3)
        reference = ref.UViT(**config)
        torch.manual_seed(3)
        ours = UViTT2I(**config)
        assert_same_state(ours, reference)
    assert not ours.context_embed.bias.any()
    assert ours.context_embed.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_mscoco_configs_by_name():
    assert set(UViTT2I_models) == set(UVIT_T2I_CONFIGS) == {"U-ViT-S/2-mscoco",
                                                             "U-ViT-S/2-deep-mscoco"}
    # baofff/U-ViT configs/mscoco_uvit_small.py; "deep" is its depth=16 run. The
    # parameter counts (millions) are the paper's MS-COCO table's.
    expected = {"U-ViT-S/2-mscoco": (12, 45), "U-ViT-S/2-deep-mscoco": (16, 58)}
    for name, (depth, millions) in expected.items():
        constructor = UViTT2I_models[name]
        assert constructor.__name__ == name.replace("U-ViT", "UViTT2I").replace(
            "-", "_").replace("/", "_")
        with torch.device("meta"):  # shapes only: nothing allocated
            model = constructor()
            reference = ref.UViT(**UVIT_T2I_CONFIGS[name])
        assert UVIT_T2I_CONFIGS[name] == dict(
            img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=depth, num_heads=8,
            mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, clip_dim=768, num_clip_token=77)
        assert len(model.in_blocks) == len(model.out_blocks) == depth // 2
        assert model.extras == 78 and model.pos_embed.shape == (1, 78 + 256, 512)
        assert isinstance(model.final_layer, torch.nn.Conv2d)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions, name
        # A checkpoint of the original has exactly these keys and shapes.
        assert list(shapes(model).items()) == list(shapes(reference).items())
    with torch.device("meta"):
        assert UViTT2I_models["U-ViT-S/2-mscoco"](num_clip_token=10).extras == 11


# ---------------------------------------------------------------------------
# numerics against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_model_matches_reference(device, config_name):
    config = CONFIGS[config_name]
    reference = reference_t2i(config, device).train()
    ours = ditkernels_copy(reference, UViTT2I, config)
    grads = assert_matches_reference(ours, reference, t2i_inputs(config, 2, device),
                                     every_input=True)
    assert grads["input 2"].abs().max() > 0  # the text reaches the output


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_float64_matches_reference(config_name):
    config = CONFIGS[config_name]
    reference = reference_t2i(config, "cpu").double()
    ours = ditkernels_copy(reference, UViTT2I, config)
    assert_matches_reference(ours, reference, t2i_inputs(config, 3, "cpu", torch.float64),
                             every_input=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_forward_backward(device):
    config = CONFIGS["wide"]
    reference = reference_t2i(config, device)
    ours = ditkernels_copy(reference, UViTT2I, config)
    assert_matches_reference(ours, reference, t2i_inputs(config, 3, device),
                             autocast_dtype=torch.bfloat16)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


def test_skips_use_the_fused_op_and_blocks_are_chained(monkeypatch):
    config = CONFIGS["wide"]
    reference = reference_t2i(config, "cpu")
    ours = ditkernels_copy(reference, UViTT2I, config)
    assert_skips_fused_and_blocks_chained(monkeypatch, ours, reference,
                                          t2i_inputs(config, 2, "cpu"), (2, 31, 144))


def test_checkpointing_matches_reference():
    config = dict(CONFIGS["one_token"], use_checkpoint=True)
    reference = reference_t2i(config, "cpu")
    ours = ditkernels_copy(reference, UViTT2I, config)
    assert_matches_reference(ours, reference, t2i_inputs(config, 2, "cpu"), every_input=True)


def test_compiles_without_graph_breaks():
    # aot_eager traces forward and backward through the fake kernels and the autograd
    # formulas without generating code, which keeps this test fast on CPU.
    config = CONFIGS["wide"]
    ours = ditkernels_copy(reference_t2i(config, "cpu"), UViTT2I, config)
    inputs = t2i_inputs(config, 2, "cpu")
    explanation = torch._dynamo.explain(ours)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_compiled_matches_eager(ours, inputs, backend="aot_eager", every_input=True)


# ---------------------------------------------------------------------------
# through the diffusion adapter
# ---------------------------------------------------------------------------


def _prompts_and_empty(config: dict, prompts: int):
    gen = torch.Generator().manual_seed(7)
    shape = (config["num_clip_token"], config["clip_dim"])
    return torch.randn(prompts, *shape, generator=gen), torch.randn(*shape, generator=gen)


def test_adapter_labels_pick_prompts_and_the_null_class_is_the_empty_prompt():
    config = CONFIGS["one_token"]
    model = ditkernels_copy(reference_t2i(config, "cpu"), UViTT2I, config).eval()
    prompts, empty = _prompts_and_empty(config, 3)
    denoiser = as_denoiser(model, context=prompts, null_context=empty)
    assert (denoiser.in_channels, denoiser.learn_sigma) == (4, False)
    assert (denoiser.num_classes, denoiser.null_class) == (3, 3)
    x, t, _ = t2i_inputs(config, 4, "cpu")
    y = torch.tensor([2, 0, 3, 2])
    expected = model(x, t, torch.stack([prompts[2], prompts[0], empty, prompts[2]]))
    torch.testing.assert_close(denoiser(x, t, y), expected, atol=0, rtol=0)

    without_null = as_denoiser(model, context=prompts)
    assert (without_null.num_classes, without_null.null_class) == (3, None)
    # Any callable taking context=: here the original's timestep numbering (1..1000).
    shifted = as_denoiser(lambda x, t, context: model(x, t + 1, context), in_channels=4,
                          context=prompts)
    torch.testing.assert_close(shifted(x, t, y.clamp(max=2)),
                               model(x, t + 1, prompts[y.clamp(max=2)]), atol=0, rtol=0)
    # Without context= the text model reads as unconditional and says what it needs.
    with pytest.raises(ValueError, match=r"text-conditioned: pass context.*\[4, 1, 7\]"):
        as_denoiser(model)(x, t)


def test_adapter_cfg_is_u_vits_cfg_nnet():
    # baofff/U-ViT sample_t2i_discrete.py: cond + scale * (cond - uncond), uncond being
    # the model on the empty prompt's encoding repeated over the batch; its scale is
    # our cfg_scale - 1. Computed here with the reference model, in fp64.
    config = CONFIGS["wide"]
    reference = reference_t2i(config, "cpu").double().eval()
    ours = ditkernels_copy(reference, UViTT2I, config).eval()
    prompts, empty = _prompts_and_empty(config, 2)
    prompts, empty = prompts.double(), empty.double()
    x, t, _ = t2i_inputs(config, 2, "cpu", torch.float64)
    scale = 3.0
    with torch.no_grad():
        cond = reference(x, t, prompts)
        uncond = reference(x, t, empty.expand(2, -1, -1))
        expected = cond + scale * (cond - uncond)
        guided = cfg_forward(as_denoiser(ours, context=prompts, null_context=empty), x, t,
                             torch.tensor([0, 1]), 1 + scale)
    torch.testing.assert_close(guided, expected)


def test_trains_and_samples_with_guidance_through_the_adapter():
    config = CONFIGS["one_token"]
    model = UViTT2I(**config)
    prompts, empty = _prompts_and_empty(config, 2)
    denoiser = as_denoiser(model, context=prompts, null_context=empty)
    d = create_diffusion(learn_sigma=False)
    x0 = torch.rand(3, 4, 8, 8) * 2 - 1
    loss = d.training_losses(denoiser, x0, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 2]))
    loss["loss"].mean().backward()
    assert model.context_embed.weight.grad.abs().max() > 0

    randomize_(model).eval()

    def sample(y, cfg_scale):
        return ddim_sample(d.respaced("ddim3"), denoiser, (2, 4, 8, 8), y=y,
                           cfg_scale=cfg_scale, seed=0, progress=False)

    guided = sample(torch.tensor([0, 1]), 2.0)
    assert guided.shape == (2, 4, 8, 8) and torch.isfinite(guided).all()
    torch.testing.assert_close(sample(torch.tensor([0, 1]), 2.0), guided, atol=0, rtol=0)
    assert not torch.allclose(sample(torch.tensor([1, 0]), 2.0), guided)
    assert not torch.allclose(sample(torch.tensor([0, 1]), 1.0), guided)


def test_adapter_rejects_bad_context():
    config = CONFIGS["one_token"]
    model = UViTT2I(**config)
    prompts, empty = _prompts_and_empty(config, 2)
    with pytest.raises(ValueError, match=r"\[P, L, D\], got torch.float32 of shape \(1, 7\)"):
        as_denoiser(model, context=empty)
    with pytest.raises(ValueError, match=r"\[P, L, D\], got torch.int64"):
        as_denoiser(model, context=prompts.long())
    with pytest.raises(ValueError, match=r"null_context must be one encoded prompt of shape "
                                         r"\(1, 7\).*got shape \(2, 1, 7\)"):
        as_denoiser(model, context=prompts, null_context=prompts)
    with pytest.raises(ValueError, match="null_context needs context"):
        as_denoiser(model, null_context=empty)
    with pytest.raises(ValueError, match="context= sets forward, num_classes and null_class"):
        as_denoiser(model, context=prompts, null_class=0)
    with pytest.raises(ValueError, match="pass the model itself, not an adapter"):
        as_denoiser(as_denoiser(model), context=prompts)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = UViTT2I(**CONFIGS["wide"])
    x, t, context = t2i_inputs(CONFIGS["wide"], 2, "cpu")
    with pytest.raises(ValueError, match=r"text-conditioned: pass context.*\[2, 5, 13\]"):
        model(x, t, None)
    with pytest.raises(ValueError, match=r"context must be a floating .* = \[2, 5, 13\].*"
                                         r"got shape \(2, 4, 13\)"):
        model(x, t, context[:, :4])
    with pytest.raises(ValueError, match=r"context must .*got shape \(1, 5, 13\)"):
        model(x, t, context[:1])
    with pytest.raises(ValueError, match=r"context must .*dtype torch.int64"):
        model(x, t, context.long())
    with pytest.raises(ValueError, match=r"x must be \[B, 3, 10, 10\].*\(2, 4, 10, 10\)"):
        model(torch.randn(2, 4, 10, 10), t, context)
    with pytest.raises(ValueError, match=r"timesteps must be a \[B\] = \[2\].*\(2, 1\)"):
        model(x, t[:, None], context)
    with pytest.raises(ValueError, match="clip_dim >= 1.*clip_dim=0"):
        UViTT2I(img_size=8, patch_size=2, embed_dim=64, depth=2, num_heads=2, clip_dim=0)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        UViTT2I(img_size=10, patch_size=4)

