#pragma once
// The CUDA runtime as csrc/cuda sees it: the real one, or the CPU emulator of
// csrc/emu in the emulation library. Kernels launch through DK_LAUNCH and declare
// dynamic shared memory through DK_DYNAMIC_SMEM so that both can run them.
// DK_DEVICE_CHECK(cond, msg) is a kernel's check of its input values: on a GPU a
// failed one traps (the launch fails with an illegal-instruction error, and the CUDA
// context with it, as a failed device-side assert does; the trap keeps the check free
// of printf's call and stack frame), in the emulator the launch reports `msg`.

#ifdef DITKERNELS_EMULATE_CUDA
#include "emu/cuda_emu.h"

#define DK_LAUNCH(kernel, grid, block, smem_bytes, stream) \
  (::ditkernels::emu::Launch<std::decay_t<decltype(kernel)>>{kernel, #kernel, grid, block, smem_bytes})
#define DK_DYNAMIC_SMEM(align, name) unsigned char* const name = ::ditkernels::emu::dynamic_smem()
#define DK_DEVICE_CHECK(cond, msg) \
  ((cond) ? static_cast<void>(0) : ::ditkernels::emu::device_check_failed(msg))
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

// kernel<<<grid, block, smem_bytes, stream>>>(args...) is DK_LAUNCH(...)(args...).
#define DK_LAUNCH(kernel, grid, block, smem_bytes, stream) kernel<<<grid, block, smem_bytes, stream>>>
#define DK_DYNAMIC_SMEM(align, name) extern __shared__ __align__(align) unsigned char name[]
#define DK_DEVICE_CHECK(cond, msg) \
  do {                             \
    if (!(cond)) __trap();         \
  } while (0)
#endif
