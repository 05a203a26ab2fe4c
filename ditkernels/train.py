"""Train DiT, U-ViT or DiffiT on torch.distributed, in the style of DiT's train.py.

    torchrun --nproc_per_node=8 -m ditkernels.train --model DiT-XL/2 \\
        --data-path /data/imagenet/train --image-size 256 --vae-path /weights/sd-vae-ft-ema \\
        --results-dir runs/dit-xl2 --global-batch-size 256 --precision bf16 --compile
    python -m ditkernels.train --model DiT-S/2 --latents latents.npz --results-dir runs/s2

DDP by default, FSDP2 (``fully_shard`` per block, then the root) with ``--fsdp``;
NCCL on GPUs, gloo on the CPU; one process without a launcher. bf16 autocast, an EMA
of the weights, activation checkpointing of every block, torch.compile and gradient
clipping are options.

Everything random in a step (timesteps, noise, label dropout, flips) is drawn for the
whole global batch from one generator that every rank holds in the same state, and
each rank keeps its own slice; with the data order of ``ditkernels.data.DataOrder``
the training is then the same computation whatever the number of processes, up to
the order of floating-point sums in the gradient all-reduce. Checkpoints
(``RESULTS/checkpoints/STEP.pt``) hold the model, EMA and optimizer (full state
dicts), the step, that generator, every rank's torch CPU/CUDA RNG state and the data
order; a run resumed from one continues bit-identically on the CPU.
"""

import argparse
import contextlib
import copy
import functools
import glob
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from . import data as data_lib
from .diffusion import RectifiedFlow, as_denoiser, create_diffusion
from .diffusion.flow import T_SAMPLINGS
from .distributed import (DistContext, all_gather_objects, mean_over_ranks,
                          run_in_process_group)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# eps: Gaussian diffusion, noise prediction (DiT's); flow: rectified flow, velocity.
OBJECTIVES = ("eps", "flow")


# -- models -------------------------------------------------------------------------------

def model_registry() -> Dict[str, Any]:
    """Every named configuration: DiT_models, UViT_models and DiffiT_models together."""
    from .models import DiffiT_models, DiT_models, UViT_models
    return {**DiT_models, **UViT_models, **DiffiT_models}


def _family(name: str) -> str:
    from .models.diffit import DIFFIT_IMAGE_CONFIGS
    if name.startswith("U-ViT"):
        return "uvit"
    return "diffit_unet" if name in DIFFIT_IMAGE_CONFIGS else "latent_transformer"


def model_config(name: str, *, input_size: int, in_channels: int, num_classes: int,
                 class_dropout_prob: float = 0.1, learn_sigma: Optional[bool] = None,
                 overrides: Optional[Dict[str, Any]] = None, objective: str = "eps",
                 t_sampling: str = "uniform") -> Dict[str, Any]:
    """A JSON-able description of a model that ``build_model`` turns into the model.

    num_classes: classes in the data; 0 trains unconditionally (DiT and latent DiffiT
    always take labels, so they get one class). class_dropout_prob > 0 adds the null
    class for classifier-free guidance. learn_sigma: None takes the family's default
    (DiT/latent DiffiT True, U-ViT and the DiffiT U-Net False; U-ViT cannot learn it).
    overrides: further constructor arguments (e.g. a tiny depth for tests).
    objective: "eps" or "flow" (RectifiedFlow with ``t_sampling``; no sigma to learn):
    ``training_process`` and the sampler follow it.
    """
    registry = model_registry()
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(registry)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if objective == "flow":
        if learn_sigma:
            raise ValueError(f"{name}: the flow objective predicts a velocity; it has no "
                             "sigma to learn")
        RectifiedFlow(t_sampling=t_sampling)  # rejects an unknown t_sampling now
        learn_sigma = False
    family = _family(name)
    if family == "latent_transformer":
        num_classes = max(num_classes, 1)  # DiT and latent DiffiT always embed a label
    conditional = num_classes > 0
    null = conditional and class_dropout_prob > 0
    denoiser: Dict[str, Any] = {}
    if family == "latent_transformer":
        learn_sigma = True if learn_sigma is None else learn_sigma
        kwargs = dict(input_size=input_size, in_channels=in_channels,
                      num_classes=num_classes, learn_sigma=learn_sigma,
                      class_dropout_prob=class_dropout_prob if conditional else 0.0)
    elif family == "diffit_unet":
        learn_sigma = False if learn_sigma is None else learn_sigma
        kwargs = dict(img_size=input_size, in_channels=in_channels, num_classes=num_classes,
                      class_dropout_prob=class_dropout_prob if conditional else 0.0,
                      learn_sigma=learn_sigma)
    else:
        if learn_sigma:
            raise ValueError(f"{name}: U-ViT predicts eps only; it cannot learn sigma")
        learn_sigma = False
        # U-ViT counts its null class among its labels (1000 classes + null id 1000).
        kwargs = dict(img_size=input_size, in_chans=in_channels,
                      num_classes=(num_classes + int(null)) if conditional else -1)
        if null:
            denoiser = dict(num_classes=num_classes, null_class=num_classes)
    kwargs.update(overrides or {})
    return {"name": name, "kwargs": kwargs, "learn_sigma": bool(learn_sigma),
            "num_classes": num_classes, "class_dropout_prob": class_dropout_prob if null else 0.0,
            "in_channels": in_channels, "input_size": input_size, "denoiser": denoiser,
            "objective": objective, "t_sampling": t_sampling if objective == "flow" else None}


def objective_of(config: Dict[str, Any]) -> str:
    """The training objective of ``config`` (configs from before flow matching: eps)."""
    return config.get("objective", "eps")


def training_process(config: Dict[str, Any]):
    """The full diffusion (eps) or the rectified flow (flow) that ``config`` trains with."""
    if objective_of(config) == "flow":
        return RectifiedFlow(t_sampling=config["t_sampling"])
    return create_diffusion("", learn_sigma=config["learn_sigma"])


def build_model(config: Dict[str, Any]) -> nn.Module:
    from .models import DIT_CONFIGS, DiT
    name, kwargs = config["name"], config["kwargs"]
    if name in DIT_CONFIGS:  # DiT's constructors fix the size; U-ViT's and DiffiT's merge
        return DiT(**{**DIT_CONFIGS[name], **kwargs})
    return model_registry()[name](**kwargs)


def denoiser_for(model: nn.Module, config: Dict[str, Any], forward=None):
    """The sampler/loss adapter of a model built from ``config`` (U-ViT's null class).

    forward: what to call instead of the model itself (its DDP or compiled wrapper),
    whose attributes do not describe the model.
    """
    return as_denoiser(model, forward=forward, **config["denoiser"])


def block_types() -> Tuple[type, ...]:
    """The repeated blocks: the units of activation checkpointing and FSDP sharding."""
    from .models.diffit import DiffiTBlock, DiffiTResBlock
    from .models.uvit import Block as UViTBlock
    from .nn.dit import DiTBlock
    return (DiTBlock, UViTBlock, DiffiTBlock, DiffiTResBlock)


def block_names(model: nn.Module) -> List[str]:
    """The outermost blocks (DiffiT's ResBlock holds a DiffiTBlock: only the ResBlock)."""
    types, names = block_types(), []
    for n, m in model.named_modules():
        if isinstance(m, types) and not any(n.startswith(p + ".") for p in names):
            names.append(n)
    return names


def disable_model_label_dropout(model: nn.Module) -> None:
    """Let the trainer, not the model, drop labels to the null class.

    DiT and DiffiT drop labels inside their LabelEmbedder with the global RNG, which
    depends on how the batch is split over ranks. The trainer draws the drop mask for
    the global batch instead and passes the null class itself; this hook makes the
    embedder a plain lookup (its ``train`` argument False).
    """
    from .nn.dit import LabelEmbedder
    for module in model.modules():
        if isinstance(module, LabelEmbedder):
            module.register_forward_pre_hook(
                lambda _, args: (args[0], False, *args[2:]) if len(args) > 1 else None)


def apply_activation_checkpointing(model: nn.Module, names: List[str]) -> None:
    """Recompute each block in the backward pass. torch's CheckpointWrapper keeps the
    state_dict keys unchanged, so checkpoints load into unwrapped models."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing as apply_ac, checkpoint_wrapper)
    targets = {id(model.get_submodule(n)) for n in names}
    apply_ac(model, checkpoint_wrapper_fn=functools.partial(
        checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in targets)


def shard_model(model: nn.Module, names: List[str]) -> None:
    """FSDP2: every block a unit of its own, the remaining parameters in the root."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for n in names:
        fully_shard(model.get_submodule(n))
    fully_shard(model)


def _local(p: Tensor) -> Tensor:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return p.to_local() if isinstance(p, DTensor) else p


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over every parameter (DiT's update);
    with FSDP each rank updates its own shards."""
    ema_params = [_local(p) for p in ema.parameters()]
    params = [_local(p).to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def lr_at(step: int, total: int, base_lr: float, warmup: int, schedule: str,
          final_fraction: float) -> float:
    """Linear warmup over ``warmup`` steps, then constant or a cosine decay to
    final_fraction * base_lr at ``total``: a function of the step alone, so resumed
    runs follow it unchanged."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (final_fraction + (1 - final_fraction) * cosine)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """With warmup, min(decay, (1 + step) / (10 + step)): early averages are not
    dominated by the initial weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


# -- checkpoints ------------------------------------------------------------------------------

def _rng_state(device: torch.device) -> Dict[str, Optional[Tensor]]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def checkpoint_path(results_dir: str, step: int) -> str:
    return os.path.join(results_dir, "checkpoints", f"{step:07d}.pt")


def latest_checkpoint(results_dir: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(results_dir, "checkpoints", "*.pt")))
    return found[-1] if found else None


def save_checkpoint(path: str, *, model: nn.Module, ema: nn.Module,
                    opt: torch.optim.Optimizer, step: int, generator: torch.Generator,
                    order: data_lib.DataOrder, config: Dict[str, Any], args: Dict[str, Any],
                    ctx: DistContext) -> None:
    """Gather full state dicts (a collective: every rank calls it); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "model": get_model_state_dict(model, options=opts),
        "ema": get_model_state_dict(ema, options=opts),
        "opt": get_optimizer_state_dict(model, opt, options=opts),
        "rng": all_gather_objects(_rng_state(ctx.device)),
    }
    if ctx.is_main:
        state.update(step=step, generator=generator.get_state(), data_order=order.state(step),
                     config=config, args=args, world_size=ctx.world_size)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(path: str, *, model: nn.Module, ema: nn.Module,
                    opt: torch.optim.Optimizer, generator: torch.Generator,
                    order: data_lib.DataOrder, config: Dict[str, Any],
                    ctx: DistContext) -> Tuple[int, Optional[Dict[str, Any]], Optional[str]]:
    """Restore what save_checkpoint wrote; returns (step, this rank's torch RNG state for
    ``restore_rng`` or None, warning or None)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["config"] != config:
        raise ValueError(f"checkpoint {path} is of a different model:\n  checkpoint: "
                         f"{ckpt['config']}\n  this run:   {config}")
    step = int(ckpt["step"])
    order.check_state(ckpt["data_order"], step)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    set_model_state_dict(ema, ckpt["ema"], options=opts)
    set_optimizer_state_dict(model, opt, ckpt["opt"], options=opts)
    generator.set_state(ckpt["generator"])
    if ckpt["world_size"] != ctx.world_size:
        return step, None, (f"checkpoint written by {ckpt['world_size']} processes, resumed by "
                            f"{ctx.world_size}: the per-rank torch RNG states are not restored")
    return step, ckpt["rng"][ctx.rank], None


def restore_rng(rng: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


# -- training ---------------------------------------------------------------------------------

class Logger:
    """Rank 0 prints and appends to RESULTS/log.txt; other ranks stay quiet."""

    def __init__(self, results_dir: str, enabled: bool):
        self.path = os.path.join(results_dir, "log.txt") if enabled else None

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def load_dataset(args) -> Tuple[torch.utils.data.Dataset, bool]:
    """(dataset, is_images)."""
    if (args.data_path is None) == (args.latents is None):
        raise ValueError("pass exactly one of --data-path (an image folder) and --latents "
                         "(an .npz or .safetensors of pre-extracted latents)")
    if args.latents is not None:
        return data_lib.LatentDataset(args.latents), False
    if args.image_size is None:
        raise ValueError("--data-path needs --image-size")
    return data_lib.ImageFolderDataset(args.data_path, args.image_size), True


def data_shape(args, dataset, is_images: bool, vae) -> Tuple[int, int]:
    """(channels, size) of what the model sees."""
    if not is_images:
        return dataset.latents.shape[1], dataset.latents.shape[-1]
    if vae is None:
        return 3, args.image_size
    cfg = vae.model.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    return cfg.latent_channels, args.image_size // factor


def train(args, ctx: DistContext) -> None:
    os.makedirs(args.results_dir, exist_ok=True)
    log = Logger(args.results_dir, ctx.is_main)
    dtype = DTYPES[args.dtype]
    if args.precision == "bf16" and dtype != torch.float32:
        raise ValueError("--precision bf16 autocasts float32 parameters; use --dtype float32")
    dataset, is_images = load_dataset(args)
    vae = data_lib.VAE(args.vae_path, ctx.device) if args.vae_path else None
    if vae is not None and not is_images:
        raise ValueError("--vae-path encodes images: it goes with --data-path, not --latents")
    channels, size = data_shape(args, dataset, is_images, vae)
    num_classes = dataset.num_classes if args.num_classes is None else args.num_classes
    overrides = json.loads(args.model_kwargs) if args.model_kwargs else None
    config = model_config(args.model, input_size=size, in_channels=channels,
                          num_classes=num_classes, class_dropout_prob=args.class_dropout_prob,
                          learn_sigma=False if args.no_learn_sigma else None,
                          overrides=overrides, objective=args.objective,
                          t_sampling=args.t_sampling)

    # The same seed on every rank: identical initial weights (FSDP2 shards them as they are).
    torch.manual_seed(args.seed)
    model = build_model(config).to(device=ctx.device, dtype=dtype)
    disable_model_label_dropout(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    names = block_names(model)
    if args.grad_checkpointing:
        apply_activation_checkpointing(model, names)
    if args.fsdp:
        shard_model(model, names)
        shard_model(ema, names)
        train_model: nn.Module = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                          else None)
    if args.compile:
        train_model = torch.compile(train_model)
    denoiser = denoiser_for(model, config, forward=train_model)
    process = training_process(config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)

    global_batch = args.global_batch_size
    local = data_lib.rank_slice(global_batch, ctx.rank, ctx.world_size)
    order = data_lib.DataOrder(len(dataset), global_batch, args.seed)
    max_steps = (args.max_steps if args.max_steps is not None
                 else args.epochs * order.steps_per_epoch)
    generator = torch.Generator(ctx.device).manual_seed(args.seed)
    start_step, rng = 0, None
    resume = latest_checkpoint(args.results_dir) if args.resume == "auto" else args.resume
    if resume:
        start_step, rng, warning = load_checkpoint(
            resume, model=model, ema=ema, opt=opt, generator=generator, order=order,
            config=config, ctx=ctx)
        log(f"resumed from {resume} at step {start_step}" + (f" ({warning})" if warning else ""))
    if ctx.is_main:
        with open(os.path.join(args.results_dir, "config.json"), "w") as f:
            json.dump({"model": config, "args": vars(args)}, f, indent=2)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.model}: {n_params:,} parameters; {len(dataset):,} samples, "
        f"{order.steps_per_epoch} steps/epoch; world size {ctx.world_size} "
        f"({'FSDP2' if args.fsdp else 'DDP'}, {ctx.device.type}); steps {start_step}..{max_steps}")

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=data_lib.RankBatchSampler(order, ctx.rank, ctx.world_size,
                                                         start_step, max_steps),
        num_workers=args.num_workers, collate_fn=data_lib.collate,
        pin_memory=ctx.device.type == "cuda")
    conditional = config["num_classes"] > 0
    if conditional and dataset.num_classes > config["num_classes"]:
        raise ValueError(f"the data has {dataset.num_classes} classes but the model "
                         f"{config['num_classes']} (--num-classes {args.num_classes})")
    null_class = config["num_classes"] if config["class_dropout_prob"] > 0 else None
    autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16)
                if args.precision == "bf16" else contextlib.nullcontext())
    sample_shape = (global_batch, channels, size, size)

    # Starting the loader draws its base seed from the global RNG: restore the
    # checkpoint's state after that draw, as the uninterrupted run made it before.
    batches = iter(loader)
    if rng is not None:
        restore_rng(rng, ctx.device)
    train_model.train()
    running_loss, running_steps, tic = 0.0, 0, time.perf_counter()
    for step, (x, y) in enumerate(batches, start=start_step):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        # Drawn for the global batch, in a fixed order, whatever is used: the stream
        # stays the same for every world size and option.
        if isinstance(process, RectifiedFlow):
            t = process.sample_t(global_batch, generator, ctx.device)[local]
        else:
            t = torch.randint(0, process.num_timesteps, (global_batch,), generator=generator,
                              device=ctx.device)[local]
        noise = torch.randn(sample_shape, generator=generator, device=ctx.device,
                            dtype=dtype)[local]
        drop = (torch.rand(global_batch, generator=generator, device=ctx.device)
                < config["class_dropout_prob"])[local]
        flip = (torch.rand(global_batch, generator=generator, device=ctx.device) < 0.5)[local]
        if is_images:
            x = data_lib.uint8_to_pixels(x)
            if args.random_flip:
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if vae is not None:
                x = vae.encode(x)
        x = x.to(dtype)
        if not conditional:
            y = None
        elif null_class is not None:
            y = torch.where(drop, null_class, y)
        with autocast:
            loss = process.training_losses(denoiser, x, t, y, noise=noise)["loss"].mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max_steps, args.lr, args.warmup_steps, args.lr_schedule,
                                args.final_lr_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        update_ema(ema, model, ema_decay_at(step, args.ema_decay, args.ema_warmup))

        running_loss += loss.detach()  # no host sync per step; read at log time
        running_steps += 1
        done = step + 1
        if done % args.log_every == 0 or done == max_steps:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            elapsed = time.perf_counter() - tic
            avg = mean_over_ranks(float(running_loss) / running_steps, ctx.device)
            log(f"step {done:07d}  loss {avg:.4f}  lr {opt.param_groups[0]['lr']:.3g}  "
                f"{running_steps / elapsed:.2f} steps/s  "
                f"{running_steps * global_batch / elapsed:.1f} samples/s")
            running_loss, running_steps, tic = 0.0, 0, time.perf_counter()
        if done % args.ckpt_every == 0 or done == max_steps:
            path = checkpoint_path(args.results_dir, done)
            save_checkpoint(path, model=model, ema=ema, opt=opt, step=done, generator=generator,
                            order=order, config=config, args=vars(args), ctx=ctx)
            log(f"saved {path}")
    log("done")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ditkernels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-path", help="image folder (one subfolder per class, or flat)")
    data.add_argument("--latents", help=".npz/.safetensors with latents [N,C,H,W] and labels [N]")
    data.add_argument("--image-size", type=int, help="crop size of --data-path images")
    data.add_argument("--vae-path", help="local diffusers AutoencoderKL folder: train on its "
                                         "latents of the images")
    data.add_argument("--num-classes", type=int,
                      help="classes (default: from the data); 0 trains unconditionally")
    data.add_argument("--random-flip", action="store_true", help="horizontal flips of images")
    data.add_argument("--num-workers", type=int, default=0)
    model = p.add_argument_group("model")
    model.add_argument("--model", default="DiT-S/2", help="a name of DiT_models, UViT_models "
                                                          "or DiffiT_models")
    model.add_argument("--model-kwargs", help="JSON of constructor overrides, e.g. "
                                              "'{\"depth\": 2}'")
    model.add_argument("--class-dropout-prob", type=float, default=0.1)
    model.add_argument("--no-learn-sigma", action="store_true")
    model.add_argument("--objective", choices=OBJECTIVES, default="eps",
                       help="eps: Gaussian diffusion, noise prediction; flow: rectified flow, "
                            "velocity prediction (no learned sigma)")
    model.add_argument("--t-sampling", choices=T_SAMPLINGS, default="uniform",
                       help="flow: how training draws t in (0, 1)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--global-batch-size", type=int, default=256)
    opt.add_argument("--lr", type=float, default=1e-4)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm (0: off)")
    opt.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup")
    opt.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    opt.add_argument("--final-lr-fraction", type=float, default=0.1,
                     help="cosine: the last step's lr as a fraction of --lr")
    opt.add_argument("--ema-decay", type=float, default=0.9999)
    opt.add_argument("--ema-warmup", action="store_true",
                     help="decay min(ema_decay, (1 + step) / (10 + step))")
    opt.add_argument("--max-steps", type=int)
    opt.add_argument("--epochs", type=int, default=1400, help="used without --max-steps")
    opt.add_argument("--seed", type=int, default=0)
    system = p.add_argument_group("system")
    system.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    system.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    system.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast the forward pass")
    system.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="parameter dtype (float64 for reference runs)")
    system.add_argument("--grad-checkpointing", action="store_true")
    system.add_argument("--compile", action="store_true")
    system.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls and convolutions on GPUs (DiT's default)")
    run = p.add_argument_group("run")
    run.add_argument("--results-dir", required=True)
    run.add_argument("--resume", help="a checkpoint path, or 'auto' for the latest in "
                                      "RESULTS/checkpoints (none: start fresh)")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--ckpt-every", type=int, default=50_000)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    run_in_process_group(train, args, args.device)


if __name__ == "__main__":
    main()
    from .distributed import exit_process

    exit_process(0)
