#pragma once
// TMSA, DiffiT's time-dependent multi-head self-attention with a Swin-style
// relative position bias looked up in a small learned table:
//   q_i = qkv[b, i, 0, h] + time_qkv[b, 0, h]     (k, v likewise with slots 1, 2)
//   S_ij = scale * q_i . k_j + table[rel(i, j), h]  (no bias if i or j is a leading token)
//   out_i = softmax_j(S_ij) v_j,  lse_i = log sum_j exp(S_ij)
// with rel(i, j) = (y_i - y_j + Gh - 1) * (2 Gw - 1) + (x_i - x_j + Gw - 1) for grid
// tokens t >= L at (y, x) = divmod(t - L, Gw).
//
// This header holds the argument checks and a blocked implementation written with
// ATen ops: queries are processed in blocks whose [B, H, block, N] scores are
// bounded in size, so memory stays linear in N up to the block size. It is the CPU
// kernel (BLAS) and the CUDA float32 path; the fused fp16/bf16 CUDA kernels live in
// csrc/cuda/tmsa.cu.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "ditkernels/backend.h"
#include "ditkernels/checks.h"

namespace ditkernels {
namespace tmsa {

struct Args {
  at::Tensor qkv;                       // [B, N, 3, H, D], unit stride along D
  std::optional<at::Tensor> time_qkv;   // [B, 3, H, D]
  std::optional<at::Tensor> rel_table;  // [T, H]
  int64_t B = 0, N = 0, H = 0, D = 0;
  int64_t grid_h = 0, grid_w = 0, num_leading = 0;
  double scale = 1.0;
};

inline at::ScalarType compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Args check(const Backend& be, const char* op, const at::Tensor& qkv,
                  const std::optional<at::Tensor>& time_qkv,
                  const std::optional<at::Tensor>& rel_table, int64_t grid_h, int64_t grid_w,
                  int64_t num_leading, double scale) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, op,
              ": qkv must have shape [B, N, 3, H, D], got ", shape_str(qkv));
  check_backend_dtype(be, op, qkv, "qkv");
  Args a;
  a.B = qkv.size(0);
  a.N = qkv.size(1);
  a.H = qkv.size(3);
  a.D = qkv.size(4);
  TORCH_CHECK(a.H >= 1 && a.D >= 1, op, ": qkv must have at least one head and one feature, got ",
              shape_str(qkv));
  a.qkv = qkv.stride(4) == 1 ? qkv : qkv.contiguous();
  if (time_qkv.has_value()) {
    check_same_device(op, *time_qkv, "time_qkv", qkv, "qkv");
    check_same_dtype(op, *time_qkv, "time_qkv", qkv, "qkv");
    TORCH_CHECK(time_qkv->sizes() == at::IntArrayRef({a.B, 3, a.H, a.D}), op,
                ": time_qkv must have shape [B, 3, H, D] = [", a.B, ", 3, ", a.H, ", ", a.D,
                "], got ", shape_str(*time_qkv));
    a.time_qkv = time_qkv->contiguous();
  }
  TORCH_CHECK(num_leading >= 0, op, ": num_leading must be >= 0, got ", num_leading);
  if (rel_table.has_value()) {
    check_same_device(op, *rel_table, "rel_table", qkv, "qkv");
    check_same_dtype(op, *rel_table, "rel_table", qkv, "qkv");
    TORCH_CHECK(grid_h >= 1 && grid_w >= 1, op, ": grid_h and grid_w must be >= 1, got ",
                grid_h, " x ", grid_w);
    // Bounded by N first, so that the products below cannot overflow int64.
    TORCH_CHECK(grid_h <= a.N && grid_w <= a.N && num_leading <= a.N, op, ": a ", grid_h,
                " x ", grid_w, " grid after ", num_leading, " leading tokens does not fit N = ",
                a.N, " tokens (qkv of shape ", shape_str(qkv), ")");
    const int64_t T = (2 * grid_h - 1) * (2 * grid_w - 1);
    TORCH_CHECK(rel_table->dim() == 2 && rel_table->size(0) == T && rel_table->size(1) == a.H,
                op, ": rel_table must have shape [(2*Gh-1)*(2*Gw-1), H] = [", T, ", ", a.H,
                "] for a ", grid_h, " x ", grid_w, " grid, got ", shape_str(*rel_table));
    TORCH_CHECK(a.N == num_leading + grid_h * grid_w, op, ": N = ", a.N,
                " tokens do not match num_leading (", num_leading, ") + grid ", grid_h, " x ",
                grid_w, " = ", num_leading + grid_h * grid_w, "; qkv has shape ", shape_str(qkv));
    a.rel_table = rel_table->contiguous();
  }
  a.grid_h = grid_h;
  a.grid_w = grid_w;
  a.num_leading = num_leading;
  a.scale = scale;
  return a;
}

inline void check_backward_tensors(const char* op, const Args& a, const at::Tensor& grad_out,
                                   const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{a.B, a.N, a.H, a.D};
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                                std::pair<const at::Tensor&, const char*>{out, "out"}}) {
    check_same_device(op, t, name, a.qkv, "qkv");
    check_same_dtype(op, t, name, a.qkv, "qkv");
    TORCH_CHECK(t.sizes() == at::IntArrayRef(out_shape), op, ": ", name, " must have shape [B, N, H, D] = ",
                at::IntArrayRef(out_shape), ", got ", shape_str(t));
  }
  check_same_device(op, lse, "lse", a.qkv, "qkv");
  TORCH_CHECK(lse.scalar_type() == compute_dtype(a.qkv), op, ": lse must have dtype ",
              compute_dtype(a.qkv), " for qkv of dtype ", a.qkv.scalar_type(), ", got ",
              lse.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({a.B, a.H, a.N}), op,
              ": lse must have shape [B, H, N] = [", a.B, ", ", a.H, ", ", a.N, "], got ",
              shape_str(lse));
}

// Table column per (query i in [i0, i0 + rows), key j) as int64 [rows, N]; leading
// tokens map to T, an appended zero column.
inline at::Tensor relative_index(const Args& a, int64_t i0, int64_t rows) {
  auto opts = a.qkv.options().dtype(at::kLong);
  const int64_t T = (2 * a.grid_h - 1) * (2 * a.grid_w - 1);
  at::Tensor t = at::arange(a.N, opts);
  at::Tensor grid = (t - a.num_leading).clamp_min(0);
  at::Tensor y = grid.div(a.grid_w, "floor"), x = grid.remainder(a.grid_w);
  at::Tensor yi = y.narrow(0, i0, rows).unsqueeze(1), xi = x.narrow(0, i0, rows).unsqueeze(1);
  at::Tensor idx = (yi - y.unsqueeze(0) + a.grid_h - 1) * (2 * a.grid_w - 1) +
                   (xi - x.unsqueeze(0) + a.grid_w - 1);
  at::Tensor leading = t < a.num_leading;
  at::Tensor no_bias = leading.narrow(0, i0, rows).unsqueeze(1).logical_or(leading.unsqueeze(0));
  return idx.masked_fill(no_bias, T);
}

// q, k or v with the time term, as [B, H, N, D] in the compute dtype.
inline at::Tensor projected(const Args& a, int64_t slot) {
  at::Tensor t = a.qkv.select(2, slot).to(compute_dtype(a.qkv));
  if (a.time_qkv) t = t + a.time_qkv->select(1, slot).unsqueeze(1).to(t.scalar_type());
  return t.permute({0, 2, 1, 3});
}

// The table with a zero column appended, [H, T + 1] in the compute dtype.
inline at::Tensor extended_table(const Args& a) {
  at::Tensor tt = a.rel_table->t().to(compute_dtype(a.qkv));
  return at::cat({tt, at::zeros({a.H, 1}, tt.options())}, 1);
}

inline int64_t block_rows(const Args& a) {
  const int64_t budget = int64_t{1} << 24;  // scores per block
  return std::max<int64_t>(1, std::min<int64_t>(a.N, budget / std::max<int64_t>(1, a.B * a.H * a.N)));
}

// Scores of queries [i0, i0 + rows) against all keys: [B, H, rows, N].
inline at::Tensor block_scores(const Args& a, const at::Tensor& q, const at::Tensor& k,
                               const std::optional<at::Tensor>& table_ext, int64_t i0,
                               int64_t rows) {
  at::Tensor s = at::matmul(q.narrow(2, i0, rows), k.transpose(-2, -1)).mul_(a.scale);
  if (table_ext) {
    at::Tensor idx = relative_index(a, i0, rows);
    s.add_(table_ext->index_select(1, idx.flatten()).view({1, a.H, rows, a.N}));
  }
  return s;
}

// (out [B, N, H, D] in the input dtype, lse [B, H, N] in fp32, or fp64 for fp64 input).
inline std::tuple<at::Tensor, at::Tensor> forward_blocked(const Args& a) {
  const NoAutocast no_autocast;
  at::Tensor out = at::empty({a.B, a.N, a.H, a.D}, a.qkv.options());
  at::Tensor lse = at::empty({a.B, a.H, a.N}, a.qkv.options().dtype(compute_dtype(a.qkv)));
  if (a.B * a.N == 0) return {out, lse};
  const at::Tensor q = projected(a, 0), k = projected(a, 1), v = projected(a, 2);
  std::optional<at::Tensor> table_ext;
  if (a.rel_table) table_ext = extended_table(a);
  const int64_t rows = block_rows(a);
  for (int64_t i0 = 0; i0 < a.N; i0 += rows) {
    const int64_t r = std::min(rows, a.N - i0);
    at::Tensor s = block_scores(a, q, k, table_ext, i0, r);
    at::Tensor l = at::logsumexp(s, -1);
    at::Tensor o = at::matmul(s.sub_(l.unsqueeze(-1)).exp_(), v);
    out.narrow(1, i0, r).copy_(o.permute({0, 2, 1, 3}));
    lse.narrow(2, i0, r).copy_(l);
  }
  return {out, lse};
}

// The rule for a non-finite grad_out, the same on every backend: when grad_out[b, :, h]
// holds an Inf or NaN, every gradient of (sample b, head h) is NaN: grad_qkv[b, :, :, h],
// hence grad_time_qkv[b, :, h], and the table column h (given as [H, T'] with H first,
// or undefined). The fused CUDA backward accumulates in fixed point, which cannot carry
// an Inf; eager attention would give an Inf or NaN in most of these entries too.
inline void poison_nonfinite_heads(const at::Tensor& grad_out, at::Tensor& grad_qkv,
                                   const at::Tensor& table_by_head) {
  const at::Tensor bad = grad_out.isfinite().logical_not().any(3).any(1);  // [B, H]
  grad_qkv.masked_fill_(bad.view({bad.size(0), 1, 1, bad.size(1), 1}), NAN);
  if (table_by_head.defined()) table_by_head.masked_fill_(bad.any(0).unsqueeze(1), NAN);
}

// (grad_qkv [B, N, 3, H, D], grad_time_qkv [B, 3, H, D] or [0], grad_table [T, H] or [0]).
// Every reduction runs in a fixed order: sums over the batch and token blocks are
// ordinary reductions, and the table scatter uses index_put_ with accumulation,
// which is deterministic on CPU and CUDA.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_blocked(
    const Args& a, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse) {
  const NoAutocast no_autocast;
  const auto cdt = compute_dtype(a.qkv);
  at::Tensor grad_qkv = at::empty({a.B, a.N, 3, a.H, a.D}, a.qkv.options());
  at::Tensor dq = at::empty({a.B, a.H, a.N, a.D}, a.qkv.options().dtype(cdt));
  at::Tensor dk = at::zeros_like(dq), dv = at::zeros_like(dq);
  std::optional<at::Tensor> table_ext, dtable_ext;
  if (a.rel_table) {
    table_ext = extended_table(a);
    dtable_ext = at::zeros_like(*table_ext);
  }
  if (a.B * a.N > 0) {
    const at::Tensor q = projected(a, 0), k = projected(a, 1), v = projected(a, 2);
    const at::Tensor dO = grad_out.to(cdt).permute({0, 2, 1, 3});
    const at::Tensor delta = (dO * out.to(cdt).permute({0, 2, 1, 3})).sum(-1);  // [B, H, N]
    const int64_t rows = block_rows(a);
    for (int64_t i0 = 0; i0 < a.N; i0 += rows) {
      const int64_t r = std::min(rows, a.N - i0);
      at::Tensor p = block_scores(a, q, k, table_ext, i0, r)
                         .sub_(lse.narrow(2, i0, r).to(cdt).unsqueeze(-1))
                         .exp_();
      at::Tensor dO_blk = dO.narrow(2, i0, r);
      dv.add_(at::matmul(p.transpose(-2, -1), dO_blk));
      at::Tensor ds = at::matmul(dO_blk, v.transpose(-2, -1))
                          .sub_(delta.narrow(2, i0, r).unsqueeze(-1))
                          .mul_(p);
      dq.narrow(2, i0, r).copy_(at::matmul(ds, k).mul_(a.scale));
      dk.add_(at::matmul(ds.transpose(-2, -1), q.narrow(2, i0, r)).mul_(a.scale));
      if (dtable_ext) {
        at::Tensor idx = relative_index(a, i0, r).flatten();
        at::Tensor ds_h = ds.sum(0).reshape({a.H, r * a.N});
        at::Tensor head = at::arange(a.H, idx.options()).unsqueeze(1).expand({a.H, r * a.N});
        dtable_ext->index_put_({head, idx.unsqueeze(0).expand({a.H, r * a.N})}, ds_h,
                               /*accumulate=*/true);
      }
    }
  }
  at::Tensor grads[3] = {dq, dk, dv};
  for (int64_t s = 0; s < 3; ++s) grad_qkv.select(2, s).copy_(grads[s].permute({0, 2, 1, 3}));
  poison_nonfinite_heads(grad_out, grad_qkv, dtable_ext ? *dtable_ext : at::Tensor());
  at::Tensor grad_time = a.time_qkv ? grad_qkv.sum(1) : at::empty({0}, a.qkv.options());
  at::Tensor grad_table =
      dtable_ext ? dtable_ext->narrow(1, 0, dtable_ext->size(1) - 1).t().contiguous().to(
                       a.qkv.scalar_type())
                 : at::empty({0}, a.qkv.options());
  return {grad_qkv, grad_time, grad_table};
}

}  // namespace tmsa
}  // namespace ditkernels
