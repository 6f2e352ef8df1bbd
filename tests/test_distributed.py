"""Recipes under torch.distributed (issue #7): 2 processes on gloo, each case against a single-process float64
run; the cases, and which equivalence each asserts and why, are in tests/distributed_worker.py.

  DDP      dmd2, sid and vsd with the generator and the fake score in DistributedDataParallel, each rank a
           different half of the batch and its own noise: parameters bit-identical on the ranks and equal to
           test_recipes' plain-PyTorch reference on the whole batch with the same noise; consistency (the
           student in DDP) likewise against test_recipes' lcm_reference, the EMA student too; llm_kd on tiny
           Hugging Face Llamas against the recipe in one process on the whole batch (full)
  FSDP2    the same with fully_shard on the generator, the fake score and the teacher (consistency: the
           student, the teacher and the EMA student; parameters gathered with full_tensor()); llm_kd with every decoder layer and the model sharded, and with every unit
           resharding after its forward, the LM heads units of their own and the teacher sharded too (full)
  vocab    llm_kd(..., process_group=): each rank holds its slice (uneven widths) of the student's and the
           teacher's LM head; the losses, every gradient and the parameters equal the unsplit run's (a small
           LM through student_hidden / student_head by default; Hugging Face Llamas with lm_head sliced, full)

The ranks are spawned with torch.multiprocessing and meet through a FileStore in a temporary directory (no
port to collide), one thread each; one launch runs a group of cases, under a deadline after which both ranks
are killed (and a gloo timeout of 120 s per collective), so a hang fails the test instead of blocking CI. The
default suite runs the cases without transformers in one launch (~10 s on 2 cores, most of it two
interpreters importing torch); the Hugging Face cases, whose ranks import transformers, run in a second
launch (~16 s) and are marked ``full``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

if os.path.dirname(__file__) not in sys.path:  # pytest puts it there already (rootdir-relative imports)
    sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker as worker  # noqa: E402

WORLD = 2
DEADLINE_S = 300  # a group takes 10-40 s on 2 busy cores; past this it hangs
GROUPS = {  # one launch each: the default suite's, and the Hugging Face cases' (transformers, marked full)
    "default": ["ddp_dmd2", "fsdp2_dmd2", "ddp_sid", "fsdp2_sid", "ddp_vsd", "fsdp2_vsd", "ddp_consistency",
                "fsdp2_consistency", "vocab_parallel_kd"],
    "hf": ["ddp_llm_kd", "fsdp2_llm_kd", "fsdp2_llm_kd_resharded", "vocab_parallel_llm_kd"],
}
_results = {}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


def launch(names, deadline_s=DEADLINE_S):
    """({case: [each rank's result]}, why the launch ended early or None): runs ``names`` on WORLD spawned
    ranks; a rank that fails ends the launch (torch.multiprocessing ends the other), as does the deadline."""
    with tempfile.TemporaryDirectory() as d:
        threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
        try:
            ctx = mp.start_processes(worker.main, args=(WORLD, os.path.join(d, "init"), d, list(names)),
                                     nprocs=WORLD, join=False, start_method="spawn")
        finally:
            if threads is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = threads
        end, failure = time.monotonic() + deadline_s, None
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > end:
                    failure = f"the ranks were still running after {deadline_s} s (a hang?) and were killed"
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            failure = f"a rank failed: {type(e).__name__}: {e}"
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        results = {}
        for name in names:
            files = [os.path.join(d, f"{name}.rank{r}") for r in range(WORLD)]
            results[name] = [open(f).read() if os.path.exists(f) else None for f in files]
    return results, failure


def check(group, name):
    """Runs the group once (cached), then fails with the case's traceback, skips, or passes."""
    if group not in _results:
        _results[group] = launch(GROUPS[group])
    results, failure = _results[group]
    ranks = results[name]
    errors = [f"rank {r}:\n{res}" for r, res in enumerate(ranks) if res not in (None, "ok") and
              not res.startswith("skip: ")]
    if errors:
        pytest.fail(f"{name}:\n" + "\n".join(errors), pytrace=False)
    if None in ranks:
        pytest.fail(f"{name} did not finish on ranks {[r for r, res in enumerate(ranks) if res is None]}: {failure}",
                    pytrace=False)
    if any(res.startswith("skip: ") for res in ranks):
        pytest.skip(ranks[0][len("skip: "):])
    assert ranks == ["ok"] * WORLD, ranks


@pytest.mark.parametrize("name", GROUPS["default"])
def test_recipe_on_two_ranks(name):
    check("default", name)


@pytest.mark.full
@pytest.mark.parametrize("name", GROUPS["hf"])
def test_llm_kd_on_two_ranks(name):
    pytest.importorskip("transformers")
    check("hf", name)


if __name__ == "__main__":  # python tests/test_distributed.py CASE... : one launch, results printed
    t0 = time.monotonic()
    out, why = launch(sys.argv[1:])
    for k, v in out.items():
        print(f"== {k}", *(f"-- rank {r}: {res}" for r, res in enumerate(v)), sep="\n")
    print(f"ended early: {why}" if why else "", f"{time.monotonic() - t0:.1f} s")
