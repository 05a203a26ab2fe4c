"""diffusers' own models, patched by ditkernels.patch_diffusers: the DiT-XL/2 (256x256)
and PixArt-alpha XL/2 (512x512) transformer forwards, and a PixArt-alpha pipeline call
of PIPELINE_STEPS denoising steps (classifier-free guidance, transformer, scheduler;
prompt embeddings given, latents out, so T5 and the VAE, which the patch does not
touch, are left out).

Four implementations per case, timed interleaved: diffusers eager (the baseline),
diffusers under torch.compile, patched, and patched under torch.compile (the
transformer compiled with fullgraph=True; the pipeline's loop stays Python). Random
weights; the configs are those of facebook/DiT-XL-2-256 and
PixArt-alpha/PixArt-XL-2-512x512, written here, nothing is downloaded. The models run
in the benchmark dtype (diffusers' torch_dtype), with no autocast. Quick runs (the CPU
default) keep the width, heads and head dim 72 but cut the depth and the latent size.
Needs diffusers; without it the family returns one row saying so.
"""

import copy
import functools
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from benchmarks.common import (BenchContext, Timing, compare, maybe_compile, speedups,
                               timing_columns)

DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                    out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                    num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                    norm_elementwise_affine=False, norm_eps=1e-5,
                    activation_fn="gelu-approximate", attention_bias=True)
PIXART_ALPHA_XL_2_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                             out_channels=8, num_layers=28, sample_size=64, patch_size=2,
                             cross_attention_dim=1152, caption_channels=4096,
                             num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                             norm_elementwise_affine=False, norm_eps=1e-6,
                             activation_fn="gelu-approximate", attention_bias=True)
TEXT_TOKENS = 120  # PixArt-alpha's T5 sequence length
# PixArtAlphaPipeline treats a 1-step call as a distilled (DMD) model's, reading the
# scheduler's denoised output, which DPMSolverMultistepScheduler does not give.
PIPELINE_STEPS = 2
QUICK = dict(num_layers=2, sample_size=16)
BATCHES = (1, 8)  # quick runs: the first

COLUMNS = ["op", "shape", "impl", "min_ms", "median_ms", "max_ms", "images_per_s",
           "speedup_vs_eager", "timer", "note"]


def _config(base: Dict, ctx: BenchContext) -> Dict:
    return {**base, **QUICK} if ctx.quick else dict(base)


def _shape(config: Dict, batch: int) -> str:
    latent, patch = config["sample_size"], config["patch_size"]
    return (f"B={batch} 4x{latent}x{latent} N={(latent // patch) ** 2} "
            f"L={config['num_layers']} D={config['num_attention_heads'] * 72}")


def _transformer_case(ctx: BenchContext, family: str, batch: int):
    """(model, input names, inputs, op label, shape label)."""
    import diffusers

    gen = torch.Generator().manual_seed(0)
    if family == "dit":
        config = _config(DIT_XL_2_256, ctx)
        model = diffusers.DiTTransformer2DModel(**config)
        latent = config["sample_size"]
        inputs = [torch.randn(batch, 4, latent, latent, generator=gen),
                  torch.randint(0, 1000, (batch,), generator=gen),
                  torch.randint(0, 1000, (batch,), generator=gen)]
        names = ["hidden_states", "timestep", "class_labels"]
        op = "DiT-XL/2 transformer"
    else:
        config = _config(PIXART_ALPHA_XL_2_512, ctx)
        model = diffusers.PixArtTransformer2DModel(**config)
        latent = config["sample_size"]
        mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
        mask[:, TEXT_TOKENS // 3:] = 0  # a short prompt, padded
        inputs = [torch.randn(batch, 4, latent, latent, generator=gen),
                  torch.randn(batch, TEXT_TOKENS, 4096, generator=gen),
                  torch.randint(0, 1000, (batch,), generator=gen), mask]
        names = ["hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask"]
        op = "PixArt-alpha transformer"
    inputs = [v.to(ctx.device, ctx.dtype if v.is_floating_point() else v.dtype) for v in inputs]
    return model.to(ctx.device, ctx.dtype).eval(), names, inputs, op, _shape(config, batch)


def _no_grad(fn: Callable) -> Callable[[], Callable[[], None]]:
    def make():
        def call():
            with torch.no_grad():
                fn()
        return call
    return make


def _implementations(model: nn.Module, build: Callable[[nn.Module], Callable],
                     ctx: BenchContext) -> Dict[str, Callable]:
    """{impl: maker for compare()}: build(transformer) -> the zero-argument call."""
    import ditkernels

    patched = copy.deepcopy(model)
    ditkernels.patch_diffusers(patched)
    makers = {}
    for impl, module, compiled in (("eager", model, False), ("compile", model, True),
                                   ("ditkernels", patched, False),
                                   ("ditkernels+compile", patched, True)):
        transformer = maybe_compile(module, ctx) if compiled else module
        if transformer is not None:
            makers[impl] = _no_grad(build(transformer))
    return makers


def _rows(makers: Dict[str, Callable], ctx: BenchContext, labels: Dict[str, str],
          images: int) -> List[Dict]:
    torch._dynamo.reset()
    times = compare(makers, ctx)
    rows = []
    for impl, result in times.items():
        row = {**labels, "impl": impl, **timing_columns(result),
               **speedups(times, impl, {"speedup_vs_eager": "eager"})}
        if isinstance(result, Timing):
            row["images_per_s"] = images / result.median
        rows.append(row)
    return rows


def _pipeline_step(ctx: BenchContext, batch: int) -> List[Dict]:
    import diffusers

    model, _, _, _, shape = _transformer_case(ctx, "pixart", batch)
    # Only its config is read (the latent scale factor): output_type="latent".
    vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(batch, TEXT_TOKENS, 4096, generator=gen).to(ctx.device, ctx.dtype)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long, device=ctx.device)
    mask[:, TEXT_TOKENS // 3:] = 0
    size = model.config.sample_size * 8

    def build(transformer):
        pipe = diffusers.PixArtAlphaPipeline(
            tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
            scheduler=diffusers.DPMSolverMultistepScheduler())
        pipe.set_progress_bar_config(disable=True)
        return functools.partial(
            pipe, prompt=None, negative_prompt=None, prompt_embeds=embeds,
            prompt_attention_mask=mask, negative_prompt_embeds=torch.zeros_like(embeds),
            negative_prompt_attention_mask=mask, num_inference_steps=PIPELINE_STEPS,
            guidance_scale=4.5, height=size, width=size, use_resolution_binning=False,
            output_type="latent", generator=torch.Generator(ctx.device).manual_seed(0))

    labels = dict(family="diffusers", op=f"PixArt-alpha pipeline, {PIPELINE_STEPS} steps (cfg)",
                  shape=shape)
    return _rows(_implementations(model, build, ctx), ctx, labels, batch)


def run(ctx: BenchContext) -> List[Dict]:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return [dict(family="diffusers", op="-", note="diffusers is not installed")]
    rows = []
    for batch in BATCHES[:1] if ctx.quick else BATCHES:
        for family in ("dit", "pixart"):
            model, names, inputs, op, shape = _transformer_case(ctx, family, batch)

            def build(transformer, kwargs=dict(zip(names, inputs))):
                return functools.partial(transformer, **kwargs, return_dict=False)

            labels = dict(family="diffusers", op=op, shape=shape)
            rows += _rows(_implementations(model, build, ctx), ctx, labels, batch)
        rows += _pipeline_step(ctx, batch)
    return rows
