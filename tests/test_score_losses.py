"""The score-distillation loss family: every public op and backend against its float64 paper-level spec.

Each case builds fresh random inputs (never zeros), runs the op (value and gradients with respect to
every differentiable input, with an upstream gradient != 1) on a backend, and compares with the
paper-level reference (``kernels/*/reference.py``) differentiated by autograd in float64, within the
harness's budget (tests/oracle.py). The backends share three kernels (K1, K2, K3/K5); the cases
cover every option that changes what a kernel computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, strategies as st

import flashdistill as fd
from flashdistill.kernels.regression import reference as reg_ref
from flashdistill.kernels.score_diff import reference as k1_ref
from flashdistill.kernels.score_identity import reference as k2_ref
from oracle import as_oracle, assert_within_budget, backends_under_test, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CPU_BACKENDS = backends_under_test("cpu")


def _cd(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Case:
    """One op call: tensors (the differentiable ones listed in ``grads``) and keyword arguments."""
    op: str
    tensors: dict
    kwargs: dict = field(default_factory=dict)
    grads: tuple = ()


def _ps(gen, B, dtype, lo, hi):
    """A per-sample tensor of the compute dtype with values in [lo, hi)."""
    return (torch.rand(B, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(_cd(dtype))


def make_case(op, variant, shape, dtype, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    B = shape[0]

    def t(shift=0.0, scale=1.0):
        if layout == "contiguous":
            return randn(shape, dtype, generator=gen, shift=shift, scale=scale)
        if layout == "batch_strided":
            return randn((2 * B,) + tuple(shape[1:]), dtype, generator=gen, shift=shift, scale=scale)[::2]
        if layout == "transposed":
            return randn(tuple(shape[:-2]) + (shape[-1], shape[-2]), dtype, generator=gen, shift=shift,
                         scale=scale).transpose(-1, -2)
        raise ValueError(layout)

    if op == "dmd":
        x, real, fake = t(), t(0.3), t(-0.2)
        kw, T = {}, dict(x=x, real=real, fake=fake)
        if variant in ("cfg", "cfg_ps", "offset"):
            T["real_uncond"] = t(0.1)
            kw["guidance"] = _ps(gen, B, dtype, 1, 7) if variant == "cfg_ps" else 1.75
            if variant == "offset":
                kw["cfg"] = "offset"
        if variant == "weight":
            kw["weight"] = _ps(gen, B, dtype, 0.2, 3)
        if variant == "eps_space":
            T["x_t"] = t(0.05)
            kw.update(space="eps", alpha=_ps(gen, B, torch.float64, 0.3, 0.99), sigma=0.6)
        if variant == "clip":
            kw.update(clip=0.5, eps=1e-3)
        return Case(op, T, kw, ("x",))
    if op == "sds":
        T = dict(x=t(), pred=t(0.2), noise=t())
        kw = {}
        if variant in ("cfg", "offset"):
            T["pred_uncond"] = t(-0.1)
            kw.update(guidance=7.5, cfg="offset" if variant == "offset" else "ho")
        if variant == "weight":
            kw.update(weight=_ps(gen, B, dtype, 0.1, 1), reduction="batch")
        if variant == "clip":
            kw.update(clip=0.3)
        return Case(op, T, kw, ("x",))
    if op == "vsd":
        T = dict(x=t(), real=t(0.2), fake=t(-0.1))
        kw = {}
        if variant in ("cfg_both", "x0"):
            T.update(real_uncond=t(0.1), fake_uncond=t(0.05))
            kw.update(guidance=_ps(gen, B, dtype, 1, 5), fake_guidance=4.5)
            if variant == "x0":
                kw["space"] = "x0"
        if variant == "weight":
            kw.update(weight=_ps(gen, B, dtype, 0.1, 1), clip=0.8)
        return Case(op, T, kw, ("x",))
    if op in ("sid", "sim"):
        T = dict(x=t(), real=t(0.2), fake=t(-0.1))
        grads = ("x", "real", "fake")
        kw = {}
        if variant in ("cfg_both", "cfg_real"):
            T["real_uncond"] = t(0.1)
            kw["guidance"] = _ps(gen, B, dtype, 1, 5) if variant == "cfg_both" else 1.5
            grads += ("real_uncond",)
            if variant == "cfg_both":
                T["fake_uncond"] = t(-0.05)
                kw["fake_guidance"] = 2.0
                grads += ("fake_uncond",)
        if op == "sid":
            kw["alpha"] = 1.0 if variant == "alpha1" else 1.2
            if variant == "scale":
                kw["scale"] = 100.0 / B
        else:
            kw["a"] = _ps(gen, B, dtype, 0.5, 2) if variant != "plain" else 1.0
            kw["c"] = _ps(gen, B, dtype, 0.1, 1) if variant != "plain" else 0.3
        return Case(op, T, kw, grads)
    if op == "consistency":
        T = dict(pred=t(), target=t(0.1))
        kw = {"kind": variant}
        if variant == "pseudo_huber":
            kw["weight"] = _ps(gen, B, dtype, 0.5, 2)
        if variant == "huber":
            kw["c"] = 0.3
        return Case(op, T, kw, ("pred",))
    if op == "dsm":
        T = dict(pred=t(), x0=t(0.2), noise=t())
        kw = {"target": variant}
        if variant == "v":
            kw.update(alpha=_ps(gen, B, torch.float64, 0.3, 0.95), sigma=0.5)
        if variant == "x0":
            del T["noise"]
            kw.update(weight=_ps(gen, B, dtype, 0.5, 2), reduction="sum")
        return Case(op, T, kw, ("pred",))
    raise ValueError(op)


VARIANTS = {
    "dmd": ["plain", "cfg", "cfg_ps", "offset", "weight", "eps_space", "clip"],
    "sds": ["plain", "cfg", "offset", "weight", "clip"],
    "vsd": ["plain", "cfg_both", "x0", "weight"],
    "sid": ["plain", "cfg_both", "alpha1", "scale"],
    "sim": ["plain", "cfg_real", "per_sample"],
    "consistency": ["l2", "huber", "pseudo_huber"],
    "dsm": ["eps", "x0", "v", "flow"],
}
ALL = [(op, v) for op, vs in VARIANTS.items() for v in vs]


def run_api(case: Case, backend):
    T = {k: (v.detach().clone().requires_grad_(k in case.grads)) for k, v in case.tensors.items()}
    fn = {"dmd": fd.dmd_loss, "sds": fd.sds_loss, "vsd": fd.vsd_loss, "sid": fd.sid_loss, "sim": fd.sim_loss,
          "consistency": fd.consistency_loss, "dsm": fd.dsm_loss}[case.op]
    first = {"dmd": ("x", "real", "fake"), "sds": ("x", "pred", "noise"), "vsd": ("x", "real", "fake"),
             "sid": ("x", "real", "fake"), "sim": ("x", "real", "fake"), "consistency": ("pred", "target"),
             "dsm": ("pred", "x0", "noise")}[case.op]
    args = [T.get(k) for k in first]
    kw = {k: v for k, v in T.items() if k not in first}
    loss = fn(*args, **kw, **case.kwargs, backend=backend)
    (loss * 1.7).backward()
    return loss.detach(), {k: T[k].grad for k in case.grads}


def run_oracle(case: Case):
    """The paper-level reference in float64, gradients by autograd."""
    T = {k: as_oracle(v).requires_grad_(k in case.grads) for k, v in case.tensors.items()}
    kw = {k: (as_oracle(v) if isinstance(v, torch.Tensor) else v) for k, v in case.kwargs.items()}
    if kw.get("cfg") == "offset":  # Ho with w + 1
        kw["guidance"] = kw["guidance"] + 1
    kw.pop("cfg", None)
    op = case.op
    if op == "dmd":
        extra = {}
        if kw.get("space") == "eps":
            B = T["x"].shape[0]
            a = kw["alpha"]
            s = torch.full((B,), kw["sigma"], dtype=torch.float64)
            extra = dict(x_t=T["x_t"], coef=torch.stack([1 / a, -s / a], dim=1))
        loss = k1_ref.dmd_loss(T["x"], T["real"], T["fake"], real_uncond=T.get("real_uncond"),
                               guidance=kw.get("guidance"), eps=kw.get("eps", 0.0), weight=kw.get("weight"),
                               **extra)
        if "clip" in kw:  # the DMD surrogate with the clamp applied to g (no paper: threestudio's clip)
            g = k1_ref.dmd_grad(T["x"], T["real"], T["fake"], eps=kw["eps"]).clamp(-kw["clip"], kw["clip"])
            loss = 0.5 * (T["x"] - (T["x"] - g).detach()).square().mean()
    elif op == "sds":
        loss = k1_ref.sds_loss(T["x"], T["pred"], T["noise"], pred_uncond=T.get("pred_uncond"),
                               guidance=kw.get("guidance"), weight=kw.get("weight"), clip=kw.get("clip"),
                               reduction=kw.get("reduction", "mean"))
    elif op == "vsd":
        loss = k1_ref.vsd_loss(T["x"], T["real"], T["fake"], real_uncond=T.get("real_uncond"),
                               guidance=kw.get("guidance"), fake_uncond=T.get("fake_uncond"),
                               fake_guidance=kw.get("fake_guidance"), weight=kw.get("weight"), clip=kw.get("clip"),
                               space=kw.get("space", "eps"))
    elif op == "sid":
        loss = k2_ref.sid_loss(T["x"], T["real"], T["fake"], r_uncond=T.get("real_uncond"),
                               f_uncond=T.get("fake_uncond"), guidance_real=kw.get("guidance"),
                               guidance_fake=kw.get("fake_guidance"), alpha=kw["alpha"], scale=kw.get("scale"))
    elif op == "sim":
        loss = k2_ref.sim_loss(T["x"], T["real"], T["fake"], r_uncond=T.get("real_uncond"),
                               f_uncond=T.get("fake_uncond"), guidance_real=kw.get("guidance"),
                               guidance_fake=kw.get("fake_guidance"), a=kw["a"], c=kw["c"])
    elif op == "consistency":
        c = kw.get("c")
        if c is None:
            c = 0.00054 * math.sqrt(T["pred"][0].numel()) if kw["kind"] == "pseudo_huber" else 0.0
        loss = reg_ref.consistency_loss(T["pred"], T["target"], kind=kw["kind"], c=c, weight=kw.get("weight"))
    else:
        loss = reg_ref.dsm_loss(T["pred"], T["x0"], T.get("noise"), alpha=kw.get("alpha"), sigma=kw.get("sigma"),
                                target=kw["target"], weight=kw.get("weight"), reduction=kw.get("reduction", "mean"))
    (loss * 1.7).backward()
    return loss.detach(), {k: T[k].grad for k in case.grads}


def loss_magnitude(case: Case) -> float:
    """Sum of the magnitudes of the loss's terms where they cancel, in float64: the K2 losses, and the
    elementwise pseudo-Huber sqrt(d^2 + c^2) - c (small d: each term is two numbers near c); 0 else."""
    if case.op == "consistency" and case.kwargs["kind"] == "huber":
        d = as_oracle(case.tensors["pred"]) - as_oracle(case.tensors["target"])
        c = case.kwargs["c"]
        return float((torch.sqrt(d * d + c * c) + c).mean())
    if case.op not in ("sid", "sim"):
        return 0.0
    T = {k: as_oracle(v) for k, v in case.tensors.items()}
    kw = {k: (as_oracle(v) if isinstance(v, torch.Tensor) else v) for k, v in case.kwargs.items()}
    rb = k1_ref.guided(T["real"], T.get("real_uncond"), kw.get("guidance"))
    fb = k1_ref.guided(T["fake"], T.get("fake_uncond"), kw.get("fake_guidance"))
    B = rb.shape[0]
    y, u = (rb - fb).reshape(B, -1), (fb - T["x"]).reshape(B, -1)
    if case.op == "sid":
        w = (T["x"] - rb).reshape(B, -1).abs().mean(dim=1).clamp_min(1e-5)
        s = kw.get("scale") or 1.0 / B
        return float(abs(s) * (((abs(1 - kw["alpha"]) * y * y + (y * u).abs()).sum(dim=1)) / w).sum())
    a = kw["a"] if isinstance(kw["a"], torch.Tensor) else torch.full((B,), kw["a"], dtype=torch.float64)
    c = kw["c"] if isinstance(kw["c"], torch.Tensor) else torch.full((B,), kw["c"], dtype=torch.float64)
    return float((a * (y * u).abs().sum(dim=1) / torch.sqrt(a * (y * y).sum(dim=1) + c * c)).sum() / B)


def check(backend, op, variant, shape, dtype, seed, layout="contiguous"):
    case = make_case(op, variant, shape, dtype, seed, layout)
    loss64, grads64 = run_oracle(case)
    loss_ref, grads_ref = run_api(case, "reference")
    loss, grads = run_api(case, backend)
    x = next(iter(case.tensors.values()))
    cd = _cd(dtype)
    what = f"{op}/{variant} {backend} {tuple(shape)} {dtype} {layout} seed={seed}"
    assert loss.dtype == cd and loss.shape == (), what
    assert_within_budget(f"loss [{what}]", loss, loss64, loss_ref, cd, n_reduce=x.numel(),
                         magnitude=1.7 * loss_magnitude(case))
    for k in case.grads:
        assert grads[k].dtype == dtype and grads[k].shape == x.shape, (what, k)
        assert_within_budget(f"d/d{k} [{what}]", grads[k], grads64[k], grads_ref[k], dtype, n_reduce=x[0].numel(),
                             cancels=op in ("sid", "sim"))


# ---------------------------------------------------------------------------------------------------
# numerics

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op,variant", ALL, ids=[f"{o}-{v}" for o, v in ALL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variants(backend, op, variant, dtype):
    check(backend, op, variant, (3, 2, 5, 7), dtype, seed=hash((op, variant)) % 1000)


shapes = st.lists(st.sampled_from([1, 2, 3, 5, 7, 16, 33]), min_size=2, max_size=5).filter(
    lambda s: math.prod(s) <= 3000)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("skeleton", ["dmd", "sid", "consistency"])
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_skeleton_hypothesis(backend, skeleton, shape, dtype, seed, data):
    """One hypothesis sweep per kernel skeleton (K1: dmd, K2: sid, K3: consistency) over shapes and dtypes."""
    ops = {"dmd": ["dmd", "sds", "vsd"], "sid": ["sid", "sim"], "consistency": ["consistency", "dsm"]}[skeleton]
    op = data.draw(st.sampled_from(ops))
    variant = data.draw(st.sampled_from(VARIANTS[op]))
    check(backend, op, variant, shape, dtype, seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["batch_strided", "transposed"])
@pytest.mark.parametrize("op,variant", [("dmd", "cfg_ps"), ("sid", "cfg_both"), ("dsm", "v"), ("sds", "cfg")],
                         ids=str)
def test_non_contiguous(backend, layout, op, variant):
    check(backend, op, variant, (3, 4, 5, 6), torch.float32, seed=7, layout=layout)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("op,variant", [("dmd", "eps_space"), ("vsd", "cfg_both"), ("sid", "cfg_both"),
                                        ("sim", "per_sample"), ("consistency", "pseudo_huber"), ("dsm", "flow")],
                         ids=str)
def test_large_rows(backend, op, variant):
    """Rows longer than any block the kernels use, and odd (the interpreter is too slow for these)."""
    check(backend, op, variant, (2, 3, 71, 97), torch.float32, seed=5)
    check(backend, op, variant, (5, 4099), torch.float16, seed=6)


@pytest.mark.full
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,variant", ALL, ids=[f"{o}-{v}" for o, v in ALL])
@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (2, 97), (2, 3, 4, 33, 65)], ids=str)
def test_matrix(backend, dtype, op, variant, shape):
    check(backend, op, variant, shape, dtype, seed=sum(shape))


# ---------------------------------------------------------------------------------------------------
# conventions and semantics

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cfg_offset_equals_ho_plus_one(backend):
    case = make_case("dmd", "cfg", (2, 3, 8), torch.float32, seed=3)
    T = case.tensors
    a = fd.dmd_loss(T["x"], T["real"], T["fake"], real_uncond=T["real_uncond"], guidance=2.5, cfg="offset",
                    backend=backend)
    b = fd.dmd_loss(T["x"], T["real"], T["fake"], real_uncond=T["real_uncond"], guidance=3.5, backend=backend)
    assert torch.equal(a, b)
    w = torch.tensor([0.5, 2.0])
    a = fd.sid_loss(T["x"], T["real"], T["fake"], real_uncond=T["real_uncond"], guidance=w, cfg="offset",
                    backend=backend)
    b = fd.sid_loss(T["x"], T["real"], T["fake"], real_uncond=T["real_uncond"], guidance=w + 1, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sid_gradients_are_the_papers(backend):
    """SiD's closed-form partials (score_distill.md Sec. 2, K2) at alpha = 1.2, per element."""
    case = make_case("sid", "plain", (2, 3, 10), torch.float64, seed=1)
    _, g = run_api(case, backend)
    x, r, f = (case.tensors[k] for k in ("x", "real", "fake"))
    w = (x - r).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-5)
    s, a = 1.7 / x.shape[0], 1.2
    torch.testing.assert_close(g["x"], -s * (r - f) / w)
    torch.testing.assert_close(g["real"], s * (2 * (1 - a) * r - x + (2 * a - 1) * f) / w)
    torch.testing.assert_close(g["fake"], s * (x - r + 2 * a * (r - f)) / w)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sid_drop_policy(backend):
    """nan_policy="drop": a NaN sample gets zero loss and exact zero gradients; the batch stays B."""
    case = make_case("sid", "plain", (3, 2, 6), torch.float32, seed=2)
    T = {k: v.clone() for k, v in case.tensors.items()}
    T["fake"][1, 0, 3] = float("nan")
    xs = {k: v.clone().requires_grad_(True) for k, v in T.items()}
    loss = fd.sid_loss(xs["x"], xs["real"], xs["fake"], nan_policy="drop", backend=backend)
    loss.backward()
    keep = [0, 2]
    ys = {k: v[keep].clone().requires_grad_(True) for k, v in T.items()}
    ref = fd.sid_loss(ys["x"], ys["real"], ys["fake"], scale=1 / 3, backend=backend)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for k in xs:
        assert torch.equal(xs[k].grad[1], torch.zeros_like(xs[k].grad[1]))
        torch.testing.assert_close(xs[k].grad[keep], ys[k].grad)
    with pytest.raises(ValueError, match="nan_policy"):
        fd.sid_loss(T["x"], T["real"], T["fake"], nan_policy="skip")
    assert torch.isnan(fd.sid_loss(T["x"], T["real"], T["fake"], backend=backend))


def test_sim_matches_toy_gaussian_gradient():
    """SIM's surrogate against the analytic gradient of the 1-D Gaussian toy (score_distill.md Sec. 8):
    data N(0, 1), generator x = theta + s z, EDM noise x_t = x + sigma e, exact linear denoisers
    (r: the data's, f: the generator's with theta frozen). With c large, pseudo-Huber is quadratic and
    c * L is SiD's alpha = 1 surrogate (no normaliser), whose gradient is the stop-gradient part of the
    Fisher divergence gradient: a b theta in score units, sigma^4 a b theta in x0 units,
    a = 1 / (1 + sigma^2), b = 1 / (s^2 + sigma^2)."""
    gen = torch.Generator().manual_seed(0)
    for theta, s, sigma in [(0.7, 0.5, 1.0), (1.5, 0.8, 0.5)]:
        n = 200000
        th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        z, e = (torch.randn(n, 1, dtype=torch.float64, generator=gen) for _ in range(2))
        x = th + s * z
        xt = x + sigma * e
        a, b = 1 / (1 + sigma**2), 1 / (s**2 + sigma**2)
        r = xt - sigma**2 * a * xt
        f = xt - sigma**2 * b * (xt - theta)
        c = 1e6
        (g,) = torch.autograd.grad(fd.sim_loss(x, r, f, a=1.0, c=c, backend="reference") * c, th)
        expect = sigma**4 * a * b * theta
        assert abs(g.item() - expect) < 0.02 * expect, (g.item(), expect)


# ---------------------------------------------------------------------------------------------------
# the torch.library contract

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    gen = torch.Generator().manual_seed(4)
    x, r, f, u = (randn((2, 3, 5), torch.float32, generator=gen) for _ in range(4))
    w = torch.tensor([1.5, 2.0])
    torch.library.opcheck(torch.ops.flashdistill.score_diff.default,
                          (x.clone().requires_grad_(True), f, None, None, 1.0, r, u, w, 1.0, None, None, w,
                           True, 1e-3, 0.0, 1.0 / x.numel(), backend))
    torch.library.opcheck(torch.ops.flashdistill.score_diff.default,
                          (x.clone().requires_grad_(True), r, u, None, 7.5, f, None, None, 1.0, None, None, None,
                           False, 0.0, 0.4, 0.5, backend))
    torch.library.opcheck(torch.ops.flashdistill.score_identity_sums.default,
                          (x.clone().requires_grad_(True), r.clone().requires_grad_(True), u.clone().requires_grad_(True),
                           w, 1.0, f.clone().requires_grad_(True), None, None, 1.0, backend))
    coef = torch.randn(2, 2, generator=gen)
    torch.library.opcheck(torch.ops.flashdistill.score_identity_grads.default,
                          (x, r, None, None, 1.0, f, u, None, 2.0, coef, [True, True, False, True, True], backend))
    torch.library.opcheck(torch.ops.flashdistill.regression_sums.default,
                          (x.clone().requires_grad_(True), r, f, coef, 0, 0.0, backend))
    torch.library.opcheck(torch.ops.flashdistill.regression_sums.default,
                          (x.clone().requires_grad_(True), r, None, None, 1, 0.2, backend))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_compile_fullgraph_matches_eager(backend):
    case = make_case("sid", "cfg_both", (2, 3, 8, 8), torch.float32, seed=10)
    T = case.tensors

    def step(x, real, fake, ru, fu, w, p, tgt):
        l1 = fd.sid_loss(x, real, fake, real_uncond=ru, guidance=w, fake_uncond=fu, fake_guidance=2.0,
                         backend=backend)
        l2 = fd.dmd_loss(x, real.detach(), fake.detach(), real_uncond=ru.detach(), guidance=w, backend=backend)
        l3 = fd.consistency_loss(p, tgt, kind="pseudo_huber", backend=backend)
        return l1 + 3.0 * l2 + l3

    w = case.kwargs["guidance"]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        ins = {k: v.clone().requires_grad_(True) for k, v in T.items()}
        p = T["x"].clone().requires_grad_(True)
        loss = fn(ins["x"], ins["real"], ins["fake"], ins["real_uncond"], ins["fake_uncond"], w, p, T["real"])
        loss.backward()
        outs.append([loss] + [ins[k].grad for k in ("x", "real", "fake", "real_uncond", "fake_uncond")] + [p.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# bad input: clear errors that name the op and the argument

def _xrf(shape=(2, 3, 4), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [randn(shape, dtype, generator=gen) for _ in range(4)]


@pytest.mark.parametrize("call,match", [
    (lambda x, r, f, u: fd.sds_loss(x, r, f[:1]), r"sds_loss: argument 'noise' must match 'x'"),
    (lambda x, r, f, u: fd.sds_loss(x, r, f, reduction="sum"), r"sds_loss: reduction='sum' is not one of mean, batch"),
    (lambda x, r, f, u: fd.sds_loss(x, r, f, clip=0.0), r"sds_loss: clip must be a finite number > 0"),
    (lambda x, r, f, u: fd.vsd_loss(x, r, f, fake_uncond=u), r"vsd_loss: fake_uncond is given but fake_guidance is None"),
    (lambda x, r, f, u: fd.vsd_loss(x, r, f, space="score"), r"vsd_loss: space='score' is not one of"),
    (lambda x, r, f, u: fd.dmd_loss(x, r, f, space="eps"), r"dmd_loss: space='eps' needs x_t"),
    (lambda x, r, f, u: fd.dmd_loss(x, r, f, space="eps", x_t=u), r"dmd_loss: space='eps' needs alpha and sigma"),
    (lambda x, r, f, u: fd.dmd_loss(x, r, f, x_t=u), r"dmd_loss: x_t is only used with space="),
    (lambda x, r, f, u: fd.dmd_loss(x, r, f, real_uncond=u, guidance=1.0, cfg="cfg++"), r"dmd_loss: cfg='cfg\+\+'"),
    (lambda x, r, f, u: fd.dmd_loss(x, r, f, weight=torch.ones(3)), r"dmd_loss: argument 'weight' must be a per-sample tensor of shape \(2,\)"),
    (lambda x, r, f, u: fd.dmd_loss(x, r, f, space="eps", x_t=u, alpha=torch.ones(2, dtype=torch.float16), sigma=0.5),
     r"dmd_loss: argument 'alpha' must be a float or a per-sample tensor of shape \(2,\), dtype float32 or float64"),
    (lambda x, r, f, u: fd.sid_loss(x, r.double(), f), r"sid_loss: argument 'real' must match 'x'"),
    (lambda x, r, f, u: fd.sid_loss(x, r, f, alpha=float("nan")), r"sid_loss: alpha must be a finite float"),
    (lambda x, r, f, u: fd.sid_loss(x, r, f, guidance=2.0), r"sid_loss: guidance is given but real_uncond is None"),
    (lambda x, r, f, u: fd.sim_loss(x, r, f, a=torch.ones(2, dtype=torch.float64)), r"sim_loss: argument 'a' must be a per-sample tensor"),
    (lambda x, r, f, u: fd.consistency_loss(x, r, kind="l1"), r"consistency_loss: kind='l1' is not one of"),
    (lambda x, r, f, u: fd.consistency_loss(x, r, kind="huber", c=0.0), r"consistency_loss: c must be a finite float"),
    (lambda x, r, f, u: fd.consistency_loss(x, r[:, :2]), r"consistency_loss: argument 'target' must match 'pred'"),
    (lambda x, r, f, u: fd.dsm_loss(x, r, target="eps"), r"dsm_loss: target='eps' needs noise"),
    (lambda x, r, f, u: fd.dsm_loss(x, r, f, target="score"), r"dsm_loss: target='score' is not one of"),
    (lambda x, r, f, u: fd.dsm_loss(x, r, f, target="v", sigma=0.5), r"dsm_loss: argument 'alpha' must be a finite float"),
    (lambda x, r, f, u: fd.dsm_loss(x, r, f, reduction="none"), r"dsm_loss: reduction='none' is not one of"),
    (lambda x, r, f, u: fd.dsm_loss(x[0, 0], r, f), r"dsm_loss: argument 'pred' must have at least 2 dimensions"),
    (lambda x, r, f, u: fd.sid_loss(x, r, f, backend="gpu"), r"sid_loss: backend='gpu' is not a backend"),
    (lambda x, r, f, u: fd.consistency_loss(x, r, backend="cuda"), r"consistency_loss: backend 'cuda' cannot run on cpu"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, match):
    x, r, f, u = _xrf()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(x, r, f, u)


def test_to_x0_and_convert_round_trip():
    gen = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha = torch.tensor([0.07, 0.6, 0.99], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    xt = alpha.view(-1, 1, 1) * x0 + sigma.view(-1, 1, 1) * eps
    v = alpha.view(-1, 1, 1) * eps - sigma.view(-1, 1, 1) * x0
    torch.testing.assert_close(fd.to_x0(eps, xt, space="eps", alpha=alpha, sigma=sigma), x0)
    torch.testing.assert_close(fd.to_x0(v, xt, space="v", alpha=alpha, sigma=sigma), x0)
    torch.testing.assert_close(fd.convert(eps, xt, src="eps", dst="v", alpha=alpha, sigma=sigma), v)
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    xt_rf = (1 - s).view(-1, 1, 1) * x0 + s.view(-1, 1, 1) * eps
    torch.testing.assert_close(fd.convert(eps - x0, xt_rf, src="flow", dst="eps", alpha=1 - s, sigma=s), eps)


def test_fdiv_weight():
    """f-distill weights: r = clamp(exp(clamp(mean logit, +-10)), 0.1, 20), h = f(r), normalised to mean 1."""
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0], [-50.0, -50.0], [50.0, 50.0]])
    r = torch.tensor([1.0, math.exp(2.0), 0.1, 20.0])
    for name, f in {"js": lambda r: 1 - 1 / (1 + r), "kl": lambda r: r, "rkl": lambda r: torch.ones_like(r),
                    "sh": torch.sqrt, "jf": lambda r: 1 + r, "sf": lambda r: 1 / (1 + r),
                    "neyman": lambda r: 1 / r}.items():
        h = f(r)
        torch.testing.assert_close(fd.fdiv_weight(logits, name), h / (h.mean() + 1e-6))
        torch.testing.assert_close(fd.fdiv_weight(logits, name, normalize=False), h)
    assert fd.fdiv_weight(logits.requires_grad_(True)).grad_fn is None  # detached
    with pytest.raises(ValueError, match="fdiv_weight: divergence='tv' is not one of"):
        fd.fdiv_weight(logits, "tv")


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("op,variant,dtype", [("sid", "cfg_both", torch.float32), ("dmd", "cfg", torch.bfloat16),
                                              ("dsm", "v", torch.float32), ("consistency", "huber", torch.float16)],
                         ids=str)
def test_streaming_sizes(backend, op, variant, dtype):
    """Calls moving more than 16 MiB: the CPU kernels write with streaming stores there."""
    check(backend, op, variant, (3, 1_400_011), dtype, seed=12)
