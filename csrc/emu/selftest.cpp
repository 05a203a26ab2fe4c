// Kernels that exercise the emulator itself (python_tests/test_cuda_emulated.py):
// a tensor-core tile product through cp.async + ldmatrix + mma.sync, and one faulty
// kernel for each fault the emulator claims to catch. Exposed as
// torch.ops.ditkernels_emu.emulator_selftest(name, a, b) -> Tensor: for "mma", C =
// A B^T of bf16 a [16, 16] and b [8, 16]; for "wgmma*", C = A B^T of a [64, k] and
// b [128, k] through one m64n128 wgmma (bf16 k = 16, or int8 k = 32 for
// "wgmma_s8"; "wgmma_twice" gives 3 A B^T); for "cp_async_*", out[i][l] = a[i][l][0]
// of float a [iters + 1, 32, 4]; the layout cases take and return raw fragments and
// tile images (see their kernels); the TMA and mbarrier cases are described at
// tma_selftest; the other fault cases ignore a and b.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>

#include "ditkernels/cuda_mma.cuh"
#include "ditkernels/cuda_runtime.cuh"
#include "ditkernels/cuda_tma.cuh"
#include "ditkernels/cuda_wgmma.cuh"

namespace ditkernels {
namespace {

// One warp: C[16 x 8] = A[16 x 16] B[8 x 16]^T for bf16 A, B (row-major in global
// memory), staged through shared memory with cp.async, read with ldmatrix.
// skip_wait leaves out cp.async.wait_group, so the tile is read before it lands.
__global__ void mma_tile_kernel(const c10::BFloat16* a, const c10::BFloat16* b, float* c,
                                bool skip_wait) {
  DK_DYNAMIC_SMEM(16, smem);
  auto* sa = reinterpret_cast<c10::BFloat16*>(smem);
  auto* sb = sa + 16 * 16;
  const int lane = threadIdx.x;
  // 16 rows of A and 8 of B, two 16-byte chunks each: 48 chunks over 32 lanes.
  for (int chunk = lane; chunk < 48; chunk += 32) {
    const bool in_a = chunk < 32;
    const int row = in_a ? chunk / 2 : (chunk - 32) / 2, half = chunk % 2;
    mma::cp_async_16((in_a ? sa : sb) + row * 16 + half * 8, (in_a ? a : b) + row * 16 + half * 8,
                     16);
  }
  mma::cp_async_commit();
  if (!skip_wait) mma::cp_async_wait<0>();
  __syncthreads();
  uint32_t af[4], bf[2];
  mma::ldmatrix_x4(af, sa + (lane & 15) * 16 + (lane >> 4) * 8);
  mma::ldmatrix_x2(bf, sb + (lane & 7) * 16 + ((lane >> 3) & 1) * 8);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma::mma_16816<c10::BFloat16>(acc, af, bf);
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) c[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = acc[i];
}

// The cases of wgmma_tile_kernel: the correct ones (kNone, kCpAsync, kTwice) and one
// fault each, which the emulator must report or show in the result.
enum class WgmmaFault {
  kNone,
  kReadBeforeWait,
  kOverwriteInFlight,
  kUnalignedTile,
  kNoProxyFence,          // stores, then wgmma with no fence.proxy.async
  kCpAsync,               // operands through cp.async, every thread fencing its own
  kCpAsyncUnfencedThread, // the same, one thread's fence missing
  kNoWgmmaFence,          // no wgmma.fence before the first wgmma
  kTwice,                 // wgmma, double the accumulators, wgmma.fence, wgmma again
  kTwiceUnfenced,         // the same without that wgmma.fence
};

// One warpgroup: C[64 x 128] = A[64 x k] B[128 x k]^T through one wgmma, the
// operands stored into swizzled tiles by ordinary stores (or cp.async).
template <typename T, typename Acc>
__global__ void wgmma_tile_kernel(const T* a, const T* b, float* c, WgmmaFault fault) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* tile =
      fault == WgmmaFault::kUnalignedTile ? smem_raw : wgmma::align_to_atom(smem_raw);
  unsigned char* sa = tile;
  unsigned char* sb = tile + 64 * wgmma::kRowBytes;
  const int tid = threadIdx.x;
  const bool cp_async =
      fault == WgmmaFault::kCpAsync || fault == WgmmaFault::kCpAsyncUnfencedThread;
  // Row r's 32 bytes (the wgmma's k) are chunks 0 and 1; the rest of the row stays unset.
  for (int idx = tid; idx < (64 + 128) * 2; idx += 128) {
    const bool in_a = idx < 128;
    const int row = (in_a ? idx : idx - 128) / 2, chunk = idx % 2;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(in_a ? a : b) + row * 32 + chunk * 16;
    unsigned char* dst = (in_a ? sa : sb) + wgmma::swizzle128(row, chunk);
    if (cp_async) {
      mma::cp_async_16(dst, src, 16);
    } else {
      std::memcpy(dst, src, 16);
    }
  }
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  const bool skip_proxy_fence = fault == WgmmaFault::kNoProxyFence ||
                                (fault == WgmmaFault::kCpAsyncUnfencedThread && tid == 5);
  if (!skip_proxy_fence) wgmma::fence_proxy_async();
  __syncthreads();
  Acc acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0;
  if (fault != WgmmaFault::kNoWgmmaFence) wgmma::fence();
  wgmma::mma<T, 128>(acc, wgmma::desc_sw128(sa, 0), wgmma::desc_sw128(sb, 0), 1);
  wgmma::commit();
  if (fault == WgmmaFault::kTwice || fault == WgmmaFault::kTwiceUnfenced) {
    wgmma::wait<0>();
    for (int i = 0; i < 64; ++i) acc[i] *= 2;
    if (fault == WgmmaFault::kTwice) wgmma::fence();
    wgmma::mma<T, 128>(acc, wgmma::desc_sw128(sa, 0), wgmma::desc_sw128(sb, 0), 1);
    wgmma::commit();
  }
  Acc early[64];
  for (int i = 0; i < 64; ++i) early[i] = acc[i];
  if (fault == WgmmaFault::kOverwriteInFlight && tid == 0) sb[0] ^= 1;
  wgmma::wait<0>();
  const Acc* result = fault == WgmmaFault::kReadBeforeWait ? early : acc;
  const int warp = tid / 32, lane = tid % 32;
  for (int i = 0; i < 64; ++i) {
    const int row = 16 * warp + lane / 4 + ((i % 4) >= 2 ? 8 : 0);
    const int col = 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
    c[row * 128 + col] = static_cast<float>(result[i]);
  }
}

// ---- TMA and mbarrier ----

// acc = the four k16 bf16 wgmma of a 64-wide k-tile: A's 64 rows at sa, B's 128 at sb.
void k_tile_product(float (&acc)[64], const unsigned char* sa, const unsigned char* sb) {
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  wgmma::fence();
  wgmma::mma_k_tile<c10::BFloat16, 128>(acc, sa, sb);
  wgmma::commit();
  wgmma::wait<0>();
}

// Thread 0 initialises the barrier; the block waits for it.
void init_barrier(uint64_t* bar, uint32_t count) {
  if (threadIdx.x == 0) {
    tma::mbarrier_init(bar, count);
    tma::fence_barrier_init();
  }
  __syncthreads();
}

// A box of `rows` 128-byte rows at (x, y) of a uint8 matrix, through one TMA load into
// an atom-aligned tile: out is the tile's raw image. read_before_wait reads it before
// the wait on the barrier (then waits, so that no load is in flight at the end);
// skip_wait never waits.
enum class TmaFault { kNone, kReadBeforeWait, kSkipWait };

__global__ void tma_tile_kernel(const __grid_constant__ CUtensorMap map, int x, int y, int rows,
                                unsigned char* out, TmaFault fault) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* tile = wgmma::align_to_atom(smem_raw);
  auto* bar = reinterpret_cast<uint64_t*>(tile + rows * 128);
  const int tid = threadIdx.x;
  init_barrier(bar, 1);
  if (tid == 0) {
    tma::prefetch_map(&map);
    tma::mbarrier_arrive_expect_tx(bar, rows * 128);
    tma::load_2d(tile, &map, bar, x, y);
  }
  if (fault == TmaFault::kNone) tma::mbarrier_wait(bar, 0);
  for (int i = tid; i < rows * 128; i += blockDim.x) out[i] = tile[i];
  if (fault == TmaFault::kReadBeforeWait) {
    __syncthreads();  // every thread has read before the first waits
    tma::mbarrier_wait(bar, 0);
  }
}

// The phases of one barrier of arrival count 2 (threads 0 and 32 arrive), probed by
// thread 0 with try_wait.parity at each step; the last phase also waits for the
// 1024 bytes of a TMA load. out[i] is probe i (1: that parity's phase completed).
__global__ void mbarrier_phases_kernel(const __grid_constant__ CUtensorMap map, int* out) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* tile = wgmma::align_to_atom(smem_raw);
  auto* bar = reinterpret_cast<uint64_t*>(tile + 1024);
  const int tid = threadIdx.x;
  int n = 0;
  auto probe = [&](uint32_t parity) {
    if (tid == 0) out[n++] = tma::mbarrier_try_wait(bar, parity) ? 1 : 0;
  };
  init_barrier(bar, 2);
  probe(0);  // phase 0 running
  probe(1);  // "phase -1" counts as complete
  __syncthreads();
  if (tid == 0) tma::mbarrier_arrive(bar);
  __syncthreads();
  probe(0);  // one of two arrivals
  if (tid == 32) tma::mbarrier_arrive(bar);
  __syncthreads();
  probe(0);  // phase 0 complete, phase 1 running
  probe(1);
  if (tid == 0) tma::mbarrier_arrive_expect_tx(bar, 1024);
  __syncthreads();
  if (tid == 32) tma::mbarrier_arrive(bar);
  __syncthreads();
  probe(1);  // arrivals done, 1024 transaction bytes outstanding
  if (tid == 0) tma::load_2d(tile, &map, bar, 0, 0);
  __syncthreads();
  probe(1);  // the load's bytes completed phase 1
  probe(0);  // phase 2 running
  tma::mbarrier_wait(bar, 1);
}

// Every thread waits for phase 0 of a barrier that only thread 0 arrives on.
__global__ void mbarrier_deadlock_kernel(int* out) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  auto* bar = reinterpret_cast<uint64_t*>(smem_raw);
  if (threadIdx.x == 0) tma::mbarrier_init(bar, 2);
  __syncthreads();
  if (threadIdx.x == 0) tma::mbarrier_arrive(bar);
  tma::mbarrier_wait(bar, 0);
  out[threadIdx.x] = 1;
}

// C[64 x 128] = A[64 x 64] B[128 x 64]^T (bf16) through TMA loads into swizzled tiles
// and the four k16 wgmma of the k-tile, with no fence.proxy.async (TMA writes through
// the async proxy that wgmma reads through).
__global__ void wgmma_tma_kernel(const __grid_constant__ CUtensorMap map_a,
                                 const __grid_constant__ CUtensorMap map_b, float* c) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* sa = wgmma::align_to_atom(smem_raw);
  unsigned char* sb = sa + 64 * wgmma::kRowBytes;
  auto* bar = reinterpret_cast<uint64_t*>(sb + 128 * wgmma::kRowBytes);
  const int tid = threadIdx.x;
  init_barrier(bar, 1);
  if (tid == 0) {
    tma::mbarrier_arrive_expect_tx(bar, (64 + 128) * wgmma::kRowBytes);
    tma::load_2d(sa, &map_a, bar, 0, 0);
    tma::load_2d(sb, &map_b, bar, 0, 0);
  }
  tma::mbarrier_wait(bar, 0);
  float acc[64];
  k_tile_product(acc, sa, sb);
  const int warp = tid / 32, lane = tid % 32;
  for (int i = 0; i < 64; ++i) {
    const int row = 16 * warp + lane / 4 + ((i % 4) >= 2 ? 8 : 0);
    const int col = 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
    c[row * 128 + col] = acc[i];
  }
}

// cuTensorMapEncodeTiled, reached as the kernels reach it, on the argument cases of
// emulator_selftest("tma_encode"): one CUresult per case.
at::Tensor tma_encode_cases() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status{};
  TORCH_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status) ==
                      cudaSuccess &&
                  status == cudaDriverEntryPointSuccess,
              "no cuTensorMapEncodeTiled");
  const auto encode = reinterpret_cast<tma::EncodeTiled>(fn);
  alignas(16) static unsigned char data[64 * 1024];
  struct Case {
    CUtensorMapDataType type;
    cuuint32_t rank;
    size_t offset;
    cuuint64_t dims[2], strides[1];
    cuuint32_t box[2], elem_strides[2];
    CUtensorMapSwizzle swizzle;
    CUtensorMapFloatOOBfill fill;
  };
  const auto u8 = CU_TENSOR_MAP_DATA_TYPE_UINT8, bf16 = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const auto sw = CU_TENSOR_MAP_SWIZZLE_128B, none = CU_TENSOR_MAP_SWIZZLE_NONE;
  const auto zero = CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE, nan = CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA;
  const Case cases[] = {
      {u8, 2, 0, {160, 21}, {160}, {128, 16}, {1, 1}, sw, zero},     // valid
      {bf16, 2, 0, {64, 8}, {128}, {64, 8}, {1, 1}, sw, nan},        // valid: NaN fill of floats
      {u8, 2, 8, {160, 21}, {160}, {128, 16}, {1, 1}, sw, zero},     // address not 16-byte aligned
      {u8, 2, 0, {160, 21}, {168}, {128, 16}, {1, 1}, sw, zero},     // stride not a multiple of 16
      {u8, 2, 0, {160, 21}, {160}, {128, 257}, {1, 1}, none, zero},  // box beyond 256
      {bf16, 2, 0, {160, 21}, {320}, {128, 16}, {1, 1}, sw, zero},   // 256-byte box rows, 128B swizzle
      {u8, 2, 0, {160, 21}, {160}, {24, 16}, {1, 1}, none, zero},    // box rows not 16-byte multiples
      {u8, 0, 0, {160, 21}, {160}, {128, 16}, {1, 1}, sw, zero},     // rank 0
      {u8, 2, 0, {160, 21}, {160}, {128, 16}, {1, 9}, sw, zero},     // element stride 9
      {u8, 2, 0, {160, 21}, {160}, {128, 16}, {1, 1}, sw, nan},      // NaN fill of integers
      {u8, 2, 0, {0, 21}, {160}, {128, 16}, {1, 1}, sw, zero},       // empty dimension
  };
  at::Tensor out = at::empty({static_cast<int64_t>(std::size(cases))}, at::kLong);
  for (size_t i = 0; i < std::size(cases); ++i) {
    const Case& c = cases[i];
    CUtensorMap map;
    out[i] = static_cast<int64_t>(encode(&map, c.type, c.rank, data + c.offset, c.dims, c.strides,
                                         c.box, c.elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                         c.swizzle, CU_TENSOR_MAP_L2_PROMOTION_NONE, c.fill));
  }
  return out;
}

// The TMA and mbarrier cases of emulator_selftest:
//  "tma_tile" / "tma_read_before_wait" / "tma_without_wait": a uint8 [R, C], b int64
//    (x, y, rows): the raw image of the TMA tile of `rows` x 128 bytes at (x, y);
//  "tma_encode": cuTensorMapEncodeTiled's results on tma_encode_cases;
//  "mbarrier_phases": a uint8 [>= 8, 128]: the probes of mbarrier_phases_kernel;
//  "mbarrier_deadlock": the fault;
//  "wgmma_tma" is in wgmma_selftest.
at::Tensor tma_selftest(const std::string& name, const at::Tensor& a_in, const at::Tensor& b_in) {
  if (name == "tma_encode") return tma_encode_cases();
  if (name == "mbarrier_deadlock") {
    at::Tensor out = at::zeros({64}, at::kInt);
    DK_LAUNCH(mbarrier_deadlock_kernel, 1, 64, 16, nullptr)(out.data_ptr<int>());
    return out;
  }
  TORCH_CHECK(a_in.dim() == 2 && a_in.scalar_type() == at::kByte && a_in.size(1) % 16 == 0,
              "emulator_selftest: ", name, " needs a uint8 matrix a [R, C], C % 16 == 0");
  const at::Tensor a = a_in.contiguous();
  if (name == "mbarrier_phases") {
    const CUtensorMap map = tma::make_tensor_map_2d(a.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                                                    a.size(0), a.size(1), a.size(1), 8, 128);
    at::Tensor out = at::full({8}, -1, at::kInt);
    DK_LAUNCH(mbarrier_phases_kernel, 1, 64, 3 * 1024, nullptr)(map, out.data_ptr<int>());
    return out;
  }
  TORCH_CHECK(b_in.sizes() == at::IntArrayRef({3}) && b_in.scalar_type() == at::kLong,
              "emulator_selftest: ", name, " needs b = int64 (x, y, rows)");
  const int x = static_cast<int>(b_in[0].item<int64_t>()), y = static_cast<int>(b_in[1].item<int64_t>());
  const int rows = static_cast<int>(b_in[2].item<int64_t>());
  const TmaFault fault = name == "tma_read_before_wait" ? TmaFault::kReadBeforeWait
                         : name == "tma_without_wait"   ? TmaFault::kSkipWait
                                                        : TmaFault::kNone;
  TORCH_CHECK(name == "tma_tile" || fault != TmaFault::kNone, "emulator_selftest: unknown case '",
              name, "'");
  const CUtensorMap map = tma::make_tensor_map_2d(a.data_ptr(), CU_TENSOR_MAP_DATA_TYPE_UINT8, 1,
                                                  a.size(0), a.size(1), a.size(1), rows, 128);
  at::Tensor out = at::empty({rows, 128}, at::kByte);
  DK_LAUNCH(tma_tile_kernel, 1, 64, static_cast<size_t>(rows * 128 + 16 + wgmma::kAtomBytes), nullptr)(
      map, x, y, rows, out.data_ptr<uint8_t>(), fault);
  return out;
}

at::Tensor wgmma_selftest(const std::string& name, const at::Tensor& a_in, const at::Tensor& b_in) {
  if (name == "wgmma_tma") {
    TORCH_CHECK(a_in.sizes() == at::IntArrayRef({64, 64}) && b_in.sizes() == at::IntArrayRef({128, 64}),
                "emulator_selftest: wgmma_tma needs a [64, 64] and b [128, 64]");
    const at::Tensor a = a_in.to(at::kBFloat16).contiguous(), b = b_in.to(at::kBFloat16).contiguous();
    const auto bf16 = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    const CUtensorMap map_a = tma::make_tensor_map_2d(a.data_ptr(), bf16, 2, 64, 64, 64, 64, 64);
    const CUtensorMap map_b = tma::make_tensor_map_2d(b.data_ptr(), bf16, 2, 128, 64, 64, 128, 64);
    at::Tensor c = at::empty({64, 128}, at::kFloat);
    const int smem = 192 * wgmma::kRowBytes + 16 + wgmma::kAtomBytes;
    DK_LAUNCH(wgmma_tma_kernel, 1, 128, smem, nullptr)(map_a, map_b, c.data_ptr<float>());
    return c;
  }
  const bool s8 = name == "wgmma_s8";
  const int64_t k = s8 ? 32 : 16;
  TORCH_CHECK(a_in.sizes() == at::IntArrayRef({64, k}) && b_in.sizes() == at::IntArrayRef({128, k}),
              "emulator_selftest: ", name, " needs a [64, ", k, "] and b [128, ", k, "]");
  static const std::pair<const char*, WgmmaFault> kCases[] = {
      {"wgmma", WgmmaFault::kNone},
      {"wgmma_s8", WgmmaFault::kNone},
      {"wgmma_read_before_wait", WgmmaFault::kReadBeforeWait},
      {"wgmma_overwrite_in_flight", WgmmaFault::kOverwriteInFlight},
      {"wgmma_unaligned_tile", WgmmaFault::kUnalignedTile},
      {"wgmma_without_proxy_fence", WgmmaFault::kNoProxyFence},
      {"wgmma_cp_async", WgmmaFault::kCpAsync},
      {"wgmma_cp_async_unfenced_thread", WgmmaFault::kCpAsyncUnfencedThread},
      {"wgmma_without_fence", WgmmaFault::kNoWgmmaFence},
      {"wgmma_twice", WgmmaFault::kTwice},
      {"wgmma_twice_unfenced", WgmmaFault::kTwiceUnfenced},
  };
  const auto* found = std::find_if(std::begin(kCases), std::end(kCases),
                                   [&](const auto& c) { return name == c.first; });
  TORCH_CHECK(found != std::end(kCases), "emulator_selftest: unknown case '", name, "'");
  const WgmmaFault fault = found->second;
  at::Tensor c = at::empty({64, 128}, at::kFloat);
  const size_t smem = 192 * wgmma::kRowBytes + wgmma::kAtomBytes;
  if (s8) {
    const at::Tensor a = a_in.to(at::kChar).contiguous(), b = b_in.to(at::kChar).contiguous();
    DK_LAUNCH((wgmma_tile_kernel<int8_t, int>), 1, 128, smem, nullptr)(
        a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), c.data_ptr<float>(), fault);
  } else {
    const at::Tensor a = a_in.to(at::kBFloat16).contiguous(), b = b_in.to(at::kBFloat16).contiguous();
    DK_LAUNCH((wgmma_tile_kernel<c10::BFloat16, float>), 1, 128, smem, nullptr)(
        a.data_ptr<c10::BFloat16>(), b.data_ptr<c10::BFloat16>(), c.data_ptr<float>(), fault);
  }
  return c;
}

// The layouts as the hardware defines them, bypassing the kernels' own helpers (the
// test writes the PTX ISA's and CuTe's tables down as data and builds these inputs):
// one mma.m16n8k16 bf16 on raw per-lane registers, a [32][4] and b [32][2], giving
// each lane's four accumulators ...
__global__ void mma_fragments_kernel(const uint32_t* a, const uint32_t* b, float* d) {
  const int lane = threadIdx.x;
  const uint32_t af[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  const uint32_t bf[2] = {b[2 * lane], b[2 * lane + 1]};
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma::mma_16816<c10::BFloat16>(acc, af, bf);
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = acc[i];
}

// ... and the four k16 wgmma of a 64-wide k-tile on byte images of A [64][128] and
// B [128][128] copied unchanged into an atom-aligned tile, giving each warpgroup
// thread's 64 accumulators.
__global__ void wgmma_images_kernel(const unsigned char* a, const unsigned char* b, float* d) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* sa = wgmma::align_to_atom(smem_raw);
  unsigned char* sb = sa + 64 * wgmma::kRowBytes;
  const int tid = threadIdx.x;
  for (int i = tid; i < 64 * 8; i += 128) std::memcpy(sa + 16 * i, a + 16 * i, 16);
  for (int i = tid; i < 128 * 8; i += 128) std::memcpy(sb + 16 * i, b + 16 * i, 16);
  wgmma::fence_proxy_async();
  __syncthreads();
  float acc[64];
  k_tile_product(acc, sa, sb);
  for (int i = 0; i < 64; ++i) d[64 * tid + i] = acc[i];
}

// ... and one m64n128k16 wgmma with A from raw per-thread registers a [128][4] and B
// MN-major: the byte image b [32][128] of B^T's 16 k rows, columns 0..63 then 64..127
// (16 rows each, the leading byte offset apart), copied unchanged.
__global__ void wgmma_rs_mn_images_kernel(const uint32_t* a, const unsigned char* b, float* d) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* sb = wgmma::align_to_atom(smem_raw);
  const int tid = threadIdx.x;
  for (int i = tid; i < 32 * 8; i += 128) std::memcpy(sb + 16 * i, b + 16 * i, 16);
  wgmma::fence_proxy_async();
  __syncthreads();
  const uint32_t af[4] = {a[4 * tid], a[4 * tid + 1], a[4 * tid + 2], a[4 * tid + 3]};
  float acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  wgmma::fence();
  wgmma::mma_rs_mn<c10::BFloat16, 128>(
      acc, af, wgmma::desc_lo(wgmma::desc_sw128_mn(sb, 16 * wgmma::kRowBytes)), 1);
  wgmma::commit();
  wgmma::wait<0>();
  for (int i = 0; i < 64; ++i) d[64 * tid + i] = acc[i];
}

__global__ void misaligned_ldmatrix_kernel(float* out) {
  DK_DYNAMIC_SMEM(16, smem);
  uint32_t r[4];
  mma::ldmatrix_x4(r, smem + (threadIdx.x & 15) * 16 + 8);  // 8 bytes off a row start
  out[threadIdx.x] = static_cast<float>(r[0]);
}

__global__ void exited_lane_shuffle_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void divergent_barrier_kernel(float* out) {
  // Warp 0 waits at __syncthreads while warp 1 waits in a shuffle for a lane that
  // is itself at the barrier: neither can complete.
  if (threadIdx.x < 32 || threadIdx.x == 32) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  }
}

// Thread 1 reads what thread 0 wrote with no barrier between: the emulator's
// schedule happens to order them, a GPU need not, and ThreadSanitizer (the
// emulator's racecheck) must say so.
__global__ void shared_memory_race_kernel(float* out) {
  DK_DYNAMIC_SMEM(16, smem);
  float* s = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) s[0] = 1.f;
  if (threadIdx.x == 1) out[0] = s[0];
}

// Warp 0 streams tiles of 32 16-byte chunks through one shared buffer that warp 1
// reads: out[i][l] = tile i's chunk l. The race: refill_after_barrier false issues
// tile i + 1's copies before the barrier that ends warp 1's reads of tile i, a
// write-after-read race that shows only if the copies land before their wait
// (DITKERNELS_EMU_CPASYNC=early), as they may on a GPU.
__global__ void cp_async_stream_kernel(const float* src, float* out, int iters,
                                       bool refill_after_barrier) {
  DK_DYNAMIC_SMEM(16, smem);
  float* buf = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x, lane = t % 32;
  auto refill = [&](int tile) {
    mma::cp_async_16(buf + 4 * lane, src + (tile * 32 + lane) * 4, 16);
    mma::cp_async_commit();
  };
  if (t < 32) {
    refill(0);
    mma::cp_async_wait<0>();
  }
  __syncthreads();
  for (int i = 0; i < iters; ++i) {
    if (t >= 32) out[i * 32 + lane] = buf[4 * lane];
    if (t < 32 && !refill_after_barrier) refill(i + 1);
    __syncthreads();
    if (t < 32 && refill_after_barrier) refill(i + 1);
    if (t < 32) mma::cp_async_wait<0>();
    __syncthreads();
  }
}

__global__ void big_smem_kernel(float* out) {
  DK_DYNAMIC_SMEM(16, smem);
  out[0] = smem[0];
}

at::Tensor emulator_selftest(c10::string_view name_view, const at::Tensor& a_in,
                             const at::Tensor& b_in) {
  const std::string name(name_view);
  if (name == "mma" || name == "mma_without_wait") {
    TORCH_CHECK(a_in.sizes() == at::IntArrayRef({16, 16}) && b_in.sizes() == at::IntArrayRef({8, 16}),
                "emulator_selftest: a must be [16, 16] and b [8, 16]");
    const at::Tensor a = a_in.to(at::kBFloat16).contiguous();
    const at::Tensor b = b_in.to(at::kBFloat16).contiguous();
    at::Tensor c = at::empty({16, 8}, at::kFloat);
    DK_LAUNCH(mma_tile_kernel, 1, 32, 24 * 16 * 2, nullptr)(
        a.data_ptr<c10::BFloat16>(), b.data_ptr<c10::BFloat16>(), c.data_ptr<float>(),
        name == "mma_without_wait");
    return c;
  }
  if (name.rfind("wgmma", 0) == 0) return wgmma_selftest(name, a_in, b_in);
  if (name.rfind("tma", 0) == 0 || name.rfind("mbarrier", 0) == 0) {
    return tma_selftest(name, a_in, b_in);
  }
  if (name == "mma_fragments") {
    TORCH_CHECK(a_in.sizes() == at::IntArrayRef({32, 4}) && b_in.sizes() == at::IntArrayRef({32, 2}) &&
                    a_in.scalar_type() == at::kInt && b_in.scalar_type() == at::kInt,
                "emulator_selftest: mma_fragments needs int32 a [32, 4] and b [32, 2]");
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    at::Tensor d = at::empty({32, 4}, at::kFloat);
    DK_LAUNCH(mma_fragments_kernel, 1, 32, 0, nullptr)(
        reinterpret_cast<const uint32_t*>(a.data_ptr<int>()),
        reinterpret_cast<const uint32_t*>(b.data_ptr<int>()), d.data_ptr<float>());
    return d;
  }
  if (name == "swizzle_images") {
    TORCH_CHECK(a_in.sizes() == at::IntArrayRef({64, 128}) && b_in.sizes() == at::IntArrayRef({128, 128}) &&
                    a_in.scalar_type() == at::kByte && b_in.scalar_type() == at::kByte,
                "emulator_selftest: swizzle_images needs uint8 a [64, 128] and b [128, 128]");
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    at::Tensor d = at::empty({128, 64}, at::kFloat);
    DK_LAUNCH(wgmma_images_kernel, 1, 128, 192 * wgmma::kRowBytes + wgmma::kAtomBytes, nullptr)(
        a.data_ptr<uint8_t>(), b.data_ptr<uint8_t>(), d.data_ptr<float>());
    return d;
  }
  if (name == "rs_mn_images") {
    TORCH_CHECK(a_in.sizes() == at::IntArrayRef({128, 4}) && b_in.sizes() == at::IntArrayRef({32, 128}) &&
                    a_in.scalar_type() == at::kInt && b_in.scalar_type() == at::kByte,
                "emulator_selftest: rs_mn_images needs int32 a [128, 4] and uint8 b [32, 128]");
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    at::Tensor d = at::empty({128, 64}, at::kFloat);
    DK_LAUNCH(wgmma_rs_mn_images_kernel, 1, 128, 32 * wgmma::kRowBytes + wgmma::kAtomBytes, nullptr)(
        reinterpret_cast<const uint32_t*>(a.data_ptr<int>()), b.data_ptr<uint8_t>(),
        d.data_ptr<float>());
    return d;
  }
  if (name == "cp_async_war_race" || name == "cp_async_refill_after_barrier") {
    TORCH_CHECK(a_in.dim() == 3 && a_in.size(0) >= 2 && a_in.size(1) == 32 && a_in.size(2) == 4,
                "emulator_selftest: ", name, " needs a [iters + 1, 32, 4]");
    const at::Tensor src = a_in.to(at::kFloat).contiguous();
    const int iters = static_cast<int>(src.size(0) - 1);
    at::Tensor out = at::empty({iters, 32}, at::kFloat);
    DK_LAUNCH(cp_async_stream_kernel, 1, 64, 32 * 16, nullptr)(
        src.data_ptr<float>(), out.data_ptr<float>(), iters,
        name == "cp_async_refill_after_barrier");
    return out;
  }
  at::Tensor out = at::zeros({64}, at::kFloat);
  if (name == "misaligned_ldmatrix") {
    DK_LAUNCH(misaligned_ldmatrix_kernel, 1, 32, 1024, nullptr)(out.data_ptr<float>());
  } else if (name == "exited_lane_shuffle") {
    DK_LAUNCH(exited_lane_shuffle_kernel, 1, 32, 0, nullptr)(out.data_ptr<float>());
  } else if (name == "divergent_barrier") {
    DK_LAUNCH(divergent_barrier_kernel, 1, 64, 0, nullptr)(out.data_ptr<float>());
  } else if (name == "shared_memory_race") {
    DK_LAUNCH(shared_memory_race_kernel, 1, 32, 16, nullptr)(out.data_ptr<float>());
  } else if (name == "smem_without_attribute") {
    DK_LAUNCH(big_smem_kernel, 1, 32, 64 * 1024, nullptr)(out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "emulator_selftest: unknown case '", name, "'");
  }
  return out;
}

}  // namespace
}  // namespace ditkernels

TORCH_LIBRARY_FRAGMENT(ditkernels_emu, m) {
  m.def("emulator_selftest(str name, Tensor a, Tensor b) -> Tensor");
}

TORCH_LIBRARY_IMPL(ditkernels_emu, CPU, m) {
  m.impl("emulator_selftest", &ditkernels::emulator_selftest);
}
