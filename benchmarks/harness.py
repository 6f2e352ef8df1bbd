"""The one benchmark harness every ``benchmarks/bench_*.py`` uses.

What it does, and why:

* **Timing.** Warm-up runs, then many timed runs (as many as fit a time budget, between a minimum and a
  maximum count); we report the median and the 10th/90th percentiles in ms. On the CPU each run is
  timed with ``time.perf_counter`` (CPU ops are synchronous). On CUDA there are two methods:
  ``cuda_event`` (CUDA events around one eager call, the device synchronized before each run, so the
  time includes the host's dispatch whenever the host is the bottleneck, as it is for a user of eager
  code) and ``cuda_graph`` (the callable is captured once into a CUDA graph and replayed; the events
  then measure device time only, which is how the engine runs a training step).
* **Cold caches.** See ``plan_cold``: inputs rotate among pre-allocated copies, or a buffer twice the
  last-level cache is written before each run.
* **Roofline units.** ``measure_bandwidth`` measures what plain streaming achieves on this device,
  once per process; each result carries ``floor_ms = bytes / bandwidth`` for the op's minimal traffic
  model, the achieved GB/s and its % of the measured bandwidth.
* **--check.** ``check_impls``: each impl's loss and gradients against eager in float64 before timing,
  budget 2 x eager's own error + a per-dtype floor (``CHECK_FLOOR``); failures are recorded, not timed.
* **Results.** One row per (case, impl, timing method) with the environment, appended to ONE CSV
  (``benchmarks/results/results.csv``), and a markdown table printed per benchmark.

Usage from a bench file (see ``bench_dmd.py``)::

    parser = harness.make_parser(__doc__)
    cfg = harness.parse_config(parser)
    bench = harness.Bench("dmd", cfg)
    inputs = bench.make_inputs(factory, copy_bytes)
    bench.time(case="...", dtype=..., impl="eager", fn=step, inputs=inputs, nbytes=..., setup=reset)
    bench.finish()          # speedups, markdown table, CSV
    sys.exit(bench.exit_code())

``python benchmarks/harness.py bandwidth`` prints the measured bandwidth; ``python benchmarks/harness.py
report`` prints markdown tables of the latest CSV rows.
"""

from __future__ import annotations

import argparse
import ctypes
import csv
import dataclasses
import datetime
import functools
import gc
import importlib
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_CSV = BENCH_DIR / "results" / "results.csv"

MiB = 1 << 20
GiB = 1 << 30

# ----------------------------------------------------------------------------------------------------
# Device facts


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 on CUDA; the largest cache level sysfs reports on the CPU (64 MiB when unknown).

    On a VM the reported L3 can be the host's whole cache (480 MiB on the 2-core dev VM, where copies
    of 128 MiB already run at DRAM speed); we still use the reported size: too big only costs memory.
    """
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 64 * MiB)
    best_level, best = -1, 0
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(root.glob("index*")) if root.exists() else []:
        try:
            level = int((idx / "level").read_text())
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            size = _parse_size((idx / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if level > best_level or (level == best_level and size > best):
            best_level, best = level, size
    return best or 64 * MiB


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if text and text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * GiB  # unknown: assume a small machine


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class CpuLoad:
    """CPU time that *other* processes used between two samples, as a fraction of all cores.

    The dev machine has 2 cores shared with other sessions' builds and tests; two processes each running
    2 OpenMP threads there can slow each other down by an order of magnitude (spin-waiting threads lose their core), so every
    measurement records this and the table flags the ones taken on a busy machine. Linux only (0 else).
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:2])  # this process, every thread; inductor's compile workers are children
        return busy, own, time.monotonic()

    def others(self) -> float:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return 0.0
        (b0, o0, t0), (b1, o1, t1) = self.start, end
        return max((b1 - b0) - (o1 - o0), 0.0) / ((t1 - t0) * (os.cpu_count() or 1))


BUSY_WARN = 0.10  # other processes' share of all cores above which a timing is flagged


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Environment recorded with every row (no hostname, on purpose)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short hash of HEAD, "+dirty" when tracked files differ from it; "none" before the first commit."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "none"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed, or broken: either way not what we time
        triton_version = "none"
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ----------------------------------------------------------------------------------------------------
# Cold caches
#
# Two ways to keep a timed run from finding its inputs in the last-level cache (LLC):
#   rotate: k pre-allocated copies of the inputs used round-robin, with (k - 1) * copy_bytes >= 2 x LLC,
#           so that between two uses of a copy at least twice the LLC of other data has streamed
#           through and evicted it. Costs memory, no time.
#   flush:  before each run (outside the timed region) read-modify-write a buffer of 2 x LLC. Costs
#           time per run. It is a read-modify-write (add_), not a fill: glibc's memset and other
#           large fills may use non-temporal stores, which bypass the cache and evict nothing.
# Defaults ("auto"):
#   CPU:  rotate. The LLC reported there is large (480 MiB on the dev VM), so a flush would write ~1 GiB
#         per run, ~40 ms at ~26 GB/s: it would double or triple the wall time of the small shapes
#         (1-5 ms per run) for no better answer, while RAM is plentiful. The pool is capped at 1/4 of
#         the available memory; when that cannot reach 2 x LLC we flush instead. The rotation position
#         carries over from one impl to the next (InputPool), so the guarantee holds across them.
#   CUDA: flush. L2 is 50 MiB on H100/H200, so writing 100 MiB costs ~40 us per run; and graph replay,
#         the engine's timing path, captures one set of input pointers, so rotating would need one
#         graph per copy. Both CUDA methods flush so that their rows compare like for like.


@dataclasses.dataclass(frozen=True)
class ColdPlan:
    copies: int  # input copies to allocate and rotate through
    flush_bytes: int  # 0: no flush before each run
    why: str

    def describe(self) -> str:
        if self.flush_bytes:
            return f"flush {self.flush_bytes // MiB} MiB"
        return f"rotate x{self.copies}" if self.copies > 1 else "warm"


def plan_cold(copy_bytes: int, device: torch.device, mode: str = "auto") -> ColdPlan:
    """How to keep caches cold for inputs of ``copy_bytes`` bytes (inputs + outputs of one run)."""
    llc = last_level_cache_bytes(device)
    target = 2 * llc
    flush_bytes = max(target, 64 * MiB)
    if mode == "none":
        return ColdPlan(1, 0, "cold caches disabled (--cold none)")
    if mode == "flush" or (mode == "auto" and device.type == "cuda"):
        return ColdPlan(1, flush_bytes, f"flush 2 x LLC ({llc // MiB} MiB) before each run")
    if mode not in ("auto", "rotate"):
        raise ValueError(f"cold mode {mode!r}: choose auto, rotate, flush or none")
    need = math.ceil(target / max(copy_bytes, 1)) + 1
    # Not capped at the number of runs: copies are made (written) just before timing, so the pool as a
    # whole must exceed the cache or the last-made copies would still be in it when their turn comes.
    copies = max(2, need)
    budget = available_memory_bytes(device) // 4
    if copies * copy_bytes > budget:
        if mode == "rotate":
            fit = max(2, budget // max(copy_bytes, 1))
            return ColdPlan(int(fit), 0, f"rotate: only {fit} copies fit in 1/4 of free memory (cache may be warm)")
        return ColdPlan(1, min(flush_bytes, budget), "rotation would not fit in 1/4 of free memory; flushing")
    return ColdPlan(copies, 0, f"rotate {copies} copies of {copy_bytes / MiB:.1f} MiB (LLC {llc // MiB} MiB)")


class InputPool:
    """Copies of one case's inputs, handed out round-robin; the position persists across time_fn calls."""

    def __init__(self, copies: Sequence[tuple], plan: ColdPlan | None = None):
        if not copies:
            raise ValueError("InputPool needs at least one copy")
        self.copies, self.plan, self.pos = list(copies), plan, 0

    def next(self) -> tuple:
        args = self.copies[self.pos % len(self.copies)]
        self.pos += 1
        return args

    def first(self) -> tuple:
        return self.copies[0]

    def __len__(self) -> int:
        return len(self.copies)


class _Flusher:
    def __init__(self, nbytes: int, device: torch.device):
        self.buf = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=device) if nbytes else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.add_(1)


# ----------------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    times_ms: list[float]
    method: str  # "perf_counter" | "cuda_event" | "cuda_graph"

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p10_ms(self) -> float:
        return quantile(self.times_ms, 0.10)

    @property
    def p90_ms(self) -> float:
        return quantile(self.times_ms, 0.90)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


METHODS = ("perf_counter", "cuda_event", "cuda_graph")


def time_fn(
    fn: Callable[..., Any],
    inputs: InputPool | Sequence[tuple],
    *,
    device: torch.device,
    method: str = "auto",
    setup: Callable[..., Any] | None = None,
    flush_bytes: int = 0,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 100,
    budget_s: float = 1.0,
) -> Timing:
    """Time ``fn(*args)``, args rotating over the pool's copies; ``setup(*args)`` runs untimed before each.

    The number of timed runs is ``budget_s`` / (median warm-up time), clamped to [min_reps, max_reps].
    ``cuda_graph`` captures ``fn(*pool.first())`` once (after ``setup``) and replays it; ``setup`` is not
    called between replays and only that copy is used, so use ``flush_bytes`` for cold caches.
    CUDA methods time on the current device (``parse_config`` makes ``--device`` current).
    """
    device = torch.device(device)
    pool = inputs if isinstance(inputs, InputPool) else InputPool(inputs)
    if method == "auto":
        method = "cuda_graph" if device.type == "cuda" else "perf_counter"
    if method not in METHODS:
        raise ValueError(f"timing method {method!r}: choose one of {METHODS}")
    if (device.type == "cuda") != (method != "perf_counter"):
        raise ValueError(f"timing method {method} does not apply to a {device.type} device")
    flush = _Flusher(flush_bytes, device)
    warmup = max(warmup, 1)

    def choose_reps(warm_ms: list[float]) -> int:
        est = statistics.median(warm_ms[1:] or warm_ms)  # the first run pays one-time costs
        return int(min(max(math.ceil(budget_s * 1e3 / max(est, 1e-3)), min_reps), max_reps))

    if method == "perf_counter":

        def run() -> float:
            args = pool.next()
            if setup is not None:
                setup(*args)
            flush()
            t0 = time.perf_counter()
            fn(*args)
            return (time.perf_counter() - t0) * 1e3

        reps = choose_reps([run() for _ in range(warmup)])
        gc.collect()
        gc.disable()  # a collection inside a timed run is noise, not the op's cost
        try:
            times = [run() for _ in range(reps)]
        finally:
            gc.enable()
        return Timing(times, method)

    def event_pair() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    if method == "cuda_event":

        def run_events(n: int) -> list[float]:
            pairs = []
            for _ in range(n):
                args = pool.next()
                if setup is not None:
                    setup(*args)
                flush()
                torch.cuda.synchronize(device)  # empty queue: the interval includes host dispatch
                start, end = event_pair()
                start.record()
                fn(*args)
                end.record()
                pairs.append((start, end))
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in pairs]

        reps = choose_reps(run_events(warmup))
        return Timing(run_events(reps), method)

    # cuda_graph: warm up on a side stream (lazy init, autotuning, allocator), capture once, replay.
    args = pool.first()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 3)):
            if setup is not None:
                setup(*args)
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    if setup is not None:
        setup(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    torch.cuda.synchronize(device)

    def run_replays(n: int) -> list[float]:
        # No synchronize per replay: the host queues ahead, so each interval is device time only.
        pairs = []
        for _ in range(n):
            flush()
            start, end = event_pair()
            start.record()
            graph.replay()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in pairs]

    try:
        reps = choose_reps(run_replays(warmup))
        return Timing(run_replays(reps), method)
    finally:
        del graph


# ----------------------------------------------------------------------------------------------------
# Achievable memory bandwidth


@dataclasses.dataclass(frozen=True)
class Bandwidth:
    gbps: float  # used for floors: the better of the two patterns
    copy_gbps: float  # dst.copy_(src), counted as read + write
    add_gbps: float  # torch.add(a, b, out=c), counted as 2 reads + 1 write
    buffer_bytes: int

    def floor_ms(self, nbytes: int) -> float:
        return nbytes / (self.gbps * 1e9) * 1e3

    def describe(self) -> str:
        return (
            f"{self.gbps:.1f} GB/s (copy {self.copy_gbps:.1f}, add {self.add_gbps:.1f}; "
            f"{self.buffer_bytes // MiB} MiB buffers)"
        )


_BANDWIDTH: dict[str, Bandwidth] = {}


def measure_bandwidth(device: torch.device, *, reps: int = 10) -> Bandwidth:
    """Measure once per process and device: a device copy and an a+b add over buffers >= 256 MiB.

    Buffers are max(256 MiB, LLC on the CPU, 8 x L2 on CUDA), at most 1 GiB (CPU) and 1/8 of the free
    memory each, so they stream from DRAM/HBM. Traffic is counted the STREAM way (copy = 2 x size,
    add = 3 x size; no write-allocate), so a read-heavy kernel can land a little above 100%. We keep the
    better of the two: the floor should be what plain streaming achieves here, not a pessimistic guess.
    """
    device = torch.device(device)
    key = str(device)
    if key in _BANDWIDTH:
        return _BANDWIDTH[key]
    llc = last_level_cache_bytes(device)
    size = max(256 * MiB, llc if device.type == "cpu" else 8 * llc)
    size = min(size, 1 * GiB if device.type == "cpu" else 4 * GiB, available_memory_bytes(device) // 8)
    n = size // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.full((n,), 2.0, dtype=torch.float32, device=device)
    c = torch.zeros(n, dtype=torch.float32, device=device)  # all pages touched before timing
    method = "cuda_event" if device.type == "cuda" else "perf_counter"
    kw = dict(device=device, method=method, warmup=2, min_reps=reps, max_reps=reps, budget_s=0.0)
    copy_ms = time_fn(lambda: c.copy_(a), [()], **kw).median_ms
    add_ms = time_fn(lambda: torch.add(a, b, out=c), [()], **kw).median_ms
    copy_gbps = 2 * n * 4 / (copy_ms * 1e-3) / 1e9
    add_gbps = 3 * n * 4 / (add_ms * 1e-3) / 1e9
    del a, b, c
    bw = Bandwidth(max(copy_gbps, add_gbps), copy_gbps, add_gbps, n * 4)
    _BANDWIDTH[key] = bw
    return bw


# ----------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Result:
    date: str
    commit: str
    benchmark: str
    case: str  # shape and variant, e.g. "64x16x64x64 cfg=1.75"
    dtype: str
    impl: str  # "eager", "compile", "flashdistill:cpu", ...
    timing: str  # "perf_counter" | "cuda_event" | "cuda_graph"
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int
    bytes: int  # the op's minimal traffic model
    floor_ms: float  # bytes / measured bandwidth
    gbps: float  # bytes / median time
    pct_of_bw: float  # gbps / measured bandwidth, in %
    speedup_vs_eager: float | None  # eager median / this median, same case, dtype and timing
    bw_gbps: float  # the measured bandwidth used for floor_ms and pct_of_bw
    cold: str  # how caches were kept cold
    device: str
    threads: int  # torch CPU threads (0 on CUDA)
    torch: str
    triton: str
    python: str
    other_load_pct: float  # CPU time other processes used during the measurement, % of all cores
    note: str = ""


CSV_FIELDS = [f.name for f in dataclasses.fields(Result)]


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def append_csv(rows: Sequence[Result], path: Path) -> None:
    """Append rows to the one results CSV; write the header when the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", newline="") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)  # two benches appending at once must not interleave rows
        except (ImportError, OSError):
            pass
        f.seek(0)
        first = f.readline().strip()
        if first and first != ",".join(CSV_FIELDS):
            raise RuntimeError(
                f"{path} has a different header than this harness writes:\n  {first}\n  {','.join(CSV_FIELDS)}\n"
                "move the old file aside (or convert it); rows of two layouts must not mix in one file"
            )
        f.seek(0, os.SEEK_END)
        w = csv.writer(f)
        if not first:
            w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow([_csv_value(getattr(r, k)) for k in CSV_FIELDS])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt(v: Any, digits: int = 3) -> str:
    """``v`` to ``digits`` significant digits (more for large values: never scientific notation); "–" for
    None or ""."""
    if v is None or v == "":
        return "–"
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    # `digits` significant digits, never scientific notation for the ranges we print
    decimals = max(digits - 1 - math.floor(math.log10(abs(v))), 0)
    return f"{v:.{decimals}f}"


def markdown_table(rows: Sequence[Result | dict], title: str = "", header_lines: Sequence[str] = ()) -> str:
    """One markdown table; a timing column only when the rows use more than one method.

    Rows are Result objects or CSV dicts. A median marked * was measured while other processes used
    more than BUSY_WARN of the CPUs.
    """

    def get(r, k):
        return r.get(k, "") if isinstance(r, dict) else getattr(r, k)

    multi = len({get(r, "timing") for r in rows}) > 1
    cols = ["case", "dtype", "impl"] + (["timing"] if multi else [])
    nums = ["median ms", "p10 ms", "p90 ms", "floor ms", "GB/s", "% bw", "vs eager"]
    lines = [f"### {title}", ""] if title else []
    lines += [*header_lines, ""] if header_lines else []
    lines += ["| " + " | ".join(cols + nums) + " |", "|" + "---|" * len(cols) + "---:|" * len(nums)]
    busy = False
    for r in rows:
        cells = [get(r, "case"), get(r, "dtype"), get(r, "impl")] + ([get(r, "timing")] if multi else [])
        load, sp, pct = get(r, "other_load_pct"), get(r, "speedup_vs_eager"), get(r, "pct_of_bw")
        mark = "*" if load not in (None, "") and float(load) > 100 * BUSY_WARN else ""
        busy = busy or bool(mark)
        cells += [
            fmt(get(r, "median_ms")) + mark,
            fmt(get(r, "p10_ms")),
            fmt(get(r, "p90_ms")),
            fmt(get(r, "floor_ms")),
            fmt(get(r, "gbps")),
            fmt(pct, 2) + ("%" if pct not in (None, "") else ""),
            (fmt(sp) + "x") if sp not in (None, "") else "–",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if busy:
        lines += ["", f"\\* other processes used more than {BUSY_WARN:.0%} of the CPUs during this measurement: not reliable"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# CLI and the per-benchmark runner

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}  # fmt: skip
_TIMING_ALIASES = {"event": "cuda_event", "graph": "cuda_graph", "cuda_event": "cuda_event", "cuda_graph": "cuda_graph"}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class Config:
    device: torch.device
    dtype: torch.dtype | None  # None: the bench's default for the device
    quick: bool
    backends: list[str] | None  # None: the bench's default
    csv: Path | None  # None: do not write
    timings: list[str]
    cold: str
    compile: bool
    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float
    args: argparse.Namespace  # everything, including the bench's own options

    def dtype_or(self, cpu: torch.dtype, cuda: torch.dtype) -> torch.dtype:
        return self.dtype or (cuda if self.device.type == "cuda" else cpu)


def make_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The options every bench shares; a bench adds its own before ``parse_config``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: per bench (fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--quick", action="store_true", help="smoke test: fewer shapes and runs")
    p.add_argument("--backends", default=None, help="comma list of flashdistill backends to time (default: every "
                   "available one except reference, and except triton on CPU); 'none' for only eager/compile")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compiling is slow on CPU)")
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="results CSV to append to (default: %(default)s)")
    p.add_argument("--no-csv", action="store_true", help="print only; append nothing")
    p.add_argument("--timing", default=None, help="CUDA only: comma list of graph (replay a captured graph, the "
                   "engine's path) and event (one eager call between events); default: graph,event")
    p.add_argument("--cold", default="auto", choices=["auto", "rotate", "flush", "none"],
                   help="how to keep caches cold (default: rotate on CPU, flush on CUDA; see harness.plan_cold)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per measurement (default 3, quick 1)")
    p.add_argument("--reps", type=int, default=None, help="fixed number of timed runs (default: fill --budget)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed runs per measurement (default 2, quick 0.2)")
    return p  # fmt: skip


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> Config:
    a = parser.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # events and streams below use the current device
    if device.type == "cuda":
        names = (a.timing or "graph,event").split(",")
        try:
            timings = [_TIMING_ALIASES[t.strip()] for t in names if t.strip()]
        except KeyError as e:
            parser.error(f"--timing: unknown method {e}; choose graph and/or event")
    else:
        if a.timing not in (None, "perf_counter"):
            parser.error("--timing applies to CUDA only; the CPU is timed with time.perf_counter")
        timings = ["perf_counter"]
    backends = None
    if a.backends is not None:
        backends = [b.strip() for b in a.backends.split(",") if b.strip() and b.strip() != "none"]
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    min_reps, max_reps = (3, 10) if a.quick else (5, 200)
    if a.reps is not None:
        min_reps = max_reps = a.reps
    return Config(
        device=device,
        dtype=_DTYPES[a.dtype] if a.dtype else None,
        quick=a.quick,
        backends=backends,
        csv=None if a.no_csv else Path(a.csv),
        timings=timings,
        cold=a.cold,
        compile=not a.no_compile,
        warmup=warmup,
        min_reps=min_reps,
        max_reps=max_reps,
        budget_s=a.budget if a.budget is not None else (0.2 if a.quick else 2.0),
        args=a,
    )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``--shapes`` text like ``16x4x64x64,8x16x16x64x64`` as tuples."""
    return [tuple(int(d) for d in s.strip().split("x")) for s in text.split(",") if s.strip()]


def import_flashdistill(bench: str, *extra: str):
    """flashdistill (and the modules named in ``extra``), imported lazily so that the harness and a
    bench's --help work without the package; a missing build is one clear message naming the bench."""
    try:
        mods = [importlib.import_module(name) for name in ("flashdistill",) + extra]
    except ImportError as e:
        raise SystemExit(f"{bench}: cannot import flashdistill ({e}); from the repo root: pip install -e .") from e
    return tuple(mods) if extra else mods[0]


def choose_backends(fd, cfg: Config, name: str) -> list[str]:
    """The flashdistill backends a benchmark times: ``--backends`` as given (each must be available),
    else every available one except reference (that is eager) and triton on the CPU (interpreter
    times mean nothing); says which were skipped and why. ``fd`` is the imported package."""
    device = cfg.device
    avail = list(fd.available_backends(device))
    if cfg.backends is not None:
        for b in cfg.backends:
            if b != "auto" and b not in avail:
                raise SystemExit(f"{name}: backend {b!r} is not available on {device}: "
                                 f"{fd.backend_status(b, device)[1]}")
        if "triton" in cfg.backends and device.type == "cpu":
            log(f"[{name}] warning: triton on the CPU runs in the interpreter; its times mean nothing")
        return cfg.backends
    chosen = [b for b in avail if b != "reference" and not (b == "triton" and device.type == "cpu")]
    skipped = ["reference (= eager)"]
    if "triton" in avail and device.type == "cpu":
        skipped.append("triton (interpreter on CPU)")
    skipped += [f"{b} ({fd.backend_status(b, device)[1]})" for b in fd.BACKENDS if b not in avail]
    log(f"[{name}] flashdistill backends timed: {', '.join(chosen) or 'none'}; skipped: {'; '.join(skipped)}")
    return chosen


# ----------------------------------------------------------------------------------------------------
# Peak memory of one step beyond its inputs (CPU: RSS in a fresh process; CUDA: the caching allocator)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """VmHWM := VmRSS (Linux >= 4.0); False where that is not possible or did not happen."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 4096  # a few MB of slack: RSS moves between reads
    except OSError:
        return False


def _release_freed() -> None:
    """Return freed heap to the OS, so that the baseline RSS holds only live memory: glibc keeps freed
    chunks below its mmap threshold (up to 32 MiB), and a step reusing them would not raise the RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline may include freed memory, the peak then reads low


def _peak_child(conn, build: Callable, build_args: tuple, threads: int) -> None:
    """In a spawned process: (peak bytes beyond inputs, whether it is the second step's) through conn."""
    try:
        torch.set_num_threads(threads)
        step, args, reset = build(*build_args)
        second = _reset_peak_rss()  # tried before any step: without it, the first step is the one measured
        if second:
            step(*args)  # compiles for compile; lazy initialization for the others
            reset(*args)
        _release_freed()
        before = _status_kb("VmRSS")
        if second and not _reset_peak_rss():
            raise RuntimeError("the peak RSS could be reset once but not twice")
        step(*args)
        conn.send(("ok", (_status_kb("VmHWM") - before) * 1024, second))
    except BaseException as e:  # noqa: BLE001  (the parent reports it)
        conn.send(("error", f"{type(e).__name__}: {e}", False))
    finally:
        conn.close()


def peak_cpu(build: Callable, *build_args) -> tuple[int, bool]:
    """(peak RSS bytes of one step beyond its inputs, whether the second step was measured), in a fresh
    process (the CPU has no allocator counter and RSS is per process). ``build(*build_args)`` runs in
    the child and returns (step, args, reset): a module-level function, picklable for spawn."""
    ctx = multiprocessing.get_context("spawn")  # fork would inherit this process's pools and tensors
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_peak_child, args=(send, build, build_args, torch.get_num_threads()))
    p.start()
    send.close()
    try:
        status, value, second = recv.recv()
    except EOFError:
        p.join()
        status, value, second = "error", f"the child process died (exit code {p.exitcode})", False
    p.join()
    if status != "ok":
        raise RuntimeError(f"peak memory: {value}")
    return value, second


def peak_cuda(step: Callable, args: tuple, device: torch.device, reset: Callable) -> int:
    """Bytes the caching allocator hands out during the second step beyond what was allocated before it."""
    step(*args)
    reset(*args)
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    reset(*args)
    return peak


class Bench:
    """Collects the rows of one benchmark run: measures, keeps failures, prints and saves at the end."""

    def __init__(self, name: str, cfg: Config):
        self.name, self.cfg = name, cfg
        self.device = cfg.device
        self.env = environment(self.device)
        log(f"[{name}] {self.env['device']} · torch {self.env['torch']} · triton {self.env['triton']} · "
            f"commit {self.env['commit']}")  # fmt: skip
        t0, load = time.perf_counter(), CpuLoad()
        self.bw = measure_bandwidth(self.device, reps=5 if cfg.quick else 10)
        log(f"[{name}] measured bandwidth {self.bw.describe()} in {time.perf_counter() - t0:.1f} s")
        if (other := load.others()) > BUSY_WARN:
            log(f"[{name}] warning: other processes used {other:.0%} of the CPUs while measuring bandwidth; "
                "the floors and % of bandwidth are not reliable")  # fmt: skip
        self.results: list[Result] = []
        self.failures: list[str] = []

    # -- inputs -----------------------------------------------------------------------------------
    def make_inputs(self, factory: Callable[[], tuple], copy_bytes: int) -> InputPool:
        """``factory()`` -> one argument tuple; called once per copy that the cold plan asks for.

        ``copy_bytes``: what one run's inputs and outputs occupy (what must be evicted between uses).
        """
        plan = plan_cold(copy_bytes, self.device, self.cfg.cold)
        return InputPool([factory() for _ in range(plan.copies)], plan)

    # -- measuring --------------------------------------------------------------------------------
    def time(
        self,
        *,
        case: str,
        dtype: torch.dtype,
        impl: str,
        fn: Callable[..., Any],
        inputs: InputPool,
        nbytes: int,
        setup: Callable[..., Any] | None = None,
        note: str = "",
    ) -> list[Result]:
        """Time ``fn`` with every configured method; a failure is recorded and reported, not raised."""
        out = []
        for method in self.cfg.timings:
            plan = inputs.plan or ColdPlan(len(inputs), 0, "given")
            flush_bytes = plan.flush_bytes
            if method == "cuda_graph" and not flush_bytes and self.cfg.cold != "none":
                flush_bytes = plan_cold(nbytes, self.device, "flush").flush_bytes  # one capture: flush
            load = CpuLoad()
            try:
                t = time_fn(
                    fn, inputs, device=self.device, method=method, setup=setup, flush_bytes=flush_bytes,
                    warmup=self.cfg.warmup, min_reps=self.cfg.min_reps, max_reps=self.cfg.max_reps,
                    budget_s=self.cfg.budget_s,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001  (one broken impl must not hide the others' rows)
                self.fail(case, impl, e, method)
                continue
            other = load.others()
            if other > BUSY_WARN:
                log(f"[{self.name}] warning: other processes used {other:.0%} of the CPUs during {impl} {method}; "
                    "this timing is not reliable")  # fmt: skip
            gbps = nbytes / (t.median_ms * 1e-3) / 1e9
            cold = f"flush {flush_bytes // MiB} MiB" if flush_bytes else plan.describe()
            r = Result(
                date=self.env["date"], commit=self.env["commit"], benchmark=self.name, case=case,
                dtype=dtype_name(dtype), impl=impl, timing=method, median_ms=t.median_ms, p10_ms=t.p10_ms,
                p90_ms=t.p90_ms, reps=len(t.times_ms), bytes=nbytes, floor_ms=self.bw.floor_ms(nbytes),
                gbps=gbps, pct_of_bw=100 * gbps / self.bw.gbps, speedup_vs_eager=None, bw_gbps=self.bw.gbps,
                cold=cold, device=self.env["device"], threads=self.env["threads"], torch=self.env["torch"],
                triton=self.env["triton"], python=self.env["python"], other_load_pct=round(100 * other, 1), note=note,
            )  # fmt: skip
            log(f"[{self.name}] {case} {r.dtype} {impl:<20} {method:<12} median {fmt(r.median_ms)} ms "
                f"(p10 {fmt(r.p10_ms)}, p90 {fmt(r.p90_ms)}, n={r.reps}) floor {fmt(r.floor_ms)} ms")  # fmt: skip
            self.results.append(r)
            out.append(r)
        return out

    def first_call(self, case: str, impls: dict, run: Callable[[Any], Any], reset: Callable[[], Any] | None = None,
                   impl: str = "compile") -> str:
        """Call ``run(impls[impl])`` once, untimed (torch.compile compiles here), with ``reset()`` (e.g.
        clearing the first copy's gradients) before and after; returns the note "compile+first call
        X s" for that impl's rows. A failure is recorded, the impl dropped from ``impls``, "" returned."""
        if impl not in impls:
            return ""
        t0 = time.perf_counter()
        try:
            if reset is not None:
                reset()
            run(impls[impl])
            synchronize(self.device)
            note = f"compile+first call {time.perf_counter() - t0:.1f} s"
            log(f"[{self.name}] {case}: {note}")
            return note
        except Exception as e:  # noqa: BLE001  (one broken impl must not hide the others' rows)
            self.fail(case, impl, e)
            del impls[impl]
            return ""
        finally:
            if reset is not None:
                reset()

    def fail(self, case: str, impl: str, exc: BaseException, method: str = "") -> None:
        msg = f"{case} {impl} {method}: {type(exc).__name__}: {exc}".replace("  ", " ")
        self.failures.append(msg)
        log(f"[{self.name}] FAILED {msg}")
        log("".join(traceback.format_exception(exc)[-6:]))

    # -- reporting --------------------------------------------------------------------------------
    def finish(self) -> str:
        """Speedups vs eager, the markdown table on stdout (returned), rows appended to the CSV."""
        base = {(r.case, r.dtype, r.timing): r.median_ms for r in self.results if r.impl == "eager"}
        for r in self.results:
            b = base.get((r.case, r.dtype, r.timing))
            r.speedup_vs_eager = b / r.median_ms if b else None
        e = self.env
        header = [
            f"{e['device']} ({e['threads']} threads)" if e["threads"] else e["device"],
            f"measured bandwidth {self.bw.describe()}; floor = bytes / bandwidth",
            f"torch {e['torch']} · triton {e['triton']} · python {e['python']} · commit {e['commit']} · {e['date']}",
        ]
        table = markdown_table(self.results, title=self.name, header_lines=[h + "  " for h in header])
        if self.failures:
            table += "\nFAILED:\n" + "\n".join(f"- {f}" for f in self.failures) + "\n"
        print(table, flush=True)
        if self.cfg.csv is not None and self.results:
            append_csv(self.results, self.cfg.csv)
            log(f"[{self.name}] appended {len(self.results)} rows to {self.cfg.csv}")
        return table

    def exit_code(self) -> int:
        return 1 if self.failures else 0


# ----------------------------------------------------------------------------------------------------
# --check: every impl's loss and gradients against eager, before timing

# The budget per output (the loss and each gradient): |err(impl)| <= 2 x |err(eager in the bench's
# dtype)| + FLOOR, errors relative (norms) to eager run in float64 (flash-attention's rule). The floor is a
# few roundings of the dtype.
CHECK_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def as_float64(v: Any) -> Any:
    """A float64 copy of a floating-point tensor (detached, same requires_grad); anything else as is."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().double().requires_grad_(v.requires_grad)
    return v


def check_impls(
    bench: Bench,
    case: str,
    dtype: torch.dtype,
    impls: dict[str, Any],
    run: Callable[[Any], Sequence[torch.Tensor]],
    ref64: Sequence[torch.Tensor],
    outputs: Sequence[str],
    skip: Callable[[str], str | None] | None = None,
) -> set[str]:
    """Check each impl's loss and gradients against eager in float64; returns the impls that failed.

    ``run(impl)``: [loss, *grads] as float64 tensors for ``impl`` on the bench's inputs (fresh leaves;
    the inputs left untouched). ``impls`` holds "eager" (whose error sets the budget; not checked
    itself) and the impls to check, in the order logged. ``ref64``: what ``run`` returns for eager on
    float64 copies of the inputs. ``outputs``: a name per output ("loss", "dx", ...). ``skip(name)``: why
    that impl is not checked, or None. One log line per impl; an impl over budget or raising is recorded
    with ``bench.fail(case, name, ..., "check")`` (the caller then leaves it out of the timing).
    """

    def errors(outs):
        return [((o - r).norm() / r.norm().clamp_min(1e-300)).item() for o, r in zip(outs, ref64)]

    def say(msg: str) -> None:
        log(f"[{bench.name}] check {case}: {msg}")

    e0 = errors(run(impls["eager"]))
    budget = [2 * e + CHECK_FLOOR[dtype] for e in e0]
    say("eager rel err " + " ".join(f"{o} {e:.1e}" for o, e in zip(outputs, e0)))
    failed = set()
    for name, impl in impls.items():
        if name == "eager":
            continue
        if skip is not None and (why := skip(name)) is not None:
            say(f"{name} not checked ({why})")
            continue
        try:
            errs = errors(run(impl))
        except Exception as e:  # noqa: BLE001  (one broken impl must not hide the others)
            bench.fail(case, name, e, "check")
            failed.add(name)
            continue
        bad = [f"{o} {e:.2e} > {b:.1e}" for o, e, b in zip(outputs, errs, budget) if not e <= b]  # NaN fails
        say(f"{name:<20} " + " ".join(f"{o} {e:.1e}" for o, e in zip(outputs, errs)) + (" ok" if not bad else " OVER BUDGET"))
        if bad:
            bench.fail(case, name, AssertionError("--check: relative error over budget: " + "; ".join(bad)), "check")
            failed.add(name)
    return failed


# ----------------------------------------------------------------------------------------------------
# python benchmarks/harness.py {bandwidth,report}


def _latest(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The newest row per (benchmark, case, dtype, impl, timing, device), in first-seen order."""
    keep: dict[tuple, dict[str, str]] = {}
    for r in rows:
        key = tuple(r[k] for k in ("benchmark", "case", "dtype", "impl", "timing", "device"))
        if key not in keep or r["date"] >= keep[key]["date"]:
            keep[key] = r
    return list(keep.values())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="flashdistill benchmark harness utilities")
    sub = p.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("bandwidth", help="measure and print this device's streaming bandwidth")
    pb.add_argument("--device", default=None)
    pr = sub.add_parser("report", help="markdown tables of the newest CSV row per case and impl")
    pr.add_argument("--csv", default=str(DEFAULT_CSV))
    pr.add_argument("--benchmark", default=None)
    pr.add_argument("--device-contains", default=None, help="keep rows whose device name contains this")
    a = p.parse_args(argv)
    if a.cmd == "bandwidth":
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        print(f"{device_name(device)}: {measure_bandwidth(device).describe()}")
        return 0
    rows = read_csv(Path(a.csv))
    if a.benchmark:
        rows = [r for r in rows if r["benchmark"] == a.benchmark]
    if a.device_contains:
        rows = [r for r in rows if a.device_contains.lower() in r["device"].lower()]
    rows = _latest(rows)
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        sel = [r for r in rows if r["benchmark"] == bench]
        for dev in dict.fromkeys(r["device"] for r in sel):
            part = [r for r in sel if r["device"] == dev]
            print(markdown_table(part, title=f"{bench} — {dev}", header_lines=[
                f"newest rows per case; commits {', '.join(sorted({r['commit'] for r in part}))}"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
