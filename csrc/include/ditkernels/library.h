#pragma once
// The op library: torch.ops.ditkernels, or torch.ops.ditkernels_emu in the CUDA
// emulation library (csrc/emu), whose CUDA kernels register for CPU tensors. The
// extra macro level expands DK_NAMESPACE before TORCH_LIBRARY pastes it.

#include <torch/library.h>

#ifdef DITKERNELS_EMULATE_CUDA
#define DK_NAMESPACE ditkernels_emu
#define DK_CUDA_DISPATCH_KEY CPU
#else
#define DK_NAMESPACE ditkernels
#define DK_CUDA_DISPATCH_KEY CUDA
#endif

#define DK_TORCH_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define DK_TORCH_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
// TORCH_LIBRARY(ditkernels, m), for the schemas in csrc/ops.cpp.
#define DK_TORCH_LIBRARY(m) DK_TORCH_LIBRARY_(DK_NAMESPACE, m)
// TORCH_LIBRARY_IMPL(ditkernels, CUDA, m), for csrc/cuda/<family>.cu.
#define DK_TORCH_LIBRARY_IMPL_CUDA(m) DK_TORCH_LIBRARY_IMPL_(DK_NAMESPACE, DK_CUDA_DISPATCH_KEY, m)
