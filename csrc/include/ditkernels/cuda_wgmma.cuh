#pragma once
// Hopper warpgroup MMA (wgmma, sm_90a) for GEMM kernels whose operands sit in
// shared memory as K-major tiles of 128-byte rows with the 128-byte swizzle: row r's
// 16-byte chunk c is stored at chunk c ^ (r % 8), and a tile starts on a 1024-byte
// boundary of the shared window (PTX ISA, "Shared Memory Matrix Layout", K-major,
// 128B swizzling: ((8,m),(T,2k)):((8T,SBO),(1,T)) with Swizzle<3,4,3> on byte
// addresses). Each wgmma consumes 32 bytes of every row (k16 for 16-bit types, k32
// for int8); the k-step within a row is selected by moving the descriptor's start
// address, and the swizzle, applied by the hardware to the final address bits,
// follows. Accumulators: thread t of the warpgroup holds, for n8 block i,
// d[4i + {0, 1}] = D[16 (t / 32) + (t % 32) / 4][8i + 2 (t % 4) + {0, 1}] and
// d[4i + {2, 3}] the same columns eight rows below.
//
// Only compiled into device code for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the host
// launches such kernels only when the build has that target (DITKERNELS_SM90A) and
// the device is compute capability 9.x. The emulation library swaps the PTX for
// csrc/emu/ptx_emu.h.

#include "ditkernels/cuda_mma.cuh"
#include "ditkernels/cuda_runtime.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace ditkernels {
namespace wgmma {

constexpr int kRowBytes = 128;     // one swizzle atom row: 64 fp16/bf16 or 128 int8 along k
constexpr int kAtomBytes = 1024;   // eight rows: the swizzle's period
constexpr int kStepBytes = 32;     // k consumed by one wgmma

// A descriptor as its two 32-bit words, for kernels that move one operand's start
// address from step to step: the low word (start address and leading byte offset,
// desc_lo) varies, the high word (stride byte offset and swizzle mode: kDescHi for
// every descriptor here) is a constant, so that each step costs one 32-bit add. The
// PTX of mma_lo and mma_rs_mn puts the words together itself: given 64-bit
// descriptors, ptxas moves the constant word into a register for every wgmma.
constexpr uint32_t kDescHi = (kAtomBytes >> 4) | (1u << 30);
#define DK_WGMMA_DESC_HI "0x4000004000000000"  // kDescHi << 32, for the PTX below
static_assert(kDescHi == 0x40000040u, "DK_WGMMA_DESC_HI");
__device__ __forceinline__ uint32_t desc_lo(uint64_t desc) { return static_cast<uint32_t>(desc); }
__device__ __forceinline__ uint64_t desc_from_lo(uint32_t lo) {
  return (static_cast<uint64_t>(kDescHi) << 32) | lo;
}

// Byte offset of 16-byte chunk `chunk` (0..7) of `row` in a swizzled tile.
__device__ __forceinline__ int swizzle128(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
}

}  // namespace wgmma
}  // namespace ditkernels

#ifdef DITKERNELS_EMULATE_CUDA
#include "emu/wgmma_emu.h"  // fences, mma below, emulated
#else
namespace ditkernels {
namespace wgmma {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Makes this thread's generic-proxy writes to shared memory (st.shared, cp.async)
// visible to the async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Orders this thread's register accesses before the wgmma that follow.
__device__ __forceinline__ void fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins the accumulators at this point of the asm sequence. wait() names no registers,
// so without it the compiler may read accumulators (the epilogue) before the wait
// that makes them valid, or write them after a wgmma has been issued.
template <int N>
__device__ __forceinline__ void fence_operand(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operand(int (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

template <int N>
__device__ __forceinline__ void fence_operand(uint32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// mma<T, N> for fp16/bf16 with the descriptors given by their low words (desc_lo):
// N = 64 or 128.
template <typename T, int N>
__device__ __forceinline__ void mma_lo(float (&d)[N / 2], uint32_t a_lo, uint32_t b_lo,
                                       int scale_d);
// D(64 x N) += A(64 x 16) * B(N x 16)^T with A's fragments in registers (each warp's
// 16 rows as an mma.sync m16n8k16 A fragment) and B MN-major in shared memory (its N
// columns contiguous, desc_sw128_mn; the descriptor's low word), fp16/bf16 only:
// N = 32, 64, 72, 96 or 128.
template <typename T, int N>
__device__ __forceinline__ void mma_rs_mn(float (&d)[N / 2], const uint32_t (&a)[4],
                                          uint32_t b_lo, int scale_d);

// D(64 x N) = A(64 x k, K-major) * B(N x k, K-major)^T + (scale_d ? D : 0), N = 128,
// 192 or 256: fp32 accumulators for fp16/bf16 (k = 16), int32 for int8 (k = 32).
template <typename T, int N, typename Acc>
__device__ __forceinline__ void mma(Acc (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                    int scale_d);

// The accumulator operands d[b .. b + 7] with constraint c, and the register lists.
#define DK_WGMMA_ACC8(c, b)                                                           \
  "+" c(d[b]), "+" c(d[b + 1]), "+" c(d[b + 2]), "+" c(d[b + 3]), "+" c(d[b + 4]), \
      "+" c(d[b + 5]), "+" c(d[b + 6]), "+" c(d[b + 7])
#define DK_WGMMA_ACC32(c, b) \
  DK_WGMMA_ACC8(c, b), DK_WGMMA_ACC8(c, b + 8), DK_WGMMA_ACC8(c, b + 16), DK_WGMMA_ACC8(c, b + 24)
#define DK_WGMMA_ACC64(c) DK_WGMMA_ACC32(c, 0), DK_WGMMA_ACC32(c, 32)
#define DK_WGMMA_ACC96(c) DK_WGMMA_ACC64(c), DK_WGMMA_ACC32(c, 64)
#define DK_WGMMA_ACC128(c) DK_WGMMA_ACC64(c), DK_WGMMA_ACC32(c, 64), DK_WGMMA_ACC32(c, 96)
#define DK_WGMMA_REGS64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define DK_WGMMA_REGS96 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define DK_WGMMA_REGS128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
// One specialization: `regs` accumulators (operands %0 ..), then desc_a, desc_b and
// scale_d as operands `ops` ("%64, %65" and "%66" for 64 accumulators); `tail` is
// what follows scale-d in the PTX.
#define DK_WGMMA_MMA(T, N, Acc, regs, descs, scale, shape_types, tail, c)                   \
  template <>                                                                                \
  __device__ __forceinline__ void mma<T, N>(Acc(&d)[N / 2], uint64_t desc_a, uint64_t desc_b, \
                                            int scale_d) {                                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " scale ", 0;\n"                        \
                 "wgmma.mma_async.sync.aligned." shape_types " {" DK_WGMMA_REGS##regs "}, "  \
                 descs ", p" tail ";\n}\n"                                                  \
                 : DK_WGMMA_ACC##regs(c)                                                     \
                 : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                  \
  }

#define DK_WGMMA_16BIT(T, ptx_type)                                                         \
  DK_WGMMA_MMA(T, 128, float, 64, "%64, %65", "%66", "m64n128k16.f32." ptx_type "." ptx_type, \
               ", 1, 1, 0, 0", "f")                                                          \
  DK_WGMMA_MMA(T, 192, float, 96, "%96, %97", "%98", "m64n192k16.f32." ptx_type "." ptx_type, \
               ", 1, 1, 0, 0", "f")                                                          \
  DK_WGMMA_MMA(T, 256, float, 128, "%128, %129", "%130",                                    \
               "m64n256k16.f32." ptx_type "." ptx_type, ", 1, 1, 0, 0", "f")
DK_WGMMA_16BIT(c10::BFloat16, "bf16")
DK_WGMMA_16BIT(c10::Half, "f16")
DK_WGMMA_MMA(int8_t, 128, int, 64, "%64, %65", "%66", "m64n128k32.s32.s8.s8", "", "r")
DK_WGMMA_MMA(int8_t, 192, int, 96, "%96, %97", "%98", "m64n192k32.s32.s8.s8", "", "r")
DK_WGMMA_MMA(int8_t, 256, int, 128, "%128, %129", "%130", "m64n256k32.s32.s8.s8", "", "r")
#undef DK_WGMMA_16BIT
// The accumulator operand lists of the TMSA forward's shapes: d[0 .. n - 1], "+f".
#define DK_WGMMA_ACC4(c, b) "+" c(d[b]), "+" c(d[b + 1]), "+" c(d[b + 2]), "+" c(d[b + 3])
#define DK_WGMMA_D16 DK_WGMMA_ACC8("f", 0), DK_WGMMA_ACC8("f", 8)
#define DK_WGMMA_D32 DK_WGMMA_ACC32("f", 0)
#define DK_WGMMA_D36 DK_WGMMA_ACC32("f", 0), DK_WGMMA_ACC4("f", 32)
#define DK_WGMMA_D48 DK_WGMMA_ACC32("f", 0), DK_WGMMA_ACC8("f", 32), DK_WGMMA_ACC8("f", 40)
#define DK_WGMMA_D64 DK_WGMMA_ACC64("f")
#define DK_WGMMA_LIST16 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define DK_WGMMA_LIST32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define DK_WGMMA_LIST36 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35"
#define DK_WGMMA_LIST48 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47"
#define DK_WGMMA_LIST64 DK_WGMMA_REGS64
// The descriptor register `reg` from its low word `lo` (desc_from_lo, in PTX).
#define DK_WGMMA_DESC(reg, lo) \
  "cvt.u64.u32 " reg ", " lo ";\nor.b64 " reg ", " reg ", " DK_WGMMA_DESC_HI ";\n"
#define DK_WGMMA_SS(T, ptx_type, N, regs, a, b, scale)                                        \
  template <>                                                                                 \
  __device__ __forceinline__ void mma_lo<T, N>(float(&d)[N / 2], uint32_t a_lo, uint32_t b_lo, \
                                               int scale_d) {                                 \
    asm volatile("{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, " scale ", 0;\n"        \
                 DK_WGMMA_DESC("da", a) DK_WGMMA_DESC("db", b)                                \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." ptx_type "." ptx_type     \
                 " {" DK_WGMMA_LIST##regs "}, da, db, p, 1, 1, 0, 0;\n}\n"                    \
                 : DK_WGMMA_D##regs                                                           \
                 : "r"(a_lo), "r"(b_lo), "r"(scale_d));                                       \
  }
#define DK_WGMMA_RS(T, ptx_type, N, regs, a, b, scale)                                        \
  template <>                                                                                 \
  __device__ __forceinline__ void mma_rs_mn<T, N>(float(&d)[N / 2], const uint32_t(&a_frag)[4], \
                                                  uint32_t b_lo, int scale_d) {              \
    asm volatile("{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, " scale ", 0;\n"           \
                 DK_WGMMA_DESC("db", b)                                                       \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." ptx_type "." ptx_type     \
                 " {" DK_WGMMA_LIST##regs "}, {" a "}, db, p, 1, 1, 1;\n}\n"                  \
                 : DK_WGMMA_D##regs                                                           \
                 : "r"(a_frag[0]), "r"(a_frag[1]), "r"(a_frag[2]), "r"(a_frag[3]), "r"(b_lo), \
                   "r"(scale_d));                                                             \
  }
#define DK_WGMMA_TMSA(T, ptx_type) \
  DK_WGMMA_SS(T, ptx_type, 64, 32, "%32", "%33", "%34") \
  DK_WGMMA_SS(T, ptx_type, 128, 64, "%64", "%65", "%66") \
  DK_WGMMA_RS(T, ptx_type, 32, 16, "%16, %17, %18, %19", "%20", "%21") \
  DK_WGMMA_RS(T, ptx_type, 64, 32, "%32, %33, %34, %35", "%36", "%37") \
  DK_WGMMA_RS(T, ptx_type, 72, 36, "%36, %37, %38, %39", "%40", "%41") \
  DK_WGMMA_RS(T, ptx_type, 96, 48, "%48, %49, %50, %51", "%52", "%53") \
  DK_WGMMA_RS(T, ptx_type, 128, 64, "%64, %65, %66, %67", "%68", "%69")
DK_WGMMA_TMSA(c10::BFloat16, "bf16")
DK_WGMMA_TMSA(c10::Half, "f16")
#undef DK_WGMMA_TMSA
#undef DK_WGMMA_RS
#undef DK_WGMMA_SS
#undef DK_WGMMA_DESC
#undef DK_WGMMA_MMA
#else
__device__ __forceinline__ void fence_proxy_async() { __trap(); }
__device__ __forceinline__ void fence() { __trap(); }
__device__ __forceinline__ void commit() { __trap(); }
template <int N>
__device__ __forceinline__ void wait() {
  __trap();
}
template <typename Acc, int N>
__device__ __forceinline__ void fence_operand(Acc (&)[N]) {}
template <typename T, int N, typename Acc>
__device__ __forceinline__ void mma(Acc (&)[N / 2], uint64_t, uint64_t, int) {
  __trap();
}
template <typename T, int N>
__device__ __forceinline__ void mma_lo(float (&)[N / 2], uint32_t, uint32_t, int) {
  __trap();
}
template <typename T, int N>
__device__ __forceinline__ void mma_rs_mn(float (&)[N / 2], const uint32_t (&)[4], uint32_t, int) {
  __trap();
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace wgmma
}  // namespace ditkernels
#endif  // DITKERNELS_EMULATE_CUDA

namespace ditkernels {
namespace wgmma {

// The descriptor of a K-major, 128-byte-swizzled tile at `tile` (1024-byte aligned in
// the shared window) advanced by `k_byte` (a multiple of 32, below 128) along k:
// start address, stride between 8-row groups (1024 bytes), leading offset unused
// (encoded 1), base offset 0, swizzle mode 1 (128 bytes).
__device__ __forceinline__ uint64_t desc_sw128(const unsigned char* tile, int k_byte) {
  const uint32_t addr = mma::smem_addr(tile) + static_cast<uint32_t>(k_byte);
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(kAtomBytes >> 4) << 32) | (uint64_t{1} << 62);
}

// The descriptor of an MN-major, 128-byte-swizzled operand at `tile` (1024-byte aligned):
// rows of 64 fp16/bf16 along N (one 128-byte row per k, swizzled as K-major rows are),
// eight k rows per 1024-byte atom, consecutive atoms along k 1024 bytes apart (stride
// byte offset) and blocks of 64 columns along N `n_block_bytes` apart (leading byte
// offset): CUTLASS's Swizzle<3,4,3> o ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)). A k16 step
// moves the start address by two atoms.
__device__ __forceinline__ uint64_t desc_sw128_mn(const unsigned char* tile, int n_block_bytes) {
  const uint32_t addr = mma::smem_addr(tile);
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((n_block_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>(kAtomBytes >> 4) << 32) | (uint64_t{1} << 62);
}

// Whether the wgmma kernels may run: the build has the sm_90a target, the device is
// compute capability 9.x, and DITKERNELS_DISABLE_WGMMA is unset or 0. The variable is
// read at every call, so that tests and benchmarks can run both paths in one process.
inline bool use_wgmma() {
#if defined(DITKERNELS_SM90A) || defined(DITKERNELS_EMULATE_CUDA)
  const char* env = std::getenv("DITKERNELS_DISABLE_WGMMA");
  if (env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0) return false;
  return at::cuda::getCurrentDeviceProperties()->major == 9;
#else
  return false;
#endif
}

// The N width of a wgmma GEMM's CTA tile: the one of 256, 192, 128 that pads the
// fewest output columns (ties: the wider, which reads less from L2 per flop), unless
// the grid would then leave SMs idle that 128-wide tiles would use.
// DITKERNELS_WGMMA_TILE_N = 128, 192 or 256 overrides it (tests cover every width;
// benchmarks can sweep them).
inline int pick_tile_n(int64_t M, int64_t N, int tile_m, int sms) {
  if (const char* env = std::getenv("DITKERNELS_WGMMA_TILE_N")) {
    const int bn = std::atoi(env);
    TORCH_CHECK(bn == 128 || bn == 192 || bn == 256,
                "DITKERNELS_WGMMA_TILE_N must be 128, 192 or 256, got '", env, "'");
    return bn;
  }
  int best = 128;
  int64_t best_waste = -1;
  for (int bn : {256, 192, 128}) {
    const int64_t waste = (N + bn - 1) / bn * bn - N;
    if (best_waste < 0 || waste < best_waste) {
      best = bn;
      best_waste = waste;
    }
  }
  const int64_t m_tiles = (M + tile_m - 1) / tile_m;
  return m_tiles * ((N + best - 1) / best) < sms ? 128 : best;
}

// The first 1024-byte boundary of the shared window at or after `p`.
__device__ __forceinline__ unsigned char* align_to_atom(unsigned char* p) {
  const uint32_t addr = mma::smem_addr(p);
  return p + ((kAtomBytes - (addr & (kAtomBytes - 1))) & (kAtomBytes - 1));
}

// The wgmma of one k-tile of 128-byte rows: A's 64 rows at `a`, B's N rows at `b`.
template <typename T, int N, typename Acc>
__device__ __forceinline__ void mma_k_tile(Acc (&acc)[N / 2], const unsigned char* a,
                                           const unsigned char* b) {
  fence_operand(acc);
#pragma unroll
  for (int kk = 0; kk < kRowBytes / kStepBytes; ++kk) {
    mma<T, N>(acc, desc_sw128(a, kk * kStepBytes), desc_sw128(b, kk * kStepBytes), 1);
  }
}

// The descriptor of the same kind of tile `bytes` (a multiple of 16) further on: the
// start address field (bits 0-13, in 16-byte units) cannot overflow, as the shared
// window is below 256 KiB. Lets a main loop build its descriptors once.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  return desc + (bytes >> 4);
}

// mma_k_tile on descriptors of the k-tile's A and B (desc_sw128 at k_byte 0).
template <typename T, int N, typename Acc>
__device__ __forceinline__ void mma_k_tile_desc(Acc (&acc)[N / 2], uint64_t desc_a,
                                                uint64_t desc_b) {
  fence_operand(acc);
#pragma unroll
  for (int kk = 0; kk < kRowBytes / kStepBytes; ++kk) {
    mma<T, N>(acc, desc_advance(desc_a, kk * kStepBytes), desc_advance(desc_b, kk * kStepBytes), 1);
  }
}

// cp.async of a [kRows][128-byte] swizzled tile by kThreads threads: chunk (row, c)
// comes from src(row, c), a global address, or null for zeros (tails; the copy then
// reads nothing and names `base`, a valid global address, as its source).
template <int kRows, int kThreads, typename Src>
__device__ __forceinline__ void load_tile(unsigned char* tile, int tid, const void* base,
                                          Src&& src) {
  static_assert(kRows * 8 % kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int it = 0; it < kRows * 8 / kThreads; ++it) {
    const int idx = tid + it * kThreads, row = idx >> 3, chunk = idx & 7;
    const void* g = src(row, chunk);
    mma::cp_async_16(tile + swizzle128(row, chunk), g != nullptr ? g : base, g != nullptr ? 16 : 0);
  }
}

// The main loop of the wgmma GEMMs: kStages shared-memory stages of stage_bytes,
// cp.async loads kAhead tiles ahead, one wgmma group in flight. load(stage, kt)
// issues tile kt's copies; mma(stage) issues its wgmma. Refilling the stage of tile
// kt + kAhead at step kt is safe when kStages >= kAhead + 2: it held tile
// kt + kAhead - kStages <= kt - 2, which every warpgroup retired (wait_group 1 at
// step kt - 1) before this step's barrier. Returns with all wgmma retired and all
// copies landed, the stages free to reuse after a barrier.
template <int kStages, int kAhead, typename Load, typename Mma>
__device__ __forceinline__ void pipelined_mainloop(unsigned char* smem, int stage_bytes,
                                                   int k_tiles, Load&& load, Mma&& mma) {
  static_assert(kStages >= kAhead + 2, "a refilled stage must be retired");
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < k_tiles) load(smem + s * stage_bytes, s);
    mma::cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    mma::cp_async_wait<kAhead - 1>();
    fence_proxy_async();
    __syncthreads();
    fence();
    mma(static_cast<const unsigned char*>(smem + (kt % kStages) * stage_bytes));
    commit();
    // The copies are issued while this tile's wgmma run.
    const int pf = kt + kAhead;
    if (pf < k_tiles) load(smem + (pf % kStages) * stage_bytes, pf);
    mma::cp_async_commit();
    wait<1>();
  }
  wait<0>();
  mma::cp_async_wait<0>();
}

}  // namespace wgmma
}  // namespace ditkernels
