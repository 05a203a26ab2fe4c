"""Calibration: per-timestep activation ranges of every quantized layer, recorded while
the floating-point model runs the real sampler.

A ``sampler`` is any callable that runs the model, ``sampler(model)``: typically a
ditkernels.diffusion sampler with everything but the model bound, e.g.

    sampler = ddim_sampler(50, (8, 4, 32, 32), y=labels, cfg_scale=4.0, cfg_channels=3,
                           seed=0)
    calibration = calibrate(model, sampler, config)

or a function making direct forward calls at chosen timesteps.

Ranges are keyed by the model's original timestep (0..999 after respacing), read per
sample from the model's forward, so batches that mix timesteps (or repeat them under
classifier-free guidance) record each sample at its own step. Calibration keys are the
names the Int8Linear modules will have: a Linear's qualified name, and
``<block>.skip_linear.x_proj`` / ``<block>.skip_linear.skip_proj`` for the two halves of
a U-ViT long-skip merge.
"""

import dataclasses
import functools
import math
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..diffusion import as_denoiser, create_diffusion, ddim_sample
from ..models.uvit import Block as UViTBlock
from .config import TimestepCalibratedInt8Config
from .context import TimestepContext, attach_timestep_context

Sampler = Callable[[nn.Module], object]


def ddim_sampler(steps: int, shape: Sequence[int], *, y: Optional[Tensor] = None,
                 cfg_scale: float = 1.0, cfg_channels: Optional[int] = None, seed: int = 0,
                 diffusion_config: Optional[Dict] = None, **sample_kwargs) -> Sampler:
    """sampler(model): ddim_sample over create_diffusion(f"ddim{steps}",
    **diffusion_config) from seeded noise of ``shape`` with labels y (classifier-free
    guidance batches [cond; uncond] when cfg_scale != 1). sample_kwargs go to
    ddim_sample (eta, clip_denoised, ...)."""
    diffusion = create_diffusion(f"ddim{steps}", **(diffusion_config or {}))

    def sampler(model: nn.Module) -> Tensor:
        return ddim_sample(diffusion, as_denoiser(model), tuple(shape), y=y,
                           cfg_scale=cfg_scale, cfg_channels=cfg_channels, seed=seed,
                           progress=False, **sample_kwargs)

    return sampler


@dataclasses.dataclass
class TimestepCalibration:
    """What calibrate() measured.

    ranges: key -> fp32 [num_timesteps], the activation range (absmax or percentile of
    |x|, of x / smoothing when smoothing) at each timestep, the largest over the
    calibration samples at that step; NaN where no sample visited the step.
    channel_absmax: key -> fp32 [K], per input channel absmax over all calibration
    inputs (before smoothing). smoothing: key -> fp32 [K], the SmoothQuant vectors the
    ranges were measured with (empty without smoothing). samples: int64
    [num_timesteps], calibration samples seen per timestep.
    """

    num_timesteps: int
    method: str
    percentile: Optional[float]
    smoothquant_alpha: Optional[float]
    ranges: Dict[str, Tensor]
    channel_absmax: Dict[str, Tensor]
    smoothing: Dict[str, Tensor]
    samples: Tensor

    def state_dict(self) -> Dict:
        """Plain tensors and builtins (torch.save / torch.load(weights_only=True))."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: Dict) -> "TimestepCalibration":
        return cls(**state)


def quantization_targets(model: nn.Module, config: TimestepCalibratedInt8Config
                         ) -> Tuple[List[str], List[str]]:
    """(names of the nn.Linear modules to become Int8Linear, names of the U-ViT blocks
    whose skip_linear becomes an Int8SkipConcatLinear), in module order."""
    linears, skip_blocks, skip_linears = [], [], set()
    for name, module in model.named_modules():
        if isinstance(module, UViTBlock) and type(module.skip_linear) is nn.Linear:
            qualified = f"{name}.skip_linear" if name else "skip_linear"
            skip_linears.add(qualified)
            if config.split_skip and config.targets(qualified, module.skip_linear):
                skip_blocks.append(name)
    for name, module in model.named_modules():
        if name not in skip_linears and config.targets(name, module):
            linears.append(name)
    return linears, skip_blocks


def skip_keys(block_name: str) -> Tuple[str, str]:
    """Calibration keys of the x and skip halves of a U-ViT block's skip merge."""
    prefix = f"{block_name}.skip_linear" if block_name else "skip_linear"
    return f"{prefix}.x_proj", f"{prefix}.skip_proj"


def smoothing_vector(channel_absmax: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's sm_j = amax_x[j]**alpha / amax_w[j]**(1 - alpha), 1 where a channel
    is all zero on either side, clamped to [1e-5, 1e5]."""
    amax_w = weight.detach().abs().amax(dim=0).float().cpu()
    amax_x = channel_absmax.float().cpu()
    live = (amax_x > 0) & (amax_w > 0)
    sm = amax_x.clamp_min(1e-30).pow(alpha) / amax_w.clamp_min(1e-30).pow(1.0 - alpha)
    return torch.where(live, sm, torch.ones_like(sm)).clamp(1e-5, 1e5)


class _Recorder:
    """Running per-timestep range and per-channel absmax of one layer's inputs."""

    def __init__(self, num_timesteps: int, method: str, percentile: float,
                 smoothing: Optional[Tensor]):
        self.method = method
        self.quantile = percentile / 100.0
        self.smoothing = smoothing
        self.ranges = torch.full((num_timesteps,), -math.inf)
        self.samples = torch.zeros(num_timesteps, dtype=torch.int64)
        self.channel_absmax: Optional[Tensor] = None

    def observe(self, x: Tensor, t: Optional[Tensor]) -> None:
        if t is None:
            raise RuntimeError("calibration saw a layer run outside the model's forward "
                               "(no timesteps)")
        x = x.detach().float()
        batch = x.shape[0] if x.dim() > 1 else 1
        t = t.reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"{t.numel()} timesteps for a layer input of shape "
                             f"{tuple(x.shape)}")
        num_timesteps = self.ranges.numel()
        if t.numel() and not (0 <= int(t.min()) and int(t.max()) < num_timesteps):
            raise ValueError(f"calibrate: the model ran at timesteps t in [{int(t.min())}, "
                             f"{int(t.max())}] (t of shape {tuple(t.shape)}) but the config "
                             f"has num_timesteps={num_timesteps}: set it to the model's "
                             f"number of diffusion steps")
        absx = x.abs()
        channel = absx.reshape(-1, x.shape[-1]).amax(dim=0).cpu()
        self.channel_absmax = (channel if self.channel_absmax is None
                               else torch.maximum(self.channel_absmax, channel))
        if self.smoothing is not None:
            absx = absx / self.smoothing.to(absx.device)
        per_sample = absx.reshape(batch, -1)
        if self.method == "absmax":
            value = per_sample.amax(dim=1)
        else:
            k = max(1, math.ceil(self.quantile * per_sample.shape[1]))
            value = per_sample.kthvalue(k, dim=1).values
        self.ranges.scatter_reduce_(0, t, value.cpu(), "amax")
        self.samples.scatter_add_(0, t, torch.ones_like(t))

    def result(self) -> Tensor:
        return torch.where(self.samples > 0, self.ranges, torch.full_like(self.ranges, math.nan))


def _observe_skip_merge(block: UViTBlock, x: Tensor, skip: Optional[Tensor], *,
                        context: TimestepContext, rec_x: _Recorder,
                        rec_skip: _Recorder) -> Tensor:
    if skip is not None:
        rec_x.observe(x, context.t)
        rec_skip.observe(skip, context.t)
    return UViTBlock.merge_skip(block, x, skip)


@torch.no_grad()
def _record(model: nn.Module, sampler: Sampler, config: TimestepCalibratedInt8Config,
            smoothing: Dict[str, Tensor]) -> Dict[str, _Recorder]:
    linears, skip_blocks = quantization_targets(model, config)
    if not linears and not skip_blocks:
        raise ValueError("the config selects no layer of this model to quantize")

    def recorder(key):
        return _Recorder(config.num_timesteps, config.method, config.percentile,
                         smoothing.get(key))

    context = TimestepContext()
    recorders: Dict[str, _Recorder] = {}
    patched_blocks = []
    try:
        attach_timestep_context(model, context)
        for name in linears:
            rec = recorders[name] = recorder(name)
            context.handles.append(model.get_submodule(name).register_forward_pre_hook(
                lambda module, args, rec=rec: rec.observe(args[0], context.t)))
        for name in skip_blocks:
            block = model.get_submodule(name)
            key_x, key_skip = skip_keys(name)
            recorders[key_x], recorders[key_skip] = recorder(key_x), recorder(key_skip)
            # The U-ViT block merges the skip through its weight, never calling
            # skip_linear: observe the halves where the merge happens.
            block.merge_skip = types.MethodType(functools.partial(
                _observe_skip_merge, context=context, rec_x=recorders[key_x],
                rec_skip=recorders[key_skip]), block)
            patched_blocks.append(block)
        sampler(model)
    finally:
        context.remove_hooks()
        for block in patched_blocks:
            del block.merge_skip
    unvisited = [k for k, r in recorders.items() if r.channel_absmax is None]
    if unvisited:
        raise RuntimeError(f"the sampler never ran these layers: {unvisited}")
    return recorders


def _weight_columns(model: nn.Module, key: str) -> Tensor:
    """The weight columns that multiply the inputs recorded under ``key``."""
    for suffix, half in ((".skip_linear.x_proj", 0), (".skip_linear.skip_proj", 1)):
        if ("." + key).endswith(suffix):
            weight = model.get_submodule(key.rsplit(".", 1)[0]).weight
            d = weight.shape[1] // 2
            return weight[:, half * d:(half + 1) * d]
    return model.get_submodule(key).weight


def calibrate(model: nn.Module, sampler: Sampler,
              config: Optional[TimestepCalibratedInt8Config] = None) -> TimestepCalibration:
    """Run ``sampler(model)`` on the floating-point model and record, for every layer
    ``config`` selects, its input range at every timestep the sampler visits.

    With config.smoothquant_alpha set the sampler runs twice: once for the per-channel
    absmax that defines the smoothing vectors, once for the ranges of the smoothed
    activations that the int8 kernels will see. Seed the sampler (noise, labels) so
    both passes see the same inputs.
    """
    config = config or TimestepCalibratedInt8Config()
    was_training = model.training
    model.eval()
    try:
        smoothing: Dict[str, Tensor] = {}
        if config.smoothquant_alpha is not None:
            first = _record(model, sampler, dataclasses.replace(config, method="absmax"), {})
            smoothing = {key: smoothing_vector(rec.channel_absmax, _weight_columns(model, key),
                                               config.smoothquant_alpha)
                         for key, rec in first.items()}
        recorders = _record(model, sampler, config, smoothing)
    finally:
        model.train(was_training)
    samples = torch.stack([r.samples for r in recorders.values()]).amax(dim=0)
    return TimestepCalibration(
        num_timesteps=config.num_timesteps, method=config.method,
        percentile=config.percentile if config.method == "percentile" else None,
        smoothquant_alpha=config.smoothquant_alpha,
        ranges={k: r.result() for k, r in recorders.items()},
        channel_absmax={k: r.channel_absmax for k, r in recorders.items()},
        smoothing=smoothing, samples=samples)
