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

// Per-channel and per-sample vectors in the accumulation type, with absent inputs
// replaced by their neutral value, so the row loops below are plain array code.
template <typename T>
struct Modulation {
  using acc_t = at::opmath_type<T>;
  const AdaLNParams& p;
  std::vector<acc_t> weight, bias, scale1, shift, gate;
  int64_t sample = -1;

  explicit Modulation(const AdaLNParams& params)
      : p(params), weight(p.C), bias(p.C), scale1(p.C), shift(p.C), gate(p.C) {
    fill(weight, p.weight, 0, acc_t(1));
    fill(bias, p.bias, 0, acc_t(0));
  }

  void fill(std::vector<acc_t>& out, const void* base, int64_t offset, acc_t absent) {
    if (base == nullptr) {
      std::fill(out.begin(), out.end(), absent);
      return;
    }
    const T* src = static_cast<const T*>(base) + offset;
    for (int64_t c = 0; c < p.C; ++c) out[c] = static_cast<acc_t>(src[c]);
  }

  void load_sample(int64_t b) {
    if (b == sample) return;
    sample = b;
    fill(scale1, p.scale, b * p.scale_stride, acc_t(0));
    for (auto& v : scale1) v += acc_t(1);
    fill(shift, p.shift, b * p.shift_stride, acc_t(0));
    fill(gate, p.gate, b * p.gate_stride, acc_t(1));
  }
};

// Sums over a row use kLanes independent partial sums: one serial chain of
// dependent adds would bound the loop by FP-add latency, and the compiler may not
// reassociate it by itself. The lanes combine in a fixed order (deterministic).
constexpr int64_t kLanes = 8;

template <typename acc_t, typename F>
acc_t lane_sum(int64_t C, F&& term) {
  acc_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += term(c + l);
  }
  for (; c < C; ++c) lanes[c % kLanes] += term(c);
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Two-pass mean and reciprocal standard deviation of v[0..C).
template <typename acc_t>
void row_stats(const acc_t* v, int64_t C, double eps, acc_t& mean, acc_t& rstd) {
  mean = lane_sum<acc_t>(C, [&](int64_t c) { return v[c]; }) / static_cast<acc_t>(C);
  const acc_t sq = lane_sum<acc_t>(C, [&](int64_t c) {
    const acc_t d = v[c] - mean;
    return d * d;
  });
  if (std::isinf(sq)) {
    // Finite deviations whose squares overflow (|v| ~ 1e19 in fp32): redo the sum on
    // deviations scaled by kStatsRescale, exact powers of two, as the CUDA kernel does.
    const acc_t k = static_cast<acc_t>(kStatsRescale);
    const acc_t sq_k = lane_sum<acc_t>(C, [&](int64_t c) {
      const acc_t d = (v[c] - mean) * k;
      return d * d;
    });
    rstd = k / std::sqrt(sq_k / static_cast<acc_t>(C));
    return;
  }
  rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(C) + static_cast<acc_t>(eps));
}

template <typename T>
void forward_kernel(const AdaLNParams& p) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = p.C, rows = p.B * p.N;
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    Modulation<T> m(p);
    std::vector<acc_t> v(C);
    for (int64_t r = r0; r < r1; ++r) {
      m.load_sample(r / p.N);
      const T* x = static_cast<const T*>(p.x) + r * C;
      if (p.h) {
        const T* h = static_cast<const T*>(p.h) + r * C;
        T* x_out = static_cast<T*>(p.x_out) + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const T sum = static_cast<T>(static_cast<acc_t>(x[c]) +
                                       m.gate[c] * static_cast<acc_t>(h[c]));
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
        const acc_t n = (v[c] - mean) * rstd * m.weight[c] + m.bias[c];
        y[c] = static_cast<T>(n * m.scale1[c] + m.shift[c]);
      }
    }
  });
}

template <typename T>
void backward_kernel(const AdaLNParams& p) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = p.C, N = p.N, slots = p.slots;
  at::parallel_for(0, p.B * slots, 1, [&](int64_t t0, int64_t t1) {
    Modulation<T> m(p);
    std::vector<acc_t> xhat(C), dxhat(C);
    std::vector<acc_t> acc_shift(C), acc_scale(C), acc_gate(C), acc_weight(C), acc_bias(C);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / slots, slot = task % slots;
      m.load_sample(b);
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
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xh = (xhat[c] - mean) * rstd;
          const acc_t w = m.weight[c];
          const acc_t dy = static_cast<acc_t>(gy[c]);
          const acc_t dn = dy * m.scale1[c];
          acc_shift[c] += dy;
          acc_scale[c] += dy * (xh * w + m.bias[c]);
          acc_weight[c] += dn * xh;
          acc_bias[c] += dn;
          xhat[c] = xh;
          dxhat[c] = dn * w;
        }
        const acc_t s1 = lane_sum<acc_t>(C, [&](int64_t c) { return dxhat[c]; });
        const acc_t s2 = lane_sum<acc_t>(C, [&](int64_t c) { return dxhat[c] * xhat[c]; });
        const acc_t m1 = s1 / static_cast<acc_t>(C), m2 = s2 / static_cast<acc_t>(C);
        T* gx = static_cast<T*>(p.grad_x) + r * C;
        const T* gxo = p.grad_x_out ? static_cast<const T*>(p.grad_x_out) + r * C : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          dxhat[c] = rstd * (dxhat[c] - m1 - xhat[c] * m2);
        }
        if (gxo) {
          for (int64_t c = 0; c < C; ++c) dxhat[c] += static_cast<acc_t>(gxo[c]);
        }
        for (int64_t c = 0; c < C; ++c) gx[c] = static_cast<T>(dxhat[c]);
        if (p.h) {
          const T* h = static_cast<const T*>(p.h) + r * C;
          T* gh = static_cast<T*>(p.grad_h) + r * C;
          for (int64_t c = 0; c < C; ++c) {
            gh[c] = static_cast<T>(m.gate[c] * dxhat[c]);
            acc_gate[c] += dxhat[c] * static_cast<acc_t>(h[c]);
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
  // The CPU ln_modulate_int8 quantizes ln_modulate's output (csrc/cpu/int8.cpp).
  TORCH_CHECK(p.y_q == nullptr, "the CPU adaLN kernel has no int8 output");
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
