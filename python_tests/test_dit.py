"""DiT on the fused kernels (ditkernels.nn.DiTBlock, ditkernels.models.DiT, patch_dit)
against the plain-PyTorch DiT in ditkernels.reference.dit.

Accuracy: conftest.assert_matches_reference (STYLE.md rule 7, at most 2x eager's error).
"""

import pytest
import torch
import torch.nn as nn

from conftest import (DEVICES, assert_matches_reference, assert_same_state, ditkernels_copy,
                      forward_backward, image_model_inputs, randomize_)
from ditkernels.reference import dit as ref
from ditkernels.models import DIT_CONFIGS, DiT, DiT_models
from ditkernels.nn import DiTBlock, LabelEmbedder, TimestepEmbedder
from ditkernels.patching import patch_dit

# DiT-S/2 at 256x256 (latent 32x32, 256 tokens), and a small config with odd sizes:
# 49 tokens, head_dim 72 (as DiT-XL), an MLP ratio that is not 4, 3 channels without
# learned sigma.
MODEL_CONFIGS = {
    "DiT-S/2": dict(DIT_CONFIGS["DiT-S/2"], input_size=32),
    "small-odd": dict(input_size=14, patch_size=2, in_channels=3, hidden_size=144, depth=3,
                      num_heads=2, mlp_ratio=2.5, class_dropout_prob=0.25, num_classes=7,
                      learn_sigma=False),
}
TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def dit_inputs(config: dict, batch: int, device, dtype=torch.float32):
    return image_model_inputs(batch, config.get("in_channels", 4), config["input_size"],
                              config.get("num_classes", 1000), device, dtype)


def reference_dit(config, device):
    return randomize_(ref.DiT(**config)).to(device)


# ---------------------------------------------------------------------------
# structure: state_dicts, initialisation, configs
# ---------------------------------------------------------------------------


def test_block_state_dict_loads_strictly_both_ways():
    reference = randomize_(ref.DiTBlock(96, 4, mlp_ratio=3.0))
    ours = DiTBlock(96, 4, mlp_ratio=3.0)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert_same_state(ours, reference)
    fresh_reference = ref.DiTBlock(96, 4, mlp_ratio=3.0)
    fresh_reference.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(fresh_reference, ours)
    assert not any(k.startswith(("norm1", "norm2")) for k in ours.state_dict())


def test_model_state_dict_loads_strictly_both_ways():
    config = MODEL_CONFIGS["small-odd"]
    reference, ours = randomize_(ref.DiT(**config)), DiT(**config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert_same_state(ours, reference)
    fresh_reference = ref.DiT(**config)
    fresh_reference.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(fresh_reference, ours)
    assert "pos_embed" in ours.state_dict() and not ours.pos_embed.requires_grad


def test_initialization_is_the_reference_one():
    # Same construction order and init calls: a seed gives the reference's exact weights.
    config = MODEL_CONFIGS["small-odd"]
    torch.manual_seed(3)
    reference = ref.DiT(**config)
    torch.manual_seed(3)
    ours = DiT(**config)
    assert_same_state(ours, reference)

    # adaLN-Zero: blocks start as the identity, the model's output starts at zero.
    for block in ours.blocks:
        assert not block.adaLN_modulation[1].weight.any()
        assert not block.adaLN_modulation[1].bias.any()
    assert not ours.final_layer.linear.weight.any()
    assert not ours.final_layer.adaLN_modulation[1].weight.any()
    assert not ours.blocks[0].attn.qkv.bias.any() and ours.blocks[0].attn.qkv.weight.any()
    assert ours.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not ours(*dit_inputs(config, 2, "cpu")).any()


def test_pos_embed_is_2d_sincos():
    config = dict(TINY, input_size=12)  # a 6 x 6 token grid, hidden 64
    pos = DiT(**config).pos_embed[0].double()
    grid, quarter = 6, 16
    row, col = 2, 5
    token = pos[row * grid + col]
    omega = 10000.0 ** -(torch.arange(quarter, dtype=torch.float64) / quarter)
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                          torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(token, expected, atol=1e-6, rtol=0)


def test_configs_by_name():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in sizes for p in (2, 4, 8)}
    for name, constructor in DiT_models.items():
        size, patch = name[len("DiT-"):].split("/")
        depth, hidden, heads = sizes[size]
        assert DIT_CONFIGS[name] == dict(depth=depth, hidden_size=hidden,
                                         patch_size=int(patch), num_heads=heads)
        assert constructor.__name__ == name.replace("-", "_").replace("/", "_")
    with torch.device("meta"):  # shapes only: nothing allocated
        xl2 = DiT_models["DiT-XL/2"]()
        reference_xl2 = ref.DiT()
    assert len(xl2.blocks) == 28 and xl2.pos_embed.shape == (1, 256, 1152)
    assert round(sum(p.numel() for p in xl2.parameters()) / 1e6) == 675
    # An original DiT-XL/2 checkpoint has exactly these keys and shapes.
    assert {k: v.shape for k, v in xl2.state_dict().items()} == {
        k: v.shape for k, v in reference_xl2.state_dict().items()}


def test_embedders_match_reference():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (256, 33):
        torch.testing.assert_close(TimestepEmbedder.timestep_embedding(t, dim),
                                   ref.TimestepEmbedder.timestep_embedding(t, dim))
    features = TimestepEmbedder.timestep_embedding(torch.zeros(1), 8)
    assert features.tolist() == [[1.0] * 4 + [0.0] * 4]  # cat[cos, sin]

    labels = LabelEmbedder(num_classes=5, hidden_size=8, dropout_prob=0.1)
    assert labels.embedding_table.num_embeddings == 6
    out = labels(torch.tensor([0, 4, 2]), train=False, force_drop_ids=torch.tensor([0, 1, 1]))
    table = labels.embedding_table.weight
    torch.testing.assert_close(out, table[[0, 5, 5]])
    assert LabelEmbedder(5, 8, dropout_prob=0.0).embedding_table.num_embeddings == 5


# ---------------------------------------------------------------------------
# numerics against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 97])
def test_block_matches_reference(device, tokens):
    reference = randomize_(ref.DiTBlock(144, 2)).to(device)  # head_dim 72
    ours = DiTBlock(144, 2).to(device)
    ours.load_state_dict(reference.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, tokens, 144, generator=gen).to(device)
    c = torch.randn(3, 144, generator=gen).to(device)
    assert_matches_reference(ours, reference, (x, c))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config_name", list(MODEL_CONFIGS))
def test_model_matches_reference(device, config_name):
    config = MODEL_CONFIGS[config_name]
    reference = reference_dit(config, device).train()  # train: label dropout active
    ours = ditkernels_copy(reference, DiT, config)
    assert_matches_reference(ours, reference, dit_inputs(config, 2, device))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_forward_backward(device):
    config = MODEL_CONFIGS["small-odd"]
    reference = reference_dit(config, device).eval()
    ours = ditkernels_copy(reference, DiT, config)
    assert_matches_reference(ours, reference, dit_inputs(config, 3, device),
                             autocast_dtype=torch.bfloat16)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model(device, dtype):
    config = MODEL_CONFIGS["small-odd"]
    reference = reference_dit(config, device).to(dtype).eval()
    ours = ditkernels_copy(reference, DiT, config)
    assert_matches_reference(ours, reference, dit_inputs(config, 3, device, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_with_cfg(device):
    config = MODEL_CONFIGS["small-odd"] | dict(learn_sigma=True)
    reference = reference_dit(config, device).eval()
    ours = ditkernels_copy(reference, DiT, config)
    x, t, _ = dit_inputs(config, 4, device)
    y = torch.tensor([1, 6, 7, 7], device=device)  # [cond; uncond] with the null class 7
    guided = ours.forward_with_cfg(x, t, y, cfg_scale=4.0)
    torch.testing.assert_close(guided, reference.forward_with_cfg(x, t, y, 4.0),
                               atol=1e-4, rtol=1e-4)

    # Only the first half of x is read; the guided eps fills both halves; guidance
    # touches the first 3 channels only.
    x_other = torch.cat([x[:2], torch.randn_like(x[2:])])
    torch.testing.assert_close(ours.forward_with_cfg(x_other, t, y, 4.0), guided)
    plain = ours(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = plain[:2, :3], plain[2:, :3]
    torch.testing.assert_close(guided[:2, :3], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(guided[2:, :3], guided[:2, :3])
    torch.testing.assert_close(guided[:, 3:], plain[:, 3:])


def test_blocks_are_chained_and_fall_back_for_hooks(monkeypatch):
    config = MODEL_CONFIGS["small-odd"]
    reference = reference_dit(config, "cpu").eval()
    ours = ditkernels_copy(reference, DiT, config)
    inputs = dit_inputs(config, 2, "cpu")
    expected = reference(*inputs)

    def not_called(self, x, c):
        raise AssertionError("DiT.forward should chain the blocks' parts")

    with monkeypatch.context() as patch:
        patch.setattr(DiTBlock, "forward", not_called)
        torch.testing.assert_close(ours(*inputs), expected, atol=1e-4, rtol=1e-4)

    # A hook expects the block to be called: DiT then runs the blocks one by one.
    seen = []
    ours.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(ours(*inputs), expected, atol=1e-4, rtol=1e-4)
    assert seen == [(2, 49, 144)]


# ---------------------------------------------------------------------------
# patch_dit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_dit_keeps_outputs_weights_device_and_dtype(device, dtype):
    config = MODEL_CONFIGS["small-odd"]
    model = reference_dit(config, device).to(dtype).eval()
    x, t, y = dit_inputs(config, 2, device, dtype)
    before = model(x, t, y)
    params = dict(model.named_parameters())

    assert patch_dit(model) == [f"blocks.{i}" for i in range(config["depth"])]
    assert all(type(b) is DiTBlock for b in model.blocks)
    assert all(model.get_parameter(n) is p for n, p in params.items())
    assert all(p.device.type == device and p.dtype == dtype for p in model.parameters())
    assert not model.blocks[0].training
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(model(x, t, y), before, **tol)
    assert patch_dit(model) == []


def test_patch_dit_leaves_near_misses_alone():
    model = nn.Sequential(ref.DiTBlock(64, 2), ref.DiTBlock(64, 2))
    model[1].mlp.act = nn.GELU()  # exact GELU: a different block
    with pytest.warns(UserWarning, match=r"1 \(DiTBlock\) unpatched: mlp.act"):
        assert patch_dit(model) == ["0"]
    assert type(model[1]) is ref.DiTBlock
    with pytest.raises(ValueError, match="model itself is a DiT block"):
        patch_dit(ref.DiTBlock(64, 2))


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


def test_block_has_no_graph_breaks():
    block = randomize_(DiTBlock(64, 2))
    explanation = torch._dynamo.explain(block)(torch.randn(2, 5, 64), torch.randn(2, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_matches_eager(device):
    model = ditkernels_copy(reference_dit(TINY, device), DiT, TINY).eval()
    inputs = dit_inputs(TINY, 2, device)
    eager_out, eager_grads = forward_backward(model, inputs)
    model.compile(fullgraph=True)
    compiled_out, compiled_grads = forward_backward(model, inputs)
    # Inductor rounds the timestep sinusoid differently (about 3e-5 at t ~ 1000), which
    # reaches every value through c: tolerances are relative to each tensor's magnitude.
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-4 * eager_out.abs().max(),
                               rtol=1e-4)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4 * grad.abs().max(),
                                   rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    block = DiTBlock(64, 2)
    x, c = torch.randn(2, 5, 64), torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"x must be \[B, N, 64\].*\(10, 64\)"):
        block(torch.randn(10, 64), c)
    with pytest.raises(ValueError, match=r"x has hidden size 32.*hidden_size=64"):
        block(torch.randn(2, 5, 32), c)
    with pytest.raises(ValueError, match=r"c must be \[B, hidden_size\] = \[2, 64\].*\(3, 64\)"):
        block(x, torch.randn(3, 64))

    model = DiT(**TINY)
    x, t, y = dit_inputs(TINY, 2, "cpu")
    with pytest.raises(ValueError, match=r"x must be \[B, 4, 8, 8\].*\(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"t must be a \[B\] = \[2\].*\(3,\)"):
        model(x, t[:1].repeat(3), y)
    with pytest.raises(ValueError, match=r"y must be a \[B\] = \[2\].*\(2, 1\)"):
        model(x, t, y[:, None])
    with pytest.raises(ValueError, match="num_heads"):
        DiTBlock(64, 3)
