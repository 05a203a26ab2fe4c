#pragma once
// The fused adaLN family: LayerNorm (optionally affine), shift/scale modulation
// and the gated residual that feeds it. One forward and one backward kernel per
// backend serve both ops; the host logic below (checks, allocation, the
// deterministic reduction of per-slot partial sums) is shared by the backends.
//
// Forward, per row r = (b, n) of C features:
//   v      = x                       (ln_modulate)
//   v      = x + gate[b] * h         (gated_residual_ln_modulate; written as x_out,
//                                     rounded to the input dtype before the statistics)
//   y      = ((v - mean) * rstd * weight + bias) * (1 + scale[b]) + shift[b]
// Backward recomputes mean and rstd from the saved LayerNorm input: the row is
// read anyway, so saving statistics would only add traffic.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <tuple>

#include "ditkernels/backend.h"
#include "ditkernels/checks.h"

namespace ditkernels {

// When the sum of squared deviations of a row overflows (finite values of magnitude
// ~1e19 and more in fp32), the kernels sum the squares of the deviations times this
// power of two instead: rstd = k / sqrt(sum((k d)^2) / C). eps, below 1e-30 of such a
// variance, drops out; deviations under ~5e7, whose scaled squares underflow, are
// below 1e-8 of the largest one, so their squares do not register in fp32 anyway.
constexpr float kStatsRescale = 0x1p-100f;

struct AdaLNParams {
  // LayerNorm input (x for the plain op; x, then x_out, for the residual op), [B*N, C].
  const void* x = nullptr;
  const void* h = nullptr;  // residual branch, [B*N, C], or null for the plain op
  const void* gate = nullptr;  // [B, C] with row stride gate_stride, or null (gate = 1)
  const void* shift = nullptr;
  const void* scale = nullptr;
  const void* weight = nullptr;  // [C] or null
  const void* bias = nullptr;    // [C] or null
  int64_t gate_stride = 0, shift_stride = 0, scale_stride = 0;

  // Forward outputs.
  void* x_out = nullptr;  // residual op only
  void* y = nullptr;
  // int8 output instead of y (ln_modulate_int8): y rounded to the input dtype, then
  // quantized with act_scales[t[row / rows_per_sample]].
  int8_t* y_q = nullptr;
  const float* act_scales = nullptr;
  const int64_t* t = nullptr;
  int64_t num_scales = 0;  // act_scales.numel(), for the CUDA kernel's checks of t
  int64_t rows_per_sample = 1;

  // Backward.
  const void* grad_y = nullptr;
  const void* grad_x_out = nullptr;  // may be null
  void* grad_x = nullptr;
  void* grad_h = nullptr;
  // Partial sums [B, slots, C] in the accumulation type (fp64 for fp64 inputs,
  // fp32 otherwise); null where the input is absent.
  void* part_shift = nullptr;
  void* part_scale = nullptr;
  void* part_gate = nullptr;
  void* part_weight = nullptr;
  void* part_bias = nullptr;
  int64_t slots = 1;

  int64_t B = 0, N = 0, C = 0;
  double eps = 1e-6;
};

// A backend's adaLN kernels: its descriptor (backend.h) and entry points.
struct AdaLNBackend {
  Backend backend;
  void (*forward)(const AdaLNParams&, at::ScalarType);
  void (*backward)(AdaLNParams&, at::ScalarType);  // sets p.slots before filling partials
  int64_t (*num_slots)(const AdaLNParams&, at::ScalarType);
};

using OptTensor = std::optional<at::Tensor>;

namespace detail {

inline void check_like_x(const char* op, const at::Tensor& t, const char* name,
                         const at::Tensor& x) {
  check_same_device(op, t, name, x, "x");
  check_same_dtype(op, t, name, x, "x");
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ",
              shape_str(x), ", got ", shape_str(t));
}

inline OptTensor check_per_sample(const char* op, const OptTensor& t, const char* name,
                                  const at::Tensor& x) {
  if (!t.has_value()) return t;
  check_same_device(op, *t, name, x, "x");
  check_same_dtype(op, *t, name, x, "x");
  TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(2), op, ": ",
              name, " must have shape [B, C] = [", x.size(0), ", ", x.size(2),
              "] for x of shape ", shape_str(x), ", got ", shape_str(*t));
  return rows_unit_stride(*t);
}

inline OptTensor check_per_channel(const char* op, const OptTensor& t, const char* name,
                                   const at::Tensor& x) {
  if (!t.has_value()) return t;
  check_same_device(op, *t, name, x, "x");
  check_same_dtype(op, *t, name, x, "x");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(2), op, ": ", name,
              " must have shape [C] = [", x.size(2), "] for x of shape ", shape_str(x),
              ", got ", shape_str(*t));
  return t->contiguous();
}

struct Checked {
  at::Tensor x;
  OptTensor h, gate, shift, scale, weight, bias;
};

// Makes x's device current for the kernels (a no-op for CPU tensors).
struct DeviceScope {
  std::optional<c10::DeviceGuard> guard;
  explicit DeviceScope(const at::Tensor& x) {
    if (!x.is_cpu()) guard.emplace(x.device());
  }
};

inline Checked check_inputs(const AdaLNBackend& be, const char* op, const at::Tensor& x,
                            const OptTensor& h, const OptTensor& gate, const OptTensor& shift,
                            const OptTensor& scale, const OptTensor& weight,
                            const OptTensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape [B, N, C], got ", shape_str(x));
  TORCH_CHECK(x.size(2) >= 1, op, ": x must have at least one feature (C >= 1), got shape ",
              shape_str(x));
  check_backend_dtype(be.backend, op, x, "x");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
  Checked c;
  c.x = x.contiguous();
  if (h.has_value()) {
    check_like_x(op, *h, "h", x);
    c.h = h->contiguous();
  }
  c.gate = check_per_sample(op, gate, "gate", x);
  c.shift = check_per_sample(op, shift, "shift", x);
  c.scale = check_per_sample(op, scale, "scale", x);
  c.weight = check_per_channel(op, weight, "weight", x);
  c.bias = check_per_channel(op, bias, "bias", x);
  return c;
}

inline void fill_inputs(AdaLNParams& p, const Checked& c, double eps) {
  p.x = c.x.data_ptr();
  p.h = opt_ptr(c.h);
  p.gate = opt_ptr(c.gate);
  p.shift = opt_ptr(c.shift);
  p.scale = opt_ptr(c.scale);
  p.weight = opt_ptr(c.weight);
  p.bias = opt_ptr(c.bias);
  p.gate_stride = c.gate ? c.gate->stride(0) : 0;
  p.shift_stride = c.shift ? c.shift->stride(0) : 0;
  p.scale_stride = c.scale ? c.scale->stride(0) : 0;
  p.B = c.x.size(0);
  p.N = c.x.size(1);
  p.C = c.x.size(2);
  p.eps = eps;
}

// Per-sample sums over tokens ([B, slots, C] -> [B, C]) and per-channel sums over
// everything ([B, slots, C] -> [C]), in a fixed order, cast to the input dtype.
inline at::Tensor reduce_slots(const std::optional<at::Tensor>& part, const at::Tensor& x,
                               bool per_sample) {
  if (!part.has_value()) return at::empty({0}, x.options());
  at::Tensor total = per_sample ? part->sum(1) : part->sum(at::IntArrayRef{0, 1});
  return total.to(x.scalar_type());
}

}  // namespace detail

inline std::tuple<at::Tensor, at::Tensor> adaln_forward(
    const AdaLNBackend& be, const char* op, const at::Tensor& x, const OptTensor& h,
    const OptTensor& gate, const OptTensor& shift, const OptTensor& scale,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  detail::Checked c = detail::check_inputs(be, op, x, h, gate, shift, scale, weight, bias, eps);
  const detail::DeviceScope scope(x);
  AdaLNParams p;
  detail::fill_inputs(p, c, eps);
  at::Tensor y = at::empty(c.x.sizes(), c.x.options());
  at::Tensor x_out = c.h ? at::empty(c.x.sizes(), c.x.options()) : at::Tensor();
  p.y = y.data_ptr();
  p.x_out = c.h ? x_out.data_ptr() : nullptr;
  if (p.B * p.N > 0) be.forward(p, c.x.scalar_type());
  return {x_out, y};
}

// ln_modulate with its output quantized to int8 per sample (kernels that support
// it check p.y_q).
inline at::Tensor adaln_forward_int8(const AdaLNBackend& be, const char* op, const at::Tensor& x,
                                     const OptTensor& shift, const OptTensor& scale,
                                     const OptTensor& weight, const OptTensor& bias, double eps,
                                     const at::Tensor& act_scales, const at::Tensor& t,
                                     int64_t rows_per_sample) {
  detail::Checked c = detail::check_inputs(be, op, x, std::nullopt, std::nullopt, shift, scale,
                                           weight, bias, eps);
  const detail::DeviceScope scope(x);
  AdaLNParams p;
  detail::fill_inputs(p, c, eps);
  at::Tensor q = at::empty(c.x.sizes(), c.x.options().dtype(at::kChar));
  p.y_q = q.data_ptr<int8_t>();
  p.act_scales = act_scales.data_ptr<float>();
  p.t = t.data_ptr<int64_t>();
  p.num_scales = act_scales.numel();
  p.rows_per_sample = rows_per_sample;
  if (p.B * p.N > 0) be.forward(p, c.x.scalar_type());
  return q;
}

// Gradients of every tensor input: (grad_x, grad_h, grad_gate, grad_shift, grad_scale,
// grad_weight, grad_bias). Those of absent inputs are empty tensors of shape [0].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                  at::Tensor>
adaln_backward(const AdaLNBackend& be, const char* op, const OptTensor& grad_x_out,
               const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& h,
               const OptTensor& gate, const OptTensor& shift, const OptTensor& scale,
               const OptTensor& weight, const OptTensor& bias, double eps) {
  const NoAutocast no_autocast;
  detail::Checked c = detail::check_inputs(be, op, x, h, gate, shift, scale, weight, bias, eps);
  const detail::DeviceScope scope(x);
  detail::check_like_x(op, grad_y, "grad_y", x);
  at::Tensor gy = grad_y.contiguous();
  at::Tensor gxo;
  if (grad_x_out.has_value()) {
    detail::check_like_x(op, *grad_x_out, "grad_x_out", x);
    gxo = grad_x_out->contiguous();
  }
  AdaLNParams p;
  detail::fill_inputs(p, c, eps);
  at::Tensor grad_x = at::empty(c.x.sizes(), c.x.options());
  at::Tensor grad_h = c.h ? at::empty(c.x.sizes(), c.x.options()) : at::empty({0}, x.options());
  p.grad_y = gy.data_ptr();
  p.grad_x_out = gxo.defined() ? gxo.data_ptr() : nullptr;
  p.grad_x = grad_x.data_ptr();
  p.grad_h = c.h ? grad_h.data_ptr() : nullptr;

  const bool empty = p.B * p.N == 0;
  p.slots = empty ? 1 : be.num_slots(p, c.x.scalar_type());
  const auto acc_dtype = c.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto fopts = c.x.options().dtype(acc_dtype);
  auto partial = [&](bool present) -> std::optional<at::Tensor> {
    if (!present) return std::nullopt;
    // With no rows the sums are zero; the kernels write every slot otherwise.
    return empty ? at::zeros({p.B, p.slots, p.C}, fopts) : at::empty({p.B, p.slots, p.C}, fopts);
  };
  auto part_shift = partial(c.shift.has_value());
  auto part_scale = partial(c.scale.has_value());
  auto part_gate = partial(c.gate.has_value());
  auto part_weight = partial(c.weight.has_value());
  auto part_bias = partial(c.bias.has_value());
  auto fptr = [](const std::optional<at::Tensor>& t) -> void* {
    return t ? t->data_ptr() : nullptr;
  };
  p.part_shift = fptr(part_shift);
  p.part_scale = fptr(part_scale);
  p.part_gate = fptr(part_gate);
  p.part_weight = fptr(part_weight);
  p.part_bias = fptr(part_bias);
  if (!empty) be.backward(p, c.x.scalar_type());

  return {grad_x,
          grad_h,
          detail::reduce_slots(part_gate, x, true),
          detail::reduce_slots(part_shift, x, true),
          detail::reduce_slots(part_scale, x, true),
          detail::reduce_slots(part_weight, x, false),
          detail::reduce_slots(part_bias, x, false)};
}

// The four registered ops, written once over a backend; each backend's file registers
// AdaLNOps<its AdaLNBackend>::ln_modulate and so on.
template <const AdaLNBackend& be>
struct AdaLNOps {
  static at::Tensor ln_modulate(const at::Tensor& x, const OptTensor& shift,
                                const OptTensor& scale, double eps, const OptTensor& weight,
                                const OptTensor& bias) {
    return std::get<1>(adaln_forward(be, "ln_modulate", x, std::nullopt, std::nullopt, shift,
                                     scale, weight, bias, eps));
  }

  static std::tuple<at::Tensor, at::Tensor> gated_residual_ln_modulate(
      const at::Tensor& x, const at::Tensor& h, const OptTensor& gate, const OptTensor& shift,
      const OptTensor& scale, double eps, const OptTensor& weight, const OptTensor& bias) {
    return adaln_forward(be, "gated_residual_ln_modulate", x, h, gate, shift, scale, weight,
                         bias, eps);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  ln_modulate_backward(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& shift,
                       const OptTensor& scale, double eps, const OptTensor& weight,
                       const OptTensor& bias) {
    auto g = adaln_backward(be, "ln_modulate_backward", std::nullopt, grad_y, x, std::nullopt,
                            std::nullopt, shift, scale, weight, bias, eps);
    return {std::get<0>(g), std::get<3>(g), std::get<4>(g), std::get<5>(g), std::get<6>(g)};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                    at::Tensor>
  gated_residual_ln_modulate_backward(const OptTensor& grad_x_out, const at::Tensor& grad_y,
                                      const at::Tensor& x_out, const at::Tensor& h,
                                      const OptTensor& gate, const OptTensor& shift,
                                      const OptTensor& scale, double eps,
                                      const OptTensor& weight, const OptTensor& bias) {
    return adaln_backward(be, "gated_residual_ln_modulate_backward", grad_x_out, grad_y, x_out,
                          h, gate, shift, scale, weight, bias, eps);
  }
};

// The CUDA adaLN kernels (csrc/cuda/adaln.cu), which ln_modulate_int8 (csrc/cuda/int8.cu)
// runs with an int8 store.
extern const AdaLNBackend kCudaAdaLN;

}  // namespace ditkernels
