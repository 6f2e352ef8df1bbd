"""The Triton kernels of the three score-loss skeletons (K1, K2, K3/K5), called directly on [B, D] rows.

Each output is judged against the skeleton's float64 reference (the oracle) within the budget of
``oracle.assert_within_budget`` (twice the reference's own error in the input dtype, plus a rounding
floor). Without a GPU the kernels run in the Triton interpreter (tests/conftest.py): shapes stay small.
The "tiny" launch shrinks the tile, the programs per row and the rows per launch so that the
multi-tile, multi-chunk and B > rows-per-launch paths run at these sizes too.
"""

from __future__ import annotations

import pytest
import torch

from flashdistill.kernels import triton_utils
from flashdistill.kernels.regression import reference as k3_ref
from flashdistill.kernels.regression import triton_kernel as k3
from flashdistill.kernels.score_diff import reference as k1_ref
from flashdistill.kernels.score_diff import triton_kernel as k1
from flashdistill.kernels.score_identity import reference as k2_ref
from flashdistill.kernels.score_identity import triton_kernel as k2
from oracle import as_oracle, assert_within_budget, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
# (launch, (B, D)); "tiny" launches 4-element tiles, 6 programs over all rows and 2 rows per launch, so
# that D = 27 gives 2 chunks per row of 4 and 3 tiles (the last tile 3 elements), and B = 3 two launches
LAUNCH_SHAPES = [("default", (3, 300)), ("default", (1, 7)), ("tiny", (3, 27))]
FULL_LAUNCH_SHAPES = [("default", s) for s in [(1, 1), (3, 1), (3, 7), (1, 300), (2, 3000)]] + [
    ("tiny", (5, 33)), ("tiny", (1, 57)), ("tiny", (3, 57))]


def cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def configure(launch, monkeypatch):
    if launch == "tiny":  # the launch heuristic of all three is triton_utils' (read at call time)
        monkeypatch.setattr(triton_utils, "MAX_BLOCK", 4)
        monkeypatch.setattr(triton_utils, "MIN_BLOCK", 4)
        monkeypatch.setattr(triton_utils, "TARGET_PROGRAMS", 6)
        monkeypatch.setattr(triton_utils, "MAX_GRID_Y", 2)


def ids(v):
    return f"{v[0]}-{v[1][0]}x{v[1][1]}" if isinstance(v, tuple) else None


class Inputs:
    """Random [B, D] rows of one dtype (shifted normals), in assorted row layouts, and per-sample values."""

    def __init__(self, B, D, dtype, seed):
        self.B, self.D, self.dtype = B, D, dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.n = 0

    def rows(self, shift=0.0, scale=1.0):
        self.n += 1
        B, D, g = self.B, self.D, self.gen
        layout = self.n % 3
        if layout == 0:
            return randn((B, D), self.dtype, DEVICE, generator=g, scale=scale, shift=shift)
        if layout == 1:  # every other row of a batch twice as large: stride(0) = 2 D
            return randn((2 * B, D), self.dtype, DEVICE, generator=g, scale=scale, shift=shift)[::2]
        return randn((B, 2 * D), self.dtype, DEVICE, generator=g, scale=scale, shift=shift)[:, :D]  # channel slice

    def per_sample(self, lo, hi, shape=None):
        shape = (self.B,) if shape is None else shape
        v = torch.rand(shape, generator=self.gen, dtype=torch.float64) * (hi - lo) + lo
        return v.to(cdt(self.dtype)).to(DEVICE)


def o64(v):
    return as_oracle(v) if isinstance(v, torch.Tensor) else v


# ----------------------------------------------------------------------------------------------------
# K1: score_diff forward
# ----------------------------------------------------------------------------------------------------

# name -> (a_u, b_u guidance: None | "scalar" | "tensor", xt, scale, norm, eps, clip, loss_factor)
K1_CASES = {
    "dmd":         dict(bu="scalar", norm=True),
    "dmd_ps_clip": dict(bu="tensor", norm=True, clip=0.75),
    "dmd_eps":     dict(bu="tensor", norm=True, eps=4.0),
    "sds":         dict(bu="tensor", scale=True, loss_factor=0.125),
    "vsd_clip":    dict(au="scalar", bu="scalar", clip=1.0, loss_factor=0.5),
    "xt_norm":     dict(au="tensor", xt=True, scale=True, norm=True),
    "xt":          dict(xt=True, clip=1.5),
    "plain":       dict(),
}


def k1_inputs(B, D, dtype, seed, au=None, bu=None, xt=False, scale=False, norm=False, eps=0.0, clip=0.0,
              loss_factor=None):
    z = Inputs(B, D, dtype, seed)
    x, a, b = z.rows(), z.rows(0.3), z.rows(-0.2)
    a_u = z.rows(0.1) if au else None
    b_u = z.rows(-0.1) if bu else None
    wa_t = z.per_sample(1.0, 7.0) if au == "tensor" else None
    wb_t = z.per_sample(1.0, 7.0) if bu == "tensor" else None
    xt2 = z.rows(0.2) if xt else None
    coef = None
    if xt:
        coef = torch.stack([z.per_sample(0.5, 1.5), z.per_sample(-2.0, -0.5)], dim=1).contiguous()
    s = z.per_sample(0.5, 2.0) if scale else None
    lf = 1.0 / (B * D) if loss_factor is None else loss_factor
    return dict(x2=x if norm else None, a2=a, a_u2=a_u, wa_t=wa_t, wa=2.5, b2=b, b_u2=b_u, wb_t=wb_t, wb=1.75,
                xt2=xt2, coef=coef, scale=s, norm=norm, eps=eps, clip=clip, loss_factor=lf)


def k1_reference(kw, to=lambda t: t):
    wa = kw["wa_t"] if kw["wa_t"] is not None else kw["wa"]
    wb = kw["wb_t"] if kw["wb_t"] is not None else kw["wb"]
    x = kw["x2"] if kw["x2"] is not None else kw["a2"]
    return k1_ref.score_diff_forward(to(x), to(kw["a2"]), to(kw["a_u2"]), o64(wa) if to is as_oracle else wa,
                                     to(kw["b2"]), to(kw["b_u2"]), o64(wb) if to is as_oracle else wb,
                                     to(kw["xt2"]), to(kw["coef"]), to(kw["scale"]), kw["norm"], kw["eps"],
                                     kw["clip"], kw["loss_factor"])


def check_k1(B, D, dtype, case, seed):
    kw = k1_inputs(B, D, dtype, seed, **K1_CASES[case])
    loss, g = k1.forward(**kw)
    loss64, g64 = k1_reference(kw, as_oracle)
    loss_ref, g_ref = k1_reference(kw)
    assert loss.shape == () and loss.dtype == cdt(dtype)
    assert g.shape == (B, D) and g.dtype == dtype and g.is_contiguous()
    what = f"K1 {case} ({B}, {D}) {dtype} seed={seed}"
    assert_within_budget(f"loss [{what}]", loss, loss64, loss_ref, cdt(dtype), n_reduce=B * D)
    assert_within_budget(f"g [{what}]", g, g64, g_ref, dtype, n_reduce=D)


@pytest.mark.parametrize("case", list(K1_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch_shape", LAUNCH_SHAPES, ids=ids)
def test_k1(launch_shape, dtype, case, monkeypatch):
    configure(launch_shape[0], monkeypatch)
    check_k1(*launch_shape[1], dtype, case, seed=1)


@pytest.mark.full
@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("case", list(K1_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch_shape", FULL_LAUNCH_SHAPES, ids=ids)
def test_k1_full(launch_shape, dtype, case, seed, monkeypatch):
    configure(launch_shape[0], monkeypatch)
    check_k1(*launch_shape[1], dtype, case, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_k1_special_values(dtype):
    """NaN -> 0, +-inf -> +-FLT_MAX (inf once rounded to 16 bits), as the reference in the same dtype."""
    kw = k1_inputs(2, 7, dtype, 5, bu="scalar")
    kw["a2"] = kw["a2"].clone()
    kw["a2"][0, 1] = float("nan")
    kw["a2"][1, 2] = float("inf")
    kw["a2"][1, 3] = -float("inf")
    loss, g = k1.forward(**kw)
    loss_ref, g_ref = k1_reference(kw)
    assert torch.equal(g[0, 1], g_ref[0, 1]) and g[0, 1].item() == 0.0
    assert torch.equal(g[1, 2:4], g_ref[1, 2:4])
    assert torch.equal(loss, loss_ref)  # inf: FLT_MAX squared


# ----------------------------------------------------------------------------------------------------
# K2: score_identity forward and backward
# ----------------------------------------------------------------------------------------------------

# guidance of (r, f): None | "scalar" | "tensor"
K2_CFGS = {"none": (None, None), "r": ("scalar", None), "r_ps_f": ("tensor", "scalar"), "both_ps": ("tensor", "tensor")}
NEED_ALL = (True,) * 5


def k2_inputs(B, D, dtype, seed, cfg, dropped=()):
    gr, gf = K2_CFGS[cfg]
    z = Inputs(B, D, dtype, seed)
    # shifts keep sum y u away from cancellation (y = r̄ - f̄ ~ 2, u = f̄ - x ~ -1)
    x, r, f = z.rows(0.0), z.rows(1.0), z.rows(-1.0)
    r_u = z.rows(0.7) if gr else None
    f_u = z.rows(-0.7) if gf else None
    wr_t = z.per_sample(1.0, 4.0) if gr == "tensor" else None
    wf_t = z.per_sample(1.0, 4.0) if gf == "tensor" else None
    coef = torch.stack([z.per_sample(0.5, 2.0), z.per_sample(-2.0, -0.5)], dim=1)
    for b in dropped:
        coef[b] = 0.0
    return dict(x2=x, r2=r, r_u2=r_u, wr_t=wr_t, wr=2.25, f2=f, f_u2=f_u, wf_t=wf_t, wf=1.5), coef.contiguous()


def k2_args(kw, to=lambda t: t):
    wr = kw["wr_t"] if kw["wr_t"] is not None else kw["wr"]
    wf = kw["wf_t"] if kw["wf_t"] is not None else kw["wf"]
    return (to(kw["x2"]), to(kw["r2"]), to(kw["r_u2"]), to(wr) if isinstance(wr, torch.Tensor) else wr,
            to(kw["f2"]), to(kw["f_u2"]), to(wf) if isinstance(wf, torch.Tensor) else wf)


def check_k2_forward(B, D, dtype, cfg, seed):
    kw, _ = k2_inputs(B, D, dtype, seed, cfg)
    sums = k2.forward(**kw)
    assert sums.shape == (B, 3) and sums.dtype == cdt(dtype)
    sums64 = k2_ref.sums(*k2_args(kw, as_oracle))
    sums_ref = k2_ref.sums(*k2_args(kw))
    assert_within_budget(f"K2 sums [{cfg} ({B}, {D}) {dtype}]", sums, sums64, sums_ref, cdt(dtype), n_reduce=D)


def check_k2_backward(B, D, dtype, cfg, seed, need=NEED_ALL, dropped=()):
    kw, coef = k2_inputs(B, D, dtype, seed, cfg, dropped)
    outs = k2.backward(**kw, coef=coef, need=need)
    outs64 = k2_ref.grads(*k2_args(kw, as_oracle), as_oracle(coef), need)
    outs_ref = k2_ref.grads(*k2_args(kw), coef, need)
    names = ("gx", "gr", "gr_u", "gf", "gf_u")
    assert isinstance(outs, tuple) and len(outs) == 5
    for name, out, o64_, ref in zip(names, outs, outs64, outs_ref):
        assert (out is None) == (o64_ is None), f"{name}: got {out is not None}, expected {o64_ is not None}"
        if out is None:
            continue
        assert out.shape == (B, D) and out.dtype == dtype and out.is_contiguous()
        assert_within_budget(f"K2 {name} [{cfg} need={need} ({B}, {D}) {dtype}]", out, o64_, ref, dtype)
        for b in dropped:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"{name}: dropped sample {b} not zero"


@pytest.mark.parametrize("cfg", list(K2_CFGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch_shape", LAUNCH_SHAPES, ids=ids)
def test_k2_forward(launch_shape, dtype, cfg, monkeypatch):
    configure(launch_shape[0], monkeypatch)
    check_k2_forward(*launch_shape[1], dtype, cfg, seed=1)


@pytest.mark.parametrize("cfg", list(K2_CFGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch_shape", LAUNCH_SHAPES, ids=ids)
def test_k2_backward(launch_shape, dtype, cfg, monkeypatch):
    configure(launch_shape[0], monkeypatch)
    B, D = launch_shape[1]
    check_k2_backward(B, D, dtype, cfg, seed=1, dropped=(1,) if B > 1 else ())


@pytest.mark.parametrize("need", [tuple(bool(m >> i & 1) for i in range(5)) for m in range(32)],
                         ids=lambda n: "".join("1" if v else "0" for v in n))
@pytest.mark.parametrize("cfg", ["none", "both_ps"])
def test_k2_backward_subsets(cfg, need):
    """Every subset of the five gradients; gr_u / gf_u are None without their unconditional twin."""
    check_k2_backward(3, 7, torch.float32, cfg, seed=4, need=need, dropped=(2,))


def test_k2_dropped_ignores_nonfinite():
    """A dropped sample (P = Q = 0) writes exact zeros even when its inputs hold NaN and inf."""
    kw, coef = k2_inputs(3, 7, torch.bfloat16, 6, "both_ps", dropped=(0,))
    for name in ("x2", "r2", "f_u2"):
        kw[name] = kw[name].clone()
    kw["x2"][0, 0] = float("nan")
    kw["r2"][0, 1] = float("inf")
    kw["f_u2"][0, 2] = -float("inf")
    for out in k2.backward(**kw, coef=coef, need=NEED_ALL):
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isfinite(out[1:]).all()


def test_k2_nan_passes_through():
    """A NaN input of a kept sample gives NaN where the reference has it (bf16 stores keep NaN)."""
    kw, coef = k2_inputs(2, 7, torch.bfloat16, 7, "none")
    kw["x2"] = kw["x2"].clone()
    kw["x2"][1, 3] = float("nan")
    outs = k2.backward(**kw, coef=coef, need=NEED_ALL)
    refs = k2_ref.grads(*k2_args(kw), coef, NEED_ALL)
    for out, ref in zip(outs, refs):
        if out is not None:
            assert torch.equal(torch.isnan(out), torch.isnan(ref))
    sums = k2.forward(**kw)
    assert torch.equal(torch.isnan(sums), torch.isnan(k2_ref.sums(*k2_args(kw))))


@pytest.mark.full
@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("cfg", list(K2_CFGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch_shape", FULL_LAUNCH_SHAPES, ids=ids)
def test_k2_full(launch_shape, dtype, cfg, seed, monkeypatch):
    configure(launch_shape[0], monkeypatch)
    B, D = launch_shape[1]
    check_k2_forward(B, D, dtype, cfg, seed)
    check_k2_backward(B, D, dtype, cfg, seed, dropped=(0,) if B > 1 else ())


# ----------------------------------------------------------------------------------------------------
# K3/K5: regression forward and backward
# ----------------------------------------------------------------------------------------------------

K3_TARGETS = ["t1", "coef_t1", "coef_t1_t2"]


def k3_inputs(B, D, dtype, seed, target):
    z = Inputs(B, D, dtype, seed)
    pred, t1, t2 = z.rows(0.5), z.rows(-0.3), z.rows(0.2)
    coef = None
    if target != "t1":
        coef = torch.stack([z.per_sample(0.5, 1.5), z.per_sample(-1.5, -0.5)], dim=1).contiguous()
    if target != "coef_t1_t2":
        t2 = None if target == "coef_t1" else t2  # "t1": t2 given but ignored without coef
    k = z.per_sample(-2.0, 2.0)
    return pred, t1, t2, coef, k


def check_k3(B, D, dtype, kind, target, seed, c=0.3):
    pred, t1, t2, coef, k = k3_inputs(B, D, dtype, seed, target)
    what = f"[kind={kind} {target} ({B}, {D}) {dtype} seed={seed}]"
    sums = k3.forward(pred, t1, t2, coef, kind, c)
    assert sums.shape == (B,) and sums.dtype == cdt(dtype)
    sums64 = k3_ref.sums(as_oracle(pred), as_oracle(t1), as_oracle(t2), as_oracle(coef), kind, c)
    sums_ref = k3_ref.sums(pred, t1, t2, coef, kind, c)
    assert_within_budget(f"K3 sums {what}", sums, sums64, sums_ref, cdt(dtype), n_reduce=D)
    g = k3.backward(pred, t1, t2, coef, kind, c, k)
    assert g.shape == (B, D) and g.dtype == dtype and g.is_contiguous()
    g64 = k3_ref.grad(as_oracle(pred), as_oracle(t1), as_oracle(t2), as_oracle(coef), kind, c, as_oracle(k))
    g_ref = k3_ref.grad(pred, t1, t2, coef, kind, c, k)
    assert_within_budget(f"K3 gpred {what}", g, g64, g_ref, dtype)


@pytest.mark.parametrize("target", K3_TARGETS)
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch_shape", LAUNCH_SHAPES, ids=ids)
def test_k3(launch_shape, dtype, kind, target, monkeypatch):
    configure(launch_shape[0], monkeypatch)
    check_k3(*launch_shape[1], dtype, kind, target, seed=1)


def test_k3_nan_passes_through():
    pred, t1, t2, coef, k = k3_inputs(2, 7, torch.bfloat16, 8, "coef_t1_t2")
    pred = pred.clone()
    pred[1, 4] = float("nan")
    for kind in (0, 1):
        g = k3.backward(pred, t1, t2, coef, kind, 0.3, k)
        assert torch.equal(torch.isnan(g), torch.isnan(k3_ref.grad(pred, t1, t2, coef, kind, 0.3, k)))
        s = k3.forward(pred, t1, t2, coef, kind, 0.3)
        assert torch.equal(torch.isnan(s), torch.isnan(k3_ref.sums(pred, t1, t2, coef, kind, 0.3)))


@pytest.mark.full
@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("c", [0.03, 1.0])
@pytest.mark.parametrize("target", K3_TARGETS)
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("launch_shape", FULL_LAUNCH_SHAPES, ids=ids)
def test_k3_full(launch_shape, dtype, kind, target, c, seed, monkeypatch):
    configure(launch_shape[0], monkeypatch)
    check_k3(*launch_shape[1], dtype, kind, target, seed, c)
