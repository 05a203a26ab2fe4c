#pragma once
// Timestep-calibrated W8A8: activations are quantized per sample with a scale looked
// up by the sample's diffusion timestep, weights per output channel.
//   s_b    = act_scales[t[b]]
//   q      = clamp(round_half_even(x / s_b), -127, 127)            (int8)
//   acc    = sum_k q[r, k] * w_q[n, k]                              (exact int32)
//   y[r,n] = (float(acc) * s_b) * w_scale[n] + bias[n]              (fp32, then x's dtype)
// Rows map to samples through `rows_per_sample`: L for x of shape [B, L, K]; 1 for x
// of shape [M, K] with one timestep per row; M when one timestep covers all rows.

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "ditkernels/checks.h"

namespace ditkernels {
namespace int8 {

struct Rows {
  at::Tensor x2d;  // [M, K], unit stride along K
  at::Tensor t;    // int64 [num samples], contiguous
  int64_t M = 0, K = 0, rows_per_sample = 1;
  std::vector<int64_t> lead;  // leading dims of x
};

// Checks x against t and act_scales and flattens it to rows. Values of t are checked
// against the table length on the host (a synchronisation on CUDA).
inline Rows check_rows(const char* op, const at::Tensor& x, const char* x_name,
                       const at::Tensor& act_scales, const at::Tensor& t) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": ", x_name,
              " must have shape [M, K] or [B, L, K], got ", shape_str(x));
  check_same_device(op, act_scales, "act_scales", x, x_name);
  check_same_device(op, t, "t", x, x_name);
  TORCH_CHECK(act_scales.scalar_type() == at::kFloat && act_scales.dim() == 1 &&
                  act_scales.numel() >= 1,
              op, ": act_scales must be a non-empty float32 vector [T], got ",
              act_scales.scalar_type(), " of shape ", shape_str(act_scales));
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1, op,
              ": t must be an int64 vector of timesteps, got ", t.scalar_type(), " of shape ",
              shape_str(t));
  Rows r;
  r.K = x.size(-1);
  r.lead = x.sizes().vec();
  r.lead.pop_back();
  r.x2d = x.reshape({-1, r.K});
  if (r.x2d.stride(1) != 1) r.x2d = r.x2d.contiguous();
  r.M = r.x2d.size(0);
  const int64_t samples = x.dim() == 3 ? x.size(0) : r.M;
  if (t.numel() == samples) {
    r.rows_per_sample = x.dim() == 3 ? x.size(1) : 1;
  } else {
    TORCH_CHECK(t.numel() == 1, op, ": t has ", t.numel(), " entries but ", x_name, " of shape ",
                shape_str(x), " holds ", samples, " samples (one timestep each, or a single one)");
    r.rows_per_sample = std::max<int64_t>(r.M, 1);
  }
  r.t = t.contiguous();
  if (t.numel() > 0) {
    auto [lo, hi] = at::aminmax(t);
    const int64_t tmin = lo.item<int64_t>(), tmax = hi.item<int64_t>();
    TORCH_CHECK(tmin >= 0 && tmax < act_scales.numel(), op, ": t holds timesteps in [", tmin,
                ", ", tmax, "] but act_scales has only ", act_scales.numel(), " entries");
  }
  return r;
}

inline void check_weights(const char* op, const Rows& r, const at::Tensor& x,
                          const at::Tensor& w_q, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_same_device(op, w_q, "w_q", x, "x");
  check_same_device(op, w_scale, "w_scale", x, "x");
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2, op,
              ": w_q must be an int8 matrix [N, K], got ", w_q.scalar_type(), " of shape ",
              shape_str(w_q));
  TORCH_CHECK(w_q.size(1) == r.K, op, ": w_q has K = ", w_q.size(1), " (shape ", shape_str(w_q),
              ") but x has K = ", r.K, " (shape ", shape_str(x), ")");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 &&
                  w_scale.size(0) == w_q.size(0),
              op, ": w_scale must be float32 of shape [N] = [", w_q.size(0), "], got ",
              w_scale.scalar_type(), " of shape ", shape_str(w_scale));
  if (bias.has_value()) {
    check_same_device(op, *bias, "bias", x, "x");
    TORCH_CHECK(bias->scalar_type() == out_dtype && bias->dim() == 1 &&
                    bias->size(0) == w_q.size(0),
                op, ": bias must have dtype ", out_dtype, " and shape [N] = [", w_q.size(0),
                "], got ", bias->scalar_type(), " of shape ", shape_str(*bias));
  }
}

// The float activations of int8_linear / quantize_per_sample, on a backend that
// supports `dtype_names`.
inline void check_float_input(const char* op, const at::Tensor& x,
                              bool (*supports)(at::ScalarType), const char* device_name,
                              const char* dtype_names) {
  TORCH_CHECK(supports(x.scalar_type()), op, ": x has dtype ", x.scalar_type(), "; the ",
              device_name, " kernels support ", dtype_names);
}

// Everything an int8 GEMM op checks: activations `a` (float x or int8 x_q) against t
// and the scale table, then the weights; returns a's rows.
inline Rows check_gemm(const char* op, const at::Tensor& a, const char* a_name,
                       const at::Tensor& w_q, const at::Tensor& w_scale,
                       const at::Tensor& act_scales, const at::Tensor& t,
                       const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  Rows r = check_rows(op, a, a_name, act_scales, t);
  check_weights(op, r, a, w_q, w_scale, bias, out_dtype);
  return r;
}

inline void check_int8_input(const char* op, const at::Tensor& x_q) {
  TORCH_CHECK(x_q.scalar_type() == at::kChar, op, ": x_q must be int8, got ", x_q.scalar_type());
}

inline std::vector<int64_t> out_shape(const Rows& r, int64_t N) {
  std::vector<int64_t> s(r.lead);
  s.push_back(N);
  return s;
}

}  // namespace int8
}  // namespace ditkernels
