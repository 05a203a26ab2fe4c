#pragma once
// Compile-time specialisation switches, after flash-attention's static_switch.h:
// a runtime value picks one of a few instantiations, which see it as a constexpr.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define DK_BOOL_SWITCH(COND, CONST_NAME, ...)     \
  [&] {                                           \
    if (COND) {                                   \
      constexpr static bool CONST_NAME = true;    \
      return __VA_ARGS__();                       \
    } else {                                      \
      constexpr static bool CONST_NAME = false;   \
      return __VA_ARGS__();                       \
    }                                             \
  }()

// float32, float16 and bfloat16: the dtypes of every CUDA kernel.
#define DK_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                                     \
  [&] {                                                                              \
    switch (TYPE) {                                                                  \
      case at::kFloat: {                                                             \
        using scalar_t = float;                                                      \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case at::kHalf: {                                                              \
        using scalar_t = at::Half;                                                   \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case at::kBFloat16: {                                                          \
        using scalar_t = at::BFloat16;                                               \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      default:                                                                       \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE,                       \
                    " on CUDA (supported: float32, float16, bfloat16)");            \
    }                                                                                \
  }()
