// CUDA timestep-calibrated int8 GEMM (int8 tensor cores, mma.sync m16n8k32).
//
// y = (float(q(x) w_q^T) * s_row) * w_scale + bias, with s_row = act_scales[t[sample]].
// A 128x128x64 tile, 8 warps of 64x32, double-buffered shared memory. In
// int8_linear the quantization is fused into the A load: each thread reads its
// float chunks of the next k-tile into registers before the current tile's mma
// loop, and quantizes and stores them after it, so the loads overlap the math.
// int8_gemm_dequant reads int8 A with cp.async like the weights. The dequantize
// epilogue uses round-to-nearest fp32 ops in the CPU kernel's order (no FMA
// contraction), so CUDA and CPU results agree bit for bit.
// The fused int8 ln_modulate output lives with the adaLN kernels (csrc/cuda/adaln.cu).

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "ditkernels/adaln.h"
#include "ditkernels/cuda_runtime.cuh"
#include "ditkernels/cuda_mma.cuh"
#include "ditkernels/cuda_tma.cuh"
#include "ditkernels/cuda_wgmma.cuh"
#include "ditkernels/wgmma_ws.cuh"
#include "ditkernels/dispatch.h"
#include "ditkernels/library.h"
#include "ditkernels/int8.h"
#include "ditkernels/int8_scales.cuh"

namespace ditkernels {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 64, kThreads = 256;
constexpr int kTileBytes = kBM * kBK;  // == kBN * kBK
constexpr int kSmemBytes = 2 * 2 * kTileBytes;

struct Int8GemmParams {
  const void* a;           // x (float T) or x_q (int8), [M, K] with row stride lda
  const int8_t* w;         // [N, K] contiguous
  const float* w_scale;    // [N]
  int8::RowScales scales;  // act_scales[t[sample]], checked as read
  const void* bias;        // [N] in the output dtype, or null
  void* y;                 // [M, N]
  int64_t lda;
  int M, N, K;
};

__device__ __forceinline__ int8_t quantize_value(float v, float s) {
  const int q = __float2int_rn(__fdiv_rn(v, s));  // round half to even, like the CPU
  return static_cast<int8_t>(max(-127, min(127, q)));
}

// The dequantize epilogue, in the CPU kernel's order of round-to-nearest fp32 ops (no
// FMA contraction), so that both GEMMs match it bit for bit.
template <typename OutT>
__device__ __forceinline__ OutT dequantize(int acc, float s_row, float w_scale, const OutT* bias,
                                           int col) {
  float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), s_row), w_scale);
  if (bias != nullptr) v = __fadd_rn(v, static_cast<float>(bias[col]));
  return static_cast<OutT>(v);
}

template <typename T>
struct AChunks {
  // Eight consecutive k of a row per chunk; four chunks per thread per tile.
  float v[4][8];
};

template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&out)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(src)[0];
    const float4 b = reinterpret_cast<const float4*>(src)[1];
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  } else {
    struct alignas(16) Pack { T v[8]; };
    const Pack pk = *reinterpret_cast<const Pack*>(src);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = static_cast<float>(pk.v[j]);
  }
}

// Thread `tid` owns chunks idx = tid + c * kThreads (c = 0..3): row idx / 8, k-chunk idx % 8.
template <typename T>
__device__ __forceinline__ void load_a_float(const Int8GemmParams& p, AChunks<T>& regs, int m0,
                                             int k0, int tid) {
  const T* a = static_cast<const T*>(p.a);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int idx = tid + c * kThreads, row = idx >> 3, kc = k0 + (idx & 7) * 8;
    const int gm = m0 + row;
    if (gm < p.M && kc < p.K) {
      load8<T>(a + gm * p.lda + kc, regs.v[c]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) regs.v[c][j] = 0.f;
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_a_quantized(const AChunks<T>& regs, const float (&s)[4],
                                                  int8_t* sa, int tid) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int idx = tid + c * kThreads, row = idx >> 3, half = idx & 1, chunk = (idx & 7) >> 1;
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t q = static_cast<uint8_t>(quantize_value(regs.v[c][j], s[c]));
      packed[j >> 2] |= q << (8 * (j & 3));
    }
    *reinterpret_cast<uint2*>(sa + mma::swizzle64(row, chunk) + half * 8) = make_uint2(packed[0], packed[1]);
  }
}

__device__ __forceinline__ void load_int8_tile(const int8_t* src, int64_t ld, int rows_total,
                                               int K, int r0, int k0, int8_t* dst, int tid) {
#pragma unroll
  for (int c = 0; c < (kBM * kBK / 16) / kThreads; ++c) {
    const int idx = tid + c * kThreads, row = idx >> 2, chunk = idx & 3;
    const int gr = r0 + row, kc = k0 + chunk * 16;
    const bool valid = gr < rows_total && kc < K;
    mma::cp_async_16(dst + mma::swizzle64(row, chunk), valid ? src + gr * ld + kc : src, valid ? 16 : 0);
  }
}

template <typename T, typename OutT, bool kQuantizeA>
__global__ void __launch_bounds__(kThreads) int8_gemm_kernel(const Int8GemmParams p) {
  DK_DYNAMIC_SMEM(128, smem_raw);
  int8_t* smem = reinterpret_cast<int8_t*>(smem_raw);
  auto sa = [&](int st) { return smem + st * 2 * kTileBytes; };
  auto sb = [&](int st) { return smem + st * 2 * kTileBytes + kTileBytes; };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM;
  const int k_tiles = (p.K + kBK - 1) / kBK;

  // Scales of the rows whose A chunks this thread quantizes (read only then: each read
  // is also a device-side check, which the compiler cannot drop).
  float s_load[4] = {};
  if constexpr (kQuantizeA) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int gm = min(m0 + ((tid + c * kThreads) >> 3), p.M - 1);
      s_load[c] = p.scales(gm);
    }
  }

  AChunks<T> regs;
  if constexpr (kQuantizeA) {
    load_a_float<T>(p, regs, m0, 0, tid);
    store_a_quantized<T>(regs, s_load, sa(0), tid);
  } else {
    load_int8_tile(static_cast<const int8_t*>(p.a), p.lda, p.M, p.K, m0, 0, sa(0), tid);
  }
  load_int8_tile(p.w, p.K, p.N, p.K, n0, 0, sb(0), tid);
  mma::cp_async_commit();
  mma::cp_async_wait<0>();
  __syncthreads();

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  for (int kt = 0; kt < k_tiles; ++kt) {
    const int st = kt & 1;
    const bool next = kt + 1 < k_tiles;
    if (next) {
      if constexpr (kQuantizeA) {
        load_a_float<T>(p, regs, m0, (kt + 1) * kBK, tid);
      } else {
        load_int8_tile(static_cast<const int8_t*>(p.a), p.lda, p.M, p.K, m0, (kt + 1) * kBK,
                       sa(st ^ 1), tid);
      }
      load_int8_tile(p.w, p.K, p.N, p.K, n0, (kt + 1) * kBK, sb(st ^ 1), tid);
    }
    mma::cp_async_commit();

    mma::warp_tile_64x32(acc, reinterpret_cast<const unsigned char*>(sa(st)),
                         reinterpret_cast<const unsigned char*>(sb(st)), lane, warp_m, warp_n,
                         [](int (&d)[4], const uint32_t (&af)[4], const uint32_t (&bf)[2]) {
                           mma::mma_16832_s8(d, af, bf);
                         });
    if constexpr (kQuantizeA) {
      if (next) store_a_quantized<T>(regs, s_load, sa(st ^ 1), tid);
    }
    mma::cp_async_wait<0>();
    __syncthreads();
  }

  OutT* y = static_cast<OutT*>(p.y);
  const OutT* bias = static_cast<const OutT*>(p.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m * 64 + i * 16 + (lane >> 2) + half * 8;
      if (row >= p.M) continue;
      const float s = p.scales(row);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + warp_n * 32 + j * 8 + (lane & 3) * 2 + e;
          if (col >= p.N) continue;
          y[static_cast<int64_t>(row) * p.N + col] =
              dequantize<OutT>(acc[i][j][half * 2 + e], s, p.w_scale[col], bias, col);
        }
      }
    }
  }
}

// ---- Hopper path (sm_90a): wgmma ----
// A 128 x BN x 128 tile (BN = 128, 192 or 256, wgmma::pick_tile_n): two warpgroups,
// each a 64 x BN slab of m64nBNk32 s8 wgmma from shared memory; int8 tiles of
// 128-byte rows with the 128-byte swizzle, loaded with cp.async by all 256 threads;
// wgmma::pipelined_mainloop (four stages, loads two tiles ahead, one wgmma group in
// flight). A is int8 here: on this path int8_linear quantizes x first (quantize_rows
// below), since quantizing inside the A load would redo every division N / BN times,
// and that, not the tensor cores, would bound the kernel. The epilogue is the
// mma.sync kernel's, written through shared memory in 16-byte rows.
namespace sm90 {
constexpr int kBM = 128, kBK = 128, kStages = 4, kAhead = 2, kThreads = 256;
constexpr int kATileBytes = kBM * wgmma::kRowBytes;

template <int BN>
struct Tile {
  static constexpr int kStageBytes = kATileBytes + BN * wgmma::kRowBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes + wgmma::kAtomBytes;  // + alignment
};

template <typename OutT, int BN>
__global__ void __launch_bounds__(kThreads, 1) int8_gemm_wgmma_kernel(const Int8GemmParams p) {
  constexpr int kOutPitch = BN + 16 / static_cast<int>(sizeof(OutT));
  static_assert(kBM * kOutPitch * sizeof(OutT) <= kStages * Tile<BN>::kStageBytes);
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* smem = wgmma::align_to_atom(smem_raw);
  const int tid = threadIdx.x, wg = tid / 128;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * kBM;
  const int k_tiles = (p.K + kBK - 1) / kBK;
  const auto* a_q = static_cast<const int8_t*>(p.a);

  int acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0;

  // Rows of A and B: 16-byte chunks of 16 k, zero past M, N and K (K % 16 == 0).
  auto load = [&](unsigned char* stage, int kt) {
    const int k0 = kt * kBK;
    wgmma::load_tile<kBM, kThreads>(stage, tid, a_q, [&](int row, int chunk) -> const void* {
      const int gm = m0 + row, kc = k0 + chunk * 16;
      return gm < p.M && kc < p.K ? a_q + gm * p.lda + kc : nullptr;
    });
    auto b_src = [&](int row, int chunk) -> const void* {
      const int gn = n0 + row, kc = k0 + chunk * 16;
      return gn < p.N && kc < p.K ? p.w + static_cast<int64_t>(gn) * p.K + kc : nullptr;
    };
    wgmma::load_tile<BN, kThreads>(stage + kATileBytes, tid, p.w, b_src);
  };
  auto mma = [&](const unsigned char* stage) {
    wgmma::mma_k_tile<int8_t, BN>(acc, stage + wg * 64 * wgmma::kRowBytes, stage + kATileBytes);
  };
  wgmma::pipelined_mainloop<kStages, kAhead>(smem, Tile<BN>::kStageBytes, k_tiles, load, mma);
  wgmma::fence_operand(acc);  // the epilogue reads them after the last wait
  __syncthreads();

  OutT* out = reinterpret_cast<OutT*>(smem);
  const OutT* bias = static_cast<const OutT*>(p.bias);
  const int lane = tid & 31, row0 = wg * 64 + (tid / 32 % 4) * 16 + lane / 4;
  float s_row[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int gm = min(m0 + row0 + half * 8, p.M - 1);
    s_row[half] = p.scales(gm);
  }
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const int half = (i % 4) >= 2;
    const int row = row0 + half * 8;
    const int col = 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
    const int gn = min(n0 + col, p.N - 1);
    out[row * kOutPitch + col] = dequantize<OutT>(acc[i], s_row[half], p.w_scale[gn], bias, gn);
  }
  __syncthreads();

  constexpr int kChunk = 16 / sizeof(OutT);  // N % 16 == 0: chunks never straddle N
  OutT* y = static_cast<OutT*>(p.y);
#pragma unroll
  for (int it = 0; it < kBM * (BN / kChunk) / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    const int row = idx / (BN / kChunk), chunk = idx % (BN / kChunk);
    const int gm = m0 + row, gn = n0 + chunk * kChunk;
    if (gm < p.M && gn < p.N) {
      *reinterpret_cast<float4*>(y + static_cast<int64_t>(gm) * p.N + gn) =
          *reinterpret_cast<const float4*>(out + row * kOutPitch + chunk * kChunk);
    }
  }
}

// The warp-specialized persistent kernel (ws::run, wgmma_ws.cuh), the default on
// Hopper; DITKERNELS_DISABLE_TMA=1 selects the one above. A (128 x 128 bytes) and B
// (BN x 128 bytes) of a k-tile come by TMA; the dequantize epilogue goes from the
// accumulators straight to global memory, one 4- or 8-byte store per column pair.
template <typename OutT>
struct Int8TmaProblem {
  CUtensorMap a, b;  // A [M, K] int8, W [N, K]
  Int8GemmParams p;
  int m, n, k_tiles;
  ws::SplitK<int> split;

  __device__ __forceinline__ void load(int kt, int m0, int n0, unsigned char* sa,
                                       unsigned char* sb, uint64_t* full) const {
    tma::load_2d(sa, &a, full, kt * kBK, m0);
    tma::load_2d(sb, &b, full, kt * kBK, n0);
  }

  // Row `row` (activation scale s), columns col and col + 1, dequantized into y (p.y;
  // y and bias passed in, as the epilogue's loops hold them).
  __device__ __forceinline__ void store_dequantized(OutT* y, const OutT* bias, int row, float s,
                                                    int col, int v0, int v1) const {
    ws::store_pair<OutT>(y + static_cast<int64_t>(row) * p.N + col,
                         dequantize<OutT>(v0, s, p.w_scale[col], bias, col),
                         dequantize<OutT>(v1, s, p.w_scale[col + 1], bias, col + 1));
  }

  // kAcc = BN / 2 accumulators; N % 16 == 0: a column pair is in bounds whole or not
  // at all.
  template <int kAcc>
  __device__ __forceinline__ void epilogue(const int (&acc)[kAcc], int row0, int n0,
                                           int t) const {
    OutT* y = static_cast<OutT*>(p.y);
    const OutT* bias = static_cast<const OutT*>(p.bias);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = ws::acc_row(row0, t, half);
      if (row >= p.M) continue;
      const float s = p.scales(row);
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j) {
        const int col = ws::acc_col(n0, t, j);
        if (col >= p.N) continue;
        store_dequantized(y, bias, row, s, col, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
      }
    }
  }

  // The split-K epilogue: the int32 sums of all ranges, so the same bits as above.
  __device__ __forceinline__ void finish_pair(int row, int col, int v0, int v1) const {
    store_dequantized(static_cast<OutT*>(p.y), static_cast<const OutT*>(p.bias), row,
                      p.scales(row), col, v0, v1);
  }
};

template <typename OutT, int BN>
__global__ void __launch_bounds__(ws::kThreads, 1)
    int8_gemm_tma_kernel(const __grid_constant__ Int8TmaProblem<OutT> pr) {
  ws::run<int8_t, BN>(pr);
}

template <typename OutT>
__global__ void __launch_bounds__(ws::kReduceThreads)
    int8_split_reduce_kernel(const __grid_constant__ Int8TmaProblem<OutT> pr) {
  ws::reduce_splits<int>(pr);
}
}  // namespace sm90

// quantize_per_sample for K % 8 == 0 (and the quantize pass of int8_linear on the
// wgmma path): eight elements per thread, one 16- or 32-byte load and one 8-byte
// store, one division of the index per eight elements.
template <typename T>
__global__ void quantize_rows_kernel(const T* x, int8_t* q, const int8::RowScales scales,
                                     int64_t K, int64_t chunks) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = scales(c * 8 / K);
    float v[8];
    load8<T>(x + c * 8, v);
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      packed[j >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(quantize_value(v[j], s)))
                        << (8 * (j & 3));
    }
    *reinterpret_cast<uint2*>(q + c * 8) = make_uint2(packed[0], packed[1]);
  }
}

void check_cuda_shapes(const char* op, const int8::Rows& r, const at::Tensor& w_q) {
  TORCH_CHECK(r.K % 16 == 0 && w_q.size(0) % 16 == 0, op,
              ": the CUDA int8 kernel needs K and N to be multiples of 16, got K = ", r.K,
              " and N = ", w_q.size(0), " (w_q of shape ", shape_str(w_q), ")");
  TORCH_CHECK((r.M + kBM - 1) / kBM <= 65535 && r.M < (int64_t{1} << 31), op, ": M = ", r.M,
              " rows exceed the CUDA grid limit");
}

template <typename OutT, int BN>
void launch_wgmma(const Int8GemmParams& p, cudaStream_t stream) {
  auto kernel = sm90::int8_gemm_wgmma_kernel<OutT, BN>;
  constexpr int smem = sm90::Tile<BN>::kSmemBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.N + BN - 1) / BN, (p.M + sm90::kBM - 1) / sm90::kBM);
  DK_LAUNCH(kernel, grid, sm90::kThreads, smem, stream)(p);
}

// The warp-specialized TMA kernel: A [M, K] int8 with row stride p.lda, W [N, K];
// at most one CTA per SM, each walking its share of the work units (ws::plan: the
// tile width, and a K split with its reduce kernel where the tiles would leave SMs
// idle).
template <typename OutT, int BN>
void launch_tma(const Int8GemmParams& p, const ws::Plan& plan, const at::Tensor& like,
                cudaStream_t stream) {
  sm90::Int8TmaProblem<OutT> pr;
  const auto u8 = CU_TENSOR_MAP_DATA_TYPE_UINT8;
  pr.a = tma::make_tensor_map_2d(p.a, u8, 1, p.M, p.K, p.lda, ws::kBM, sm90::kBK);
  pr.b = tma::make_tensor_map_2d(p.w, u8, 1, p.N, p.K, p.K, BN, sm90::kBK);
  pr.p = p;
  pr.m = p.M;
  pr.n = p.N;
  pr.k_tiles = (p.K + sm90::kBK - 1) / sm90::kBK;
  ws::launch<int, BN>(sm90::int8_gemm_tma_kernel<OutT, BN>, sm90::int8_split_reduce_kernel<OutT>,
                      pr, plan, like, stream);
}

template <typename OutT>
void launch_wgmma(const Int8GemmParams& p, const at::Tensor& like, cudaStream_t stream) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (tma::use_tma_gemm()) {
    const ws::Plan plan = ws::plan(p.M, p.N, (p.K + sm90::kBK - 1) / sm90::kBK, sms);
    switch (plan.bn) {
      case 256: launch_tma<OutT, 256>(p, plan, like, stream); break;
      case 192: launch_tma<OutT, 192>(p, plan, like, stream); break;
      default: launch_tma<OutT, 128>(p, plan, like, stream); break;
    }
    return;
  }
  switch (wgmma::pick_tile_n(p.M, p.N, sm90::kBM, sms)) {
    case 256: launch_wgmma<OutT, 256>(p, stream); break;
    case 192: launch_wgmma<OutT, 192>(p, stream); break;
    default: launch_wgmma<OutT, 128>(p, stream); break;
  }
}

// x [M, K] (K % 8 == 0, rows contiguous) quantized with the per-sample scales.
at::Tensor quantize_rows(const at::Tensor& x2d, const int8::RowScales& scales,
                         cudaStream_t stream) {
  at::Tensor xc = aligned_rows(x2d.contiguous());
  at::Tensor q = at::empty({x2d.size(0), x2d.size(1)}, x2d.options().dtype(at::kChar));
  const int64_t chunks = x2d.numel() / 8;
  if (chunks == 0) return q;
  const int blocks = static_cast<int>(std::min<int64_t>((chunks + 255) / 256, 65535));
  DK_DISPATCH_CUDA_FLOATS(x2d.scalar_type(), "int8_linear", [&] {
    auto kernel = quantize_rows_kernel<scalar_t>;
    DK_LAUNCH(kernel, blocks, 256, 0, stream)(xc.data_ptr<scalar_t>(), q.data_ptr<int8_t>(),
                                              scales, x2d.size(1), chunks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

template <typename T, typename OutT, bool kQuantizeA>
void launch(const Int8GemmParams& p, cudaStream_t stream) {
  auto kernel = int8_gemm_kernel<T, OutT, kQuantizeA>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      kSmemBytes));
  const dim3 grid((p.N + kBN - 1) / kBN, (p.M + kBM - 1) / kBM);
  DK_LAUNCH(kernel, grid, kThreads, kSmemBytes, stream)(p);
}

at::Tensor run_gemm(const char* op, const at::Tensor& a_in, const int8::Rows& r,
                    const at::Tensor& w_q, const at::Tensor& w_scale,
                    const std::optional<at::Tensor>& bias,
                    at::ScalarType out_dtype, bool quantize_a) {
  check_cuda_shapes(op, r, w_q);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const int64_t N = w_q.size(0);
  at::Tensor y = at::empty({r.M, N}, a_in.options().dtype(out_dtype));
  if (r.M == 0) return y;
  // K = 0 (a legal nn.Linear(0, N)): every product is 0, so y is the bias; the
  // kernels' pipelines assume at least one K tile.
  if (r.K == 0) return bias ? y.copy_(bias->expand({r.M, N})) : y.zero_();
  at::Tensor a = aligned_rows(r.x2d);
  at::Tensor w = aligned_rows(w_q.contiguous());
  at::Tensor ws = w_scale.contiguous();
  at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  Int8GemmParams p;
  p.a = a.data_ptr();
  p.w = w.data_ptr<int8_t>();
  p.w_scale = ws.data_ptr<float>();
  p.scales = int8::row_scales(r);
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.lda = a.stride(0);
  p.M = static_cast<int>(r.M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(r.K);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (wgmma::use_wgmma()) {
    at::Tensor a_q;
    if (quantize_a) {
      a_q = quantize_rows(r.x2d, p.scales, stream);
      p.a = a_q.data_ptr();
      p.lda = a_q.stride(0);
    }
    DK_DISPATCH_CUDA_FLOATS(out_dtype, op, [&] { launch_wgmma<scalar_t>(p, y, stream); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }
  DK_DISPATCH_CUDA_FLOATS(out_dtype, op, [&] {
    using OutT = scalar_t;
    if (!quantize_a) {
      launch<int8_t, OutT, false>(p, stream);
    } else {
      DK_DISPATCH_CUDA_FLOATS(a.scalar_type(), op, [&] { launch<scalar_t, OutT, true>(p, stream); });
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

void check_float(const char* op, const at::Tensor& x) { check_backend_dtype(kCuda, op, x, "x"); }

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                            const at::Tensor& act_scales, const at::Tensor& t,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "int8_linear";
  check_float(op, x);
  auto r = int8::check_gemm(op, x, "x", w_q, w_scale, act_scales, t, bias, x.scalar_type(),
                            int8::cuda_value_checks());
  return run_gemm(op, x, r, w_q, w_scale, bias, x.scalar_type(), true)
      .view(int8::out_shape(r, w_q.size(0)));
}

at::Tensor int8_gemm_dequant_cuda(const at::Tensor& x_q, const at::Tensor& w_q,
                                  const at::Tensor& w_scale, const at::Tensor& act_scales,
                                  const at::Tensor& t, const std::optional<at::Tensor>& bias,
                                  at::ScalarType out_dtype) {
  const char* op = "int8_gemm_dequant";
  int8::check_int8_input(op, x_q);
  auto r = int8::check_gemm(op, x_q, "x_q", w_q, w_scale, act_scales, t, bias, out_dtype,
                            int8::cuda_value_checks());
  return run_gemm(op, x_q, r, w_q, w_scale, bias, out_dtype, false)
      .view(int8::out_shape(r, w_q.size(0)));
}

template <typename T>
__global__ void quantize_kernel(const T* x, int8_t* q, const int8::RowScales scales, int64_t K,
                                int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    q[i] = quantize_value(static_cast<float>(x[i]), scales(i / K));
  }
}

at::Tensor quantize_per_sample_cuda(const at::Tensor& x, const at::Tensor& act_scales,
                                    const at::Tensor& t) {
  const char* op = "quantize_per_sample";
  check_float(op, x);
  auto r = int8::check_rows(op, x, "x", act_scales, t, int8::cuda_value_checks());
  const c10::cuda::CUDAGuard guard(x.device());
  const int8::RowScales scales = int8::row_scales(r);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (r.K % 8 == 0) {
    return quantize_rows(r.x2d, scales, stream).view(x.sizes());
  }
  at::Tensor xc = r.x2d.contiguous();
  at::Tensor q = at::empty({r.M, r.K}, x.options().dtype(at::kChar));
  const int64_t total = r.M * r.K;
  if (total == 0) return q.view(x.sizes());
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65535));
  DK_DISPATCH_CUDA_FLOATS(x.scalar_type(), op, [&] {
    auto kernel = quantize_kernel<scalar_t>;
    DK_LAUNCH(kernel, blocks, 256, 0, stream)(
        xc.data_ptr<scalar_t>(), q.data_ptr<int8_t>(), scales, r.K, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q.view(x.sizes());
}

// The adaLN forward kernel (csrc/cuda/adaln.cu) with its store replaced by per-sample
// quantization.
at::Tensor ln_modulate_int8_cuda(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                 const std::optional<at::Tensor>& scale, double eps,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& act_scales, const at::Tensor& t) {
  const char* op = "ln_modulate_int8";
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape [B, N, C], got ", shape_str(x));
  const int8::Rows r = int8::check_rows(op, x, "x", act_scales, t, int8::cuda_value_checks());
  return adaln_forward_int8(kCudaAdaLN, op, x, shift, scale, weight, bias, eps, r.act_scales,
                            r.t, r.rows_per_sample);
}

}  // namespace
}  // namespace ditkernels

DK_TORCH_LIBRARY_IMPL_CUDA(m) {
  m.impl("int8_linear", &ditkernels::int8_linear_cuda);
  m.impl("int8_gemm_dequant", &ditkernels::int8_gemm_dequant_cuda);
  m.impl("quantize_per_sample", &ditkernels::quantize_per_sample_cuda);
  m.impl("ln_modulate_int8", &ditkernels::ln_modulate_int8_cuda);
}
