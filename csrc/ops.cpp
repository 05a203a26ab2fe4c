// Every ditkernels schema, defined once. Backends register implementations in
// csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu; autograd and fake (meta)
// implementations live in ditkernels/ops.py.

#include "ditkernels/library.h"

DK_TORCH_LIBRARY(m) {
  // ---- fused adaLN family (csrc/include/ditkernels/adaln.h) ----
  // y = LayerNorm(x; weight, bias) * (1 + scale[:, None]) + shift[:, None]
  m.def(
      "ln_modulate(Tensor x, Tensor? shift, Tensor? scale, float eps=1e-06, "
      "Tensor? weight=None, Tensor? bias=None) -> Tensor");
  // x_out = x + gate[:, None] * h;  y = ln_modulate(x_out, ...)
  m.def(
      "gated_residual_ln_modulate(Tensor x, Tensor h, Tensor? gate, Tensor? shift, "
      "Tensor? scale, float eps=1e-06, Tensor? weight=None, Tensor? bias=None) "
      "-> (Tensor x_out, Tensor y)");
  // Gradients of every tensor input; those of absent inputs are empty tensors.
  m.def(
      "ln_modulate_backward(Tensor grad_y, Tensor x, Tensor? shift, Tensor? scale, "
      "float eps, Tensor? weight, Tensor? bias) "
      "-> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "gated_residual_ln_modulate_backward(Tensor? grad_x_out, Tensor grad_y, Tensor x_out, "
      "Tensor h, Tensor? gate, Tensor? shift, Tensor? scale, float eps, Tensor? weight, "
      "Tensor? bias) "
      "-> (Tensor grad_x, Tensor grad_h, Tensor grad_gate, Tensor grad_shift, "
      "Tensor grad_scale, Tensor grad_weight, Tensor grad_bias)");

  // ---- skip-concat-linear (csrc/include/ditkernels/skip_concat_linear.h) ----
  // y = cat([x, skip], -1) @ weight^T + bias, without building the concat.
  // x, skip: [..., D]; weight: [Dout, 2 * D]; bias: [Dout] or None -> y: [..., Dout]
  m.def("skip_concat_linear(Tensor x, Tensor skip, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def(
      "skip_concat_linear_backward(Tensor grad_y, Tensor x, Tensor skip, Tensor weight, "
      "bool has_bias) -> (Tensor grad_x, Tensor grad_skip, Tensor grad_weight, "
      "Tensor grad_bias)");

  // ---- TMSA: time-dependent attention with a relative-position-bias table
  //      (csrc/include/ditkernels/tmsa.h) ----
  // qkv: [B, N, 3, H, D]; time_qkv: [B, 3, H, D] or None; rel_table: [(2Gh-1)(2Gw-1), H]
  // or None; N = num_leading + Gh * Gw when a table is given.
  // Returns out [B, N, H, D] and the softmax log-sum-exp [B, H, N] (fp32; fp64 for fp64).
  m.def(
      "tmsa(Tensor qkv, Tensor? time_qkv, Tensor? rel_table, int grid_h, int grid_w, "
      "int num_leading, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "tmsa_backward(Tensor grad_out, Tensor qkv, Tensor? time_qkv, Tensor? rel_table, Tensor out, "
      "Tensor lse, int grid_h, int grid_w, int num_leading, float scale) "
      "-> (Tensor grad_qkv, Tensor grad_time_qkv, Tensor grad_rel_table)");

  // ---- timestep-calibrated int8 (csrc/include/ditkernels/int8.h) ----
  // Activations quantized per sample with act_scales[t[b]]; weights per output channel.
  m.def(
      "int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor act_scales, Tensor t, "
      "Tensor? bias=None) -> Tensor");
  m.def(
      "int8_gemm_dequant(Tensor x_q, Tensor w_q, Tensor w_scale, Tensor act_scales, Tensor t, "
      "Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("quantize_per_sample(Tensor x, Tensor act_scales, Tensor t) -> Tensor");
  // ln_modulate whose output is quantized with act_scales[t[b]] (int8 out).
  m.def(
      "ln_modulate_int8(Tensor x, Tensor? shift, Tensor? scale, float eps, Tensor? weight, "
      "Tensor? bias, Tensor act_scales, Tensor t) -> Tensor");
}
