"""topk_kd_loss: every implemented backend against the float64 spec (reference.topk_forward_kl with
autograd), the closed-form gradients of the reference backend, masking, edge cases, the torch.library
contract and bad input."""

from __future__ import annotations

import pytest
import torch

import flashdistill as fd
from flashdistill.kernels.kd import reference, topk
from oracle import as_oracle, assert_within_budget, backends_under_test, randn

BACKENDS = [b for b in backends_under_test("cpu") if b in topk.IMPLEMENTED]
MODES = list(topk.MODES)


def make(N, V, K, dtype, seed, *, lp_dtype=torch.float32):
    """Student logits and a top-k teacher: K distinct ids per row in shuffled order (not sorted by
    probability) with the teacher's log-probs at those ids."""
    g = torch.Generator().manual_seed(seed)
    z = randn((N, V), dtype, generator=g, scale=2.0)
    t = torch.randn((N, V), dtype=torch.float64, generator=g) * 3.0
    lt = torch.log_softmax(t, -1)
    ids = lt.topk(K, -1).indices
    ids = ids.gather(-1, torch.argsort(torch.rand((N, K), generator=g), -1))
    return z, ids, lt.gather(-1, ids).to(lp_dtype)


def oracle(z, ids, lp, *, mode, temperature=1.0, gen_temperature=None, labels=None, ignore_index=-100,
           hard_weight=0.0, soft_weight=1.0, t_squared=False, normalizer=None, dtype=torch.float64):
    """The loss through reference.topk_forward_kl and plain cross-entropy, and d/dz by autograd."""
    V, K = z.shape[-1], ids.shape[-1]
    zz = z.detach().to(dtype).reshape(-1, V).requires_grad_(True)
    mode = "renorm_teacher" if K == V and mode == "tail_bucket" else mode
    d = reference.topk_forward_kl(zz, ids.reshape(-1, K), lp.to(dtype).reshape(-1, K), mode=mode,
                                  temperature=temperature, gen_temperature=gen_temperature)
    if t_squared:
        d = d * temperature**2
    valid = torch.ones(zz.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    n = valid.sum().to(dtype) if normalizer is None else torch.as_tensor(normalizer, dtype=dtype)
    n = torch.where(n > 0, n, torch.ones_like(n))
    loss = soft_weight * torch.where(valid, d, torch.zeros_like(d)).sum() / n
    if hard_weight:
        safe = torch.where(valid, labels.reshape(-1), 0)
        ce = torch.nn.functional.cross_entropy(zz, safe, reduction="none")
        loss = loss + hard_weight * torch.where(valid, ce, torch.zeros_like(ce)).sum() / n
    (loss * 1.3).backward()
    return loss, zz.grad.reshape(z.shape)


def check(backend, z, ids, lp, **kw):
    zz = z.clone().requires_grad_(True)
    loss = fd.topk_kd_loss(zz, ids, lp, backend=backend, **kw)
    (loss * 1.3).backward()
    loss64, g64 = oracle(z, ids, lp, **kw)
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss_r, g_r = oracle(z, ids, lp, dtype=cd, **kw)
    what = f"topk_kd_loss {backend} {tuple(z.shape)} K={ids.shape[-1]} {z.dtype} {kw.get('mode')}"
    assert loss.dtype == cd and zz.grad.dtype == z.dtype
    assert_within_budget(f"loss [{what}]", loss, loss64, loss_r, cd, n_reduce=z.numel())
    assert_within_budget(f"grad [{what}]", zz.grad, g64, g_r, z.dtype, n_reduce=z.shape[-1], cancels=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gen_temperature", [None, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_modes(backend, mode, gen_temperature, dtype):
    z, ids, lp = make(9, 301, 17, dtype, seed=MODES.index(mode))
    check(backend, z, ids, lp, mode=mode, temperature=1.5, gen_temperature=gen_temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_masking_hard_label_t_squared(backend, mode):
    z, ids, lp = make(7, 1000, 50, torch.float32, seed=3, lp_dtype=torch.bfloat16)
    labels = torch.tensor([3, -100, 999, 0, -100, 7, 500])
    check(backend, z, ids, lp, mode=mode, temperature=2.0, t_squared=True, labels=labels, hard_weight=0.4,
          soft_weight=0.6)
    check(backend, z, ids, lp, mode=mode, labels=labels, normalizer=torch.tensor(11.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 64])
def test_edge_k(backend, K):
    """K = 1, and K = V (no tail: tail_bucket is renorm_teacher), leading dims, vocab > 65536 for K = 1."""
    V = 70001 if K == 1 else 64
    z, ids, lp = make(6, V, K, torch.float32, seed=4)
    for mode in MODES:
        check(backend, z.reshape(2, 3, V), ids.reshape(2, 3, K), lp.reshape(2, 3, K), mode=mode, temperature=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_is_zero(backend):
    z, ids, lp = make(3, 20, 4, torch.float32, seed=5)
    zz = z.clone().requires_grad_(True)
    loss = fd.topk_kd_loss(zz, ids, lp, labels=torch.full((3,), -100), hard_weight=1.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zz.grad, torch.zeros_like(z))


def test_kernel_rejects_bad_ids():
    """The cpu kernel's own guard, past the Python checks (the op called directly)."""
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not built")
    z, ids, lp = make(3, 20, 4, torch.float32, seed=6)
    w = torch.full((3,), 1 / 3)
    ids[1, 2] = ids[1, 0]
    with pytest.raises(ValueError, match=r"teacher_ids\[1, 2\] = .* repeats an earlier id"):
        torch.ops.flashdistill.topk_kd_loss(z, ids, lp, 2, 1.0, 1.0, w, None, None, "cpu")
    ids[1, 2] = 20
    with pytest.raises(ValueError, match=r"teacher_ids\[1, 2\] = 20 is outside \[0, 20\)"):
        torch.ops.flashdistill.topk_kd_loss(z, ids, lp, 2, 1.0, 1.0, w, None, None, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    z, ids, lp = make(4, 33, 5, torch.float32, seed=7)
    w = torch.full((4,), 0.25)
    torch.library.opcheck(torch.ops.flashdistill.topk_kd_loss.default,
                          (z.clone().requires_grad_(True), ids, lp, 2, 2.0, 0.5, w, torch.tensor([1, -1, 5, 0]),
                           w * 2, backend))

    def step(z):
        return fd.topk_kd_loss(z, ids, lp, mode="tail_bucket", gen_temperature=1.0, temperature=2.0,
                               labels=torch.tensor([1, 2, -100, 4]), hard_weight=0.2, backend=backend)

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        zz = z.clone().requires_grad_(True)
        loss = fn(zz)
        loss.backward()
        outs.append((loss, zz.grad))
    torch.testing.assert_close(outs[0], outs[1])


def _bad(**over):
    z, ids, lp = make(4, 10, 3, torch.float32, seed=8)
    kw = dict(student_logits=z, teacher_ids=ids, teacher_logprobs=lp)
    kw.update(over)
    return lambda: fd.topk_kd_loss(kw.pop("student_logits"), kw.pop("teacher_ids"), kw.pop("teacher_logprobs"), **kw)


@pytest.mark.parametrize("call,match", [
    (_bad(teacher_ids=torch.zeros(4, 3, dtype=torch.int32)), r"teacher_ids must be int64 \[..., K\]"),
    (_bad(teacher_ids=torch.zeros(5, 3, dtype=torch.int64)), r"over the student's tokens \(4,\)"),
    (_bad(teacher_ids=torch.zeros(4, 11, dtype=torch.int64), teacher_logprobs=torch.zeros(4, 11)),
     r"K = 11 ids per token; K must be in \[1, V = 10\]"),
    (_bad(teacher_logprobs=torch.zeros(4, 2)), r"teacher_logprobs must have teacher_ids' shape \(4, 3\)"),
    (_bad(teacher_ids=torch.tensor([[0, 1, 2]] * 3 + [[0, 1, 10]])), r"teacher_ids\[3, 2\] .* = 10 is outside"),
    (_bad(teacher_ids=torch.tensor([[0, 1, 2]] * 3 + [[4, 1, 4]])), r"teacher_ids row 3 .* repeats id 4"),
    (_bad(mode="tail"), r"mode='tail' is not one of renorm_teacher, renorm_both, tail_bucket"),
    (_bad(gen_temperature=0.0), r"temperature and gen_temperature must be > 0"),
    (_bad(hard_weight=1.0), r"topk_kd_loss: hard_weight=1.0 needs labels"),
    (_bad(backend="cuda"), r"topk_kd_loss: backend 'cuda' cannot run on cpu tensors"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, match):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_gpu(backend, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    z, ids, lp = make(41, 32003, 64, torch.bfloat16, seed=31)
    labels = torch.randint(0, 32003, (41,), generator=torch.Generator().manual_seed(7))
    labels[::5] = -100
    check(backend, z.cuda(), ids.cuda(), lp.cuda(), mode=mode, temperature=1.5, gen_temperature=0.8,
          labels=labels.cuda(), hard_weight=0.3)
