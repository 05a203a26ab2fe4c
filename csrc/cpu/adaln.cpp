// CPU kernels of the fused adaLN family: the oracle CI runs, and the path of every
// user without a GPU, so they must keep up with eager PyTorch and torch.compile.
// Rows are independent in the forward pass; the backward pass sums per-(sample, slot)
// partials over fixed token ranges and reduces the slots in order, so results do not
// depend on the thread count.
//
// The row kernels are compiled once per instruction set (ditkernels/cpu_isa.h):
// plain loops over blocks of kLanes elements that the compiler vectorizes at each
// width. FMA contraction may make the variants differ in the last bit; the thread
// count never changes a result.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "ditkernels/adaln.h"
#include "ditkernels/cpu_isa.h"

namespace ditkernels {
namespace {

constexpr int64_t kCpuRowsPerSlot = 32;
// Elements of work below which a call stays on one thread: starting threads costs
// more than they save on small rows (the slowdown at small shapes came from this).
constexpr int64_t kMinElementsPerThread = 32768;

// Sums over a row use kLanes independent partial sums: one serial chain of dependent
// adds would bound the loop by FP-add latency, and the compiler may not reassociate
// it by itself. 16 lanes fill an AVX-512 register of floats. The lanes combine in a
// fixed order (deterministic).
constexpr int64_t kLanes = 16;

// Calls body(c, lane) for c in [0, C), with lane = c % kLanes, in blocks of kLanes
// that the compiler turns into vector code; bodies add into lane-indexed sums.
template <typename F>
DK_ALWAYS_INLINE void for_lanes(int64_t C, F&& body) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) body(c + l, l);
  }
  for (int64_t l = 0; c < C; ++c, ++l) body(c, l);
}

template <typename acc_t>
DK_ALWAYS_INLINE acc_t combine(const acc_t (&lanes)[kLanes]) {
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename acc_t, typename F>
DK_ALWAYS_INLINE acc_t lane_sum(int64_t C, F&& term) {
  acc_t lanes[kLanes] = {};
  for_lanes(C, [&](int64_t c, int64_t l) { lanes[l] += term(c); });
  return combine(lanes);
}

// Two-pass mean and reciprocal standard deviation of v[0..C).
template <typename acc_t>
DK_ALWAYS_INLINE void row_stats(const acc_t* __restrict__ v, int64_t C, double eps, acc_t& mean,
                                acc_t& rstd) {
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

// Row r of x in the accumulation type: x itself when it already is, else converted
// into buf.
template <typename T, typename acc_t = at::opmath_type<T>>
DK_ALWAYS_INLINE const acc_t* row_in_acc(const T* x, int64_t C, acc_t* buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return x;
  } else {
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(x[c]);
    return buf;
  }
}

// Forward pass over rows [r0, r1).
template <typename T>
DK_ALWAYS_INLINE void forward_rows(const AdaLNParams& p, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = p.C;
  Modulation<T> m(p);
  std::vector<acc_t> buf(C);
  acc_t* vbuf = buf.data();
  for (int64_t r = r0; r < r1; ++r) {
    m.load_sample(r / p.N);
    const T* __restrict__ x = static_cast<const T*>(p.x) + r * C;
    const acc_t* v;
    if (p.h) {
      const T* __restrict__ h = static_cast<const T*>(p.h) + r * C;
      T* __restrict__ x_out = static_cast<T*>(p.x_out) + r * C;
      const acc_t* __restrict__ gate = m.gate.data();
      for (int64_t c = 0; c < C; ++c) {
        const T sum = static_cast<T>(static_cast<acc_t>(x[c]) + gate[c] * static_cast<acc_t>(h[c]));
        x_out[c] = sum;
        vbuf[c] = static_cast<acc_t>(sum);
      }
      v = vbuf;
    } else {
      v = row_in_acc(x, C, vbuf);
    }
    acc_t mean, rstd;
    row_stats(v, C, p.eps, mean, rstd);
    T* __restrict__ y = static_cast<T*>(p.y) + r * C;
    const acc_t* __restrict__ w = m.weight.data();
    const acc_t* __restrict__ b = m.bias.data();
    const acc_t* __restrict__ s1 = m.scale1.data();
    const acc_t* __restrict__ sh = m.shift.data();
    for (int64_t c = 0; c < C; ++c) {
      const acc_t n = (v[c] - mean) * rstd * w[c] + b[c];
      y[c] = static_cast<T>(n * s1[c] + sh[c]);
    }
  }
}

// Per-channel sums of one (sample, slot) task, stored to the partials afterwards.
enum Partial { kShift, kScale, kGate, kWeight, kBias, kNumPartials };

template <typename acc_t>
struct RowBuffers {
  acc_t* xin;    // x in the accumulation type, where T is not
  acc_t* xhat;   // normalized x
  acc_t* dxhat;  // gradient w.r.t. xhat, then w.r.t. x
  acc_t* sums[kNumPartials];
};

// xhat, the gradient w.r.t. xhat and the four modulation sums of one row. Separate
// restrict parameters let the compiler vectorize without alias checks; the row sums
// of dxhat are left to lane_sum, since lane sums in this loop keep it scalar.
template <typename T, typename acc_t>
DK_ALWAYS_INLINE void backward_xhat(int64_t C, acc_t mean, acc_t rstd,
                                    const acc_t* __restrict__ xv, const T* __restrict__ gy,
                                    const acc_t* __restrict__ w, const acc_t* __restrict__ bias,
                                    const acc_t* __restrict__ s1, acc_t* __restrict__ xhat,
                                    acc_t* __restrict__ dxhat, acc_t* __restrict__ sum_shift,
                                    acc_t* __restrict__ sum_scale, acc_t* __restrict__ sum_weight,
                                    acc_t* __restrict__ sum_bias) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xh = (xv[c] - mean) * rstd;
    const acc_t dy = static_cast<acc_t>(gy[c]);
    const acc_t dn = dy * s1[c];
    sum_shift[c] += dy;
    sum_scale[c] += dy * (xh * w[c] + bias[c]);
    sum_weight[c] += dn * xh;
    sum_bias[c] += dn;
    xhat[c] = xh;
    dxhat[c] = dn * w[c];
  }
}

// grad_x from xhat and dxhat (plus grad_x_out), and, for the residual op, grad_h and
// the gate's sum, in one pass: the flags are template arguments so that each case
// is a straight loop the compiler vectorizes.
template <bool kWithGradXOut, bool kWithH, typename T, typename acc_t>
DK_ALWAYS_INLINE void backward_dx(int64_t C, acc_t rstd, acc_t m1, acc_t m2,
                                  const acc_t* __restrict__ xhat, const acc_t* __restrict__ dxhat,
                                  const T* __restrict__ gxo, T* __restrict__ gx,
                                  const acc_t* __restrict__ gate, const T* __restrict__ h,
                                  T* __restrict__ gh, acc_t* __restrict__ sum_gate) {
  for (int64_t c = 0; c < C; ++c) {
    acc_t d = rstd * (dxhat[c] - m1 - xhat[c] * m2);
    if constexpr (kWithGradXOut) d += static_cast<acc_t>(gxo[c]);
    gx[c] = static_cast<T>(d);
    if constexpr (kWithH) {
      gh[c] = static_cast<T>(gate[c] * d);
      sum_gate[c] += d * static_cast<acc_t>(h[c]);
    }
  }
}

// Backward pass of row r: writes grad_x (and grad_h), adds into the task's sums.
template <typename T, typename acc_t = at::opmath_type<T>>
DK_ALWAYS_INLINE void backward_row(const AdaLNParams& p, const Modulation<T>& m, int64_t r,
                                   const RowBuffers<acc_t>& buf) {
  const int64_t C = p.C;
  const acc_t* xv = row_in_acc(static_cast<const T*>(p.x) + r * C, C, buf.xin);
  acc_t* __restrict__ xhat = buf.xhat;
  acc_t* __restrict__ dxhat = buf.dxhat;
  acc_t mean, rstd;
  row_stats(xv, C, p.eps, mean, rstd);
  backward_xhat(C, mean, rstd, xv, static_cast<const T*>(p.grad_y) + r * C, m.weight.data(),
                m.bias.data(), m.scale1.data(), xhat, dxhat, buf.sums[kShift], buf.sums[kScale],
                buf.sums[kWeight], buf.sums[kBias]);
  const acc_t m1 = lane_sum<acc_t>(C, [&](int64_t c) { return dxhat[c]; }) / static_cast<acc_t>(C);
  const acc_t m2 =
      lane_sum<acc_t>(C, [&](int64_t c) { return dxhat[c] * xhat[c]; }) / static_cast<acc_t>(C);
  const T* gxo = p.grad_x_out ? static_cast<const T*>(p.grad_x_out) + r * C : nullptr;
  T* gx = static_cast<T*>(p.grad_x) + r * C;
  const T* h = p.h ? static_cast<const T*>(p.h) + r * C : nullptr;
  T* gh = p.h ? static_cast<T*>(p.grad_h) + r * C : nullptr;
  auto dx = [&](auto with_gxo, auto with_h) {
    backward_dx<decltype(with_gxo)::value, decltype(with_h)::value, T, acc_t>(
        C, rstd, m1, m2, xhat, dxhat, gxo, gx, m.gate.data(), h, gh, buf.sums[kGate]);
  };
  if (h) {
    gxo ? dx(std::true_type{}, std::true_type{}) : dx(std::false_type{}, std::true_type{});
  } else {
    gxo ? dx(std::true_type{}, std::false_type{}) : dx(std::false_type{}, std::false_type{});
  }
}

// Backward pass over (sample, slot) tasks [t0, t1).
template <typename T>
DK_ALWAYS_INLINE void backward_tasks(const AdaLNParams& p, int64_t t0, int64_t t1) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = p.C, N = p.N, slots = p.slots;
  Modulation<T> m(p);
  std::vector<acc_t> scratch((3 + kNumPartials) * C);
  RowBuffers<acc_t> buf{scratch.data(), scratch.data() + C, scratch.data() + 2 * C, {}};
  for (int i = 0; i < kNumPartials; ++i) buf.sums[i] = scratch.data() + (3 + i) * C;
  void* const parts[kNumPartials] = {p.part_shift, p.part_scale, p.part_gate, p.part_weight,
                                     p.part_bias};
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t b = task / slots, slot = task % slots;
    m.load_sample(b);
    std::fill(scratch.begin() + 3 * C, scratch.end(), acc_t(0));
    const int64_t n1 = std::min(N, (slot + 1) * kCpuRowsPerSlot);
    for (int64_t n = slot * kCpuRowsPerSlot; n < n1; ++n) backward_row(p, m, b * N + n, buf);
    const int64_t off = (b * slots + slot) * C;
    for (int i = 0; i < kNumPartials; ++i) {
      if (parts[i] == nullptr) continue;
      std::copy(buf.sums[i], buf.sums[i] + C, static_cast<acc_t*>(parts[i]) + off);
    }
  }
}

using RangeFn = void (*)(const AdaLNParams&, int64_t, int64_t);

template <typename T>
struct Variant {
  RangeFn forward, backward;
};

// One forward and one backward entry per instruction set; the always-inline bodies
// are compiled, and vectorized, under each entry's target.
#define DK_ADALN_VARIANT(NAME, TARGET)                                             \
  template <typename T>                                                           \
  TARGET void NAME##_forward(const AdaLNParams& p, int64_t begin, int64_t end) {  \
    forward_rows<T>(p, begin, end);                                               \
  }                                                                               \
  template <typename T>                                                           \
  TARGET void NAME##_backward(const AdaLNParams& p, int64_t begin, int64_t end) { \
    backward_tasks<T>(p, begin, end);                                             \
  }                                                                               \
  template <typename T>                                                           \
  constexpr Variant<T> NAME##_variant{NAME##_forward<T>, NAME##_backward<T>};

DK_ADALN_VARIANT(baseline, )
#ifdef DK_X86_VARIANTS
DK_ADALN_VARIANT(avx2, DK_TARGET_AVX2)
DK_ADALN_VARIANT(avx512, DK_TARGET_AVX512)
#endif
#undef DK_ADALN_VARIANT

template <typename T>
void forward_kernel(const AdaLNParams& p) {
  const RangeFn rows_fn = DK_VARIANT(variant<T>).forward;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / p.C);
  at::parallel_for(0, p.B * p.N, grain,
                   [&](int64_t r0, int64_t r1) { rows_fn(p, r0, r1); });
}

template <typename T>
void backward_kernel(const AdaLNParams& p) {
  const RangeFn tasks_fn = DK_VARIANT(variant<T>).backward;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / (kCpuRowsPerSlot * p.C));
  at::parallel_for(0, p.B * p.slots, grain,
                   [&](int64_t t0, int64_t t1) { tasks_fn(p, t0, t1); });
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

const AdaLNBackend kCpuAdaLN{kCpu, cpu_forward, cpu_backward, cpu_num_slots};

}  // namespace
}  // namespace ditkernels

TORCH_LIBRARY_IMPL(ditkernels, CPU, m) {
  using Ops = ditkernels::AdaLNOps<ditkernels::kCpuAdaLN>;
  m.impl("ln_modulate", &Ops::ln_modulate);
  m.impl("gated_residual_ln_modulate", &Ops::gated_residual_ln_modulate);
  m.impl("ln_modulate_backward", &Ops::ln_modulate_backward);
  m.impl("gated_residual_ln_modulate_backward", &Ops::gated_residual_ln_modulate_backward);
}
