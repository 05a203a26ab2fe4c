"""Sample a trained model on any number of processes into an ADM-compatible npz.

    torchrun --nproc_per_node=8 -m ditkernels.sample --ckpt runs/dit/checkpoints/0400000.pt \\
        --num-samples 50000 --sampler ddpm --steps 250 --cfg-scale 1.5 \\
        --vae-path /weights/sd-vae-ft-ema --out samples.npz

Every sampler of ``ditkernels.diffusion``: DDPM, DDIM and DPM-Solver(++) for eps
(diffusion) checkpoints, Euler and Heun for flow-matching ones (the checkpoint's
objective decides which apply). The output holds ``arr_0``, uint8 [N, H, W, 3] (what
ADM's evaluator reads; 1-channel images are repeated over the 3 channels), and
``arr_1``, the int64 labels, for a class-conditional model: random, or with
``--labels balanced`` sample i of class i mod num_classes. Work is cut into chunks
of ``--batch-size`` consecutive sample indices; process r of W takes chunks r, r + W,
... and writes each to OUT.shards/chunk_K.npz as it finishes. Sample i's starting
noise and label come from a generator seeded by (seed, i), the sampler's step noise
from one seeded by (seed, chunk), so the samples do not depend on the number of
processes, and a rerun (any number of processes) skips the chunks already written.
When every chunk is there, rank 0 checks that each index 0..N-1 occurs exactly once
and streams the chunks into OUT.
"""

import argparse
import contextlib
import functools
import json
import os
import shutil
import time
import zipfile
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from . import data as data_lib
from .diffusion import (create_diffusion, ddim_sample, ddpm_sample, dpm_solver_sample,
                        flow_sample)
from .diffusion.dpm_solver import ALGORITHMS, METHODS, SKIP_TYPES
from .distributed import DistContext, run_in_process_group
from .train import (DTYPES, OBJECTIVES, build_model, denoiser_for, model_config, objective_of,
                    training_process)

# The samplers of each training objective.
SAMPLERS = {"eps": ("ddpm", "ddim", "dpm++"), "flow": ("euler", "heun")}
LABELS = ("random", "balanced")


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence hash)."""
    words = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 ^ int(words[1])


# Keys that separate the per-sample streams from the per-chunk ones.
_SAMPLE_STREAM, _CHUNK_STREAM = 0, 1


def initial_noise_and_labels(indices: range, shape, num_classes: int, seed: int,
                             labels_mode: str = "random"):
    """x_T [n, *shape] (float32, CPU) and labels [n] (or None) of the given samples.

    labels_mode: "random" (drawn per sample) or "balanced" (sample i gets i mod
    num_classes, so every class has N / num_classes samples, +-1).
    """
    noise, labels = [], []
    for i in indices:
        g = torch.Generator().manual_seed(derived_seed(seed, _SAMPLE_STREAM, i))
        noise.append(torch.randn(tuple(shape), generator=g))
        if num_classes > 0:
            labels.append(torch.randint(num_classes, (1,), generator=g)
                          if labels_mode == "random" else torch.tensor([i % num_classes]))
    return torch.stack(noise), (torch.cat(labels) if labels else None)


def chunk_path(shard_dir: str, k: int) -> str:
    return os.path.join(shard_dir, f"chunk_{k:06d}.npz")


def _save_npz_atomic(path: str, **arrays) -> None:
    tmp = path[:-len(".npz")] + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def merge_chunks(shard_dir: str, num_chunks: int, num_samples: int, out: str,
                 conditional: bool) -> None:
    """Stream every chunk into ``out`` (arr_0 and, when conditional, arr_1), one chunk in
    memory at a time, after checking that the indices are exactly 0..N-1 in order."""
    with np.load(chunk_path(shard_dir, 0)) as first:
        image_shape = first["samples"].shape[1:]
    tmp = out[:-len(".npz")] + ".tmp.npz"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        names = ["arr_0"] + (["arr_1"] if conditional else [])
        for name in names:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                shape = (num_samples, *image_shape) if name == "arr_0" else (num_samples,)
                descr = "|u1" if name == "arr_0" else np.dtype(np.int64).str
                np.lib.format.write_array_header_1_0(
                    f, {"descr": descr, "fortran_order": False, "shape": shape})
                expected = 0
                for k in range(num_chunks):
                    with np.load(chunk_path(shard_dir, k)) as chunk:
                        idx = chunk["indices"]
                        if not np.array_equal(idx, np.arange(expected, expected + len(idx))):
                            raise RuntimeError(f"{chunk_path(shard_dir, k)} holds indices "
                                               f"{idx[:3]}..., expected from {expected}")
                        expected += len(idx)
                        key = "samples" if name == "arr_0" else "labels"
                        f.write(np.ascontiguousarray(chunk[key]).tobytes())
                if expected != num_samples:
                    raise RuntimeError(f"the chunks hold {expected} samples, expected "
                                       f"{num_samples}")
    os.replace(tmp, out)


def load_model(args, device: torch.device):
    """(model, config) from a training checkpoint (its config, EMA weights by default) or
    from a plain state_dict described by --model and its shape arguments."""
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "config" in ckpt:
        config = ckpt["config"]
        state = ckpt[args.weights]
    else:
        if args.model is None or args.input_size is None:
            raise ValueError(f"{args.ckpt} is not a ditkernels.train checkpoint: describe the "
                             "model with --model, --input-size, --in-channels and "
                             "--num-classes")
        config = model_config(args.model, input_size=args.input_size,
                              in_channels=args.in_channels, num_classes=args.num_classes,
                              class_dropout_prob=args.class_dropout_prob,
                              overrides=json.loads(args.model_kwargs) if args.model_kwargs
                              else None, objective=args.objective)
        state = ckpt
    model = build_model(config)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval(), config


def sample_settings(args, num_chunks: int) -> Dict[str, Any]:
    """What determines the samples: a rerun must match it to reuse the chunks."""
    keys = ("ckpt", "weights", "num_samples", "batch_size", "sampler", "steps", "eta",
            "order", "method", "algorithm", "skip_type", "labels", "cfg_scale", "cfg_channels",
            "clip_denoised", "seed", "vae_path", "precision", "dtype", "tf32")
    return {**{k: getattr(args, k) for k in keys}, "num_chunks": num_chunks}


def check_or_write_settings(shard_dir: str, settings: Dict[str, Any], ctx: DistContext) -> None:
    path = os.path.join(shard_dir, "settings.json")
    if ctx.is_main:
        os.makedirs(shard_dir, exist_ok=True)
        if not os.path.exists(path):
            with open(path, "w") as f:
                json.dump(settings, f, indent=2)
    dist.barrier()
    with open(path) as f:
        previous = json.load(f)
    if previous != settings:
        diff = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        raise ValueError(f"{shard_dir} holds chunks sampled with other settings (theirs, "
                         f"these): {diff}; remove it or pass another --out")


def make_sampler(args, config: Dict[str, Any]):
    """sampler(denoiser, **common) -> samples, for --sampler and --steps on a model of
    ``config``: DDPM/DDIM respaced by --steps ('250', 'ddim50'), DPM-Solver(++) and the
    flow ODE solvers in int(--steps) steps."""
    objective = objective_of(config)
    name = args.sampler or SAMPLERS[objective][0]
    if name not in SAMPLERS[objective]:
        raise ValueError(f"--sampler {name} does not apply to a model trained with the "
                         f"{objective!r} objective; choose one of {list(SAMPLERS[objective])}")
    if name in ("ddpm", "ddim"):
        diffusion = create_diffusion(args.steps, learn_sigma=config["learn_sigma"])
        if name == "ddpm":
            return functools.partial(ddpm_sample, diffusion)
        return functools.partial(ddim_sample, diffusion, eta=args.eta)
    try:
        steps = int(args.steps)
    except ValueError:
        raise ValueError(f"--sampler {name} takes a number of --steps, got "
                         f"{args.steps!r}") from None
    if name == "dpm++":
        return functools.partial(dpm_solver_sample, training_process(config), steps=steps,
                                 order=args.order, method=args.method,
                                 algorithm=args.algorithm, skip_type=args.skip_type)

    def flow(denoiser, *, clip_denoised, **common):
        # The ODE has no x_0 prediction to clip; the uint8 conversion clamps the output.
        return flow_sample(denoiser, steps=steps, method=name,
                           time_scale=training_process(config).time_scale, **common)
    return flow


def to_adm_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] samples [B, C, H, W] -> uint8 [B, H, W, C], a single channel repeated to 3."""
    images = data_lib.pixels_to_uint8(x)
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    return images.cpu().numpy()


def sample(args, ctx: DistContext) -> None:
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out must end in .npz, got {args.out!r}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    shard_dir = args.out[:-len(".npz")] + ".shards"
    num_chunks = -(-args.num_samples // args.batch_size)
    check_or_write_settings(shard_dir, sample_settings(args, num_chunks), ctx)

    model, config = load_model(args, ctx.device)
    vae = data_lib.VAE(args.vae_path, ctx.device) if args.vae_path else None
    denoiser = denoiser_for(model, config)
    conditional = denoiser.class_conditional
    sampler = make_sampler(args, config)
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16)
                if args.precision == "bf16" else contextlib.nullcontext())

    mine: List[int] = [k for k in range(ctx.rank, num_chunks, ctx.world_size)
                       if not os.path.exists(chunk_path(shard_dir, k))]
    tic = time.perf_counter()
    for done, k in enumerate(mine, start=1):
        indices = range(k * args.batch_size, min((k + 1) * args.batch_size, args.num_samples))
        noise, labels = initial_noise_and_labels(indices, shape, denoiser.num_classes,
                                                 args.seed, args.labels)
        y = labels.to(ctx.device) if conditional else None
        with autocast:
            x = sampler(denoiser, y=y, cfg_scale=args.cfg_scale,
                        cfg_channels=args.cfg_channels, clip_denoised=args.clip_denoised,
                        noise=noise.to(ctx.device, DTYPES[args.dtype]),
                        seed=derived_seed(args.seed, _CHUNK_STREAM, k), progress=False,
                        dtype=DTYPES[args.dtype])
        if vae is not None:
            x = vae.decode(x.float())
        images = to_adm_uint8(x)
        _save_npz_atomic(chunk_path(shard_dir, k), samples=images,
                         labels=(labels.numpy() if labels is not None
                                 else np.zeros(len(indices), np.int64)),
                         indices=np.arange(indices.start, indices.stop))
        if ctx.is_main:
            rate = done * len(indices) / (time.perf_counter() - tic)
            print(f"rank 0: chunk {done}/{len(mine)}, {rate:.2f} samples/s per process",
                  flush=True)
    dist.barrier()
    if ctx.is_main:
        merge_chunks(shard_dir, num_chunks, args.num_samples, args.out, conditional)
        if not args.keep_shards:
            shutil.rmtree(shard_dir)
        print(f"wrote {args.out}: {args.num_samples} samples", flush=True)
    dist.barrier()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ditkernels.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a ditkernels.train checkpoint, or a "
                                                 "state_dict with --model etc.")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=32, help="samples per chunk per call")
    p.add_argument("--sampler", choices=[s for names in SAMPLERS.values() for s in names],
                   help="ddpm (default), ddim or dpm++ for eps models; euler (default) or heun "
                        "for flow models")
    p.add_argument("--steps", default="250", help="ddpm/ddim respacing: '250', 'ddim50', ...; "
                                                  "a number of steps for the others")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    p.add_argument("--order", type=int, default=2, help="dpm++: solver order 1-3")
    p.add_argument("--method", choices=METHODS, default="multistep", help="dpm++")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="dpmsolver++",
                   help="dpm++: data (dpmsolver++) or noise (dpmsolver) prediction")
    p.add_argument("--skip-type", choices=SKIP_TYPES, default="logSNR",
                   help="dpm++: where the steps lie")
    p.add_argument("--labels", choices=LABELS, default="random",
                   help="random labels, or balanced: sample i gets class i mod num_classes")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-channels", type=int, help="guide only the first k eps channels "
                                                    "(DiT: 3)")
    p.add_argument("--clip-denoised", action="store_true", help="clamp x_0 to [-1, 1] "
                                                                "(pixel models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-path", help="local diffusers AutoencoderKL folder to decode latents")
    p.add_argument("--keep-shards", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                    help="TF32 matmuls and convolutions on GPUs (DiT's default)")
    plain = p.add_argument_group("a plain state_dict (not a training checkpoint)")
    plain.add_argument("--model")
    plain.add_argument("--model-kwargs")
    plain.add_argument("--input-size", type=int)
    plain.add_argument("--in-channels", type=int, default=4)
    plain.add_argument("--num-classes", type=int, default=1000)
    plain.add_argument("--class-dropout-prob", type=float, default=0.1)
    plain.add_argument("--objective", choices=OBJECTIVES, default="eps")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    run_in_process_group(sample, args, args.device)


if __name__ == "__main__":
    main()
    from .distributed import exit_process

    exit_process(0)
