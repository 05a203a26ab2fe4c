#pragma once
// The CUDA runtime as csrc/cuda sees it: the real one, or the CPU emulator of
// csrc/emu in the emulation library. Kernels launch through DK_LAUNCH and declare
// dynamic shared memory through DK_DYNAMIC_SMEM so that both can run them.

#ifdef DITKERNELS_EMULATE_CUDA
#include "emu/cuda_emu.h"

#define DK_LAUNCH(kernel, grid, block, smem_bytes, stream) \
  (::ditkernels::emu::Launch<std::decay_t<decltype(kernel)>>{kernel, #kernel, grid, block, smem_bytes})
#define DK_DYNAMIC_SMEM(align, name) unsigned char* const name = ::ditkernels::emu::dynamic_smem()
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

// kernel<<<grid, block, smem_bytes, stream>>>(args...) is DK_LAUNCH(...)(args...).
#define DK_LAUNCH(kernel, grid, block, smem_bytes, stream) kernel<<<grid, block, smem_bytes, stream>>>
#define DK_DYNAMIC_SMEM(align, name) extern __shared__ __align__(align) unsigned char name[]
#endif
