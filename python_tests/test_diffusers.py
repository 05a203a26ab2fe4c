"""ditkernels.patch_diffusers against diffusers itself: the unpatched model is the oracle.

Tiny random models of each family (DiT, PixArt, SD3/SD3.5, Flux), built locally; nothing
is downloaded. Every parameter is randomised (conftest.randomize_), so the adaLN-Zero
layers diffusers initialises to zero matter too.
"""

import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

diffusers = pytest.importorskip("diffusers")

import ditkernels  # noqa: E402
from conftest import (DEVICES, assert_compiled_matches_eager,  # noqa: E402
                      assert_matches_reference, assert_same_state, forward_backward,
                      randomize_)

pytestmark = pytest.mark.usefixtures("one_thread")


class Denoiser(nn.Module):
    """A diffusers transformer called with positional tensors, returning its sample:
    the form conftest's forward_backward drives (its first input gets a gradient)."""

    def __init__(self, model: nn.Module, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs)), return_dict=False)[0]


class CountDitkernelsOps(TorchDispatchMode):
    """Counts the ditkernels custom ops a region runs, by op name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "ditkernels":
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _latents(gen, batch, channels, height, width):
    return torch.randn(batch, channels, height, width, generator=gen)


def dit_case(heads, head_dim, size, norm_eps=1e-5, num_classes=10):
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=2, sample_size=size, patch_size=2, num_embeds_ada_norm=num_classes,
        norm_eps=norm_eps)
    gen = torch.Generator().manual_seed(7)
    inputs = [_latents(gen, 2, 4, size, size), torch.tensor([3.0, 517.0]), torch.tensor([1, 9])]
    # per block: norm1's LN + modulate; the gated attention residual fused with norm3
    ops = {"ln_modulate": 2, "gated_residual_ln_modulate": 2}
    return model, ["hidden_states", "timestep", "class_labels"], inputs, ops


def pixart_case(heads, head_dim, size, text_tokens=7, norm_eps=1e-6):
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=2, sample_size=size, patch_size=2, cross_attention_dim=heads * head_dim,
        caption_channels=12, norm_eps=norm_eps, interpolation_scale=1)
    gen = torch.Generator().manual_seed(7)
    mask = torch.ones(2, text_tokens, dtype=torch.long)
    mask[1, text_tokens // 2:] = 0
    inputs = [_latents(gen, 2, 4, size, size), torch.randn(2, text_tokens, 12, generator=gen),
              torch.tensor([3.0, 517.0]), mask]
    # per block: norm1; the cross-attention residual fused with norm2
    ops = {"ln_modulate": 2, "gated_residual_ln_modulate": 2}
    return model, ["hidden_states", "encoder_hidden_states", "timestep",
                   "encoder_attention_mask"], inputs, ops


def sd3_case(heads, head_dim, height, width, dual_attention=False, text_tokens=5):
    layers = 3
    model = diffusers.SD3Transformer2DModel(
        sample_size=max(height, width), patch_size=2, in_channels=4, out_channels=4,
        num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=10, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=6, pos_embed_max_size=max(height, width) // 2 + 1,
        dual_attention_layers=(0, 1) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None)
    gen = torch.Generator().manual_seed(7)
    inputs = [_latents(gen, 2, 4, height, width), torch.randn(2, text_tokens, 10, generator=gen),
              torch.randn(2, 6, generator=gen), torch.tensor([3.0, 517.0])]
    # two streams per block, the last (context_pre_only) with one; dual attention
    # modulates norm1's output twice; the output head's AdaLayerNormContinuous
    ops = {"ln_modulate": 2 * layers + (2 if dual_attention else 0) + 1,
           "gated_residual_ln_modulate": 2 * layers - 1}
    return model, ["hidden_states", "encoder_hidden_states", "pooled_projections",
                   "timestep"], inputs, ops


def flux_case(heads, rope, image_tokens, guidance=False, text_tokens=5):
    head_dim = sum(rope)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=10,
        pooled_projection_dim=6, guidance_embeds=guidance, axes_dims_rope=rope)
    gen = torch.Generator().manual_seed(7)
    img_ids = torch.stack([torch.zeros(image_tokens), torch.arange(image_tokens) // 3,
                           torch.arange(image_tokens) % 3], dim=1)
    inputs = [torch.randn(2, image_tokens, 8, generator=gen),
              torch.randn(2, text_tokens, 10, generator=gen), torch.randn(2, 6, generator=gen),
              torch.tensor([0.25, 0.875]), img_ids, torch.zeros(text_tokens, 3)]
    names = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
             "img_ids", "txt_ids"]
    if guidance:
        inputs.append(torch.tensor([3.5, 1.0]))
        names.append("guidance")
    # double blocks: two streams; single blocks: one norm each; the output head
    ops = {"ln_modulate": 2 * 2 + 2 + 1, "gated_residual_ln_modulate": 2 * 2}
    return model, names, inputs, ops


CASES = {
    "dit-h2x8-s6": lambda: dit_case(2, 8, 6),
    "dit-h3x12-s10-eps1e-3": lambda: dit_case(3, 12, 10, norm_eps=1e-3),
    "pixart-h2x8-s6": lambda: pixart_case(2, 8, 6),
    "pixart-h3x12-s10-eps1e-4": lambda: pixart_case(3, 12, 10, text_tokens=9, norm_eps=1e-4),
    "sd3-h2x8-6x10": lambda: sd3_case(2, 8, 6, 10),
    "sd35-dual-h3x12-6x6": lambda: sd3_case(3, 12, 6, 6, dual_attention=True),
    "flux-h2x16-n15": lambda: flux_case(2, (4, 6, 6), 15),
    "flux-guidance-h3x24-n7": lambda: flux_case(3, (8, 8, 8), 7, guidance=True),
}


def build(case, dtype=torch.float32):
    """(unpatched Denoiser, patched deepcopy, inputs in dtype, expected op counts)."""
    model, names, inputs, ops = CASES[case]()
    reference = Denoiser(randomize_(model), names).to(dtype).eval()
    patched = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ditkernels.patch_diffusers(patched)
    inputs = [v.to(dtype) if v.is_floating_point() else v for v in inputs]
    return reference, patched, inputs, ops


def key_bias_floors(model):
    """{key bias: key weight} for every attention's key projection. The gradient of a
    key bias sums dK over the keys, which softmax's shift invariance cancels to zero
    (exactly in self- and cross-attention, nearly under qk-norm or rotary embeddings):
    its rounding error is set by the size of the dK summed, which the key weight's
    gradient measures, not by the near-zero result."""
    return {f"{name}.bias": f"{name}.weight" for name, module in model.named_modules()
            if name.endswith("to_k") and module.bias is not None}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_matches_diffusers(case, dtype):
    reference, patched, inputs, _ = build(case, dtype)
    assert_matches_reference(patched, reference, inputs, floor_from=key_bias_floors(reference))


@pytest.mark.parametrize("case", ["dit-h3x12-s10-eps1e-3", "pixart-h2x8-s6", "sd35-dual-h3x12-6x6",
                                  "flux-h2x16-n15"])
def test_matches_diffusers_under_autocast(case):
    reference, patched, inputs, _ = build(case)
    assert_matches_reference(patched, reference, inputs, autocast_dtype=torch.bfloat16,
                             floor_from=key_bias_floors(reference))


@pytest.mark.parametrize("case", CASES)
def test_runs_the_fused_ops(case):
    reference, patched, inputs, ops = build(case)
    with torch.no_grad(), CountDitkernelsOps() as counter:
        patched(*inputs)
    assert dict(counter.counts) == ops


class BlockCall(nn.Module):
    """A BasicTransformerBlock called as its model calls it, with positional tensors."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, context, timestep, class_labels):
        return self.block(x, encoder_hidden_states=context, timestep=timestep,
                          class_labels=class_labels)


# BasicTransformerBlock configurations the four models do not build: adaLN-Zero with
# cross-attention and affine norms, ada_norm_single without cross-attention (Latte), a
# chunked feed-forward, and one conditioning row broadcast over the batch.
BLOCK_VARIANTS = {
    "ada-norm-zero-cross-attention-affine": (
        dict(norm_type="ada_norm_zero", num_embeds_ada_norm=10, cross_attention_dim=6,
             norm_elementwise_affine=True, norm_eps=1e-4, attention_bias=True), 3),
    "ada-norm-single-self-attention-only": (dict(norm_type="ada_norm_single"), 3),
    "ada-norm-zero-chunked-ff-one-condition": (
        dict(norm_type="ada_norm_zero", num_embeds_ada_norm=10), 1),
}


@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_basic_transformer_block_variants(variant, dtype):
    from diffusers.models.attention import BasicTransformerBlock

    config, conditions = BLOCK_VARIANTS[variant]
    dim, tokens = 20, 9
    block = BasicTransformerBlock(dim, 4, 5, activation_fn="gelu-approximate", **config)
    if "chunked" in variant:
        block.set_chunk_feed_forward(3, dim=1)
    # LayerNorm scales near 1, as trained ones are (randomize_'s N(0, 0.1) would shrink
    # q and k until attention is uniform and their gradients mere cancellation)
    reference = BlockCall(randomize_(block, lambda name, owner: (
        (1.0, 0.1) if isinstance(owner, nn.LayerNorm) and name.endswith("weight") else None)))
    reference = reference.to(dtype)
    patched = copy.deepcopy(reference)
    assert ditkernels.patch_diffusers(patched) == ["block"]
    gen = torch.Generator().manual_seed(3)
    timestep = (torch.randn(conditions, 6 * dim, generator=gen)
                if config["norm_type"] == "ada_norm_single" else torch.tensor([4.0, 900.0, 17.0]))
    inputs = [torch.randn(3, tokens, dim, generator=gen).to(dtype),
              torch.randn(3, 4, 6, generator=gen).to(dtype), timestep[:conditions].to(dtype),
              torch.tensor([2, 7, 0])[:conditions]]
    assert_matches_reference(patched, reference, inputs, floor_from=key_bias_floors(reference))
    with torch.no_grad(), CountDitkernelsOps() as counter:
        patched(*inputs)
    cross = "cross" in variant
    assert dict(counter.counts) == {"ln_modulate": 1, "gated_residual_ln_modulate": 1 + cross}


def test_names_state_and_class_unchanged():
    reference, patched, _, _ = build("sd35-dual-h3x12-6x6")
    assert_same_state(patched, reference)
    for (name, ours), (_, theirs) in zip(patched.named_modules(), reference.named_modules()):
        assert type(ours) is type(theirs), name
    model = copy.deepcopy(reference)
    names = ditkernels.patch_diffusers(model)
    assert names == ([f"model.transformer_blocks.{i}" for i in range(3)]
                     + ["model.transformer_blocks.2.norm1_context", "model.norm_out"])
    assert ditkernels.patch_diffusers(model) == []  # patching again changes nothing


def test_warns_for_blocks_left_alone():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.normalization import RMSNorm

    layer_norm = BasicTransformerBlock(16, 2, 8, norm_type="layer_norm")
    with pytest.warns(UserWarning, match=r"leaving the model \(BasicTransformerBlock\) "
                                         r"unpatched: norm_type 'layer_norm' has no adaLN"):
        assert ditkernels.patch_diffusers(layer_norm) == []
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4))
    model.transformer_blocks[0].norm2 = RMSNorm(16, eps=1e-6)
    with pytest.warns(UserWarning, match=r"leaving transformer_blocks\.0 "
                                         r"\(FluxTransformerBlock\) unpatched: norm2 is a RMSNorm"):
        assert ditkernels.patch_diffusers(model) == ["single_transformer_blocks.0", "norm_out"]


def test_other_attention_processor():
    from diffusers.models.attention_processor import AttnProcessor

    reference, patched, inputs, _ = build("pixart-h2x8-s6")
    for model in (reference, patched):
        model.model.set_attn_processor(AttnProcessor())  # the non-SDPA one
    assert_matches_reference(patched, reference, inputs, floor_from=key_bias_floors(reference))


def test_hooks_applied_before_patching_are_kept():
    hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(hooks, "FirstBlockCacheConfig"):
        pytest.skip("this diffusers has no FirstBlockCache")
    model, _, _, _ = flux_case(2, (4, 6, 6), 15)
    model.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.1))
    with pytest.warns(UserWarning) as caught:
        assert ditkernels.patch_diffusers(model) == ["norm_out"]
    left = [f"{kind}transformer_blocks.{i}" for kind in ("", "single_") for i in range(2)]
    assert [str(w.message).split(" (")[0] for w in caught] == [
        f"patch_diffusers: leaving {name}" for name in left]
    assert all("forward is already replaced on the instance" in str(w.message) for w in caught)


def test_gradient_checkpointing():
    reference, patched, inputs, _ = build("flux-h2x16-n15")
    out, grads = forward_backward(patched, inputs)
    patched.model.enable_gradient_checkpointing()
    patched.train()
    with CountDitkernelsOps() as counter:
        ckpt_out, ckpt_grads = forward_backward(patched, inputs)
    # the blocks ran twice: once forward, once recomputed in backward
    assert counter.counts["gated_residual_ln_modulate"] == 2 * 2 * 2
    torch.testing.assert_close(ckpt_out, out, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["dit-h2x8-s6", "pixart-h2x8-s6", "sd35-dual-h3x12-6x6",
                                  "flux-h2x16-n15"])
def test_torch_compile_fullgraph(case):
    _, patched, inputs, _ = build(case)
    assert_compiled_matches_eager(patched, inputs, backend="aot_eager")


def test_first_block_cache():
    hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(hooks, "FirstBlockCacheConfig"):
        pytest.skip("this diffusers has no FirstBlockCache")

    reference, patched, inputs, ops = build("flux-h2x16-n15")
    ours_out, theirs_out = [], []
    for model, outs in ((patched, ours_out), (reference, theirs_out)):
        # a threshold no residual change reaches: every call after the first reuses the
        # cached residual of all blocks after the first
        model.model.enable_cache(hooks.FirstBlockCacheConfig(threshold=1e9))
        with torch.no_grad(), model.model.cache_context("cond"):
            for step in range(2):
                with CountDitkernelsOps() as counter:
                    outs.append(model(inputs[0] * (1 + 0.01 * step), *inputs[1:]))
                if model is patched:
                    counts = counter.counts
    # the second call: the head block (both streams) and the output head only
    assert dict(counts) == {"ln_modulate": 2 + 1, "gated_residual_ln_modulate": 2}
    for ours, theirs in zip(ours_out, theirs_out):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _tiny_vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                   layers_per_block=1, norm_num_groups=4, sample_size=8)


def _same_images(pipe, **kwargs):
    images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    with CountDitkernelsOps() as counter:
        ditkernels.patch_diffusers(pipe.transformer)
        patched = pipe(generator=torch.Generator().manual_seed(0), output_type="np",
                       **kwargs).images
    assert counter.counts["gated_residual_ln_modulate"] > 0
    assert images.shape == patched.shape and images.std() > 0
    torch.testing.assert_close(torch.from_numpy(patched), torch.from_numpy(images), atol=1e-4,
                               rtol=0)


def _tiny_dit_pipeline():
    # DiTPipeline's guidance uses class 1000 as the null class
    model, _, _, _ = dit_case(2, 8, 8, num_classes=1000)
    return diffusers.DiTPipeline(transformer=randomize_(model).eval(), vae=_tiny_vae().eval(),
                                 scheduler=diffusers.DDIMScheduler())


DIT_PIPELINE_CALL = dict(class_labels=[1, 4], num_inference_steps=3, guidance_scale=4.0)


def test_dit_pipeline():
    _same_images(_tiny_dit_pipeline(), **DIT_PIPELINE_CALL)


def test_patches_a_whole_pipeline():
    pipe = _tiny_dit_pipeline()
    assert ditkernels.patch_diffusers(pipe) == ["transformer.transformer_blocks.0",
                                                "transformer.transformer_blocks.1"]
    with pytest.raises(TypeError, match="patch_diffusers: model must be an nn.Module or a "
                                        "diffusers pipeline, got a str"):
        ditkernels.patch_diffusers("transformer")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("patch_first", [True, False], ids=["patch-then-offload",
                                                           "offload-then-patch"])
def test_model_cpu_offload(device, patch_first):
    """Model CPU offload (accelerate's hooks on the whole transformer) in either order;
    on a CPU-only machine the "accelerator" is the CPU itself, which still runs the
    hooks."""
    pytest.importorskip("accelerate")
    pipe = _tiny_dit_pipeline()
    patched = diffusers.DiTPipeline(transformer=copy.deepcopy(pipe.transformer),
                                    vae=copy.deepcopy(pipe.vae), scheduler=pipe.scheduler)
    pipe.enable_model_cpu_offload(device=device)
    if patch_first:
        ditkernels.patch_diffusers(patched.transformer)
    patched.enable_model_cpu_offload(device=device)
    if not patch_first:
        ditkernels.patch_diffusers(patched.transformer)
    images = pipe(generator=torch.Generator().manual_seed(0), output_type="pt",
                  **DIT_PIPELINE_CALL).images
    with CountDitkernelsOps() as counter:
        ours = patched(generator=torch.Generator().manual_seed(0), output_type="pt",
                       **DIT_PIPELINE_CALL).images
    assert counter.counts["gated_residual_ln_modulate"] > 0
    assert next(patched.transformer.parameters()).device.type == "cpu"  # offloaded again
    torch.testing.assert_close(ours, images, atol=1e-4, rtol=0)


def test_pixart_pipeline():
    pytest.importorskip("transformers")  # diffusers' PixArt pipeline class needs it
    model, _, _, _ = pixart_case(2, 8, 8)
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=_tiny_vae().eval(),
        transformer=randomize_(model).eval(), scheduler=diffusers.DPMSolverMultistepScheduler())
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    _same_images(pipe, prompt=None, prompt_embeds=torch.randn(1, 7, 12, generator=gen),
                 prompt_attention_mask=mask,
                 negative_prompt=None, negative_prompt_embeds=torch.randn(1, 7, 12, generator=gen),
                 negative_prompt_attention_mask=torch.ones_like(mask), num_inference_steps=3,
                 guidance_scale=4.5, height=8, width=8, use_resolution_binning=False)
