"""Benchmark runner: `python benchmarks/run.py [--quick] [--families adaln,dit] [--out DIR]`.

Measures every family against its baselines in the same run, prints a markdown
table per family and writes results.json + results.md to the output folder
(default benchmarks/out/<device>). GPU tables meant for the record are copied
to benchmarks/results/.
"""

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: an installed ditkernels (site-packages) takes precedence
# over the source tree, whose ditkernels/ has no compiled _C unless built in place.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BenchContext,
    environment,
    last_level_cache_bytes,
    markdown_table,
    measure_copy_gbps,
    table_header,
)

FAMILIES = ["adaln", "skip_concat_linear", "tmsa", "int8", "dit", "uvit", "diffusers"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--quick", action="store_true",
                    help="small shape subset (always on for CPU unless --full)")
    ap.add_argument("--full", action="store_true", help="the full shape grid even on CPU")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads while timing (default 1, as torch.utils."
                         "benchmark timed before: single-thread kernel efficiency)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds per measurement (default 0.5 CUDA, 0.2 CPU)")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if is_cuda else "fp32")]
    min_run_time = args.min_run_time or (0.5 if is_cuda else 0.2)
    quick = args.quick or (not is_cuda and not args.full)
    if not is_cuda:
        torch.set_num_threads(args.threads)
    cache_bytes = last_level_cache_bytes(device)
    ctx = BenchContext(device=device, dtype=dtype, quick=quick, min_run_time=min_run_time,
                       copy_gbps=measure_copy_gbps(device, dtype, min_run_time, cache_bytes),
                       compile=not args.no_compile, cache_bytes=cache_bytes)
    env = environment(ctx)
    tag = env.get("gpu", "cpu").replace(" ", "_")
    out = args.out or ROOT / "benchmarks" / "out" / tag
    out.mkdir(parents=True, exist_ok=True)

    header = table_header(env)
    print(header)
    results, sections = {}, ["# ditkernels benchmarks\n"]
    for family in filter(None, args.families.split(",")):
        module = importlib.import_module(f"benchmarks.bench_{family}")
        t0 = time.perf_counter()
        rows = module.run(ctx)
        seconds = time.perf_counter() - t0
        results[family] = rows
        # The header above every table: a table copied alone still names its machine.
        table = f"{header}\n\n{markdown_table(rows, module.COLUMNS)}"
        sections.append(f"## {family}\n\n{table}\n")
        # The seconds each family took size gpu_check.sh's benchmark phase.
        print(f"\n## {family} ({seconds:.0f} s)\n{table}", flush=True)
        # Written after every family, so a run cut short keeps what it measured.
        (out / "results.json").write_text(json.dumps({"environment": env, "results": results},
                                                     indent=1, default=str))
        (out / "results.md").write_text("\n".join(sections))
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")

if __name__ == "__main__":
    main()
