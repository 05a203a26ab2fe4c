"""Plain-PyTorch references, the readable spec and the oracles of the tests and
benchmarks; nothing outside them imports this package at run time.

It mirrors what it checks: ops.py holds the definition of every ditkernels op (its
names are importable from the package itself: reference.ln_modulate, ...), and
dit.py, uvit.py and diffit.py the published models, written without ditkernels, that
ditkernels.models must match weight for weight.
"""

from . import diffit, dit, ops, uvit
from .ops import (gated_residual_ln_modulate, int8_gemm_dequant, int8_linear, ln_modulate,
                  ln_modulate_int8, quantize_per_sample, relative_position_index,
                  skip_concat_linear, tmsa)

__all__ = ["diffit", "dit", "gated_residual_ln_modulate", "int8_gemm_dequant", "int8_linear",
           "ln_modulate", "ln_modulate_int8", "ops", "quantize_per_sample",
           "relative_position_index", "skip_concat_linear", "tmsa", "uvit"]
