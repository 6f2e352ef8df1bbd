"""Vocab-parallel kd_loss and fused_linear_kd_loss (process_group=): 2 processes on gloo, each with an
uneven slice of the vocabulary, against the single-process float64 spec on the whole logits (loss,
soft/hard parts, and each rank's slice of the gradient; dh whole), for every divergence, with
temperature, masking, hard CE and soft-capping."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTHS = (47, 54)  # uneven slices of a 101-id vocabulary
DIVS = ["forward_kl", "reverse_kl", "jsd", "jsd_normalized", "tvd", "skew_forward_kl", "skew_reverse_kl", "mixed",
        "taid"]


def _case(rank, divergence, dtype, seed):
    import flashdistill as fd
    from flashdistill.kernels.kd import reference

    g = torch.Generator().manual_seed(seed)
    N, V = 13, sum(WIDTHS)
    z = (torch.randn((N, V), generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn((N, V), generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    kw = dict(temperature=1.7, beta=0.3, alpha=0.2, lam=0.6, labels=labels, hard_weight=0.4)
    a = sum(WIDTHS[:rank])
    zs = z[:, a:a + WIDTHS[rank]].clone().requires_grad_(True)
    loss, soft, hard = fd.kd_loss(zs, t[:, a:a + WIDTHS[rank]].contiguous(), divergence=divergence,
                                  process_group=dist.group.WORLD, return_parts=True, **kw)
    (loss * 1.3).backward()
    z64 = z.double().requires_grad_(True)
    loss64, soft64, hard64 = reference.kd_loss(z64, t.double(), kind=divergence, **kw)
    (loss64 * 1.3).backward()
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.double(), loss64, **tol, msg=f"loss {divergence} rank {rank}")
    torch.testing.assert_close(soft.double(), soft64, **tol, msg=f"soft {divergence} rank {rank}")
    torch.testing.assert_close(hard.double(), hard64, **tol, msg=f"hard {divergence} rank {rank}")
    torch.testing.assert_close(zs.grad.double(), z64.grad[:, a:a + WIDTHS[rank]], **tol,
                               msg=f"grad {divergence} rank {rank}")


def _linear_case(rank, divergence, teacher, seed):
    """fused_linear_kd_loss with a tensor-parallel head: each rank a row slice of W (and b) and of the
    teacher's head or logits; the same hidden states. Against the single-process float64 spec."""
    import flashdistill as fd
    from flashdistill.kernels.kd import reference

    g = torch.Generator().manual_seed(seed)
    N, H, V = 11, 12, sum(WIDTHS)
    h, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((N, H), (V, H), (V,)))
    th, tw = torch.randn((N, 9), generator=g, dtype=torch.float64), torch.randn((V, 9), generator=g, dtype=torch.float64)
    tl = torch.randn((N, V), generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    a, Vr = sum(WIDTHS[:rank]), WIDTHS[rank]
    kw = dict(divergence=divergence, temperature=1.5, labels=labels, hard_weight=0.3, softcap=4.0)
    hs, ws, bs = h.clone().requires_grad_(True), w[a:a + Vr].clone().requires_grad_(True), \
        b[a:a + Vr].clone().requires_grad_(True)
    tkw = dict(teacher_hidden=th, teacher_weight=tw[a:a + Vr].contiguous()) if teacher == "hidden" else \
        dict(teacher_logits=tl[:, a:a + Vr].contiguous())
    loss = fd.fused_linear_kd_loss(hs, ws, student_bias=bs, process_group=dist.group.WORLD, chunk_size=4, **tkw,
                                   **kw)
    (loss * 1.3).backward()
    h6, w6, b6 = (x.clone().requires_grad_(True) for x in (h, w, b))
    z = 4.0 * torch.tanh((h6 @ w6.t() + b6) / 4.0)
    t = th @ tw.t() if teacher == "hidden" else tl
    loss64, _, _ = reference.kd_loss(z, t, kind=divergence, temperature=1.5, labels=labels, hard_weight=0.3)
    (loss64 * 1.3).backward()
    tol = dict(rtol=1e-9, atol=1e-11)
    what = f"fused_linear {divergence} {teacher} rank {rank}"
    torch.testing.assert_close(loss, loss64, **tol, msg=f"loss {what}")
    torch.testing.assert_close(hs.grad, h6.grad, **tol, msg=f"dh {what}")
    torch.testing.assert_close(ws.grad, w6.grad[a:a + Vr], **tol, msg=f"dW {what}")
    torch.testing.assert_close(bs.grad, b6.grad[a:a + Vr], **tol, msg=f"db {what}")


def _worker(rank, init_file, err_dir):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(WIDTHS))
        for i, div in enumerate(DIVS):
            for dtype in (torch.float32, torch.float64):
                _case(rank, div, dtype, seed=i)
        for i, div in enumerate(("jsd", "reverse_kl", "skew_forward_kl")):
            for teacher in ("hidden", "logits"):
                _linear_case(rank, div, teacher, seed=100 + i)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (reported to the parent through a file)
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_vocab_parallel_matches_single_process():
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        try:
            mp.spawn(_worker, args=(init_file, d), nprocs=len(WIDTHS), join=True)
        except Exception as e:  # show the worker's traceback, not only the spawn wrapper's
            msgs = [open(os.path.join(d, f)).read() for f in sorted(os.listdir(d)) if f.startswith("rank")]
            raise AssertionError("\n".join(msgs) or str(e)) from None


def test_vocab_parallel_bad_input():
    import flashdistill as fd

    z = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"fused_linear_kd_loss: with process_group .* not implemented yet"):
        fd.fused_linear_kd_loss(z, torch.randn(5, 8), teacher_logits=torch.randn(3, 5), process_group=object(),
                                backend="cpu")
    with pytest.raises(ValueError, match=r"process_group takes the teacher as logits or a head sliced"):
        fd.fused_linear_kd_loss(z, torch.randn(5, 8), teacher_ids=torch.tensor([[0, 1]] * 3),
                                teacher_logprobs=torch.zeros(3, 2), process_group=object())
    with pytest.raises(ValueError, match=r"fused vocab-parallel row kernels are not implemented yet"):
        fd.kd_loss(z, z, process_group=object(), backend="cpu")
    with pytest.raises(ValueError, match=r"vocab='pad' does not combine with process_group"):
        fd.kd_loss(z, z, process_group=object(), vocab="pad")
