// CPU skip_concat_linear: two BLAS GEMMs accumulating into one output, each
// reading its operand in place, so the [M, 2D] concat is never built.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ditkernels/skip_concat_linear.h"

namespace ditkernels {
namespace {

skip_concat_linear::Checked check_cpu(const char* op, const at::Tensor& x,
                                      const at::Tensor& skip, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias) {
  return skip_concat_linear::check(kCpu, op, x, skip, weight, bias);
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& skip, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  const NoAutocast no_autocast;
  auto c = check_cpu("skip_concat_linear", x, skip, weight, bias);
  const at::Tensor w_x = c.weight.narrow(1, 0, c.D), w_skip = c.weight.narrow(1, c.D, c.D);
  at::Tensor y = c.bias ? at::addmm(*c.bias, c.x2d, w_x.t()) : at::mm(c.x2d, w_x.t());
  y.addmm_(c.skip2d, w_skip.t());
  return y.view(c.out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& skip,
    const at::Tensor& weight, bool has_bias) {
  auto c = check_cpu("skip_concat_linear_backward", x, skip, weight, std::nullopt);
  check_same_device("skip_concat_linear_backward", grad_y, "grad_y", x, "x");
  check_same_dtype("skip_concat_linear_backward", grad_y, "grad_y", x, "x");
  return skip_concat_linear::backward(grad_y, c, has_bias);
}

}  // namespace
}  // namespace ditkernels

TORCH_LIBRARY_IMPL(ditkernels, CPU, m) {
  m.impl("skip_concat_linear", &ditkernels::forward_cpu);
  m.impl("skip_concat_linear_backward", &ditkernels::backward_cpu);
}
