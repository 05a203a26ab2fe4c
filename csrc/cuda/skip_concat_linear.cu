// CUDA skip_concat_linear: y = cat([x, skip], -1) @ W^T + b as one GEMM whose A
// operand is read from x for k < D and from skip for k >= D, in place.
//
// fp16/bf16: a 128x128x32 tensor-core tile (8 warps, 64x32 per warp,
// mma.sync m16n8k16 with fp32 accumulation), a 4-stage cp.async pipeline and
// XOR-swizzled shared memory read with ldmatrix. The x/skip choice is made per
// 16-byte chunk, so D only has to be a multiple of 8 and a k-tile may straddle the
// boundary. Rows past M, columns past Dout and k past 2D are zero-filled by
// cp.async, so every M, Dout is handled. fp32: a 64x64 SIMT tile with the same
// operand switch. The backward pass is four cuBLAS GEMMs on in-place operands
// (csrc/include/ditkernels/skip_concat_linear.h).

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "ditkernels/cuda_runtime.cuh"
#include "ditkernels/cuda_mma.cuh"
#include "ditkernels/cuda_tma.cuh"
#include "ditkernels/cuda_wgmma.cuh"
#include "ditkernels/wgmma_ws.cuh"
#include "ditkernels/dispatch.h"
#include "ditkernels/library.h"
#include "ditkernels/skip_concat_linear.h"

namespace ditkernels {
namespace {

struct SkipGemmParams {
  const void* x;
  const void* skip;
  const void* weight;  // [N, 2D], row stride 2D
  const void* bias;    // [N] or null
  void* y;             // [M, N], row stride N
  int64_t ld_x, ld_skip;
  int M, N, D;
};

// ---- tensor-core path ----
constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kThreads = 256;
constexpr int kStageElems = (kBM + kBN) * kBK;
constexpr int kSmemBytes = kStages * kStageElems * 2;

template <typename T>
__device__ __forceinline__ void load_stage(const SkipGemmParams& p, T* sA, T* sB, int m0, int n0,
                                           int k0, int tid) {
  const int K = 2 * p.D;
#pragma unroll
  for (int it = 0; it < (kBM * kBK / 8) / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    const int row = idx >> 2, chunk = idx & 3;
    const int gm = m0 + row, kc = k0 + chunk * 8;
    const T* src = static_cast<const T*>(p.x);
    int bytes = 0;
    if (gm < p.M && kc < K) {
      bytes = 16;
      src = kc < p.D ? static_cast<const T*>(p.x) + gm * p.ld_x + kc
                     : static_cast<const T*>(p.skip) + gm * p.ld_skip + (kc - p.D);
    }
    mma::cp_async_16(reinterpret_cast<unsigned char*>(sA) + mma::swizzle64(row, chunk), src, bytes);
  }
#pragma unroll
  for (int it = 0; it < (kBN * kBK / 8) / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    const int row = idx >> 2, chunk = idx & 3;
    const int gn = n0 + row, kc = k0 + chunk * 8;
    const T* src = static_cast<const T*>(p.weight);
    int bytes = 0;
    if (gn < p.N && kc < K) {
      bytes = 16;
      src = static_cast<const T*>(p.weight) + static_cast<int64_t>(gn) * K + kc;
    }
    mma::cp_async_16(reinterpret_cast<unsigned char*>(sB) + mma::swizzle64(row, chunk), src, bytes);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) skip_gemm_tc_kernel(const SkipGemmParams p) {
  DK_DYNAMIC_SMEM(128, smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.y * kBM;
  const int k_tiles = (2 * p.D + kBK - 1) / kBK;

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) {
      load_stage(p, smem + s * kStageElems, smem + s * kStageElems + kBM * kBK, m0, n0, s * kBK,
                 tid);
    }
    mma::cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    // Tile kt has landed, and every warp is done with tile kt - 1, whose stage the
    // prefetch below overwrites.
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();
    const int pf = kt + kStages - 1;
    if (pf < k_tiles) {
      T* st = smem + (pf % kStages) * kStageElems;
      load_stage(p, st, st + kBM * kBK, m0, n0, pf * kBK, tid);
    }
    mma::cp_async_commit();

    const T* a = smem + (kt % kStages) * kStageElems;
    mma::warp_tile_64x32(acc, reinterpret_cast<const unsigned char*>(a),
                         reinterpret_cast<const unsigned char*>(a + kBM * kBK), lane, warp_m,
                         warp_n, [](float (&d)[4], const uint32_t (&af)[4],
                                    const uint32_t (&bf)[2]) { mma::mma_16816<T>(d, af, bf); });
  }
  mma::cp_async_wait<0>();

  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = n0 + warp_n * 32 + j * 8 + (lane & 3) * 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + warp_m * 64 + i * 16 + (lane >> 2) + half * 8;
        if (row >= p.M) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = col + e;
          if (c < p.N) {
            float v = acc[i][j][half * 2 + e];
            if (bias != nullptr) v += static_cast<float>(bias[c]);
            y[static_cast<int64_t>(row) * p.N + c] = static_cast<T>(v);
          }
        }
      }
    }
  }
}

// ---- Hopper path (sm_90a): wgmma ----
// A 128 x BN x 64 tile (BN = 128, 192 or 256, picked per Dout so that few columns
// are padding): two warpgroups, each a 64 x BN slab of m64nBNk16 wgmma from shared
// memory. Tiles are K-major with 128-byte rows and the 128-byte swizzle
// (cuda_wgmma.cuh), loaded by all 256 threads with cp.async: the x/skip switch and
// the zero-filled tails are those of the mma.sync path; the pipeline is
// wgmma::pipelined_mainloop (four stages, loads two tiles ahead). The epilogue adds
// the bias, rounds, and writes 16-byte rows through shared memory. Wider tiles read
// less of A and B from L2 per flop: a 128 x 128 tile would need about the L2's
// bandwidth to keep the tensor cores fed.
namespace sm90 {
constexpr int kBM = 128, kBK = 64, kStages = 4, kAhead = 2, kThreads = 256;
constexpr int kATileBytes = kBM * wgmma::kRowBytes;

template <int BN>
struct Tile {
  static constexpr int kBTileBytes = BN * wgmma::kRowBytes;
  static constexpr int kStageBytes = kATileBytes + kBTileBytes;
  static constexpr int kOutPitch = BN + 8;  // epilogue row, elements: 16 bytes of padding
  static constexpr int kSmemBytes = kStages * kStageBytes + wgmma::kAtomBytes;  // + alignment
  static_assert(kBM * kOutPitch * 2 <= kStages * kStageBytes, "epilogue tile must fit the stages");
};

template <typename T, int BN>
__global__ void __launch_bounds__(kThreads, 1) skip_gemm_wgmma_kernel(const SkipGemmParams p) {
  using Cfg = Tile<BN>;
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* smem = wgmma::align_to_atom(smem_raw);
  const int tid = threadIdx.x, wg = tid / 128;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * kBM;
  const int K = 2 * p.D;
  const T* x = static_cast<const T*>(p.x);
  const T* skip = static_cast<const T*>(p.skip);
  const T* w = static_cast<const T*>(p.weight);

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  auto load = [&](unsigned char* stage, int kt) {
    const int k0 = kt * kBK;
    wgmma::load_tile<kBM, kThreads>(stage, tid, x, [&](int row, int chunk) -> const void* {
      const int gm = m0 + row, kc = k0 + chunk * 8;
      if (gm >= p.M || kc >= K) return nullptr;
      return kc < p.D ? x + gm * p.ld_x + kc : skip + gm * p.ld_skip + (kc - p.D);
    });
    auto b_src = [&](int row, int chunk) -> const void* {
      const int gn = n0 + row, kc = k0 + chunk * 8;
      return gn < p.N && kc < K ? w + static_cast<int64_t>(gn) * K + kc : nullptr;
    };
    wgmma::load_tile<BN, kThreads>(stage + kATileBytes, tid, w, b_src);
  };
  auto mma = [&](const unsigned char* stage) {
    wgmma::mma_k_tile<T, BN>(acc, stage + wg * 64 * wgmma::kRowBytes, stage + kATileBytes);
  };
  wgmma::pipelined_mainloop<kStages, kAhead>(smem, Cfg::kStageBytes, (K + kBK - 1) / kBK, load,
                                             mma);
  wgmma::fence_operand(acc);  // the epilogue reads them after the last wait
  __syncthreads();  // every warpgroup is done with the stages the epilogue reuses

  T* out = reinterpret_cast<T*>(smem);
  const T* bias = static_cast<const T*>(p.bias);
  const int lane = tid & 31, row0 = wg * 64 + (tid / 32 % 4) * 16 + lane / 4;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) {
    const int row = row0 + ((i % 4) >= 2 ? 8 : 0);
    const int col = 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
    float v = acc[i];
    if (bias != nullptr && n0 + col < p.N) v += static_cast<float>(bias[n0 + col]);
    out[row * Cfg::kOutPitch + col] = static_cast<T>(v);
  }
  __syncthreads();

  T* y = static_cast<T*>(p.y);
  if (p.N % 8 == 0) {
#pragma unroll
    for (int it = 0; it < kBM * (BN / 8) / kThreads; ++it) {
      const int idx = tid + it * kThreads;
      const int row = idx / (BN / 8), chunk = idx % (BN / 8);
      const int gm = m0 + row, gn = n0 + chunk * 8;
      if (gm < p.M && gn < p.N) {
        *reinterpret_cast<float4*>(y + static_cast<int64_t>(gm) * p.N + gn) =
            *reinterpret_cast<const float4*>(out + row * Cfg::kOutPitch + chunk * 8);
      }
    }
  } else {
    for (int idx = tid; idx < kBM * BN; idx += kThreads) {
      const int row = idx / BN, col = idx % BN;
      const int gm = m0 + row, gn = n0 + col;
      if (gm < p.M && gn < p.N) {
        y[static_cast<int64_t>(gm) * p.N + gn] = out[row * Cfg::kOutPitch + col];
      }
    }
  }
}

// The warp-specialized persistent kernel (ws::run, wgmma_ws.cuh), the default on
// Hopper; DITKERNELS_DISABLE_TMA=1 selects the one above. Four tensor maps walked as
// one K loop: k-tiles 0 .. kx - 1 read x and W[:, :D], the next kx read skip and
// W[:, D:] (kx = ceil(D / 64); TMA's zero fill past D makes a tile that straddles D
// add nothing for the columns beyond it). The epilogue adds the bias, rounds, and
// stores column pairs straight to global memory.
template <typename T>
struct SkipTmaProblem {
  CUtensorMap x, skip, w1, w2;
  const T* bias;
  T* y;
  int m, n, k_tiles, kx;
  ws::SplitK<float> split;

  __device__ __forceinline__ void load(int kt, int m0, int n0, unsigned char* sa,
                                       unsigned char* sb, uint64_t* full) const {
    const bool in_x = kt < kx;
    const int k0 = (in_x ? kt : kt - kx) * kBK;
    tma::load_2d(sa, in_x ? &x : &skip, full, k0, m0);
    tma::load_2d(sb, in_x ? &w1 : &w2, full, k0, n0);
  }

  // Column pair (col, col + 1) of a row (col even, < n; col + 1 may be n).
  __device__ __forceinline__ void finish_pair(int row, int col, float v0, float v1) const {
    T* out = y + static_cast<int64_t>(row) * n;
    const bool both = col + 1 < n;
    if (bias != nullptr) {
      v0 += static_cast<float>(bias[col]);
      if (both) v1 += static_cast<float>(bias[col + 1]);
    }
    if (both && n % 2 == 0) {  // 4-byte aligned pairs
      ws::store_pair<T>(out + col, static_cast<T>(v0), static_cast<T>(v1));
    } else {
      out[col] = static_cast<T>(v0);
      if (both) out[col + 1] = static_cast<T>(v1);
    }
  }

  template <int kAcc>
  __device__ __forceinline__ void epilogue(const float (&acc)[kAcc], int row0, int n0,
                                           int t) const {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = ws::acc_row(row0, t, half);
      if (row >= m) continue;
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j) {
        const int col = ws::acc_col(n0, t, j);
        if (col < n) finish_pair(row, col, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
      }
    }
  }
};

template <typename T, int BN>
__global__ void __launch_bounds__(ws::kThreads, 1)
    skip_gemm_tma_kernel(const __grid_constant__ SkipTmaProblem<T> pr) {
  ws::run<T, BN>(pr);
}

template <typename T>
__global__ void __launch_bounds__(ws::kReduceThreads)
    skip_gemm_split_reduce_kernel(const __grid_constant__ SkipTmaProblem<T> pr) {
  ws::reduce_splits<float>(pr);
}

template <typename T, int BN>
void launch_tma(const SkipGemmParams& p, const ws::Plan& plan, const at::Tensor& like,
                cudaStream_t stream) {
  const auto type = std::is_same_v<T, c10::BFloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                     : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const T* w = static_cast<const T*>(p.weight);
  SkipTmaProblem<T> pr;
  pr.x = tma::make_tensor_map_2d(p.x, type, 2, p.M, p.D, p.ld_x, ws::kBM, kBK);
  pr.skip = tma::make_tensor_map_2d(p.skip, type, 2, p.M, p.D, p.ld_skip, ws::kBM, kBK);
  pr.w1 = tma::make_tensor_map_2d(w, type, 2, p.N, p.D, 2 * int64_t{p.D}, BN, kBK);
  pr.w2 = tma::make_tensor_map_2d(w + p.D, type, 2, p.N, p.D, 2 * int64_t{p.D}, BN, kBK);
  pr.bias = static_cast<const T*>(p.bias);
  pr.y = static_cast<T*>(p.y);
  pr.m = p.M;
  pr.n = p.N;
  pr.kx = (p.D + kBK - 1) / kBK;
  pr.k_tiles = 2 * pr.kx;
  ws::launch<float, BN>(skip_gemm_tma_kernel<T, BN>, skip_gemm_split_reduce_kernel<T>, pr, plan,
                        like, stream);
}

template <typename T, int BN>
void launch(const SkipGemmParams& p, int64_t m_tiles, cudaStream_t stream) {
  auto kernel = skip_gemm_wgmma_kernel<T, BN>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Tile<BN>::kSmemBytes));
  const dim3 grid(static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>(m_tiles));
  DK_LAUNCH(kernel, grid, kThreads, Tile<BN>::kSmemBytes, stream)(p);
}
}  // namespace sm90

// ---- fp32 path ----
constexpr int kFB = 64, kFBK = 16, kFThreads = 256;

__global__ void __launch_bounds__(kFThreads) skip_gemm_f32_kernel(const SkipGemmParams p) {
  // k-major tiles: a thread's four rows (or columns) are read as broadcasts.
  __shared__ float As[kFBK][kFB + 1];
  __shared__ float Bs[kFBK][kFB + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int n0 = blockIdx.x * kFB, m0 = blockIdx.y * kFB;
  const int K = 2 * p.D;
  const float* x = static_cast<const float*>(p.x);
  const float* skip = static_cast<const float*>(p.skip);
  const float* w = static_cast<const float*>(p.weight);
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kFBK) {
#pragma unroll
    for (int it = 0; it < kFB * kFBK / kFThreads; ++it) {
      const int idx = tid + it * kFThreads;
      const int r = idx / kFBK, k = idx % kFBK, gk = k0 + k;
      const int gm = m0 + r, gn = n0 + r;
      float a = 0.f, bv = 0.f;
      if (gm < p.M && gk < K) a = gk < p.D ? x[gm * p.ld_x + gk] : skip[gm * p.ld_skip + gk - p.D];
      if (gn < p.N && gk < K) bv = w[static_cast<int64_t>(gn) * K + gk];
      As[k][r] = a;
      Bs[k][r] = bv;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kFBK; ++k) {
      float av[4], bw[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bw[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bw[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* y = static_cast<float*>(p.y);
  const float* bias = static_cast<const float*>(p.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = m0 + ty + 16 * i;
    if (row >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = n0 + tx + 16 * j;
      if (col < p.N) {
        y[static_cast<int64_t>(row) * p.N + col] = acc[i][j] + (bias ? bias[col] : 0.f);
      }
    }
  }
}

skip_concat_linear::Checked check_cuda(const char* op, const at::Tensor& x, const at::Tensor& skip,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias) {
  return skip_concat_linear::check(kCuda, op, x, skip, weight, bias);
}

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& skip, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  const char* op = "skip_concat_linear";
  auto c = check_cuda(op, x, skip, weight, bias);
  TORCH_CHECK(c.D % 8 == 0, op, ": the CUDA kernel needs D (the last dim of x) to be a multiple "
              "of 8, got x of shape ", shape_str(x));
  TORCH_CHECK(c.D <= (1 << 29) && c.Dout < (1 << 30), op, ": D = ", c.D, " or Dout = ", c.Dout,
              " is too large");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({c.M, c.Dout}, x.options());
  if (c.M == 0) return y.view(c.out_shape);
  const bool f32 = x.scalar_type() == at::kFloat;
  at::Tensor x2d = f32 ? c.x2d : aligned_rows(c.x2d);
  at::Tensor skip2d = f32 ? c.skip2d : aligned_rows(c.skip2d);
  at::Tensor w = f32 ? c.weight : aligned_rows(c.weight.contiguous());
  const int tile_m = f32 ? kFB : kBM, tile_n = f32 ? kFB : kBN;
  const int64_t m_tiles = (c.M + tile_m - 1) / tile_m;
  TORCH_CHECK(m_tiles <= 65535 && c.M < (int64_t{1} << 31), op, ": M = ", c.M,
              " rows exceed the CUDA grid limit");

  SkipGemmParams p;
  p.x = x2d.data_ptr();
  p.skip = skip2d.data_ptr();
  p.weight = w.data_ptr();
  p.bias = c.bias ? c.bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.ld_x = x2d.stride(0);
  p.ld_skip = skip2d.stride(0);
  p.M = static_cast<int>(c.M);
  p.N = static_cast<int>(c.Dout);
  p.D = static_cast<int>(c.D);
  const dim3 grid(static_cast<unsigned>((c.Dout + tile_n - 1) / tile_n),
                  static_cast<unsigned>(m_tiles));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (f32) {
    DK_LAUNCH(skip_gemm_f32_kernel, grid, kFThreads, 0, stream)(p);
  } else {
    DK_DISPATCH_CUDA_HALFS(x.scalar_type(), op, [&] {
      if (wgmma::use_wgmma()) {
        const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        if (tma::use_tma_gemm()) {
          // ws::plan: the tile width, and a K split where the tiles would leave SMs idle.
          const int kx = (p.D + sm90::kBK - 1) / sm90::kBK;
          const ws::Plan plan = ws::plan(p.M, p.N, 2 * kx, sms);
          switch (plan.bn) {
            case 256: sm90::launch_tma<scalar_t, 256>(p, plan, y, stream); break;
            case 192: sm90::launch_tma<scalar_t, 192>(p, plan, y, stream); break;
            default: sm90::launch_tma<scalar_t, 128>(p, plan, y, stream); break;
          }
        } else {
          switch (wgmma::pick_tile_n(c.M, c.Dout, sm90::kBM, sms)) {
            case 256: sm90::launch<scalar_t, 256>(p, m_tiles, stream); break;
            case 192: sm90::launch<scalar_t, 192>(p, m_tiles, stream); break;
            default: sm90::launch<scalar_t, 128>(p, m_tiles, stream); break;
          }
        }
      } else {
        auto kernel = skip_gemm_tc_kernel<scalar_t>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
        DK_LAUNCH(kernel, grid, kThreads, kSmemBytes, stream)(p);
      }
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.view(c.out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& skip,
    const at::Tensor& weight, bool has_bias) {
  const char* op = "skip_concat_linear_backward";
  auto c = check_cuda(op, x, skip, weight, std::nullopt);
  check_same_device(op, grad_y, "grad_y", x, "x");
  check_same_dtype(op, grad_y, "grad_y", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return skip_concat_linear::backward(grad_y, c, has_bias);
}

}  // namespace
}  // namespace ditkernels

DK_TORCH_LIBRARY_IMPL_CUDA(m) {
  m.impl("skip_concat_linear", &ditkernels::forward_cuda);
  m.impl("skip_concat_linear_backward", &ditkernels::backward_cuda);
}
