// Kernels that exercise the emulator itself (python_tests/test_cuda_emulated.py):
// a tensor-core tile product through cp.async + ldmatrix + mma.sync, and one faulty
// kernel for each fault the emulator claims to catch. Exposed as
// torch.ops.ditkernels_emu.emulator_selftest(name, a, b) -> Tensor: for "mma", C =
// A B^T of bf16 a [16, 16] and b [8, 16]; for "wgmma*", C = A B^T of a [64, k] and
// b [128, k] through one m64n128 wgmma (bf16 k = 16, or int8 k = 32 for
// "wgmma_s8"); the fault cases ignore a and b.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <string>

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

enum class WgmmaFault { kNone, kReadBeforeWait, kOverwriteInFlight, kUnalignedTile };

// One warpgroup: C[64 x 128] = A[64 x k] B[128 x k]^T through one wgmma, the
// operands stored into swizzled tiles by ordinary stores.
template <typename T, typename Acc>
__global__ void wgmma_tile_kernel(const T* a, const T* b, float* c, WgmmaFault fault) {
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* tile =
      fault == WgmmaFault::kUnalignedTile ? smem_raw : wgmma::align_to_atom(smem_raw);
  unsigned char* sa = tile;
  unsigned char* sb = tile + 64 * wgmma::kRowBytes;
  const int tid = threadIdx.x;
  // Row r's 32 bytes (the wgmma's k) are chunks 0 and 1; the rest of the row stays unset.
  for (int idx = tid; idx < (64 + 128) * 2; idx += 128) {
    const bool in_a = idx < 128;
    const int row = (in_a ? idx : idx - 128) / 2, chunk = idx % 2;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(in_a ? a : b) + row * 32 + chunk * 16;
    std::memcpy((in_a ? sa : sb) + wgmma::swizzle128(row, chunk), src, 16);
  }
  wgmma::fence_proxy_async();
  __syncthreads();
  Acc acc[64];
  for (int i = 0; i < 64; ++i) acc[i] = 0;
  wgmma::fence();
  wgmma::mma<T, 128>(acc, wgmma::desc_sw128(sa, 0), wgmma::desc_sw128(sb, 0), 1);
  wgmma::commit();
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
  WgmmaFault fault = WgmmaFault::kNone;
  if (name == "wgmma_read_before_wait") fault = WgmmaFault::kReadBeforeWait;
  else if (name == "wgmma_overwrite_in_flight") fault = WgmmaFault::kOverwriteInFlight;
  else if (name == "wgmma_unaligned_tile") fault = WgmmaFault::kUnalignedTile;
  else TORCH_CHECK(name == "wgmma" || s8, "emulator_selftest: unknown case '", name, "'");
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
