"""The CPU row kernel of kd_loss (flashdistill._C.kd_forward, csrc/cpu/kd.cpp), called directly, against
the float64 spec kernels/kd/reference.py.

Oracle, on the inputs rounded to their dtype and taken to float64: soft_rows = token_divergence;
hard_rows = F.cross_entropy(z, label, reduction='none') (0 without a label); grad = autograd of
sum(row_weight * D) + sum(hard_weight * CE) through the reference. Masked rows (row_weight 0 and no
active hard term) must come back as D = CE = 0 and a zero gradient row. Every output is NaN-poisoned
first.

Error budget: the kernel computes in float32 (float64 for float64) with its own vectorized exp / log1p
(a few ulp), so per element |err| <= 2 ulp_dtype(oracle) + K u_C mag, mag the size of the terms the
element comes from: (|w| / T) (q + p) (1 + |u| + |v| + |LSE|s) for the soft part, |hw| (softmax(z) + 1)
for the hard one; the row sums relative to the sum of |terms| (K = 32: some roundings of exp, logs,
differences; measured worst: 1/20 of it in float64, float32 and 16-bit take their 2 ulps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashdistill import _C
from flashdistill.kernels.kd import reference as ref

KINDS = ["forward_kl", "reverse_kl", "jsd", "jsd_normalized", "tvd", "skew_forward_kl", "skew_reverse_kl", "mixed"]
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
FORMAT = {torch.float64: (52, -1022), torch.float32: (23, -126), torch.bfloat16: (7, -126), torch.float16: (10, -14)}
ALPHA, LAM = 0.1, 0.3


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cd_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ulp(v64, dtype):
    p, emin = FORMAT[dtype]
    e = torch.floor(torch.log2(v64.abs().clamp_min(2.0**emin))).clamp_min(emin)
    return torch.exp2(e - p)


def make(N, V, dtype, seed, padded=False, labels=True, hard=True, masked=True):
    g = torch.Generator().manual_seed(seed)
    W = V + 5 if padded else V
    z = (2 * torch.randn(N, W, dtype=torch.float64, generator=g)).to(dtype)[:, :V]
    t = (2 * torch.randn(N, W, dtype=torch.float64, generator=g) + 0.5).to(dtype)[:, :V]
    cd = cd_of(dtype)
    rw = torch.rand(N, dtype=torch.float64, generator=g).to(cd) + 0.25
    lab = torch.randint(0, V, (N,), generator=g) if labels else None
    hw = (torch.rand(N, dtype=torch.float64, generator=g) + 0.1).to(cd) if hard else None
    if masked and N > 1:
        rw[1] = 0.0  # masked when also without an active hard term
        if lab is not None:
            lab[1] = -100
            lab[-1] = -100  # soft term only
        if N > 3:
            rw[2] = 0.0  # hard term only (when labels and hw)
        if hw is not None and N > 4:
            hw[3] = 0.0
    return z, t, rw, lab, hw


def call(z, t, kind, T, beta, rw, lab, hw, want_hard=True):
    N, V = z.shape
    cd = cd_of(z.dtype)
    grad = torch.full((N, V), float("nan"), dtype=z.dtype)
    soft = torch.full((N,), float("nan"), dtype=cd)
    hard = torch.full((N,), float("nan"), dtype=cd) if want_hard else None
    p = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    _C.kd_forward(CODE[z.dtype], N, V, z.data_ptr(), z.stride(0) if N > 1 else V, V, t.data_ptr(),
                  t.stride(0) if N > 1 else V, V, KINDS.index(kind), T, beta, ALPHA, LAM,
                  rw.data_ptr(), p(lab), p(hw), grad.data_ptr(), soft.data_ptr(), p(hard))
    return grad, soft, hard


def oracle(z, t, kind, T, beta, rw, lab, hw):
    N, V = z.shape
    x = z.to(torch.float64).requires_grad_(True)
    tt = t.to(torch.float64)
    D = ref.token_divergence(x, tt, kind, temperature=T, beta=beta, alpha=ALPHA, lam=LAM)
    rw64 = rw.to(torch.float64)
    valid = lab >= 0 if lab is not None else torch.zeros(N, dtype=torch.bool)
    hw64 = hw.to(torch.float64) if hw is not None else torch.zeros(N, dtype=torch.float64)
    hw64 = torch.where(valid, hw64, torch.zeros_like(hw64))
    safe = torch.where(valid, lab, torch.zeros_like(lab)) if lab is not None else torch.zeros(N, dtype=torch.long)
    ce = F.cross_entropy(x, safe, reduction="none")
    (gx,) = torch.autograd.grad((rw64 * D).sum() + (hw64 * ce).sum(), x)
    masked = (rw64 == 0) & (hw64 == 0)
    D = torch.where(masked, torch.zeros_like(D), D).detach()
    ce = torch.where(valid & ~masked, ce, torch.zeros_like(ce)).detach()
    # magnitudes for the budget
    u, v = x.detach() / T, tt / T
    lq, lp = F.log_softmax(u, -1), F.log_softmax(v, -1)
    q, p = lq.exp(), lp.exp()
    big = (u.abs() + v.abs() + torch.logsumexp(u, -1, keepdim=True).abs()
           + torch.logsumexp(v, -1, keepdim=True).abs() + 1.0)
    mag = (rw64.abs() / T)[:, None] * (q + p) * big * (10.0 if kind in ("skew_forward_kl", "skew_reverse_kl",
                                                                       "jsd_normalized") else 1.0)
    mag = mag + hw64[:, None] * (F.softmax(x.detach(), -1) + 1.0)
    dmag = ((q + p) * big).sum(-1) * (10.0 if kind.startswith("skew") else 1.0) / (
        beta * (1 - beta) if kind == "jsd_normalized" and 0 < beta < 1 else 1.0)
    cemag = torch.logsumexp(x.detach(), -1).abs() + x.detach().abs().amax(-1)
    tie = (q - p).abs() <= 1e-4 * (q + p) if kind == "tvd" else torch.zeros_like(q, dtype=torch.bool)
    return gx, D, ce, mag, dmag, cemag, tie & (V > 1)


def check(z, t, kind, T, beta, rw, lab, hw):
    grad, soft, hard = call(z, t, kind, T, beta, rw, lab, hw)
    gx, D, ce, mag, dmag, cemag, tie = oracle(z, t, kind, T, beta, rw, lab, hw)
    cd = cd_of(z.dtype)
    u = 2.0**-53 if cd == torch.float64 else 2.0**-24
    what = f"{kind} T={T} beta={beta} {z.dtype} {tuple(z.shape)}"
    g64 = grad.to(torch.float64)
    assert not torch.isnan(g64).any(), f"{what}: NaN in grad (unwritten?)"
    budget = 2 * ulp(gx, z.dtype) + 32 * u * mag
    bad = ((g64 - gx).abs() > budget) & ~tie
    assert not bad.any(), (f"{what}: grad {int(bad.sum())} over budget; worst err "
                           f"{float(((g64 - gx).abs() - budget).max()):.3g}")
    db = 32 * u * dmag + 1e-30
    assert torch.all((soft.to(torch.float64) - D).abs() <= db), f"{what}: soft {soft} vs {D}"
    cb = 64 * u * cemag
    assert torch.all((hard.to(torch.float64) - ce).abs() <= cb), f"{what}: hard {hard} vs {ce}"


def jsd_betas(kind):
    return [0.0, 0.3, 1.0] if kind in ("jsd", "jsd_normalized") else [0.3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_kinds(kind, dtype):
    for T in (1.0, 2.5):
        for beta in jsd_betas(kind):
            for i, (N, V) in enumerate([(1, 1), (3, 7), (17, 1000), (1, 7)]):
                z, t, rw, lab, hw = make(N, V, dtype, seed=10 * i + int(T), padded=(i == 2))
                check(z, t, kind, T, beta, rw, lab, hw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_16bit(kind, dtype):
    for T in (1.0, 2.5):
        for beta in jsd_betas(kind):
            for i, (N, V) in enumerate([(3, 7), (17, 1000)]):
                z, t, rw, lab, hw = make(N, V, dtype, seed=7 + i, padded=(i == 1))
                check(z, t, kind, T, beta, rw, lab, hw)


@pytest.mark.parametrize("kind", KINDS)
def test_large_vocab(kind):
    """V = 32003 (odd; 16 blocks of 2048 and a tail), float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        z, t, rw, lab, hw = make(3, 32003, dtype, seed=3)
        check(z, t, kind, 2.5, 0.3, rw, lab, hw)


def test_no_labels_no_hard():
    z, t, rw, _, _ = make(5, 1000, torch.float32, seed=5, labels=False, hard=False)
    for kind in ("forward_kl", "jsd"):
        check(z, t, kind, 2.5, 0.3, rw, None, None)
        grad, soft, hard = call(z, t, kind, 2.5, 0.3, rw, None, None, want_hard=False)
        assert hard is None and not torch.isnan(soft).any()
        assert torch.all(grad[1] == 0) and soft[1] == 0  # rw = 0: masked


def test_labels_without_hard_weight():
    """hard_rows is the CE wherever there is a label, even with no hard_weight (then no hard gradient)."""
    z, t, rw, lab, _ = make(5, 700, torch.float32, seed=6, hard=False, masked=False)
    check(z, t, "reverse_kl", 1.0, 0.3, rw, lab, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_path(dtype):
    """N V 3 sizeof > 16 MiB: grad goes out with streaming stores (fp32: 48 x 32003)."""
    N = 48 if dtype == torch.float32 else 96
    z, t, rw, lab, hw = make(N, 32003, dtype, seed=11)
    check(z, t, "jsd", 2.5, 0.3, rw, lab, hw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_thread_count_bit_identical(dtype):
    z, t, rw, lab, hw = make(17, 5003, dtype, seed=12)
    for kind in KINDS:
        outs = []
        before = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                assert _C.omp_max_threads() == n
                outs.append(call(z, t, kind, 2.5, 0.3, rw, lab, hw))
        finally:
            torch.set_num_threads(before)
        for a, b in zip(*outs):
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float64 else a.view(torch.int64),
                               b.view(torch.uint8) if b.dtype != torch.float64 else b.view(torch.int64)), kind
