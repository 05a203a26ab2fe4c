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
// A problem supplies the loads and the epilogue:
//   int m, n, k_tiles;                                   (sizes, k-tiles of 128 bytes)
//   void load(int kt, int m0, int n0, unsigned char* a, unsigned char* b, uint64_t* full) const;
//   void epilogue(const Acc (&acc)[BN / 2], int row0, int n0, int t) const;
// with a kernel per problem that calls run() (so that each keeps its name).

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

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

template <typename T, int BN, typename Problem>
__device__ __forceinline__ void run(const Problem& pr) {
  using P = Pipeline<BN>;
  DK_DYNAMIC_SMEM(16, smem_raw);
  unsigned char* smem = wgmma::align_to_atom(smem_raw);
  auto* bars = reinterpret_cast<typename P::Barriers*>(smem + P::kStages * P::kStageBytes);
  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
  const int n_tiles = (pr.n + BN - 1) / BN;
  const int tiles = n_tiles * ((pr.m + kBM - 1) / kBM);
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
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int m0, n0;
      tile_origin(tile, n_tiles, BN, m0, n0);
#pragma unroll 1
      for (int kt = 0; kt < pr.k_tiles; ++kt) {
        tma::mbarrier_wait(&bars->empty[pos.stage], pos.phase ^ 1u);
        unsigned char* stage = smem + pos.stage * P::kStageBytes;
        tma::mbarrier_arrive_expect_tx(&bars->full[pos.stage], P::kStageBytes);
        pr.load(kt, m0, n0, stage, stage + kATileBytes, &bars->full[pos.stage]);
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
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int m0, n0;
    tile_origin(tile, n_tiles, BN, m0, n0);
    Acc<T> acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0;
    int held = -1;  // the stage whose wgmma may still be in flight
    // A do-while (k_tiles >= 1): the loop needs no zero-trip guard, which would make the
    // compiler lay it out across the tile loop's head.
    int kt = 0;
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
    } while (++kt < pr.k_tiles);
    wgmma::wait<0>();
    wgmma::fence_operand(acc);
    if (t == 0) tma::mbarrier_arrive(&bars->empty[held]);
    pr.epilogue(acc, m0 + (wg - 1) * 64, n0, t);
  }
}

// The persistent grid: one CTA per SM, or per tile where there are fewer;
// DITKERNELS_PERSISTENT_CTAS caps it, so that tests walk several tiles per CTA on
// small shapes.
inline int grid_size(int64_t m, int64_t n, int bn, int sms) {
  int ctas = sms;
  if (const char* env = std::getenv("DITKERNELS_PERSISTENT_CTAS")) {
    const int cap = std::atoi(env);
    TORCH_CHECK(cap >= 1, "DITKERNELS_PERSISTENT_CTAS must be a positive integer, got '", env, "'");
    ctas = std::min(ctas, cap);
  }
  const int64_t tiles = (n + bn - 1) / bn * ((m + kBM - 1) / kBM);
  return static_cast<int>(std::min<int64_t>(tiles, ctas));
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

}  // namespace ws
}  // namespace ditkernels
