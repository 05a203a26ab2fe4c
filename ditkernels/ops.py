"""Python front of the ditkernels custom ops: typed wrappers, fake (meta)
implementations for torch.compile, and autograd formulas whose backward calls our
own backward kernels. Schemas live in csrc/ops.cpp."""

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.ditkernels

# ---------------------------------------------------------------------------
# fused adaLN family
# ---------------------------------------------------------------------------


def ln_modulate(x: Tensor, shift: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                eps: float = 1e-6, weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
    """Fused ``LayerNorm(x; weight, bias) * (1 + scale[:, None]) + shift[:, None]``.

    x: [B, N, C]; shift, scale: [B, C] or None (DiT's adaLN modulation); weight,
    bias: [C] or None (an affine LayerNorm, as in U-ViT and DiffiT). All inputs share
    x's dtype and device. Statistics are computed in fp32 (fp64 for fp64 inputs),
    without overflow for rows of finite values however large; Inf and NaN propagate.
    Gradients can be taken once (create_graph=True works) but not differentiated again.
    """
    return _ops.ln_modulate(x, shift, scale, eps, weight, bias)


def gated_residual_ln_modulate(x: Tensor, h: Tensor, gate: Optional[Tensor] = None,
                               shift: Optional[Tensor] = None,
                               scale: Optional[Tensor] = None, eps: float = 1e-6,
                               weight: Optional[Tensor] = None,
                               bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused gated residual and the next norm: returns ``(x_out, y)`` with

    ``x_out = x + gate[:, None] * h`` (``x + h`` when gate is None) and
    ``y = ln_modulate(x_out, shift, scale, eps, weight, bias)``.
    """
    return _ops.gated_residual_ln_modulate(x, h, gate, shift, scale, eps, weight, bias)


def _check_one_device(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    """The C++ ops' device check, in the fake (meta) implementations: a meta tensor
    among CPU or CUDA inputs sends the call here, where returning an empty tensor of
    x's device would hand back uninitialised memory (or a meta tensor for CPU inputs)."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {ref_name} is on "
                               f"{ref.device}; all inputs must be on one device")


def _no_double_backward(op: str):
    """Autograd formula of a backward op: its outputs, the gradients, can be computed
    with create_graph=True, but differentiating them raises instead of returning
    wrong second derivatives."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: double backward is not implemented: the gradients of "
                           f"ditkernels.{op.removesuffix('_backward').removesuffix('_bwd')} "
                           f"cannot be differentiated again (create_graph=True); use "
                           f"ditkernels.reference for higher-order derivatives")
    return backward


def _empty_grad(x: Tensor) -> Tensor:
    return x.new_empty((0,))


def _grad_like(t: Optional[Tensor], x: Tensor) -> Tensor:
    return _empty_grad(x) if t is None else x.new_empty(t.shape)


@torch.library.register_fake("ditkernels::ln_modulate")
def _ln_modulate_fake(x, shift, scale, eps=1e-6, weight=None, bias=None):
    _check_one_device("ln_modulate", "x", x, shift=shift, scale=scale, weight=weight, bias=bias)
    return x.new_empty(x.shape)


@torch.library.register_fake("ditkernels::gated_residual_ln_modulate")
def _gated_residual_ln_modulate_fake(x, h, gate, shift, scale, eps=1e-6, weight=None,
                                     bias=None):
    _check_one_device("gated_residual_ln_modulate", "x", x, h=h, gate=gate, shift=shift,
                      scale=scale, weight=weight, bias=bias)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("ditkernels::ln_modulate_backward")
def _ln_modulate_backward_fake(grad_y, x, shift, scale, eps, weight, bias):
    _check_one_device("ln_modulate_backward", "x", x, grad_y=grad_y, shift=shift, scale=scale,
                      weight=weight, bias=bias)
    return (x.new_empty(x.shape), _grad_like(shift, x), _grad_like(scale, x),
            _grad_like(weight, x), _grad_like(bias, x))


@torch.library.register_fake("ditkernels::gated_residual_ln_modulate_backward")
def _gated_residual_ln_modulate_backward_fake(grad_x_out, grad_y, x_out, h, gate, shift, scale,
                                              eps, weight, bias):
    _check_one_device("gated_residual_ln_modulate_backward", "x", x_out, grad_x_out=grad_x_out,
                      grad_y=grad_y, h=h, gate=gate, shift=shift, scale=scale, weight=weight,
                      bias=bias)
    return (x_out.new_empty(x_out.shape), x_out.new_empty(x_out.shape),
            _grad_like(gate, x_out), _grad_like(shift, x_out), _grad_like(scale, x_out),
            _grad_like(weight, x_out), _grad_like(bias, x_out))


def _present(grad: Tensor, like: Optional[Tensor]) -> Optional[Tensor]:
    return None if like is None else grad


def _ln_modulate_setup_context(ctx, inputs, output):
    x, shift, scale, eps, weight, bias = inputs
    ctx.save_for_backward(x, shift, scale, weight, bias)
    ctx.eps = eps


def _ln_modulate_backward(ctx, grad_y):
    x, shift, scale, weight, bias = ctx.saved_tensors
    gx, gshift, gscale, gweight, gbias = _ops.ln_modulate_backward(
        grad_y, x, shift, scale, ctx.eps, weight, bias)
    return (gx, _present(gshift, shift), _present(gscale, scale), None,
            _present(gweight, weight), _present(gbias, bias))


def _gated_setup_context(ctx, inputs, output):
    x, h, gate, shift, scale, eps, weight, bias = inputs
    x_out, _ = output
    ctx.save_for_backward(x_out, h, gate, shift, scale, weight, bias)
    ctx.eps = eps


def _gated_backward(ctx, grad_x_out, grad_y):
    x_out, h, gate, shift, scale, weight, bias = ctx.saved_tensors
    gx, gh, ggate, gshift, gscale, gweight, gbias = _ops.gated_residual_ln_modulate_backward(
        grad_x_out, grad_y, x_out, h, gate, shift, scale, ctx.eps, weight, bias)
    return (gx, gh, _present(ggate, gate), _present(gshift, shift), _present(gscale, scale),
            None, _present(gweight, weight), _present(gbias, bias))


torch.library.register_autograd("ditkernels::ln_modulate", _ln_modulate_backward,
                                setup_context=_ln_modulate_setup_context)
torch.library.register_autograd("ditkernels::gated_residual_ln_modulate", _gated_backward,
                                setup_context=_gated_setup_context)
for _op in ("ln_modulate_backward", "gated_residual_ln_modulate_backward"):
    torch.library.register_autograd(f"ditkernels::{_op}", _no_double_backward(_op))


# ---------------------------------------------------------------------------
# skip-concat-linear
# ---------------------------------------------------------------------------


def skip_concat_linear(x: Tensor, skip: Tensor, weight: Tensor,
                       bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(torch.cat([x, skip], -1), weight, bias)`` without building the concat.

    x, skip: [..., D] of one shape; weight: [Dout, 2 * D] (columns [0:D] multiply x,
    [D:2D] multiply skip, as U-ViT's ``skip_linear``); bias: [Dout] or None.
    """
    return _ops.skip_concat_linear(x, skip, weight, bias)


@torch.library.register_fake("ditkernels::skip_concat_linear")
def _skip_concat_linear_fake(x, skip, weight, bias=None):
    _check_one_device("skip_concat_linear", "x", x, skip=skip, weight=weight, bias=bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("ditkernels::skip_concat_linear_backward")
def _skip_concat_linear_backward_fake(grad_y, x, skip, weight, has_bias):
    _check_one_device("skip_concat_linear_backward", "x", x, grad_y=grad_y, skip=skip,
                      weight=weight)
    grad_bias = x.new_empty((weight.shape[0],) if has_bias else (0,))
    return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(weight.shape), grad_bias)


def _skip_concat_linear_setup_context(ctx, inputs, output):
    x, skip, weight, bias = inputs
    ctx.save_for_backward(x, skip, weight)
    ctx.has_bias = bias is not None


def _skip_concat_linear_backward(ctx, grad_y):
    x, skip, weight = ctx.saved_tensors
    gx, gskip, gweight, gbias = _ops.skip_concat_linear_backward(grad_y, x, skip, weight,
                                                                 ctx.has_bias)
    return gx, gskip, gweight, (gbias if ctx.has_bias else None)


torch.library.register_autograd("ditkernels::skip_concat_linear", _skip_concat_linear_backward,
                                setup_context=_skip_concat_linear_setup_context)
torch.library.register_autograd("ditkernels::skip_concat_linear_backward",
                                _no_double_backward("skip_concat_linear_backward"))


# ---------------------------------------------------------------------------
# TMSA: time-dependent self-attention with a relative-position-bias table
# ---------------------------------------------------------------------------


def _grid(grid_size) -> Tuple[int, int]:
    if grid_size is None:
        return 0, 0
    if isinstance(grid_size, int):
        return grid_size, grid_size
    gh, gw = grid_size
    return int(gh), int(gw)


def tmsa(qkv: Tensor, time_qkv: Optional[Tensor] = None, rel_table: Optional[Tensor] = None,
         grid_size=None, num_leading: int = 0, scale: Optional[float] = None) -> Tensor:
    """DiffiT's time-dependent multi-head self-attention, fused.

    qkv: [B, N, 3, H, D], the token projection reshaped in place (no transpose);
    time_qkv: [B, 3, H, D] or None, the per-sample time-token projection added to q, k
    and v; rel_table: [(2*Gh-1)*(2*Gw-1), H] or None, a Swin-style relative position
    bias for the Gh x Gw token grid (``grid_size`` = Gh, Gw or an int), which starts
    after ``num_leading`` tokens that get no bias; scale defaults to D ** -0.5.
    Returns [B, N, H, D]; ``.reshape(B, N, H * D)`` feeds the output projection.
    Backward: an Inf or NaN in the output gradient of (sample b, head h) makes every
    gradient of (b, h) NaN, and the table's column h, on every backend. Gradients can be
    taken once but not differentiated again.
    """
    gh, gw = _grid(grid_size)
    if rel_table is not None and grid_size is None:
        raise ValueError("tmsa: rel_table needs grid_size (Gh, Gw)")
    if scale is None:
        # With D = 0 the op itself reports qkv's shape; D ** -0.5 would divide by zero first.
        scale = qkv.shape[-1] ** -0.5 if qkv.shape[-1] > 0 else 1.0
    scale = float(scale)
    return _ops.tmsa(qkv, time_qkv, rel_table, gh, gw, num_leading, scale)[0]


def tmsa_windowed(qkv: Tensor, time_qkv: Optional[Tensor], rel_table: Optional[Tensor],
                  grid_size, window_size, scale: Optional[float] = None) -> Tensor:
    """TMSA inside non-overlapping local windows (DiffiT's high-resolution stages).

    qkv: [B, Gh*Gw, 3, H, D] in row-major grid order; the grid is cut into
    window_size (wh, ww) windows that are folded into the batch, and rel_table is the
    window's [(2*wh-1)*(2*ww-1), H] table. Returns [B, Gh*Gw, H, D] in grid order.
    """
    gh, gw = _grid(grid_size)
    wh, ww = _grid(window_size)
    B, N, three, H, D = qkv.shape
    if N != gh * gw or gh % wh or gw % ww:
        raise ValueError(f"tmsa_windowed: qkv of shape {tuple(qkv.shape)} must hold a {gh} x {gw} "
                         f"grid divisible into {wh} x {ww} windows")
    nh, nw = gh // wh, gw // ww
    windows = (qkv.view(B, nh, wh, nw, ww, three, H, D).permute(0, 1, 3, 2, 4, 5, 6, 7)
               .reshape(B * nh * nw, wh * ww, three, H, D))
    t = None if time_qkv is None else time_qkv.repeat_interleave(nh * nw, dim=0)
    out = tmsa(windows, t, rel_table, (wh, ww), 0, scale)
    return (out.view(B, nh, nw, wh, ww, H, D).permute(0, 1, 3, 2, 4, 5, 6)
            .reshape(B, N, H, D))


def _lse_dtype(qkv: Tensor) -> torch.dtype:
    return torch.float64 if qkv.dtype == torch.float64 else torch.float32


@torch.library.register_fake("ditkernels::tmsa")
def _tmsa_fake(qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale):
    _check_one_device("tmsa", "qkv", qkv, time_qkv=time_qkv, rel_table=rel_table)
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H, D)), qkv.new_empty((B, H, N), dtype=_lse_dtype(qkv))


@torch.library.register_fake("ditkernels::tmsa_backward")
def _tmsa_backward_fake(grad_out, qkv, time_qkv, rel_table, out, lse, grid_h, grid_w, num_leading,
                   scale):
    _check_one_device("tmsa_backward", "qkv", qkv, grad_out=grad_out, time_qkv=time_qkv,
                      rel_table=rel_table, out=out, lse=lse)
    return (qkv.new_empty(qkv.shape), _grad_like(time_qkv, qkv), _grad_like(rel_table, qkv))


def _tmsa_setup_context(ctx, inputs, output):
    qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, time_qkv, rel_table, out, lse)
    ctx.config = (grid_h, grid_w, num_leading, scale)


def _tmsa_backward(ctx, grad_out, _grad_lse):
    qkv, time_qkv, rel_table, out, lse = ctx.saved_tensors
    gqkv, gtime, gtable = _ops.tmsa_backward(grad_out, qkv, time_qkv, rel_table, out, lse,
                                             *ctx.config)
    return (gqkv, _present(gtime, time_qkv), _present(gtable, rel_table), None, None, None,
            None)


torch.library.register_autograd("ditkernels::tmsa", _tmsa_backward,
                                setup_context=_tmsa_setup_context)
torch.library.register_autograd("ditkernels::tmsa_backward", _no_double_backward("tmsa_backward"))


# ---------------------------------------------------------------------------
# timestep-calibrated int8
# ---------------------------------------------------------------------------


def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, act_scales: Tensor, t: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
    """W8A8 linear with per-timestep activation scales, quantization fused in.

    x: [M, K] or [B, L, K] float; w_q: [N, K] int8 with per-output-channel scales
    w_scale [N] fp32; act_scales: [T] fp32 indexed by t (int64, one timestep per sample
    of x, or a single one). Row r of sample b is quantized with s = act_scales[t[b]]
    (round half to even, clamp to +-127; +-Inf saturates, NaN quantizes to 0; every
    act_scales[t] must be positive and finite, K at most 133,144 so that the int8 product
    accumulates exactly in int32); y = acc * s * w_scale + bias, in x's dtype. The gradient w.r.t. x passes
    straight through the activation quantizer (dx = dy @ dequantized W).

    Validation of t and act_scales[t] (here and in the other int8 ops): on CPU on the
    host, with a message naming the values. On CUDA on the device, so that no call
    synchronizes and calls can be captured in a CUDA graph: the kernels check each
    timestep and scale as they read it, and a bad one makes the kernel trap (the
    launch fails, and the CUDA context with it, like a failed device-side assert).
    Setting DITKERNELS_HOST_CHECKS=1 (debug mode) checks them on the host instead,
    with the CPU's message, at the cost of one synchronization per call.
    """
    return _ops.int8_linear(x, w_q, w_scale, act_scales, t, bias)


def int8_gemm_dequant(x_q: Tensor, w_q: Tensor, w_scale: Tensor, act_scales: Tensor, t: Tensor,
                      bias: Optional[Tensor] = None,
                      out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """int8_linear for activations already quantized (x_q int8 with act_scales[t]);
    t and act_scales validated as int8_linear says."""
    return _ops.int8_gemm_dequant(x_q, w_q, w_scale, act_scales, t, bias, out_dtype)


def quantize_per_sample(x: Tensor, act_scales: Tensor, t: Tensor) -> Tensor:
    """int8 clamp(round(x / act_scales[t[b]]), -127, 127), per sample b of x; t and
    act_scales validated as int8_linear says."""
    return _ops.quantize_per_sample(x, act_scales, t)


def ln_modulate_int8(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor],
                     act_scales: Tensor, t: Tensor, eps: float = 1e-6,
                     weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """ln_modulate whose output is quantized to int8 with act_scales[t[b]], so the
    quantization of a qkv or fc1 input rides on the norm that produces it; t and
    act_scales validated as int8_linear says."""
    return _ops.ln_modulate_int8(x, shift, scale, eps, weight, bias, act_scales, t)


@torch.library.register_fake("ditkernels::int8_linear")
def _int8_linear_fake(x, w_q, w_scale, act_scales, t, bias=None):
    _check_one_device("int8_linear", "x", x, w_q=w_q, w_scale=w_scale, act_scales=act_scales,
                      t=t, bias=bias)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("ditkernels::int8_gemm_dequant")
def _int8_gemm_dequant_fake(x_q, w_q, w_scale, act_scales, t, bias, out_dtype):
    _check_one_device("int8_gemm_dequant", "x_q", x_q, w_q=w_q, w_scale=w_scale,
                      act_scales=act_scales, t=t, bias=bias)
    return x_q.new_empty((*x_q.shape[:-1], w_q.shape[0]), dtype=out_dtype)


@torch.library.register_fake("ditkernels::quantize_per_sample")
def _quantize_per_sample_fake(x, act_scales, t):
    _check_one_device("quantize_per_sample", "x", x, act_scales=act_scales, t=t)
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.register_fake("ditkernels::ln_modulate_int8")
def _ln_modulate_int8_fake(x, shift, scale, eps, weight, bias, act_scales, t):
    _check_one_device("ln_modulate_int8", "x", x, shift=shift, scale=scale, weight=weight,
                      bias=bias, act_scales=act_scales, t=t)
    return x.new_empty(x.shape, dtype=torch.int8)


def _int8_linear_setup_context(ctx, inputs, output):
    x, w_q, w_scale, act_scales, t, bias = inputs
    ctx.save_for_backward(w_q, w_scale)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _int8_linear_backward(ctx, grad_y):
    w_q, w_scale = ctx.saved_tensors
    w = w_q.to(torch.float32) * w_scale[:, None]
    grad_x = (grad_y.to(torch.float32) @ w).to(ctx.x_dtype)
    grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_bias


torch.library.register_autograd("ditkernels::int8_linear", _int8_linear_backward,
                                setup_context=_int8_linear_setup_context)
