"""quantize_(model, config, calibration): swap the selected Linears for int8 modules in
place and hook the model's timesteps into them.

U-ViT's blocks merge the long skip by calling ``skip_concat_linear`` on
``skip_linear.weight`` (ditkernels.models.uvit.Block.merge_skip), so a replaced
skip_linear would never be called. quantize_ therefore gives each such block an
instance-level ``merge_skip`` that calls its Int8SkipConcatLinear
(``skip_linear(x, skip)``); the block keeps its class, so U-ViT's fused cross-block
chain still runs, and the override carries no state (it is rebuilt by quantize_, not
stored in the state_dict).
"""

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..models.uvit import Block as UViTBlock
from .calibrate import TimestepCalibration, quantization_targets, skip_keys
from .config import TimestepCalibratedInt8Config
from .context import TimestepContext, attach_timestep_context
from .modules import Int8Linear, Int8SkipConcatLinear

# Attribute of a quantized model holding its TimestepContext.
CONTEXT_ATTR = "int8_timestep_context"


class Int8SkipMerge:
    """U-ViT Block.merge_skip for a block whose skip_linear is an Int8SkipConcatLinear,
    stored on the block instance. A small class rather than a bound method so that
    copy.deepcopy and pickling of the whole model keep it."""

    def __init__(self, block: UViTBlock):
        self.block = block

    def __call__(self, x: Tensor, skip: Optional[Tensor]) -> Tensor:
        if skip is None:
            raise ValueError("this block merges a long skip (built with skip=True): "
                             "call it as block(x, skip)")
        if skip.shape != x.shape:
            raise ValueError(f"skip must have x's shape {tuple(x.shape)}, got "
                             f"{tuple(skip.shape)}")
        return self.block.skip_linear(x, skip)


def timestep_context(model: nn.Module) -> TimestepContext:
    """The model's TimestepContext, created and hooked to its forward on first use."""
    context = getattr(model, CONTEXT_ATTR, None)
    if context is None:
        context = TimestepContext()
        attach_timestep_context(model, context)
        setattr(model, CONTEXT_ATTR, context)
    return context


def _check_calibration(calibration: TimestepCalibration, config: TimestepCalibratedInt8Config,
                       keys) -> None:
    if calibration.num_timesteps != config.num_timesteps:
        raise ValueError(f"calibration has {calibration.num_timesteps} timesteps, the config "
                         f"{config.num_timesteps}")
    if calibration.smoothquant_alpha != config.smoothquant_alpha:
        raise ValueError(f"calibration was measured with smoothquant_alpha="
                         f"{calibration.smoothquant_alpha}, the config asks for "
                         f"{config.smoothquant_alpha}: calibrate with this config")
    missing = [k for k in keys if k not in calibration.ranges]
    if missing:
        raise ValueError(f"calibration has no ranges for {missing}: calibrate with the same "
                         f"module selection")


def quantize_(model: nn.Module, config: Optional[TimestepCalibratedInt8Config] = None,
              calibration: Optional[TimestepCalibration] = None) -> nn.Module:
    """Replace, in place, the layers ``config`` selects with int8 modules; returns model.

    Each selected nn.Linear becomes an Int8Linear (per-output-channel int8 weights, the
    activation scale table config.scale_table(calibration.ranges[name])); each selected
    U-ViT skip_linear becomes an Int8SkipConcatLinear with a table per half. Without a
    calibration the tables are placeholders (ones): the structure to load a quantized
    state_dict into, e.g. ``quantize_(DiT(...), config)`` then
    ``load_state_dict(state, strict=True)``. The model's forward gets hooks that pass
    its timesteps to the int8 modules (see ditkernels.quant.context).
    """
    config = config or TimestepCalibratedInt8Config()
    quantized = [name for name, m in model.named_modules()
                 if isinstance(m, (Int8Linear, Int8SkipConcatLinear))]
    if quantized:
        raise ValueError(f"quantize_: the model is already quantized ({len(quantized)} int8 "
                         f"layers, the first {quantized[0]!r}); quantize_ a float model once")
    linears, skip_blocks = quantization_targets(model, config)
    if not linears and not skip_blocks:
        raise ValueError("the config selects no layer of this model to quantize")
    smoothing = config.smoothquant_alpha is not None
    if calibration is not None:
        keys = linears + [k for name in skip_blocks for k in skip_keys(name)]
        _check_calibration(calibration, config, keys)
    context = timestep_context(model)
    T = config.num_timesteps

    def scales_and_smoothing(key: str, in_features: int):
        if calibration is None:
            return None, (torch.ones(in_features) if smoothing else None)
        return (config.scale_table(calibration.ranges[key]),
                calibration.smoothing[key] if smoothing else None)

    for name in linears:
        linear = model.get_submodule(name)
        act_scales, smooth = scales_and_smoothing(name, linear.in_features)
        _set_submodule(model, name, Int8Linear.from_float(linear, act_scales, T, smooth, context))
    for name in skip_blocks:
        block = model.get_submodule(name)
        linear = block.skip_linear
        key_x, key_skip = skip_keys(name)
        half = linear.in_features // 2
        scales_x, smooth_x = scales_and_smoothing(key_x, half)
        scales_skip, smooth_skip = scales_and_smoothing(key_skip, half)
        block.skip_linear = Int8SkipConcatLinear.from_float(
            linear, scales_x, scales_skip, T, smooth_x, smooth_skip, context)
        block.merge_skip = Int8SkipMerge(block)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent).register_module(child, module)
