// CUDA kernels of the fused adaLN family.
//
// A row of C features is held in registers by a "team" of threads: one warp when
// C <= 256, otherwise the whole block (up to 1024 threads, C <= 8192). Each thread
// owns kEPT = 8 elements, loaded as 16-byte vectors when every pointer and C allow
// it. Statistics are fp32 and two-pass over the registers, so x is read once.
//
// The backward grid is (slots, B): a block walks a contiguous range of tokens of
// one sample, keeps per-column partial sums of dshift/dscale/dgate/dweight/dbias in
// shared memory and writes them to an fp32 [B, slots, C] buffer, which the host then
// reduces in a fixed order. No atomics, so the gradients are deterministic.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "ditkernels/cuda_runtime.cuh"
#include "ditkernels/adaln.h"
#include "ditkernels/dispatch.h"
#include "ditkernels/library.h"
#include "ditkernels/int8.h"
#include "ditkernels/int8_scales.cuh"

namespace ditkernels {
namespace {

constexpr int kEPT = 8;          // elements per thread
constexpr int kWarpTeamMaxC = 32 * kEPT;
constexpr int kMaxC = 1024 * kEPT;
constexpr int kWarpTeamBlock = 128;  // 4 warps, 4 rows at a time
constexpr int kMinRowsPerSlot = 16;  // keeps partial-sum traffic small next to the rows

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const void* base, int64_t offset, float (&out)[VEC]) {
  const Pack<T, VEC> pk =
      *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(base) + offset);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec_or(const void* base, int64_t offset, float absent,
                                            float (&out)[VEC]) {
  if (base != nullptr) {
    load_vec<T, VEC>(base, offset, out);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = absent;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(void* base, int64_t offset, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(base) + offset) = pk;
}

// Sums K values over the team, in an order fixed by the launch shape. The block
// variant needs every thread of the block; smem holds 32 * K floats.
template <bool kWarpTeam, int K>
__device__ __forceinline__ void team_sum(float (&v)[K], float* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
    }
  }
  if constexpr (!kWarpTeam) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float s = 0.f;
      for (int w = 0; w < nwarps; ++w) s += smem[w * K + k];
      v[k] = s;
    }
    __syncthreads();
  }
}

template <bool kWarpTeam>
struct Team {
  int size, lane, index, count;
  __device__ __forceinline__ Team() {
    if constexpr (kWarpTeam) {
      size = 32;
      lane = threadIdx.x & 31;
      index = threadIdx.x >> 5;
      count = blockDim.x >> 5;
    } else {
      size = blockDim.x;
      lane = threadIdx.x;
      index = 0;
      count = 1;
    }
  }
  // First column of this thread's i-th vector.
  __device__ __forceinline__ int col(int i, int vec) const { return (i * size + lane) * vec; }
};

// Mean and rstd of the team's row held in v (zeros outside the row).
template <bool kWarpTeam, int NV, int VEC>
__device__ __forceinline__ void row_stats(const float (&v)[NV][VEC], const Team<kWarpTeam>& team,
                                          int C, float eps, float* smem, float& mean,
                                          float& rstd) {
  float s[1] = {0.f};
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[0] += v[i][j];
  team_sum<kWarpTeam, 1>(s, smem);
  mean = s[0] / C;
  float q[1] = {0.f};
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    if (team.col(i, VEC) < C) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[i][j] - mean;
        q[0] += d * d;
      }
    }
  }
  team_sum<kWarpTeam, 1>(q, smem);
  if (q[0] == INFINITY) {  // a sum of squares: +Inf, never -Inf
    // Uniform over the team (q is the team's sum): see kStatsRescale in adaln.h.
    q[0] = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (team.col(i, VEC) < C) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = (v[i][j] - mean) * kStatsRescale;
          q[0] += d * d;
        }
      }
    }
    team_sum<kWarpTeam, 1>(q, smem);
    rstd = kStatsRescale * rsqrtf(q[0] / C);
    return;
  }
  rstd = rsqrtf(q[0] / C + eps);
}

template <typename T, int VEC, bool kWarpTeam>
__global__ void __launch_bounds__(1024) adaln_forward_kernel(const AdaLNParams p) {
  constexpr int NV = kEPT / VEC;
  __shared__ float smem[32];
  const Team<kWarpTeam> team;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * team.count + team.index;
  // Uniform per team: a warp team leaves as a whole, a block team always has a row.
  if (row >= p.B * p.N) return;
  const int C = static_cast<int>(p.C);
  const int64_t b = row / p.N;
  const int64_t base = row * C;

  float v[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = team.col(i, VEC);
    if (c < C) {
      load_vec<T, VEC>(p.x, base + c, v[i]);
      if (p.h != nullptr) {
        float h[VEC], g[VEC];
        load_vec<T, VEC>(p.h, base + c, h);
        load_vec_or<T, VEC>(p.gate, b * p.gate_stride + c, 1.f, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          // Round to T first: the backward pass sees the stored x_out.
          v[i][j] = static_cast<float>(static_cast<T>(v[i][j] + g[j] * h[j]));
        }
        store_vec<T, VEC>(p.x_out, base + c, v[i]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
    }
  }

  float mean, rstd;
  row_stats<kWarpTeam, NV, VEC>(v, team, C, static_cast<float>(p.eps), smem, mean, rstd);

#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = team.col(i, VEC);
    if (c < C) {
      float w[VEC], bi[VEC], sc[VEC], sh[VEC], y[VEC];
      load_vec_or<T, VEC>(p.weight, c, 1.f, w);
      load_vec_or<T, VEC>(p.bias, c, 0.f, bi);
      load_vec_or<T, VEC>(p.scale, b * p.scale_stride + c, 0.f, sc);
      load_vec_or<T, VEC>(p.shift, b * p.shift_stride + c, 0.f, sh);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float n = (v[i][j] - mean) * rstd * w[j] + bi[j];
        y[j] = n * (1.f + sc[j]) + sh[j];
      }
      if (p.y_q != nullptr) {
        // As quantize_per_sample(ln_modulate(x)): round to T, then x / s half-to-even.
        const float s = int8::row_scale(p.act_scales, p.num_scales, p.t, p.rows_per_sample, row);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float yv = static_cast<float>(static_cast<T>(y[j]));
          p.y_q[base + c + j] =
              static_cast<int8_t>(max(-127, min(127, __float2int_rn(__fdiv_rn(yv, s)))));
        }
      } else {
        store_vec<T, VEC>(p.y, base + c, y);
      }
    }
  }
}

// Which partial sums a backward launch accumulates, and where each lives in the
// team's slice of dynamic shared memory ([count][C] floats per team).
struct PartialLayout {
  int count = 0;
  int shift = -1, scale = -1, gate = -1, weight = -1, bias = -1;
  explicit PartialLayout(const AdaLNParams& p) {
    if (p.part_shift) shift = count++;
    if (p.part_scale) scale = count++;
    if (p.part_gate) gate = count++;
    if (p.part_weight) weight = count++;
    if (p.part_bias) bias = count++;
  }
};

enum { kShift, kScale, kGate, kWeight, kBias, kNumPartials };

__device__ __forceinline__ int partial_index(const PartialLayout& layout, int k) {
  switch (k) {
    case kShift: return layout.shift;
    case kScale: return layout.scale;
    case kGate: return layout.gate;
    case kWeight: return layout.weight;
    default: return layout.bias;
  }
}

__device__ __forceinline__ float* partial_buffer(const AdaLNParams& p, int k) {
  switch (k) {
    case kShift: return static_cast<float*>(p.part_shift);
    case kScale: return static_cast<float*>(p.part_scale);
    case kGate: return static_cast<float*>(p.part_gate);
    case kWeight: return static_cast<float*>(p.part_weight);
    default: return static_cast<float*>(p.part_bias);
  }
}

// kGlobalAcc: the partial sums accumulate in place in the team's own rows of the fp32
// [B, slots, C] buffers, for C too wide for the device's shared memory (C = 8192 on
// 99 KiB parts); a separate instantiation, so the shared-memory kernel stays as it is.
template <typename T, int VEC, bool kWarpTeam, bool kGlobalAcc>
__global__ void __launch_bounds__(1024)
    adaln_backward_kernel(const AdaLNParams p, const PartialLayout layout) {
  static_assert(!(kWarpTeam && kGlobalAcc), "a warp team's sums always fit in shared memory");
  constexpr int NV = kEPT / VEC;
  // Partial sums sit in shared memory rather than registers so that a 1024-thread
  // team fits the register file. Each thread only touches its own columns, so the
  // accumulators need no synchronisation.
  DK_DYNAMIC_SMEM(16, acc_smem_raw);
  float* const acc_smem = reinterpret_cast<float*>(acc_smem_raw);
  __shared__ float smem[64];
  const Team<kWarpTeam> team;
  const int C = static_cast<int>(p.C);
  const int64_t N = p.N;
  const int64_t b = blockIdx.y;
  const int64_t rows_per_block = (N + gridDim.x - 1) / gridDim.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t n1 = min(N, n0 + rows_per_block);
  float* acc = acc_smem + static_cast<int64_t>(team.index) * layout.count * C;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * team.count + team.index;
  // Partial k's row for this team (k is a constant at every use once unrolled).
  auto acc_row = [&](int k) -> float* {
    if constexpr (kGlobalAcc) {
      return partial_buffer(p, k) + (b * p.slots + slot) * C;
    } else {
      return acc + partial_index(layout, k) * C;
    }
  };
  auto acc_add = [&](int k, int c, float value) {
    if (partial_index(layout, k) >= 0) acc_row(k)[c] += value;
  };

#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int c = team.col(i, VEC);
    if (c < C) {
#pragma unroll
      for (int k = 0; k < kNumPartials; ++k) {
        if (partial_index(layout, k) < 0) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc_row(k)[c + j] = 0.f;
      }
    }
  }

  for (int64_t n = n0 + team.index; n < n1; n += team.count) {
    const int64_t base = (b * N + n) * C;
    float xh[NV][VEC], dxh[NV][VEC];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = team.col(i, VEC);
      if (c < C) {
        load_vec<T, VEC>(p.x, base + c, xh[i]);
        load_vec<T, VEC>(p.grad_y, base + c, dxh[i]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xh[i][j] = dxh[i][j] = 0.f;
      }
    }
    float mean, rstd;
    row_stats<kWarpTeam, NV, VEC>(xh, team, C, static_cast<float>(p.eps), smem, mean, rstd);

    // Per-column values are re-read every row: they stay in L1 and cost no registers.
    float s[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = team.col(i, VEC);
      if (c < C) {
        float w[VEC], bi[VEC], sc[VEC];
        load_vec_or<T, VEC>(p.weight, c, 1.f, w);
        load_vec_or<T, VEC>(p.bias, c, 0.f, bi);
        load_vec_or<T, VEC>(p.scale, b * p.scale_stride + c, 0.f, sc);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float x_hat = (xh[i][j] - mean) * rstd;
          const float dy = dxh[i][j];
          const float dn = dy * (1.f + sc[j]);
          acc_add(kShift, c + j, dy);
          acc_add(kScale, c + j, dy * (x_hat * w[j] + bi[j]));
          acc_add(kWeight, c + j, dn * x_hat);
          acc_add(kBias, c + j, dn);
          const float d = dn * w[j];
          s[0] += d;
          s[1] += d * x_hat;
          xh[i][j] = x_hat;
          dxh[i][j] = d;
        }
      }
    }
    team_sum<kWarpTeam, 2>(s, smem);
    const float m1 = s[0] / C, m2 = s[1] / C;

#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = team.col(i, VEC);
      if (c < C) {
        float dx[VEC], gxo[VEC];
        load_vec_or<T, VEC>(p.grad_x_out, base + c, 0.f, gxo);
#pragma unroll
        for (int j = 0; j < VEC; ++j) dx[j] = rstd * (dxh[i][j] - m1 - xh[i][j] * m2) + gxo[j];
        store_vec<T, VEC>(p.grad_x, base + c, dx);
        if (p.h != nullptr) {
          float h[VEC], g[VEC], dh[VEC];
          load_vec<T, VEC>(p.h, base + c, h);
          load_vec_or<T, VEC>(p.gate, b * p.gate_stride + c, 1.f, g);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            dh[j] = g[j] * dx[j];
            acc_add(kGate, c + j, dx[j] * h[j]);
          }
          store_vec<T, VEC>(p.grad_h, base + c, dh);
        }
      }
    }
  }

  if constexpr (kGlobalAcc) return;  // the sums are already in their output rows
  const int64_t out = (b * p.slots + slot) * C;
  for (int k = 0; k < kNumPartials; ++k) {
    if (partial_index(layout, k) < 0) continue;
    float* const part = partial_buffer(p, k) + out;
    const float* const sums = acc_row(k);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c = team.col(i, VEC);
      if (c < C) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) part[c + j] = sums[c + j];
      }
    }
  }
}

// 16-byte vectors need every row and every base pointer on a 16-byte boundary.
template <typename T>
bool can_vectorize(const AdaLNParams& p) {
  constexpr int vec = 16 / sizeof(T);
  if (p.C % vec != 0) return false;
  for (int64_t s : {p.gate_stride, p.shift_stride, p.scale_stride}) {
    if (s % vec != 0) return false;
  }
  for (const void* ptr : std::initializer_list<const void*>{p.x, p.h, p.gate, p.shift, p.scale, p.weight, p.bias, p.x_out, p.y,
                          p.grad_y, p.grad_x_out, p.grad_x, p.grad_h}) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  }
  return true;
}

int block_team_threads(int64_t C) {
  const int64_t threads = (C + kEPT - 1) / kEPT;
  return static_cast<int>((threads + 31) / 32 * 32);
}

void check_c(const AdaLNParams& p) {
  TORCH_CHECK(p.C <= kMaxC, "the CUDA adaLN kernels support C <= ", kMaxC, ", got C = ", p.C);
}

template <typename T, int VEC, bool kWarpTeam>
void launch_forward(const AdaLNParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.N;
  const int threads = kWarpTeam ? kWarpTeamBlock : block_team_threads(p.C);
  const int64_t rows_per_block = kWarpTeam ? kWarpTeamBlock / 32 : 1;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "ln_modulate: too many rows (", rows, ")");
  auto kernel = adaln_forward_kernel<T, VEC, kWarpTeam>;
  DK_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, 0, stream)(p);
}

// Tokens of one sample are split into slots of at least kMinRowsPerSlot rows per
// team; enough slots to fill the device twice over when the batch is small.
template <bool kWarpTeam>
int64_t backward_blocks_per_sample(const AdaLNParams& p) {
  const int threads = kWarpTeam ? kWarpTeamBlock : block_team_threads(p.C);
  const int teams = kWarpTeam ? kWarpTeamBlock / 32 : 1;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = static_cast<int64_t>(sms) * std::max(1, 2048 / threads);
  const int64_t wanted = (2 * resident + p.B - 1) / p.B;
  const int64_t most = std::max<int64_t>(1, p.N / (static_cast<int64_t>(kMinRowsPerSlot) * teams));
  return std::max<int64_t>(1, std::min(wanted, most));
}

template <typename T, int VEC, bool kWarpTeam>
void launch_backward(const AdaLNParams& p, cudaStream_t stream) {
  const int threads = kWarpTeam ? kWarpTeamBlock : block_team_threads(p.C);
  const int teams = kWarpTeam ? kWarpTeamBlock / 32 : 1;
  const int64_t blocks_per_sample = p.slots / teams;
  TORCH_CHECK(p.B <= 65535, "ln_modulate backward: batch size ", p.B,
              " exceeds the CUDA grid limit of 65535");
  const dim3 grid(static_cast<unsigned>(blocks_per_sample), static_cast<unsigned>(p.B));
  const PartialLayout layout(p);
  const size_t smem_bytes = sizeof(float) * static_cast<size_t>(teams) * layout.count * p.C;
  // A warp team's sums (C <= kWarpTeamMaxC) fit the 48 KiB every device gives a block,
  // so only block teams have the global-memory variant (the other would be dead code).
  static_assert(sizeof(float) * (kWarpTeamBlock / 32) * kNumPartials * kWarpTeamMaxC +
                        64 * sizeof(float) <= 48 * 1024,
                "warp-team partial sums must fit in 48 KiB of shared memory");
  if constexpr (!kWarpTeam) {
    const size_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    if (smem_bytes + 64 * sizeof(float) > smem_limit) {
      auto global_kernel = adaln_backward_kernel<T, VEC, kWarpTeam, true>;
      DK_LAUNCH(global_kernel, grid, threads, 0, stream)(p, layout);
      return;
    }
  }
  auto kernel = adaln_backward_kernel<T, VEC, kWarpTeam, false>;
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  DK_LAUNCH(kernel, grid, threads, smem_bytes, stream)(p, layout);
}

template <typename T, template <typename, int, bool> class Launch>
void dispatch_variant(const AdaLNParams& p, cudaStream_t stream) {
  const bool vectorize = can_vectorize<T>(p);
  const bool warp_team = p.C <= kWarpTeamMaxC;
  DK_BOOL_SWITCH(vectorize, kVectorize, [&] {
    constexpr int VEC = kVectorize ? 16 / static_cast<int>(sizeof(T)) : 1;
    DK_BOOL_SWITCH(warp_team, kWarpTeam, [&] { Launch<T, VEC, kWarpTeam>::run(p, stream); });
  });
}

template <typename T, int VEC, bool kWarpTeam>
struct ForwardLauncher {
  static void run(const AdaLNParams& p, cudaStream_t s) { launch_forward<T, VEC, kWarpTeam>(p, s); }
};

template <typename T, int VEC, bool kWarpTeam>
struct BackwardLauncher {
  static void run(const AdaLNParams& p, cudaStream_t s) { launch_backward<T, VEC, kWarpTeam>(p, s); }
};

void cuda_forward(const AdaLNParams& p, at::ScalarType dtype) {
  check_c(p);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DK_DISPATCH_CUDA_FLOATS(dtype, "ln_modulate",
                          [&] { dispatch_variant<scalar_t, ForwardLauncher>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_backward(AdaLNParams& p, at::ScalarType dtype) {
  check_c(p);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DK_DISPATCH_CUDA_FLOATS(dtype, "ln_modulate_backward",
                          [&] { dispatch_variant<scalar_t, BackwardLauncher>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t cuda_num_slots(const AdaLNParams& p, at::ScalarType) {
  check_c(p);
  const bool warp_team = p.C <= kWarpTeamMaxC;
  const int teams = warp_team ? kWarpTeamBlock / 32 : 1;
  const int64_t blocks = warp_team ? backward_blocks_per_sample<true>(p)
                                   : backward_blocks_per_sample<false>(p);
  return blocks * teams;
}

}  // namespace

const AdaLNBackend kCudaAdaLN{kCuda, cuda_forward, cuda_backward, cuda_num_slots};

}  // namespace ditkernels

DK_TORCH_LIBRARY_IMPL_CUDA(m) {
  using Ops = ditkernels::AdaLNOps<ditkernels::kCudaAdaLN>;
  m.impl("ln_modulate", &Ops::ln_modulate);
  m.impl("gated_residual_ln_modulate", &Ops::gated_residual_ln_modulate);
  m.impl("ln_modulate_backward", &Ops::ln_modulate_backward);
  m.impl("gated_residual_ln_modulate_backward", &Ops::gated_residual_ln_modulate_backward);
}
