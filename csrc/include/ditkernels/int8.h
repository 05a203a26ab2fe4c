#pragma once
// Timestep-calibrated W8A8: activations are quantized per sample with a scale looked
// up by the sample's diffusion timestep, weights per output channel.
//   s_b    = act_scales[t[b]]
//   q      = clamp(round_half_even(x / s_b), -127, 127)            (int8)
//   acc    = sum_k q[r, k] * w_q[n, k]                              (exact int32)
//   y[r,n] = (float(acc) * s_b) * w_scale[n] + bias[n]              (fp32, then x's dtype)
// Rows map to samples through `rows_per_sample`: L for x of shape [B, L, K]; 1 for x
// of shape [M, K] with one timestep per row; M when one timestep covers all rows.
// Special values: x / s rounds like torch.round, +-Inf saturates to +-127 as clamp
// does, and NaN quantizes to 0 on every backend (an int8 cannot hold a NaN, and 0 is
// what the CUDA float-to-int conversion gives). Every act_scales[t[b]] must be a
// positive finite number, and K at most kMaxK, so that acc cannot overflow int32.

#include <ATen/ATen.h>

#include <c10/util/accumulate.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "ditkernels/backend.h"
#include "ditkernels/checks.h"

namespace ditkernels {
namespace int8 {

// The largest K whose worst-case dot product, K * 127 * 127, fits the int32 accumulator.
constexpr int64_t kMaxK = std::numeric_limits<int32_t>::max() / (127 * 127);

struct Rows {
  at::Tensor x2d;  // [M, K], unit stride along K
  at::Tensor t;    // int64 [num samples], contiguous
  at::Tensor act_scales;  // fp32 [T], contiguous
  int64_t M = 0, K = 0, rows_per_sample = 1;
  std::vector<int64_t> lead;  // leading dims of x
};

// Where the values of t, and the scales they select, are checked.
enum class ValueChecks {
  kHost,    // here, with a clear message (CPU; on CUDA one synchronisation per call)
  kDevice,  // by the kernels, as they read each scale (int8_scales.cuh): no synchronisation
};

// The CUDA ops' choice: on the device, unless DITKERNELS_HOST_CHECKS is set (and not
// 0), the debug mode that reports a bad timestep or scale with a message naming it.
// Read at every call, so that tests can switch it within one process.
inline ValueChecks cuda_value_checks() {
  const char* env = std::getenv("DITKERNELS_HOST_CHECKS");
  const bool host = env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
  return host ? ValueChecks::kHost : ValueChecks::kDevice;
}

// Checks x against t and act_scales and flattens it to rows; the values of t and of
// the scales they select where `values` says.
inline Rows check_rows(const char* op, const at::Tensor& x, const char* x_name,
                       const at::Tensor& act_scales, const at::Tensor& t,
                       ValueChecks values) {
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
  // M from the leading dims, not reshape(-1, K): that cannot infer M when K = 0.
  r.M = c10::multiply_integers(r.lead);
  r.x2d = x.reshape({r.M, r.K});
  if (r.x2d.stride(1) != 1) r.x2d = r.x2d.contiguous();
  const int64_t samples = x.dim() == 3 ? x.size(0) : r.M;
  if (t.numel() == samples) {
    r.rows_per_sample = x.dim() == 3 ? x.size(1) : 1;
  } else {
    TORCH_CHECK(t.numel() == 1, op, ": t has ", t.numel(), " entries but ", x_name, " of shape ",
                shape_str(x), " holds ", samples, " samples (one timestep each, or a single one)");
    r.rows_per_sample = std::max<int64_t>(r.M, 1);
  }
  r.t = t.contiguous();
  r.act_scales = act_scales.contiguous();
  if (values == ValueChecks::kHost && t.numel() > 0) {
    const int64_t T = act_scales.numel();
    auto [lo, hi] = at::aminmax(r.t);
    // The scales t selects (t clamped so that the gather itself stays in bounds; an
    // out-of-range t is reported first).
    const at::Tensor used = r.act_scales.index_select(0, r.t.clamp(0, T - 1));
    const at::Tensor bad = at::logical_not(at::logical_and(used > 0, used.isfinite())).sum();
    const at::Tensor host = at::stack({lo, hi, bad}).cpu();
    const int64_t* v = host.const_data_ptr<int64_t>();
    TORCH_CHECK(v[0] >= 0 && v[1] < T, op, ": t holds timesteps in [", v[0], ", ", v[1],
                "] but act_scales has only ", T, " entries");
    TORCH_CHECK(v[2] == 0, op, ": act_scales[t] holds ", v[2],
                " scales that are zero, negative or not finite (act_scales of shape ",
                shape_str(act_scales), ", t of shape ", shape_str(t),
                "); every scale must be a positive finite number (an all-zero table is an "
                "uncalibrated one)");
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
  TORCH_CHECK(r.K <= kMaxK, op, ": K = ", r.K, " (w_q of shape ", shape_str(w_q),
              ") exceeds ", kMaxK, ", the largest K whose int8 dot products (up to K * 127 * "
              "127) fit the int32 accumulator; split the reduction");
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


// Everything an int8 GEMM op checks: activations `a` (float x or int8 x_q) against t
// and the scale table, then the weights; returns a's rows.
inline Rows check_gemm(const char* op, const at::Tensor& a, const char* a_name,
                       const at::Tensor& w_q, const at::Tensor& w_scale,
                       const at::Tensor& act_scales, const at::Tensor& t,
                       const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                       ValueChecks values) {
  Rows r = check_rows(op, a, a_name, act_scales, t, values);
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
