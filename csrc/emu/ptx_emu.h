#pragma once
// The warp-level PTX of csrc/include/ditkernels/cuda_mma.cuh, emulated on the CPU
// (see cuda_emu.h). Each function has the signature of its inline-asm twin; each
// lane hands in its own registers and gets back its own, as laid out by the PTX
// ISA ("Matrix Fragments for mma.m16n8k16 / m16n8k8 / m16n8k32", "ldmatrix").
// Lane l has groupID g = l / 4 and threadID_in_group t = l % 4.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu/cuda_emu.h"

namespace ditkernels {
namespace mma {

// The shared-window address of p (cvta.to.shared), as wgmma descriptors encode it.
inline uint32_t smem_addr(const void* p) { return emu::shared_window_address(p); }

inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  emu::cp_async(smem, gmem, src_bytes);
}
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait(N);
}

namespace detail {

struct Lanes {
  const unsigned char* slots;
  template <typename T>
  const T& at(int lane) const {
    return *reinterpret_cast<const T*>(slots + lane * emu::kSlotBytes);
  }
};

// ldmatrix .m8n8 .b16 with `count` matrices: lane l addresses row l % 8 of matrix
// l / 8. Non-transposed, lane l receives row l / 4, elements 2 (l % 4) and +1 of
// each matrix; transposed, elements [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4].
template <int count, bool trans>
inline void ldmatrix(uint32_t* r, const void* smem, const char* what) {
  if (emu::lane_id() < 8 * count) emu::check_smem(smem, 16, 16, what);  // the others are unused
  const void* mine = smem;
  const Lanes lanes{emu::warp_gather(&mine, sizeof(mine), 0xffffffffu, what)};
  const int l = emu::lane_id();
  for (int m = 0; m < count; ++m) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (l % 4) + h : l / 4;
      const int col = trans ? l / 4 : 2 * (l % 4) + h;
      const auto* base = static_cast<const unsigned char*>(lanes.at<const void*>(m * 8 + row));
      std::memcpy(&e[h], base + 2 * col, 2);
    }
    r[m] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  emu::warp_release();
}

template <typename T>
inline float half_of(uint32_t reg, int h) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * h));
  return static_cast<float>(T(bits, T::from_bits()));
}

inline int byte_of(uint32_t reg, int b) { return static_cast<int8_t>((reg >> (8 * b)) & 0xff); }

// The operands of one lane, as gathered.
template <int kA, int kB, typename Acc>
struct MmaOperands {
  uint32_t a[kA];
  uint32_t b[kB];
  Acc c[4];
};

template <int kA, int kB, typename Acc>
inline MmaOperands<kA, kB, Acc> operands(const uint32_t* a, const uint32_t* b, const Acc* c) {
  MmaOperands<kA, kB, Acc> ops;
  std::memcpy(ops.a, a, sizeof(ops.a));
  std::memcpy(ops.b, b, sizeof(ops.b));
  std::memcpy(ops.c, c, sizeof(ops.c));
  return ops;
}

// D = A B + C for a 16 x 8 tile, each lane computing its four D elements: rows
// g and g + 8, columns 2t and 2t + 1. a_elem(lanes, row, k) and b_elem(lanes, k, col)
// read the operands where the fragment layout put them.
template <typename Ops, typename Acc, typename AElem, typename BElem>
inline void mma_tile(Acc (&d)[4], const Ops& mine, int K, AElem a_elem, BElem b_elem,
                     const char* what) {
  const Lanes lanes{emu::warp_gather(&mine, sizeof(Ops), 0xffffffffu, what)};
  const int l = emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    const int row = l / 4 + (i >= 2 ? 8 : 0), col = 2 * (l % 4) + (i & 1);
    if constexpr (std::is_same_v<Acc, int>) {
      int64_t sum = 0;
      for (int k = 0; k < K; ++k) sum += int64_t{a_elem(lanes, row, k)} * b_elem(lanes, k, col);
      d[i] = static_cast<int>(static_cast<uint32_t>(mine.c[i]) + static_cast<uint32_t>(sum));
    } else {
      // Products are exact; the sum is kept wider than fp32, as tensor cores do.
      double sum = 0.0;
      for (int k = 0; k < K; ++k)
        sum += static_cast<double>(a_elem(lanes, row, k)) * b_elem(lanes, k, col);
      d[i] = static_cast<float>(static_cast<double>(mine.c[i]) + sum);
    }
  }
  emu::warp_release();
}

}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  detail::ldmatrix<4, false>(r, smem, "ldmatrix.x4");
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  detail::ldmatrix<2, false>(r, smem, "ldmatrix.x2");
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem) {
  detail::ldmatrix<2, true>(r, smem, "ldmatrix.x2.trans");
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  detail::ldmatrix<4, true>(r, smem, "ldmatrix.x4.trans");
}

// m16n8k16, f16/bf16 -> f32. A element (r, k): lane (r % 8) * 4 + (k % 8) / 2,
// register (r >= 8) + 2 (k >= 8), half k % 2. B element (k, n): lane n * 4 + (k % 8) / 2,
// register (k >= 8), half k % 2.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using Ops = detail::MmaOperands<4, 2, float>;
  const Ops mine = detail::operands<4, 2>(a, b, d);
  detail::mma_tile(
      d, mine, 16,
      [](const detail::Lanes& L, int r, int k) {
        return detail::half_of<T>(
            L.at<Ops>((r % 8) * 4 + (k % 8) / 2).a[(r >= 8) + 2 * (k >= 8)], k % 2);
      },
      [](const detail::Lanes& L, int k, int n) {
        return detail::half_of<T>(L.at<Ops>(n * 4 + (k % 8) / 2).b[k >= 8], k % 2);
      },
      "mma.m16n8k16");
}

// m16n8k8, f16/bf16 -> f32: the first halves of the k16 layouts.
template <typename T>
inline void mma_1688(float (&d)[4], const uint32_t (&a)[2], uint32_t b) {
  using Ops = detail::MmaOperands<2, 1, float>;
  const Ops mine = detail::operands<2, 1>(a, &b, d);
  detail::mma_tile(
      d, mine, 8,
      [](const detail::Lanes& L, int r, int k) {
        return detail::half_of<T>(L.at<Ops>((r % 8) * 4 + k / 2).a[r >= 8], k % 2);
      },
      [](const detail::Lanes& L, int k, int n) {
        return detail::half_of<T>(L.at<Ops>(n * 4 + k / 2).b[0], k % 2);
      },
      "mma.m16n8k8");
}

// m16n8k32, s8 -> s32. A element (r, k): lane (r % 8) * 4 + (k % 16) / 4, register
// (r >= 8) + 2 (k >= 16), byte k % 4. B element (k, n): lane n * 4 + (k % 16) / 4,
// register (k >= 16), byte k % 4.
inline void mma_16832_s8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using Ops = detail::MmaOperands<4, 2, int>;
  const Ops mine = detail::operands<4, 2>(a, b, d);
  detail::mma_tile(
      d, mine, 32,
      [](const detail::Lanes& L, int r, int k) {
        return detail::byte_of(L.at<Ops>((r % 8) * 4 + (k % 16) / 4).a[(r >= 8) + 2 * (k >= 16)],
                               k % 4);
      },
      [](const detail::Lanes& L, int k, int n) {
        return detail::byte_of(L.at<Ops>(n * 4 + (k % 16) / 4).b[k >= 16], k % 4);
      },
      "mma.m16n8k32.s8");
}

// ex2.approx.ftz.f32 as exact exp2f with the ftz flush: the hardware's ~2 ulp
// error is not modelled, so the tests' tolerances must leave room for it.
inline float ex2_approx(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

template <typename T>
inline T* opaque(T* p) {
  return p;
}

}  // namespace mma
}  // namespace ditkernels
