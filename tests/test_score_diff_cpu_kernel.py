"""K1 score_diff_forward of the CPU module (csrc/cpu/score_diff.cpp), called through its plain-integer
ABI (csrc/README.md), against the float64 reference (kernels/score_diff/reference.py::score_diff_forward).

Every configuration (CFG on a / b / both / none with scalar or per-sample scales, xt + coef, scale,
norm 0/1, clip, eps), awkward row lengths, batch-strided rows, non-finite predictions, and the
invariance of the bits of g and the loss to the thread count (both schedules of the normalised
path and the single pass). Budgets: g of float32/float64 and the loss by tests/oracle.py (twice the
reference's own error in the dtype plus a rounding floor); 16-bit g within 2 ulps of the rounded
oracle, or within twice the float32 reference's worst error (the compute type's cancellation, which
every implementation in float32 shares).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flashdistill.kernels import native
from flashdistill.kernels.score_diff import reference
from oracle import as_oracle, assert_within_budget, randn

C, _why = native.cpu_module()
pytestmark = pytest.mark.skipif(C is None, reason=f"flashdistill._C not built: {_why}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CFGS = ["none", "a", "b", "both"]


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class Case:
    """Inputs of one call: [B, D] rows (every other input batch-strided: bstride = D + pad), per-sample
    arrays of the compute type, and the scalar arguments."""

    def __init__(self, B, D, dtype, *, cfg="none", per_sample_w=False, xt=False, scale=False, norm=True,
                 clip=0.0, eps=0.0, seed=0, pad=5):
        gen = torch.Generator().manual_seed(seed)
        cd = compute_dtype(dtype)
        self.B, self.D, self.dtype, self.cd = B, D, dtype, cd
        self.norm, self.clip, self.eps = norm, clip, eps
        self.loss_factor = 1.0 / (B * D)
        names = ["x", "a", "a_u", "b", "b_u", "xt"]
        shifts = [0.0, -0.2, 0.1, 0.3, -0.1, 0.05]
        self.t = {}
        for k, (name, shift) in enumerate(zip(names, shifts)):
            p = pad if k % 2 else 0
            self.t[name] = randn((B, D + p), dtype, generator=gen, shift=shift)[:, :D]
        if cfg not in ("a", "both"):
            self.t["a_u"] = None
        if cfg not in ("b", "both"):
            self.t["b_u"] = None
        if not xt:
            self.t["xt"] = None

        def per_sample(lo, hi):
            return (torch.rand(B, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(cd)

        self.wa = per_sample(1.0, 7.0) if per_sample_w else 7.5
        self.wb = per_sample(1.0, 4.0) if per_sample_w else 1.75
        # x0 = A xt + C p, e.g. an eps-prediction: A = 1 / alpha, C = -sigma / alpha
        self.coef = torch.stack([per_sample(1.0, 3.0), per_sample(-2.0, -0.1)], dim=1).contiguous() if xt else None
        self.scale = per_sample(0.1, 2.0) if scale else None
        self.what = (f"B={B} D={D} {dtype} cfg={cfg} per_sample_w={per_sample_w} xt={xt} scale={scale} "
                     f"norm={int(norm)} clip={clip} eps={eps} seed={seed}")

    def run(self):
        """(loss, g) of the kernel; g is NaN-filled first so that an unwritten element shows."""
        g = torch.full((self.B, self.D), float("nan"), dtype=self.dtype)
        loss = torch.full((), float("nan"), dtype=self.cd)

        def rows(name):
            t = self.t[name]
            if t is None or (name == "x" and not self.norm):
                return 0, 0
            assert t.stride(1) == 1
            return t.data_ptr(), t.stride(0)

        def ptr(t):
            return t.data_ptr() if isinstance(t, torch.Tensor) else 0

        def scalar(w):
            return 1.0 if isinstance(w, torch.Tensor) else w

        code = CODES[self.dtype]
        assert C.score_diff_workspace_bytes(code, self.B, self.D) == 0
        (x, x_bs), (a, a_bs), (a_u, a_u_bs) = rows("x"), rows("a"), rows("a_u")
        (b, b_bs), (b_u, b_u_bs), (xt, xt_bs) = rows("b"), rows("b_u"), rows("xt")
        C.score_diff_forward(
            dtype=code, B=self.B, D=self.D, x=x, x_bs=x_bs,
            a=a, a_bs=a_bs, a_u=a_u, a_u_bs=a_u_bs, wa_ptr=ptr(self.wa), wa=scalar(self.wa),
            b=b, b_bs=b_bs, b_u=b_u, b_u_bs=b_u_bs, wb_ptr=ptr(self.wb), wb=scalar(self.wb),
            xt=xt, xt_bs=xt_bs, coef=ptr(self.coef), scale=ptr(self.scale), norm=int(self.norm),
            eps=self.eps, clip=self.clip, loss_factor=self.loss_factor, g=g.data_ptr(), loss=loss.data_ptr(),
            workspace=0, workspace_bytes=0, stream=0)
        return loss, g

    def reference(self, up=None):
        """(loss, g) of the reference, on the inputs converted by ``up`` (None: as they are)."""
        conv = up if up is not None else (lambda t: t)
        t = {k: conv(v) if v is not None else None for k, v in self.t.items()}

        def small(v):
            return conv(v) if isinstance(v, torch.Tensor) else v

        return reference.score_diff_forward(t["x"], t["a"], t["a_u"], small(self.wa), t["b"], t["b_u"],
                                            small(self.wb), t["xt"], small(self.coef), small(self.scale),
                                            self.norm, self.eps, self.clip, self.loss_factor)


def ulps16(u, v):
    """Distance in units in the last place between two 16-bit tensors of one dtype (+0 == -0)."""
    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(u) - ordered(v)).abs()


def check(case: Case):
    loss, g = case.run()
    loss64, g64 = case.reference(as_oracle)
    loss_ref, g_ref = case.reference()
    assert g.dtype == case.dtype and loss.dtype == case.cd
    assert_within_budget(f"loss [{case.what}]", loss, loss64, loss_ref, case.cd, n_reduce=case.B * case.D)
    if case.dtype in (torch.float32, torch.float64):
        assert_within_budget(f"g [{case.what}]", g, g64, g_ref, case.dtype, n_reduce=case.D)
        return
    assert not torch.isnan(g).any(), f"g [{case.what}]: NaN (an unwritten element?)"
    _, g32 = case.reference(lambda t: t.to(torch.float32))  # the reference's unrounded float32 g
    slack = 2.0 * (g32.double() - g64).abs().max().item()
    ulp = ulps16(g, g64.to(case.dtype))
    bad = (ulp > 2) & ((g.double() - g64).abs() > slack)
    if bool(bad.any()):
        idx = bad.reshape(-1).nonzero()[:5, 0]
        rows = "\n".join(f"    [{int(i)}] got {g.reshape(-1)[i].item():.6g} oracle {g64.reshape(-1)[i].item():.9g} "
                         f"ulps {int(ulp.reshape(-1)[i])}" for i in idx)
        raise AssertionError(f"g [{case.what}]: {int(bad.sum())} elements beyond 2 ulps and the float32 "
                             f"slack {slack:.3g}:\n{rows}")


# ---------------------------------------------------------------------------------------------------
# every configuration, on a small batch-strided problem

@pytest.mark.parametrize("cfg", CFGS)
@pytest.mark.parametrize("norm", [True, False], ids=["norm1", "norm0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_configurations(dtype, norm, cfg):
    for per_sample_w, xt, scale, clip in itertools.product([False, True], repeat=4):
        if cfg == "none" and per_sample_w:
            continue  # no guidance, nothing to weigh
        check(Case(3, 37, dtype, cfg=cfg, per_sample_w=per_sample_w, xt=xt, scale=scale, norm=norm,
                   clip=1.0 if clip else 0.0, eps=2.0**-10 if xt else 0.0, seed=len(cfg) + 2 * xt + scale))


# ---------------------------------------------------------------------------------------------------
# shapes: row lengths around the block (2048) and tile (256) sizes, B = 1, 3, 17

SHAPES = [(1, 1), (1, 3), (3, 1), (3, 2049), (17, 300), (3, 5000)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes(dtype, shape):
    B, D = shape
    check(Case(B, D, dtype, cfg="b", norm=True, seed=B + D))                                   # DMD
    check(Case(B, D, dtype, cfg="both", per_sample_w=True, xt=True, scale=True, norm=True, clip=0.75,
               eps=2.0**-10, seed=B * D))                                                       # everything
    check(Case(B, D, dtype, cfg="a", scale=True, norm=False, seed=D))                         # SDS


def test_eps_takes_over():
    """x == r for one sample: n_b = eps, g = s d / eps; the other samples are unaffected."""
    case = Case(3, 50, torch.float64, cfg="b", scale=True, norm=True, eps=0.5, seed=4)
    t = case.t
    t["x"][1] = t["b_u"][1] + 1.75 * (t["b"][1] - t["b_u"][1])
    check(case)
    _, g = case.run()
    d = (t["a"][1] - (t["b_u"][1] + 1.75 * (t["b"][1] - t["b_u"][1]))) * case.scale[1]
    torch.testing.assert_close(g[1], d / 0.5, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["norm1", "norm0"])
@pytest.mark.parametrize("clip", [0.0, 0.75])
def test_non_finite_predictions(dtype, norm, clip):
    """NaN and +-inf in a: g = 0 and +-max finite (of the compute type), or +-clip, as the reference in
    the same dtype gives; the loss overflows to inf without clip."""
    case = Case(2, 300, dtype, cfg="a", xt=True, scale=True, norm=norm, clip=clip, seed=7)
    a = case.t["a"]
    a[0, 3], a[0, 10], a[1, 299], a[1, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
    loss, g = case.run()
    loss_ref, g_ref = case.reference()
    torch.testing.assert_close(g, g_ref, rtol=1e-5 if dtype == torch.float32 else 2.0**-7, atol=0)
    for (i, j) in [(0, 3), (0, 10), (1, 299), (1, 0)]:
        assert g[i, j] == g_ref[i, j], (i, j, g[i, j], g_ref[i, j])
    assert torch.isfinite(g).all() or clip == 0.0
    if clip == 0.0:
        assert torch.isinf(loss) and torch.isinf(loss_ref)
    else:
        assert g.abs().max() <= 0.75
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------
# the thread count never shows in the bits

def _set_threads(n):
    torch.set_num_threads(n)  # torch and flashdistill._C share the process's OpenMP runtime here
    if C.omp_max_threads() != n:
        pytest.skip("torch.set_num_threads does not reach flashdistill._C's OpenMP runtime")


@pytest.mark.parametrize("shape", [(17, 2049), (3, 12289), (2, 200003)], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["norm1", "norm0"])
def test_thread_count_invariance(shape, norm):
    """(17, 2049): whole-sample tasks; (3, 12289): blocks split across threads, one chunk;
    (2, 200003): one sample per chunk. Bits of g and the loss equal for 1, 2, 3 and 4 threads."""
    B, D = shape
    cases = [Case(B, D, torch.float32, cfg="b", norm=norm, seed=1),
             Case(B, D, torch.bfloat16, cfg="both", per_sample_w=True, xt=True, scale=True, norm=norm, clip=1.0, seed=2)]
    before = torch.get_num_threads()
    try:
        for case in cases:
            results = []
            for n in (1, 2, 3, 4):
                _set_threads(n)
                results.append(case.run())
            for n, (loss, g) in zip((2, 3, 4), results[1:]):
                assert torch.equal(g, results[0][1]), f"g differs with {n} threads vs 1 [{case.what}]"
                assert torch.equal(loss, results[0][0]), f"loss differs with {n} threads vs 1 [{case.what}]"
    finally:
        torch.set_num_threads(before)
    check(cases[0])


def test_bad_dtype_code():
    with pytest.raises(ValueError, match="unsupported dtype code 7"):
        C.score_diff_workspace_bytes(7, 1, 1)
