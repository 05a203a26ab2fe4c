#pragma once
// Hopper's tensor memory accelerator (TMA, sm_90a) and shared-memory barriers
// (mbarrier), as CUTLASS's cute/arch/copy_sm90_tma.hpp and cutlass/arch/barrier.h
// issue them:
//  - a tensor map (CUtensorMap, 128 bytes) describes a 2-D tiled view of a global
//    matrix; make_tensor_map_2d builds one on the host with cuTensorMapEncodeTiled,
//    obtained through the runtime's driver entry point (no link against libcuda);
//  - load_2d: one thread copies a box of it into shared memory, with the 128-byte
//    swizzle of cuda_wgmma.cuh, zeros where the box leaves the matrix, and counts its
//    bytes off the transaction count of an mbarrier;
//  - an mbarrier completes its current phase once its pending arrivals reach zero
//    and its transaction count is zero again; the phase bit then flips. wait(parity)
//    returns once the phase of that parity has completed: on a fresh barrier (phase 0
//    running) wait(1) returns at once and wait(0) blocks.
// The emulation library swaps the PTX for csrc/emu/tma_emu.h.

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "ditkernels/cuda_mma.cuh"
#include "ditkernels/cuda_runtime.cuh"

#ifdef DITKERNELS_EMULATE_CUDA
#include "emu/tma_emu.h"
#else
#include <cuda.h>  // CUtensorMap and its enums (types only: the driver is reached through the runtime)
#include <cuda_runtime_api.h>

namespace ditkernels {
namespace tma {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%1], %0;\n" ::"r"(count), "r"(mma::smem_addr(bar)));
}
// Makes the initialisations visible to the async proxy (TMA's complete_tx) and the
// other threads; then a block barrier.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(mma::smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%1], %0;\n" ::"r"(bytes),
               "r"(mma::smem_addr(bar))
               : "memory");
}
// One probe: whether the phase of `parity` has completed. Kernels block with
// mbarrier_wait (the emulator cannot see a spin loop around this for what it is).
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(mma::smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
// Blocks until the phase of `parity` has completed. The retry is a C++ loop, not a
// branch inside the asm, so that the compiler lays it out in place (a retry block
// placed after the kernel's end would branch back across the whole kernel).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}
__device__ __forceinline__ void prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Box (x, y) .. (x + box_x, y + box_y) of `map` (x along the contiguous dimension)
// into `dst`, its bytes counted off `bar`.
__device__ __forceinline__ void load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x,
                                        int y) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(mma::smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(mma::smem_addr(bar)), "r"(x), "r"(y)
      : "memory");
}
// Register budget of a warpgroup (warp specialisation): the producer gives registers
// back, the consumers take them.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
#else
__device__ __forceinline__ void mbarrier_init(uint64_t*, uint32_t) { __trap(); }
__device__ __forceinline__ void fence_barrier_init() { __trap(); }
__device__ __forceinline__ void mbarrier_arrive(uint64_t*) { __trap(); }
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t*, uint32_t) { __trap(); }
__device__ __forceinline__ void mbarrier_wait(uint64_t*, uint32_t) { __trap(); }
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t*, uint32_t) {
  __trap();
  return false;
}
__device__ __forceinline__ void prefetch_map(const CUtensorMap*) { __trap(); }
__device__ __forceinline__ void load_2d(void*, const CUtensorMap*, uint64_t*, int, int) { __trap(); }
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  __trap();
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  __trap();
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace tma
}  // namespace ditkernels
#endif  // DITKERNELS_EMULATE_CUDA

namespace ditkernels {
namespace tma {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime (cudaGetDriverEntryPoint, by version
// where the runtime has that form), looked up once.
inline EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &status);
#endif
    TORCH_CHECK(err == cudaSuccess && status == cudaDriverEntryPointSuccess && p != nullptr,
                "ditkernels: the CUDA driver has no cuTensorMapEncodeTiled (TMA needs CUDA 12)");
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// Whether the GEMMs that have a warp-specialized TMA kernel run it on Hopper (where
// their wgmma kernels run): unless DITKERNELS_DISABLE_TMA is set and not 0, which
// selects the cp.async wgmma kernels. Read at every call, like use_wgmma().
inline bool use_tma_gemm() {
  const char* env = std::getenv("DITKERNELS_DISABLE_TMA");
  return env == nullptr || env[0] == '\0' || std::strcmp(env, "0") == 0;
}

// The tensor map of a row-major [rows, cols] matrix of `elem_bytes`-byte elements
// with row stride `ld` (elements), read in boxes of box_rows x box_cols with the
// 128-byte swizzle (box_cols * elem_bytes == 128), zeros outside the matrix.
inline CUtensorMap make_tensor_map_2d(const void* base, CUtensorMapDataType type, int elem_bytes,
                                      int64_t rows, int64_t cols, int64_t ld, int box_rows,
                                      int box_cols) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld * elem_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult res = encode_tiled()(&map, type, 2, const_cast<void*>(base), dims, strides, box,
                                      elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "ditkernels: cuTensorMapEncodeTiled failed (error ", res,
              ") for a [", rows, ", ", cols, "] matrix with row stride ", ld, " and ", box_rows,
              " x ", box_cols, " boxes");
  return map;
}

}  // namespace tma
}  // namespace ditkernels
