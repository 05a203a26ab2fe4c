#pragma once
// Backend descriptors: the dtypes each backend's kernels accept, named once for the
// host-side checks of every op family and for their messages. A family that needs
// more per backend (the adaLN kernels' entry points, adaln.h) wraps one of these.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace ditkernels {

struct Backend {
  const char* device_name;  // for messages
  const char* dtype_names;  // for messages
  bool (*supports)(at::ScalarType);
};

inline bool cpu_supports(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtypes DK_DISPATCH_CUDA_FLOATS instantiates (dispatch.h): no fp64 on CUDA.
inline bool cuda_supports(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline constexpr Backend kCpu{"CPU", "float32, float64, float16 and bfloat16", cpu_supports};
inline constexpr Backend kCuda{"CUDA", "float32, float16 and bfloat16", cuda_supports};

// The floating input `name` of `op` has a dtype the backend's kernels support.
inline void check_backend_dtype(const Backend& be, const char* op, const at::Tensor& t,
                                const char* name) {
  TORCH_CHECK(be.supports(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(),
              "; the ", be.device_name, " kernels support ", be.dtype_names);
}

}  // namespace ditkernels
