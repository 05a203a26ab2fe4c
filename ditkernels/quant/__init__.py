"""Timestep-calibrated W8A8 post-training quantization of diffusion transformers.

    config = TimestepCalibratedInt8Config(groups=10)
    sampler = ddim_sampler(50, (8, 4, 32, 32), y=labels, cfg_scale=4.0, cfg_channels=3)
    calibration = calibrate(model, sampler, config)   # the fp model through DDIM
    quantize_(model, config, calibration)             # Linears -> Int8Linear, in place

Activation scales are tables indexed by the model's original timestep, per sample
(see config.py for the grouping, context.py for how t reaches the modules); the
tables, int8 weights and scales live in the modules' state_dicts.
"""

from .calibrate import (TimestepCalibration, calibrate, ddim_sampler, quantization_targets,
                        skip_keys, smoothing_vector)
from .config import (DEFAULT_INCLUDE, TimestepCalibratedInt8Config, adaptive_bounds,
                     group_ranges, uniform_bounds)
from .context import TimestepContext, attach_timestep_context
from .modules import Int8Linear, Int8SkipConcatLinear, quantize_weight
from .quantize import Int8SkipMerge, quantize_, timestep_context

__all__ = ["DEFAULT_INCLUDE", "Int8Linear", "Int8SkipConcatLinear", "Int8SkipMerge",
           "TimestepCalibratedInt8Config", "TimestepCalibration", "TimestepContext",
           "adaptive_bounds", "attach_timestep_context", "calibrate", "ddim_sampler",
           "group_ranges", "quantization_targets", "quantize_", "quantize_weight", "skip_keys",
           "smoothing_vector", "timestep_context", "uniform_bounds"]
