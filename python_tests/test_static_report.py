"""benchmarks/static_report.py: the SASS metric, loop detection, occupancy and --check.

The committed fixture (data/static_report_fixture.sass.gz: an sm_90a wgmma kernel and
an sm_80 mma.sync kernel cut from the build) must give the numbers that /work/shared/tools/sass_loops.py, the
tool REFERENCE.md's anchors were measured with, gives on it; they are written out
below, and checked against the tool itself where it is present.
"""

import copy
import gzip
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "static_report_fixture.sass.gz"
SASS_LOOPS = Path(os.environ.get("DITKERNELS_SASS_LOOPS", "/work/shared/tools/sass_loops.py"))

spec = importlib.util.spec_from_file_location("static_report", ROOT / "benchmarks" / "static_report.py")
sr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sr)


def listing(name, instructions):
    """A cuobjdump -sass style function from [(address, 'OPCODE operands')]."""
    lines = [f"\t\tFunction : {name}"]
    lines += [f"        /*{addr:04x}*/                   {text} ;   /* 0x0000000000000000 */"
              for addr, text in instructions]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("instr,units", [
    ("HMMA.16816.F32.BF16 R8, R4, R12, R8", 1.0),
    ("HMMA.1688.F32.TF32 R8, R4, R12, R8", 0.5),
    ("IMMA.16832.S8.S8 R8, R4, R12, R8", 1.0),
    ("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24", 16.0),
    ("HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], R24, gsb0", 32.0),
    ("IGMMA.64x192x32.S8.S8 R24, gdesc[UR4], R24", 24.0),
])
def test_unit_weights(instr, units):
    body = sr.parse_sass(listing("k", [(0x10, instr), (0x20, "BRA 0x10")]))["k"]
    (loop,) = sr.hot_loops(body)
    assert loop["units"] == units
    assert loop["instr"] == 2 and loop["slots_per_unit"] == pytest.approx(2 / units, abs=1e-3)


def test_innermost_loop_with_mma_only():
    text = listing("k", [
        (0x00, "MOV R1, c[0x0][0x28]"),
        (0x10, "HMMA.16816.F32.BF16 R8, R4, R12, R8"),       # outer loop body
        (0x20, "LDS.128 R4, [R2]"),                            # inner loop 1: has MMA
        (0x30, "HMMA.16816.F32.BF16 R8, R4, R12, R8"),
        (0x40, "@P0 BRA 0x20"),
        (0x50, "FADD R3, R3, 1"),                              # inner loop 2: no MMA
        (0x60, "@P1 BRA 0x50"),
        (0x70, "BRA 0x90"),                                    # a forward branch is no loop
        (0x80, "NOP"),
        (0x90, "@P2 BRA 0x10"),                                # outer loop
        (0xa0, "LDSM.16.M88.4 R4, [R2]"),                      # a second, sibling hot loop
        (0xb0, "IMMA.16832.S8.S8 R8, R4, R12, R8"),
        (0xc0, "BAR.SYNC.DEFER_BLOCKING 0x0"),
        (0xd0, "STL [R1], R9"),
        (0xe0, "@P3 BRA 0xa0"),
        (0xf0, "EXIT"),
    ])
    loops = sr.hot_loops(sr.parse_sass(text)["k"])
    assert [(l["start"], l["end"]) for l in loops] == [("0x20", "0x40"), ("0xa0", "0xe0")]
    assert loops[0]["instr"] == 3 and loops[0]["lds"] == 1 and loops[0]["bra"] == 1
    assert loops[1]["instr"] == 5 and loops[1]["lds"] == 1 and loops[1]["bar"] == 1
    assert loops[1]["local"] == 1


def test_path_rejoining_a_hot_loop_from_after_it_is_no_loop():
    """ptxas lays the retry of an mbarrier try_wait out after the function's body, with a
    backward branch into the loop: that range crosses the loop and gets no row."""
    text = listing("k", [
        (0x00, "MOV R1, c[0x0][0x28]"),
        (0x10, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2"),   # hot loop: the wait,
        (0x20, "@!P0 BRA 0x80"),                                   # its retry out of line,
        (0x30, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),   # the MMA
        (0x40, "@P1 BRA 0x10"),
        (0x50, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),  # after the loop
        (0x60, "EXIT"),
        (0x70, "NOP"),
        (0x80, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2"),   # the retry
        (0x90, "@!P0 BRA 0x80"),
        (0xa0, "BRA 0x30"),
    ])
    loops = sr.hot_loops(sr.parse_sass(text)["k"])
    assert [(l["start"], l["end"]) for l in loops] == [("0x10", "0x40")]
    assert loops[0]["units"] == 16 and loops[0]["bar"] == 1


def test_no_mma_no_hot_loop():
    text = listing("k", [(0x00, "FADD R3, R3, 1"), (0x10, "@P1 BRA 0x0"), (0x20, "EXIT")])
    assert sr.hot_loops(sr.parse_sass(text)["k"]) == []


def _fixture_rows():
    funcs = sr.parse_sass(gzip.decompress(FIXTURE.read_bytes()).decode())
    names = sr.demangle(funcs)
    return [(sr.kernel_key(names[m]), loop) for m, body in funcs.items() for loop in sr.hot_loops(body)]


# sass_loops.py's rows on the fixture: (instr, mma units, bra, lds, sts, ldg, atom, lmem, bar).
FIXTURE_EXPECTED = [(220, 64.0, 3, 7, 0, 8, 0, 0, 3),   # sm90::int8_gemm_wgmma_kernel<bf16, 128>: 3.4
                    (179, 32.0, 8, 18, 0, 4, 0, 0, 1)]  # skip_gemm_tc_kernel<bf16>, sm_80: 5.6


def test_fixture_matches_recorded_table():
    rows = [(l["instr"], l["units"], l["bra"], l["lds"], l["sts"], l["ldg"], l["atom"], l["local"], l["bar"])
            for _, l in _fixture_rows()]
    assert rows == FIXTURE_EXPECTED


@pytest.mark.skipif(not SASS_LOOPS.exists(), reason="sass_loops.py is not on this machine")
def test_agrees_with_sass_loops(tmp_path):
    listing_file = tmp_path / "fixture.sass"
    listing_file.write_bytes(gzip.decompress(FIXTURE.read_bytes()))
    out = subprocess.run([sys.executable, str(SASS_LOOPS), str(listing_file)], capture_output=True,
                         text=True, check=True).stdout.splitlines()[1:]
    theirs = [tuple(float(v) for v in line.split()[-10:]) for line in out if line.strip()]
    ours = [(l["instr"], l["units"], round(l["instr"] / l["units"], 1), l["bra"], l["lds"], l["sts"],
             l["ldg"], l["atom"], l["local"], l["bar"]) for _, l in _fixture_rows()]
    assert len(theirs) == len(ours) > 0
    for t, o in zip(theirs, ours):
        assert t[0] == o[0] and round(o[1]) == t[1] and t[2] == pytest.approx(o[2], abs=0.051)
        assert t[3:] == o[3:]


def test_kernel_key():
    name = ("void ditkernels::(anonymous namespace)::sm90::int8_gemm_wgmma_kernel<c10::BFloat16, 128>"
            "(ditkernels::(anonymous namespace)::Int8GemmParams)")
    assert sr.kernel_key(name) == "sm90::int8_gemm_wgmma_kernel<c10::BFloat16, 128>"
    assert sr.kernel_key("ditkernels::(anonymous namespace)::big_smem_kernel(float*)") == "big_smem_kernel"
    fn_param = "void ditkernels::k<(void (*)(int))0, 2>(ditkernels::P<(int)1>)"
    assert sr.kernel_key(fn_param) == "k<(void (*)(int))0, 2>"


def test_fa2_plain_variant_is_picked_by_its_flags():
    traits = ("Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t, "
              "Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >")
    plain = f"void flash::flash_fwd_kernel<{traits}, false, false, false, false, true, true, false, false>(Flash_fwd_params)"
    args = sr.template_args(plain)
    assert args[0] == traits and args[1:] == sr.FA2_PLAIN["flash_fwd_kernel"]
    causal = plain.replace("false, false, false, false, true", "false, true, false, false, true")
    assert sr.template_args(causal)[1:] != sr.FA2_PLAIN["flash_fwd_kernel"]


@pytest.mark.parametrize("arch,regs,threads,smem,expected", [
    ("sm_90a", 168, 256, 0, (1, "regs")),          # 5376 regs a warp: 3 warps per sub-partition
    ("sm_90a", 32, 128, 0, (16, "warps")),         # registers would allow 16 too
    ("sm_90a", 40, 128, 0, (12, "regs")),          # 1280 a warp: 12 per sub-partition
    ("sm_90a", 32, 32, 0, (32, "ctas")),
    ("sm_90a", 64, 128, 100 * 1024, (2, "smem")),  # 101 KB each into 228 KB
    ("sm_80", 64, 128, 100 * 1024, (1, "smem")),   # into 164 KB
    ("sm_90a", 64, 128, 228 * 1024, (0, "smem")),  # over the per-block maximum
    ("sm_80", 255, 128, 0, (2, "regs")),            # 8192 regs a warp: 2 per sub-partition
    ("sm_80", 255, 256, 0, (1, "regs")),
])
def test_occupancy(arch, regs, threads, smem, expected):
    assert sr.ctas_per_sm(arch, regs, threads, smem) == expected


def _report(slots=5.0, spills=0, stack=0):
    loop = dict(key="k<1>#0", instr=int(slots * 16), units=16.0, slots_per_unit=slots)
    return dict(kernels={"k<1>": dict(hot=True, spill_stores=spills, spill_loads=0, stack=stack, loops=[loop]),
                         "cold<2>": dict(hot=False, spill_stores=0, spill_loads=0, stack=0, loops=[])})


def test_check_accepts_the_same_and_small_changes():
    assert sr.check(_report(), _report()) == ([], [])
    fails, notes = sr.check(_report(slots=5.4), _report())
    assert fails == [] and "within 10%" in notes[0]


@pytest.mark.parametrize("new,reason", [
    (_report(slots=5.6), "more than 10% worse"),
    (_report(spills=2), "spill"),
    (_report(stack=16), "stack 0 -> 16"),
])
def test_check_fails_on_regressions(new, reason):
    fails, _ = sr.check(new, _report())
    assert len(fails) == 1 and reason in fails[0]


def test_check_fails_when_loops_change_and_notes_improvements():
    gone = _report()
    gone["kernels"]["k<1>"]["loops"] = []
    assert sr.check(gone, _report())[0] == ["k<1>#0: hot loop disappeared"]
    assert sr.check(_report(), gone)[0] == ["k<1>#0: hot loop appeared"]
    more = copy.deepcopy(_report())
    more["kernels"]["new<3>"] = dict(hot=True, spill_stores=0, spill_loads=0, stack=0, loops=[])
    assert "new hot kernel" in sr.check(more, _report())[0][0]
    fails, notes = sr.check(_report(slots=4.0), _report())
    assert fails == [] and "better" in notes[0]


EMU_LIB = Path(os.environ.get("DITKERNELS_EMU_LIB", ROOT / "build" / "emu" / "libditkernels_emu.so"))


@pytest.mark.skipif(not EMU_LIB.exists(), reason="no emulation library (README: CMake -DDITKERNELS_EMULATE_CUDA=ON)")
def test_emulator_launch_log_names_kernels(tmp_path, monkeypatch):
    import torch

    torch.ops.load_library(str(EMU_LIB))
    log = tmp_path / "launches.tsv"
    monkeypatch.setenv("DITKERNELS_EMU_LAUNCH_LOG", str(log))
    x = torch.randn(1, 2, 1152, dtype=torch.bfloat16)
    torch.ops.ditkernels_emu.ln_modulate(x, None, None, 1e-6)
    # 1152 channels, 8 a thread: 144 threads, rounded up to whole warps.
    assert sr.read_launch_log(log.read_text(), EMU_LIB) == {
        "adaln_forward_kernel<c10::BFloat16, 8, false>": [dict(block=[160, 1, 1], dyn_smem=0)]}
