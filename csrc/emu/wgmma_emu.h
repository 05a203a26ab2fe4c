#pragma once
// The wgmma PTX of csrc/include/ditkernels/cuda_wgmma.cuh, emulated on the CPU: each
// function has its twin's signature and hands the warpgroup collective to emu.cpp.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "emu/cuda_emu.h"

namespace ditkernels {
namespace wgmma {

inline void fence_proxy_async() { emu::fence_proxy_async(); }
inline void fence() { emu::wgmma_fence(); }
inline void commit() { emu::wgmma_commit(); }
template <int N>
inline void wait() {
  emu::wgmma_wait(N);
}
template <typename Acc, int N>
inline void fence_operand(Acc (&)[N]) {}

template <typename T>
constexpr emu::WgmmaType wgmma_type() {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return emu::WgmmaType::kBF16;
  else if constexpr (std::is_same_v<T, c10::Half>) return emu::WgmmaType::kF16;
  else return emu::WgmmaType::kS8;
}

template <typename T, int N, typename Acc>
inline void mma(Acc (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(std::is_same_v<Acc, std::conditional_t<std::is_same_v<T, int8_t>, int, float>>);
  static_assert(N == 128 || N == 192 || N == 256);
  emu::wgmma_mma(wgmma_type<T>(), N, desc_a, desc_b, d, scale_d);
}

template <typename T, int N>
inline void mma_lo(float (&d)[N / 2], uint32_t a_lo, uint32_t b_lo, int scale_d) {
  static_assert(!std::is_same_v<T, int8_t> && (N == 64 || N == 128));
  emu::wgmma_mma(wgmma_type<T>(), N, desc_from_lo(a_lo), desc_from_lo(b_lo), d, scale_d);
}

template <typename T, int N>
inline void mma_rs_mn(float (&d)[N / 2], const uint32_t (&a)[4], uint32_t b_lo, int scale_d) {
  static_assert(!std::is_same_v<T, int8_t>);
  static_assert(N == 32 || N == 64 || N == 72 || N == 96 || N == 128);
  emu::wgmma_mma(wgmma_type<T>(), N, 0, desc_from_lo(b_lo), d, scale_d, a);
}

}  // namespace wgmma
}  // namespace ditkernels
