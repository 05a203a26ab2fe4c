#pragma once
// Instruction-set variants of CPU kernels. The extension is compiled for its
// target's baseline ISA (SSE2 on x86-64), which leaves loops 4 floats wide while
// ATen's own kernels and torch.compile's C++ run 8 or 16 wide. A kernel written as
// plain loops in DK_ALWAYS_INLINE functions is compiled again under DK_TARGET_AVX2
// and DK_TARGET_AVX512 entry points named baseline_NAME, avx2_NAME and avx512_NAME,
// and DK_VARIANT(NAME) picks one at run time.
// CPU translation units only: the CUDA sources never include this.

#include <ATen/Version.h>

#include <string>

#if defined(__GNUC__)
#define DK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DK_ALWAYS_INLINE inline
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define DK_X86_VARIANTS 1
#define DK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define DK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")))
#endif

namespace ditkernels {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

// ATen's CPU capability (so ATEN_CPU_CAPABILITY=default selects the baseline
// kernels, as it does ATen's), confirmed against the exact features the variants
// are compiled for.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#ifdef DK_X86_VARIANTS
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (cap == "AVX512" && avx512) return CpuIsa::kAvx512;
    if ((cap == "AVX512" || cap == "AVX2") && avx2) return CpuIsa::kAvx2;
#endif
    return CpuIsa::kBaseline;
  }();
  return isa;
}

// The one of a kernel's variants that cpu_isa() selects.
template <typename V>
V pick_variant(V baseline, [[maybe_unused]] V avx2, [[maybe_unused]] V avx512) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return avx512;
    case CpuIsa::kAvx2:
      return avx2;
    case CpuIsa::kBaseline:
      break;
  }
  return baseline;
}

}  // namespace ditkernels

// DK_VARIANT(foo<T>) picks among baseline_foo<T>, avx2_foo<T> and avx512_foo<T>.
#ifdef DK_X86_VARIANTS
#define DK_VARIANT(NAME) ::ditkernels::pick_variant(baseline_##NAME, avx2_##NAME, avx512_##NAME)
#else
#define DK_VARIANT(NAME) baseline_##NAME
#endif
