#pragma once
// The TMA and mbarrier PTX of csrc/include/ditkernels/cuda_tma.cuh, emulated on the
// CPU (see cuda_emu.h), and the part of the driver API that builds tensor maps: the
// types and enums of cuda.h that cuTensorMapEncodeTiled takes (same names and
// values), and the runtime's cudaGetDriverEntryPoint, which hands out the
// emulator's cuTensorMapEncodeTiled. It checks its arguments as the driver documents
// (cuda.h) and stores them in the 128-byte map in its own layout (the driver's is
// opaque), which the emulated cp.async.bulk.tensor reads back.
//
// mbarrier (PTX ISA, "Parallel Synchronization and Communication Instructions:
// mbarrier"): a phase completes once the pending arrival count reaches zero and the
// transaction count is zero; then the phase bit flips and the arrival count resets.
// try_wait.parity P succeeds once the phase of parity P is complete: P differs from
// the current phase's parity. A thread waiting on a phase that never completes, with
// every other thread blocked or exited, is reported as a deadlock.
//
// TMA loads (cp.async.bulk.tensor.2d, tiled, no interleave, no or 128-byte swizzle,
// unit element strides) read global memory at issue; their bytes land, and count off
// the barrier's transactions, when a thread waits on that barrier (or, with
// DITKERNELS_EMU_CPASYNC=early, at a random point of the issuer's run before that),
// so that a tile read before its wait shows the stale contents. Landed bytes are
// async-proxy writes: wgmma may read them with no fence.proxy.async.

#include <cstdint>

#include "emu/cuda_emu.h"

using cuuint32_t = uint32_t;
using cuuint64_t = uint64_t;
enum CUresult { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1 };
struct alignas(64) CUtensorMap {
  cuuint64_t opaque[16];
};
enum CUtensorMapDataType {
  CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0,
  CU_TENSOR_MAP_DATA_TYPE_UINT16,
  CU_TENSOR_MAP_DATA_TYPE_UINT32,
  CU_TENSOR_MAP_DATA_TYPE_INT32,
  CU_TENSOR_MAP_DATA_TYPE_UINT64,
  CU_TENSOR_MAP_DATA_TYPE_INT64,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT64,
  CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ,
  CU_TENSOR_MAP_DATA_TYPE_TFLOAT32,
  CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ,
};
enum CUtensorMapInterleave {
  CU_TENSOR_MAP_INTERLEAVE_NONE = 0,
  CU_TENSOR_MAP_INTERLEAVE_16B,
  CU_TENSOR_MAP_INTERLEAVE_32B,
};
enum CUtensorMapSwizzle {
  CU_TENSOR_MAP_SWIZZLE_NONE = 0,
  CU_TENSOR_MAP_SWIZZLE_32B,
  CU_TENSOR_MAP_SWIZZLE_64B,
  CU_TENSOR_MAP_SWIZZLE_128B,
};
enum CUtensorMapL2promotion {
  CU_TENSOR_MAP_L2_PROMOTION_NONE = 0,
  CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
  CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
  CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
};
enum CUtensorMapFloatOOBfill {
  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0,
  CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA,
};
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2,
};
constexpr unsigned long long cudaEnableDefault = 0;

// The runtime's driver entry points; the emulator knows cuTensorMapEncodeTiled.
cudaError_t cudaGetDriverEntryPoint(const char* symbol, void** func, unsigned long long flags,
                                    cudaDriverEntryPointQueryResult* status = nullptr);
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** func, unsigned int version,
                                             unsigned long long flags,
                                             cudaDriverEntryPointQueryResult* status = nullptr);

namespace ditkernels {
namespace emu {
void mbarrier_init(uint64_t* bar, uint32_t count);
void mbarrier_arrive(uint64_t* bar, uint32_t tx_bytes);  // arrive.expect_tx with tx_bytes > 0
void mbarrier_wait(uint64_t* bar, uint32_t parity);
bool mbarrier_test_parity(uint64_t* bar, uint32_t parity);  // one try_wait probe, no blocking
void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y);
void tma_check_map(const CUtensorMap* map);
}  // namespace emu

namespace tma {

inline void mbarrier_init(uint64_t* bar, uint32_t count) { emu::mbarrier_init(bar, count); }
inline void fence_barrier_init() {}
inline void mbarrier_arrive(uint64_t* bar) { emu::mbarrier_arrive(bar, 0); }
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  emu::mbarrier_arrive(bar, bytes);
}
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) { emu::mbarrier_wait(bar, parity); }
inline bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  return emu::mbarrier_test_parity(bar, parity);
}
inline void prefetch_map(const CUtensorMap* map) { emu::tma_check_map(map); }
inline void load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int x, int y) {
  emu::tma_load_2d(dst, map, bar, x, y);
}
// Register budgets are not modelled (the emulator has no register file).
template <int kRegs>
inline void setmaxnreg_dec() {}
template <int kRegs>
inline void setmaxnreg_inc() {}

}  // namespace tma
}  // namespace ditkernels
