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

#define DK_DISPATCH_CASE_(ENUM, TYPE, ...) \
  case ENUM: {                             \
    using scalar_t = TYPE;                 \
    return __VA_ARGS__();                  \
  }

// float32, float16 and bfloat16: the dtypes of every CUDA kernel.
#define DK_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                                     \
  [&] {                                                                              \
    switch (TYPE) {                                                                  \
      DK_DISPATCH_CASE_(at::kFloat, float, __VA_ARGS__)                              \
      DK_DISPATCH_CASE_(at::kHalf, at::Half, __VA_ARGS__)                            \
      DK_DISPATCH_CASE_(at::kBFloat16, at::BFloat16, __VA_ARGS__)                    \
      default:                                                                       \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE,                       \
                    " on CUDA (supported: float32, float16, bfloat16)");            \
    }                                                                                \
  }()

// float16 and bfloat16 only: the tensor-core kernels. A float branch that is never
// taken would still name (and make nvcc instantiate) their float specialisations.
#define DK_DISPATCH_CUDA_HALFS(TYPE, NAME, ...)                                      \
  [&] {                                                                              \
    switch (TYPE) {                                                                  \
      DK_DISPATCH_CASE_(at::kHalf, at::Half, __VA_ARGS__)                            \
      DK_DISPATCH_CASE_(at::kBFloat16, at::BFloat16, __VA_ARGS__)                    \
      default:                                                                       \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE,                       \
                    " for the tensor-core kernels (supported: float16, bfloat16)");  \
    }                                                                                \
  }()

#define DK_HEAD_DIM_CASE_(VALUE, CONST_NAME, ...) \
  case VALUE: {                                   \
    constexpr static int CONST_NAME = VALUE;      \
    return __VA_ARGS__();                         \
  }

// The attention kernels' head dims, 32, 64, 72, 96 and 128 (the caller has checked
// D against them; anything else is an internal error).
#define DK_HEAD_DIM_SWITCH(D, CONST_NAME, ...)                                  \
  [&] {                                                                         \
    switch (D) {                                                                \
      DK_HEAD_DIM_CASE_(32, CONST_NAME, __VA_ARGS__)                            \
      DK_HEAD_DIM_CASE_(64, CONST_NAME, __VA_ARGS__)                            \
      DK_HEAD_DIM_CASE_(72, CONST_NAME, __VA_ARGS__)                            \
      DK_HEAD_DIM_CASE_(96, CONST_NAME, __VA_ARGS__)                            \
      DK_HEAD_DIM_CASE_(128, CONST_NAME, __VA_ARGS__)                           \
      default:                                                                  \
        TORCH_CHECK(false, "head dim ", D, " has no kernel instantiation");     \
    }                                                                           \
  }()
