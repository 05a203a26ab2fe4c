#pragma once
// CPU emulation of the part of CUDA that ditkernels' kernels use, so that the very
// kernel sources in csrc/cuda run, unchanged, on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber; the fibers of one block run on one host
// thread and switch only where CUDA threads synchronise (__syncthreads, warp
// collectives), so what one thread writes before a barrier is what the others read
// after it. Warp-wide instructions (shuffles, ldmatrix, mma.sync) gather every lane's
// operands and compute each lane's result from the PTX ISA's fragment layouts
// (csrc/emu/ptx_emu.h). cp.async copies land only at cp.async.wait_group, so a tile
// read before its wait reads stale data, as it may on a GPU; with
// DITKERNELS_EMU_CPASYNC=early each copy lands instead at a random point between its
// issue and its wait (seeded by DITKERNELS_EMU_SEED), so a copy into a buffer that
// other threads still read (a write-after-read race) changes results.
//
// The async proxy (wgmma's operand reads) sees a shared-memory write of the generic
// proxy (st.shared, cp.async) only after a fence.proxy.async: a wgmma that reads a
// chunk a thread's cp.async wrote before that thread's fence, or one changed by plain
// stores with no fence since the async proxy last read it, is reported. So is a
// wgmma whose accumulators were written since the last wgmma without a wgmma.fence
// between, and the first wgmma of a warpgroup that has executed no wgmma.fence.
//
// The device is the profile DITKERNELS_EMU_DEVICE names (h100, the default; h200,
// a100, sm89): compute capability, SM count and the shared-memory opt-in limit that
// the launchers read, so each picks the path it would pick on that GPU.
//
// What real hardware would reject is reported as an error of the launch: misaligned
// or out-of-range ldmatrix and cp.async addresses, dynamic shared memory beyond the
// opt-in limit or above 48 KiB without cudaFuncSetAttribute, warp collectives with
// exited lanes, barriers that can never complete, grids beyond CUDA's limits.
// Dynamic shared memory starts filled with 0xff bytes (NaN for every float type),
// and blocks alternate the order their threads run in between barriers, so reads
// of unwritten or unsynchronised shared memory change results.
//
// Built only into the emulation library (CMake -DDITKERNELS_EMULATE_CUDA=ON), where
// the kernels register for CPU tensors under torch.ops.ditkernels_emu.

#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// One copy per host thread, shared by the fibers (CUDA threads) of the block it runs.
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(8))) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

struct __nv_bfloat162 {
  c10::BFloat16 x, y;
};
struct __half2 {
  c10::Half x, y;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {c10::BFloat16(lo), c10::BFloat16(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {c10::Half(lo), c10::Half(hi)}; }

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace ditkernels {
namespace emu {

constexpr int kSlotBytes = 64;  // largest per-lane operand set of a warp collective

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
int lane_id();
void syncthreads();

// Warp collective, part 1: every lane deposits `bytes` (<= kSlotBytes) from `in` and
// waits for the others; returns the 32 deposits (slot l at l * kSlotBytes). Part 2,
// warp_release(), waits until every lane has read what it needs.
const unsigned char* warp_gather(const void* in, size_t bytes, unsigned mask, const char* what);
void warp_release();

// This block's dynamic shared memory (extern __shared__ in CUDA).
unsigned char* dynamic_smem();
// Checks that [p, p + bytes) lies in this block's dynamic shared memory, p aligned.
bool check_smem(const void* p, size_t bytes, size_t align, const char* what);
void cp_async(void* smem, const void* gmem, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);
// fence.proxy.async: this thread's generic-proxy shared-memory writes so far become
// visible to the async proxy.
void fence_proxy_async();

// Hopper warpgroup MMA (csrc/emu/wgmma_emu.h). The warpgroup collectives need all
// 128 threads 128 g .. 128 g + 127 of a block. mma snapshots its operands when the
// last thread issues it, poisons the accumulators, and computes them only at the
// wait_group that retires its group, after checking that the shared memory it read
// is unchanged: reading accumulators, or overwriting operands, before the wait
// shows. Shared-window addresses start at kSharedWindowBase, not at a 1024-byte
// boundary, so a swizzled tile must be aligned by the kernel, as on a GPU, where the
// window offset of dynamic shared memory is not promised either.
constexpr uint32_t kSharedWindowBase = 0x180;
enum class WgmmaType { kBF16, kF16, kS8 };
uint32_t shared_window_address(const void* p);
void wgmma_fence();
// With a_frag (this thread's four A registers, fp16/bf16) A comes from registers and
// B is MN-major (imm-trans-b = 1); otherwise both are K-major in shared memory.
void wgmma_mma(WgmmaType type, int n, uint64_t desc_a, uint64_t desc_b, void* acc, int scale_d,
               const uint32_t* a_frag = nullptr);
void wgmma_commit();
void wgmma_wait(int pending_groups);

// A kernel's DK_DEVICE_CHECK failed: reported as the launch's error (the thread
// goes on, as the kernels clamp what they checked).
void device_check_failed(const char* msg);

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
void launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem_bytes,
            const std::function<void()>& body);

// The fields of cudaDeviceProp the launchers read.
struct DeviceProperties {
  const char* name;
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  size_t reservedSharedMemPerBlock;
};
// The profile DITKERNELS_EMU_DEVICE names, read at every call so that tests can
// switch devices within one process.
const DeviceProperties& device_properties();

template <typename Kernel>
struct Launch {
  Kernel kernel;
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(const Args&... args) const {
    launch(reinterpret_cast<const void*>(kernel), name, grid, block, smem,
           [&] { kernel(args...); });
  }
};

}  // namespace emu
}  // namespace ditkernels

#define threadIdx (::ditkernels::emu::thread_idx())
#define blockIdx (::ditkernels::emu::block_idx())
#define blockDim (::ditkernels::emu::block_dim())
#define gridDim (::ditkernels::emu::grid_dim())

inline void __syncthreads() { ::ditkernels::emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= ditkernels::emu::kSlotBytes && std::is_trivially_copyable_v<T>);
  const unsigned char* slots = ditkernels::emu::warp_gather(&v, sizeof(T), mask, "__shfl_xor_sync");
  T out;
  std::memcpy(&out, slots + ((ditkernels::emu::lane_id() ^ lane_mask) & 31) *
                                ditkernels::emu::kSlotBytes,
              sizeof(T));
  ditkernels::emu::warp_release();
  return out;
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= ditkernels::emu::kSlotBytes && std::is_trivially_copyable_v<T>);
  const unsigned char* slots = ditkernels::emu::warp_gather(&v, sizeof(T), mask, "__shfl_sync");
  T out;
  std::memcpy(&out, slots + (src_lane & 31) * ditkernels::emu::kSlotBytes, sizeof(T));
  ditkernels::emu::warp_release();
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Blocks may run on several host threads at once. The GCC builtins rather than
// std::atomic_ref, so the emulator builds as C++17 too (torch 2.11's standard);
// floating-point values add in a compare-and-swap loop, as atomic_ref's would.
template <typename T>
inline T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
  } else {
    T seen, sum;
    __atomic_load(address, &seen, __ATOMIC_RELAXED);
    do {
      sum = seen + value;
    } while (!__atomic_compare_exchange(address, &seen, &sum, false, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED));
    return seen;
  }
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int2float_rn(int v) { return static_cast<float>(v); }

// CUDA's float -> integer conversions round half to even and saturate; NaN gives 0.
template <typename I>
inline I dk_saturating_rn(float x) {
  if (std::isnan(x)) return 0;
  const double r = std::nearbyint(static_cast<double>(x));
  if (r <= static_cast<double>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (r >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(r);
}
inline int __float2int_rn(float x) { return dk_saturating_rn<int>(x); }
inline long long __float2ll_rn(float x) { return dk_saturating_rn<long long>(x); }

// CUDA's integer and float min/max overloads, for any mix of argument types.
template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int value) {
  return ditkernels::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline const ::ditkernels::emu::DeviceProperties* getCurrentDeviceProperties() {
  return &::ditkernels::emu::device_properties();
}
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, #expr " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
