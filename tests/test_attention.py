"""Attention and attention_kd_loss: every backend against the float64 reference, forward and backward.

The oracle is the reference in float64 on the same (rounded) inputs; gradients come from autograd
through it. Shapes are awkward on purpose (1, odd lengths, Lq != Lk under the causal mask, head dims
that are not powers of two, grouped kv heads, non-contiguous inputs); the Triton interpreter gets the
small ones, the long ones (Lq = Lk = 1023) run on the C++ backend by default and on every backend
under ``-m full``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashdistill as fd
from flashdistill.kernels.attention import reference
from oracle import assert_within_budget, backends_under_test, randn

BACKENDS = backends_under_test("cpu")
FAST = [b for b in BACKENDS if b != "triton"]

# (B, Hq, Hk, Lq, Lk, D, causal)
CASES = [
    (1, 1, 1, 1, 1, 32, False),
    (1, 1, 1, 1, 23, 64, True),      # one query row: sees key 0 only when causal
    (2, 4, 2, 17, 17, 64, True),     # GQA
    (1, 2, 1, 33, 21, 40, False),    # MQA, D not a power of two
    (1, 2, 2, 13, 29, 96, True),     # causal, Lq < Lk
    (1, 2, 1, 29, 13, 32, True),     # causal, Lq > Lk (rows >= Lk see every key)
    (1, 1, 1, 97, 97, 128, False),
]
LONG = [(1, 2, 1, 1023, 1023, 64, True), (1, 1, 1, 97, 1023, 32, False)]


def _case_id(c):
    B, hq, hk, lq, lk, d, causal = c
    return f"B{B}h{hq}/{hk}q{lq}k{lk}d{d}{'c' if causal else ''}"


def _inputs(case, dtype, seed, *, noncontig=False):
    B, hq, hk, lq, lk, d, _ = case
    g = torch.Generator().manual_seed(seed)
    if noncontig:  # [B, L, H, D] projections viewed as [B, H, L, D], as attention layers produce them
        q = randn((B, lq, hq, d), dtype, generator=g).transpose(1, 2)
        k = randn((B, lk, hk, d), dtype, generator=g).transpose(1, 2)
        v = randn((B, lk, hk, d), dtype, generator=g).transpose(1, 2)
    else:
        q = randn((B, hq, lq, d), dtype, generator=g)
        k = randn((B, hk, lk, d), dtype, generator=g)
        v = randn((B, hk, lk, d), dtype, generator=g)
    dout = randn((B, hq, lq, d), dtype, generator=g)
    return q, k, v, dout


def _check_attention(backend, case, dtype, seed=0, *, noncontig=False, scale=None):
    causal = case[-1]
    q, k, v, dout = _inputs(case, dtype, seed, noncontig=noncontig)
    # oracle: float64 autograd through the reference
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, lse64 = reference.attention(q64, k64, v64, causal=causal, scale=scale)
    dq64, dk64, dv64 = torch.autograd.grad(o64, (q64, k64, v64), dout.double())
    # the reference in the test dtype (its own rounding sets the budget)
    o_r, lse_r = reference.attention(q, k, v, causal=causal, scale=scale)
    sc = reference.default_scale(q.shape[-1]) if scale is None else scale
    dq_r, dk_r, dv_r = reference.attention_backward(q, k, v, o_r, lse_r, dout, causal=causal, scale=sc)
    # the backend
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))  # clone keeps a transposed layout
    assert qb.is_contiguous() != noncontig
    out, lse = fd.attention(qb, kb, vb, causal=causal, scale=scale, return_lse=True, backend=backend)
    out.backward(dout)
    lk = case[4]
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within_budget(f"{backend} out", out, o64, o_r, dtype, n_reduce=lk, cancels=True)
    assert_within_budget(f"{backend} lse", lse, lse64, lse_r, torch.float32 if dtype != torch.float64 else dtype,
                         n_reduce=lk, cancels=True)
    # dS = P (dP - Delta) cancels exactly where a row sees one key (dq = 0 there): the terms' size is
    # that of the gradients as a whole, so the floor is relative to the largest of them
    mag = max(float(t.abs().max()) for t in (dq64, dk64, dv64))
    for name, got, want, ref in (("dq", qb.grad, dq64, dq_r), ("dk", kb.grad, dk64, dk_r), ("dv", vb.grad, dv64, dv_r)):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert_within_budget(f"{backend} {name}", got, want, ref, dtype, n_reduce=max(case[3], lk) * case[1],
                             cancels=True, magnitude=mag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention(backend, case, dtype):
    _check_attention(backend, case, dtype)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", [CASES[2], CASES[5]], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_16bit(backend, case, dtype):
    _check_attention(backend, case, dtype, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_noncontiguous_and_scale(backend):
    _check_attention(backend, CASES[4], torch.float32, seed=2, noncontig=True, scale=0.37)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LONG, ids=_case_id)
def test_attention_long(backend, case):
    if backend == "triton" and case[3] > 97:
        pytest.skip("the interpreter takes ~30 s here: -m full runs it")
    _check_attention(backend, case, torch.float32, seed=3)


@pytest.mark.full
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LONG, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_long_full(backend, case, dtype):
    _check_attention(backend, case, dtype, seed=4)


@pytest.mark.parametrize("backend", FAST)
def test_attention_matches_sdpa(backend):
    """The drop-in and the context manager give SDPA's result (GQA included)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (randn(s, torch.float32, generator=g) for s in ((2, 4, 19, 32), (2, 2, 19, 32), (2, 2, 19, 32)))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(fd.sdpa(q, k, v, is_causal=True, enable_gqa=True, backend=backend), want,
                               rtol=2e-5, atol=2e-6)
    with fd.use_flashdistill_attention(backend=backend):
        got = F.scaled_dot_product_attention(q[:, :2], k, v, scale=0.2)
    assert F.scaled_dot_product_attention is not None
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q[:, :2], k, v, scale=0.2), rtol=2e-5, atol=2e-6)
    three = fd.sdpa(q[:, 0], k[:, 0], v[:, 0], backend=backend)
    torch.testing.assert_close(three, F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0]), rtol=2e-5, atol=2e-6)


def test_sdpa_refuses_what_it_does_not_do():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        fd.sdpa(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        fd.sdpa(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="enable_gqa"):
        fd.sdpa(q, q[:, :1], q[:, :1])


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q.float(), k, v), "dtype and device"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple of the key/value heads"),
    (lambda q, k, v: (q, k, v[..., :4]), "shape of 'k'"),
    (lambda q, k, v: (q[0], k, v), r"\[batch, heads, seqlen, headdim\]"),
    (lambda q, k, v: (q, k[..., :4], v[..., :4]), r"must be \[2, Hk, Lk, 8\]"),
])
def test_attention_bad_input(bad, match):
    q, k, v = torch.randn(2, 4, 5, 8, dtype=torch.float64), torch.randn(2, 2, 6, 8, dtype=torch.float64), \
        torch.randn(2, 2, 6, 8, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match) as e:
        fd.attention(*bad(q, k, v), backend="reference")
    assert "attention" in str(e.value)


def test_attention_head_dim_limit():
    q = torch.randn(1, 1, 2, 257)
    with pytest.raises(ValueError, match="head dim 257 is larger than supported"):
        fd.attention(q, q, q)


# ----------------------------------------------------------------------------------------------------
# attention_kd_loss

KD_CASES = [  # (B, H, Hks, Hkt, Lq, Lk, Ds, Dt, causal)
    (1, 1, 1, 1, 1, 1, 32, 32, False),
    (2, 4, 2, 1, 17, 17, 32, 64, True),
    (1, 2, 1, 2, 13, 29, 40, 96, True),
    (1, 2, 2, 2, 29, 13, 64, 32, True),
    (1, 2, 1, 1, 33, 33, 32, 32, False),
]


def _kd_id(c):
    return "B{}h{}/{}/{}q{}k{}ds{}dt{}{}".format(*c[:-1], "c" if c[-1] else "")


def _check_kd(backend, case, dtype, seed=0, reduction="mean"):
    B, H, hks, hkt, lq, lk, ds, dt, causal = case
    g = torch.Generator().manual_seed(seed)
    qs, ks = randn((B, H, lq, ds), dtype, generator=g), randn((B, hks, lk, ds), dtype, generator=g)
    # a teacher correlated with the student, so the KL is not dominated by noise
    qt, kt = randn((B, H, lq, dt), dtype, generator=g, scale=1.5), randn((B, hkt, lk, dt), dtype, generator=g)
    qs64, ks64 = (t.detach().double().requires_grad_() for t in (qs, ks))
    kl64, lse_s64, lse_t64 = reference.attention_kd(qs64, ks64, qt.double(), kt.double(), causal=causal)
    # the kernels form KL = sum P (t - s) - lse_t + lse_s: terms of the log-sum-exps' size cancel
    row_mag = float((lse_s64.abs() + lse_t64.abs()).max() + kl64.detach().abs().max())
    w = randn((B, H, lq), torch.float64, generator=g) if reduction == "none" else None
    loss64 = {"mean": kl64.mean(), "sum": kl64.sum(), "none": None}[reduction]
    obj64 = (kl64 * w).sum() if reduction == "none" else loss64
    dq64, dk64 = torch.autograd.grad(obj64, (qs64, ks64))
    kl_r, lse_s_r, lse_t_r = reference.attention_kd(qs, ks, qt, kt, causal=causal)
    kl_r = kl_r.detach()
    gr = {"mean": torch.full_like(kl_r, 1 / kl_r.numel()), "sum": torch.ones_like(kl_r), "none": None}[reduction]
    gr = w.to(kl_r.dtype) if reduction == "none" else gr
    dq_r, dk_r = reference.attention_kd_backward(qs, ks, qt, kt, lse_s_r, lse_t_r, gr, causal=causal,
                                                 scale_s=ds**-0.5, scale_t=dt**-0.5)
    qsb, ksb = (t.detach().clone().requires_grad_() for t in (qs, ks))
    loss = fd.attention_kd_loss(qsb, ksb, qt, kt, causal=causal, reduction=reduction, backend=backend)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == cd
    if reduction == "none":
        assert loss.shape == (B, H, lq)
        assert_within_budget(f"{backend} kl rows", loss, kl64, kl_r, cd, n_reduce=lk, magnitude=row_mag)
        (loss * w.to(cd)).sum().backward()
    else:
        ref_loss = kl_r.mean() if reduction == "mean" else kl_r.sum()
        assert_within_budget(f"{backend} kd loss", loss, loss64, ref_loss, cd, n_reduce=lk * kl_r.numel(),
                             magnitude=row_mag * (1 if reduction == "mean" else kl_r.numel()))
        loss.backward()
    # dS = g (Q - P) cancels (exactly with one visible key): the floor is relative to the terms' size,
    # |g| (Q + P) times |k_s| (dq) or |q_s| (dk)
    with torch.no_grad():
        s64 = reference._logits(qs.double(), ks.double(), ds**-0.5, causal)
        t64 = reference._logits(qt.double(), kt.double(), dt**-0.5, causal)
        g64 = (w.abs() if reduction == "none" else gr.double().abs())[..., None]
        both = g64 * (torch.softmax(s64, -1) + torch.softmax(t64, -1)) * ds**-0.5
        mag_q = float(torch.matmul(both, reference._expand_kv(ks.double().abs(), H)).max())
        mag_k = float(torch.matmul(both.transpose(-1, -2), qs.double().abs()).max()) * (H // hks)
    assert_within_budget(f"{backend} kd dq_s", qsb.grad, dq64, dq_r, dtype, n_reduce=lk, cancels=True,
                         magnitude=mag_q)
    assert_within_budget(f"{backend} kd dk_s", ksb.grad, dk64, dk_r, dtype, n_reduce=lq * H, cancels=True,
                         magnitude=mag_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", KD_CASES, ids=_kd_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_kd_loss(backend, case, dtype):
    _check_kd(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_attention_kd_reductions(backend, reduction):
    _check_kd(backend, KD_CASES[1], torch.float32, seed=1, reduction=reduction)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_attention_kd_bf16(backend):
    _check_kd(backend, KD_CASES[1], torch.bfloat16, seed=2)


@pytest.mark.parametrize("backend", FAST)
def test_attention_kd_long(backend):
    _check_kd(backend, (1, 2, 1, 1, 1023, 1023, 32, 64, True), torch.float32, seed=3)


def test_attention_kd_equal_models_is_zero_and_relation_gradient():
    """KL(P || P) = 0 with a zero gradient; with q = k = X (MiniLMv2's relations) the gradient reaches
    X through both arguments and matches autograd through the reference."""
    g = torch.Generator().manual_seed(6)
    x = randn((1, 2, 11, 16), torch.float64, generator=g)
    xs = x.clone().requires_grad_()
    loss = fd.attention_kd_loss(xs, xs, x, x, backend="cpu" if "cpu" in BACKENDS else "reference")
    loss.backward()
    assert abs(loss.item()) < 1e-12 and xs.grad.abs().max().item() < 1e-12
    t = randn((1, 2, 11, 24), torch.float64, generator=g)
    for backend in FAST:
        xs = x.clone().requires_grad_()
        fd.attention_kd_loss(xs, xs, t, t, backend=backend).backward()
        x64 = x.clone().requires_grad_()
        kl, _, _ = reference.attention_kd(x64, x64, t, t)
        (want,) = torch.autograd.grad(kl.mean(), (x64,))
        torch.testing.assert_close(xs.grad, want, rtol=1e-10, atol=1e-13)


def test_attention_kd_bad_input():
    s, t = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="share batch, heads and sequence lengths"):
        fd.attention_kd_loss(s, s, t[:, :1], t[:, :1])
    with pytest.raises(ValueError, match="teacher must have the student's dtype"):
        fd.attention_kd_loss(s, s, t.double(), t.double())
    with pytest.raises(ValueError, match="reduction"):
        fd.attention_kd_loss(s, s, t, t, reduction="batchmean")


# ----------------------------------------------------------------------------------------------------
# the op contract: opcheck, torch.compile

@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(7)
    q, k, v = (randn(s, torch.float32, generator=g).requires_grad_() for s in ((1, 2, 9, 16), (1, 1, 7, 16),
                                                                             (1, 1, 7, 16)))
    torch.library.opcheck(torch.ops.flashdistill.attention_fwd, (q, k, v, True, 0.25, backend))
    qt, kt = randn((1, 2, 9, 8), torch.float32, generator=g), randn((1, 1, 7, 8), torch.float32, generator=g)
    torch.library.opcheck(torch.ops.flashdistill.attention_kd_fwd, (q, k, qt, kt, False, 0.25, 0.3, backend))


@pytest.mark.parametrize("backend", FAST)
def test_torch_compile_fullgraph(backend):
    g = torch.Generator().manual_seed(8)
    q, k, v = (randn(s, torch.float32, generator=g) for s in ((1, 2, 9, 16), (1, 1, 9, 16), (1, 1, 9, 16)))
    qt = randn((1, 2, 9, 8), torch.float32, generator=g)

    def step(q, k, v):
        out = fd.attention(q, k, v, causal=True, backend=backend)
        return (out * out).sum() + fd.attention_kd_loss(q, k, qt, qt, backend=backend)

    args = [t.clone().requires_grad_() for t in (q, k, v)]
    step(*args).backward()
    cargs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(step, fullgraph=True)(*cargs).backward()
    for a, b in zip(args, cargs):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# GPU (run on a CUDA machine; skipped elsewhere)

GPU_CASES = [(2, 8, 2, 1023, 1023, d, c) for d in (32, 64, 96, 128) for c in (False, True)] + \
    [(1, 4, 4, 97, 1023, 64, True), (1, 4, 1, 1023, 97, 128, True), (3, 2, 2, 1, 1, 64, False)] + \
    [(1, 4, 2, 257, 255, 80, True), (2, 2, 1, 130, 130, 256, False), (2, 2, 2, 33, 33, 16, True)]  # generic path


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_attention_gpu(backend, case, dtype):
    q, k, v, dout = (t.cuda() for t in _inputs(case, dtype, 9))
    causal = case[-1]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, _ = reference.attention(q64, k64, v64, causal=causal)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), dout.double())
    # budget reference: SDPA in the same dtype (its own error)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o_r = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal, enable_gqa=True)
    grads_r = torch.autograd.grad(o_r, (qr, kr, vr), dout)
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fd.attention(qb, kb, vb, causal=causal, backend=backend)
    grads = torch.autograd.grad(out, (qb, kb, vb), dout)
    assert_within_budget(f"{backend} out", out, o64, o_r, dtype, n_reduce=case[4], cancels=True)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, grads64, grads_r):
        assert_within_budget(f"{backend} {name}", a, b, c, dtype, n_reduce=case[3] * case[1], cancels=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_kd_gpu(backend, dtype):
    case = (2, 4, 2, 1, 1023, 1023, 64, 128, True)
    B, H, hks, hkt, lq, lk, ds, dt, causal = case
    g = torch.Generator().manual_seed(10)
    qs, ks = randn((B, H, lq, ds), dtype, generator=g).cuda(), randn((B, hks, lk, ds), dtype, generator=g).cuda()
    qt, kt = randn((B, H, lq, dt), dtype, generator=g).cuda(), randn((B, hkt, lk, dt), dtype, generator=g).cuda()
    ref = fd.attention_kd_loss(qs.cpu().double(), ks.cpu().double(), qt.cpu().double(), kt.cpu().double(),
                               causal=True, backend="reference")
    qsb = qs.clone().requires_grad_()
    loss = fd.attention_kd_loss(qsb, ks, qt, kt, causal=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-4)
    assert torch.isfinite(qsb.grad).all()
