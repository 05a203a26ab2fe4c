// Kernels that exercise the emulator itself (python_tests/test_cuda_emulated.py):
// a tensor-core tile product through cp.async + ldmatrix + mma.sync, and one faulty
// kernel for each fault the emulator claims to catch. Exposed as
// torch.ops.ditkernels_emu.emulator_selftest(name, a, b) -> Tensor: for "mma", C =
// A B^T of bf16 a [16, 16] and b [8, 16]; for "wgmma*", C = A B^T of a [64, k] and
// b [128, k] through one m64n128 wgmma (bf16 k = 16, or int8 k = 32 for
// "wgmma_s8"; "wgmma_twice" gives 3 A B^T); for "cp_async_*", out[i][l] = a[i][l][0]
// of float a [iters + 1, 32, 4]; the layout cases take and return raw fragments and
// tile images (see their kernels); the other fault cases ignore a and b.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>

#include "ditkernels/cuda_mma.cuh"
#include "ditkernels/cuda_runtime.cuh"
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

at::Tensor wgmma_selftest(const std::string& name, const at::Tensor& a_in, const at::Tensor& b_in) {
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
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  wgmma::fence();
  wgmma::mma_k_tile<c10::BFloat16, 128>(acc, sa, sb);
  wgmma::commit();
  wgmma::wait<0>();
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
