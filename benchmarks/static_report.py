#!/usr/bin/env python3
"""Static kernel report: what nvcc made of every CUDA kernel, read from its SASS.

For each architecture (sm_90a, sm_80) and each kernel instantiation: registers,
stack, local-memory (spill) instructions, static and dynamic shared memory at the
launch configurations the launchers use, and theoretical occupancy on the H100 / A100;
for each innermost loop that issues tensor-core instructions, its instruction mix and
issue slots per unit of tensor work (the metric of benchmarks/PERF_NOTES.md, "Static
kernel report").

    python benchmarks/static_report.py                  # from the importable ditkernels._C
    python benchmarks/static_report.py --from-so PATH   # from any build of the extension
    python benchmarks/static_report.py --compile        # nvcc -cubin csrc/cuda/*.cu itself
    python benchmarks/static_report.py --check          # compare with the committed tables
    python benchmarks/static_report.py --fa2            # add FlashAttention-2's loops (cached)
    python benchmarks/static_report.py --launch-configs EMU_LIB   # re-record launch_configs.json

Writes benchmarks/results/static/<arch>.md and <arch>.json (or --out DIR). --check
writes nothing: it exits 1 on a new spill or stack growth in a hot kernel, or a hot loop
more than 10% worse in issue slots per unit, or hot loops that appeared or vanished.
"""

import argparse
import bisect
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "static"
LAUNCH_CONFIGS = RESULTS / "launch_configs.json"
FA2_VERSION = "2.8.3.post2"
FA2_CACHE = Path(os.environ.get("DITKERNELS_FA2_CACHE", Path.home() / ".cache" / "ditkernels" / "fa2"))
FA2_FILES = ["flash_fwd_hdim64_bf16_sm80", "flash_fwd_hdim96_bf16_sm80",
             "flash_bwd_hdim64_bf16_sm80", "flash_bwd_hdim96_bf16_sm80"]
# How FlashAttention-2 builds itself (its setup.py), as REFERENCE.md records it.
FA2_FLAGS = ["-O3", "-DNDEBUG", "-std=c++20", "--expt-relaxed-constexpr", "--expt-extended-lambda",
             "--use_fast_math", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__"]

# Per-SM limits the occupancy needs (CUDA C++ Programming Guide, "Compute Capabilities").
# clocks_per_unit: an SM sub-partition's time for one bf16 m16n8k16 (2048 FMA) at dense
# peak: about 3.8 on the H100 (REFERENCE.md); 8 on the A100 (312 TFLOP/s over 108 SMs x 4
# sub-partitions at 1.41 GHz is 256 FMA per clock).
DEVICES = {
    "sm_90a": dict(device="H100", smem_sm=228 * 1024, smem_block=227 * 1024, clocks_per_unit=3.8),
    "sm_80": dict(device="A100", smem_sm=164 * 1024, smem_block=163 * 1024, clocks_per_unit=8),
}
REGS_SM = 65536
REG_UNIT = 256          # registers are allocated per warp in units of 256
SUBPARTITIONS = 4       # each holds a quarter of the register file; a warp lives in one
MAX_WARPS_SM = 64
MAX_CTAS_SM = 32
SMEM_RESERVED_CTA = 1024  # the runtime's reservation per resident CTA
SMEM_UNIT = 128
# cuobjdump -res-usage counts the 1 KB reservation in SHARED on sm_90a (an sm_90a kernel
# with a 128-byte __shared__ array reports 1152), not on sm_80.
RESERVED_IN_RES_USAGE = {"sm_90a": 1024, "sm_80": 0}

# Tolerance of --check: a hot loop may cost up to 10% more issue slots per unit.
WORSE = 1.10

MMA = re.compile(r"^(HMMA|HGMMA|IMMA|IGMMA|QGMMA|UTCHMMA|UTCIMMA)")
INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:\{\s*)?(@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)([.A-Za-z0-9_]*)\s*(.*?);")
FUNCTION = re.compile(r"\s*Function\s*:\s*(\S+)")
RES_USAGE = re.compile(r"\s*Function (\S+):\s*$")


# ---------------------------------------------------------------------------------------
# SASS: functions, tensor work, hot loops. One definition with ../shared/tools/sass_loops.py
# (python_tests/test_static_report.py holds them to agreement).

def parse_sass(text):
    """{mangled name: [(address, opcode, modifiers, operands)]} of a cuobjdump -sass listing."""
    funcs, body = {}, None
    for line in text.splitlines():
        m = FUNCTION.match(line)
        if m:
            body = funcs.setdefault(m.group(1), [])
            continue
        m = INSTR.match(line)
        if m and body is not None:
            body.append((int(m.group(1), 16), m.group(3), m.group(4), m.group(5)))
    return funcs


def mma_units(op, mods):
    """Tensor work of one MMA instruction, in bf16 m16n8k16 per warp."""
    m = re.match(r"\.(\d+)x(\d+)x(\d+)", mods)
    if m:  # a warpgroup MMA is 64 x N for four warps: N / 8 per warp
        return int(m.group(2)) / 8
    if op == "HMMA":
        return 0.5 if mods.startswith(".1688") else 1.0
    return 1.0  # IMMA.16832 (int8 runs at twice bf16's rate) and IMMA.8816


def _count(ins, ops):
    return sum(1 for op, _, _ in ins if op in ops)


def hot_loops(body):
    """The innermost loops (a backward branch and its target) that issue MMA instructions,
    in the order of their backward branches, with their instruction mix.

    A backward branch from past a hot loop's end to a target inside it (a range that
    enters the loop from outside rather than nesting in it or around it) is a path laid
    out after the function's body that rejoins the loop: ptxas puts the retry of an
    mbarrier try_wait there. It is no loop of its own and gets no row. (On everything
    else this agrees with ../shared/tools/sass_loops.py, which counts such a range as a
    loop.)"""
    loops = []
    for addr, op, _, args in body:
        if op == "BRA":
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) < addr:
                loops.append((int(m.group(1), 16), addr))

    mma_addrs = [a for a, op, _, _ in body if MMA.match(op)]

    def has_mma(lo, hi):
        i = bisect.bisect_left(mma_addrs, lo)
        return i < len(mma_addrs) and mma_addrs[i] <= hi

    addrs = [a for a, _, _, _ in body]
    rows = []
    for lo, hi in loops:
        if not has_mma(lo, hi):
            continue
        if any(l != (lo, hi) and lo <= l[0] and l[1] <= hi and has_mma(*l) for l in loops):
            continue
        if any(l[0] < lo <= l[1] < hi and has_mma(*l) for l in loops):
            continue  # rejoins the hot loop l from code laid out after it
        first = bisect.bisect_left(addrs, lo)
        ins = [(op, mods, args) for _, op, mods, args in body[first:bisect.bisect_right(addrs, hi)]]
        units = sum(mma_units(op, mods) for op, mods, _ in ins if MMA.match(op))
        rows.append(dict(
            start=f"{lo:#x}", end=f"{hi:#x}", instr=len(ins), units=units,
            slots_per_unit=round(len(ins) / units, 3),
            bra=_count(ins, ("BRA",)),
            lds=_count(ins, ("LDS", "LDSM")),
            sts=_count(ins, ("STS",)),
            ldg=_count(ins, ("LDG", "LDGSTS", "UTMALDG")),
            atom=sum(1 for op, _, _ in ins if op.startswith(("ATOM", "RED"))),
            local=_count(ins, ("LDL", "STL")),
            bar=_count(ins, ("BAR", "SYNCS", "WARPGROUP")),
        ))
    return rows


def parse_res_usage(text):
    """{mangled name: {REG, STACK, SHARED, LOCAL}} from cuobjdump -res-usage."""
    usage, name = {}, None
    for line in text.splitlines():
        m = RES_USAGE.match(line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return usage


def demangle(names):
    names = list(names)
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def kernel_key(demangled):
    """The instantiation without return type, parameter list, anonymous namespaces or the
    ditkernels:: prefix, e.g. "tmsa_fwd_kernel<c10::BFloat16, 64>": the stable name a
    kernel has across builds and in the emulator's launch log."""
    name = demangled.replace("(anonymous namespace)::", "")
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for i in range(len(name) - 1, -1, -1):  # strip the trailing (parameters)
        if name[i] == ")":
            depth += 1
        elif name[i] == "(":
            depth -= 1
            if depth == 0:
                cut = i
                break
    return name[:cut].replace("ditkernels::", "")


# ---------------------------------------------------------------------------------------
# Occupancy

def ctas_per_sm(arch, regs, threads, smem_bytes):
    """Theoretical resident CTAs per SM and the limiter, as CUDA's occupancy calculator
    computes it: registers per warp rounded up to 256 and warps placed in the four
    sub-partitions' 16384-register files; shared memory rounded up to 128 bytes plus 1 KB
    reserved per CTA; 2048 threads (64 warps) and 32 CTAs per SM."""
    dev = DEVICES[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_UNIT) * REG_UNIT
    warps_by_regs = (REGS_SM // SUBPARTITIONS // regs_per_warp) * SUBPARTITIONS
    smem = math.ceil(smem_bytes / SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED_CTA
    limits = {  # on a tie the first one is named
        "warps": MAX_WARPS_SM // warps,
        "ctas": MAX_CTAS_SM,
        "regs": warps_by_regs // warps,
        "smem": dev["smem_sm"] // smem if smem_bytes <= dev["smem_block"] else 0,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


# ---------------------------------------------------------------------------------------
# Tools and SASS sources

def find_tool(name):
    """A CUDA binary tool from CUDA_HOME, PATH, the nvidia-cuda-cuobjdump wheel, or triton's copy."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "bin" / name)
    cands.append(Path("/usr/local/cuda/bin") / name)
    if shutil.which(name):
        cands.append(Path(shutil.which(name)))
    for mod, sub in (("nvidia.cuda_cuobjdump", "bin"), ("triton", "backends/nvidia/bin")):
        try:
            pkg = __import__(mod, fromlist=["_"])
            cands += [Path(p) / sub / name for p in pkg.__path__]
        except ImportError:
            pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    sys.exit(f"static_report: no {name} found (install the nvidia-cuda-cuobjdump wheel or set CUDA_HOME)")


def run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"static_report: {' '.join(map(str, cmd))} failed:\n{res.stderr[-4000:]}")
    return res.stdout


def dump(jobs):
    """cuobjdump -sass -res-usage of each (binary, arch), run side by side: [listing]. One
    listing holds each ELF's resource usage followed by its SASS. The listings go to files,
    not pipes, so that no cuobjdump waits for its pipe to be read while another one is."""
    cuobjdump = find_tool("cuobjdump")
    files = [tempfile.TemporaryFile("w+") for _ in jobs]
    procs = [subprocess.Popen([cuobjdump, "-sass", "-res-usage", "-arch", arch, str(binary)],
                              stdout=f, stderr=subprocess.PIPE, text=True)
             for (binary, arch), f in zip(jobs, files)]
    out = []
    for (binary, arch), proc, f in zip(jobs, procs, files):
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"static_report: cuobjdump -arch {arch} {binary} failed:\n{err[-4000:]}")
        f.seek(0)
        out.append(f.read())
        f.close()
    return out


def default_so():
    try:
        import ditkernels._C as ext
    except ImportError as e:
        sys.exit(f"static_report: cannot import ditkernels._C ({e}); pass --from-so PATH")
    return ext.__file__


def nvcc_path():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return str(Path(os.environ[var]) / "bin" / "nvcc")
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc") or sys.exit("static_report: no nvcc")


def nvcc_version():
    try:
        out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout
        return next(ln for ln in out.splitlines() if "release" in ln).strip()
    except (OSError, SystemExit, StopIteration):
        return "unknown"


def project_nvcc_flags():
    """csrc/nvcc_flags.txt, which setup.py builds with (its read_nvcc_flags)."""
    lines = (ROOT / "csrc" / "nvcc_flags.txt").read_text().splitlines()
    return [f for f in (ln.split("#")[0].strip() for ln in lines) if f]


def cpp_extension():
    """torch.utils.cpp_extension, told where the toolkit is (it guesses wrong from a wrapper
    nvcc on PATH, and warns)."""
    os.environ.setdefault("CUDA_HOME", str(Path(nvcc_path()).resolve().parent.parent))
    from torch.utils import cpp_extension as ext
    return ext


def project_nvcc_command(arch):
    """nvcc -cubin for one arch with the flags setup.py builds with (csrc/nvcc_flags.txt),
    the macros setup.py defines, and what torch's cpp_extension adds for codegen."""
    import torch

    ext = cpp_extension()
    flags = project_nvcc_flags()
    version = torch.__version__.split("+")[0].replace(".", "_")
    # setup.py's macros for its default TORCH_CUDA_ARCH_LIST "8.0;9.0a" (arch_token, has_sm90a).
    macros = [f"-DDITKERNELS_TORCH_VERSION={version}", "-DDITKERNELS_WITH_CUDA",
              "-DDITKERNELS_CUDA_ARCHS=80_90a", "-DDITKERNELS_SM90A",
              "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    includes = [ROOT / "csrc" / "include"] + [Path(p) for p in ext.include_paths("cuda")]
    try:
        import nvidia
        includes += sorted(p for base in map(Path, nvidia.__path__) for p in base.glob("*/include"))
    except ImportError:
        pass
    includes.append(Path(sysconfig.get_paths()["include"]))
    codegen = list(dict.fromkeys(flags + ext.COMMON_NVCC_FLAGS + ["-std=c++20"])) + macros
    return [nvcc_path(), "-cubin", f"-arch={arch}"] + codegen + [f"-I{p}" for p in includes], codegen


def compile_ours(arch, workdir):
    """cuobjdump listings of csrc/cuda/*.cu compiled by us for one arch."""
    cmd, _ = project_nvcc_command(arch)
    out = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        cubin = Path(workdir) / f"{cu.stem}.{arch}.cubin"
        print(f"static_report: nvcc {cu.name} for {arch}", file=sys.stderr)
        run(cmd + ["-o", str(cubin), str(cu)])
        out += dump([(cubin, arch)])
    return out


# ---------------------------------------------------------------------------------------
# FlashAttention-2 (optional, cached under ~/.cache/ditkernels/fa2)

def fa2_sources():
    src = FA2_CACHE / "src" / f"flash_attn-{FA2_VERSION}"
    if src.is_dir():
        return src
    (FA2_CACHE / "src").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLASH_ATTENTION_SKIP_CUDA_BUILD="TRUE")
    subprocess.run([sys.executable, "-m", "pip", "download", f"flash-attn=={FA2_VERSION}", "--no-deps",
                    "--no-binary", ":all:", "--no-build-isolation", "-d", str(FA2_CACHE / "src")],
                   env=env, check=True)
    subprocess.run(["tar", "xzf", f"flash_attn-{FA2_VERSION}.tar.gz"], cwd=FA2_CACHE / "src", check=True)
    return src


def fa2_sass(arch, compile_missing):
    """{file stem: cuobjdump listing, or why there is none}, compiling what is not cached."""

    out = {}
    for stem in FA2_FILES:
        cubin = FA2_CACHE / FA2_VERSION / arch / f"{stem}.cubin"
        if not cubin.exists() and compile_missing:
            src = fa2_sources()
            cubin.parent.mkdir(parents=True, exist_ok=True)
            inc = [src / "csrc" / "flash_attn", src / "csrc" / "flash_attn" / "src",
                   src / "csrc" / "cutlass" / "include"] + [Path(p) for p in cpp_extension().include_paths("cuda")]
            cmd = ([nvcc_path(), "-cubin", f"-arch={arch}"] + FA2_FLAGS + [f"-I{p}" for p in inc]
                   + ["-o", str(cubin) + ".tmp", str(src / "csrc" / "flash_attn" / "src" / f"{stem}.cu")])
            print(f"static_report: compiling FA2 {stem} for {arch} (minutes)", file=sys.stderr)
            res = subprocess.run(cmd, capture_output=True, text=True)
            (cubin.parent / f"{stem}.log").write_text(" ".join(cmd) + "\n" + res.stderr)
            if res.returncode:
                out[stem] = f"nvcc failed (see {cubin.parent / stem}.log)"
                continue
            os.replace(str(cubin) + ".tmp", cubin)
        out[stem] = dump([(cubin, arch)])[0] if cubin.exists() else "not cached (run with --fa2)"
    return out


def template_args(demangled):
    """Top-level template arguments of a demangled function name."""
    name = kernel_key(demangled)
    args, depth, cur = [], 0, ""
    for ch in name[name.index("<") + 1:name.rindex(">")] if "<" in name else "":
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return args + [cur.strip()] if cur.strip() else args


# FA2 instantiates each file's kernel for every combination of its bool template flags.
# The peer column shows the variant our kernels compare with: no dropout, causal/local
# mask, alibi or softcap; even sequence lengths and head dim (Is_even_MN, Is_even_K).
FA2_PLAIN = {
    # flash_fwd_kernel<Traits, Is_dropout, Is_causal, Is_local, Has_alibi, Is_even_MN, Is_even_K,
    #                  Is_softcap, Return_softmax>
    "flash_fwd_kernel": ["false"] * 4 + ["true"] * 2 + ["false"] * 2,
    # flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Traits, Is_dropout, Is_causal, Is_local,
    #                  Has_alibi, Is_even_MN, Is_even_K, Is_softcap>
    "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": ["false"] * 4 + ["true"] * 2 + ["false"],
}


def fa2_rows(arch, compile_missing):
    """The hot loops of FA2's plain variants (FA2_PLAIN) in each cached file, or why not."""
    rows = []
    for stem, got in fa2_sass(arch, compile_missing).items():
        if "Function" not in got:
            rows.append(dict(file=stem, error=got))
            continue
        funcs = parse_sass(got)
        names = demangle(funcs)
        usage = parse_res_usage(got)
        found = False
        for mangled, body in funcs.items():
            key = kernel_key(names[mangled])
            base = key.split("<")[0].split("::")[-1]
            if FA2_PLAIN.get(base) != template_args(names[mangled])[1:]:
                continue
            found = True
            for i, loop in enumerate(hot_loops(body)):
                rows.append(dict(file=stem, kernel=key, loop=i, regs=usage.get(mangled, {}).get("REG"), **loop))
        if not found:
            rows.append(dict(file=stem, error="no plain-variant kernel found in the SASS"))
    return rows


# ---------------------------------------------------------------------------------------
# The report

def load_launch_configs():
    if LAUNCH_CONFIGS.exists():
        return json.loads(LAUNCH_CONFIGS.read_text())["kernels"]
    return {}


def analyse(listings, arch):
    """One record per kernel instantiation from cuobjdump -sass -res-usage listings."""
    launches = load_launch_configs()
    kernels = {}
    for listing in listings:
        funcs = parse_sass(listing)
        usage = parse_res_usage(listing)
        names = demangle(funcs)
        for mangled, body in funcs.items():
            key = kernel_key(names[mangled])
            u = dict(usage.get(mangled, {}))
            if "SHARED" in u:
                u["SHARED"] = max(0, u["SHARED"] - RESERVED_IN_RES_USAGE[arch])
            loops = hot_loops(body)
            configs = []
            # The sm90:: kernels are Hopper-only: an sm_80 build holds empty stubs of them and
            # the launchers choose the mma.sync kernels there.
            hopper_only = key.startswith("sm90::") and arch != "sm_90a"
            for cfg in [] if hopper_only else launches.get(key, []):
                threads = math.prod(cfg["block"])
                ctas, limiter = ctas_per_sm(arch, u.get("REG", 0), threads, u.get("SHARED", 0) + cfg["dyn_smem"])
                configs.append(dict(cfg, ctas_per_sm=ctas, limiter=limiter,
                                    occupancy=round(ctas * math.ceil(threads / 32) / MAX_WARPS_SM, 3)))
            kernels[key] = dict(
                mangled=mangled, regs=u.get("REG"), stack=u.get("STACK"), local=u.get("LOCAL"),
                static_smem=u.get("SHARED"),
                spill_stores=sum(1 for _, op, _, _ in body if op == "STL"),
                spill_loads=sum(1 for _, op, _, _ in body if op == "LDL"),
                instructions=len(body), hot=bool(loops), launches=configs,
                loops=[dict(loop, key=f"{key}#{i}") for i, loop in enumerate(loops)],
            )
    return dict(sorted(kernels.items()))


def git_commit():
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(arch, source, flags):
    import torch
    return dict(arch=arch, device=DEVICES[arch]["device"], source=source, nvcc=nvcc_version(),
                flags=flags, torch=torch.__version__, commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def fmt_cfg(c):
    threads = math.prod(c["block"])
    return (f"{threads} thr, {c['dyn_smem'] / 1024:.1f} KB dyn: {c['ctas_per_sm']} CTA ({c['limiter']}), "
            f"{c['occupancy']:.0%}")


def to_markdown(report):
    h = report["header"]
    out = [f"# Static kernel report: {h['arch']} ({h['device']} occupancy)", "",
           f"Generated by `benchmarks/static_report.py` from {h['source']}; {h['nvcc']}; torch {h['torch']}; "
           f"commit {h['commit']}; {h['date']}.", "",
           f"nvcc flags: `{' '.join(h['flags'])}`", "",
           "Issue slots per unit = SASS instructions in the innermost loop that issues tensor-core "
           "instructions, divided by its tensor work in bf16 m16n8k16-per-warp units (HMMA.16816 = 1, "
           "HMMA.1688 = 0.5, IMMA.16832 = 1, wgmma 64xNxK = N/8). A sub-partition issues one instruction "
           f"per clock and its tensor core retires a unit in about {DEVICES[h['arch']]['clocks_per_unit']:g} clocks "
           f"on the {h['device']}: a loop above that many slots per unit cannot keep the tensor cores busy. "
           "See benchmarks/PERF_NOTES.md for what the metric cannot see.", "",
           "## Hot loops (kernels with a tensor-core loop)", "",
           "| kernel | loop | instr | units | slots/unit | bra | lds | sts | ldg | atom | lmem | bar |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, k in report["kernels"].items():
        for i, l in enumerate(k["loops"]):
            out.append(f"| `{key}` | {i} | {l['instr']} | {l['units']:g} | **{l['slots_per_unit']:.1f}** | {l['bra']} | "
                       f"{l['lds']} | {l['sts']} | {l['ldg']} | {l['atom']} | {l['local']} | {l['bar']} |")
    if report.get("fa2") is not None:
        out += ["", f"## Peer: FlashAttention-2 {FA2_VERSION}, same nvcc, FA2's own flags", "",
                "The variant of each file that compares with ours: no dropout, causal/local mask, alibi or "
                f"softcap; even sizes. FA2 flags: `{' '.join(FA2_FLAGS)}`."
                + (f" Rows {report['header']['fa2_source']}." if report["header"].get("fa2_source")
                   else ""), "",
                "| file | kernel traits | loop | regs | instr | units | slots/unit | bra | lds | sts | ldg | atom | lmem | bar |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["fa2"]:
            if "error" in r:
                out.append(f"| {r['file']} | {r['error']} | | | | | | | | | | | | |")
                continue
            traits = template_args("void " + r["kernel"] + "()")[0]
            sizes = []  # the traits' leading numbers and flags: head dim, tile, warps, layouts
            for a in template_args("void " + traits + "()"):
                if not re.fullmatch(r"\d+|true|false", a):
                    break
                sizes.append(a)
            out.append(f"| {r['file']} | `<{', '.join(sizes)}>` | {r['loop']} | {r['regs']} | {r['instr']} | {r['units']:g} | "
                       f"**{r['slots_per_unit']:.1f}** | {r['bra']} | {r['lds']} | {r['sts']} | {r['ldg']} | "
                       f"{r['atom']} | {r['local']} | {r['bar']} |")
    out += ["", "## Resources of every kernel", "",
            f"Occupancy on the {h['device']} at each launch configuration the launchers chose for the "
            "representative calls of `launch_configs.json` (CTAs per SM, limiter, resident warps / 64).", "",
            "| kernel | hot | regs | stack | spill st/ld | static smem | launches |",
            "|---|---|---:|---:|---:|---:|---|"]
    for key, k in report["kernels"].items():
        launches = "<br>".join(fmt_cfg(c) for c in k["launches"]) or (
            "Hopper only" if key.startswith("sm90::") and h["arch"] != "sm_90a"
            else "not launched by the representative calls")
        out.append(f"| `{key}` | {'yes' if k['hot'] else ''} | {k['regs']} | {k['stack']} | "
                   f"{k['spill_stores']}/{k['spill_loads']} | {k['static_smem']} | {launches} |")
    return "\n".join(out) + "\n"


def build_report(arch, args, so_listing):
    """The report of one arch, from the extension's listing or (so_listing None) by compiling."""
    if so_listing is None:
        with tempfile.TemporaryDirectory() as tmp:
            listings = compile_ours(arch, tmp)
        source = "nvcc -cubin of csrc/cuda/*.cu"
    else:
        listings = [so_listing]
        source = f"the built extension `{Path(args.from_so or default_so()).name}`"
    _, flags = project_nvcc_command(arch)
    kernels = analyse(listings, arch)
    if not kernels:
        sys.exit(f"static_report: no {arch} kernels in the SASS (was the extension built for it?)")
    report = dict(header=header(arch, source, flags), kernels=kernels)
    # --check compares our kernels only; a table written without --fa2 still shows the
    # FA2 cubins an earlier --fa2 left in the cache.
    if args.fa2 or (not args.check and any((FA2_CACHE / FA2_VERSION / arch).glob("*.cubin"))):
        report["fa2"] = fa2_rows(arch, compile_missing=args.fa2)
    elif not args.check:
        # No FA2 cubins here: keep the committed table's FA2 rows where they came from the
        # same nvcc (they depend on FA2's sources and the compiler only), rather than
        # dropping them or recompiling FA2 (tens of minutes on a small machine).
        committed = args.out / f"{arch}.json"
        old = json.loads(committed.read_text()) if committed.exists() else {}
        if old.get("fa2") and old.get("header", {}).get("nvcc") == report["header"].get("nvcc"):
            report["fa2"] = old["fa2"]
            report["header"]["fa2_source"] = old["header"].get("fa2_source") or (
                f"carried over from the table of commit {old['header'].get('commit', '?')} (same nvcc)")
    return report


# ---------------------------------------------------------------------------------------
# --check

def check(new, old):
    """(failures, notes) of a fresh report against the committed one.

    Loops are matched by "<kernel instantiation>#<ordinal>", the ordinal counting the
    kernel's hot loops in address order: stable as long as a change does not add or
    remove a hot loop in front of another, and such a change must update the table anyway."""
    fails, notes = [], []
    for key, k in new["kernels"].items():
        o = old["kernels"].get(key)
        if o is None:
            if k["hot"]:
                fails.append(f"{key}: new hot kernel, not in the committed table")
            continue
        if k["hot"] or o["hot"]:
            if (k["spill_stores"] + k["spill_loads"]) > (o["spill_stores"] + o["spill_loads"]):
                fails.append(f"{key}: local-memory (spill) instructions {o['spill_stores']}/{o['spill_loads']} -> "
                             f"{k['spill_stores']}/{k['spill_loads']} (stores/loads)")
            if (k["stack"] or 0) > (o["stack"] or 0):
                fails.append(f"{key}: stack {o['stack']} -> {k['stack']} bytes")
        new_loops = {l["key"]: l for l in k["loops"]}
        old_loops = {l["key"]: l for l in o["loops"]}
        for lk in sorted(set(new_loops) | set(old_loops)):
            if lk not in old_loops:
                fails.append(f"{lk}: hot loop appeared")
            elif lk not in new_loops:
                fails.append(f"{lk}: hot loop disappeared")
            else:
                a, b = old_loops[lk]["slots_per_unit"], new_loops[lk]["slots_per_unit"]
                if b > a * WORSE:
                    fails.append(f"{lk}: {a:.2f} -> {b:.2f} issue slots per unit (more than 10% worse)")
                elif b < a / WORSE:
                    notes.append(f"{lk}: {a:.2f} -> {b:.2f} issue slots per unit (better)")
                elif b != a:
                    notes.append(f"{lk}: {a:.2f} -> {b:.2f} issue slots per unit (within 10%)")
    for key, o in old["kernels"].items():
        if key not in new["kernels"] and o["hot"]:
            fails.append(f"{key}: hot kernel disappeared")
    return fails, notes


# ---------------------------------------------------------------------------------------
# --launch-configs: the launchers' choices, recorded through the CPU emulator

def representative_calls(emu_lib):
    """Launches the emulated tests' small cases leave out: adaLN, whose block size and
    partial-sum shared memory follow C, at the models' widths (DiT S/B/L/XL 384/768/1024/
    1152, U-ViT S 512) and at the narrow widths of its warp-team kernels, in each dtype;
    the int8 ops in each dtype with the mma.sync kernels (DITKERNELS_DISABLE_WGMMA=1)
    and the wgmma ones, quantize_per_sample's path for rows that are not 8-aligned, and
    the Hopper GEMMs split along K (their reduce kernels)."""
    import torch

    torch.ops.load_library(str(emu_lib))
    ops = torch.ops.ditkernels_emu
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for C in (64, 256, 384, 512, 768, 1024, 1152):
            x, h, g = (torch.randn(2, 4, C, dtype=dtype) for _ in range(3))
            sh, sc, gate = (torch.randn(2, C, dtype=dtype) for _ in range(3))
            ops.ln_modulate(x, sh, sc, 1e-6)
            ops.ln_modulate_backward(g, x, sh, sc, 1e-6, None, None)
            ops.gated_residual_ln_modulate(x, h, gate, sh, sc, 1e-6)
            ops.gated_residual_ln_modulate_backward(g, g, x, h, gate, sh, sc, 1e-6, None, None)
    K, N = 64, 128
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_scale, act_scales, t = torch.rand(N) / 64, torch.rand(4) + 0.5, torch.tensor([0, 3])
    for disable_wgmma in ("1", ""):
        os.environ["DITKERNELS_DISABLE_WGMMA"] = disable_wgmma
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(2, 8, K, dtype=dtype)
            x_q = ops.quantize_per_sample(x, act_scales, t)
            ops.int8_gemm_dequant(x_q, w_q, w_scale, act_scales, t, None, dtype)
            ops.int8_linear(x, w_q, w_scale, act_scales, t, None)
            ops.quantize_per_sample(torch.randn(2, 8, 7, dtype=dtype), act_scales, t)  # K % 8: the scalar kernel
    os.environ.pop("DITKERNELS_DISABLE_WGMMA")
    # The split-K reduce kernels (Hopper's persistent GEMMs split K where few tiles).
    os.environ["DITKERNELS_SPLIT_K"] = "2"
    w_q2 = torch.randint(-127, 128, (N, 4 * K), dtype=torch.int8)  # two k-tiles of int8
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(2, 8, K, dtype=dtype)
        x_q = ops.quantize_per_sample(torch.randn(2, 8, 4 * K, dtype=dtype), act_scales, t)
        ops.int8_gemm_dequant(x_q, w_q2, w_scale, act_scales, t, None, dtype)
        if dtype != torch.float32:
            ops.skip_concat_linear(x, x, torch.randn(N, 2 * K, dtype=dtype), None)
    os.environ.pop("DITKERNELS_SPLIT_K")


def read_launch_log(text, emu_lib):
    """{kernel key: [{block, dyn_smem}]} of csrc/cuda's kernels in a DITKERNELS_EMU_LAUNCH_LOG,
    named from the emulator library's symbol table."""
    symbols = {}
    nm = subprocess.run(["nm", "-C", "--defined-only", str(emu_lib)], capture_output=True, text=True, check=True)
    for line in nm.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tT":
            symbols[int(parts[0], 16)] = parts[2]
    # The emulator's self-test kernels (csrc/emu/selftest.cpp) launch too; keep csrc/cuda's.
    ours = set(re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(",
                          "".join(p.read_text() for p in (ROOT / "csrc" / "cuda").glob("*.cu"))))
    configs = {}
    for line in text.splitlines():
        _, offset, _, block, smem = line.split("\t")
        name = symbols.get(int(offset, 16))
        if name is None:
            sys.exit(f"static_report: a logged kernel at {offset} has no symbol in {emu_lib}")
        key = kernel_key(name)
        if key.split("<")[0].split("::")[-1] not in ours:
            continue
        cfg = dict(block=[int(v) for v in block.split(",")], dyn_smem=int(smem))
        if cfg not in configs.setdefault(key, []):
            configs[key].append(cfg)
    for v in configs.values():
        v.sort(key=lambda c: (c["block"], c["dyn_smem"]))
    return configs


def record_launch_configs(emu_lib):
    """Runs the emulated CUDA tests' `racecheck` cases (one case of every kernel: each
    dtype, head dim, GEMM kernel and tile width) and representative_calls with the
    emulator's launch log on, names the logged kernels from the emulator library's
    symbol table and writes launch_configs.json."""
    log = Path(tempfile.mkdtemp()) / "launches.tsv"
    os.environ["DITKERNELS_EMU_LAUNCH_LOG"] = str(log)
    env = dict(os.environ, DITKERNELS_EMU_LIB=str(emu_lib))
    # With an in-place build the tests import this tree's package, not an older
    # installed one whose ops may differ (which silently drops their launches).
    if any((ROOT / "ditkernels").glob("_C*.so")):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    tests = ROOT / "python_tests" / "test_cuda_emulated.py"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", str(tests), "-m", "racecheck",
                          "-p", "no:cacheprovider"], env=env, cwd=ROOT / "python_tests")
    if res.returncode:
        sys.exit("static_report: the emulated tests failed; their launches are not a table to commit")
    representative_calls(emu_lib)
    configs = read_launch_log(log.read_text(), emu_lib)
    LAUNCH_CONFIGS.parent.mkdir(parents=True, exist_ok=True)
    LAUNCH_CONFIGS.write_text(json.dumps(dict(
        note="(block, dynamic shared memory) of every launch of the emulated tests' racecheck cases and "
             "static_report.representative_calls, per kernel instantiation; regenerate with "
             "benchmarks/static_report.py --launch-configs EMU_LIB",
        commit=git_commit(), kernels=dict(sorted(configs.items()))), indent=1) + "\n")
    print(f"static_report: {sum(map(len, configs.values()))} launch configurations of {len(configs)} kernels "
          f"-> {LAUNCH_CONFIGS.relative_to(ROOT)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--from-so", help="the built extension (default: the importable ditkernels._C)")
    src.add_argument("--compile", action="store_true", help="compile csrc/cuda/*.cu with nvcc -cubin")
    ap.add_argument("--arch", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--check", action="store_true", help="compare with the committed tables; write nothing")
    ap.add_argument("--fa2", action="store_true", help="add FlashAttention-2's hot loops (compiles and caches)")
    ap.add_argument("--launch-configs", metavar="EMU_LIB", type=Path,
                    help="re-record launch_configs.json through the emulator library, then exit")
    args = ap.parse_args(argv)

    if args.launch_configs:
        record_launch_configs(args.launch_configs.resolve())
        return 0
    status = 0
    so_listings = [None] * len(args.arch) if args.compile else dump(
        [(args.from_so or default_so(), arch) for arch in args.arch])
    for arch, so_listing in zip(args.arch, so_listings):
        report = build_report(arch, args, so_listing)
        if args.check:
            committed = args.out / f"{arch}.json"
            if not committed.exists():
                print(f"static_report: no committed {committed}; run without --check and commit it")
                status = 1
                continue
            fails, notes = check(report, json.loads(committed.read_text()))
            for n in notes:
                print(f"static_report {arch}: note: {n}")
            for f in fails:
                print(f"static_report {arch}: FAIL: {f}")
            if fails:
                status = 1
                print(f"static_report {arch}: hot kernels regressed (or the table is stale); if intended, "
                      "regenerate with `python benchmarks/static_report.py` and commit the tables with the change")
            elif any("better" in n for n in notes):
                print(f"static_report {arch}: improved; commit the new table (python benchmarks/static_report.py)")
            else:
                print(f"static_report {arch}: OK, {sum(len(k['loops']) for k in report['kernels'].values())} "
                      "hot loops as committed")
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{arch}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{arch}.md").write_text(to_markdown(report))
        print(f"static_report: wrote {args.out / arch}.md/.json ({len(report['kernels'])} kernels)")
    return status


if __name__ == "__main__":
    sys.exit(main())
