"""The CUDA skeleton kernels (csrc/cuda/score_diff.cu, score_identity.cu, regression.cu), called
directly through flashdistill._C_cuda with raw pointers, against the float64 references
(kernels/score_diff/reference.py::score_diff_forward, kernels/score_identity/reference.py::sums /
grads, kernels/regression/reference.py::sums / grad). Needs a CUDA device (marker ``gpu``).

Budget (tests/oracle.py's rule, with a condition-aware magnitude): for every element,
    |kernel - oracle| <= 2 * max|reference_in_dtype - oracle| + u * (4 + 4 sqrt(n)) * mag
with u the unit roundoff of the output's type, n the longest sum the element depends on and mag
= max(|oracle|, a float64 bound on the magnitude of the terms the element is computed from). The
magnitude matters where a result cancels (a guided difference ā - b̄, the sum of y u): there the
error of any floating-point evaluation scales with the terms, not with the result, and the CUDA
kernels round differently from the reference (nvcc contracts a * b + c into one fma).
"""

from __future__ import annotations

import math

import pytest
import torch

from flashdistill.kernels import native
from flashdistill.kernels.regression import reference as rg_ref
from flashdistill.kernels.score_diff import reference as sd_ref
from flashdistill.kernels.score_identity import reference as si_ref

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# (B, D): single elements, odd sizes, several chunks per row, one chunk per row (B > 512: the
# partial kernels write the sums directly). LARGE: hundreds of chunks per row (more than the 256
# threads that sum a row's partials, more than the 32 lanes of a finalize warp), for fewer cases.
SHAPES = [(1, 1), (3, 97), (2, 4099), (5, 1023), (600, 33)]
LARGE = [(1, 1_000_003), (3, 333_337)]
LAYOUTS = ["contiguous", "padded", "offset", "batch_strided"]


@pytest.fixture(scope="module")
def mod():
    m, why = native.cuda_module()
    if m is None:
        pytest.fail(f"flashdistill._C_cuda is not importable on a machine with a GPU: {why}")
    return m


def cd_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def code(dtype):
    return native.DTYPE_CODES[dtype]


def ptr(t):
    return 0 if t is None else t.data_ptr()


def bs(t):
    return 0 if t is None else t.stride(0)


def stream():
    return torch.cuda.current_stream().cuda_stream


def rows(B, D, dtype, layout, gen, *, shift=0.0, scale=1.0):
    """[B, D] on the GPU with unit-stride rows, in one of the layouts the kernels address."""
    def rnd(shape):
        return (torch.randn(shape, dtype=torch.float64, generator=gen) * scale + shift).to(dtype).cuda()
    if layout == "contiguous":
        return rnd((B, D))
    if layout == "padded":  # row stride rounded up to 16 bytes plus 16: batch-strided, vector path
        per16 = 16 // torch.tensor([], dtype=dtype).element_size()
        return rnd((B, (D + per16 - 1) // per16 * per16 + per16))[:, :D]
    if layout == "offset":  # rows start one element in: the scalar (unaligned) path
        return rnd((B, D + 1))[:, 1:]
    if layout == "batch_strided":
        return rnd((2 * B, D))[::2]
    raise ValueError(layout)


def per_sample(B, dtype, gen, lo=0.5, hi=2.5):
    return (torch.rand(B, dtype=torch.float64, generator=gen) * (hi - lo) + lo).to(cd_of(dtype)).cuda()


def weight(kind, B, dtype, gen, scalar):
    """None (no guidance), a Python float, or a [B] tensor of the compute type."""
    if kind is None:
        return None
    return scalar if kind == "scalar" else per_sample(B, dtype, gen, 1.0, 7.0)


def w_args(w):
    return (ptr(w), 0.0) if isinstance(w, torch.Tensor) else (0, float(w or 0.0))


def cpu(t, dtype=None):
    if t is None or not isinstance(t, torch.Tensor):
        return t
    t = t.detach().cpu()
    return t if dtype is None else t.to(dtype)


def f64(t):
    return cpu(t, torch.float64)


def shaped(v, like):
    return v.reshape((-1,) + (1,) * (like.dim() - 1)) if isinstance(v, torch.Tensor) else v


def absw(w, like):
    """|w| broadcast over a sample's elements (w a float or a [B] tensor)."""
    return shaped(w, like).abs() if isinstance(w, torch.Tensor) else abs(w)


def cfg_mag(p, p_u, w):
    """float64 bound on the magnitude of the terms of cfg(p): |p|, or |p_u| + |w| (|p| + |p_u|)."""
    if p_u is None:
        return p.abs()
    return p_u.abs() + absw(w, p) * (p.abs() + p_u.abs())


def check(what, got, oracle, ref, u, *, n=1, mag=None):
    got, oracle, ref = (cpu(t).to(torch.float64).reshape(-1) for t in (got, oracle, ref))
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    nan_g, nan_o = torch.isnan(got), torch.isnan(oracle)
    assert torch.equal(nan_g, nan_o), f"{what}: NaN pattern differs ({int(nan_g.sum())} vs {int(nan_o.sum())})"
    fin = torch.isfinite(oracle)
    assert torch.equal(got[~fin & ~nan_o], oracle[~fin & ~nan_o]), f"{what}: infinities differ"
    o, r, k = oracle[fin], ref[fin], got[fin]
    m = o.abs() if mag is None else torch.maximum(o.abs(), cpu(mag).to(torch.float64).reshape(-1)[fin])
    ref_err = (r - o).abs().max().item() if o.numel() else 0.0
    units = 4.0 + 4.0 * math.sqrt(n)
    budget = 2.0 * ref_err + units * u * m
    err = (k - o).abs()
    bad = err > budget
    if bool(bad.any()):
        worst = torch.argsort(err - budget, descending=True)[:5]
        lines = "\n".join(f"    [{int(i)}] got {k[i].item():.9g}  oracle {o[i].item():.9g}  err {err[i].item():.3g}"
                          f"  budget {budget[i].item():.3g}" for i in worst)
        raise AssertionError(f"{what}: {int(bad.sum())} of {o.numel()} over budget (2 x ref error {ref_err:.3g} + "
                             f"{units:.3g} x {u:.3g} x magnitude):\n{lines}")


# ---------------------------------------------------------------------------------------------------
# K1: score_diff_forward

K1_CASES = {
    # name: (norm, cfg_a, cfg_b, xt, scale, clip)
    "dmd": (1, None, "per_sample", False, False, 0.0),
    "dmd_scalar_cfg": (1, None, "scalar", False, False, 0.0),
    "sds_vsd": (0, "scalar", "per_sample", False, True, 0.0),
    "plain": (0, None, None, False, False, 0.0),
    "xt_norm_scale_clip": (1, "per_sample", None, True, True, 0.5),
    "xt_clip": (0, None, "scalar", True, False, 2.0),
}


def k1_inputs(B, D, dtype, case, layout, seed):
    norm, cfg_a, cfg_b, use_xt, use_scale, clip = K1_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = rows(B, D, dtype, layout, gen)
    a = rows(B, D, dtype, layout, gen, shift=0.3)
    b = rows(B, D, dtype, layout, gen, shift=-0.2)
    a_u = rows(B, D, dtype, layout, gen, shift=0.1) if cfg_a else None
    b_u = rows(B, D, dtype, layout, gen, shift=0.1) if cfg_b else None
    wa, wb = weight(cfg_a, B, dtype, gen, 2.5), weight(cfg_b, B, dtype, gen, 4.5)
    xt = rows(B, D, dtype, layout, gen) if use_xt else None
    coef = torch.stack([per_sample(B, dtype, gen, -1.0, 1.0), per_sample(B, dtype, gen, 0.2, 3.0)], 1) if use_xt else None
    scale = per_sample(B, dtype, gen) if use_scale else None
    loss_factor = 1.0 / (B * D) if norm else 0.37
    return dict(x=x, a=a, a_u=a_u, wa=wa, b=b, b_u=b_u, wb=wb, xt=xt, coef=coef, scale=scale,
                norm=norm, eps=1e-5, clip=clip, loss_factor=loss_factor)


def k1_run(mod, dtype, inp, *, s=None, pass_x=True):
    a = inp["a"]
    B, D = a.shape
    g = torch.full((B, D), float("nan"), dtype=dtype, device="cuda")
    loss = torch.full((), float("nan"), dtype=cd_of(dtype), device="cuda")
    nbytes = mod.score_diff_workspace_bytes(dtype=code(dtype), B=B, D=D)
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    wa_ptr, wa = w_args(inp["wa"])
    wb_ptr, wb = w_args(inp["wb"])
    x = inp["x"] if pass_x else None
    mod.score_diff_forward(
        dtype=code(dtype), B=B, D=D, x=ptr(x), x_bs=bs(x),
        a=ptr(a), a_bs=bs(a), a_u=ptr(inp["a_u"]), a_u_bs=bs(inp["a_u"]), wa_ptr=wa_ptr, wa=wa,
        b=ptr(inp["b"]), b_bs=bs(inp["b"]), b_u=ptr(inp["b_u"]), b_u_bs=bs(inp["b_u"]), wb_ptr=wb_ptr, wb=wb,
        xt=ptr(inp["xt"]), xt_bs=bs(inp["xt"]), coef=ptr(inp["coef"]), scale=ptr(inp["scale"]),
        norm=inp["norm"], eps=inp["eps"], clip=inp["clip"], loss_factor=inp["loss_factor"],
        g=g.data_ptr(), loss=loss.data_ptr(), workspace=ws.data_ptr(), workspace_bytes=nbytes,
        stream=stream() if s is None else s.cuda_stream)
    return loss, g


def k1_ref(inp, conv):
    c = {k: conv(v) for k, v in inp.items()}
    return sd_ref.score_diff_forward(c["x"], c["a"], c["a_u"], c["wa"], c["b"], c["b_u"], c["wb"], c["xt"],
                                     c["coef"], c["scale"], bool(c["norm"]), c["eps"], c["clip"], c["loss_factor"])


def k1_check(mod, dtype, inp, what):
    loss, g = k1_run(mod, dtype, inp)
    o_loss, o_g = k1_ref(inp, f64)
    r_loss, r_g = k1_ref(inp, cpu)
    B, D = inp["a"].shape
    i = {k: f64(v) for k, v in inp.items()}
    # magnitude of g's terms: |s C| (|ā| + |b̄|) / n
    m = cfg_mag(i["a"], i["a_u"], i["wa"]) + cfg_mag(i["b"], i["b_u"], i["wb"])
    if i["coef"] is not None:
        m = m * shaped(i["coef"][:, 1], m).abs()
    if i["scale"] is not None:
        m = m * shaped(i["scale"], m).abs()
    if i["norm"]:
        r = sd_ref.guided(i["b"], i["b_u"], i["wb"])
        if i["xt"] is not None:
            r = shaped(i["coef"][:, 0], r) * i["xt"] + shaped(i["coef"][:, 1], r) * r
        m = m / (i["x"] - r).abs().mean(dim=1, keepdim=True).clamp_min(i["eps"])
    n_g = D if inp["norm"] else 1
    check(f"{what}: g", g, o_g, r_g, UNIT_ROUNDOFF[dtype], n=n_g, mag=m)
    mag_loss = inp["loss_factor"] * (o_g.abs() * m).sum()
    check(f"{what}: loss", loss, o_loss, r_loss, UNIT_ROUNDOFF[cd_of(dtype)], n=B * D + n_g, mag=mag_loss)
    return loss, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(K1_CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_score_diff_forward(mod, dtype, case, shape):
    inp = k1_inputs(*shape, dtype, case, "contiguous", seed=sum(shape) + len(case))
    k1_check(mod, dtype, inp, f"K1 {case} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["dmd", "xt_norm_scale_clip"])
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_score_diff_forward_large(mod, dtype, case, shape):
    test_score_diff_forward(mod, dtype, case, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_score_diff_layouts_and_bitwise_alignment_independence(mod, dtype, layout):
    """Strided / unaligned rows give a correct result, bit-identical to contiguous rows (same sums order)."""
    B, D = 3, 2053
    for case in ("dmd", "xt_norm_scale_clip"):
        inp = k1_inputs(B, D, dtype, case, layout, seed=7)
        loss, g = k1_check(mod, dtype, inp, f"K1 {case} {layout} {dtype}")
        dense = {k: (v.contiguous() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == D else v)
                 for k, v in inp.items()}
        loss_c, g_c = k1_run(mod, dtype, dense)
        assert torch.equal(g, g_c) and torch.equal(loss, loss_c), f"{case} {layout}: result depends on the layout"


def test_score_diff_deterministic_and_side_stream(mod):
    inp = k1_inputs(4, 300_001, torch.bfloat16, "dmd", "contiguous", seed=3)
    loss1, g1 = k1_run(mod, torch.bfloat16, inp)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loss2, g2 = k1_run(mod, torch.bfloat16, inp, s=s)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(loss1, loss2) and torch.equal(g1, g2)


def test_score_diff_norm0_ignores_x_and_empty(mod):
    inp = k1_inputs(2, 999, torch.float32, "sds_vsd", "contiguous", seed=5)
    l1, g1 = k1_run(mod, torch.float32, inp)
    l2, g2 = k1_run(mod, torch.float32, inp, pass_x=False)  # norm = 0: x is never read
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    empty = k1_inputs(3, 0, torch.float32, "sds_vsd", "contiguous", seed=5)
    loss, g = k1_run(mod, torch.float32, empty)
    assert loss.item() == 0.0 and g.numel() == 0


def test_score_diff_nan_inf_and_clip(mod):
    """nan_to_num in the compute type: NaN -> 0, +-inf -> +-FLT_MAX (the float32 reference is the
    spec here: the float64 oracle would saturate at DBL_MAX), then the clip."""
    dtype = torch.float32
    inp = k1_inputs(2, 1031, dtype, "plain", "contiguous", seed=9)
    inp["a"][0, 3] = float("nan")
    inp["a"][0, 5] = float("inf")
    inp["b"][1, 7] = float("inf")
    loss, g = k1_run(mod, dtype, inp)
    r_loss, r_g = k1_ref(inp, cpu)
    assert torch.equal(cpu(g), r_g), "g = a - b has one rounding: bit-identical to the float32 reference"
    assert g[0, 3].item() == 0.0 and g[0, 5].item() == torch.finfo(dtype).max and g[1, 7].item() == -torch.finfo(dtype).max
    assert loss.item() == math.inf and r_loss.item() == math.inf
    inp["clip"] = 0.25
    loss, g = k1_check(mod, dtype, inp, "K1 non-finite clipped")
    assert g[0, 5].item() == 0.25 and g[1, 7].item() == -0.25


def test_score_diff_cuda_graph(mod):
    """Captured once, replayed on new inputs: no host sync, no allocation inside the call."""
    dtype = torch.float32
    inp = k1_inputs(4, 4096 + 17, dtype, "dmd", "contiguous", seed=11)
    k1_run(mod, dtype, inp)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, g = k1_run(mod, dtype, inp)
    new = k1_inputs(4, 4096 + 17, dtype, "dmd", "contiguous", seed=12)
    for k in ("x", "a", "b", "b_u", "wb"):
        inp[k].copy_(new[k])
    graph.replay()
    loss_e, g_e = k1_run(mod, dtype, new)
    torch.cuda.synchronize()
    assert torch.equal(loss, loss_e) and torch.equal(g, g_e)


def test_score_diff_bad_workspace(mod):
    with pytest.raises(ValueError, match="score_diff_forward.*workspace"):
        mod.score_diff_forward(dtype=0, B=2, D=5000, x=16, x_bs=5000, a=16, a_bs=5000, a_u=0, a_u_bs=0, wa_ptr=0,
                               wa=1.0, b=16, b_bs=5000, b_u=0, b_u_bs=0, wb_ptr=0, wb=1.0, xt=0, xt_bs=0, coef=0,
                               scale=0, norm=1, eps=0.0, clip=0.0, loss_factor=1.0, g=16, loss=16, workspace=16,
                               workspace_bytes=0, stream=0)


# ---------------------------------------------------------------------------------------------------
# K2: score_identity_forward / _backward

K2_CASES = {"sid": (None, None), "lsg_scalar": ("scalar", "scalar"), "lsg_per_sample": ("per_sample", None),
            "fake_cfg": (None, "per_sample"), "both_per_sample": ("per_sample", "per_sample")}


def k2_inputs(B, D, dtype, case, layout, seed):
    cfg_r, cfg_f = K2_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = rows(B, D, dtype, layout, gen)
    r = rows(B, D, dtype, layout, gen, shift=0.2)
    f = rows(B, D, dtype, layout, gen, shift=-0.1)
    r_u = rows(B, D, dtype, layout, gen) if cfg_r else None
    f_u = rows(B, D, dtype, layout, gen) if cfg_f else None
    wr, wf = weight(cfg_r, B, dtype, gen, 3.0), weight(cfg_f, B, dtype, gen, 1.5)
    P = per_sample(B, dtype, gen, -2.0, 2.0)
    Q = per_sample(B, dtype, gen, -1.0, 1.0)
    if B > 1:  # sample 1 is dropped: P = Q = 0, and its inputs hold NaN
        P[1] = 0.0
        Q[1] = 0.0
        for t in (x, r, f, r_u, f_u):
            if t is not None:
                t[1, : min(D, 5)] = float("nan")
    coef = torch.stack([P, Q], 1).contiguous()
    return dict(x=x, r=r, r_u=r_u, wr=wr, f=f, f_u=f_u, wf=wf, coef=coef)


def k2_forward(mod, dtype, inp):
    x = inp["x"]
    B, D = x.shape
    sums = torch.full((B, 3), float("nan"), dtype=cd_of(dtype), device="cuda")
    nbytes = mod.score_identity_workspace_bytes(dtype=code(dtype), B=B, D=D)
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    wr_ptr, wr = w_args(inp["wr"])
    wf_ptr, wf = w_args(inp["wf"])
    mod.score_identity_forward(
        dtype=code(dtype), B=B, D=D, x=ptr(x), x_bs=bs(x),
        r=ptr(inp["r"]), r_bs=bs(inp["r"]), r_u=ptr(inp["r_u"]), r_u_bs=bs(inp["r_u"]), wr_ptr=wr_ptr, wr=wr,
        f=ptr(inp["f"]), f_bs=bs(inp["f"]), f_u=ptr(inp["f_u"]), f_u_bs=bs(inp["f_u"]), wf_ptr=wf_ptr, wf=wf,
        sums=sums.data_ptr(), workspace=ws.data_ptr(), workspace_bytes=nbytes, stream=stream())
    return sums


def k2_backward(mod, dtype, inp, need):
    x = inp["x"]
    B, D = x.shape
    have = [True, True, inp["r_u"] is not None, True, inp["f_u"] is not None]
    outs = [torch.full((B, D), float("nan"), dtype=dtype, device="cuda") if (n and h) else None
            for n, h in zip(need, have)]
    wr_ptr, wr = w_args(inp["wr"])
    wf_ptr, wf = w_args(inp["wf"])
    mod.score_identity_backward(
        dtype=code(dtype), B=B, D=D, x=ptr(x), x_bs=bs(x),
        r=ptr(inp["r"]), r_bs=bs(inp["r"]), r_u=ptr(inp["r_u"]), r_u_bs=bs(inp["r_u"]), wr_ptr=wr_ptr, wr=wr,
        f=ptr(inp["f"]), f_bs=bs(inp["f"]), f_u=ptr(inp["f_u"]), f_u_bs=bs(inp["f_u"]), wf_ptr=wf_ptr, wf=wf,
        coef=inp["coef"].data_ptr(), gx=ptr(outs[0]), gr=ptr(outs[1]), gr_u=ptr(outs[2]), gf=ptr(outs[3]),
        gf_u=ptr(outs[4]), stream=stream())
    return outs


def k2_check(mod, dtype, inp, what, need=(True,) * 5):
    B, D = inp["x"].shape
    keep = [b for b in range(B) if not (B > 1 and b == 1)]  # the dropped sample's sums hold NaN: skip them
    sums = k2_forward(mod, dtype, inp)
    args = lambda conv: [conv(inp[k]) for k in ("x", "r", "r_u", "wr", "f", "f_u", "wf")]
    o_s, r_s = si_ref.sums(*args(f64)), si_ref.sums(*args(cpu))
    i = {k: f64(v) for k, v in inp.items()}
    mr, mf, mx = cfg_mag(i["r"], i["r_u"], i["wr"]), cfg_mag(i["f"], i["f_u"], i["wf"]), i["x"].abs()
    mag = torch.stack([(mx + mr).sum(1), ((mr + mf) ** 2).sum(1), ((mr + mf) * (mf + mx)).sum(1)], 1)
    uc = UNIT_ROUNDOFF[cd_of(dtype)]
    check(f"{what}: sums", cpu(sums)[keep], o_s[keep], r_s[keep], uc, n=D, mag=mag[keep])

    outs = k2_backward(mod, dtype, inp, need)
    o_g = si_ref.grads(*args(f64), f64(inp["coef"]), need)
    r_g = si_ref.grads(*args(cpu), cpu(inp["coef"]), need)
    P, Q = (shaped(i["coef"][:, k], mx).abs() for k in (0, 1))
    m_gx = P * (mr + mf)
    m_gr = P * (mf + mx) + Q * (mr + mf)
    m_gf = m_gx + m_gr

    def split(w, part):  # |w| or |1 - w| of a guided prediction's share, 1 without guidance
        if w is None:
            return 1.0
        return absw(1 - w, mx) if part else absw(w, mx)

    mags = [m_gx, m_gr * split(i["wr"] if inp["r_u"] is not None else None, False), m_gr * split(i["wr"], True),
            m_gf * split(i["wf"] if inp["f_u"] is not None else None, False), m_gf * split(i["wf"], True)]
    for name, got, o, r, m in zip(("gx", "gr", "gr_u", "gf", "gf_u"), outs, o_g, r_g, mags):
        assert (got is None) == (o is None), f"{what}: {name} presence"
        if got is None:
            continue
        if B > 1:  # the dropped sample: exact zeros whatever its inputs hold
            assert torch.equal(cpu(got)[1], torch.zeros(D, dtype=dtype)), f"{what}: {name} of a dropped sample"
        check(f"{what}: {name}", cpu(got)[keep], o[keep], r[keep], UNIT_ROUNDOFF[dtype], mag=m[keep])
    return sums, outs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(K2_CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_score_identity(mod, dtype, case, shape):
    inp = k2_inputs(*shape, dtype, case, "contiguous", seed=sum(shape) + 3 * len(case))
    k2_check(mod, dtype, inp, f"K2 {case} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_score_identity_large(mod, dtype, shape):
    test_score_identity(mod, dtype, "both_per_sample", shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_score_identity_layouts(mod, dtype, layout):
    B, D = 3, 2053
    inp = k2_inputs(B, D, dtype, "both_per_sample", layout, seed=13)
    sums, outs = k2_check(mod, dtype, inp, f"K2 {layout} {dtype}")
    dense = {k: (v.contiguous() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == D else v)
             for k, v in inp.items()}
    # bit for bit (the dropped sample's sums are NaN in both)
    torch.testing.assert_close(sums, k2_forward(mod, dtype, dense), rtol=0, atol=0, equal_nan=True,
                               msg=f"{layout}: sums depend on the layout")
    for a, b in zip(outs, k2_backward(mod, dtype, dense, (True,) * 5)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("need", [(True, False, False, False, False), (False, True, True, False, False),
                                  (False, False, False, True, False), (True, False, True, False, True)], ids=str)
def test_score_identity_partial_outputs(mod, need):
    inp = k2_inputs(4, 5003, torch.bfloat16, "both_per_sample", "contiguous", seed=17)
    k2_check(mod, torch.bfloat16, inp, f"K2 need={need}", need)


def test_score_identity_empty_rows(mod):
    inp = k2_inputs(3, 0, torch.float32, "sid", "contiguous", seed=1)
    assert torch.equal(k2_forward(mod, torch.float32, inp), torch.zeros(3, 3, device="cuda"))


# ---------------------------------------------------------------------------------------------------
# K3/K5: regression_forward / _backward

K3_TARGETS = ["t1", "c1t1", "c1t1_c2t2"]


def k3_inputs(B, D, dtype, target, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    pred = rows(B, D, dtype, layout, gen)
    t1 = rows(B, D, dtype, layout, gen, shift=0.1)
    t2 = rows(B, D, dtype, layout, gen, shift=-0.3) if target == "c1t1_c2t2" else None
    coef = None
    if target != "t1":
        coef = torch.stack([per_sample(B, dtype, gen, 0.3, 1.5), per_sample(B, dtype, gen, -1.0, 1.0)], 1)
    k = per_sample(B, dtype, gen, -3.0, 3.0)
    return dict(pred=pred, t1=t1, t2=t2, coef=coef, k=k)


def k3_forward(mod, dtype, inp, kind, c):
    pred = inp["pred"]
    B, D = pred.shape
    sums = torch.full((B,), float("nan"), dtype=cd_of(dtype), device="cuda")
    nbytes = mod.regression_workspace_bytes(dtype=code(dtype), B=B, D=D)
    ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    mod.regression_forward(dtype=code(dtype), B=B, D=D, pred=ptr(pred), pred_bs=bs(pred), t1=ptr(inp["t1"]),
                           t1_bs=bs(inp["t1"]), t2=ptr(inp["t2"]), t2_bs=bs(inp["t2"]), coef=ptr(inp["coef"]),
                           kind=kind, c=c, sums=sums.data_ptr(), workspace=ws.data_ptr(), workspace_bytes=nbytes,
                           stream=stream())
    return sums


def k3_backward(mod, dtype, inp, kind, c):
    pred = inp["pred"]
    B, D = pred.shape
    g = torch.full((B, D), float("nan"), dtype=dtype, device="cuda")
    mod.regression_backward(dtype=code(dtype), B=B, D=D, pred=ptr(pred), pred_bs=bs(pred), t1=ptr(inp["t1"]),
                            t1_bs=bs(inp["t1"]), t2=ptr(inp["t2"]), t2_bs=bs(inp["t2"]), coef=ptr(inp["coef"]),
                            kind=kind, c=c, k=inp["k"].data_ptr(), gpred=g.data_ptr(), stream=stream())
    return g


def k3_check(mod, dtype, inp, kind, c, what):
    B, D = inp["pred"].shape
    sums = k3_forward(mod, dtype, inp, kind, c)
    g = k3_backward(mod, dtype, inp, kind, c)
    a = lambda conv: [conv(inp[k]) for k in ("pred", "t1", "t2", "coef")]
    i = {k: f64(v) for k, v in inp.items()}
    md = i["pred"].abs()
    if i["coef"] is None:
        md = md + i["t1"].abs()
    else:
        md = md + (shaped(i["coef"][:, 0], md) * i["t1"]).abs()
        if i["t2"] is not None:
            md = md + (shaped(i["coef"][:, 1], md) * i["t2"]).abs()
    d = rg_ref._diff(*a(f64))
    root = torch.sqrt(d * d + c * c)
    # a term's error: from d (|d term / dd| <= 1 for kind 1, 2|d| for d^2) and its own roundings
    m_sum = (md + root + abs(c)).sum(1) if kind == 1 else (2 * md * md).sum(1)
    check(f"{what}: sums", sums, rg_ref.sums(*a(f64), kind, c), rg_ref.sums(*a(cpu), kind, c),
          UNIT_ROUNDOFF[cd_of(dtype)], n=D, mag=m_sum)
    k = shaped(i["k"], md).abs()
    m_g = k * md / root if kind == 1 else k * md
    check(f"{what}: gpred", g, rg_ref.grad(*a(f64), kind, c, f64(inp["k"])),
          rg_ref.grad(*a(cpu), kind, c, cpu(inp["k"])), UNIT_ROUNDOFF[dtype], mag=m_g)
    return sums, g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,c", [(0, 0.0), (1, 0.03), (2, 0.5)], ids=["l2", "huber", "pseudo_huber"])
@pytest.mark.parametrize("target", K3_TARGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_regression(mod, dtype, kind, c, target, shape):
    inp = k3_inputs(*shape, dtype, target, "contiguous", seed=sum(shape) + kind + len(target))
    k3_check(mod, dtype, inp, kind, c, f"K3 kind={kind} {target} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,c", [(0, 0.0), (1, 0.03)], ids=["l2", "huber"])
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_regression_large(mod, dtype, kind, c, shape):
    test_regression(mod, dtype, kind, c, "c1t1_c2t2", shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_regression_layouts(mod, dtype, layout):
    B, D = 3, 2053
    inp = k3_inputs(B, D, dtype, "c1t1_c2t2", layout, seed=23)
    sums, g = k3_check(mod, dtype, inp, 1, 0.1, f"K3 {layout} {dtype}")
    dense = {k: (v.contiguous() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == D else v)
             for k, v in inp.items()}
    assert torch.equal(sums, k3_forward(mod, dtype, dense, 1, 0.1))
    assert torch.equal(g, k3_backward(mod, dtype, dense, 1, 0.1))


def test_regression_t2_without_coef_is_ignored_and_empty(mod):
    inp = k3_inputs(2, 777, torch.float32, "c1t1_c2t2", "contiguous", seed=29)
    inp["coef"] = None  # target = t1: t2 must not be read
    k3_check(mod, torch.float32, inp, 0, 0.0, "K3 t2 without coef")
    empty = k3_inputs(4, 0, torch.float32, "t1", "contiguous", seed=1)
    assert torch.equal(k3_forward(mod, torch.float32, empty, 0, 0.0), torch.zeros(4, device="cuda"))
