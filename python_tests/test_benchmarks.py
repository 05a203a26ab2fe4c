"""The benchmark machinery that runs without a GPU: interleaving, the choice between
CUDA events and graph replay (with fake CUDA samplers), the event sampler's order of
flush, events and call (with fake events), the cache rule for bandwidth claims, the
table header, the shape lists the issues ask for, and gpu_check.sh's preflight."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Appended: an installed ditkernels keeps precedence over the source tree.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import bench_adaln, bench_int8, bench_tmsa, common  # noqa: E402
from benchmarks.common import BenchContext, Timing  # noqa: E402


def make_ctx(device="cpu", quick=True, cache_bytes=1 << 20, min_run_time=0.01):
    return BenchContext(device=torch.device(device), dtype=torch.float32, quick=quick,
                        min_run_time=min_run_time, copy_gbps=100.0, compile=False,
                        cache_bytes=cache_bytes)


def test_rotations_start_each_round_one_further():
    rounds = list(common.rotations(["a", "b", "c"], 4))
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert list(common.rotations(["a", "b"], 1, first=1)) == [["b", "a"]]


class RecordingSampler:
    timer, l2_flushed = "fake", False

    def __init__(self, name, log, seconds):
        self.name, self.log, self.seconds = name, log, seconds

    def sample(self, reps):
        self.log.append((self.name, reps, os.environ.get("BENCH_TEST_SWITCH")))
        return [self.seconds] * reps


def test_interleave_rotates_blocks_and_sets_each_env(monkeypatch):
    monkeypatch.delenv("BENCH_TEST_SWITCH", raising=False)
    log = []
    samplers = {n: RecordingSampler(n, log, s) for n, s in (("x", 1.0), ("y", 2.0))}
    samples, wall = common.interleave(samplers, {"x": 2, "y": 1}, 3,
                                      {"y": {"BENCH_TEST_SWITCH": "1"}})
    assert log == [("x", 2, None), ("y", 1, "1"), ("y", 1, "1"), ("x", 2, None),
                   ("x", 2, None), ("y", 1, "1")]
    assert samples == {"x": [1.0] * 6, "y": [2.0] * 3}
    assert set(wall) == {"x", "y"} and all(w >= 0 for w in wall.values())
    assert "BENCH_TEST_SWITCH" not in os.environ


def test_compare_on_cpu_gives_min_median_max_and_reports_failures():
    def boom():
        raise ValueError("no such baseline here\nsecond line")

    makers = {"fast": common.prebuilt(lambda: sum(range(10))),
              "slow": common.prebuilt(lambda: sum(range(2000))),
              "flaky": lambda: boom}
    times = common.compare(makers, make_ctx(), may_fail=["flaky"])
    assert list(times) == ["fast", "slow", "flaky"]
    assert times["flaky"] == "ValueError: no such baseline here"
    for name in ("fast", "slow"):
        t = times[name]
        assert isinstance(t, Timing) and t.timer == "wall clock, cache warm"
        assert len(t.samples) >= common.MIN_ROUNDS
        assert 0 < t.min <= t.median <= t.max
    with pytest.raises(ValueError):
        common.compare({"flaky": lambda: boom}, make_ctx())


class FakeCudaSampler:
    """Stands in for both CUDA samplers: a fixed time per call, no device."""
    l2_flushed = True

    def __init__(self, fn, flush_or_calls):
        self.fn = fn
        self.calls = flush_or_calls if isinstance(flush_or_calls, int) else None
        self.timer = "graph" if self.calls else "events"
        self.l2_flushed = self.calls is None

    def sample(self, reps):
        return [self.fn()] * reps


@pytest.mark.parametrize("fastest_s, expect", [(5e-6, "graph"), (50e-6, "events")])
def test_compare_on_cuda_replays_graphs_only_for_short_cases(monkeypatch, fastest_s, expect):
    monkeypatch.setattr(common, "CudaEventSampler", FakeCudaSampler)
    monkeypatch.setattr(common, "CudaGraphSampler", FakeCudaSampler)
    monkeypatch.setattr(common, "_flush_buffer", lambda device: object())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    times = common.compare({"ours": common.prebuilt(lambda: fastest_s),
                            "theirs": common.prebuilt(lambda: 1e-3)}, make_ctx("cuda"))
    # One method for the whole case: the ratio between the two is fair.
    assert {t.timer for t in times.values()} == {expect}
    if expect == "graph":
        assert not times["ours"].l2_flushed
    assert times["ours"].median == fastest_s


def test_event_sampler_flushes_outside_the_events(monkeypatch):
    log = []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing
            self.t = None

        def record(self):
            log.append("record")
            self.t = len(log)

        def elapsed_time(self, end):  # milliseconds, as CUDA's
            return float(end.t - self.t)

    class FakeFlush:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    sampler = common.CudaEventSampler(lambda: log.append("call"), FakeFlush())
    assert sampler.sample(2) == [2e-3, 2e-3]
    assert log == ["flush", "record", "call", "record"] * 2 + ["sync"]


def test_bandwidth_is_claimed_only_out_of_cache():
    ctx = make_ctx(cache_bytes=1000)
    warm = Timing([1e-6], "wall clock, cache warm", False)
    assert common.bandwidth_columns(1999, warm, ctx) == {
        "GB/s": None, "frac_copy_bw": None, "cache": "LLC-resident"}
    big = common.bandwidth_columns(2000, warm, ctx)
    assert big["cache"] == ">= 2x LLC" and big["GB/s"] == pytest.approx(2000 / 1e-6 / 1e9)
    assert big["frac_copy_bw"] == pytest.approx(big["GB/s"] / ctx.copy_gbps)
    flushed = common.bandwidth_columns(10, Timing([1e-6], "events", True), make_ctx("cuda"))
    assert flushed["cache"] == "L2 flushed" and flushed["GB/s"] is not None
    unknown = common.bandwidth_columns(1 << 40, warm, make_ctx(cache_bytes=None))
    assert unknown["GB/s"] is None


def test_speedups_divide_baseline_median_by_the_rows():
    times = {"eager": Timing([2.0, 4.0, 9.0], "t", False), "ours": Timing([1.0], "t", False),
             "broken": "out of memory"}
    cols = {"vs_eager": "eager", "vs_compile": "torch.compile"}
    assert common.speedups(times, "ours", cols) == {"vs_eager": 4.0, "vs_compile": None}
    assert common.speedups(times, "broken", cols)["vs_eager"] is None


def test_table_header_names_device_clocks_driver_cuda_torch_and_commit():
    env = {"gpu": "NVIDIA H200", "sm_count": 132, "cache_bytes": 60 << 20,
           "torch_cuda": "13.0", "torch": "2.11.0+cu130", "dtype": "bfloat16",
           "copy_gbps": 4300.0, "date": "2026-12-02T08:00:00+00:00",
           "git_commit": "abc123", "clock_rate_khz": 1980000,
           "nvidia_smi": {"clocks.sm": "1980", "clocks.max.sm": "1980", "clocks.mem": "3201",
                          "driver_version": "580.159.03"}}
    header = common.table_header(env)
    for part in ("NVIDIA H200 (132 SMs, L2 60 MB)", "SM clock 1980 MHz (max 1980)",
                 "driver 580.159.03", "CUDA 13.0", "torch 2.11.0+cu130", "commit abc123"):
        assert part in header
    env["nvidia_smi"] = {}
    assert "SM clock max 1980 MHz (device props)" in common.table_header(env)
    cpu = {"cpu": "Xeon", "cpu_threads": 2, "cache_bytes": None, "torch": "2.14.1",
           "dtype": "float32", "copy_gbps": 4.0, "date": "d", "git_commit": None}
    assert common.table_header(cpu).startswith("CPU Xeon (torch threads 2, LLC n/a)")


def test_tmsa_cuda_cases_fill_an_h100():
    cases = bench_tmsa.cases(make_ctx(quick=False))
    for B, H, G, D in cases:
        assert B * H * -(-G * G // 64) >= 4 * 132
    got = {(G * G, D) for _, _, G, D in cases}
    assert {(1024, 64), (1024, 72), (4096, 64), (4096, 72)} <= got
    assert bench_tmsa.cases(make_ctx()) == [(2, 2, 8, 32)]


def test_quick_shapes_hold_the_cpu_kernel_cases():
    assert {(8, 256, 384), (4, 256, 1152)} <= set(bench_adaln.shapes(make_ctx()))
    assert max(B * 64 for _, B, _, _ in bench_int8._cases(make_ctx())) >= 1024


def test_adaln_backward_alone_matches_the_backward_of_forward_backward():
    inputs = bench_adaln.make_inputs("gated_residual_ln_modulate", 2, 4, 8, make_ctx())
    from ditkernels import reference

    fn = reference.gated_residual_ln_modulate
    torch.manual_seed(0)
    both = bench_adaln.pass_fn(fn, inputs, "fwd+bwd")()
    torch.manual_seed(0)
    backward = bench_adaln.pass_fn(fn, inputs, "bwd")
    first, again = backward(), backward()  # the kept graph runs again
    for a, b, c in zip(both, first, again):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(b, c)
    assert bench_adaln.tensor_passes("ln_modulate", "fwd+bwd") == 5


def run_preflight(tmp_path, facts, *args):
    """gpu_check.sh --preflight with a `python` on PATH whose torch reports `facts`
    (torch, CUDA, GPU, arch, ninja, pytest) and without compute-sanitizer."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(
        "#!/bin/sh\ncase \"$*\" in *is_ninja_available*) echo " + facts + ";; "
        f"*) exec {sys.executable} \"$@\";; esac\n")
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:/usr/bin:/bin", "CUDA_HOME": str(tmp_path)}
    env.pop("CUDA_PATH", None)
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--preflight",
                           str(tmp_path / "out"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_gpu_check_preflight_adapts_to_what_the_machine_lacks(tmp_path):
    ok = run_preflight(tmp_path, "2.11.0 13.0 NVIDIA_H200 9.0a no yes")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = ok.stdout.splitlines()[0]
    for part in ("torch 2.11.0 (CUDA 13.0)", "GPU NVIDIA H200 (sm 9.0a)", "ninja no (serial",
                 "pytest yes", "compute-sanitizer absent", f"nvcc {tmp_path}/bin/nvcc"):
        assert part in line
    assert "memcheck phase is skipped" in ok.stdout
    assert (tmp_path / "out" / "summary.txt").read_text() == ok.stdout


def test_gpu_check_preflight_fails_fast_without_gpu_or_pytest(tmp_path):
    bad = run_preflight(tmp_path, "2.11.0 13.0 none none yes no")
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[-1] == (
        "preflight: cannot run, missing: a visible CUDA GPU, pytest")


def test_nvidia_smi_is_asked_by_pci_address_and_parsed(tmp_path, monkeypatch):
    props = type("Props", (), dict(pci_domain_id=0, pci_bus_id=0x19, pci_device_id=0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = --id=00000000:19:00.0 ] || exit 6\n'
                   'echo "NVIDIA H200, 580.159.03, 1980, 1980, 3201, 3201"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    reading = common.nvidia_smi(torch.device("cuda"))
    assert reading == dict(zip(common.NVIDIA_SMI_FIELDS, [
        "NVIDIA H200", "580.159.03", "1980", "1980", "3201", "3201"]))
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert common.nvidia_smi(torch.device("cuda")) == {}


def test_graph_sampler_captures_calls_after_a_side_stream_warmup(monkeypatch):
    log = []

    class FakeStream:
        def wait_stream(self, other):
            log.append("wait")

    class FakeGraph:
        def replay(self):
            log.append("replay")

    class Capture:
        def __init__(self, name, *args):
            self.name = name

        def __enter__(self):
            log.append(f"enter {self.name}")

        def __exit__(self, *exc):
            log.append(f"exit {self.name}")

    class FakeEvent:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = len(log)

        def elapsed_time(self, end):
            return 6.0  # ms for one replay

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: Capture("side stream"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Capture("capture"))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    sampler = common.CudaGraphSampler(lambda: log.append("call"), calls=4)
    assert log == (["wait", "enter side stream"] + ["call"] * 3 + ["exit side stream", "wait",
                   "enter capture"] + ["call"] * 4 + ["exit capture"])
    assert sampler.timer == "CUDA graph x4, L2 warm" and not sampler.l2_flushed
    assert sampler.sample(2) == [1.5e-3, 1.5e-3]


def test_git_commit_falls_back_to_the_named_commit_without_git(monkeypatch):
    monkeypatch.setattr(common, "_command", lambda *args: None)
    monkeypatch.setenv("DITKERNELS_BENCH_COMMIT", "0123abcd")
    assert common.git_commit() == "0123abcd"
