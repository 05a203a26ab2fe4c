// CPU kernels of the fused adaLN family: the oracle CI runs, and a working path
// for CPU users. Rows are independent in the forward pass; the backward pass
// sums per-(sample, slot) partials over fixed token ranges and reduces the slots
// in order, so results do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ditkernels/adaln.h"

namespace ditkernels {
namespace {

constexpr int64_t kCpuRowsPerSlot = 32;

template <typename T>
struct RowView {
  const AdaLNParams& p;
  int64_t b;
  using acc_t = at::opmath_type<T>;

  acc_t per_sample(const void* base, int64_t stride, int64_t c, acc_t absent) const {
    return base ? static_cast<acc_t>(static_cast<const T*>(base)[b * stride + c]) : absent;
  }
  acc_t gate(int64_t c) const { return per_sample(p.gate, p.gate_stride, c, acc_t(1)); }
  acc_t shift(int64_t c) const { return per_sample(p.shift, p.shift_stride, c, acc_t(0)); }
  acc_t scale(int64_t c) const { return per_sample(p.scale, p.scale_stride, c, acc_t(0)); }
  acc_t weight(int64_t c) const {
    return p.weight ? static_cast<acc_t>(static_cast<const T*>(p.weight)[c]) : acc_t(1);
  }
  acc_t bias(int64_t c) const {
    return p.bias ? static_cast<acc_t>(static_cast<const T*>(p.bias)[c]) : acc_t(0);
  }
};

// Two-pass mean and reciprocal standard deviation of v[0..C).
template <typename acc_t>
void row_stats(const acc_t* v, int64_t C, double eps, acc_t& mean, acc_t& rstd) {
  acc_t sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += v[c];
  mean = sum / static_cast<acc_t>(C);
  acc_t sq = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = v[c] - mean;
    sq += d * d;
  }
  rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(C) + static_cast<acc_t>(eps));
}

template <typename T>
void forward_kernel(const AdaLNParams& p) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = p.C, rows = p.B * p.N;
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> v(C);
    for (int64_t r = r0; r < r1; ++r) {
      const RowView<T> rv{p, r / p.N};
      const T* x = static_cast<const T*>(p.x) + r * C;
      if (p.h) {
        const T* h = static_cast<const T*>(p.h) + r * C;
        T* x_out = static_cast<T*>(p.x_out) + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const T sum = static_cast<T>(static_cast<acc_t>(x[c]) +
                                       rv.gate(c) * static_cast<acc_t>(h[c]));
          x_out[c] = sum;
          v[c] = static_cast<acc_t>(sum);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) v[c] = static_cast<acc_t>(x[c]);
      }
      acc_t mean, rstd;
      row_stats(v.data(), C, p.eps, mean, rstd);
      T* y = static_cast<T*>(p.y) + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t n = (v[c] - mean) * rstd * rv.weight(c) + rv.bias(c);
        y[c] = static_cast<T>(n * (acc_t(1) + rv.scale(c)) + rv.shift(c));
      }
    }
  });
}

template <typename T>
void backward_kernel(const AdaLNParams& p) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = p.C, N = p.N, slots = p.slots;
  at::parallel_for(0, p.B * slots, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> xhat(C), dxhat(C);
    std::vector<acc_t> acc_shift(C), acc_scale(C), acc_gate(C), acc_weight(C), acc_bias(C);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / slots, slot = task % slots;
      const RowView<T> rv{p, b};
      std::fill(acc_shift.begin(), acc_shift.end(), acc_t(0));
      std::fill(acc_scale.begin(), acc_scale.end(), acc_t(0));
      std::fill(acc_gate.begin(), acc_gate.end(), acc_t(0));
      std::fill(acc_weight.begin(), acc_weight.end(), acc_t(0));
      std::fill(acc_bias.begin(), acc_bias.end(), acc_t(0));
      const int64_t n1 = std::min(N, (slot + 1) * kCpuRowsPerSlot);
      for (int64_t n = slot * kCpuRowsPerSlot; n < n1; ++n) {
        const int64_t r = b * N + n;
        const T* x = static_cast<const T*>(p.x) + r * C;
        const T* gy = static_cast<const T*>(p.grad_y) + r * C;
        for (int64_t c = 0; c < C; ++c) xhat[c] = static_cast<acc_t>(x[c]);
        acc_t mean, rstd;
        row_stats(xhat.data(), C, p.eps, mean, rstd);
        acc_t s1 = 0, s2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xh = (xhat[c] - mean) * rstd;
          const acc_t w = rv.weight(c);
          const acc_t dy = static_cast<acc_t>(gy[c]);
          const acc_t dn = dy * (acc_t(1) + rv.scale(c));
          acc_shift[c] += dy;
          acc_scale[c] += dy * (xh * w + rv.bias(c));
          acc_weight[c] += dn * xh;
          acc_bias[c] += dn;
          const acc_t dxh = dn * w;
          s1 += dxh;
          s2 += dxh * xh;
          xhat[c] = xh;
          dxhat[c] = dxh;
        }
        const acc_t m1 = s1 / static_cast<acc_t>(C), m2 = s2 / static_cast<acc_t>(C);
        T* gx = static_cast<T*>(p.grad_x) + r * C;
        const T* gxo = p.grad_x_out ? static_cast<const T*>(p.grad_x_out) + r * C : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          acc_t dx = rstd * (dxhat[c] - m1 - xhat[c] * m2);
          if (gxo) dx += static_cast<acc_t>(gxo[c]);
          gx[c] = static_cast<T>(dx);
          if (p.h) {
            const T* h = static_cast<const T*>(p.h) + r * C;
            static_cast<T*>(p.grad_h)[r * C + c] = static_cast<T>(rv.gate(c) * dx);
            acc_gate[c] += dx * static_cast<acc_t>(h[c]);
          }
        }
      }
      const int64_t off = (b * slots + slot) * C;
      auto store = [&](void* part, const std::vector<acc_t>& acc) {
        if (part == nullptr) return;
        std::copy(acc.begin(), acc.end(), static_cast<acc_t*>(part) + off);
      };
      store(p.part_shift, acc_shift);
      store(p.part_scale, acc_scale);
      store(p.part_gate, acc_gate);
      store(p.part_weight, acc_weight);
      store(p.part_bias, acc_bias);
    }
  });
}

bool cpu_supports(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void cpu_forward(const AdaLNParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adaln_forward_cpu",
                                  [&] { forward_kernel<scalar_t>(p); });
}

void cpu_backward(AdaLNParams& p, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adaln_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(p); });
}

int64_t cpu_num_slots(const AdaLNParams& p, at::ScalarType) {
  return (p.N + kCpuRowsPerSlot - 1) / kCpuRowsPerSlot;
}

const AdaLNBackend kCpuBackend{"CPU", "float32, float64, float16 and bfloat16", cpu_supports,
                               cpu_forward, cpu_backward, cpu_num_slots};

}  // namespace
}  // namespace ditkernels

TORCH_LIBRARY_IMPL(ditkernels, CPU, m) { DK_REGISTER_ADALN_OPS(m, ::ditkernels::kCpuBackend); }
