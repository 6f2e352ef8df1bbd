"""``flashdistill demo`` end to end at tiny sizes (--quick): every stage runs, the JSON and the PNG are
written, the one-step student's Frechet distance falls during distillation, and bad arguments exit with
a clear message. The measured default run (5-minute budget) is in benchmarks/NOTES.md "demo v0"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flashdistill.engine.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("method", ["dmd2", "sid", "vsd", "consistency"])
def test_quick_demo_runs_every_stage(tmp_path, cache, method):
    from flashdistill.engine.demo.run import run_demo

    out = tmp_path / "out"
    result = run_demo(method=method, out=out, quick=True, steps=6, progress=False, log=None)
    names = [r["name"] for r in result["results"]]
    assert names[0] == "real (held out)" and names[-2] == "student, before distillation (1 step)"
    assert names[-1] == f"student, {method} (1 step)"
    assert all(r["fd"] is not None and r["fd"] >= 0 for r in result["results"])
    assert result["method"] == method and result["capture"] == "eager"
    assert all(len(c) == 6 for c in result["curves"].values()) and result["curves"]
    assert json.loads((out / "demo.json").read_text()) == result
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(cache) in result["teacher_cache"]  # the cache location is the one configured


def test_distillation_improves_the_student(tmp_path, cache):
    """A short DMD2 run from a briefly trained teacher: the student's FD must fall well below its start."""
    from flashdistill.engine.demo.run import run_demo

    result = run_demo(method="dmd2", out=tmp_path, quick=True, steps=120, teacher_steps=300, progress=False, log=None)
    before, after = result["results"][-2]["fd"], result["results"][-1]["fd"]
    assert after < 0.5 * before, (before, after)  # measured: 162.9 -> 27.3


def test_cli_demo_quick_and_bad_arguments(tmp_path, cache):
    res = _cli("demo", "--quick", "--out", str(tmp_path / "o"), "--steps", "2")
    assert res.returncode == 0, res.stderr
    assert "one-step student: FD" in res.stdout and (tmp_path / "o" / "demo.json").exists()
    for args, message in [(["--method", "gan"], "--method 'gan' is not one of dmd2, sid, vsd, consistency"),
                          (["--steps", "0"], "--steps must be >= 1"),
                          (["--device", "tpu"], "--device 'tpu'"),
                          (["--capture", "fast"], "--capture 'fast' is not one of"),
                          (["--task", "kd", "--method", "sid"], "--method applies to the image task")]:
        res = _cli("demo", *args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
