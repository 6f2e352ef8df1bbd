"""``flashdistill bench``: run the benchmark suite (or part of it) and write one folder with the report.

    <out>/results.csv     every row the benches measured (the harness's CSV schema, benchmarks/harness.py)
    <out>/report.md       each bench's markdown table, as printed, and the figures below
    <out>/<bench>.png     per bench: time per case for each impl (log scale, the bytes floor as a tick)
                          and the rate against the roofline: for memory-bound ops achieved GB/s of the
                          op's minimal traffic against the measured bandwidth; for compute-bound rows
                          (a ``flops=`` in the row's note, as bench_attention writes) GFLOP/s (TFLOP/s
                          on a GPU)

The benches live in the repository's ``benchmarks/`` folder (not in an installed wheel): run from a
checkout (``pip install -e .``), or point ``--benchmarks`` at one.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

BENCHES = ("dmd", "score_losses", "kd", "samplers", "attention", "engine")


def find_benchmarks(explicit: Optional[str] = None) -> Path:
    """The folder with bench_*.py: ``explicit``, else the checkout this package was installed from."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parent.parent / "benchmarks",
                                                   Path.cwd() / "benchmarks"]
    for c in candidates:
        if (c / "harness.py").is_file():
            return c
    raise FileNotFoundError(
        f"flashdistill bench: no benchmarks folder (with harness.py) at {', '.join(map(str, candidates))}; the "
        f"benches ship with the repository: run from a checkout installed with `pip install -e .`, or pass "
        f"--benchmarks PATH")


def run(names: Sequence[str], out: Path, *, bench_dir: Optional[str] = None, extra: Sequence[str] = (),
        quick: bool = False, device: Optional[str] = None) -> int:
    """Runs each bench into ``out``; returns the number of benches that failed (0: all ran)."""
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"flashdistill bench: unknown bench {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(BENCHES)}")
    folder = find_benchmarks(bench_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    sections, failed = [], 0
    names = list(names) or list(BENCHES)
    for i, name in enumerate(names, 1):
        cmd = [sys.executable, str(folder / f"bench_{name}.py"), "--csv", str(csv_path)]
        cmd += (["--quick"] if quick else []) + (["--device", device] if device else []) + list(extra)
        print(f"[{i}/{len(names)}] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=folder,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = []
        for line in proc.stdout:  # the bench's progress is on stderr (shown as is); its tables on stdout
            lines.append(line)
        code = proc.wait()
        took = time.perf_counter() - t0
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        failed += code != 0
        print(f"[{i}/{len(names)}] {name}: {status} in {took:.0f} s", file=sys.stderr, flush=True)
        sections.append((name, "".join(lines), status, took))
    rows = read_rows(csv_path)
    figures = {name: plot(name, rows, out) for name, *_ in sections}
    write_report(out, sections, figures)
    print(f"flashdistill bench: report in {out / 'report.md'} (CSV {csv_path})", file=sys.stderr)
    return failed


def read_rows(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _latest(rows: list, bench: str) -> list:
    """The rows of ``bench``'s most recent run in the CSV (its date stamp)."""
    mine = [r for r in rows if r["benchmark"] == bench]
    if not mine:
        return []
    last = max(r["date"] for r in mine)
    return [r for r in mine if r["date"] == last]


def plot(bench: str, rows: list, out: Path) -> Optional[str]:
    """``<bench>.png``: time per case and impl, and achieved bandwidth against the measured one; None
    when the bench wrote no rows or matplotlib is missing."""
    mine = _latest(rows, bench)
    if not mine:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys(f"{r['case']} {r['dtype']}" + (f" [{r['timing']}]" if r["timing"] != "perf_counter"
                                                                   else "") for r in mine))
    impls = list(dict.fromkeys(r["impl"] for r in mine))
    table = defaultdict(dict)
    for r in mine:
        key = f"{r['case']} {r['dtype']}" + (f" [{r['timing']}]" if r["timing"] != "perf_counter" else "")
        table[key][r["impl"]] = r
    flop_rows = {id(r): _flops(r) for r in mine}
    compute = any(flop_rows.values())
    bw_rows = [r for r in mine if float(r["bytes"] or 0) > 0]
    ncol = 2 if bw_rows else 1
    height = max(3.0, 0.32 * len(cases) * max(1, len(impls)) / 2 + 1.5)
    fig, axes = plt.subplots(1, ncol, figsize=(7 * ncol, height), squeeze=False)
    bar = 0.8 / max(1, len(impls))
    ax = axes[0][0]
    for j, impl in enumerate(impls):
        ys = [i + j * bar for i in range(len(cases))]
        xs = [float(table[c][impl]["median_ms"]) if impl in table[c] else 0.0 for c in cases]
        ax.barh(ys, xs, height=bar, label=impl)
    for i, c in enumerate(cases):  # the bytes / bandwidth floor of the case
        floors = [float(r["floor_ms"]) for r in table[c].values() if float(r["floor_ms"] or 0) > 0]
        if floors:
            ax.plot([floors[0]] * 2, [i - bar / 2, i + 0.8 - bar / 2], color="black", lw=1.5)
    ax.set_yticks([i + 0.4 - bar / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_xscale("log")
    positive = [float(r["median_ms"]) for r in mine if float(r["median_ms"] or 0) > 0]
    positive += [float(r["floor_ms"]) for r in mine if float(r["floor_ms"] or 0) > 0]
    if positive:  # bars start well left of the shortest, so every bar shows its length on the log axis
        ax.set_xlim(left=min(positive) / 3)
    ax.set_xlabel("median ms (log; black tick: bytes / measured bandwidth)")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    ax.set_title(f"{bench}: time per call")
    if bw_rows:
        ax = axes[0][1]
        gpu = any("cuda" in r["timing"] for r in mine)
        unit, div = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)

        def rate(r):  # compute-bound rows: the work's rate; memory-bound: GB/s of the minimal traffic
            work = flop_rows[id(r)]
            return work / (float(r["median_ms"]) * 1e-3) / div if compute else float(r["gbps"])

        for j, impl in enumerate(impls):
            ys = [i + j * bar for i in range(len(cases))]
            xs = [rate(table[c][impl]) if impl in table[c] and (flop_rows[id(table[c][impl])] or not compute)
                  else 0.0 for c in cases]
            ax.barh(ys, xs, height=bar, label=impl)
        if not compute:
            bw = max(float(r["bw_gbps"]) for r in bw_rows)
            ax.axvline(bw, color="black", lw=1.5, ls="--", label=f"measured bandwidth {bw:.0f} GB/s")
        ax.set_yticks([i + 0.4 - bar / 2 for i in range(len(cases))], [""] * len(cases))
        ax.set_xlabel(f"achieved {unit} (compute-bound)" if compute else "achieved GB/s of the op's minimal traffic")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
        ax.set_title("compute rate" if compute else "roofline (memory-bound part)")
    r0 = mine[0]
    fig.suptitle(f"{r0['device']} · torch {r0['torch']} · commit {r0['commit']} · {r0['date']}", fontsize=8)
    fig.tight_layout()
    path = out / f"{bench}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _flops(row: dict) -> float:
    """The ``flops=`` a bench put in the row's note (0 when none)."""
    for part in row.get("note", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == "flops":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0


def write_report(out: Path, sections: list, figures: dict) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# flashdistill bench ({stamp})\n", "| bench | status | seconds |", "|---|---|---:|"]
    parts += [f"| {name} | {status} | {took:.0f} |" for name, _, status, took in sections]
    for name, text, _, _ in sections:
        parts.append(f"\n## {name}\n")
        if figures.get(name):
            parts.append(f"![{name}]({figures[name]})\n")
        parts.append(text.strip() or "(no table: the bench printed nothing on stdout)")
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
