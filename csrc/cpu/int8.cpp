// CPU timestep-calibrated int8 ops: exact int32 accumulation of int8 products,
// bit-identical to an integer reference; quantization rounds half to even, as
// torch.round does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ditkernels/cpu_isa.h"
#include "ditkernels/int8.h"

namespace ditkernels {
namespace {

DK_ALWAYS_INLINE int8_t quantize_value(float v, float s) {
  const float q = std::nearbyint(v / s);  // default rounding mode: half to even
  if (std::isnan(q)) return 0;  // as the CUDA conversion (int8.h)
  return static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
}

inline float row_scale(const int8::Rows& r, const float* act_scales, const int64_t* t,
                       int64_t row) {
  return act_scales[t[row / r.rows_per_sample]];
}

// Rows [r0, r1) of x quantized into q. Division and round-half-even are exact in
// every instruction set, so the variants agree bit for bit.
template <typename T>
DK_ALWAYS_INLINE void quantize_range(const int8::Rows& r, const float* scales, const int64_t* t,
                                     int8_t* q, int64_t r0, int64_t r1) {
  // Locals, not r's fields: int8 stores may alias anything, which would make the
  // compiler reload the trip count and give up vectorizing.
  const T* x = r.x2d.data_ptr<T>();
  const int64_t stride = r.x2d.stride(0), K = r.K;
  for (int64_t row = r0; row < r1; ++row) {
    const float s = row_scale(r, scales, t, row);
    const T* __restrict__ src = x + row * stride;
    int8_t* __restrict__ dst = q + row * K;
    for (int64_t k = 0; k < K; ++k) dst[k] = quantize_value(static_cast<float>(src[k]), s);
  }
}

using QuantizeFn = void (*)(const int8::Rows&, const float*, const int64_t*, int8_t*, int64_t,
                            int64_t);

#define DK_QUANTIZE_VARIANT(NAME, TARGET)                                                \
  template <typename T>                                                                  \
  TARGET void NAME##_quantize(const int8::Rows& r, const float* scales, const int64_t* t, \
                              int8_t* q, int64_t r0, int64_t r1) {                       \
    quantize_range<T>(r, scales, t, q, r0, r1);                                          \
  }

DK_QUANTIZE_VARIANT(baseline, )
#ifdef DK_X86_VARIANTS
DK_QUANTIZE_VARIANT(avx2, DK_TARGET_AVX2)
DK_QUANTIZE_VARIANT(avx512, DK_TARGET_AVX512)
#endif
#undef DK_QUANTIZE_VARIANT

// Elements per thread below which a loop stays on one thread.
constexpr int64_t kMinElementsPerThread = 16384;

at::Tensor quantize_rows(const int8::Rows& r, const at::Tensor& act_scales) {
  at::Tensor q = at::empty({r.M, r.K}, r.x2d.options().dtype(at::kChar));
  const float* scales = act_scales.data_ptr<float>();
  const int64_t* t = r.t.data_ptr<int64_t>();
  int8_t* qp = q.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.x2d.scalar_type(), "quantize", [&] {
    const QuantizeFn fn = DK_VARIANT(quantize<scalar_t>);
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(r.K, 1));
    at::parallel_for(0, r.M, grain, [&](int64_t r0, int64_t r1) { fn(r, scales, t, qp, r0, r1); });
  });
  return q;
}

// y = (float(q w^T) * s_row) * w_scale + bias, in out_dtype. The int8 product is
// ATen's exact int32 GEMM (oneDNN's VNNI/AMX kernels where the CPU has them); the
// dequantization is one pass over its rows, compiled for the baseline ISA only: FMA
// contraction of "* w_scale + bias" would break bit equality with the reference.
at::Tensor gemm_dequant(const int8::Rows& r, const at::Tensor& q, const at::Tensor& w_q,
                        const at::Tensor& w_scale, const at::Tensor& act_scales,
                        const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const int64_t N = w_q.size(0);
  // torch._int_mm on CPU (2.14) returns wrong sums for K = 1 with N > 1, and for
  // operands with a zero stride (expanded views); so K = 1 is an outer product, exact
  // in int32, and the operands are made contiguous (free for the usual layouts).
  const at::Tensor acc = r.K == 1 ? q.to(at::kInt) * w_q.t().to(at::kInt)
                                  : at::_int_mm(q.contiguous(), w_q.contiguous().t());
  const at::Tensor ws = w_scale.contiguous();
  at::Tensor y = at::empty({r.M, N}, q.options().dtype(out_dtype));
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const float* scales = act_scales.data_ptr<float>();
  const int64_t* t = r.t.data_ptr<int64_t>();
  const int32_t* accp = acc.data_ptr<int32_t>();
  const float* wsp = ws.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "int8_gemm_dequant", [&] {
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(N, 1));
    at::parallel_for(0, r.M, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int32_t* __restrict__ a = accp + row * N;
        const float s = row_scale(r, scales, t, row);
        scalar_t* __restrict__ out = yp + row * N;
        if (bp) {
          for (int64_t n = 0; n < N; ++n) {
            const float v = (static_cast<float>(a[n]) * s) * wsp[n];
            out[n] = static_cast<scalar_t>(v + static_cast<float>(bp[n]));
          }
        } else {
          for (int64_t n = 0; n < N; ++n) {
            out[n] = static_cast<scalar_t>((static_cast<float>(a[n]) * s) * wsp[n]);
          }
        }
      }
    });
  });
  return y;
}

void check_float(const char* op, const at::Tensor& x) { check_backend_dtype(kCpu, op, x, "x"); }

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                           const at::Tensor& act_scales, const at::Tensor& t,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "int8_linear";
  check_float(op, x);
  auto r = int8::check_gemm(op, x, "x", w_q, w_scale, act_scales, t, bias, x.scalar_type(),
                            int8::ValueChecks::kHost);
  at::Tensor q = quantize_rows(r, r.act_scales);
  return gemm_dequant(r, q, w_q, w_scale, r.act_scales, bias, x.scalar_type())
      .view(int8::out_shape(r, w_q.size(0)));
}

at::Tensor int8_gemm_dequant_cpu(const at::Tensor& x_q, const at::Tensor& w_q,
                                 const at::Tensor& w_scale, const at::Tensor& act_scales,
                                 const at::Tensor& t, const std::optional<at::Tensor>& bias,
                                 at::ScalarType out_dtype) {
  const char* op = "int8_gemm_dequant";
  int8::check_int8_input(op, x_q);
  auto r = int8::check_gemm(op, x_q, "x_q", w_q, w_scale, act_scales, t, bias, out_dtype,
                            int8::ValueChecks::kHost);
  return gemm_dequant(r, r.x2d, w_q, w_scale, r.act_scales, bias, out_dtype)
      .view(int8::out_shape(r, w_q.size(0)));
}

at::Tensor quantize_per_sample_cpu(const at::Tensor& x, const at::Tensor& act_scales,
                                   const at::Tensor& t) {
  const char* op = "quantize_per_sample";
  check_float(op, x);
  auto r = int8::check_rows(op, x, "x", act_scales, t, int8::ValueChecks::kHost);
  return quantize_rows(r, r.act_scales).view(x.sizes());
}

at::Tensor ln_modulate_int8_cpu(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                const std::optional<at::Tensor>& scale, double eps,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias,
                                const at::Tensor& act_scales, const at::Tensor& t) {
  static auto ln_modulate =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ditkernels::ln_modulate", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  TORCH_CHECK(x.dim() == 3, "ln_modulate_int8: x must have shape [B, N, C], got ", shape_str(x));
  auto r = int8::check_rows("ln_modulate_int8", x, "x", act_scales, t,
                            int8::ValueChecks::kHost);
  at::Tensor y = ln_modulate.call(x, shift, scale, eps, weight, bias);
  r.x2d = y.view({-1, r.K});
  return quantize_rows(r, r.act_scales).view(x.sizes());
}

}  // namespace
}  // namespace ditkernels

TORCH_LIBRARY_IMPL(ditkernels, CPU, m) {
  m.impl("int8_linear", &ditkernels::int8_linear_cpu);
  m.impl("int8_gemm_dequant", &ditkernels::int8_gemm_dequant_cpu);
  m.impl("quantize_per_sample", &ditkernels::quantize_per_sample_cpu);
  m.impl("ln_modulate_int8", &ditkernels::ln_modulate_int8_cpu);
}
