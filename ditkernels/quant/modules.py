"""Quantized modules: Int8Linear and Int8SkipConcatLinear.

Everything a quantized model needs lives in these modules' state_dicts: int8 weights
(``qweight``), per-output-channel weight scales (``weight_scale``), the per-timestep
activation scale table (``act_scales``, [num_timesteps]), the SmoothQuant vector
(``smooth``) when there is one, and the floating-point ``bias``.
"""

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import int8_linear
from .context import TimestepContext

# Buffers that stay fp32 whatever dtype the model is cast to.
FP32_BUFFERS = ("weight_scale", "act_scales", "smooth")


def quantize_weight(weight: Tensor):
    """Symmetric per-output-channel int8: (qweight int8 [N, K], weight_scale fp32 [N])
    with weight_scale = absmax / 127 (1 for an all-zero row, whose codes are all 0)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return qweight, scale


class Int8Linear(nn.Module):
    """W8A8 drop-in for nn.Linear with per-timestep activation scales.

    forward(x [..., K], t=None) -> [..., N] in x's dtype, through ditkernels.int8_linear:
    sample b of x is quantized with act_scales[t[b]], the product is exact int32, the
    result is dequantized with act_scales[t[b]] * weight_scale[n] and the bias added.
    t defaults to the timesteps the model's forward received (the shared
    TimestepContext); for x of shape [B, ...] it must hold B timesteps or one.

    Buffers: qweight int8 [N, K], weight_scale fp32 [N], act_scales fp32
    [num_timesteps], smooth fp32 [K] (with smoothing). Parameter: bias [N] (float).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 num_timesteps: int = 1000, smoothing: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_timesteps = num_timesteps
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                    device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        self.register_buffer("act_scales", torch.ones(num_timesteps, dtype=torch.float32,
                                                      device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32,
                                                  device=device) if smoothing else None)
        self.register_parameter("bias", nn.Parameter(
            torch.zeros(out_features, device=device, dtype=dtype)) if bias else None)
        self.timestep_context: Optional[TimestepContext] = None

    @classmethod
    def from_float(cls, linear: nn.Linear, act_scales: Optional[Tensor] = None,
                   num_timesteps: int = 1000, smooth: Optional[Tensor] = None,
                   context: Optional[TimestepContext] = None) -> "Int8Linear":
        """Quantize an nn.Linear (see from_weight)."""
        return cls.from_weight(linear.weight, linear.bias, act_scales, num_timesteps, smooth,
                               context)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Optional[Tensor],
                    act_scales: Optional[Tensor] = None, num_timesteps: int = 1000,
                    smooth: Optional[Tensor] = None,
                    context: Optional[TimestepContext] = None) -> "Int8Linear":
        """An Int8Linear computing x @ weight.T + bias: the weight (times ``smooth`` per
        input column, when given) to per-output-channel int8; act_scales
        [num_timesteps] fp32, or ones as a placeholder for a state_dict to be loaded."""
        weight = weight.detach()
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, num_timesteps,
                     smoothing=smooth is not None, device=weight.device, dtype=weight.dtype)
        if smooth is not None:
            smooth = smooth.to(device=weight.device, dtype=torch.float32)
            module.smooth.copy_(smooth)
            weight = weight.float() * smooth[None, :]
        qweight, scale = quantize_weight(weight)
        module.qweight.copy_(qweight)
        module.weight_scale.copy_(scale)
        if act_scales is not None:
            module.act_scales.copy_(act_scales)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        module.timestep_context = context
        return module

    def _apply(self, fn, recurse=True):
        # The kernels read fp32 scales: a model cast to bf16 (model.to(torch.bfloat16))
        # moves the scale buffers with it but must not round them to its dtype.
        scales = {n: self._buffers.pop(n) for n in FP32_BUFFERS
                  if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in scales.items():
                self._buffers[name] = buf.to(self.qweight.device)
        return self

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (smoothing undone), in the bias's dtype or fp32: for
        code that reads a Linear's weight, e.g. to learn the model's dtype."""
        w = self.qweight.float() * self.weight_scale[:, None]
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w.to(self.bias.dtype if self.bias is not None else torch.float32)

    def timesteps(self, x: Tensor, t: Optional[Tensor]) -> Tensor:
        """int64 timesteps matching x's samples (its leading dimension), or a single one."""
        if t is None:
            t = None if self.timestep_context is None else self.timestep_context.t
        if t is None:
            raise RuntimeError(
                "Int8Linear needs the sample timesteps: call it inside the quantized model's "
                "forward (quantize_ hooks the model's t argument) or pass t explicitly")
        t = t.reshape(-1)
        if t.numel() not in (1, x.shape[0]):
            if bool((t == t[0]).all()):
                return t[:1]
            raise ValueError(f"{t.numel()} timesteps for an input of shape {tuple(x.shape)}: "
                             f"expected one per sample (x.shape[0] = {x.shape[0]}) or one")
        return t

    def forward(self, x: Tensor, t: Optional[Tensor] = None) -> Tensor:
        t = self.timesteps(x, t)
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        lead = x.shape[:-1]
        if x.dim() == 1 or x.dim() > 3:
            # The op takes [M, K] or [B, L, K]; fold any other shape into [B, L, K].
            x = x.reshape(1 if x.dim() == 1 else x.shape[0], -1, x.shape[-1])
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = int8_linear(x, self.qweight, self.weight_scale, self.act_scales, t, bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, num_timesteps={self.num_timesteps}, "
                f"smoothing={self.smooth is not None}")


class Int8SkipConcatLinear(nn.Module):
    """Quantized U-ViT long-skip merge, Linear(2D, Dout) on cat([x, skip], -1), with
    separate activation tables for the two halves (shortcut splitting).

    forward(x, skip, t=None) = x_proj(x) + skip_proj(skip): x_proj holds the weight
    columns [0:D] and the bias, skip_proj the columns [D:2D] and no bias. The halves
    come from different layers and have different ranges; one shared scale would be
    set by the larger.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 num_timesteps: int = 1000, smoothing: bool = False, device=None, dtype=None):
        super().__init__()
        if in_features % 2:
            raise ValueError(f"in_features must be even (two halves), got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        half = in_features // 2
        self.x_proj = Int8Linear(half, out_features, bias, num_timesteps, smoothing, device,
                                 dtype)
        self.skip_proj = Int8Linear(half, out_features, False, num_timesteps, smoothing, device,
                                    dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_scales_x: Optional[Tensor] = None,
                   act_scales_skip: Optional[Tensor] = None, num_timesteps: int = 1000,
                   smooth_x: Optional[Tensor] = None, smooth_skip: Optional[Tensor] = None,
                   context: Optional[TimestepContext] = None) -> "Int8SkipConcatLinear":
        """Split and quantize U-ViT's skip_linear, Linear(2D, Dout) (see Int8Linear)."""
        half = linear.in_features // 2
        weight = linear.weight.detach()
        # Children built on the meta device: placeholders, replaced right away.
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     num_timesteps, smooth_x is not None, device="meta")
        module.x_proj = Int8Linear.from_weight(weight[:, :half], linear.bias, act_scales_x,
                                               num_timesteps, smooth_x, context)
        module.skip_proj = Int8Linear.from_weight(weight[:, half:], None, act_scales_skip,
                                                  num_timesteps, smooth_skip, context)
        return module

    @property
    def weight(self) -> Tensor:
        """The dequantized [Dout, 2D] weight."""
        return torch.cat([self.x_proj.weight, self.skip_proj.weight.to(self.x_proj.weight.dtype)],
                         dim=1)

    @property
    def bias(self) -> Optional[Tensor]:
        return self.x_proj.bias

    def forward(self, x: Tensor, skip: Tensor, t: Optional[Tensor] = None) -> Tensor:
        return self.x_proj(x, t) + self.skip_proj(skip, t)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
