#pragma once
// U-ViT's long-skip merge, Linear(cat([x, skip], -1)), without the concat:
//   y = x @ weight[:, :D]^T + skip @ weight[:, D:]^T + bias
// The host logic here (checks, flattening, and the backward, which is four GEMMs
// that read every operand in place) is shared by the CPU and CUDA backends; the
// backends differ in the forward kernel.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <tuple>

#include "ditkernels/backend.h"
#include "ditkernels/checks.h"

namespace ditkernels {
namespace skip_concat_linear {

struct Checked {
  at::Tensor x2d, skip2d;  // [M, D], unit stride along D
  at::Tensor weight;       // [Dout, 2D], contiguous (the CUDA kernels assume row stride 2D)
  std::optional<at::Tensor> bias;
  std::vector<int64_t> out_shape;
  int64_t M = 0, D = 0, Dout = 0;
};

inline at::Tensor rows_2d(const at::Tensor& t, int64_t D) {
  at::Tensor r = t.reshape({-1, D});
  return r.stride(1) == 1 ? r : r.contiguous();
}

inline Checked check(const Backend& be, const char* op, const at::Tensor& x,
                     const at::Tensor& skip, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim [..., D], got shape ",
              shape_str(x));
  TORCH_CHECK(skip.sizes() == x.sizes(), op, ": skip must have the shape of x ", shape_str(x),
              ", got ", shape_str(skip));
  check_same_device(op, skip, "skip", x, "x");
  check_same_device(op, weight, "weight", x, "x");
  check_same_dtype(op, skip, "skip", x, "x");
  check_same_dtype(op, weight, "weight", x, "x");
  check_backend_dtype(be, op, x, "x");
  const int64_t D = x.size(-1);
  TORCH_CHECK(D >= 1, op, ": x must have at least one feature, got shape ", shape_str(x));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == 2 * D && weight.size(0) >= 1, op,
              ": weight must have shape [Dout, 2 * D] = [Dout, ", 2 * D, "] for x of shape ",
              shape_str(x), ", got ", shape_str(weight));
  Checked c;
  c.D = D;
  c.Dout = weight.size(0);
  if (bias.has_value()) {
    check_same_device(op, *bias, "bias", x, "x");
    check_same_dtype(op, *bias, "bias", x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c.Dout, op, ": bias must have shape [Dout] = [",
                c.Dout, "], got ", shape_str(*bias));
    c.bias = bias->contiguous();
  }
  c.x2d = rows_2d(x, D);
  c.skip2d = rows_2d(skip, D);
  c.M = c.x2d.size(0);
  c.weight = weight.contiguous();
  c.out_shape = x.sizes().vec();
  c.out_shape.back() = c.Dout;
  return c;
}

// (grad_x, grad_skip, grad_weight, grad_bias); grad_bias is empty without a bias.
// dx = dy W[:, :D], dskip = dy W[:, D:], dW[:, :D] = dy^T x, dW[:, D:] = dy^T skip.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const Checked& c, bool has_bias) {
  const NoAutocast no_autocast;
  TORCH_CHECK(grad_y.sizes() == c10::IntArrayRef(c.out_shape),
              "skip_concat_linear_backward: grad_y must have shape ",
              c10::IntArrayRef(c.out_shape), ", got ", shape_str(grad_y));
  at::Tensor dy = grad_y.reshape({c.M, c.Dout});
  const at::Tensor w_x = c.weight.narrow(1, 0, c.D), w_skip = c.weight.narrow(1, c.D, c.D);
  at::Tensor grad_x = at::mm(dy, w_x);
  at::Tensor grad_skip = at::mm(dy, w_skip);
  at::Tensor grad_weight = at::empty({c.Dout, 2 * c.D}, c.weight.options());
  at::Tensor dy_t = dy.t();
  grad_weight.narrow(1, 0, c.D).copy_(at::mm(dy_t, c.x2d));
  grad_weight.narrow(1, c.D, c.D).copy_(at::mm(dy_t, c.skip2d));
  at::Tensor grad_bias = has_bias ? dy.sum(0) : at::empty({0}, dy.options());
  std::vector<int64_t> in_shape(c.out_shape);
  in_shape.back() = c.D;
  return {grad_x.view(in_shape), grad_skip.view(in_shape), grad_weight, grad_bias};
}

}  // namespace skip_concat_linear
}  // namespace ditkernels
