"""What to quantize and how: the config that drives calibrate() and quantize_().

Timestep grouping turns a per-timestep activation range r[t] (NaN where calibration
never visited t) into the [num_timesteps] table the int8 kernels index by the model's
original t:

  - "uniform": ``groups`` contiguous, equal-width ranges of t in 0..num_timesteps-1
    share one range, the largest calibrated range inside the group. groups=1 is the
    static baseline (one scale for all steps); groups=num_timesteps is one scale per
    step.
  - "adaptive": neighbouring visited steps are merged greedily (in t order) while the
    largest / smallest range inside the group stays <= ``max_ratio``; with
    ``max_ratio=None`` the smallest ratio giving at most ``groups`` groups is searched
    for. The greedy scan is optimal for this constraint (every sub-range of an
    admissible group is admissible), so fewer groups never buys a smaller ratio. Each
    layer gets its own grouping: the table costs [num_timesteps] floats either way.

Timesteps calibration never visited (a 50-step DDIM run sees 50 of 1000) take the range
of the nearest calibrated group; a tie takes the larger range.
"""

import dataclasses
import fnmatch
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

ModuleFilter = Callable[[str, nn.Module], bool]

# Transformer blocks of DiT (blocks.i) and U-ViT (in_blocks.i, mid_block, out_blocks.i).
DEFAULT_INCLUDE = ("blocks.*", "in_blocks.*", "mid_block.*", "out_blocks.*")

METHODS = ("absmax", "percentile")
GROUPINGS = ("uniform", "adaptive")


@dataclasses.dataclass
class TimestepCalibratedInt8Config:
    """W8A8 post-training quantization with activation scales indexed by timestep.

    Weights: symmetric int8 per output channel, w_scale = absmax / 127. Activations:
    symmetric int8 per tensor and per sample, s = range[t] / 127 (at least min_scale),
    range[t] from calibration grouped over timesteps (see the module docstring).

    num_timesteps: length of the table, the model's original timesteps (DiT: 1000).
    grouping, groups, max_ratio: the timestep grouping; groups=1 is the static baseline.
    method: "absmax" (the largest |x| seen) or "percentile" (that percentile of |x| per
    sample, so rare outliers are clipped); per timestep, the largest value over the
    calibration samples is kept.
    include / exclude: fnmatch patterns on qualified module names selecting the
    nn.Linear modules to quantize; the default takes every Linear inside the
    transformer blocks (adaLN modulation included) and leaves the embedders and the
    final layer in floating point. Add e.g. "final_layer.*", "t_embedder.*" or
    "decoder_pred" to quantize those too. module_filter, when given, replaces the
    patterns: a callable (name, module) -> bool, still applied only to nn.Linear.
    smoothquant_alpha: SmoothQuant migration strength in [0, 1], or None for no
    smoothing. Each input channel j gets sm_j = amax_x[j]**alpha / amax_w[j]**(1-alpha)
    (amax_x over all calibration inputs, amax_w over the weight's column j); the weight
    columns are multiplied by sm and Int8Linear divides its input by sm before
    quantizing, so the product is unchanged in exact arithmetic. The division is an
    extra elementwise pass: DiT's norms carry no affine weight and modulate per sample,
    so there is no static producer to fold 1/sm into.
    split_skip: give the x and skip halves of U-ViT's long-skip merge their own
    activation tables (Q-Diffusion's shortcut splitting); otherwise the skip_linear
    stays in floating point.
    min_scale: floor of every activation scale, so a range of 0 never makes s = 0.
    """

    num_timesteps: int = 1000
    grouping: str = "uniform"
    groups: int = 10
    max_ratio: Optional[float] = None
    method: str = "absmax"
    percentile: float = 99.99
    include: Tuple[str, ...] = DEFAULT_INCLUDE
    exclude: Tuple[str, ...] = ()
    module_filter: Optional[ModuleFilter] = None
    smoothquant_alpha: Optional[float] = None
    split_skip: bool = True
    min_scale: float = 1e-8

    def __post_init__(self):
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
        if not 1 <= self.groups <= self.num_timesteps:
            raise ValueError(f"groups must be in [1, num_timesteps={self.num_timesteps}], "
                             f"got {self.groups}")
        if self.max_ratio is not None:
            if self.grouping != "adaptive":
                raise ValueError("max_ratio applies to grouping='adaptive'")
            if not self.max_ratio >= 1.0:
                raise ValueError(f"max_ratio must be >= 1, got {self.max_ratio}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or None, got "
                             f"{self.smoothquant_alpha}")
        if not self.min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {self.min_scale}")

    def targets(self, name: str, module: nn.Module) -> bool:
        """Whether the nn.Linear ``module`` called ``name`` is quantized."""
        if type(module) is not nn.Linear:
            return False
        if self.module_filter is not None:
            return bool(self.module_filter(name, module))
        return (any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))

    def scale_table(self, ranges: Tensor) -> Tensor:
        """[num_timesteps] fp32 activation scales from per-timestep ranges (NaN where
        not calibrated), grouped as configured."""
        table = group_ranges(ranges, self.grouping, self.groups, self.max_ratio)
        return (table / 127.0).clamp_min(self.min_scale)


def _check_ranges(ranges: Tensor) -> Tensor:
    if ranges.dim() != 1:
        raise ValueError(f"ranges must be a [num_timesteps] vector, got shape "
                         f"{tuple(ranges.shape)}")
    ranges = ranges.detach().float().cpu()
    if bool(torch.isnan(ranges).all()):
        raise ValueError("no timestep was calibrated for this module")
    return ranges


def uniform_bounds(num_timesteps: int, groups: int) -> List[Tuple[int, int]]:
    """[start, end) of ``groups`` contiguous groups of near-equal width."""
    edges = [round(g * num_timesteps / groups) for g in range(groups + 1)]
    return [(edges[g], edges[g + 1]) for g in range(groups)]


def _greedy_segments(values: Sequence[float], max_ratio: float) -> List[Tuple[int, int]]:
    """Split values (in t order) into [start, end) runs with max / min <= max_ratio."""
    segments, start, lo, hi = [], 0, values[0], values[0]
    for i in range(1, len(values)):
        v = values[i]
        new_lo, new_hi = min(lo, v), max(hi, v)
        if new_hi > max_ratio * new_lo:
            segments.append((start, i))
            start, lo, hi = i, v, v
        else:
            lo, hi = new_lo, new_hi
    segments.append((start, len(values)))
    return segments


def adaptive_bounds(ranges: Tensor, groups: int,
                    max_ratio: Optional[float]) -> List[Tuple[int, int]]:
    """[start, end) groups of t from greedy merging of neighbouring calibrated steps.

    A group boundary between two calibrated steps sits halfway between them, so an
    uncalibrated step belongs with its nearer calibrated neighbour.
    """
    ranges = _check_ranges(ranges)
    visited = torch.nonzero(~torch.isnan(ranges)).flatten().tolist()
    # Ratios are taken on ranges floored at a tiny positive value so zeros compare.
    values = [max(float(ranges[t]), 1e-30) for t in visited]
    segments = None if max_ratio is None else _greedy_segments(values, max_ratio)
    if segments is None or len(segments) > groups:
        # The smallest ratio giving at most `groups` groups, by bisection in log space;
        # at ratio max / min everything is one group.
        lo = 0.0 if max_ratio is None else math.log(max_ratio)
        hi = math.log(max(values) / min(values)) + 1e-6
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if len(_greedy_segments(values, math.exp(mid))) <= groups:
                hi = mid
            else:
                lo = mid
        segments = _greedy_segments(values, math.exp(hi))
    edges = [0]
    for (_, end), (start, _) in zip(segments[:-1], segments[1:]):
        edges.append((visited[end - 1] + visited[start]) // 2 + 1)
    edges.append(len(ranges))
    return [(edges[i], edges[i + 1]) for i in range(len(segments))]


def group_ranges(ranges: Tensor, grouping: str = "uniform", groups: int = 1,
                 max_ratio: Optional[float] = None) -> Tensor:
    """Expand per-timestep ranges [T] (NaN = not calibrated) to a grouped [T] table.

    Each group takes the largest calibrated range inside it; a group without one takes
    the nearest calibrated group's range (by distance in t; ties take the larger).
    """
    ranges = _check_ranges(ranges)
    T = len(ranges)
    if grouping == "uniform":
        bounds = uniform_bounds(T, groups)
    elif grouping == "adaptive":
        bounds = adaptive_bounds(ranges, groups, max_ratio)
    else:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    values = []
    for start, end in bounds:
        seg = ranges[start:end]
        seg = seg[~torch.isnan(seg)]
        values.append(float(seg.max()) if seg.numel() else math.nan)
    calibrated = [i for i, v in enumerate(values) if not math.isnan(v)]
    centers = [(s + e - 1) / 2 for s, e in bounds]
    table = torch.empty(T, dtype=torch.float32)
    for i, (start, end) in enumerate(bounds):
        value = values[i]
        if math.isnan(value):
            dist = min(abs(centers[j] - centers[i]) for j in calibrated)
            value = max(values[j] for j in calibrated if abs(centers[j] - centers[i]) == dist)
        table[start:end] = value
    return table
