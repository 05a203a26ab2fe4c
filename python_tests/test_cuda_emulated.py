"""The CUDA kernels, run on the CPU by the emulator in csrc/emu.

The emulation library (libditkernels_emu.so, CMake -DDITKERNELS_EMULATE_CUDA=ON)
is csrc/cuda compiled as C++ against a CPU model of the CUDA features the kernels
use: CUDA threads as fibers, warp-wide mma.sync / ldmatrix / shuffles computed from
the PTX ISA's fragment layouts, deferred cp.async, launch limits. Its ops,
torch.ops.ditkernels_emu.*, take CPU tensors; the `emulated_cuda` fixture puts them
behind the CPU kernels of torch.ops.ditkernels for one test, so these tests drive
the CUDA launchers and kernels through the same Python API, autograd included, as
the CUDA tests in the other files, with the CUDA dtypes and head dims.

This checks the kernels' logic (fragment layouts, tails, masking, pipelines,
reductions) without a GPU. It is no substitute for running on one: timing,
register limits and the compiler's view of the code are not modelled.

The library is found at $DITKERNELS_EMU_LIB, else build/emu/libditkernels_emu.so.
Without it these tests are skipped, unless DITKERNELS_EMU_LIB is set (as in CI).
.ci/run runs them again against the AddressSanitizer build of the library, the
`racecheck` cases against the ThreadSanitizer build, the cp.async kernels with copies
landing early (DITKERNELS_EMU_CPASYNC=early) and everything on an emulated A100
(DITKERNELS_EMU_DEVICE=a100) (README, "Testing CUDA kernels without a GPU").
"""

import os
from pathlib import Path

import pytest
import torch

import ditkernels
from ditkernels import reference
from conftest import DTYPES, GEMM_KERNELS, set_gemm_kernel
import test_adaln
import test_int8
import test_skip_concat_linear
import test_tmsa

CUDA_DTYPES = DTYPES["cuda"]
# The emulated GPU (csrc/emu/emu.cpp's profiles); the launchers pick their paths from
# its properties, wgmma only on Hopper.
EMULATED_DEVICE = os.environ.get("DITKERNELS_EMU_DEVICE") or "h100"
HOPPER = EMULATED_DEVICE in ("h100", "h200")
LOW_PRECISION = [torch.bfloat16, torch.float16]
# One case of every kernel (each TMSA head dim, both adaLN teams), small enough for
# the ThreadSanitizer run of .ci/run (pytest -m racecheck), which is ~10x slower.
RACECHECK = pytest.mark.racecheck


def racecheck(*values):
    return pytest.param(*values, marks=RACECHECK)


OPS = ["ln_modulate", "gated_residual_ln_modulate", "ln_modulate_backward",
       "gated_residual_ln_modulate_backward", "ln_modulate_int8", "skip_concat_linear",
       "skip_concat_linear_backward", "tmsa", "tmsa_backward", "int8_linear",
       "int8_gemm_dequant", "quantize_per_sample"]


def _emu_library():
    env = os.environ.get("DITKERNELS_EMU_LIB")
    path = Path(env) if env else (Path(__file__).resolve().parents[1] / "build" / "emu" /
                                  "libditkernels_emu.so")
    if not path.exists():
        if env:
            raise FileNotFoundError(f"DITKERNELS_EMU_LIB={env} does not exist")
        return None
    return path


_LIB = _emu_library()
if _LIB is not None:
    torch.ops.load_library(str(_LIB))


@pytest.fixture
def emulated_cuda():
    """For the test's duration, CPU calls of torch.ops.ditkernels run the emulated
    CUDA kernels."""
    lib = torch.library.Library("ditkernels", "IMPL")
    for name in OPS:
        lib.impl(name, getattr(torch.ops.ditkernels_emu, name).default, "CPU")
    yield
    lib._destroy()


pytestmark = [
    pytest.mark.skipif(_LIB is None, reason="no emulation library: cmake -S . -B build/emu -G "
                       "Ninja -DDITKERNELS_CUDA=OFF -DDITKERNELS_EMULATE_CUDA=ON && "
                       "cmake --build build/emu"),
    pytest.mark.usefixtures("emulated_cuda"),
]


@pytest.fixture(params=GEMM_KERNELS)
def gemm_kernel(request, monkeypatch):
    """On an emulated Hopper the GEMM ops run their sm_90a kernels, the warp-specialized
    TMA one and the cp.async wgmma one (each at each tile width: the small test shapes
    alone would always get 128), or, with DITKERNELS_DISABLE_WGMMA=1, the mma.sync
    kernels every other GPU runs; elsewhere only those."""
    if request.param != "mma.sync" and not HOPPER:
        pytest.skip(f"no wgmma on the emulated {EMULATED_DEVICE}")
    set_gemm_kernel(monkeypatch, request.param)


@pytest.fixture(params=["wgmma", "mma.sync"])
def tmsa_kernel(request, monkeypatch):
    """On an emulated Hopper the TMSA forward runs sm90::tmsa_fwd_wgmma_kernel, or,
    with DITKERNELS_DISABLE_WGMMA=1, the mma.sync tmsa_fwd_kernel every other GPU
    runs; elsewhere only that one."""
    if request.param != "mma.sync" and not HOPPER:
        pytest.skip(f"no wgmma on the emulated {EMULATED_DEVICE}")
    set_gemm_kernel(monkeypatch, request.param)
    return request.param


@pytest.fixture
def hopper(monkeypatch):
    """The emulator's own wgmma cases run on an emulated H100 whatever the profile."""
    monkeypatch.setenv("DITKERNELS_EMU_DEVICE", "h100")


def test_fixture_routes_to_the_cuda_code():
    """The CUDA launcher's own checks answer: CPU supports head dim 8, CUDA does not."""
    args = test_tmsa.make_inputs(1, 1, 8, (2, 2), 0, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="not supported on CUDA"):
        ditkernels.tmsa(**args)


# ---------------------------------------------------------------------------
# the emulator itself (csrc/emu/selftest.cpp)
# ---------------------------------------------------------------------------

def _selftest(name, a=None, b=None):
    a = torch.zeros(16, 16) if a is None else a
    b = torch.zeros(8, 16) if b is None else b
    return torch.ops.ditkernels_emu.emulator_selftest(name, a, b)


@RACECHECK
def test_emulated_mma_tile_is_a_matrix_product():
    """cp.async -> ldmatrix -> mma.sync -> accumulator layout gives A B^T; integer
    inputs make the fp32 result exact."""
    a = torch.randint(-8, 9, (16, 16)).float()
    b = torch.randint(-8, 9, (8, 16)).float()
    assert torch.equal(_selftest("mma", a, b), a @ b.t())


def test_emulated_cp_async_lands_at_its_wait(monkeypatch):
    """Read before cp.async.wait_group, the tile still holds the 0xff fill (NaN)."""
    monkeypatch.setenv("DITKERNELS_EMU_CPASYNC", "wait")
    a, b = torch.ones(16, 16), torch.ones(8, 16)
    assert _selftest("mma_without_wait", a, b).isnan().all()


@RACECHECK
def test_emulated_wgmma_tile_is_a_matrix_product(hopper):
    """Swizzled tiles -> 128B-swizzle descriptors -> wgmma m64n128k16 -> the
    accumulator layout of cuda_wgmma.cuh gives A B^T, exactly for integer inputs."""
    a = torch.randint(-8, 9, (64, 16)).float()
    b = torch.randint(-8, 9, (128, 16)).float()
    assert torch.equal(_selftest("wgmma", a, b), a @ b.t())


def test_emulated_wgmma_s8_tile_is_a_matrix_product(hopper):
    a = torch.randint(-128, 128, (64, 32)).float()
    b = torch.randint(-128, 128, (128, 32)).float()
    assert torch.equal(_selftest("wgmma_s8", a, b), a @ b.t())


def test_emulated_wgmma_accumulators_are_poison_before_the_wait(hopper):
    a, b = torch.ones(64, 16), torch.ones(128, 16)
    assert _selftest("wgmma_read_before_wait", a, b).isnan().all()


def test_emulated_wgmma_tile_off_the_swizzle_period_reads_wrong_data(hopper):
    """A tile not on a 1024-byte boundary of the shared window: the hardware's swizzle
    (on address bits) no longer matches the one the kernel stored with."""
    a = torch.randint(-8, 9, (64, 16)).float()
    b = torch.randint(-8, 9, (128, 16)).float()
    assert not torch.equal(_selftest("wgmma_unaligned_tile", a, b), a @ b.t())


def test_emulated_wgmma_operand_overwritten_in_flight_is_reported(hopper):
    a, b = torch.ones(64, 16), torch.ones(128, 16)
    with pytest.raises(RuntimeError, match="overwritten before the wgmma.wait_group"):
        _selftest("wgmma_overwrite_in_flight", a, b)


def _int_operands(k=16):
    return torch.randint(-8, 9, (64, k)).float(), torch.randint(-8, 9, (128, k)).float()


@pytest.mark.parametrize("name,factor", [("wgmma_cp_async", 1), ("wgmma_twice", 3)])
def test_emulated_wgmma_fenced_cases_are_matrix_products(hopper, name, factor):
    """The correct twins of the fence controls below: operands from cp.async, each
    thread fencing its own copies; accumulators rewritten between two wgmma with a
    wgmma.fence between (C = 2 A B^T + A B^T)."""
    a, b = _int_operands()
    assert torch.equal(_selftest(name, a, b), factor * (a @ b.t()))


@pytest.mark.parametrize("name,message", [
    ("wgmma_without_proxy_fence", "changed by generic-proxy stores with no fence.proxy.async"),
    ("wgmma_cp_async_unfenced_thread", "cp.async of thread 5 with no fence.proxy.async"),
    ("wgmma_without_fence", "before any wgmma.fence"),
    ("wgmma_twice_unfenced", "wrote its accumulators since the last wgmma on them, with no "
     "wgmma.fence"),
])
def test_emulator_reports_missing_fences(hopper, name, message):
    """Each fence the wgmma kernels need, left out: results would look right (the
    emulator computes them either way), so the emulator must say so."""
    with pytest.raises(RuntimeError, match=message):
        _selftest(name, *_int_operands())


def test_emulated_wgmma_needs_a_hopper_device(monkeypatch):
    monkeypatch.setenv("DITKERNELS_EMU_DEVICE", "a100")
    with pytest.raises(RuntimeError, match="emulated a100 .compute capability 8.0.: wgmma needs "
                       "sm_90a"):
        _selftest("wgmma", *_int_operands())


def _stream(name, monkeypatch, mode, iters=16):
    monkeypatch.setenv("DITKERNELS_EMU_CPASYNC", mode)
    src = torch.arange((iters + 1) * 32 * 4, dtype=torch.float).reshape(iters + 1, 32, 4)
    return _selftest(name, src), src[:-1, :, 0]


def test_emulated_cp_async_landing_at_the_wait_hides_a_war_race(monkeypatch):
    """Why the early mode exists: copies issued before the barrier that ends another
    warp's reads of their buffer land, by default, only after those reads."""
    out, expected = _stream("cp_async_war_race", monkeypatch, "wait")
    assert torch.equal(out, expected)


def test_emulated_cp_async_landing_early_shows_a_war_race(monkeypatch):
    """The control of DITKERNELS_EMU_CPASYNC=early: the race above changes results,
    the same stream refilled after the barrier does not."""
    out, expected = _stream("cp_async_war_race", monkeypatch, "early")
    assert not torch.equal(out, expected)
    out, expected = _stream("cp_async_refill_after_barrier", monkeypatch, "early")
    assert torch.equal(out, expected)


def test_emulator_rejects_unknown_modes_and_devices(monkeypatch):
    monkeypatch.setenv("DITKERNELS_EMU_CPASYNC", "late")
    with pytest.raises(RuntimeError, match="DITKERNELS_EMU_CPASYNC must be wait or early"):
        _selftest("mma", torch.zeros(16, 16), torch.zeros(8, 16))
    monkeypatch.delenv("DITKERNELS_EMU_CPASYNC")
    monkeypatch.setenv("DITKERNELS_EMU_DEVICE", "v100")
    with pytest.raises(RuntimeError, match="DITKERNELS_EMU_DEVICE must be h100, h200, a100 or "
                       "sm89"):
        _selftest("mma", torch.zeros(16, 16), torch.zeros(8, 16))


# The published layouts, written down as data (not derived from the emulator's code).
# PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": lane l has
# groupID g = l // 4 and threadID_in_group t = l % 4; element i of its fragment sits
# at (base + offset[i]), two 16-bit elements per register, the lower index in the
# lower half.
MMA_16816_A = dict(base=lambda g, t: (g, 2 * t),  # a0..a7 -> (row, k)
                   offset=[(0, 0), (0, 1), (8, 0), (8, 1), (0, 8), (0, 9), (8, 8), (8, 9)])
MMA_16816_B = dict(base=lambda g, t: (2 * t, g),  # b0..b3 -> (k, col)
                   offset=[(0, 0), (1, 0), (8, 0), (9, 0)])
MMA_16816_C = dict(base=lambda g, t: (g, 2 * t),  # c0..c3 -> (row, col)
                   offset=[(0, 0), (0, 1), (8, 0), (8, 1)])
# PTX ISA, "Register Fragments" of wgmma .m64nNk16, D: thread T of the warpgroup,
# warp w = T // 32, element i at row 16 w + g + row_offset[i % 4], column
# 8 (i // 4) + 2 t + col_offset[i % 4].
WGMMA_D_ROW_OFFSET = [0, 0, 8, 8]
WGMMA_D_COL_OFFSET = [0, 1, 0, 1]
# CuTe's Swizzle<3,4,3> on byte addresses (the PTX ISA's 128-byte swizzle mode): the
# physical 16-byte chunk of logical chunk c in row r of a 1024-byte atom.
SWIZZLE_128B = [
    [0, 1, 2, 3, 4, 5, 6, 7],
    [1, 0, 3, 2, 5, 4, 7, 6],
    [2, 3, 0, 1, 6, 7, 4, 5],
    [3, 2, 1, 0, 7, 6, 5, 4],
    [4, 5, 6, 7, 0, 1, 2, 3],
    [5, 4, 7, 6, 1, 0, 3, 2],
    [6, 7, 4, 5, 2, 3, 0, 1],
    [7, 6, 5, 4, 3, 2, 1, 0],
]


def _bf16_bits(x):
    return x.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def _registers(matrix, layout):
    """The per-lane 32-bit registers that hold `matrix` in `layout`."""
    bits = _bf16_bits(matrix)
    regs = torch.zeros(32, len(layout["offset"]) // 2, dtype=torch.int64)
    for lane in range(32):
        r0, c0 = layout["base"](lane // 4, lane % 4)
        for i, (dr, dc) in enumerate(layout["offset"]):
            regs[lane, i // 2] |= bits[r0 + dr, c0 + dc] << (16 * (i % 2))
    return regs.to(torch.int32)  # two's complement wrap of the high bit, as in a register


def _mma_by_table(a, b, a_layout):
    d = _selftest("mma_fragments", _registers(a, a_layout), _registers(b, MMA_16816_B))
    got = torch.empty(16, 8)
    for lane in range(32):
        r0, c0 = MMA_16816_C["base"](lane // 4, lane % 4)
        for i, (dr, dc) in enumerate(MMA_16816_C["offset"]):
            got[r0 + dr, c0 + dc] = d[lane, i]
    return got


def test_emulated_mma_fragments_match_the_ptx_isa_tables():
    """Registers filled by the table give A B in the table's accumulator layout; the
    control, a table with a2, a3 and a4, a5 swapped (rows 8.. and columns 8.. mixed
    up), does not."""
    a = torch.randint(-8, 9, (16, 16)).float()
    b = torch.randint(-8, 9, (16, 8)).float()  # [k, n]
    assert torch.equal(_mma_by_table(a, b, MMA_16816_A), a @ b)
    o = MMA_16816_A["offset"]
    wrong = dict(MMA_16816_A, offset=o[:2] + o[4:6] + o[2:4] + o[6:])
    assert not torch.equal(_mma_by_table(a, b, wrong), a @ b)


def _swizzled_image(matrix, swizzle):
    """Rows of 64 bf16 (128 bytes) laid out as a K-major tile by `swizzle`."""
    row_bytes = _bf16_bits(matrix).to(torch.int16).view(torch.uint8).reshape(-1, 8, 16)
    image = torch.empty_like(row_bytes)
    for r in range(matrix.shape[0]):
        for c in range(8):
            image[r, swizzle[r % 8][c]] = row_bytes[r, c]
    return image.reshape(-1, 128)


def _wgmma_d_as_matrix(d):
    """The [64, 128] result of an m64n128 wgmma from its per-thread accumulators d[128, 64],
    by the PTX ISA's D fragment table."""
    got = torch.empty(64, 128)
    for thread in range(128):
        w, g, t = thread // 32, thread % 32 // 4, thread % 4
        for i in range(64):
            got[16 * w + g + WGMMA_D_ROW_OFFSET[i % 4],
                8 * (i // 4) + 2 * t + WGMMA_D_COL_OFFSET[i % 4]] = d[thread, i]
    return got


def _wgmma_by_table(a, b, swizzle):
    d = _selftest("swizzle_images", _swizzled_image(a, swizzle), _swizzled_image(b, swizzle))
    return _wgmma_d_as_matrix(d)


def test_emulated_wgmma_reads_the_cute_swizzle_and_writes_the_ptx_fragments(hopper):
    """A k-tile of four wgmma (the descriptor start advancing 32 bytes each) on tiles
    laid out by the table gives A B^T in the PTX ISA's accumulator layout; the
    control, tiles left unswizzled, does not."""
    a = torch.randint(-8, 9, (64, 64)).float()
    b = torch.randint(-8, 9, (128, 64)).float()
    assert torch.equal(_wgmma_by_table(a, b, SWIZZLE_128B), a @ b.t())
    assert not torch.equal(_wgmma_by_table(a, b, [list(range(8))] * 8), a @ b.t())


def _wgmma_rs_mn_by_table(a, bt, swizzle):
    """One m64n128k16 wgmma: A [64, 16] as registers, each warp's 16 rows by the
    mma.sync A table (the PTX ISA's wgmma A fragments); B^T [16, 128] MN-major, each
    64-column block laid out as 16 rows of a K-major tile by `swizzle` (CuTe's
    Layout_MN_SW128_Atom: Swizzle<3,4,3> o ((8,8,m),(8,k)):((1,8,LBO),(64,SBO)))."""
    regs = torch.cat([_registers(a[16 * w:16 * w + 16], MMA_16816_A) for w in range(4)])
    image = torch.cat([_swizzled_image(bt[:, 64 * m:64 * m + 64], swizzle) for m in range(2)])
    d = _selftest("rs_mn_images", regs, image)
    return _wgmma_d_as_matrix(d)


def test_emulated_wgmma_register_a_and_transposed_b_follow_the_tables(hopper):
    """A from registers and an MN-major (transposed) B, as the TMSA forward's P V uses
    them, give A B; the control, B^T left unswizzled, does not."""
    a = torch.randint(-8, 9, (64, 16)).float()
    bt = torch.randint(-8, 9, (16, 128)).float()
    assert torch.equal(_wgmma_rs_mn_by_table(a, bt, SWIZZLE_128B), a @ bt)
    assert not torch.equal(_wgmma_rs_mn_by_table(a, bt, [list(range(8))] * 8), a @ bt)


@RACECHECK
def test_emulator_racecheck_control():
    """A kernel with a shared-memory race. It runs here; under the ThreadSanitizer
    build (DITKERNELS_EMU_SANITIZE=thread) its report is the control that shows
    racecheck works (.ci/run requires it)."""
    assert _selftest("shared_memory_race")[0].item() == 1.0


# TMA and mbarrier, against CuTe's and the PTX ISA's definitions written down here.

def _cute_swizzle_343(offset):
    """CuTe's Swizzle<3, 4, 3> (cute/swizzle.hpp), the 128-byte swizzle of TMA
    (CU_TENSOR_MAP_SWIZZLE_128B) and of wgmma descriptors (layout type 1): bits 7..9
    of a byte offset XOR-ed into bits 4..6."""
    yyy_msk = ((1 << 3) - 1) << (4 + 3)
    return offset ^ ((offset & yyy_msk) >> 3)


def _tma_box(matrix, x, y, rows):
    """The box TMA reads at coordinates (x, y) (x along the contiguous dimension, as
    cuTensorMapEncodeTiled orders dims), zeros outside the matrix."""
    box = torch.zeros(rows, 128, dtype=torch.uint8)
    R, C = matrix.shape
    for r in range(rows):
        for c in range(128):
            if 0 <= y + r < R and 0 <= x + c < C:
                box[r, c] = matrix[y + r, x + c]
    return box


def _tma_matrix(R, C):
    g = torch.Generator().manual_seed(R * C)
    return torch.randint(1, 256, (R, C), generator=g, dtype=torch.uint8)


# Inside the matrix, and over its last rows and columns, and before its first ones.
@pytest.mark.parametrize("x,y,rows", [(0, 0, 8), (32, 5, 16), (128, 16, 16), (-16, -3, 8),
                                      racecheck(16, 13, 16)])
def test_emulated_tma_tile_is_the_swizzled_box(x, y, rows, hopper):
    """A [21, 160] uint8 matrix (row stride 160 bytes): the tile holds the box with CuTe's
    128-byte swizzle applied to each byte's offset, zeros where the box leaves the matrix
    (past the last row or column, or at negative coordinates)."""
    matrix = _tma_matrix(21, 160)
    image = _selftest("tma_tile", matrix, torch.tensor([x, y, rows])).flatten()
    box = _tma_box(matrix, x, y, rows).flatten()
    want = torch.empty_like(box)
    for offset in range(box.numel()):
        want[_cute_swizzle_343(offset)] = box[offset]
    assert torch.equal(image, want)


def test_emulated_tma_lands_at_the_barrier_wait(monkeypatch, hopper):
    """Read before the mbarrier wait, the tile still holds the 0xff fill."""
    monkeypatch.setenv("DITKERNELS_EMU_CPASYNC", "wait")
    image = _selftest("tma_read_before_wait", _tma_matrix(21, 160), torch.tensor([0, 0, 8]))
    assert (image == 255).all()


def test_emulated_tensor_map_encoding_checks_the_drivers_rules():
    """cuTensorMapEncodeTiled, found through cudaGetDriverEntryPoint, accepts the valid
    maps (CUDA_SUCCESS = 0) and refuses (CUDA_ERROR_INVALID_VALUE = 1) what cuda.h says
    it must: unaligned address or stride, a box beyond 256 or of rows that are no
    multiple of 16 bytes or wider than the swizzle, rank 0, element stride 9, NaN fill
    of an integer type, an empty dimension (cases in csrc/emu/selftest.cpp)."""
    assert _selftest("tma_encode").tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_emulated_mbarrier_phases(hopper):
    """PTX ISA mbarrier semantics, as CuTe's ClusterBarrier::wait(phase) relies on:
    try_wait.parity P succeeds once the phase of parity P completed, i.e. P differs
    from the running phase's parity; a phase completes when all arrivals are in AND
    the expected transaction bytes have arrived (arrive.expect_tx + a TMA load's
    complete_tx); then the phase flips."""
    probes = _selftest("mbarrier_phases", _tma_matrix(8, 128)).tolist()
    # fresh: P=0, P=1 | 1 of 2 arrivals: P=0 | both: P=0, P=1 | arrivals in, 1024 bytes
    # outstanding: P=1 | the load landed: P=1, P=0
    assert probes == [0, 1, 0, 1, 0, 0, 1, 0]


def test_emulated_wgmma_reads_tma_tiles_without_proxy_fence(hopper):
    """TMA writes through the async proxy: wgmma reads its swizzled tiles with no
    fence.proxy.async, and the swizzles agree, so the product is exact."""
    a = torch.randint(-8, 9, (64, 64)).float()
    b = torch.randint(-8, 9, (128, 64)).float()
    assert torch.equal(_selftest("wgmma_tma", a, b), a @ b.t())


@pytest.mark.parametrize("name,message", [
    ("mbarrier_deadlock", "deadlock: 0 threads wait at __syncthreads, 64 on mbarrier phases"),
    ("tma_without_wait", "TMA loads in flight"),
])
def test_emulator_reports_tma_faults(name, message, hopper):
    a = _tma_matrix(21, 160)
    with pytest.raises(RuntimeError, match=message):
        _selftest(name, a, torch.tensor([0, 0, 8]))


def test_emulator_reports_tma_before_hopper(monkeypatch):
    monkeypatch.setenv("DITKERNELS_EMU_DEVICE", "a100")
    with pytest.raises(RuntimeError, match="on an emulated a100: TMA needs sm_90"):
        _selftest("tma_tile", _tma_matrix(21, 160), torch.tensor([0, 0, 8]))


@pytest.mark.parametrize("name,message", [
    ("misaligned_ldmatrix", "not 16-byte aligned"),
    ("exited_lane_shuffle", "exited"),
    ("divergent_barrier", "deadlock"),
    ("smem_without_attribute", "MaxDynamicSharedMemorySize"),
])
def test_emulator_reports_faults(name, message):
    with pytest.raises(RuntimeError, match=message):
        _selftest(name)


# ---------------------------------------------------------------------------
# fused adaLN
# ---------------------------------------------------------------------------

# Warp teams (C <= 256) and block teams, 16-byte vectors (C % 8 == 0) and scalars.
ADALN_SHAPES = [(2, 17, 1), racecheck(2, 17, 7), (2, 258, 384), racecheck(1, 5, 257),
                (2, 9, 1152), (1, 3, 4097), (1, 2, 8192)]


@pytest.mark.parametrize("op", test_adaln.OPS)
@pytest.mark.parametrize("B,N,C", ADALN_SHAPES)
def test_adaln_forward(op, B, N, C):
    for dtype in CUDA_DTYPES:
        test_adaln._forward_case("cpu", dtype, op, B, N, C)


@pytest.mark.parametrize("op", test_adaln.OPS)
@pytest.mark.parametrize("flags", [dict(affine=False), dict(shift=False, scale=False),
                                   dict(gate=False), dict(scale=False, affine=False)])
def test_adaln_optional_arguments(op, flags):
    for dtype in CUDA_DTYPES:
        test_adaln._forward_case("cpu", dtype, op, 3, 17, 40, **flags)


@pytest.mark.parametrize("op", test_adaln.OPS)
def test_adaln_non_contiguous_and_misaligned(op):
    for dtype in CUDA_DTYPES:
        test_adaln.check_non_contiguous_and_misaligned("cpu", dtype, op)


@pytest.mark.parametrize("op", test_adaln.OPS)
@pytest.mark.parametrize("B,N,C", [(2, 1, 1), racecheck(3, 17, 7), (2, 258, 384),
                                   racecheck(1, 17, 1031), (1, 17, 4097)])
def test_adaln_backward(op, B, N, C):
    for dtype in CUDA_DTYPES:
        test_adaln.check_backward("cpu", dtype, op, B, N, C)


@pytest.mark.parametrize("op", test_adaln.OPS)
@pytest.mark.parametrize("device", ["h100", "a100", "sm89"])
def test_adaln_backward_at_the_devices_shared_memory_limit(op, device, monkeypatch):
    """C = 8192 keeps 128 KiB (ln_modulate) or 160 KiB (gated) of partial sums per CTA:
    in shared memory where that fits (227 KiB on Hopper, 163 KiB on the A100), in the
    fp32 partial buffers in global memory on sm_89's 99 KiB; each against the reference."""
    monkeypatch.setenv("DITKERNELS_EMU_DEVICE", device)
    test_adaln.check_backward("cpu", torch.bfloat16, op, 1, 3, 8192)


@pytest.mark.parametrize("op", test_adaln.OPS)
def test_adaln_backward_partials_in_global_memory_match_shared(op, monkeypatch):
    """The global-memory partials add the same values in the same order as the shared
    ones: the gradients are bit-identical."""
    args = test_adaln.make_inputs(op, 1, 3, 8192, torch.bfloat16, "cpu")
    seeds = [torch.randn(1, 3, 8192, dtype=torch.float64).to(torch.bfloat16).double()
             for _ in range(2 if op == "gated_residual_ln_modulate" else 1)]
    grads = {}
    for device in ("h100", "sm89"):
        monkeypatch.setenv("DITKERNELS_EMU_DEVICE", device)
        grads[device] = test_adaln._grads(ditkernels, op, test_adaln._leaf(args), seeds)
    for name, g in grads["h100"].items():
        assert torch.equal(g, grads["sm89"][name]), name


@pytest.mark.parametrize("op", test_adaln.OPS)
def test_adaln_backward_is_deterministic(op):
    test_adaln.test_backward_is_deterministic("cpu", op)


@pytest.mark.parametrize("op", test_adaln.OPS)
def test_adaln_empty(op):
    test_adaln.test_empty_batch_or_tokens("cpu", op)


# ---------------------------------------------------------------------------
# TMSA (fp32 takes the blocked path on CUDA too; the kernels are fp16/bf16)
# ---------------------------------------------------------------------------

CUDA_HEAD_DIMS = test_tmsa.HEAD_DIMS["cuda"]


@pytest.mark.parametrize("grid,leading", [racecheck(*c) if c == ((8, 8), 2) else c
                                          for c in test_tmsa.CASES])
@pytest.mark.usefixtures("tmsa_kernel")
def test_tmsa_forward(grid, leading):
    for dtype in CUDA_DTYPES:
        for D in CUDA_HEAD_DIMS if dtype in LOW_PRECISION else [64]:
            test_tmsa.check_forward("cpu", dtype, D, grid, leading)


@pytest.mark.parametrize("time,table", [(False, True), (True, False), (False, False)])
@pytest.mark.usefixtures("tmsa_kernel")
def test_tmsa_optional_time_and_table(time, table):
    for dtype in LOW_PRECISION:
        test_tmsa.check_optional_time_and_table("cpu", dtype, time, table)


@pytest.mark.parametrize("D", [64, 72])
@pytest.mark.usefixtures("tmsa_kernel")
def test_tmsa_long_sequence(D):
    args = test_tmsa.make_inputs(1, 1, D, (32, 32), 0, torch.bfloat16, "cpu")
    test_tmsa.check_against_reference(ditkernels.tmsa(**args), args, reference.tmsa(**args))


@pytest.mark.usefixtures("tmsa_kernel")
def test_tmsa_qkv_read_in_place_from_projection():
    for dtype in LOW_PRECISION:
        test_tmsa.check_qkv_read_in_place("cpu", dtype)


def test_tmsa_forward_runs_the_chosen_kernel(tmsa_kernel, tmp_path, monkeypatch):
    """The launcher picks the wgmma kernel on a Hopper unless DITKERNELS_DISABLE_WGMMA
    is set, so the tmsa_kernel cases above test both kernels."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import static_report

    log = tmp_path / "launches.tsv"
    monkeypatch.setenv("DITKERNELS_EMU_LAUNCH_LOG", str(log))
    for D in CUDA_HEAD_DIMS:
        ditkernels.tmsa(**test_tmsa.make_inputs(1, 2, D, (3, 5), 1, torch.bfloat16, "cpu"))
    kernels = static_report.read_launch_log(log.read_text(), _LIB)
    name = "sm90::tmsa_fwd_wgmma_kernel" if tmsa_kernel == "wgmma" else "tmsa_fwd_kernel"
    assert set(kernels) == {f"{name}<c10::BFloat16, {D}>" for D in CUDA_HEAD_DIMS} | {
        "tmsa_fwd_table_kernel<c10::BFloat16>"}, kernels


@pytest.mark.parametrize("grid,leading", [((2, 3), 1), racecheck((8, 8), 2), ((9, 11), 0)])
@pytest.mark.parametrize("D", test_tmsa.BACKWARD_HEAD_DIMS["cuda"])
def test_tmsa_backward(grid, leading, D):
    for dtype in LOW_PRECISION:
        test_tmsa.check_backward("cpu", dtype, D, grid, leading)


def test_tmsa_backward_is_deterministic():
    """The fixed-point dQ and table sums do not depend on the order of the atomics."""
    for dtype in LOW_PRECISION:
        test_tmsa.check_backward_is_deterministic("cpu", dtype)


@pytest.mark.parametrize("D", [64, 72, 128])
def test_tmsa_backward_table_sums_in_global_memory(D, monkeypatch):
    """Where the table's int32 partial sums do not fit in shared memory, the kernel adds
    the same integer terms straight to the global int64 sums: the same bits (two query
    tiles; at D = 128 the shared-memory variant keeps one dO stage, the other two)."""
    if D == 128 and EMULATED_DEVICE == "sm89":
        pytest.skip("the global-table variant at D = 128 (113 KiB) exceeds the 99 KiB of "
                    "shared memory: that device runs the blocked path instead")
    # The global variant has 64 keys a CTA; so has the shared one compared (the table
    # sums' fixed-point scale follows the CTA's key count).
    monkeypatch.setenv("DITKERNELS_TMSA_BWD_KEYS", "64")
    args = test_tmsa.make_inputs(2, 3, D, (9, 8), 1, torch.bfloat16, "cpu")
    grad = torch.randn(2, 73, 3, D).to(torch.bfloat16)
    shared = test_tmsa._grads(ditkernels.tmsa, args, grad)
    monkeypatch.setenv("DITKERNELS_TMSA_TABLE_IN_GLOBAL", "1")
    in_global = test_tmsa._grads(ditkernels.tmsa, args, grad)
    for k in shared:
        assert torch.equal(shared[k], in_global[k]), k
    assert shared["rel_table"].abs().sum() > 0


def _bwd_kernels(args, grad, log, monkeypatch):
    """The gradients, and the names of the kernels the backward launched."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import static_report

    monkeypatch.setenv("DITKERNELS_EMU_LAUNCH_LOG", str(log))
    grads = test_tmsa._grads(ditkernels.tmsa, args, grad)
    monkeypatch.delenv("DITKERNELS_EMU_LAUNCH_LOG")
    names = set(static_report.read_launch_log(log.read_text(), _LIB))
    log.unlink()
    return grads, {n for n in names if n.startswith("tmsa_bwd_kernel")}


@pytest.mark.parametrize("D", [32, 64, 72])
def test_tmsa_backward_128_key_ctas(D, hopper, tmp_path, monkeypatch):
    """Up to D = 72 an H100 takes 128-key CTAs (two key tiles a warp); forced to 64 keys
    it takes the other kernel. Each matches the reference on a sequence of several key
    CTAs and query tiles. dK and dV agree bit for bit (each key's products in the same
    order); dQ and the table gradient need not: a CTA's fp32 dQ terms are sums over its
    keys, rounded to fixed point once per CTA, and the table sums' fixed-point scale
    follows the CTA's key count (a 128-key CTA adds up to 128 terms to an entry)."""
    grid, leading = (13, 11), 2  # 145 tokens: 2 CTAs of 128 keys, 3 of 64, 3 query tiles
    for dtype in LOW_PRECISION:
        test_tmsa.check_backward("cpu", dtype, D, grid, leading)  # the default: 128 keys
    args = test_tmsa.make_inputs(2, 3, D, grid, leading, torch.bfloat16, "cpu")
    grad = torch.randn(2, 145, 3, D).to(torch.bfloat16)
    log = tmp_path / "launches.tsv"
    wide, wide_kernels = _bwd_kernels(args, grad, log, monkeypatch)
    assert wide_kernels == {f"tmsa_bwd_kernel<c10::BFloat16, {D}, true, 2>"}, wide_kernels
    monkeypatch.setenv("DITKERNELS_TMSA_BWD_KEYS", "64")
    for dtype in LOW_PRECISION:
        test_tmsa.check_backward("cpu", dtype, D, grid, leading)
    narrow, narrow_kernels = _bwd_kernels(args, grad, log, monkeypatch)
    assert narrow_kernels == {f"tmsa_bwd_kernel<c10::BFloat16, {D}, true, 1>"}, narrow_kernels
    assert torch.equal(wide["qkv"][:, :, 1:], narrow["qkv"][:, :, 1:])


@pytest.mark.parametrize("device,D,keys", [
    ("h100", 64, 128), ("h200", 72, 128), ("h100", 32, 128), ("h100", 96, 64),
    ("h100", 128, 64), ("a100", 64, 64), ("sm89", 32, 64)])
def test_tmsa_backward_key_count_choice(device, D, keys, tmp_path, monkeypatch):
    """128-key CTAs where the head dim allows them and two fit in an SM's shared memory
    (Hopper's 228 KB; not the A100's 164 KB or sm_89's 100 KB), else 64-key ones."""
    monkeypatch.setenv("DITKERNELS_EMU_DEVICE", device)
    args = test_tmsa.make_inputs(1, 1, D, (5, 7), 1, torch.bfloat16, "cpu")
    _, kernels = _bwd_kernels(args, torch.randn(1, 36, 1, D), tmp_path / "log.tsv", monkeypatch)
    assert kernels == {f"tmsa_bwd_kernel<c10::BFloat16, {D}, true, {keys // 64}>"}, kernels


def test_tmsa_backward_key_count_by_hand_errors(monkeypatch):
    """DITKERNELS_TMSA_BWD_KEYS takes 64 or 128, and 128 only where that kernel exists."""
    args = test_tmsa.make_inputs(1, 1, 96, (3, 3), 1, torch.bfloat16, "cpu")
    grad = torch.randn(1, 10, 1, 96)
    monkeypatch.setenv("DITKERNELS_TMSA_BWD_KEYS", "96")
    with pytest.raises(RuntimeError, match="tmsa_backward: DITKERNELS_TMSA_BWD_KEYS must be 64 or 128, got '96'"):
        test_tmsa._grads(ditkernels.tmsa, args, grad)
    monkeypatch.setenv("DITKERNELS_TMSA_BWD_KEYS", "128")
    with pytest.raises(RuntimeError, match="needs a head dim of at most 72.*head dim 96"):
        test_tmsa._grads(ditkernels.tmsa, args, grad)
    monkeypatch.setenv("DITKERNELS_TMSA_TABLE_IN_GLOBAL", "1")
    args = test_tmsa.make_inputs(1, 1, 64, (3, 3), 1, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="needs the table sums in shared memory"):
        test_tmsa._grads(ditkernels.tmsa, args, torch.randn(1, 10, 1, 64))


# ---------------------------------------------------------------------------
# skip-concat-linear
# ---------------------------------------------------------------------------

# test_skip_concat_linear.CASES without its largest GEMM (2 x 65 x 2304 x 1152),
# which takes minutes under emulation; D = 1152 stays, at fewer rows.
SKIP_CASES = ([racecheck(*c) if c == ((3, 7), 40, 24) else c
               for c in test_skip_concat_linear.CASES if c[1] < 1152] + [((1, 9), 1152, 72)])


@pytest.mark.parametrize("lead,D,Dout", SKIP_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("gemm_kernel")
def test_skip_concat_linear_forward(lead, D, Dout, bias):
    for dtype in CUDA_DTYPES:
        test_skip_concat_linear.check_forward("cpu", dtype, lead, D, Dout, bias)


@pytest.mark.usefixtures("gemm_kernel")
def test_skip_concat_linear_non_contiguous_and_misaligned():
    for dtype in CUDA_DTYPES:
        test_skip_concat_linear.check_non_contiguous_and_misaligned("cpu", dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_skip_concat_linear_backward(bias):
    for dtype in CUDA_DTYPES:
        test_skip_concat_linear.check_backward("cpu", dtype, bias)


@pytest.mark.usefixtures("gemm_kernel")
def test_skip_concat_linear_empty():
    test_skip_concat_linear.test_empty_rows("cpu")


# ---------------------------------------------------------------------------
# timestep-calibrated int8: bit for bit with the integer reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lead,K,N,one_t", [racecheck(*c) if i == 0 else c
                                            for i, c in enumerate(test_int8.CASES)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("gemm_kernel")
def test_int8_linear_bit_identical(lead, K, N, one_t, bias):
    for dtype in CUDA_DTYPES:
        test_int8.check_int8_linear("cpu", dtype, lead, K, N, one_t, bias)


@pytest.mark.parametrize("kernel", ["tma-n128", "tma-n192", "tma-n256"])
@pytest.mark.parametrize("ctas", [1, 3])
def test_int8_tma_kernel_walks_several_tiles_per_cta(kernel, ctas, hopper, monkeypatch):
    """The persistent TMA kernel with its grid capped: each CTA walks several output
    tiles (M and N tails included), its stage ring wrapping within and across tiles."""
    set_gemm_kernel(monkeypatch, kernel)
    monkeypatch.setenv("DITKERNELS_PERSISTENT_CTAS", str(ctas))
    for lead, K, N, one_t in [((3, 129), 96, 400, False), ((1, 258), 1152, 144, False)]:
        test_int8.check_int8_linear("cpu", torch.bfloat16, lead, K, N, one_t, True)
    test_int8.check_gemm_dequant_and_quantize("cpu", [torch.float32], (2, 130), 272, 48, False)


@pytest.mark.parametrize("kernel", ["tma-n128", "tma-n192", "tma-n256"])
@pytest.mark.parametrize("ctas", [1, 3])
def test_skip_concat_linear_tma_kernel_walks_several_tiles_per_cta(kernel, ctas, hopper,
                                                                  monkeypatch):
    """The same for skip_concat_linear, whose K loop walks x's and skip's maps in turn
    (D = 72: the last k-tile of each straddles D; odd Dout: scalar stores)."""
    set_gemm_kernel(monkeypatch, kernel)
    monkeypatch.setenv("DITKERNELS_PERSISTENT_CTAS", str(ctas))
    for dtype in LOW_PRECISION:
        test_skip_concat_linear.check_forward("cpu", dtype, (2, 150), 72, 300, True)
        test_skip_concat_linear.check_forward("cpu", dtype, (3, 90), 136, 97, False)


@pytest.mark.parametrize("kernel", ["tma-n128", "tma-n192", "tma-n256"])
@pytest.mark.parametrize("splits,ctas", [(2, 132), (3, 2), (64, 5)])
def test_int8_tma_split_k_is_bit_identical(kernel, splits, ctas, hopper, monkeypatch):
    """Split-K on the persistent kernel (DITKERNELS_SPLIT_K forces the number of
    k-ranges, capped at the k-tiles: 64 -> 9 for K = 1152): int32 sums added in order by
    the reduce kernel, so the output keeps the CPU kernel's bits, with M and N tails,
    a capped grid (units wrapping the stage ring) and both output paths."""
    set_gemm_kernel(monkeypatch, kernel)
    monkeypatch.setenv("DITKERNELS_SPLIT_K", str(splits))
    monkeypatch.setenv("DITKERNELS_PERSISTENT_CTAS", str(ctas))
    for lead, K, N, one_t in [((1, 258), 1152, 144, False), ((3, 43), 384, 400, True)]:
        test_int8.check_int8_linear("cpu", torch.bfloat16, lead, K, N, one_t, True)
    test_int8.check_gemm_dequant_and_quantize("cpu", [torch.float32], (2, 130), 272, 48, False)


@pytest.mark.parametrize("kernel", ["tma-n128", "tma-n256"])
@pytest.mark.parametrize("splits", [2, 5])
def test_skip_concat_linear_tma_split_k(kernel, splits, hopper, monkeypatch):
    """The same for skip_concat_linear: the k-ranges cut across x's and skip's maps
    (D = 200: 4 k-tiles of each, the last one straddling D), odd Dout (the workspace row
    padded to even, scalar stores in the reduce kernel)."""
    set_gemm_kernel(monkeypatch, kernel)
    monkeypatch.setenv("DITKERNELS_SPLIT_K", str(splits))
    monkeypatch.setenv("DITKERNELS_PERSISTENT_CTAS", "3")
    for dtype in LOW_PRECISION:
        test_skip_concat_linear.check_forward("cpu", dtype, (2, 75), 200, 97, True)
        test_skip_concat_linear.check_forward("cpu", dtype, (1, 130), 72, 256, False)


def _gemm_launches(tmp_path, monkeypatch, fn):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import static_report

    log = tmp_path / "launches.tsv"
    log.unlink(missing_ok=True)
    monkeypatch.setenv("DITKERNELS_EMU_LAUNCH_LOG", str(log))
    fn()
    monkeypatch.delenv("DITKERNELS_EMU_LAUNCH_LOG")
    return sorted(k.split("<")[0].split("::")[-1]
                  for k in static_report.read_launch_log(log.read_text(), _LIB))


def test_gemm_plans_split_k_only_where_tiles_leave_sms_idle(tmp_path, hopper, monkeypatch):
    """ws::plan on the emulated H100 (132 SMs): a 2 x 1 tile int8 GEMM with 32 k-tiles
    splits (a reduce kernel follows the GEMM); one with a single k-tile, or with
    DITKERNELS_SPLIT_K=1, does not; skip_concat_linear plans the same way."""
    set_gemm_kernel(monkeypatch, "tma")
    monkeypatch.delenv("DITKERNELS_SPLIT_K", raising=False)
    torch.manual_seed(0)

    def int8(K):
        x = torch.randn(200, K)
        w_q = torch.randint(-127, 128, (144, K), dtype=torch.int8)
        torch.ops.ditkernels.int8_linear(x, w_q, torch.rand(144) + 0.1, torch.full((1,), 0.05),
                                         torch.zeros(1, dtype=torch.long), None)

    one = ["int8_gemm_tma_kernel", "quantize_rows_kernel"]
    split = sorted(one + ["int8_split_reduce_kernel"])
    assert _gemm_launches(tmp_path, monkeypatch, lambda: int8(4096)) == split
    assert _gemm_launches(tmp_path, monkeypatch, lambda: int8(128)) == one
    monkeypatch.setenv("DITKERNELS_SPLIT_K", "1")
    assert _gemm_launches(tmp_path, monkeypatch, lambda: int8(4096)) == one
    monkeypatch.delenv("DITKERNELS_SPLIT_K")

    x, skip = torch.randn(2, 64, 1024, dtype=torch.bfloat16).unbind(0)
    w = torch.randn(64, 2048, dtype=torch.bfloat16)
    assert _gemm_launches(
        tmp_path, monkeypatch, lambda: torch.ops.ditkernels.skip_concat_linear(x, skip, w, None)
    ) == ["skip_gemm_split_reduce_kernel", "skip_gemm_tma_kernel"]


def test_gemm_split_k_variable_is_checked(hopper, monkeypatch):
    set_gemm_kernel(monkeypatch, "tma")
    monkeypatch.setenv("DITKERNELS_SPLIT_K", "two")
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="DITKERNELS_SPLIT_K must be a positive integer"):
        torch.ops.ditkernels.skip_concat_linear(x, x, torch.randn(16, 128, dtype=torch.bfloat16),
                                                None)


@pytest.mark.parametrize("lead,K,N,one_t", test_int8.CASES[:3])
@pytest.mark.usefixtures("gemm_kernel")
def test_int8_gemm_dequant_and_quantize(lead, K, N, one_t):
    test_int8.check_gemm_dequant_and_quantize("cpu", CUDA_DTYPES, lead, K, N, one_t)


def test_int8_quantize_rounds_half_to_even_and_saturates():
    test_int8.test_quantize_rounds_half_to_even_and_clamps()


def test_int8_quantize_rows_of_eight():
    for dtype in CUDA_DTYPES:
        test_int8.check_quantize_rows_of_eight("cpu", dtype)


@pytest.mark.usefixtures("gemm_kernel")
def test_int8_mixed_timesteps_in_one_batch():
    test_int8.test_mixed_timesteps_in_one_batch("cpu")


@pytest.mark.usefixtures("gemm_kernel")
def test_int8_bad_timesteps_and_scales_fail_on_the_device(monkeypatch):
    test_int8.check_bad_values_fail_on_the_device("cpu", monkeypatch)


@RACECHECK
def test_ln_modulate_int8():
    for dtype in CUDA_DTYPES:
        test_int8.check_ln_modulate_int8("cpu", dtype)


@pytest.mark.parametrize("table", [True, False])
def test_tmsa_forward_is_two_launches(table, tmp_path, monkeypatch):
    """The forward is the padded bias table's kernel and the attention kernel, with no
    ATen computation (allocations and views only)."""
    args = test_tmsa.make_inputs(2, 3, 64, (5, 7), 1, torch.bfloat16, "cpu")
    rel = args["rel_table"] if table else None
    log = tmp_path / "launches.tsv"
    monkeypatch.setenv("DITKERNELS_EMU_LAUNCH_LOG", str(log))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.ditkernels.tmsa(args["qkv"], args["time_qkv"], rel, 5, 7, 1, 0.125)
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import static_report

    assert len(log.read_text().splitlines()) == 2
    kernels = {k.split("<")[0].split("::")[-1]
               for k in static_report.read_launch_log(log.read_text(), _LIB)}
    assert kernels in ({"tmsa_fwd_table_kernel", "tmsa_fwd_kernel"},
                       {"tmsa_fwd_table_kernel", "tmsa_fwd_wgmma_kernel"}), kernels
    aten = {e.name for e in prof.events() if e.name.startswith("aten::")}
    assert aten <= {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::select",
                    "aten::as_strided", "aten::contiguous", "aten::view"}, aten


def test_tmsa_backward_is_three_launches(tmp_path, monkeypatch):
    """For contiguous inputs the fused backward is three kernels (prep, main, finalize)
    and no ATen computation: allocations and views only."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import static_report

    args = test_tmsa.make_inputs(2, 3, 64, (5, 7), 1, torch.bfloat16, "cpu")
    qkv, time_qkv, table = args["qkv"], args["time_qkv"], args["rel_table"]
    out, lse = torch.ops.ditkernels.tmsa(qkv, time_qkv, table, 5, 7, 1, 0.125)
    grad = torch.randn_like(out)
    log = tmp_path / "launches.tsv"
    monkeypatch.setenv("DITKERNELS_EMU_LAUNCH_LOG", str(log))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.ditkernels.tmsa_backward(grad, qkv, time_qkv, table, out, lse, 5, 7, 1, 0.125)
    launches = log.read_text().splitlines()
    kernels = static_report.read_launch_log(log.read_text(), _LIB)
    assert len(launches) == 3, launches
    assert {k.split("<")[0] for k in kernels} == {
        "tmsa_bwd_prep_kernel", "tmsa_bwd_kernel", "tmsa_bwd_finalize_kernel"}, kernels
    aten = {e.name for e in prof.events() if e.name.startswith("aten::")}
    assert aten <= {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::select",
                    "aten::as_strided"}, aten
