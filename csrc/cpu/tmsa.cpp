// CPU TMSA: the blocked implementation of csrc/include/ditkernels/tmsa.h (BLAS
// matmuls over query blocks, the bias gathered per block from the table).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ditkernels/tmsa.h"

namespace ditkernels {
namespace {

tmsa::Args check_cpu(const char* op, const at::Tensor& qkv,
                     const std::optional<at::Tensor>& time_qkv,
                     const std::optional<at::Tensor>& rel_table, int64_t grid_h, int64_t grid_w,
                     int64_t num_leading, double scale) {
  return tmsa::check(kCpu, op, qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale);
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& qkv,
                                               const std::optional<at::Tensor>& time_qkv,
                                               const std::optional<at::Tensor>& rel_table,
                                               int64_t grid_h, int64_t grid_w,
                                               int64_t num_leading, double scale) {
  return tmsa::forward_blocked(
      check_cpu("tmsa", qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const std::optional<at::Tensor>& time_qkv,
    const std::optional<at::Tensor>& rel_table, const at::Tensor& out, const at::Tensor& lse,
    int64_t grid_h, int64_t grid_w, int64_t num_leading, double scale) {
  auto a = check_cpu("tmsa_backward", qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale);
  tmsa::check_backward_tensors("tmsa_backward", a, grad_out, out, lse);
  return tmsa::backward_blocked(a, grad_out, out, lse);
}

}  // namespace
}  // namespace ditkernels

TORCH_LIBRARY_IMPL(ditkernels, CPU, m) {
  m.impl("tmsa", &ditkernels::forward_cpu);
  m.impl("tmsa_backward", &ditkernels::backward_cpu);
}
