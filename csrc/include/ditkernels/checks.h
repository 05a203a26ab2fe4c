#pragma once
// Host-side argument checks. Every message names the op and the argument and
// prints the offending shape, dtype or device.

#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

namespace ditkernels {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_same_device(const char* op, const at::Tensor& t, const char* name,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all inputs must be on one device");
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name,
                             const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; all floating inputs must share one dtype");
}

// A 2-D tensor whose last dim is unit-stride, with any stride on dim 0, is used in
// place (per-sample vectors such as `c.chunk(6, dim=1)[k]`); anything else is copied.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  if (t.dim() == 2 && t.stride(1) == 1) return t;
  return t.contiguous();
}

// Kernels written with ATen ops (matmuls, sums) run in the dtype they were given:
// without this guard an enclosing torch.autocast would recast their internal ops.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Rows that start on 16-byte boundaries, for kernels that move 16-byte chunks
// (cp.async, vector loads); a fresh contiguous copy otherwise.
inline at::Tensor aligned_rows(const at::Tensor& t) {
  const bool ok = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  (t.stride(0) * t.element_size()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

}  // namespace ditkernels
