"""``flashdistill bench``: runs the named benches into one folder and writes the CSV, report.md and a PNG
per bench; bad names and a missing benchmarks folder are clear errors. A stand-in benchmarks folder
(a bench that writes two rows in the harness's CSV schema) keeps this fast; the real benches are run by
hand (benchmarks/README.md)."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HARNESS_FIELDS = ("date,commit,benchmark,case,dtype,impl,timing,median_ms,p10_ms,p90_ms,reps,bytes,floor_ms,gbps,"
                  "pct_of_bw,speedup_vs_eager,bw_gbps,cold,device,threads,torch,triton,python,other_load_pct,note")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flashdistill.engine.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture
def fake_benchmarks(tmp_path: Path) -> Path:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "harness.py").write_text("# stand-in\n")
    (folder / "bench_dmd.py").write_text(textwrap.dedent(f'''
        import argparse, csv, os, sys
        p = argparse.ArgumentParser(); p.add_argument("--csv"); p.add_argument("--quick", action="store_true")
        a, rest = p.parse_known_args()
        print("progress on stderr", file=sys.stderr)
        print("| case | impl | median ms |\\n|---|---|---:|\\n| 16x4 | eager | 2.0 |")
        fields = "{HARNESS_FIELDS}".split(",")
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new: w.writeheader()
            for impl, ms in (("eager", 2.0), ("flashdistill:cpu", 0.5)):
                w.writerow(dict(date="2026-12-02T00:00:00Z", commit="abc", benchmark="dmd", case="16x4",
                                dtype="float32", impl=impl, timing="perf_counter", median_ms=ms, p10_ms=ms, p90_ms=ms,
                                reps=5, bytes=4000000, floor_ms=0.2, gbps=4 / ms, pct_of_bw=10, speedup_vs_eager=1,
                                bw_gbps=20, cold="rotate", device="cpu", threads=2, torch="2", triton="3",
                                python="3", other_load_pct=0, note="quick" if a.quick else ""))
        
        '''))
    (folder / "bench_kd.py").write_text("import sys\nsys.exit(3)\n")
    return folder


def test_bench_writes_csv_report_and_plot(tmp_path, fake_benchmarks):
    out = tmp_path / "report"
    res = _cli("bench", "dmd", "--quick", "--out", str(out), "--benchmarks", str(fake_benchmarks))
    assert res.returncode == 0, res.stderr
    assert "[1/1] dmd: ok" in res.stderr and "progress on stderr" in res.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["impl"] for r in rows] == ["eager", "flashdistill:cpu"] and rows[0]["note"] == "quick"
    report = (out / "report.md").read_text()
    assert "| dmd | ok |" in report and "![dmd](dmd.png)" in report and "| 16x4 | eager | 2.0 |" in report
    assert (out / "dmd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compute_bound_rows_are_plotted_as_flop_rates(tmp_path):
    """Rows with ``flops=`` in their note (bench_attention) get a compute-rate panel instead of GB/s."""
    from flashdistill.engine import bench_report

    fields = HARNESS_FIELDS.split(",")
    rows = [dict.fromkeys(fields, "0") | dict(date="d", commit="c", benchmark="attention", case="2x8x1024x64 fwd",
                                              dtype="float32", impl=impl, timing="perf_counter", median_ms=str(ms),
                                              bytes="1000", gbps="1", bw_gbps="20", device="cpu", torch="2",
                                              note=f"compile+first call 1 s; flops={1.1e10:.6g}")
            for impl, ms in (("eager", 40.0), ("flashdistill:cpu", 20.0))]
    assert bench_report._flops(rows[0]) == 1.1e10 and bench_report._flops({"note": "x"}) == 0.0
    assert bench_report.plot("attention", rows, tmp_path) == "attention.png"
    assert (tmp_path / "attention.png").stat().st_size > 1000


def test_a_failing_bench_is_reported_and_the_exit_code_says_so(tmp_path, fake_benchmarks):
    out = tmp_path / "report"
    res = _cli("bench", "dmd", "kd", "--out", str(out), "--benchmarks", str(fake_benchmarks))
    assert res.returncode == 1
    assert "[2/2] kd: FAILED (exit 3)" in res.stderr
    assert "| kd | FAILED (exit 3) |" in (out / "report.md").read_text()


def test_bench_bad_arguments(tmp_path):
    res = _cli("bench", "nonsense")
    assert res.returncode == 2 and "unknown bench 'nonsense'; choose from dmd, score_losses" in res.stderr
    res = _cli("bench", "dmd", "--benchmarks", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "no benchmarks folder (with harness.py)" in res.stderr
