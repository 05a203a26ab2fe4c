#pragma once
// The warp-specialized persistent wgmma GEMM of the Hopper kernels (sm_90a), after
// CUTLASS's KernelTmaWarpSpecializedCooperative: three warpgroups per CTA, one CTA
// per SM walking the output tiles.
//  - producer (warpgroup 0, one thread): for each k-tile, waits until its stage of
//    the ring is empty, announces the stage's bytes on the stage's "full" barrier and
//    issues the TMA loads of A (128 rows) and B (BN rows), 128-byte swizzled rows;
//  - consumers (warpgroups 1 and 2, rows 0-63 and 64-127 of the tile): wait for the
//    stage, issue its wgmma, and once the previous k-tile's wgmma retired (one group
//    in flight) release that stage with one arrival per warpgroup on its "empty"
//    barrier; after the last k-tile the epilogue goes from the accumulators straight
//    to global memory while the producer already loads the next tile;
//  - setmaxnreg gives the producer's registers to the consumers.
// Split-K (where the output tiles would leave SMs idle, plan()): the work units are
// (tile, k-range) pairs; a unit's consumers store their fp32 or int32 sums to a
// workspace, and a second kernel (reduce_splits) adds the ranges in order and runs
// the problem's epilogue on the sums, so the result does not depend on the schedule
// (int32 sums: the same bits as one range).
// A problem supplies the loads and the epilogues:
//   int m, n, k_tiles;                                   (sizes, k-tiles of 128 bytes)
//   SplitK<Acc> split;                                   (one range: partial == nullptr)
//   void load(int kt, int m0, int n0, unsigned char* a, unsigned char* b, uint64_t* full) const;
//   void epilogue(const Acc (&acc)[BN / 2], int row0, int n0, int t) const;
//   void finish_pair(int row, int col, Acc v0, Acc v1) const;   (col even, < n; col + 1 may be n)
// with a kernel per problem that calls run() (so that each keeps its name), and one
// that calls reduce_splits().

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "ditkernels/cuda_runtime.cuh"
#include "ditkernels/cuda_tma.cuh"
#include "ditkernels/cuda_wgmma.cuh"

namespace ditkernels {
namespace ws {

constexpr int kThreads = 384, kBM = 128, kProducerRegs = 40, kConsumerRegs = 232;
constexpr int kATileBytes = kBM * wgmma::kRowBytes;

template <int BN>
struct Pipeline {
  static constexpr int kBTileBytes = BN * wgmma::kRowBytes;
  static constexpr int kStageBytes = kATileBytes + kBTileBytes;
  static constexpr int kStages = (200 * 1024) / kStageBytes;
  static_assert(kStages >= 3, "too few stages to keep loads ahead");
  struct Barriers {
    uint64_t full[kStages], empty[kStages];
  };
  static constexpr int kSmemBytes = kStages * kStageBytes + sizeof(Barriers) + wgmma::kAtomBytes;
};

// Stage and phase of a ring position: the producer and the consumers walk the same
// sequence of positions.
template <int kStages>
struct RingPos {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// The origin of output tile `tile`: N fastest, so that the CTAs running together
// share A's rows.
__device__ __forceinline__ void tile_origin(int tile, int n_tiles, int bn, int& m0, int& n0) {
  m0 = (tile / n_tiles) * kBM;
  n0 = (tile % n_tiles) * bn;
}

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, int8_t>, int, float>;

// The K split of a launch: `splits` ranges of k-tiles, range s summed into
// partial[s] ([m, ld] row-major, ld even so that column pairs never straddle a row).
template <typename AccT>
struct SplitK {
  AccT* partial = nullptr;
  int64_t ld = 0;
  int splits = 1;
};

// Work unit `unit` of `tiles` output tiles times `splits` k-ranges: the k-range is the
// slow index, so that the CTAs running together read the same k-columns of A and B.
// Range s is k-tiles [s k_tiles / splits, (s + 1) k_tiles / splits), never empty
// (splits <= k_tiles).
struct Unit {
  int m0, n0, kt_begin, kt_end, split;
};
__device__ __forceinline__ Unit unit_of(int unit, int tiles, int n_tiles, int bn, int k_tiles,
                                        int splits) {
  Unit u;
  u.split = unit / tiles;
  tile_origin(unit - u.split * tiles, n_tiles, bn, u.m0, u.n0);
  u.kt_begin = u.split * k_tiles / splits;
  u.kt_end = (u.split + 1) * k_tiles / splits;
  return u;
}

// Thread t's rows of a consumer warpgroup's 64 x BN slab at row0 (t / 32 picks the
// 16-row block, (t % 32) / 4 the row in it, `half` the one 8 rows below) and its
// column pair 8 j + 2 (t % 4) of n8 block j: accumulators 4 j + 2 half and + 1.
__device__ __forceinline__ int acc_row(int row0, int t, int half) {
  return row0 + (t / 32) * 16 + (t % 32) / 4 + half * 8;
}
__device__ __forceinline__ int acc_col(int n0, int t, int j) { return n0 + 8 * j + 2 * (t % 4); }

// Two adjacent outputs in one 8- or 4-byte store.
template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* y, OutT a, OutT b) {
  struct alignas(2 * sizeof(OutT)) Pair {
    OutT v[2];
  };
  *reinterpret_cast<Pair*>(y) = Pair{{a, b}};
}

// A k-range's sums of a consumer's slab, to its plane of the workspace.
template <typename AccT, int kAcc>
__device__ __forceinline__ void store_partial(const AccT (&acc)[kAcc], const SplitK<AccT>& split,
                                              int s, int m, int n, int row0, int n0, int t) {
  AccT* plane = split.partial + static_cast<int64_t>(s) * m * split.ld;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = acc_row(row0, t, half);
    if (row >= m) continue;
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
      const int col = acc_col(n0, t, j);
      if (col < n) {
        store_pair<AccT>(plane + static_cast<int64_t>(row) * split.ld + col, acc[4 * j + 2 * half],
                         acc[4 * j + 2 * half + 1]);
      }
    }
  }
}

template <typename T, int BN, typename Problem>
__device__ __forceinline__ void run(const Problem& pr) {
  using P = Pipeline<BN>;
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* smem = wgmma::align_to_atom(smem_raw);
  auto* bars = reinterpret_cast<typename P::Barriers*>(smem + P::kStages * P::kStageBytes);
  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
  const int n_tiles = (pr.n + BN - 1) / BN;
  const int tiles = n_tiles * ((pr.m + kBM - 1) / kBM);
  const int splits = pr.split.splits, units = tiles * splits;
  if (threadIdx.x == 0) {
    for (int s = 0; s < P::kStages; ++s) {
      tma::mbarrier_init(&bars->full[s], 1);
      tma::mbarrier_init(&bars->empty[s], 2);
    }
    tma::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    tma::setmaxnreg_dec<kProducerRegs>();
    if (t != 0) return;
    RingPos<P::kStages> pos;
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
      const Unit u = unit_of(unit, tiles, n_tiles, BN, pr.k_tiles, splits);
#pragma unroll 1
      for (int kt = u.kt_begin; kt < u.kt_end; ++kt) {
        tma::mbarrier_wait(&bars->empty[pos.stage], pos.phase ^ 1u);
        unsigned char* stage = smem + pos.stage * P::kStageBytes;
        tma::mbarrier_arrive_expect_tx(&bars->full[pos.stage], P::kStageBytes);
        pr.load(kt, u.m0, u.n0, stage, stage + kATileBytes, &bars->full[pos.stage]);
        pos.advance();
      }
    }
    return;
  }

  tma::setmaxnreg_inc<kConsumerRegs>();
  // Descriptors of stage 0's A slab and B tile; a stage's are P::kStageBytes apart.
  const uint64_t desc_a = wgmma::desc_sw128(smem + (wg - 1) * 64 * wgmma::kRowBytes, 0);
  const uint64_t desc_b = wgmma::desc_sw128(smem + kATileBytes, 0);
  RingPos<P::kStages> pos;
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const Unit u = unit_of(unit, tiles, n_tiles, BN, pr.k_tiles, splits);
    Acc<T> acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0;
    int held = -1;  // the stage whose wgmma may still be in flight
    // A do-while (every range has a k-tile): the loop needs no zero-trip guard, which
    // would make the compiler lay it out across the tile loop's head.
    int kt = u.kt_begin;
#pragma unroll 1
    do {
      tma::mbarrier_wait(&bars->full[pos.stage], pos.phase);
      const uint32_t offset = static_cast<uint32_t>(pos.stage) * P::kStageBytes;
      wgmma::fence();
      wgmma::mma_k_tile_desc<T, BN>(acc, wgmma::desc_advance(desc_a, offset),
                                    wgmma::desc_advance(desc_b, offset));
      wgmma::commit();
      wgmma::wait<1>();  // the previous k-tile's wgmma retired: its stage is free
      if (held >= 0 && t == 0) tma::mbarrier_arrive(&bars->empty[held]);
      held = pos.stage;
      pos.advance();
    } while (++kt < u.kt_end);
    wgmma::wait<0>();
    wgmma::fence_operand(acc);
    if (t == 0) tma::mbarrier_arrive(&bars->empty[held]);
    const int row0 = u.m0 + (wg - 1) * 64;
    if (splits == 1) {
      pr.epilogue(acc, row0, u.n0, t);
    } else {
      store_partial(acc, pr.split, u.split, pr.m, pr.n, row0, u.n0, t);
    }
  }
}

// The second kernel of a split launch: thread i's column pair of the output, its k-ranges
// added in order, through the problem's epilogue.
template <typename AccT, typename Problem>
__device__ __forceinline__ void reduce_splits(const Problem& pr) {
  const int pairs = (pr.n + 1) / 2;
  const int64_t total = static_cast<int64_t>(pr.m) * pairs;
  const int64_t plane = static_cast<int64_t>(pr.m) * pr.split.ld;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(i / pairs), col = static_cast<int>(i % pairs) * 2;
    const AccT* src = pr.split.partial + static_cast<int64_t>(row) * pr.split.ld + col;
    AccT v0 = 0, v1 = 0;
    for (int s = 0; s < pr.split.splits; ++s, src += plane) {
      struct alignas(2 * sizeof(AccT)) Pair {
        AccT v[2];
      };
      const Pair p = *reinterpret_cast<const Pair*>(src);
      v0 += p.v[0];
      v1 += p.v[1];
    }
    pr.finish_pair(row, col, v0, v1);
  }
}

// A positive integer from the environment, or 0 where the variable is unset or empty.
inline int env_positive(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || env[0] == '\0') return 0;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK(*end == '\0' && v >= 1 && v <= (1 << 20), name,
              " must be a positive integer, got '", env, "'");
  return static_cast<int>(v);
}

// How a launch covers the output: tile width, k-ranges, CTAs.
struct Plan {
  int bn, splits, ctas;
};

// The plan's cost model, in microseconds of an H100 SXM (the constants are estimates
// from its data sheet, to be refit on a GPU from benchmarks/bench_int8.py and
// bench_skip_concat_linear.py, which time the plan against DITKERNELS_SPLIT_K=1):
//  - a CTA's k-step (128 x bn x 128 bytes of wgmma) takes kStepUs x bn / 256 at the
//    tensor cores' peak (bf16 989 TFLOP/s, int8 1979 TOP/s over 132 SMs), with narrower
//    tiles a little less efficient (they read more from L2 per flop);
//  - a persistent CTA walks ceil(units / SMs) units, so a grid that does not fill the
//    GPU runs no faster than one that does: time = ceil(units / sms) x k-steps per unit;
//  - a split adds the reduce kernel (kLaunchUs) and its traffic: each range's 4-byte
//    sums written and read back once, at kWorkspaceBytesPerUs (the workspace of the
//    small grids that split stays in the 50 MB L2).
// A split must beat the best unsplit plan by kSplitGain.
constexpr double kStepUs = 0.56, kLaunchUs = 1.5, kWorkspaceBytesPerUs = 5.0e6,
                 kSplitGain = 0.9;
constexpr int kMaxSplits = 16, kMinSplitKTiles = 2;

inline double plan_time_us(int64_t m, int64_t n, int k_tiles, int sms, int bn, int splits) {
  const double efficiency = bn == 256 ? 1.0 : bn == 192 ? 0.97 : 0.9;
  const int64_t tiles = (n + bn - 1) / bn * ((m + kBM - 1) / kBM);
  const int64_t rounds = (tiles * splits + sms - 1) / sms;
  const int64_t steps = (k_tiles + splits - 1) / splits;
  double us = static_cast<double>(rounds * steps) * kStepUs * bn / 256.0 / efficiency;
  if (splits > 1) {
    us += kLaunchUs + static_cast<double>(2 * splits + 1) * m * n * 4 / kWorkspaceBytesPerUs;
  }
  return us;
}

// The plan of an m x n GEMM of k_tiles k-tiles on `sms` SMs: the (tile width, splits)
// of least estimated time. DITKERNELS_WGMMA_TILE_N (128, 192 or 256) fixes the width,
// DITKERNELS_SPLIT_K the number of k-ranges (at most k_tiles; 1 never splits), and
// DITKERNELS_PERSISTENT_CTAS caps the grid, so that tests walk several units per CTA
// on small shapes. One CTA per SM, or per unit where there are fewer.
inline Plan plan(int64_t m, int64_t n, int k_tiles, int sms) {
  int widths[3] = {256, 192, 128}, n_widths = 3;
  if (std::getenv("DITKERNELS_WGMMA_TILE_N") != nullptr) {
    widths[0] = wgmma::pick_tile_n(m, n, kBM, sms);  // the variable's value, checked there
    n_widths = 1;
  }
  const int forced = env_positive("DITKERNELS_SPLIT_K");
  Plan best{widths[0], 1, 0};
  double best_us = -1.0;
  auto consider = [&](int bn, int splits, double gain) {
    const double us = plan_time_us(m, n, k_tiles, sms, bn, splits);
    if (best_us < 0.0 || us < best_us * gain) {
      best = Plan{bn, splits, 0};
      best_us = us;
    }
  };
  if (forced > 0) {
    for (int w = 0; w < n_widths; ++w) consider(widths[w], std::min(forced, k_tiles), 1.0);
  } else {
    for (int w = 0; w < n_widths; ++w) consider(widths[w], 1, 1.0);
    const int max_splits = std::min(kMaxSplits, k_tiles / kMinSplitKTiles);
    for (int w = 0; w < n_widths; ++w) {
      for (int s = 2; s <= max_splits; ++s) {
        // Against the best unsplit plan by kSplitGain, against other splits as is.
        consider(widths[w], s, best.splits == 1 ? kSplitGain : 1.0);
      }
    }
  }
  int ctas = sms;
  if (const int cap = env_positive("DITKERNELS_PERSISTENT_CTAS")) ctas = std::min(ctas, cap);
  const int64_t units = (n + best.bn - 1) / best.bn * ((m + kBM - 1) / kBM) * best.splits;
  best.ctas = static_cast<int>(std::min<int64_t>(units, ctas));
  return best;
}

// The workspace of a split plan: [splits, m, ld] sums, ld = n rounded up to even.
template <typename AccT>
SplitK<AccT> split_workspace(const Plan& plan, int64_t m, int64_t n, const at::Tensor& like,
                             at::Tensor& holder) {
  SplitK<AccT> split;
  if (plan.splits == 1) return split;
  split.splits = plan.splits;
  split.ld = (n + 1) / 2 * 2;
  holder = at::empty({plan.splits, m, split.ld},
                     like.options().dtype(std::is_same_v<AccT, int> ? at::kInt : at::kFloat));
  split.partial = holder.data_ptr<AccT>();
  return split;
}

// The reduce kernel's grid: a column pair per thread.
inline int reduce_blocks(int64_t m, int64_t n, int sms) {
  const int64_t pairs = m * ((n + 1) / 2);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((pairs + 255) / 256, 8 * sms)));
}
constexpr int kReduceThreads = 256;

// Launches a persistent TMA GEMM kernel with BN-wide tiles on the problem pr as `plan`
// says: pr.split gets the plan's workspace (AccT sums, allocated like `like`), and a
// split plan is followed by `reduce`, the op's reduce kernel, on the same problem.
template <typename AccT, int BN, typename Kernel, typename ReduceKernel, typename Problem>
void launch(Kernel kernel, ReduceKernel reduce, Problem& pr, const Plan& plan,
            const at::Tensor& like, cudaStream_t stream) {
  constexpr int smem = Pipeline<BN>::kSmemBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  at::Tensor workspace;  // freed after the launches: the allocator orders reuse by stream
  pr.split = split_workspace<AccT>(plan, pr.m, pr.n, like, workspace);
  DK_LAUNCH(kernel, plan.ctas, kThreads, smem, stream)(pr);
  if (plan.splits > 1) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    DK_LAUNCH(reduce, reduce_blocks(pr.m, pr.n, sms), kReduceThreads, 0, stream)(pr);
  }
}

}  // namespace ws
}  // namespace ditkernels
