#pragma once
// Warp-level tensor-core and async-copy primitives (sm_80+), shared by the GEMM
// and attention kernels. Fragment layouts follow the PTX ISA for
// mma.sync.aligned.m16n8k16 with .row.col operands. The emulation library swaps
// the inline PTX for csrc/emu/ptx_emu.h, which computes the same fragments.

#include "ditkernels/cuda_runtime.cuh"
#ifndef DITKERNELS_EMULATE_CUDA
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#ifdef DITKERNELS_EMULATE_CUDA
#include "emu/ptx_emu.h"  // cp_async_*, ldmatrix_*, mma_* below, emulated
#else
namespace ditkernels {
namespace mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; src_bytes = 0 zero-fills the destination (tails).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
// Two 8x8 b16 matrices; lanes 0-15 supply the row addresses.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(smem)));
}
// The same, transposed while loading (for operands stored k-major the other way).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// D = A(16x16, row) * B(16x8, col) + D with fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<c10::BFloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<c10::Half>(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D = A(16x8, row) * B(8x8, col) + D: the k = 8 tail of head dims such as 72.
template <typename T>
__device__ __forceinline__ void mma_1688(float (&d)[4], const uint32_t (&a)[2], uint32_t b);

template <>
__device__ __forceinline__ void mma_1688<c10::BFloat16>(float (&d)[4], const uint32_t (&a)[2],
                                                        uint32_t b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b));
}

template <>
__device__ __forceinline__ void mma_1688<c10::Half>(float (&d)[4], const uint32_t (&a)[2],
                                                    uint32_t b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b));
}

// D = A(16x32, row, s8) * B(32x8, col, s8) + D with exact int32 accumulation.
__device__ __forceinline__ void mma_16832_s8(int (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x by the SFU's ex2.approx.ftz.f32 (about 2 ulp; denormal results flush to 0,
// ex2(-inf) = +0): one MUFU.EX2, where exp2f adds range reduction around it.
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The pointer, as a value the compiler cannot see through: a base computed once is
// then not re-derived inside every address that adds an offset to it (one
// IMAD.WIDE.U32 a load rather than a 64-bit add and a shift).
template <typename T>
__device__ __forceinline__ T* opaque(T* p) {
  asm("" : "+l"(p));
  return p;
}

}  // namespace mma
}  // namespace ditkernels
#endif  // DITKERNELS_EMULATE_CUDA

namespace ditkernels {
namespace mma {

// GEMM tiles in shared memory with 64-byte rows (32 fp16/bf16 or 64 int8 along k).
// Byte offset of 16-byte chunk `chunk` (0..3) of `row`: 8 consecutive rows span four
// 128-byte bank windows, and the XOR spreads the chunk an ldmatrix phase reads over
// all eight 16-byte bank groups.
__device__ __forceinline__ int swizzle64(int row, int chunk) {
  return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// One 64-byte k-slab of a warp's 64x32 output tile: A rows warp_m * 64 + [0, 64) and
// B rows (output columns) warp_n * 32 + [0, 32), both [rows][64 bytes] swizzled. The
// slab is two mma k-steps of 32 bytes (k16 for 16-bit types, k32 for int8); `mma`
// is called as mma(acc[i][j], a_fragment, b_fragment).
template <typename Acc, typename Mma>
__device__ __forceinline__ void warp_tile_64x32(Acc (&acc)[4][4][4], const unsigned char* a,
                                                const unsigned char* b, int lane, int warp_m,
                                                int warp_n, Mma&& mma) {
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t af[4][4], bf[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = warp_m * 64 + i * 16 + (lane & 15);
      ldmatrix_x4(af[i], a + swizzle64(row, kk * 2 + (lane >> 4)));
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = warp_n * 32 + j * 16 + (lane & 7) + ((lane >> 4) << 3);
      uint32_t r[4];
      ldmatrix_x4(r, b + swizzle64(row, kk * 2 + ((lane >> 3) & 1)));
      bf[2 * j][0] = r[0];
      bf[2 * j][1] = r[1];
      bf[2 * j + 1][0] = r[2];
      bf[2 * j + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) mma(acc[i][j], af[i], bf[j]);
  }
}

// Two floats packed as one 32-bit register of T (low half = first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<c10::BFloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<c10::Half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace mma
}  // namespace ditkernels
