// CUDA TMSA forward: one flash-attention-style kernel (fp16/bf16, mma.sync).
//
// A CTA owns 128 queries of one (sample, head) at head dims up to 72 (64 above);
// four warps each own 32 (16) rows and stream 64-key tiles of K and V through
// double-buffered shared memory (cp.async, read in place from the packed
// [B, N, 3, H, D] projection). Each score's bias is gathered, without a branch, from
// a padded copy of the [H, T] table (fwd_bias_table), so no N x N tensor exists.
// Online softmax in the exp2 domain (ex2.approx) with fp32 statistics; the
// log-sum-exp is saved for the backward pass.
//
// The time term is folded in exactly rather than added to every K and V tile:
//   (q + tq) . (k + tk) = (q + tq) . k + c_i,  c_i = (q + tq) . tk   (constant per row,
//   so it cancels in the softmax and is added back to the saved log-sum-exp), and
//   sum_j P_ij (v_j + tv) = sum_j P_ij v_j + tv                          (rows of P sum to 1).
// Only Q gets tq on load; the output gets tv.
//
// Head dims 32, 64, 72, 96 and 128 are native: a k = 8 mma covers the tail of 72 in
// Q K^T, and P V runs over D / 8 output tiles, so nothing is padded to 96 or 128.
// float32 uses the blocked implementation in csrc/include/ditkernels/tmsa.h. The
// backward kernel follows the forward one below.

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cfloat>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "ditkernels/cuda_runtime.cuh"
#include "ditkernels/cuda_mma.cuh"
#include "ditkernels/cuda_wgmma.cuh"
#include "ditkernels/dispatch.h"
#include "ditkernels/library.h"
#include "ditkernels/tmsa.h"

namespace ditkernels {
namespace {

constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

struct TmsaFwdParams {
  const void* qkv;       // [B, N, 3, H, D], unit stride along D
  const void* time_qkv;  // [B, 3, H, D] contiguous, or null
  const float* table;    // fwd_bias_table: [H or 1, table_stride] fp32, never null
  void* out;             // [B, N, H, D] contiguous
  float* lse;            // [B, H, N]
  int64_t s_b, s_n, s_3, s_h;  // qkv strides in elements
  int B, N, H;
  int grid_h, grid_w, num_leading, table_size;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
  // The bias gather (query_bias_base): the padded table's head stride (0 without a
  // table), A = (Gh - 1)(2 Gw - 1) + Gw - 1, and the tokens without grid position.
  int64_t table_stride;
  int bias_span, bias_leading;
  // A key tile's width kBc = key_step_y Gw + key_step_x as grid rows and columns, and
  // as a step of the table offset, key_step_y (2 Gw - 1) + key_step_x.
  int key_step_x, key_step_lin;
};

// Shared-memory row stride (elements): an odd number of 16-byte chunks per row
// keeps the eight rows an ldmatrix phase reads on eight different bank groups.
template <int kD>
constexpr int smem_stride() {
  return (kD / 8) % 2 == 1 ? kD : kD + 8;
}

// Forward tiles. A warp owns kRowTiles 16-row tiles of queries, so each K or V
// fragment it reads from shared memory feeds 2 * kRowTiles mmas: two tiles (128-row
// CTAs) while the output and score accumulators fit twice in registers (head dims up
// to 72), one above.
constexpr int kFwdKeyTile = 64;  // keys per pipeline stage at every head dim

template <int kD>
struct FwdTiles {
  static constexpr int kRowTiles = kD <= 72 ? 2 : 1;
  static constexpr int kRowsPerWarp = 16 * kRowTiles;
  static constexpr int kBr = kWarps * kRowsPerWarp;  // queries per CTA
  static constexpr int kBc = kFwdKeyTile;             // keys per pipeline stage
  static constexpr int kS = smem_stride<kD>();
  static constexpr int kK16 = kD / 16;          // full k16 steps of Q K^T
  static constexpr bool kTail8 = kD % 16 == 8;  // one k8 step more (D = 72)
  static constexpr int kDTiles = kD / 8;        // n8 output tiles of P V
  static constexpr int kNTiles = kBc / 8;       // n8 score tiles per key tile
  // Each thread copies the same number of 16-byte chunks of a K (or V) tile; where
  // kBc * kD / 8 is not a multiple of the thread count (D = 72), the last chunks land
  // in spare rows past kBc that nobody reads, so no thread needs a bounds check.
  static constexpr int kChunkRounds = (kBc * (kD / 8) + kThreads - 1) / kThreads;
  static constexpr int kStageRows = (kChunkRounds * kThreads + kD / 8 - 1) / (kD / 8);
};

// The table offsets of the 2 kBc / 8 keys a thread's score accumulators hold, keys
// 8 t + 2 (lane % 4) + e of the tile at v[2 t + e]: stored in this order, so that
// they come in 16-byte loads.
struct alignas(16) KeyOffsets {
  unsigned v[16];
};
__device__ __forceinline__ int key_offsets_slot(int key) {
  return ((key >> 1) & 3) * 16 + (key >> 3) * 2 + (key & 1);
}

// The bias-table rows of the 2 kM query rows a thread holds (rows 16 i + 8 r + lane / 4
// of its warp's), together for 16-byte loads.
template <int kM>
struct alignas(16) RowBias {
  const float* row[kM][2];
};

template <typename T, int kD>
struct alignas(16) FwdSharedStorage {
  using Tiles = FwdTiles<kD>;
  T q[Tiles::kBr][Tiles::kS];  // Q' = q + tq
  T k[2][Tiles::kStageRows][Tiles::kS];  // two pipeline stages of K and V
  T v[2][Tiles::kStageRows][Tiles::kS];
  // Each key's offset (KeyCursor), per stage, in KeyOffsets order; threads past kBc
  // write unread copies to the second half rather than branch.
  unsigned key_bias[2][kThreads];
  // Each query row's row of the padded bias table, and the CTA's K and V. Read back
  // from here in every tile, the compiler cannot fold the 64-bit bases into each
  // address: one IMAD.WIDE.U32 per load instead of four instructions.
  RowBias<Tiles::kRowTiles> bias_rows[kWarps * 8];
  const T* kv_base[2];
  float row_shift[Tiles::kBr];  // scale * c_i
};

// K and V rows j0.. into one stage from the K and V of one (sample, head) at k_base
// and v_base; rows past N are zero-filled. Row offsets are 32-bit (the launcher
// checks N * s_n fits), one multiply-add per chunk rather than 64-bit arithmetic.
template <typename T, int kD>
__device__ __forceinline__ void load_kv_tile(const TmsaFwdParams& p, const T* k_base,
                                             const T* v_base, T* sk, T* sv, int j0) {
  constexpr int kS = smem_stride<kD>(), kChunks = kD / 8;
  const unsigned s_n = static_cast<unsigned>(p.s_n);
#pragma unroll
  for (int it = 0; it < FwdTiles<kD>::kChunkRounds; ++it) {
    const int idx = threadIdx.x + it * kThreads;
    const int row = idx / kChunks, chunk = idx % kChunks;
    const int j = j0 + row;
    const bool valid = j < p.N;
    const unsigned off = static_cast<unsigned>(valid ? j : 0) * s_n + chunk * 8;
    mma::cp_async_16(sk + row * kS + chunk * 8, k_base + off, valid ? 16 : 0);
    mma::cp_async_16(sv + row * kS + chunk * 8, v_base + off, valid ? 16 : 0);
  }
}

// The bias of query i and key j at grid positions (qy, qx) and (ky, kx) (token
// g = y Gw + x after the leading ones) is table[(qy - ky + Gh - 1) (2 Gw - 1) + (qx - kx + Gw - 1)],
// the sum of a per-query and a per-key term, so a tile needs one division per token
// rather than one per score. Both passes gather every score's bias unconditionally
// from the padded table of fwd_bias_table, [table (T = 2A + 1 entries) | T + 1 zeros |
// T + 1 masks], at query_bias_base(i) + key offset(j) (KeyCursor), with
// A = (Gh - 1)(2 Gw - 1) + Gw - 1 and
//   grid query: qy (2 Gw - 1) + qx, in [0, A];       leading query (or past N): 2A + 1;
//   grid key: A - ky (2 Gw - 1) - kx, in [0, A];     leading key: 2A + 1;   key past N: 4A + 3.
// Grid pairs land in the table, pairs with a leading token in the zeros
// [2A + 1, 4A + 2], keys past N in the masks [4A + 3, 6A + 4]: one load per score,
// no branch, and the offsets are never negative (unsigned 32-bit address arithmetic).
// Without a table every token counts as leading (A = 0).
template <typename Params>
__device__ __forceinline__ unsigned query_bias_base(const Params& p, int i) {
  const int g = i < p.bias_leading ? 0 : i - p.bias_leading, y = g / p.grid_w;
  const int base = y * (2 * p.grid_w - 1) + (g - y * p.grid_w);
  return i < p.bias_leading || i >= p.N ? 2 * p.bias_span + 1 : base;
}

// The table offset of key j = j0 + tid % kBc and of its successors j + kBc, j + 2 kBc, ...:
// the grid position g = j - L = y Gw + x (0 <= x < Gw; y < 0 for leading keys) is
// carried from tile to tile as x and lin = y (2 Gw - 1) + x, so the CTA divides by Gw
// once rather than every tile.
struct KeyCursor {
  int j, x, lin;

  template <typename Params>
  __device__ __forceinline__ KeyCursor(const Params& p, int j0) : j(j0) {
    const int g = j - p.bias_leading;
    const int y = (g >= 0 ? g : g - p.grid_w + 1) / p.grid_w;
    x = g - y * p.grid_w;
    lin = y * (2 * p.grid_w - 1) + x;
  }

  template <typename Params>
  __device__ __forceinline__ unsigned offset(const Params& p) const {
    return j >= p.N ? 4 * p.bias_span + 3 : j < p.bias_leading ? 2 * p.bias_span + 1
                                                              : p.bias_span - lin;
  }

  // kBc keys on: key_step_y rows and key_step_x columns, one row more when x wraps.
  __device__ __forceinline__ void advance(const TmsaFwdParams& p, int kBc) {
    j += kBc;
    x += p.key_step_x;
    const bool wrap = x >= p.grid_w;
    x -= wrap ? p.grid_w : 0;
    lin += p.key_step_lin + (wrap ? p.grid_w - 1 : 0);
  }
};

// The cursor's key offset into a stage's key_bias (threads past the tile width,
// whose cursors repeat the first kBc, store unread copies); then on to the next tile.
__device__ __forceinline__ void store_key_bias(KeyCursor& cursor, const TmsaFwdParams& p,
                                               unsigned* dst, int slot, int kBc) {
  dst[slot] = cursor.offset(p);
  cursor.advance(p, kBc);
}

// The kRows-row tile Q' = q + tq at rows q0.. of q (row stride s_n), rounded to T
// as the unfused sum would be, zeros past N; in 16-byte chunks (q's rows and tq are
// 16-byte aligned).
template <typename T, int kD, int kS, int kRows = 64>
__device__ __forceinline__ void load_q_time_tile(T* sq, const T* q, int64_t s_n, const T* tq,
                                                 int q0, int N, int tid) {
  struct alignas(16) Chunk {
    T v[8];
  };
  // Not unrolled: chosen for the old backward kernel, whose dK and dV accumulators were
  // live here (sm_90, kD = 64: 215 registers unrolled instead of 168). The backward now
  // gets Q' from tmsa_bwd_prep_kernel; whether the forward's prologue gains from
  // unrolling is unmeasured.
#pragma unroll 1
  for (int idx = tid; idx < kRows * (kD / 8); idx += kThreads) {
    const int row = idx / (kD / 8), d0 = idx % (kD / 8) * 8, i = q0 + row;
    Chunk c{};
    if (i < N) {
      c = *reinterpret_cast<const Chunk*>(q + i * s_n + d0);
      if (tq != nullptr) {
        const Chunk t = *reinterpret_cast<const Chunk*>(tq + d0);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          c.v[e] = static_cast<T>(static_cast<float>(c.v[e]) + static_cast<float>(t.v[e]));
        }
      }
    }
    *reinterpret_cast<Chunk*>(sq + row * kS + d0) = c;
  }
}

// c_i = q'_i . tk for the 16 rows row0.. of the tile at sq (two lanes a row), the
// term the folded time embedding adds to every score of row i; lanes 0-15 get row
// row0 + lane.
template <typename T, int kD, int kS>
__device__ __forceinline__ float row_time_dot(const T* sq, const T* tk, int row0, int lane) {
  const int row = row0 + (lane & 15), d0 = (lane >> 4) * (kD / 2);
  float c[2] = {0.f, 0.f};
  if (tk != nullptr) {
#pragma unroll 4
    for (int d = 0; d < kD / 2; ++d) {
      c[d & 1] += static_cast<float>(sq[row * kS + d0 + d]) * static_cast<float>(tk[d0 + d]);
    }
  }
  const float sum = c[0] + c[1];
  return sum + __shfl_xor_sync(0xffffffffu, sum, 16);
}

// C[m][16 x kD] += A[m][16 x 16] B[16 x kD] for kM row tiles m: A as mma fragments,
// B the 16 rows at b (row-major, stride kS) read transposed by ldmatrix once for all
// kM (P V-shaped products).
template <typename T, int kD, int kS, int kM>
__device__ __forceinline__ void frags_times_rows16(float (&c)[kM][kD / 8][4],
                                                   const uint32_t (&a)[kM][4], const T* b,
                                                   int lane) {
  constexpr int kDTiles = kD / 8;
  const int row = (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int dp = 0; dp < kDTiles / 2; ++dp) {
    uint32_t r[4];
    mma::ldmatrix_x4_trans(r, b + row * kS + dp * 16 + (lane >> 4) * 8);
    const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      mma::mma_16816<T>(c[m][2 * dp], a[m], b0);
      mma::mma_16816<T>(c[m][2 * dp + 1], a[m], b1);
    }
  }
  if constexpr (kDTiles % 2 == 1) {
    uint32_t r[2];
    mma::ldmatrix_x2_trans(r, b + (lane & 15) * kS + (kDTiles - 1) * 8);
#pragma unroll
    for (int m = 0; m < kM; ++m) mma::mma_16816<T>(c[m][kDTiles - 1], a[m], r);
  }
}

template <typename T, int kD, int kS>
__device__ __forceinline__ void frag_times_rows16(float (&c)[kD / 8][4], const uint32_t (&a)[4],
                                                  const T* b, int lane) {
  frags_times_rows16<T, kD, kS, 1>(reinterpret_cast<float (&)[1][kD / 8][4]>(c),
                                   reinterpret_cast<const uint32_t (&)[1][4]>(a), b, lane);
}

// S[m][16 x 8 kNTiles] += Q'[m] K^T for kM row tiles m of Q' held as register fragments
// (qf, and qf8 for the k8 tail of D = 72) and the kNTiles * 8 key rows at kt
// (row-major, stride kS), each K fragment read once for all kM.
template <typename T, int kD, int kS, int kM, int kNTiles>
__device__ __forceinline__ void frags_times_tile_t(float (&s)[kM][kNTiles][4],
                                                   const uint32_t (&qf)[kM][kD / 16][4],
                                                   const uint32_t (&qf8)[kM][2], const T* kt,
                                                   int lane) {
  constexpr int kK16 = kD / 16;
#pragma unroll
  for (int pair = 0; pair < kNTiles / 2; ++pair) {
    const int key = pair * 16 + (lane & 7) + ((lane >> 4) << 3);
#pragma unroll
    for (int ks = 0; ks < kK16; ++ks) {
      uint32_t r[4];
      mma::ldmatrix_x4(r, kt + key * kS + ks * 16 + ((lane >> 3) & 1) * 8);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma::mma_16816<T>(s[m][2 * pair], qf[m][ks], b0);
        mma::mma_16816<T>(s[m][2 * pair + 1], qf[m][ks], b1);
      }
    }
    if constexpr (kD % 16 == 8) {
      uint32_t r[2];
      mma::ldmatrix_x2(r, kt + (pair * 16 + (lane & 15)) * kS + kK16 * 16);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma::mma_1688<T>(s[m][2 * pair], qf8[m], r[0]);
        mma::mma_1688<T>(s[m][2 * pair + 1], qf8[m], r[1]);
      }
    }
  }
}

// Two adjacent n8 accumulator tiles (16 columns) as one k16 A fragment.
template <typename T>
__device__ __forceinline__ void tiles_as_fragment(uint32_t (&a)[4], const float (&lo)[4],
                                                  const float (&hi)[4]) {
  a[0] = mma::pack2<T>(lo[0], lo[1]);
  a[1] = mma::pack2<T>(lo[2], lo[3]);
  a[2] = mma::pack2<T>(hi[0], hi[1]);
  a[3] = mma::pack2<T>(hi[2], hi[3]);
}

// Online softmax in the exp2 domain over the rows a thread holds in kM row tiles of
// mma accumulators (rows lane / 4 and lane / 4 + 8 of each): the running max m of the
// unscaled scores and this thread's part l of the running sum (the quad's parts are
// added by finish()).
template <int kM>
struct OnlineSoftmax {
  float m[kM][2], l[kM][2];

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      m[i][0] = m[i][1] = -INFINITY;
      l[i][0] = l[i][1] = 0.f;
    }
  }

  // s: one key tile's unscaled scores, replaced by P = exp2(c (s - m_new)) with
  // c = scale * log2 e > 0 (so the max commutes with the scaling, and c s - c m is one
  // FFMA); the output accumulator o is rescaled by exp2(c (m_old - m_new)). Every row
  // has a finite score in the first tile (key 0), so m_new is finite and m_old = -inf
  // gives a factor of 0.
  template <int kNTiles, int kDTiles>
  __device__ __forceinline__ void update(float (&s)[kM][kNTiles][4], float (&o)[kM][kDTiles][4],
                                         float c) {
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      float mx[2] = {m[i][0], m[i][1]};
#pragma unroll
      for (int t = 0; t < kNTiles; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[i][t][e]);
      float cm[2];  // c m_new
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        cm[r] = mx[r] * c;
        const float corr = mma::ex2_approx(fmaf(m[i][r], c, -cm[r]));
        m[i][r] = mx[r];
        l[i][r] *= corr;
#pragma unroll
        for (int t = 0; t < kDTiles; ++t) {
          o[i][t][2 * r] *= corr;
          o[i][t][2 * r + 1] *= corr;
        }
      }
#pragma unroll
      for (int t = 0; t < kNTiles; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[i][t][e] = mma::ex2_approx(fmaf(s[i][t][e], c, -cm[e >> 1]));
          l[i][e >> 1] += s[i][t][e];
        }
    }
  }

  __device__ __forceinline__ void finish() {
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        l[i][r] += __shfl_xor_sync(0xffffffffu, l[i][r], 1);
        l[i][r] += __shfl_xor_sync(0xffffffffu, l[i][r], 2);
      }
  }
};

// The forward's epilogue for the rows a warp holds in kM row tiles of accumulators
// (rows row0 + 16 i + 8 r + lane / 4 of the CTA's tile at query q0):
// out = O / l + tv and lse = ln(sum exp S) + c_i (row_shift: scale * c_i per row).
template <typename T, int kD, int kM>
__device__ __forceinline__ void store_fwd_rows(const TmsaFwdParams& p,
                                               const float (&o)[kM][kD / 8][4],
                                               const OnlineSoftmax<kM>& softmax,
                                               const float* row_shift, int q0, int row0,
                                               const T* time, int64_t time_base, int lane) {
  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int64_t time_slot = static_cast<int64_t>(p.H) * kD;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kM; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 16 * i + 8 * r + (lane >> 2), qi = q0 + row;
      if (qi >= p.N) continue;
      const float inv = 1.f / softmax.l[i][r];
      T* orow = out + ((static_cast<int64_t>(b) * p.N + qi) * p.H + h) * kD;
#pragma unroll
      for (int t = 0; t < kD / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = t * 8 + (lane & 3) * 2 + e;
          float v = o[i][t][r * 2 + e] * inv;
          if (time != nullptr) v += static_cast<float>(time[time_base + 2 * time_slot + d]);
          orow[d] = static_cast<T>(v);
        }
      }
      if ((lane & 3) == 0) {
        const float lse = (softmax.m[i][r] * p.scale_log2 + log2f(softmax.l[i][r])) / kLog2e +
                          row_shift[row];
        p.lse[(static_cast<int64_t>(b) * p.H + h) * p.N + qi] = lse;
      }
    }
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 2) tmsa_fwd_kernel(const TmsaFwdParams p) {
  using Tiles = FwdTiles<kD>;
  constexpr int kM = Tiles::kRowTiles, kBr = Tiles::kBr, kBc = Tiles::kBc, kS = Tiles::kS;
  constexpr int kK16 = Tiles::kK16, kDTiles = Tiles::kDTiles, kNTiles = Tiles::kNTiles;
  DK_DYNAMIC_SMEM(16, smem_raw);
  auto& sm = *reinterpret_cast<FwdSharedStorage<T, kD>*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int q0 = blockIdx.x * kBr;
  const int row0 = warp * Tiles::kRowsPerWarp;  // this warp's first row of the tile
  const T* time = static_cast<const T*>(p.time_qkv);
  const int64_t time_base = (static_cast<int64_t>(b) * 3 * p.H + h) * kD;  // [b, 0, h, :]
  const int64_t time_slot = static_cast<int64_t>(p.H) * kD;
  const float* table = p.table + h * p.table_stride;

  const T* k_base = static_cast<const T*>(p.qkv) + b * p.s_b + h * p.s_h + p.s_3;
  const T* v_base = k_base + p.s_3;
  load_kv_tile<T, kD>(p, k_base, v_base, &sm.k[0][0][0], &sm.v[0][0][0], 0);
  mma::cp_async_commit();
  static_assert(2 * kBc / 8 == 16, "KeyOffsets holds a thread's 16 keys");
  KeyCursor keys(p, tid % kBc);
  const int key_slot = key_offsets_slot(tid % kBc) + (tid / kBc) * kBc;
  store_key_bias(keys, p, sm.key_bias[0], key_slot, kBc);
  for (int row = tid; row < kBr; row += kThreads) {
    const int w = row / Tiles::kRowsPerWarp, in_warp = row % Tiles::kRowsPerWarp;
    sm.bias_rows[w * 8 + in_warp % 8].row[in_warp / 16][(in_warp / 8) % 2] =
        table + query_bias_base(p, q0 + row);
  }
  if (tid == 0) {
    sm.kv_base[0] = k_base;
    sm.kv_base[1] = v_base;
  }
  load_q_time_tile<T, kD, kS, kBr>(&sm.q[0][0],
                                   static_cast<const T*>(p.qkv) + b * p.s_b + h * p.s_h, p.s_n,
                                   time != nullptr ? time + time_base : nullptr, q0, p.N, tid);
  __syncthreads();
  // scale * c_i = scale * (q_i + tq) . tk, added back to the log-sum-exp (see the
  // file comment). Each warp reads it back for its own rows only.
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    const float c = row_time_dot<T, kD, kS>(
        &sm.q[0][0], time != nullptr ? time + time_base + time_slot : nullptr, row0 + 16 * i,
        lane);
    if (lane < 16) sm.row_shift[row0 + 16 * i + lane] = c * p.scale;
  }

  float o[kM][kDTiles][4];
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int t = 0; t < kDTiles; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][t][e] = 0.f;
  OnlineSoftmax<kM> softmax;

  const int n_tiles = (p.N + kBc - 1) / kBc;
  for (int jt = 0; jt < n_tiles; ++jt) {
    const int stage = jt & 1;
    // One barrier a tile: past it, this tile's copies are visible and every warp is
    // done with the previous tile, so the next one can go into the other stage. Past
    // the last tile that fills zeros and "past N" offsets nobody reads: no branch.
    mma::cp_async_wait<0>();
    __syncthreads();
    load_kv_tile<T, kD>(p, sm.kv_base[0], sm.kv_base[1], &sm.k[stage ^ 1][0][0],
                        &sm.v[stage ^ 1][0][0], (jt + 1) * kBc);
    store_key_bias(keys, p, sm.key_bias[stage ^ 1], key_slot, kBc);
    mma::cp_async_commit();

    // S = bias / scale + Q' K^T: the bias (the padded table, stored divided by the
    // scale, masks keys past N) seeds the accumulators, so it needs no registers of
    // its own and no instruction to add it.
    const RowBias<kM> rows = sm.bias_rows[warp * 8 + (lane >> 2)];
    const KeyOffsets keys_of =
        *reinterpret_cast<const KeyOffsets*>(&sm.key_bias[stage][(lane & 3) * 16]);
    float s[kM][kNTiles][4];
#pragma unroll
    for (int t = 0; t < kNTiles; ++t)
#pragma unroll
      for (int i = 0; i < kM; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[i][t][e] = __ldg(rows.row[i][e >> 1] + keys_of.v[2 * t + (e & 1)]);
        }
    // Q' fragments, re-read in every tile: held across the loop they would take
    // 32-36 registers that the accumulators need (ptxas spilled at D = 64 and 72).
    uint32_t qf[kM][kK16][4];
    uint32_t qf8[kM][2];
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      const T* qrows = &sm.q[row0 + 16 * i + (lane & 15)][0];
#pragma unroll
      for (int ks = 0; ks < kK16; ++ks) {
        mma::ldmatrix_x4(qf[i][ks], qrows + ks * 16 + (lane >> 4) * 8);
      }
      if constexpr (Tiles::kTail8) mma::ldmatrix_x2(qf8[i], qrows + kK16 * 16);
    }
    frags_times_tile_t<T, kD, kS, kM, kNTiles>(s, qf, qf8, &sm.k[stage][0][0], lane);
    softmax.update(s, o, p.scale_log2);

    // O += P V: two adjacent S tiles form one k16 A fragment of P.
#pragma unroll
    for (int kb = 0; kb < kNTiles / 2; ++kb) {
      uint32_t pa[kM][4];
#pragma unroll
      for (int i = 0; i < kM; ++i) tiles_as_fragment<T>(pa[i], s[i][2 * kb], s[i][2 * kb + 1]);
      frags_times_rows16<T, kD, kS, kM>(o, pa, &sm.v[stage][kb * 16][0], lane);
    }
  }
  mma::cp_async_wait<0>();
  softmax.finish();
  store_fwd_rows<T, kD, kM>(p, o, softmax, sm.row_shift, q0, row0, time, time_base, lane);
}

// ---- Hopper path (sm_90a): wgmma ----
// The same algorithm as tmsa_fwd_kernel with warpgroup MMA: each warpgroup of a CTA
// owns 64 queries of one (sample, head), and the CTA streams tiles of K and V
// through two cp.async stages (Tiles: one warpgroup and 128-key tiles up to D = 64,
// two and 64-key tiles above). Q', K and V sit in shared memory as rows of 128-byte
// blocks (64 columns) with the 128-byte swizzle (cuda_wgmma.cuh), K and V in the same
// layout: K is the K-major B of S = Q' K^T (m64nBck16, A and B from shared memory), V
// the MN-major (transposed) B of O += P V (m64nDk16, P from registers). A warp's part
// of a wgmma accumulator is an mma.sync accumulator tile by tile, so the bias gather
// (seeded into S), OnlineSoftmax, the P fragments and the epilogue are the mma.sync
// kernel's. At D = 72, Q' K^T runs five k16 steps over Q' and K zero-padded to 80
// columns; P V needs no padding (N = 72).
namespace sm90 {
constexpr int kRow = wgmma::kRowBytes;

// Up to D = 64 a CTA is one warpgroup with 128-key tiles (m64n128k16 scores): each
// tile's fixed costs (barrier, copies, key offsets, descriptors) are spread over
// twice the tensor work of 64-key tiles, and the 64 x D stages of Q', K and V are
// small enough for two CTAs an SM. Above, where 128-key stages would leave one CTA
// an SM, two warpgroups share 64-key tiles.
template <int kD>
struct Tiles {
  static constexpr int kWarpgroups = kD <= 64 ? 1 : 2;
  static constexpr int kThreads = 128 * kWarpgroups, kWarps = 4 * kWarpgroups;
  static constexpr int kBr = 64 * kWarpgroups;            // queries per CTA
  static constexpr int kBc = kD <= 64 ? 2 * kFwdKeyTile : kFwdKeyTile;  // keys per stage
  static constexpr int kHalves = kBc / kFwdKeyTile;       // KeyCursor steps a tile
  static constexpr int kKSteps = (kD + 15) / 16;           // k16 steps of Q' K^T
  static constexpr int kBlocks = (kD + 63) / 64;           // 128-byte column blocks of a row
  static constexpr int kNTiles = kBc / 8, kDTiles = kD / 8;
  static constexpr int kMinBlocks = kD <= 72 ? 2 : 1;      // CTAs per SM the registers allow
};

// At a 1024-byte boundary of the shared window (wgmma::align_to_atom), so that every
// swizzled tile starts on one: their sizes are multiples of 1024 bytes. (Not
// alignas(1024): the emulator aligns the window address, not the host pointer.)
template <typename T, int kD>
struct alignas(16) SharedStorage {
  using Tl = Tiles<kD>;
  static_assert(Tl::kBr * kRow % wgmma::kAtomBytes == 0 && Tl::kBc * kRow % wgmma::kAtomBytes == 0);
  unsigned char q[Tl::kBlocks][Tl::kBr * kRow];     // Q' = q + tq
  unsigned char k[2][Tl::kBlocks][Tl::kBc * kRow];  // two pipeline stages of K and V
  unsigned char v[2][Tl::kBlocks][Tl::kBc * kRow];
  // Per stage and 64-key half, the key offsets in KeyOffsets order, as in
  // FwdSharedStorage (threads past the tile width store unread copies).
  unsigned key_bias[2][Tl::kHalves][Tl::kThreads / Tl::kBc * kFwdKeyTile];
  RowBias<1> bias_rows[Tl::kWarps * 8];
  const T* kv_base[2];
  float row_shift[Tl::kBr];  // scale * c_i
};

// The byte offset of column d of `row` in a tile of kRows swizzled rows per block.
template <int kRows>
__device__ __forceinline__ int sw128_offset(int row, int d) {
  return d / 64 * kRows * kRow + wgmma::swizzle128(row, d % 64 / 8) + d % 8 * 2;
}

// Column block kBlock of K and V rows j0.. into one stage (zeros past N), in 16-byte
// chunks: the ones the k16 steps read (2 kKSteps a row), those past D (D = 72:
// columns 72..79) zero-filled; first K's, then V's. A block holds 8, 4 or 2 chunks
// of a row and every head dim's block a whole number of rounds of the CTA's threads
// (D = 72: 2 x 64 x 8 = 4 x 256, then 2 x 64 x 2 = 256), so no thread needs a bounds
// check and rows and chunks come from shifts.
template <typename T, int kD, int kBlock>
__device__ __forceinline__ void load_kv_block(const TmsaFwdParams& p, const T* k_base,
                                              const T* v_base, unsigned char* sk,
                                              unsigned char* sv, int j0, int tid) {
  constexpr int kBc = Tiles<kD>::kBc, kThreads = Tiles<kD>::kThreads;
  constexpr int kChunks = 2 * Tiles<kD>::kKSteps - 8 * kBlock;
  constexpr int kRowChunks = kChunks < 8 ? kChunks : 8, kHalf = kBc * kRowChunks;
  static_assert(2 * kHalf % kThreads == 0, "whole rounds");
  const unsigned s_n = static_cast<unsigned>(p.s_n);
#pragma unroll
  for (int it = 0; it < 2 * kHalf / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    // V's chunks from kHalf on: known at compile time in every round but one at most.
    const bool is_v = (it + 1) * kThreads <= kHalf ? false
                      : it * kThreads >= kHalf     ? true
                                                   : idx >= kHalf;
    const int i = is_v ? idx - kHalf : idx;
    const int row = i / kRowChunks, d = 64 * kBlock + i % kRowChunks * 8, j = j0 + row;
    const bool valid = j < p.N && d < kD;
    const unsigned off = valid ? static_cast<unsigned>(j) * s_n + d : 0u;
    mma::cp_async_16((is_v ? sv : sk) + sw128_offset<kBc>(row, d), (is_v ? v_base : k_base) + off,
                     valid ? 16 : 0);
  }
}

template <typename T, int kD>
__device__ __forceinline__ void load_kv_tile(const TmsaFwdParams& p, const T* k_base,
                                             const T* v_base, unsigned char* sk,
                                             unsigned char* sv, int j0, int tid) {
  load_kv_block<T, kD, 0>(p, k_base, v_base, sk, sv, j0, tid);
  if constexpr (Tiles<kD>::kBlocks > 1) load_kv_block<T, kD, 1>(p, k_base, v_base, sk, sv, j0, tid);
}

// Q' = q + tq for the CTA's rows q0.. (rounded to T as the unfused sum would be;
// zeros past N and in the padding of D = 72).
template <typename T, int kD>
__device__ __forceinline__ void load_q_time(unsigned char* sq, const T* q, int64_t s_n,
                                            const T* tq, int q0, int N, int tid) {
  constexpr int kBr = Tiles<kD>::kBr, kChunks = 2 * Tiles<kD>::kKSteps;
  struct alignas(16) Chunk {
    T v[8];
  };
#pragma unroll 1
  for (int idx = tid; idx < kBr * kChunks; idx += Tiles<kD>::kThreads) {
    const int row = idx / kChunks, d0 = idx % kChunks * 8, i = q0 + row;
    Chunk c{};
    if (i < N && d0 < kD) {
      c = *reinterpret_cast<const Chunk*>(q + i * s_n + d0);
      if (tq != nullptr) {
        const Chunk t = *reinterpret_cast<const Chunk*>(tq + d0);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          c.v[e] = static_cast<T>(static_cast<float>(c.v[e]) + static_cast<float>(t.v[e]));
        }
      }
    }
    *reinterpret_cast<Chunk*>(sq + sw128_offset<kBr>(row, d0)) = c;
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<kD>::kThreads, Tiles<kD>::kMinBlocks)
    tmsa_fwd_wgmma_kernel(const TmsaFwdParams p) {
  using Tl = Tiles<kD>;
  constexpr int kBr = Tl::kBr, kBc = Tl::kBc, kNTiles = Tl::kNTiles, kDTiles = Tl::kDTiles;
  constexpr int kThreads = Tl::kThreads;
  static_assert(kThreads == 2 * kBr, "two threads a row for c_i");
  DK_DYNAMIC_SMEM(16, smem_raw);
  auto& sm = *reinterpret_cast<SharedStorage<T, kD>*>(wgmma::align_to_atom(smem_raw));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // The warpgroup, from a shuffle so that the compiler knows it is warp-uniform
  // (CUTLASS's canonical_warp_group_idx): fewer instructions for the descriptors.
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int q0 = blockIdx.x * kBr;
  const T* time = static_cast<const T*>(p.time_qkv);
  const int64_t time_base = (static_cast<int64_t>(b) * 3 * p.H + h) * kD;  // [b, 0, h, :]
  const float* table = p.table + h * p.table_stride;

  const T* q_base = static_cast<const T*>(p.qkv) + b * p.s_b + h * p.s_h;
  const T* k_base = q_base + p.s_3;
  const T* v_base = k_base + p.s_3;
  load_kv_tile<T, kD>(p, k_base, v_base, &sm.k[0][0][0], &sm.v[0][0][0], 0, tid);
  mma::cp_async_commit();
  // Thread tid carries the key offsets of key tid % kBc of every tile, in 64-key half
  // (tid % kBc) / 64 of its stage.
  KeyCursor keys(p, tid % kBc);
  const int key_half = tid % kBc / kFwdKeyTile;
  const int key_slot = key_offsets_slot(tid % kFwdKeyTile) + tid / kBc * kFwdKeyTile;
  auto store_keys = [&](int stage) {
    sm.key_bias[stage][key_half][key_slot] = keys.offset(p);
#pragma unroll
    for (int i = 0; i < Tl::kHalves; ++i) keys.advance(p, kFwdKeyTile);
  };
  store_keys(0);
  for (int row = tid; row < kBr; row += kThreads) {
    sm.bias_rows[row / 16 * 8 + row % 8].row[0][row / 8 % 2] = table + query_bias_base(p, q0 + row);
  }
  if (tid == 0) {
    sm.kv_base[0] = k_base;
    sm.kv_base[1] = v_base;
  }
  load_q_time<T, kD>(&sm.q[0][0], q_base, p.s_n, time != nullptr ? time + time_base : nullptr,
                     q0, p.N, tid);
  __syncthreads();
  {  // scale * c_i = scale * (q_i + tq) . tk (see the file comment), two threads a row
    const int row = tid >> 1, d0 = (tid & 1) * (kD / 2);
    float c = 0.f;
    if (time != nullptr) {
      const T* tk = time + time_base + static_cast<int64_t>(p.H) * kD;
#pragma unroll 4
      for (int d = d0; d < d0 + kD / 2; ++d) {
        c += static_cast<float>(*reinterpret_cast<const T*>(&sm.q[0][0] + sw128_offset<kBr>(row, d))) *
             static_cast<float>(tk[d]);
      }
    }
    c += __shfl_xor_sync(0xffffffffu, c, 1);
    if ((tid & 1) == 0) sm.row_shift[row] = c * p.scale;
  }

  float o[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
  auto& o_tiles = reinterpret_cast<float (&)[1][kDTiles][4]>(o);
  OnlineSoftmax<1> softmax;
  // The descriptors (low words) of k16 step 0 of this warpgroup's 64 rows of Q' and of
  // stage 0 of K and V; the other steps and stages only move the start address.
  const uint32_t q_desc = wgmma::desc_lo(wgmma::desc_sw128(&sm.q[0][wg * 64 * kRow], 0));
  const uint32_t k_desc = wgmma::desc_lo(wgmma::desc_sw128(&sm.k[0][0][0], 0));
  const uint32_t v_desc = wgmma::desc_lo(wgmma::desc_sw128_mn(&sm.v[0][0][0], kBc * kRow));
  constexpr int kStage = sizeof(sm.k[0]) / 16, kStep = wgmma::kStepBytes / 16;  // in the
  constexpr int kQBlock = kBr * kRow / 16, kKVBlock = kBc * kRow / 16;          // address field

  const int n_tiles = (p.N + kBc - 1) / kBc;
  for (int jt = 0; jt < n_tiles; ++jt) {
    const int stage = jt & 1;
    // As in tmsa_fwd_kernel: one barrier a tile, past which this tile's copies (and
    // stores, fenced for the async proxy) are visible and every warpgroup is done
    // with the other stage (its wgmma retired).
    mma::cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();
    load_kv_tile<T, kD>(p, sm.kv_base[0], sm.kv_base[1], &sm.k[stage ^ 1][0][0],
                        &sm.v[stage ^ 1][0][0], (jt + 1) * kBc, tid);
    store_keys(stage ^ 1);
    mma::cp_async_commit();

    // S = bias / scale + Q' K^T, the bias seeded into the accumulators.
    const RowBias<1> rows = sm.bias_rows[warp * 8 + (lane >> 2)];
    float s[kBc / 2];
    auto& s_tiles = reinterpret_cast<float (&)[1][kNTiles][4]>(s);
#pragma unroll
    for (int half = 0; half < Tl::kHalves; ++half) {
      const KeyOffsets keys_of =
          *reinterpret_cast<const KeyOffsets*>(&sm.key_bias[stage][half][(lane & 3) * 16]);
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[32 * half + 4 * t + e] = __ldg(rows.row[0][e >> 1] + keys_of.v[2 * t + (e & 1)]);
        }
    }
    wgmma::fence();
    wgmma::fence_operand(s);
#pragma unroll
    for (int ks = 0; ks < Tl::kKSteps; ++ks) {
      wgmma::mma_lo<T, kBc>(s, q_desc + ks / 4 * kQBlock + ks % 4 * kStep,
                            k_desc + stage * kStage + ks / 4 * kKVBlock + ks % 4 * kStep, 1);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(s);
    softmax.update(s_tiles, o_tiles, p.scale_log2);

    // O += P V: two adjacent S tiles form one k16 A fragment of P, V's 16 rows a k16 step.
    uint32_t pa[kNTiles / 2][4];
#pragma unroll
    for (int kb = 0; kb < kNTiles / 2; ++kb) {
      tiles_as_fragment<T>(pa[kb], s_tiles[0][2 * kb], s_tiles[0][2 * kb + 1]);
    }
    wgmma::fence();
    wgmma::fence_operand(o);
#pragma unroll
    for (int kb = 0; kb < kNTiles / 2; ++kb) {
      wgmma::mma_rs_mn<T, kD>(o, pa[kb], v_desc + stage * kStage + kb * 16 * kRow / 16, 1);
    }
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(o);
#pragma unroll
    for (int kb = 0; kb < kNTiles / 2; ++kb) wgmma::fence_operand(pa[kb]);
  }
  mma::cp_async_wait<0>();
  softmax.finish();
  store_fwd_rows<T, kD, 1>(p, o_tiles, softmax, sm.row_shift, q0, warp * 16, time, time_base, lane);
}

template <typename T, int kD>
void launch(const TmsaFwdParams& p, cudaStream_t stream) {
  using Tl = Tiles<kD>;
  auto kernel = tmsa_fwd_wgmma_kernel<T, kD>;
  constexpr int bytes = sizeof(SharedStorage<T, kD>) + wgmma::kAtomBytes;  // + alignment
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  const dim3 grid((p.N + Tl::kBr - 1) / Tl::kBr, p.B * p.H);
  DK_LAUNCH(kernel, grid, Tl::kThreads, bytes, stream)(p);
}
}  // namespace sm90

// ---------------------------------------------------------------------------
// Backward (fp16/bf16): a CTA owns 128 or 64 keys of one (sample, head), each warp
// 32 or 16 of them (BwdTiles), and walks all query tiles (64 queries, Q' and dO
// double-buffered through cp.async), recomputing P from the saved log-sum-exp:
//   S^T = K Q'^T (+ bias), P^T = exp(S^T - lse'), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta'), dK += dS^T Q', dQ += dS K, dtable[rel] += dS.
// With the time term folded as in the forward pass, raw K and V suffice:
// lse' = lse - scale * q'.tk, delta' = dO . (out - tv), and the tk term of dQ,
// tk * sum_j dS_ij, is zero because rows of dS sum to zero. Q' = q + tq (rounded as
// the forward rounds it), lse' (times log2 e) and delta' come from the launcher.
// The bias seeds the S^T accumulators from the forward's padded table
// (fwd_bias_table, query_bias_base + KeyCursor offsets): one load per score, no
// branch, and keys past N masked.
//
// dQ and the table gradient are sums over CTAs. They accumulate in fixed point with
// integer atomics, which are exact and so deterministic in any order; the
// power-of-two scales come from bounds on the sums (bwd_exponents), so
// they cannot overflow:
//   dQ: int64 in global memory (native 64-bit reductions), one per element and tile;
//   the table gradient: int32 in shared memory (native 32-bit shared atomics) over
//   the CTA's keys, then added once per CTA to the int64 [H, T] sums. A table entry
//   is one relative offset, and each key meets that offset in at most one query, so
//   a CTA of kBc keys adds at most kBc terms |dS| <= 2 max|dO| max|v| to an entry:
//   the scale keeps kBc such terms below 2^30. Pairs without a table entry (leading
//   tokens, keys past N) go to a spare slot past the table that nobody reads.
//   Where the table does not fit in shared memory (kSmemTable false) the same
//   int32 terms go straight to the int64 sums.
// ---------------------------------------------------------------------------

constexpr int kBwdQueries = 64;  // queries per pipeline stage

// Keys per CTA: each warp owns kKeyTiles 16-key row tiles. Two (128-key CTAs) halve
// the dQ atomics (each CTA adds one term per dQ element and query tile) and let each
// Q' and dO fragment a warp reads from shared memory feed two mmas; the launcher
// takes them where the accumulators fit in registers (D <= 72: dK and dV are 4 D
// registers a thread) and two such CTAs fit in an SM's shared memory (Hopper's
// 228 KB; not the A100's 164 KB, where 64-key CTAs keep two CTAs an SM).
constexpr int kMaxWideHeadDim = 72;
template <int kD>
constexpr int kMaxKeyTiles = kD <= kMaxWideHeadDim ? 2 : 1;

template <int kD, int kKeyTiles>
struct BwdTiles {
  static_assert(kKeyTiles >= 1 && kKeyTiles <= kMaxKeyTiles<kD>, "32 keys a warp up to D = 72");
  static constexpr int kWarpKeys = 16 * kKeyTiles;
  static constexpr int kBc = kWarps * kWarpKeys, kBr = kBwdQueries;
  static constexpr int kS = smem_stride<kD>();
  static constexpr int kDsS = kBr + 8;  // dS^T row stride: an odd number of 16-byte chunks
  static constexpr int kDTiles = kD / 8;
  // The scores are formed kSlice queries at a time: at D = 128 the dK and dV
  // accumulators take 128 registers (96 at D = 96; 4 D with two key tiles), and a
  // 64-query slice of S^T and dP^T 64 more (128 with two key tiles: 16-query slices
  // there above D = 32, where 32-query ones spill on sm_90a and sm_80).
  static constexpr int kSlice = kD >= 96 ? 32 : kKeyTiles == 1 ? 64 : kD > 32 ? 16 : 32;
  static constexpr int kSliceTiles = kSlice / 8;
  static constexpr int kSlices = kBr / kSlice;
  static constexpr int kDqParts = kD >= 96 ? 2 : 1;  // dQ column blocks (registers)
  static constexpr int kMinBlocks = 2;  // CTAs per SM the registers allow
  // Q' and dO tiles are copied in rounds of kRowStep rows, each thread one 16-byte
  // column chunk of one row, so its addresses step by a constant from round to round
  // (threads past kRowStep * kD / 8 idle). The last round may run into spare rows
  // past kBr that nobody reads (no bounds check).
  static constexpr int kRowStep = kThreads / (kD / 8);
  static constexpr int kRounds = (kBr + kRowStep - 1) / kRowStep;
  static constexpr int kStageRows = kRounds * kRowStep;
  // dO stages. At D = 128 with the table sums in shared memory one: the next tile's
  // dO is copied during this tile's dQ products (which do not read dO) rather than
  // during the whole tile, and the 17 KB saved let two CTAs share an H100 SM with a
  // bias table of up to ~4400 entries (a 32 x 32 grid's 3969). (With the sums in
  // global memory two CTAs fit anyway, and one stage would cost that kernel spills.)
  static constexpr int kDoutStages(bool smem_table) { return kD >= 128 && smem_table ? 1 : 2; }
};

constexpr int kRowTile = kBwdQueries;  // rows per prep CTA and per row-statistics tile

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Power-of-two exponents e with bound * 2^e <= 2^target, computed the same way by
// every kernel that needs them. |dS_ij| and sum_j |dS_ij| are at most 2 |dO_i| max_j
// |v_j|, so a dQ element is at most scale max|k| times that (an int64 sum below 2^62),
// and a CTA's partial sum of one table entry at most cta_keys (the main kernel's
// kBc) times that (int32 below 2^30). Rows of grad_out holding an Inf or NaN are left out of the bound: their
// (sample, head) comes out NaN anyway, and an infinite bound would coarsen the rest.
struct BwdExponents {
  int dq, table;
  bool nonfinite;
};

__device__ __forceinline__ int fixed_point_exponent(double bound, double target) {
  const double e = floor(target - log2(fmax(bound, 1e-30)));
  return static_cast<int>(fmin(fmax(e, -60.0), 100.0));
}

// The exponents of one (sample, head) from its row statistics, reduced by the whole
// block (kThreads threads; scratch: kWarps * 4 floats of shared memory).
__device__ BwdExponents bwd_exponents(const float* stats, int n_tiles, float scale,
                                      int cta_keys, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float m[4] = {0.f, 0.f, 0.f, 0.f};
  for (int t = threadIdx.x; t < n_tiles; t += kThreads) {
#pragma unroll
    for (int c = 0; c < 4; ++c) m[c] = fmaxf(m[c], stats[4 * t + c]);
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    m[c] = warp_max(m[c]);
    if (lane == 0) scratch[4 * warp + c] = m[c];
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    m[c] = scratch[c];
    for (int w = 1; w < kWarps; ++w) m[c] = fmaxf(m[c], scratch[4 * w + c]);
  }
  __syncthreads();  // scratch is free again
  const double ds = 2.0 * m[0] * m[1];
  return {fixed_point_exponent(ds * m[2] * scale, 62.0),
          fixed_point_exponent(ds * cta_keys, 30.0), m[3] > 0.f};
}

struct TmsaBwdParams {
  const void* qkv;         // [B, N, 3, H, D]: K and V read in place
  const void* q;           // Q' rows: q + tq ([B, N, H, D]) or q itself (in qkv)
  int64_t q_s_b, q_s_n, q_s_h;  // their strides
  const float* table;      // fwd_bias_table: [H or 1, table_stride]
  const void* grad_out;    // [B, N, H, D] contiguous
  const float* lse;        // [B, H, n_pad]: lse' times log2 e (0 past N)
  const float* delta;      // [B, H, n_pad]: dO . (out - tv) (0 past N)
  const float* row_stats;  // [B, H, n_tiles, 4] (tmsa_bwd_prep_kernel): the exponents
  unsigned long long* dq_acc;     // [B, H, n_pad, D] int64
  unsigned long long* table_acc;  // [B, H, table_size + 1] int64 (the last a spare), or null
  void* grad_qkv;          // [B, N, 3, H, D] contiguous (slots 1 and 2 written here)
  int64_t s_b, s_n, s_3, s_h;
  int B, N, H, n_pad, n_tiles;
  int grid_h, grid_w, num_leading, table_size;
  float scale, scale_log2;
  // The bias gather, as in TmsaFwdParams.
  int64_t table_stride;
  int bias_span, bias_leading;
};

template <typename T, int kD, bool kSmemTable, int kKeyTiles>
struct alignas(16) BwdSharedStorage {
  using Tiles = BwdTiles<kD, kKeyTiles>;
  static constexpr int kDoutStages = Tiles::kDoutStages(kSmemTable);
  T k[Tiles::kBc][Tiles::kS];
  T v[Tiles::kBc][Tiles::kS];
  T q[2][Tiles::kStageRows][Tiles::kS];     // two pipeline stages of Q', and dO's
  T dout[kDoutStages][Tiles::kStageRows][Tiles::kS];
  T ds[Tiles::kBc][Tiles::kDsS];            // dS^T, read transposed for dQ
  float lse[2][Tiles::kBr];
  float delta[2][Tiles::kBr];
  unsigned query_bias[2][Tiles::kBr];       // query_bias_base of each query
  // Q', dO, lse', delta', grad_qkv and the table sums of the (sample, head).
  const void* bases[6];
  float scratch[kWarps * 4];                // bwd_exponents
  // kSmemTable: int table_grad[table_size + 1] follows (the launcher adds its bytes).
};

// Q', lse', delta' and the query bias bases of queries q0.. into one stage, and dO
// (kDout; at D = 128 load_bwd_dout copies it separately); rows past N are zero-filled
// (lse' and delta' are zero there too: padded to n_pad; a stage past the last tile
// reads nothing).
template <typename T, int kD, bool kSmemTable, int kKT, bool kQ = true,
          bool kDout = BwdSharedStorage<T, kD, kSmemTable, kKT>::kDoutStages == 2>
__device__ __forceinline__ void load_bwd_stage(const TmsaBwdParams& p,
                                               BwdSharedStorage<T, kD, kSmemTable, kKT>& sm,
                                               int stage, int q0) {
  using Tiles = BwdTiles<kD, kKT>;
  constexpr int kDoutStages = BwdSharedStorage<T, kD, kSmemTable, kKT>::kDoutStages;
  constexpr int kChunks = kD / 8, kRowStep = Tiles::kRowStep;
  const int row = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
  if (row < kRowStep) {
    const T* q_base = static_cast<const T*>(sm.bases[0]);
    const T* dout_base = static_cast<const T*>(sm.bases[1]);
    // 32-bit offsets (the launcher checks they fit): one multiply-add an address.
    const unsigned q_s_n = static_cast<unsigned>(p.q_s_n), dout_s_n = p.H * kD;
    unsigned q_off = (q0 + row) * q_s_n + chunk * 8, dout_off = (q0 + row) * dout_s_n + chunk * 8;
    T* q_dst = &sm.q[stage][row][chunk * 8];
    T* dout_dst = &sm.dout[kDoutStages == 2 ? stage : 0][row][chunk * 8];
#pragma unroll
    for (int r = 0; r < Tiles::kRounds; ++r) {
      const bool valid = q0 + row + r * kRowStep < p.N;
      if constexpr (kQ) {
        mma::cp_async_16(q_dst + r * kRowStep * Tiles::kS, q_base + (valid ? q_off : 0),
                         valid ? 16 : 0);
      }
      if constexpr (kDout) {
        mma::cp_async_16(dout_dst + r * kRowStep * Tiles::kS, dout_base + (valid ? dout_off : 0),
                         valid ? 16 : 0);
      }
      q_off += kRowStep * q_s_n;
      dout_off += kRowStep * dout_s_n;
    }
  }
  if constexpr (!kQ) return;
  const int tid = threadIdx.x;
  const bool in_pad = q0 < p.n_pad;
  if (tid < 2 * (Tiles::kBr / 4)) {  // 16-byte chunks of lse' (16) and delta' (16)
    const int c = tid % (Tiles::kBr / 4);
    const float* src = static_cast<const float*>(sm.bases[tid < Tiles::kBr / 4 ? 2 : 3]) +
                       (in_pad ? q0 + 4 * c : 0);
    float* dst = (tid < Tiles::kBr / 4 ? sm.lse[stage] : sm.delta[stage]) + 4 * c;
    mma::cp_async_16(dst, src, in_pad ? 16 : 0);
  } else if (tid >= kThreads - Tiles::kBr) {
    const int row = tid - (kThreads - Tiles::kBr);
    sm.query_bias[stage][row] = query_bias_base(p, q0 + row);
  }
}

// C[m][16 x 8 kNTiles] = A[m][16 x kD] B[8 kNTiles x kD]^T for the kM 16-row tiles of
// A at a (consecutive rows), A and B row-major in shared memory (stride kS): K Q'^T-
// and V dO^T-shaped products, added to c; each B fragment read once for all kM.
template <typename T, int kD, int kS, int kM, int kNTiles>
__device__ __forceinline__ void rows_times_tile_t(float (&c)[kM][kNTiles][4], const T* a,
                                                  const T* b, int lane) {
  constexpr int kK16 = kD / 16;
#pragma unroll
  for (int ks = 0; ks < kK16; ++ks) {
    uint32_t af[kM][4];
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      mma::ldmatrix_x4(af[m], a + (m * 16 + (lane & 15)) * kS + ks * 16 + (lane >> 4) * 8);
    }
#pragma unroll
    for (int pair = 0; pair < kNTiles / 2; ++pair) {
      uint32_t r[4];
      mma::ldmatrix_x4(r, b + (pair * 16 + (lane & 7) + ((lane >> 4) << 3)) * kS + ks * 16 +
                              ((lane >> 3) & 1) * 8);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma::mma_16816<T>(c[m][2 * pair], af[m], b0);
        mma::mma_16816<T>(c[m][2 * pair + 1], af[m], b1);
      }
    }
  }
  if constexpr (kD % 16 == 8) {
    uint32_t af[kM][2];
#pragma unroll
    for (int m = 0; m < kM; ++m) mma::ldmatrix_x2(af[m], a + (m * 16 + (lane & 15)) * kS + kK16 * 16);
#pragma unroll
    for (int pair = 0; pair < kNTiles / 2; ++pair) {
      uint32_t r[2];
      mma::ldmatrix_x2(r, b + (pair * 16 + (lane & 15)) * kS + kK16 * 16);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma::mma_1688<T>(c[m][2 * pair], af[m], r[0]);
        mma::mma_1688<T>(c[m][2 * pair + 1], af[m], r[1]);
      }
    }
  }
}

template <typename T, int kD, bool kSmemTable, int kKT>
__global__ void __launch_bounds__(kThreads, BwdTiles<kD, kKT>::kMinBlocks)
    tmsa_bwd_kernel(const TmsaBwdParams p) {
  using Tiles = BwdTiles<kD, kKT>;
  constexpr int kS = Tiles::kS, kDTiles = Tiles::kDTiles, kWarpKeys = Tiles::kWarpKeys;
  constexpr int kBr = Tiles::kBr, kSlice = Tiles::kSlice, kSliceTiles = Tiles::kSliceTiles;
  DK_DYNAMIC_SMEM(16, smem_raw);
  using Storage = BwdSharedStorage<T, kD, kSmemTable, kKT>;
  static_assert(kKT == 1 || kSmemTable, "the 128-key kernel keeps its table sums in shared memory");
  auto& sm = *reinterpret_cast<Storage*>(smem_raw);
  int* const table_grad = reinterpret_cast<int*>(smem_raw + sizeof(Storage));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int k0 = blockIdx.x * Tiles::kBc;
  const bool has_table = p.table_acc != nullptr;
  const T* qkv = static_cast<const T*>(p.qkv) + b * p.s_b + h * p.s_h;
  // This head's int64 table sums (recomputed where used: a 64-bit pointer held across
  // the loop costs the D = 128 kernel a spill).
  const auto head_table_acc = [&p] {
    return p.table_acc + static_cast<int64_t>(blockIdx.y) * (p.table_size + 1);
  };
  // kGlobal: this head's first sum, an offset from p.table_acc (32 bits: the launcher
  // checks B H (T + 1) fits; a pointer would be one more register across the loop).
  const unsigned head_table_offset =
      static_cast<unsigned>(blockIdx.y) * static_cast<unsigned>(p.table_size + 1);
  // Fixed-point scales of this (sample, head): dQ's includes the softmax scale.
  const BwdExponents ex = bwd_exponents(p.row_stats + static_cast<int64_t>(bh) * p.n_tiles * 4,
                                        p.n_tiles, p.scale, Tiles::kBc, sm.scratch);
  const float dq_unit = ldexpf(p.scale, ex.dq);
  const float table_unit = ldexpf(1.f, ex.table);

  // K and V of this CTA (read in place), the first stage, the table's partial sums.
  for (int idx = tid; idx < Tiles::kBc * (kD / 8); idx += kThreads) {
    const int row = idx / (kD / 8), chunk = idx % (kD / 8), j = k0 + row;
    const bool valid = j < p.N;
    const T* src = qkv + (valid ? j : 0) * p.s_n + chunk * 8;
    mma::cp_async_16(&sm.k[row][chunk * 8], src + p.s_3, valid ? 16 : 0);
    mma::cp_async_16(&sm.v[row][chunk * 8], src + 2 * p.s_3, valid ? 16 : 0);
  }
  // The (sample, head)'s Q', dO, lse' and delta', read back from shared memory by
  // each load rather than held in registers across the loop (so too the epilogue's
  // bases: at D = 128 every register counts).
  if (tid == 0) {
    sm.bases[0] = static_cast<const T*>(p.q) + b * p.q_s_b + h * p.q_s_h;
    sm.bases[1] = static_cast<const T*>(p.grad_out) + static_cast<int64_t>(b) * p.N * p.H * kD +
                  h * kD;
    sm.bases[2] = p.lse + static_cast<int64_t>(bh) * p.n_pad;
    sm.bases[3] = p.delta + static_cast<int64_t>(bh) * p.n_pad;
    sm.bases[4] = static_cast<T*>(p.grad_qkv) + static_cast<int64_t>(b) * p.N * 3 * p.H * kD +
                  h * kD;
    sm.bases[5] = head_table_acc();
  }
  __syncthreads();
  load_bwd_stage<T, kD, kSmemTable, kKT>(p, sm, 0, 0);
  if constexpr (Storage::kDoutStages == 1) {
    load_bwd_stage<T, kD, kSmemTable, kKT, false, true>(p, sm, 0, 0);
  }
  mma::cp_async_commit();
  if (kSmemTable && has_table) {
    for (int i = tid; i <= p.table_size; i += kThreads) table_grad[i] = 0;
  }

  // This thread's 2 kKT keys (rows of S^T: rows lane / 4 and lane / 4 + 8 of each of
  // the warp's key tiles): their offsets into the padded bias table (and into the
  // gradient's table, where past the table means the spare slot).
  const float* head_table = mma::opaque(p.table + h * p.table_stride);
  unsigned key_off[kKT][2];
#pragma unroll
  for (int m = 0; m < kKT; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      key_off[m][r] = KeyCursor(p, k0 + warp * kWarpKeys + m * 16 + (lane >> 2) + 8 * r).offset(p);
    }
  const unsigned spare = static_cast<unsigned>(p.table_size);

  float dk[kKT][kDTiles][4], dv[kKT][kDTiles][4];
#pragma unroll
  for (int m = 0; m < kKT; ++m)
#pragma unroll
    for (int t = 0; t < kDTiles; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[m][t][e] = dv[m][t][e] = 0.f;

  // This thread's first dQ sum of the tile, an offset into the (sample, head)'s rows (32
  // bits: n_pad D fits, as the launcher checks; a pointer carried across the loop is one
  // more register through the score products, which cost the 128-key kernel spills on
  // sm_80 at D = 72).
  unsigned dq_off = (warp * 16 + (lane >> 2)) * kD + (lane & 3) * 2;
  // The loop runs on the tile's first query, compared with p.N as the kernel parameter
  // it is: a tile count would be one more register to hold (the D = 128 kernel spilled it).
  for (int q0 = 0; q0 < p.N; q0 += kBr, dq_off += kBr * kD) {
    const int stage = (q0 / kBr) & 1;
    // One barrier here: this tile's copies are visible, and every warp is done with
    // the other stage and with dS^T. The next tile goes into the other stage (past
    // the last tile: zeros nobody reads).
    mma::cp_async_wait<0>();
    __syncthreads();
    load_bwd_stage<T, kD, kSmemTable, kKT>(p, sm, stage ^ 1, q0 + kBr);
    mma::cp_async_commit();

#pragma unroll
    for (int sl = 0; sl < Tiles::kSlices; ++sl) {
      const int c0 = sl * kSlice;  // the slice's first query in the tile
      const T* sq = &sm.q[stage][c0][0];
      const T* sdo = &sm.dout[Storage::kDoutStages == 2 ? stage : 0][c0][0];
      // Per query column of this thread (8 t + 2 (lane % 4) + e), read where used (held
      // across the products they would cost registers): bias base, lse', delta'.
      const int col0 = c0 + (lane & 3) * 2;
      const auto bias_base = [&](int t) {
        return *reinterpret_cast<const uint2*>(&sm.query_bias[stage][col0 + t * 8]);
      };

      // S^T for this warp's keys, seeded with the bias (divided by the scale).
      float s[kKT][kSliceTiles][4];
#pragma unroll
      for (int t = 0; t < kSliceTiles; ++t) {
        const uint2 qb = bias_base(t);
#pragma unroll
        for (int m = 0; m < kKT; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[m][t][e] = __ldg(head_table + (key_off[m][e >> 1] + ((e & 1) ? qb.y : qb.x)));
          }
      }
      rows_times_tile_t<T, kD, kS, kKT, kSliceTiles>(s, &sm.k[warp * kWarpKeys][0], sq, lane);
      // P^T = exp2(scale log2 e S^T - lse').
#pragma unroll
      for (int t = 0; t < kSliceTiles; ++t) {
        const float2 lse = *reinterpret_cast<const float2*>(&sm.lse[stage][col0 + t * 8]);
#pragma unroll
        for (int m = 0; m < kKT; ++m)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[m][t][e] = mma::ex2_approx(fmaf(s[m][t][e], p.scale_log2, -((e & 1) ? lse.y : lse.x)));
          }
      }

      // dV += P^T dO (k = queries), and dP^T = V dO^T.
#pragma unroll
      for (int kb = 0; kb < kSliceTiles / 2; ++kb) {
        uint32_t pa[kKT][4];
#pragma unroll
        for (int m = 0; m < kKT; ++m) tiles_as_fragment<T>(pa[m], s[m][2 * kb], s[m][2 * kb + 1]);
        frags_times_rows16<T, kD, kS, kKT>(dv, pa, sdo + kb * 16 * kS, lane);
      }
      float dp[kKT][kSliceTiles][4];
#pragma unroll
      for (int m = 0; m < kKT; ++m)
#pragma unroll
        for (int t = 0; t < kSliceTiles; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[m][t][e] = 0.f;
      rows_times_tile_t<T, kD, kS, kKT, kSliceTiles>(dp, &sm.v[warp * kWarpKeys][0], sdo, lane);

      // dS^T = P^T (dP^T - delta'), into dp; to shared memory for dQ; the table
      // gradient, in fixed point (see above): terms of column tile t.
      const auto table_terms = [&](int m, int t) {
        const uint2 qb = bias_base(t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const unsigned idx = min(key_off[m][e >> 1] + ((e & 1) ? qb.y : qb.x), spare);
          const int v = __float2int_rn(dp[m][t][e] * table_unit);
          if constexpr (kSmemTable) {
            atomicAdd(table_grad + idx, v);
          } else {
            atomicAdd(p.table_acc + (head_table_offset + idx),
                      static_cast<unsigned long long>(static_cast<long long>(v)));
          }
        }
      };
#pragma unroll
      for (int t = 0; t < kSliceTiles; ++t) {
        const float2 delta = *reinterpret_cast<const float2*>(&sm.delta[stage][col0 + t * 8]);
#pragma unroll
        for (int m = 0; m < kKT; ++m) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            dp[m][t][e] = s[m][t][e] * (dp[m][t][e] - ((e & 1) ? delta.y : delta.x));
          }
          const int row = warp * kWarpKeys + m * 16 + (lane >> 2), col = col0 + t * 8;
          *reinterpret_cast<uint32_t*>(&sm.ds[row][col]) = mma::pack2<T>(dp[m][t][0], dp[m][t][1]);
          *reinterpret_cast<uint32_t*>(&sm.ds[row + 8][col]) = mma::pack2<T>(dp[m][t][2], dp[m][t][3]);
          // The global sums' terms as each tile is done (held for a later branch, they
          // would cost that variant spills on sm_80).
          if (!kSmemTable && has_table) table_terms(m, t);
        }
      }
      if (kSmemTable && has_table) {  // one uniform branch a slice
#pragma unroll
        for (int t = 0; t < kSliceTiles; ++t)
#pragma unroll
          for (int m = 0; m < kKT; ++m) table_terms(m, t);
      }

      // dK += dS^T Q' (k = queries).
#pragma unroll
      for (int kb = 0; kb < kSliceTiles / 2; ++kb) {
        uint32_t da[kKT][4];
#pragma unroll
        for (int m = 0; m < kKT; ++m) tiles_as_fragment<T>(da[m], dp[m][2 * kb], dp[m][2 * kb + 1]);
        frags_times_rows16<T, kD, kS, kKT>(dk, da, sq + kb * 16 * kS, lane);
      }
    }
    __syncthreads();
    if constexpr (Storage::kDoutStages == 1) {
      // Every warp is done with this tile's dO: the next tile's goes in its place, while
      // the dQ products below run (the next tile's first barrier waits for it).
      load_bwd_stage<T, kD, kSmemTable, kKT, false, true>(p, sm, 0, q0 + kBr);
      mma::cp_async_commit();
    }

    // dQ for this warp's 16 queries: dS (the dS^T tile read transposed) K, added to
    // the int64 sums (rows padded to n_pad: no bounds check); in kDqParts column
    // blocks, whose accumulators fit beside dK and dV.
    unsigned long long* const dq_rows =
        p.dq_acc + static_cast<int64_t>(blockIdx.y) * p.n_pad * kD + dq_off;
#pragma unroll
    for (int part = 0; part < Tiles::kDqParts; ++part) {
      constexpr int kDq = kD / Tiles::kDqParts;
      float dq[kDq / 8][4];
#pragma unroll
      for (int t = 0; t < kDq / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[t][e] = 0.f;
#pragma unroll
      for (int kb = 0; kb < Tiles::kBc / 16; ++kb) {
        uint32_t a[4];
        mma::ldmatrix_x4_trans(a, &sm.ds[kb * 16 + (lane & 7) + ((lane >> 4) << 3)]
                                        [warp * 16 + ((lane >> 3) & 1) * 8]);
        frag_times_rows16<T, kDq, kS>(dq, a, &sm.k[kb * 16][part * kDq], lane);
      }
#pragma unroll
      for (int t = 0; t < kDq / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          atomicAdd(dq_rows + (e >> 1) * 8 * kD + part * kDq + t * 8 + (e & 1),
                    static_cast<unsigned long long>(__float2ll_rn(dq[t][e] * dq_unit)));
        }
    }
  }
  mma::cp_async_wait<0>();

  // dK (scaled) and dV of this warp's keys into slots 1 and 2 of grad_qkv.
  T* gq = static_cast<T*>(const_cast<void*>(sm.bases[4]));
#pragma unroll
  for (int m = 0; m < kKT; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = blockIdx.x * Tiles::kBc + warp * kWarpKeys + m * 16 + (lane >> 2) + 8 * r;
      if (j >= p.N) continue;
      T* row = gq + static_cast<int64_t>(j) * 3 * p.H * kD;
#pragma unroll
      for (int t = 0; t < kDTiles; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = t * 8 + (lane & 3) * 2 + e;
          row[p.H * kD + d] = static_cast<T>(dk[m][t][r * 2 + e] * p.scale);
          row[2 * p.H * kD + d] = static_cast<T>(dv[m][t][r * 2 + e]);
        }
      }
    }
  if (kSmemTable && has_table) {
    __syncthreads();
    auto* table_acc = static_cast<unsigned long long*>(const_cast<void*>(sm.bases[5]));
    for (int i = tid; i < p.table_size; i += kThreads) {
      const int v = table_grad[i];
      if (v != 0) atomicAdd(table_acc + i, static_cast<unsigned long long>(static_cast<long long>(v)));
    }
  }
}

// The forward's bias table (see query_bias_base): [H, 3T + 2] fp32, the table divided
// by the scale (the kernel seeds unscaled scores with it), then T + 1 zeros, then
// T + 1 masks; without a table the one row [0, 0, 0, mask, mask] (T = 1, A = 0) that
// every head shares. A mask is finite, so the tensor cores add it like any bias, and so
// far below any score that its exponential is 0.
constexpr float kMaskedScore = -1e30f;

// Entry e of head h of that table (rel: the [T, H] table, or null for the shared row),
// as the forward's tmsa_fwd_table_kernel and the backward's prep kernel both write it:
// the same bits in both passes.
template <typename T>
__device__ __forceinline__ float padded_table_entry(const T* rel, int H, int table_size, int h,
                                                    int e, float scale) {
  const int t1 = rel != nullptr ? table_size : 1;
  float v = e < 2 * t1 + 1 ? 0.f : kMaskedScore;
  if (rel != nullptr && e < table_size) v = static_cast<float>(rel[static_cast<int64_t>(e) * H + h]) / scale;
  return v;
}

// The forward's padded table, [H, 3T + 2] (or [1, 5]), in one launch.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tmsa_fwd_table_kernel(const T* rel, float* table, int H, int table_size, int width,
                          int64_t total, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int h = static_cast<int>(i / width), e = static_cast<int>(i % width);
    table[i] = padded_table_entry(rel, H, table_size, h, e, scale);
  }
}

// ---------------------------------------------------------------------------
// The backward's two other launches. tmsa_bwd_prep_kernel reads each query row once
// and writes what the main kernel reads: Q' = q + tq (rounded as the forward pass
// rounds it), lse' (times log2 e) and delta' padded to n_pad rows, zeroed dQ sums, a
// contiguous copy of dO where grad_out is not one, the forward's padded bias table,
// zeroed table sums, and per 64-row tile the row statistics the fixed-point exponents
// come from. tmsa_bwd_finalize_kernel turns the fixed-point sums into dQ, grad_time
// and grad_table, in a fixed order (deterministic), and poisons the (sample, head)s
// whose grad_out holds an Inf or NaN.
// ---------------------------------------------------------------------------

struct TmsaBwdAuxParams {
  const void* qkv;  // packed [B, N, 3, H, D], unit stride along D
  int64_t s_b, s_n, s_3, s_h;
  const void* time_qkv;    // [B, 3, H, D] contiguous, or null
  const void* grad_out;    // [B, N, H, D], any strides
  int64_t g_s[4];
  const void* out;         // [B, N, H, D], any strides
  int64_t o_s[4];
  const float* lse;        // [B, H, N], any strides
  int64_t l_s[3];
  const void* rel_table;   // [T, H] contiguous, or null
  void* q_prime;           // [B, N, H, D] (with time_qkv), or null
  void* dout;              // [B, N, H, D]: the copy the main kernel reads, or null
  float* lse2;             // [B, H, n_pad]
  float* delta;            // [B, H, n_pad]
  unsigned long long* dq_acc;     // [B, H, n_pad, D]
  unsigned long long* table_acc;  // [B, H, T + 1], or null
  float* bias_table;       // fwd_bias_table's layout: [H, 3T + 2], or [1, 5] without a table
  float* row_stats;        // [B, H, n_tiles, 4]: max |dO_i| (finite rows), max |v_j|, max |k|, any non-finite dO
  void* grad_qkv;          // [B, N, 3, H, D] contiguous (finalize)
  void* grad_time;         // [B, 3, H, D] (finalize), or null
  void* grad_table;        // [T, H] (finalize), or null
  int B, N, H, D, n_pad, n_tiles, table_size, table_chunks;
  int cta_keys;            // the main kernel's keys per CTA (its table sums' bound)
  float scale;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) tmsa_bwd_prep_kernel(const TmsaBwdAuxParams p) {
  __shared__ float scratch[kWarps][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const T* qkv = static_cast<const T*>(p.qkv) + b * p.s_b + h * p.s_h;
  const T* time = static_cast<const T*>(p.time_qkv);
  const int64_t time_base = (static_cast<int64_t>(b) * 3 * p.H + h) * p.D, time_slot = p.H * p.D;
  const T* g = static_cast<const T*>(p.grad_out) + b * p.g_s[0] + h * p.g_s[2];
  const T* o = static_cast<const T*>(p.out) + b * p.o_s[0] + h * p.o_s[2];

  float g_max = 0.f, v_max = 0.f, k_max = 0.f, bad = 0.f;
  for (int r = warp; r < kRowTile; r += kWarps) {
    const int i = tile * kRowTile + r;
    const int64_t row = static_cast<int64_t>(bh) * p.n_pad + i;
    for (int d = lane; d < p.D; d += 32) p.dq_acc[row * p.D + d] = 0ull;
    if (i >= p.N) {
      if (lane == 0) p.lse2[row] = p.delta[row] = 0.f;
      continue;
    }
    const T* qrow = qkv + i * p.s_n;
    const int64_t dst = ((static_cast<int64_t>(b) * p.N + i) * p.H + h) * p.D;
    float c = 0.f, dlt = 0.f, g2 = 0.f, v2 = 0.f;
    bool finite = true;
    for (int d = lane; d < p.D; d += 32) {
      const float k = static_cast<float>(qrow[p.s_3 + d]), v = static_cast<float>(qrow[2 * p.s_3 + d]);
      k_max = fmaxf(k_max, fabsf(k));
      v2 += v * v;
      if (time != nullptr) {
        const T q = static_cast<T>(static_cast<float>(qrow[d]) +
                                   static_cast<float>(time[time_base + d]));
        static_cast<T*>(p.q_prime)[dst + d] = q;
        c += static_cast<float>(q) * static_cast<float>(time[time_base + time_slot + d]);
      }
      const T gv = g[i * p.g_s[1] + d * p.g_s[3]];
      const float gf = static_cast<float>(gv);
      float of = static_cast<float>(o[i * p.o_s[1] + d * p.o_s[3]]);
      if (time != nullptr) of -= static_cast<float>(time[time_base + 2 * time_slot + d]);
      dlt += gf * of;
      g2 += gf * gf;
      finite = finite && fabsf(gf) <= FLT_MAX;  // false for Inf and NaN
      if (p.dout != nullptr) static_cast<T*>(p.dout)[dst + d] = gv;
    }
    c = warp_sum(c);
    dlt = warp_sum(dlt);
    g2 = warp_sum(g2);
    v2 = warp_sum(v2);
    finite = warp_max(finite ? 0.f : 1.f) == 0.f;
    if (lane == 0) {
      const float lse = p.lse[b * p.l_s[0] + h * p.l_s[1] + i * p.l_s[2]];
      p.lse2[row] = (lse - c * p.scale) * kLog2e;
      p.delta[row] = dlt;
    }
    if (finite) g_max = fmaxf(g_max, sqrtf(g2));
    bad = finite ? bad : 1.f;
    v_max = fmaxf(v_max, sqrtf(v2));
  }
  const float m[4] = {g_max, v_max, warp_max(k_max), bad};
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < 4; ++c) scratch[warp][c] = m[c];
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    float v = scratch[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) v = fmaxf(v, scratch[w][threadIdx.x]);
    p.row_stats[(static_cast<int64_t>(bh) * p.n_tiles + tile) * 4 + threadIdx.x] = v;
  }

  // This CTA's share of the zeroed table sums (of its (sample, head)) and, in sample 0,
  // of the padded bias table of its head (fwd_bias_table).
  const int T_ = p.table_size;
  if (p.table_acc != nullptr) {
    const int per = (T_ + 1 + p.n_tiles - 1) / p.n_tiles;
    for (int e = tile * per + threadIdx.x; e < min((tile + 1) * per, T_ + 1); e += kThreads) {
      p.table_acc[static_cast<int64_t>(bh) * (T_ + 1) + e] = 0ull;
    }
  }
  if (b == 0) {
    const int width = p.rel_table != nullptr ? 3 * T_ + 2 : 5;
    if (p.rel_table == nullptr && h != 0) return;
    const int per = (width + p.n_tiles - 1) / p.n_tiles;
    const T* rel = static_cast<const T*>(p.rel_table);
    for (int e = tile * per + threadIdx.x; e < min((tile + 1) * per, width); e += kThreads) {
      p.bias_table[static_cast<int64_t>(h) * width + e] =
          padded_table_entry(rel, p.H, T_, h, e, p.scale);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tmsa_bwd_finalize_kernel(const TmsaBwdAuxParams p) {
  __shared__ float scratch[kWarps * 4];
  __shared__ float table_units[kThreads];
  __shared__ bool table_bad[kThreads];
  const int nbh = p.B * p.H;
  if (static_cast<int>(blockIdx.x) < nbh) {
    // dQ of one (sample, head) into slot 0 of grad_qkv, the sums over tokens of all
    // three slots into grad_time; NaN throughout where its grad_out was not finite.
    // Thread (r, d) takes feature d of rows r, r + rows, ...; the rows' partial sums
    // are added in a fixed order.
    __shared__ float partial[3][kThreads];
    const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
    const BwdExponents ex = bwd_exponents(p.row_stats + static_cast<int64_t>(bh) * p.n_tiles * 4,
                                          p.n_tiles, p.scale, p.cta_keys, scratch);
    const double unit = ldexp(1.0, -ex.dq);
    const int rows = kThreads / p.D, d = threadIdx.x % p.D, r0 = threadIdx.x / p.D;
    const int64_t slot_stride = static_cast<int64_t>(p.H) * p.D;
    T* gq = static_cast<T*>(p.grad_qkv) + static_cast<int64_t>(b) * p.N * 3 * slot_stride +
            h * p.D + d;
    const unsigned long long* acc = p.dq_acc + static_cast<int64_t>(bh) * p.n_pad * p.D + d;
    float sums[3] = {0.f, 0.f, 0.f};
    if (r0 < rows) {
      for (int i = r0; i < p.N; i += rows) {
        T* row = gq + static_cast<int64_t>(i) * 3 * slot_stride;
        const T dq = static_cast<T>(
            static_cast<double>(static_cast<long long>(acc[static_cast<int64_t>(i) * p.D])) * unit);
        row[0] = ex.nonfinite ? static_cast<T>(NAN) : dq;
        sums[0] += static_cast<float>(row[0]);
#pragma unroll
        for (int s = 1; s < 3; ++s) {
          if (ex.nonfinite) row[s * slot_stride] = static_cast<T>(NAN);
          sums[s] += static_cast<float>(row[s * slot_stride]);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < 3; ++s) partial[s][threadIdx.x] = sums[s];
    __syncthreads();
    if (p.grad_time != nullptr && static_cast<int>(threadIdx.x) < p.D) {
      for (int s = 0; s < 3; ++s) {
        float total = 0.f;
        for (int r = 0; r < rows; ++r) total += partial[s][r * p.D + threadIdx.x];
        static_cast<T*>(p.grad_time)[((static_cast<int64_t>(b) * 3 + s) * p.H + h) * p.D +
                                     threadIdx.x] = static_cast<T>(total);
      }
    }
    return;
  }
  // grad_table[t, h] = sum over samples b of the sums of (b, h), in the order of b; NaN
  // where any sample's grad_out in head h was not finite.
  const int c = blockIdx.x - nbh, h = c / p.table_chunks;
  const int t = (c % p.table_chunks) * kThreads + threadIdx.x;
  double sum = 0.0;
  bool bad = false;
  for (int b0 = 0; b0 < p.B; b0 += kThreads) {
    for (int b = b0; b < min(b0 + kThreads, p.B); ++b) {
      const BwdExponents ex = bwd_exponents(
          p.row_stats + (static_cast<int64_t>(b) * p.H + h) * p.n_tiles * 4, p.n_tiles, p.scale,
          p.cta_keys, scratch);
      if (threadIdx.x == 0) {
        table_units[b - b0] = static_cast<float>(ldexp(1.0, -ex.table));
        table_bad[b - b0] = ex.nonfinite;
      }
    }
    __syncthreads();
    for (int b = b0; b < min(b0 + kThreads, p.B); ++b) {
      if (t < p.table_size) {
        const long long v = static_cast<long long>(
            p.table_acc[(static_cast<int64_t>(b) * p.H + h) * (p.table_size + 1) + t]);
        sum += static_cast<double>(v) * table_units[b - b0];
      }
      bad = bad || table_bad[b - b0];
    }
    __syncthreads();
  }
  if (t < p.table_size) {
    static_cast<T*>(p.grad_table)[static_cast<int64_t>(t) * p.H + h] =
        static_cast<T>(bad ? NAN : sum);
  }
}

// The packed projection with 16-byte aligned rows for cp.async (a contiguous copy
// otherwise).
at::Tensor aligned_qkv(const tmsa::Args& a) {
  const at::Tensor& t = a.qkv;
  const bool aligned = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0 &&
                       t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
                       t.stride(3) % 8 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The fields the forward and backward parameter structs share.
template <typename Params>
void fill_layout(Params& p, const tmsa::Args& a, const at::Tensor& packed,
                 const at::Tensor& table) {
  TORCH_CHECK(a.B * a.H <= 65535 && a.N < (1 << 30), "tmsa: B * H = ", a.B * a.H, " or N = ",
              a.N, " exceeds the CUDA grid limits of the fused kernels");
  p.qkv = packed.data_ptr();
  p.table = table.data_ptr<float>();
  p.s_b = packed.stride(0);
  p.s_n = packed.stride(1);
  p.s_3 = packed.stride(2);
  p.s_h = packed.stride(3);
  p.B = static_cast<int>(a.B);
  p.N = static_cast<int>(a.N);
  p.H = static_cast<int>(a.H);
  p.grid_h = static_cast<int>(a.grid_h);
  p.grid_w = static_cast<int>(std::max<int64_t>(a.grid_w, 1));
  p.num_leading = static_cast<int>(a.num_leading);
  p.table_size = a.rel_table ? static_cast<int>(a.rel_table->size(0)) : 0;
  p.scale = static_cast<float>(a.scale);
  p.scale_log2 = p.scale * kLog2e;
  // The bias gather from fwd_bias_table (query_bias_base, KeyCursor).
  p.table_stride = a.rel_table ? table.size(1) : 0;
  p.bias_span = a.rel_table ? (p.grid_h - 1) * (2 * p.grid_w - 1) + p.grid_w - 1 : 0;
  p.bias_leading = a.rel_table ? p.num_leading : p.N;
}

tmsa::Args check_cuda(const char* op, const at::Tensor& qkv,
                      const std::optional<at::Tensor>& time_qkv,
                      const std::optional<at::Tensor>& rel_table, int64_t grid_h, int64_t grid_w,
                      int64_t num_leading, double scale) {
  auto a = tmsa::check(kCuda, op, qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale);
  TORCH_CHECK(a.D == 32 || a.D == 64 || a.D == 72 || a.D == 96 || a.D == 128, op, ": head dim ",
              a.D, " is not supported on CUDA (supported: 32, 64, 72, 96, 128); qkv has shape ",
              shape_str(qkv));
  return a;
}

// The forward's bias table (see kMaskedScore).

at::Tensor fwd_bias_table(const tmsa::Args& a, cudaStream_t stream) {
  const int64_t T = a.rel_table ? a.rel_table->size(0) : 1, width = 3 * T + 2;
  at::Tensor t = at::empty({a.rel_table ? a.H : 1, width}, a.qkv.options().dtype(at::kFloat));
  const int64_t total = t.numel();
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1024));
  DK_DISPATCH_CUDA_HALFS(a.qkv.scalar_type(), "tmsa", [&] {
    DK_LAUNCH(tmsa_fwd_table_kernel<scalar_t>, blocks, kThreads, 0, stream)(
        a.rel_table ? a.rel_table->data_ptr<scalar_t>() : nullptr, t.data_ptr<float>(),
        static_cast<int>(a.H), a.rel_table ? static_cast<int>(T) : 0, static_cast<int>(width),
        total, static_cast<float>(a.scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return t;
}

// The fused forward seeds unscaled scores with bias / scale and takes row maxima before
// scaling, so it needs a positive scale of moderate size (any sane softmax scale), and
// it addresses K and V rows with 32-bit offsets; anything else takes the blocked path.
bool fused_forward_supports(const tmsa::Args& a, const at::Tensor& packed) {
  return a.scale >= 1e-20 && a.scale <= 1e20 &&
         (a.N + 1) * packed.stride(1) < (int64_t{1} << 32);
}

template <typename T, int kD>
void launch_forward(const TmsaFwdParams& p, cudaStream_t stream) {
  auto kernel = tmsa_fwd_kernel<T, kD>;
  constexpr int bytes = sizeof(FwdSharedStorage<T, kD>);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
  constexpr int kBr = FwdTiles<kD>::kBr;
  const dim3 grid((p.N + kBr - 1) / kBr, p.B * p.H);
  DK_LAUNCH(kernel, grid, kThreads, bytes, stream)(p);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& qkv,
                                                const std::optional<at::Tensor>& time_qkv,
                                                const std::optional<at::Tensor>& rel_table,
                                                int64_t grid_h, int64_t grid_w,
                                                int64_t num_leading, double scale) {
  const char* op = "tmsa";
  auto a = check_cuda(op, qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale);
  const c10::cuda::CUDAGuard guard(qkv.device());
  if (qkv.scalar_type() == at::kFloat) return tmsa::forward_blocked(a);
  const at::Tensor packed = aligned_qkv(a);
  if (!fused_forward_supports(a, packed)) return tmsa::forward_blocked(a);

  const at::Tensor time = a.time_qkv ? aligned_rows(*a.time_qkv) : at::Tensor();
  at::Tensor out = at::empty({a.B, a.N, a.H, a.D}, qkv.options());
  at::Tensor lse = at::empty({a.B, a.H, a.N}, qkv.options().dtype(at::kFloat));
  if (a.B * a.N == 0) return {out, lse};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor table = fwd_bias_table(a, stream);

  TmsaFwdParams p;
  fill_layout(p, a, packed, table);
  p.time_qkv = time.defined() ? time.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.key_step_x = kFwdKeyTile % p.grid_w;
  p.key_step_lin = kFwdKeyTile / p.grid_w * (2 * p.grid_w - 1) + p.key_step_x;

  const bool hopper = wgmma::use_wgmma();  // sm90::tmsa_fwd_wgmma_kernel on 9.x devices
  DK_DISPATCH_CUDA_HALFS(qkv.scalar_type(), op, [&] {
    DK_HEAD_DIM_SWITCH(a.D, kD, [&] {
      if (hopper) {
        sm90::launch<scalar_t, kD>(p, stream);
      } else {
        launch_forward<scalar_t, kD>(p, stream);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

template <typename T, int kD, bool kSmemTable, int kKT>
void launch_backward(const TmsaBwdParams& p, size_t bytes, cudaStream_t stream) {
  auto kernel = tmsa_bwd_kernel<T, kD, kSmemTable, kKT>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  constexpr int kBc = BwdTiles<kD, kKT>::kBc;
  const dim3 grid((p.N + kBc - 1) / kBc, p.B * p.H);
  DK_LAUNCH(kernel, grid, kThreads, bytes, stream)(p);
}

// The main backward kernel's configuration: key tiles a warp (BwdTiles), where the
// table sums go, and its dynamic shared memory.
struct BwdConfig {
  int key_tiles;
  bool smem_table;
  size_t bytes;
};

// DITKERNELS_TMSA_BWD_KEYS: 64 or 128 keys per backward CTA by hand (tests and
// benchmarks run both); 0 where unset. Read at every call.
int bwd_keys_override(const char* op) {
  const char* env = std::getenv("DITKERNELS_TMSA_BWD_KEYS");
  if (env == nullptr || env[0] == '\0') return 0;
  const std::string v(env);
  TORCH_CHECK(v == "64" || v == "128", op, ": DITKERNELS_TMSA_BWD_KEYS must be 64 or 128, got '",
              v, "'");
  return std::stoi(v);
}

// 128-key CTAs (two key tiles a warp: half the dQ atomics) where the head dim allows
// them, the table's int32 partial sums fit in shared memory beside them (or there is
// no table) and two such CTAs fit in an SM; else 64-key ones, with the table sums in
// shared memory where they fit, else added to global memory
// (DITKERNELS_TMSA_TABLE_IN_GLOBAL=1 picks that by hand: the same integer terms, so the
// same bits). The 128-key kernel has no global-sums variant: at D = 64 it would spill,
// and only tables of tens of thousands of entries need one.
BwdConfig pick_backward_config(const char* op, const tmsa::Args& a) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t limit = prop->sharedMemPerBlockOptin;
  const size_t table_bytes = a.rel_table ? sizeof(int) * (a.rel_table->size(0) + 1) : 0;
  const char* force_global = std::getenv("DITKERNELS_TMSA_TABLE_IN_GLOBAL");
  const bool global_by_hand = force_global != nullptr && std::string(force_global) == "1";
  const auto config = [&](int key_tiles) {
    const auto [smem_bytes, global_bytes] = DK_HEAD_DIM_SWITCH(a.D, kD, [&] {
      constexpr int kWide = kMaxKeyTiles<kD>;
      return key_tiles == 2
                 ? std::pair<size_t, size_t>(sizeof(BwdSharedStorage<c10::Half, kD, true, kWide>),
                                             sizeof(BwdSharedStorage<c10::Half, kD, false, kWide>))
                 : std::pair<size_t, size_t>(sizeof(BwdSharedStorage<c10::Half, kD, true, 1>),
                                             sizeof(BwdSharedStorage<c10::Half, kD, false, 1>));
    });
    const bool smem_table = smem_bytes + table_bytes <= limit && !global_by_hand;
    return BwdConfig{key_tiles, smem_table, smem_table ? smem_bytes + table_bytes : global_bytes};
  };
  const int keys = bwd_keys_override(op);
  const bool wide_head = DK_HEAD_DIM_SWITCH(a.D, kD, [] { return kMaxKeyTiles<kD> == 2; });
  if (wide_head && keys != 64) {
    const BwdConfig wide = config(2);
    const size_t per_cta = wide.bytes + prop->reservedSharedMemPerBlock;
    if (keys == 128) {
      TORCH_CHECK(wide.smem_table, op, ": DITKERNELS_TMSA_BWD_KEYS=128 needs the table sums in "
                  "shared memory, but DITKERNELS_TMSA_TABLE_IN_GLOBAL=1 is set or a table of ",
                  (a.rel_table ? a.rel_table->size(0) : 0), " entries does not fit beside the "
                  "128-key tiles in the device's ", limit, " bytes");
      return wide;
    }
    if (wide.smem_table && 2 * per_cta <= prop->sharedMemPerMultiprocessor) return wide;
  }
  TORCH_CHECK(keys != 128 || wide_head, op, ": DITKERNELS_TMSA_BWD_KEYS=128 needs a head dim of "
              "at most ", kMaxWideHeadDim, " (the dK and dV accumulators of 32 keys a warp); qkv "
              "has head dim ", a.D);
  return config(1);
}

template <typename T>
void launch_backward_aux(const TmsaBwdAuxParams& x, bool finalize, cudaStream_t stream) {
  if (finalize) {
    const dim3 grid(x.B * x.H + x.H * x.table_chunks);
    DK_LAUNCH(tmsa_bwd_finalize_kernel<T>, grid, kThreads, 0, stream)(x);
  } else {
    const dim3 grid(x.n_tiles, x.B * x.H);
    DK_LAUNCH(tmsa_bwd_prep_kernel<T>, grid, kThreads, 0, stream)(x);
  }
}

// Three launches for contiguous inputs: tmsa_bwd_prep_kernel, tmsa_bwd_kernel,
// tmsa_bwd_finalize_kernel (see their comments); no synchronisation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& qkv, const std::optional<at::Tensor>& time_qkv,
    const std::optional<at::Tensor>& rel_table, const at::Tensor& out, const at::Tensor& lse,
    int64_t grid_h, int64_t grid_w, int64_t num_leading, double scale) {
  const char* op = "tmsa_backward";
  auto a = check_cuda(op, qkv, time_qkv, rel_table, grid_h, grid_w, num_leading, scale);
  tmsa::check_backward_tensors(op, a, grad_out, out, lse);
  const c10::cuda::CUDAGuard guard(qkv.device());
  if (qkv.scalar_type() == at::kFloat) return tmsa::backward_blocked(a, grad_out, out, lse);
  const NoAutocast no_autocast;

  const at::Tensor packed = aligned_qkv(a);
  // Past the device's shared-memory limit, the blocked path.
  const BwdConfig cfg = pick_backward_config(op, a);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  // The kernel addresses Q' and dO rows of one sample, and (global variant) the table
  // sums of all heads, with 32-bit offsets.
  const int64_t table_sums = a.rel_table ? a.rel_table->size(0) + 1 : 1;
  const bool offsets_fit =
      (a.N + kBwdQueries) * std::max<int64_t>(packed.stride(1), a.H * a.D) < (int64_t{1} << 32) &&
      a.B * a.H * table_sums < (int64_t{1} << 32);
  if (!fused_forward_supports(a, packed) || !offsets_fit || cfg.bytes > limit) {
    return tmsa::backward_blocked(a, grad_out, out, lse);
  }
  const auto opts = qkv.options();
  at::Tensor grad_qkv = at::empty({a.B, a.N, 3, a.H, a.D}, opts);
  if (a.B * a.N == 0) {
    grad_qkv.zero_();
    return {grad_qkv, a.time_qkv ? at::zeros_like(*a.time_qkv) : at::empty({0}, opts),
            a.rel_table ? at::zeros_like(*a.rel_table) : at::empty({0}, opts)};
  }
  const at::Tensor time = a.time_qkv ? aligned_rows(*a.time_qkv) : at::Tensor();
  const int64_t n_tiles = (a.N + kBwdQueries - 1) / kBwdQueries, n_pad = n_tiles * kBwdQueries;
  const int64_t T = a.rel_table ? a.rel_table->size(0) : 0;
  const auto f32 = opts.dtype(at::kFloat), i64 = opts.dtype(at::kLong);
  // The main kernel reads dO with cp.async: grad_out itself where it is contiguous and
  // 16-byte aligned (its rows are: D is a multiple of 8), else the prep kernel's copy.
  const bool dout_in_place =
      grad_out.is_contiguous() && reinterpret_cast<std::uintptr_t>(grad_out.data_ptr()) % 16 == 0;
  const at::Tensor dout = dout_in_place ? grad_out : at::empty({a.B, a.N, a.H, a.D}, opts);
  const at::Tensor q_prime = a.time_qkv ? at::empty({a.B, a.N, a.H, a.D}, opts) : at::Tensor();
  const at::Tensor lse2 = at::empty({a.B, a.H, n_pad}, f32), delta = at::empty_like(lse2);
  const at::Tensor dq_acc = at::empty({a.B, a.H, n_pad, a.D}, i64);
  const at::Tensor table_acc = a.rel_table ? at::empty({a.B, a.H, T + 1}, i64) : at::Tensor();
  const at::Tensor bias_table =
      a.rel_table ? at::empty({a.H, 3 * T + 2}, f32) : at::empty({1, 5}, f32);
  const at::Tensor row_stats = at::empty({a.B, a.H, n_tiles, 4}, f32);
  at::Tensor grad_time = a.time_qkv ? at::empty({a.B, 3, a.H, a.D}, opts) : at::empty({0}, opts);
  at::Tensor grad_table = a.rel_table ? at::empty({T, a.H}, opts) : at::empty({0}, opts);

  TmsaBwdAuxParams x;
  x.qkv = packed.data_ptr();
  x.s_b = packed.stride(0);
  x.s_n = packed.stride(1);
  x.s_3 = packed.stride(2);
  x.s_h = packed.stride(3);
  x.time_qkv = time.defined() ? time.data_ptr() : nullptr;
  x.grad_out = grad_out.data_ptr();
  x.out = out.data_ptr();
  for (int d = 0; d < 4; ++d) {
    x.g_s[d] = grad_out.stride(d);
    x.o_s[d] = out.stride(d);
  }
  x.lse = lse.data_ptr<float>();
  for (int d = 0; d < 3; ++d) x.l_s[d] = lse.stride(d);
  x.rel_table = a.rel_table ? a.rel_table->data_ptr() : nullptr;
  x.q_prime = q_prime.defined() ? q_prime.data_ptr() : nullptr;
  x.dout = dout_in_place ? nullptr : dout.data_ptr();
  x.lse2 = lse2.data_ptr<float>();
  x.delta = delta.data_ptr<float>();
  x.dq_acc = reinterpret_cast<unsigned long long*>(dq_acc.data_ptr<int64_t>());
  x.table_acc = table_acc.defined()
                    ? reinterpret_cast<unsigned long long*>(table_acc.data_ptr<int64_t>())
                    : nullptr;
  x.bias_table = bias_table.data_ptr<float>();
  x.row_stats = row_stats.data_ptr<float>();
  x.grad_qkv = grad_qkv.data_ptr();
  x.grad_time = a.time_qkv ? grad_time.data_ptr() : nullptr;
  x.grad_table = a.rel_table ? grad_table.data_ptr() : nullptr;
  x.B = static_cast<int>(a.B);
  x.N = static_cast<int>(a.N);
  x.H = static_cast<int>(a.H);
  x.D = static_cast<int>(a.D);
  x.n_pad = static_cast<int>(n_pad);
  x.n_tiles = static_cast<int>(n_tiles);
  x.table_size = static_cast<int>(T);
  x.table_chunks = static_cast<int>((T + kThreads - 1) / kThreads);
  x.cta_keys = BwdTiles<64, 1>::kBc * cfg.key_tiles;
  x.scale = static_cast<float>(a.scale);

  TmsaBwdParams p;
  fill_layout(p, a, packed, bias_table);
  const at::Tensor q = a.time_qkv ? q_prime : packed.select(2, 0);  // Q' rows
  p.q = q.data_ptr();
  p.q_s_b = q.stride(0);
  p.q_s_n = q.stride(1);
  p.q_s_h = q.stride(2);
  p.grad_out = dout.data_ptr();
  p.lse = x.lse2;
  p.delta = x.delta;
  p.row_stats = x.row_stats;
  p.dq_acc = x.dq_acc;
  p.table_acc = x.table_acc;
  p.grad_qkv = x.grad_qkv;
  p.n_pad = x.n_pad;
  p.n_tiles = x.n_tiles;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DK_DISPATCH_CUDA_HALFS(qkv.scalar_type(), op, [&] {
    launch_backward_aux<scalar_t>(x, false, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    DK_HEAD_DIM_SWITCH(a.D, kD, [&] {
      if (cfg.key_tiles == 2) {
        launch_backward<scalar_t, kD, true, kMaxKeyTiles<kD>>(p, cfg.bytes, stream);
      } else if (cfg.smem_table) {
        launch_backward<scalar_t, kD, true, 1>(p, cfg.bytes, stream);
      } else {
        launch_backward<scalar_t, kD, false, 1>(p, cfg.bytes, stream);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_backward_aux<scalar_t>(x, true, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_qkv, grad_time, grad_table};
}

}  // namespace
}  // namespace ditkernels

DK_TORCH_LIBRARY_IMPL_CUDA(m) {
  m.impl("tmsa", &ditkernels::forward_cuda);
  m.impl("tmsa_backward", &ditkernels::backward_cuda);
}
