"""The CPU kernels of the K2 and K3/K5 skeletons, called directly (flashdistill._C), against float64.

score_identity_forward / _backward and regression_forward / _backward take raw pointers (csrc/README.md,
"The score-loss skeletons"); here they get torch tensors' data_ptr()s, strides in elements and dtype
codes, with every output NaN-poisoned first so that an element a kernel forgets to write fails. The
oracle is the skeleton reference (kernels/<op>/reference.py: ``sums``, ``grads`` / ``grad``) run in
float64 on the same inputs.

Error budget (stated in every failure message):
  - sums, in the compute type C (float32, or float64 for float64 inputs): |err| <= rtol * sum_i |term_i|
    with rtol = 1e-5 for float32 (~170 roundoffs: 2048-element blocks in 16 lanes of 128 terms) and
    1e-13 for float64;
  - gradients: |err| <= 2 ulp_dtype(oracle) + 16 u_C * mag, where mag bounds the magnitudes of the
    intermediates the element is computed from (cancellation in P u + Q y, c1 t1 + c2 t2, ...): the
    output rounded to its dtype (2 ulps: the value in C is off by a few u_C before rounding) plus the
    arithmetic in C.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flashdistill import _C
from flashdistill.kernels.regression import reference as reg_ref
from flashdistill.kernels.score_identity import reference as sid_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# (mantissa bits, minimum normal exponent) of each dtype, for its ulp.
FORMAT = {torch.float64: (52, -1022), torch.float32: (23, -126), torch.bfloat16: (7, -126), torch.float16: (10, -14)}
# (B, D, layout): every B in {1, 3, 17} and D in {1, 3, 2049, 5000} (odd, not multiples of the 2048-element
# block), rows contiguous or batch-strided (every other row of a [2B, D] tensor: bstride 2D).
SHAPES = [(1, 1, "contiguous"), (17, 1, "batch_strided"), (3, 3, "batch_strided"), (1, 2049, "contiguous"),
          (17, 2049, "contiguous"), (17, 2049, "batch_strided"), (3, 5000, "batch_strided")]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for everything but test_thread_count_bit_identical: the float64 oracle's many small
    torch ops run far faster (and the kernels' threaded paths are checked bit-identical there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cd_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(cd):
    return 2.0**-53 if cd == torch.float64 else 2.0**-24


def ulp(v64, dtype):
    p, emin = FORMAT[dtype]
    e = torch.floor(torch.log2(v64.abs().clamp_min(2.0**emin))).clamp_min(emin)
    return torch.exp2(e - p)


def ptr(t):
    return 0 if t is None else t.data_ptr()


def bs(t):
    return 0 if t is None else t.stride(0)


def f64(t):
    return None if t is None or not isinstance(t, torch.Tensor) else t.to(torch.float64)


def rows(B, D, dtype, gen, layout, shift=0.0):
    """[B, D] rows of dtype: contiguous, or every other row of a [2B, D] tensor (bstride 2D)."""
    n = 2 * B if layout == "batch_strided" else B
    t = (torch.randn(n, D, dtype=torch.float64, generator=gen) + shift).to(dtype)
    t = t[::2] if layout == "batch_strided" else t
    assert t.stride(1) == 1 or D == 1
    return t


def poisoned(B, D, dtype):
    return torch.full((B, D), float("nan"), dtype=dtype)


def check_close(what, out, oracle64, budget):
    """|out - oracle| <= budget elementwise, NaN exactly where the oracle has NaN."""
    o = out.to(torch.float64)
    nan_o, nan_r = torch.isnan(o), torch.isnan(oracle64)
    assert torch.equal(nan_o, nan_r), (
        f"{what}: NaN pattern differs ({int(nan_o.sum())} in output vs {int(nan_r.sum())} in the oracle; "
        f"NaN in the output can be an element the kernel never wrote)")
    err = (o - oracle64).abs()
    bad = ~nan_r & ~(err <= budget)
    if bool(bad.any()):
        idx = torch.argsort(torch.where(bad, err - budget, torch.zeros_like(err)).reshape(-1), descending=True)[:5]
        lines = "\n".join(f"    [{int(i)}] got {o.reshape(-1)[i].item():.9g} oracle {oracle64.reshape(-1)[i].item():.9g} "
                          f"err {err.reshape(-1)[i].item():.3g} budget {budget.reshape(-1)[i].item():.3g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {o.numel()} elements over budget:\n{lines}")


def sum_budget(abs_terms_sum, operand_sum, cd):
    """rtol of the summation relative to sum |term|, plus 8 roundoffs of each term's operands."""
    rtol = 1e-13 if cd == torch.float64 else 1e-5
    return rtol * abs_terms_sum + 8 * unit_roundoff(cd) * operand_sum


def grad_budget(oracle64, mag, dtype):
    return 2 * ulp(oracle64, dtype) + 16 * unit_roundoff(cd_of(dtype)) * mag


# ---- K2: score identity ----------------------------------------------------------------------------

# (guide r, guide f, per-sample w)
CFGS = [(False, False, False), (True, False, False), (True, False, True), (False, True, False),
        (False, True, True), (True, True, False), (True, True, True)]


def sid_inputs(B, D, dtype, cfg, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    cd = cd_of(dtype)
    gr_, gf_, per_sample = cfg
    x = rows(B, D, dtype, gen, layout)
    r = rows(B, D, dtype, gen, layout, 0.3)
    f = rows(B, D, dtype, gen, layout, -0.2)
    r_u = rows(B, D, dtype, gen, layout, 0.1) if gr_ else None
    f_u = rows(B, D, dtype, gen, layout, -0.1) if gf_ else None
    if per_sample:
        wr = (torch.rand(B, generator=gen, dtype=torch.float64) * 6 - 1).to(cd)
        wf = (torch.rand(B, generator=gen, dtype=torch.float64) * 3 + 0.5).to(cd)
    else:
        wr, wf = 1.75, -0.625  # exact in every compute type
    coef = (torch.randn(B, 2, generator=gen, dtype=torch.float64) * 2).to(cd)
    return x, r, r_u, wr, f, f_u, wf, coef


def w_args(w, present):
    """(w_ptr, w) for the ABI."""
    if not present:
        return 0, 0.0
    return (w.data_ptr(), 0.0) if isinstance(w, torch.Tensor) else (0, float(w))


def sid_forward(x, r, r_u, wr, f, f_u, wf):
    B, D = x.shape
    sums = torch.full((B, 3), float("nan"), dtype=cd_of(x.dtype))
    _C.score_identity_forward(CODE[x.dtype], B, D, ptr(x), bs(x), ptr(r), bs(r), ptr(r_u), bs(r_u),
                              *w_args(wr, r_u is not None), ptr(f), bs(f), ptr(f_u), bs(f_u),
                              *w_args(wf, f_u is not None), sums.data_ptr(), 0, 0, 0)
    return sums


def sid_backward(x, r, r_u, wr, f, f_u, wf, coef, need=(True,) * 5):
    """(gx, gr, gr_u, gf, gf_u), None where not requested or not applicable."""
    B, D = x.shape
    applicable = (True, True, r_u is not None, True, f_u is not None)
    outs = [poisoned(B, D, x.dtype) if n and a else None for n, a in zip(need, applicable)]
    _C.score_identity_backward(CODE[x.dtype], B, D, ptr(x), bs(x), ptr(r), bs(r), ptr(r_u), bs(r_u),
                               *w_args(wr, r_u is not None), ptr(f), bs(f), ptr(f_u), bs(f_u),
                               *w_args(wf, f_u is not None), coef.data_ptr(), *(ptr(o) for o in outs), 0)
    return outs


def sid_magnitudes(x, r, r_u, wr, f, f_u, wf, coef):
    """Bounds of |Gx|, |Gr|, |Gf| from |intermediates|, and |w|, |1 - w| per guided prediction (float64)."""
    B = x.shape[0]
    col = lambda w: f64(w).reshape(B, 1) if isinstance(w, torch.Tensor) else w  # noqa: E731
    X, R, F = (t.to(torch.float64).abs() for t in (x, r, f))
    wr_, wf_ = col(wr), col(wf)
    Rb = R if r_u is None else r_u.to(torch.float64).abs() * (1 + abs(wr_)) + abs(wr_) * R
    Fb = F if f_u is None else f_u.to(torch.float64).abs() * (1 + abs(wf_)) + abs(wf_) * F
    Y, U = Rb + Fb, Fb + X
    P, Q = (coef[:, i].to(torch.float64).abs().reshape(B, 1) for i in range(2))
    Gx, Gr = P * Y, P * U + Q * Y
    splits = ((wr_, 1 - wr_) if r_u is not None else (1, 0), (wf_, 1 - wf_) if f_u is not None else (1, 0))
    return (Gx, Gr, Gx + Gr) + splits + (X, Rb, Y, U)


def check_sid_sums(what, sums, x, r, r_u, wr, f, f_u, wf):
    cd = cd_of(x.dtype)
    assert sums.dtype == cd and sums.shape == (x.shape[0], 3)
    args64 = (f64(x), f64(r), f64(r_u), f64(wr) if isinstance(wr, torch.Tensor) else wr,
              f64(f), f64(f_u), f64(wf) if isinstance(wf, torch.Tensor) else wf)
    oracle = sid_ref.sums(*args64)
    rb, fb = (sid_ref.guided(p, pu, w) for p, pu, w in ((args64[1], args64[2], args64[3]), (args64[4], args64[5], args64[6])))
    y, u = rb - fb, fb - args64[0]
    X, Rb, Y, U = sid_magnitudes(x, r, r_u, wr, f, f_u, wf, torch.zeros(x.shape[0], 2))[5:]
    terms = torch.stack([(args64[0] - rb).abs().sum(1), (y * y).sum(1), (y * u).abs().sum(1)], dim=1)
    operands = torch.stack([(X + Rb).sum(1), (2 * y.abs() * Y).sum(1), (y.abs() * U + u.abs() * Y).sum(1)], dim=1)
    check_close(f"{what} sums", sums, oracle, sum_budget(terms, operands, cd))


def check_sid_grads(what, outs, x, r, r_u, wr, f, f_u, wf, coef):
    args64 = (f64(x), f64(r), f64(r_u), f64(wr) if isinstance(wr, torch.Tensor) else wr,
              f64(f), f64(f_u), f64(wf) if isinstance(wf, torch.Tensor) else wf)
    cd = torch.float64
    # the oracle in float64, from the reference, with x's dtype taken away (grads casts to x.dtype)
    oracle = sid_ref.grads(*args64, f64(coef), need=(True,) * 5)
    Gx, Gr, Gf, (wr_, rr_), (wf_, rf_) = sid_magnitudes(x, r, r_u, wr, f, f_u, wf, coef)[:5]
    mags = [Gx, abs(wr_) * Gr, abs(rr_) * Gr, abs(wf_) * Gf, abs(rf_) * Gf]
    names = ["gx", "gr", "gr_u", "gf", "gf_u"]
    for name, out, o64, mag in zip(names, outs, oracle, mags):
        if out is None:
            continue
        assert o64 is not None, f"{what}: {name} written but not applicable"
        assert out.dtype == x.dtype and o64.dtype == cd
        check_close(f"{what} {name}", out, o64, grad_budget(o64, mag, x.dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"r{int(c[0])}f{int(c[1])}{'w' if c[2] else 's'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_identity(dtype, cfg, shape):
    B, D, layout = shape
    inputs = sid_inputs(B, D, dtype, cfg, seed=B * 7919 + D, layout=layout)
    what = f"score_identity {dtype} cfg={cfg} {shape} {layout}"
    check_sid_sums(what, sid_forward(*inputs[:7]), *inputs[:7])
    check_sid_grads(what, sid_backward(*inputs), *inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_identity_gradient_subsets(dtype):
    """Every subset of the five outputs: exactly the requested ones are written, each correct."""
    B, D = 3, 300
    inputs = sid_inputs(B, D, dtype, (True, True, True), seed=11)
    for need in itertools.product([False, True], repeat=5):
        outs = sid_backward(*inputs, need=need)
        assert [o is not None for o in outs] == list(need)
        check_sid_grads(f"score_identity {dtype} need={need}", outs, *inputs)


@pytest.mark.parametrize("cfg", [(False, False, False), (True, True, True), (True, False, False)],
                         ids=["none", "both_w", "r_s"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_identity_dropped_samples(dtype, cfg):
    """P = Q = 0 (also -0): exact +0 in every output of that sample, even from NaN / inf inputs."""
    B, D = 5, 2100
    x, r, r_u, wr, f, f_u, wf, coef = sid_inputs(B, D, dtype, cfg, seed=5)
    dropped = [1, 3, 4]
    for b, t in zip(dropped, (x, r, f)):
        t[b, ::7] = float("nan")
        t[b, 3::11] = float("inf")
    if r_u is not None:
        r_u[3, 5] = float("nan")
    coef[1] = 0.0
    coef[3] = torch.tensor([-0.0, 0.0])
    coef[4] = torch.tensor([0.0, -0.0])
    outs = sid_backward(x, r, r_u, wr, f, f_u, wf, coef)
    keep = [0, 2]
    for o in outs:
        if o is None:
            continue
        z = o[dropped]
        assert torch.equal(z, torch.zeros_like(z)) and not bool(torch.signbit(z).any()), "dropped rows not +0"
    sub = lambda t: t[keep] if isinstance(t, torch.Tensor) else t  # noqa: E731
    check_sid_grads(f"score_identity dropped {dtype}", [None if o is None else o[keep] for o in outs],
                    sub(x), sub(r), sub(r_u), sub(wr), sub(f), sub(f_u), sub(wf), coef[keep])


# ---- K3/K5: regression -----------------------------------------------------------------------------

# (coef, t2): target t1; c1 t1; c1 t1 + c2 t2; t1 with a t2 the kernel must ignore (no coef)
TARGETS = [(False, False), (True, False), (True, True), (False, True)]


def reg_inputs(B, D, dtype, target, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    cd = cd_of(dtype)
    has_coef, has_t2 = target
    pred = rows(B, D, dtype, gen, layout, 0.2)
    t1 = rows(B, D, dtype, gen, layout)
    t2 = rows(B, D, dtype, gen, layout, -0.3) if has_t2 else None
    coef = (torch.randn(B, 2, generator=gen, dtype=torch.float64) + 0.5).to(cd) if has_coef else None
    k = (torch.randn(B, generator=gen, dtype=torch.float64) * 3).to(cd)
    return pred, t1, t2, coef, k


def reg_forward(pred, t1, t2, coef, kind, c):
    B, D = pred.shape
    sums = torch.full((B,), float("nan"), dtype=cd_of(pred.dtype))
    _C.regression_forward(CODE[pred.dtype], B, D, ptr(pred), bs(pred), ptr(t1), bs(t1), ptr(t2), bs(t2),
                          ptr(coef), kind, c, sums.data_ptr(), 0, 0, 0)
    return sums


def reg_backward(pred, t1, t2, coef, kind, c, k):
    B, D = pred.shape
    g = poisoned(B, D, pred.dtype)
    _C.regression_backward(CODE[pred.dtype], B, D, ptr(pred), bs(pred), ptr(t1), bs(t1), ptr(t2), bs(t2),
                           ptr(coef), kind, c, k.data_ptr(), g.data_ptr(), 0)
    return g


def reg_diff_magnitude(pred, t1, t2, coef):
    """|pred| + |c1 t1| + |c2 t2| (float64): the scale of d's rounding error."""
    B = pred.shape[0]
    m = pred.to(torch.float64).abs()
    if coef is None:
        return m + t1.to(torch.float64).abs()
    m = m + coef[:, 0].to(torch.float64).abs().reshape(B, 1) * t1.to(torch.float64).abs()
    if t2 is not None:
        m = m + coef[:, 1].to(torch.float64).abs().reshape(B, 1) * t2.to(torch.float64).abs()
    return m


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}")
@pytest.mark.parametrize("target", TARGETS, ids=["t1", "c1t1", "c1t1c2t2", "t1_t2ignored"])
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_regression(dtype, kind, target, shape):
    B, D, layout = shape
    pred, t1, t2, coef, k = reg_inputs(B, D, dtype, target, seed=B * 31 + D, layout=layout)
    c = 0.25 if kind == 1 else 0.7  # kinds 0 and 2 must ignore c
    what = f"regression {dtype} kind={kind} target={target} {shape} {layout}"
    cd = cd_of(dtype)
    args64 = (f64(pred), f64(t1), f64(t2), f64(coef))

    sums = reg_forward(pred, t1, t2, coef, kind, c)
    assert sums.dtype == cd and sums.shape == (B,)
    d = reg_ref._diff(*args64)
    dm = reg_diff_magnitude(pred, t1, t2, coef)
    if kind == 1:  # sqrt(d² + c²) - c cancels: its rounding is relative to sqrt(.) + c
        s = torch.sqrt(d * d + c * c)
        terms, operands = (s - c).sum(1), (s + c + dm).sum(1)
    else:
        terms, operands = (d * d).sum(1), (2 * d.abs() * dm).sum(1)
    check_close(f"{what} sums", sums, reg_ref.sums(*args64, kind, c), sum_budget(terms, operands, cd))

    g = reg_backward(pred, t1, t2, coef, kind, c, k)
    assert g.dtype == dtype and g.shape == (B, D)
    oracle = reg_ref.grad(*args64, kind, c, f64(k))
    kk = f64(k).abs().reshape(B, 1)
    gmag = kk * (dm + d.abs()) / torch.sqrt(d * d + c * c) if kind == 1 else kk * dm
    check_close(f"{what} gpred", g, oracle, grad_budget(oracle, gmag, dtype))


# ---- invariants and errors ---------------------------------------------------------------------------

def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else
                               torch.int32 if t.element_size() == 4 else torch.int64)


@pytest.mark.parametrize("shape", [(5, 20001), (17, 5003)], ids=["5_samples", "17_samples"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_count_bit_identical(dtype, shape):
    """1 and 2 threads give the same bits. Forward schemes (cpu_sched.h): B >= 4 x threads runs whole
    samples per task, else splits all blocks evenly; so with 5 samples 1 thread runs whole samples and
    2 threads split blocks, and with 17 both run tasks of 3 samples (D = 5003) on 1 or 2 threads."""
    B, D = shape
    sid = sid_inputs(B, D, dtype, (True, True, True), seed=3)
    reg = reg_inputs(B, D, dtype, (True, True), seed=4)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert _C.omp_max_threads() == n
            res = [sid_forward(*sid[:7]), *sid_backward(*sid)]
            for kind in (0, 1):
                res += [reg_forward(*reg[:4], kind, 0.1), reg_backward(*reg[:4], kind, 0.1, reg[4])]
            results.append(res)
    finally:
        torch.set_num_threads(before)
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(_bits(a), _bits(b)), f"output {i} differs between 1 and 2 threads"


def test_unknown_dtype_or_kind_raises():
    x = torch.zeros(2, 4)
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dtype code"):
        _C.score_identity_forward(7, 2, 4, x.data_ptr(), 4, x.data_ptr(), 4, 0, 0, 0, 0.0,
                                  x.data_ptr(), 4, 0, 0, 0, 0.0, s.data_ptr(), 0, 0, 0)
    with pytest.raises(ValueError, match="kind"):
        _C.regression_forward(0, 2, 4, x.data_ptr(), 4, x.data_ptr(), 4, 0, 0, 0, 5, 0.0, s.data_ptr(), 0, 0, 0)
    assert _C.score_identity_workspace_bytes(0, 64, 65536) == 0
    assert _C.regression_workspace_bytes(2, 64, 65536) == 0
