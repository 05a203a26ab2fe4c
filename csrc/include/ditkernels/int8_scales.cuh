#pragma once
// The activation scale of a row, as the CUDA int8 kernels read it: s = act_scales[t[b]]
// for the row's sample b = row / rows_per_sample. The CUDA ops do not check the values
// of t and act_scales on the host (that would cost a synchronisation per call and
// break CUDA-graph capture; int8::cuda_value_checks): every read checks them here
// instead. An out-of-range timestep, or a scale that is zero, negative or not finite,
// fails the launch (DK_DEVICE_CHECK); the timestep is clamped first, so that the read
// itself stays in bounds.

#include <cstdint>

#include "ditkernels/cuda_runtime.cuh"
#include "ditkernels/int8.h"

namespace ditkernels {
namespace int8 {

__device__ __forceinline__ float row_scale(const float* act_scales, int64_t num_scales,
                                           const int64_t* t, int64_t rows_per_sample,
                                           int64_t row) {
  const int64_t ts = t[row / rows_per_sample];
  const float s = act_scales[ts < 0 ? 0 : (ts < num_scales ? ts : num_scales - 1)];
  DK_DEVICE_CHECK(ts >= 0 && ts < num_scales,
                  "int8: a timestep t is outside [0, act_scales.numel()) (set "
                  "DITKERNELS_HOST_CHECKS=1 for the value)");
  // Written so that NaN fails: every comparison with it is false.
  DK_DEVICE_CHECK(s > 0.f && s <= 3.40282347e38f,
                  "int8: act_scales[t] holds a scale that is zero, negative or not finite (set "
                  "DITKERNELS_HOST_CHECKS=1 for the count)");
  return s;
}

// The scale table as a kernel parameter.
struct RowScales {
  const float* act_scales;  // [num_scales]
  const int64_t* t;         // [samples]
  int64_t num_scales;
  int64_t rows_per_sample;

  __device__ __forceinline__ float operator()(int64_t row) const {
    return row_scale(act_scales, num_scales, t, rows_per_sample, row);
  }
};

inline RowScales row_scales(const Rows& r) {
  return {r.act_scales.data_ptr<float>(), r.t.data_ptr<int64_t>(), r.act_scales.numel(),
          r.rows_per_sample};
}

}  // namespace int8
}  // namespace ditkernels
