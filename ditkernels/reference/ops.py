"""Plain-PyTorch definitions of every ditkernels op: the readable spec and the test oracle.

Each function computes in the input dtype with eager PyTorch, exactly as a model
without ditkernels would.
"""

import torch
import torch.nn.functional as F


def ln_modulate(x, shift=None, scale=None, eps=1e-6, weight=None, bias=None):
    """LayerNorm over the last dim (optionally affine), then DiT's modulate.

    x: [B, N, C]; shift, scale: [B, C] or None; weight, bias: [C] or None.
    y = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]
    """
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    if scale is not None:
        y = y * (1 + scale[:, None])
    if shift is not None:
        y = y + shift[:, None]
    return y


def gated_residual_ln_modulate(x, h, gate=None, shift=None, scale=None, eps=1e-6, weight=None,
                               bias=None):
    """The gated residual of one DiT branch followed by the norm of the next.

    x_out = x + gate[:, None] * h;  y = ln_modulate(x_out, shift, scale, eps, weight, bias)
    Returns (x_out, y).
    """
    x_out = x + (h if gate is None else gate[:, None] * h)
    return x_out, ln_modulate(x_out, shift, scale, eps, weight, bias)


def skip_concat_linear(x, skip, weight, bias=None):
    """U-ViT's long-skip merge: Linear(2D -> Dout) over cat([x, skip], -1)."""
    return F.linear(torch.cat([x, skip], dim=-1), weight, bias)


def relative_position_index(grid_h, grid_w, num_leading=0, device=None):
    """Swin's relative position index over [num_leading + Gh * Gw] tokens, [N, N] int64.

    Grid token t >= num_leading sits at (y, x) = divmod(t - num_leading, Gw); the pair
    (i, j) reads table row (y_i - y_j + Gh - 1) * (2 Gw - 1) + (x_i - x_j + Gw - 1).
    Pairs that involve a leading token get -1 (no bias).
    """
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=device),
                            torch.arange(grid_w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    idx = ((ys[:, None] - ys[None, :] + grid_h - 1) * (2 * grid_w - 1)
           + xs[:, None] - xs[None, :] + grid_w - 1)
    n = num_leading + grid_h * grid_w
    full = torch.full((n, n), -1, dtype=torch.long, device=device)
    full[num_leading:, num_leading:] = idx
    return full


def tmsa(qkv, time_qkv=None, rel_table=None, grid_size=None, num_leading=0, scale=None):
    """DiffiT's TMSA with a materialized [H, N, N] bias and an eager softmax.

    qkv: [B, N, 3, H, D]; time_qkv: [B, 3, H, D] or None; rel_table:
    [(2Gh-1)(2Gw-1), H] or None. Returns [B, N, H, D].
    """
    B, N, _, H, D = qkv.shape
    scale = D ** -0.5 if scale is None else scale
    if time_qkv is not None:
        qkv = qkv + time_qkv[:, None]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
    s = scale * q @ k.transpose(-2, -1)
    if rel_table is not None:
        gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        idx = relative_position_index(gh, gw, num_leading, qkv.device)
        table = torch.cat([rel_table, rel_table.new_zeros(1, H)])  # row -1: no bias
        s = s + table[idx].permute(2, 0, 1)
    return (s.softmax(-1) @ v).transpose(1, 2)


def _per_sample_scale(x, act_scales, t):
    """act_scales[t[b]] broadcast over the rows of x ([M, K] or [B, L, K])."""
    s = act_scales[t]
    if t.numel() == 1:
        return s.reshape([1] * x.dim())
    return s.reshape(-1, *([1] * (x.dim() - 1)))


def quantize_per_sample(x, act_scales, t):
    """int8 clamp(round_half_even(x / act_scales[t[b]]), -127, 127); +-Inf saturates to
    +-127 and NaN quantizes to 0 (a float NaN's conversion to int8 is undefined)."""
    s = _per_sample_scale(x, act_scales, t)
    return torch.round(x.float() / s).clamp(-127, 127).nan_to_num(nan=0.0).to(torch.int8)


def int8_gemm_dequant(x_q, w_q, w_scale, act_scales, t, bias=None, out_dtype=torch.bfloat16):
    """Exact integer product (computed in fp64, exact below 2**53), then
    y = (float32(acc) * s) * w_scale + bias, in out_dtype."""
    acc = (x_q.double() @ w_q.double().t()).to(torch.int32)
    y = acc.float() * _per_sample_scale(x_q, act_scales, t)
    y = y * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_linear(x, w_q, w_scale, act_scales, t, bias=None):
    """Quantize x per sample, then int8_gemm_dequant in x's dtype."""
    return int8_gemm_dequant(quantize_per_sample(x, act_scales, t), w_q, w_scale, act_scales, t,
                             bias, x.dtype)


def ln_modulate_int8(x, shift, scale, act_scales, t, eps=1e-6, weight=None, bias=None):
    """ln_modulate in x's dtype, then quantize_per_sample."""
    return quantize_per_sample(ln_modulate(x, shift, scale, eps, weight, bias), act_scales, t)
