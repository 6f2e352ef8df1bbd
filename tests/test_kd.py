"""kd_loss: every implemented backend against the float64 spec (kernels/kd/reference.py), options,
masking, the torch.library contract and bad input."""

from __future__ import annotations

import pytest
import torch

import flashdistill as fd
from flashdistill.kernels import kd as kd_mod
from flashdistill.kernels.kd import reference
from oracle import as_oracle, assert_within_budget, backends_under_test, randn

BACKENDS = [b for b in backends_under_test("cpu") if b in kd_mod.IMPLEMENTED]
DIVS = list(kd_mod.KINDS)


def make(N, V, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return randn((N, V), dtype, generator=g, scale=scale), randn((N, V), dtype, generator=g, scale=scale)


def check(backend, z, t, **kw):
    labels = kw.get("labels")
    zz = z.clone().requires_grad_(True)
    loss, soft, hard = fd.kd_loss(zz, t, return_parts=True, backend=backend, **kw)
    (loss * 1.3).backward()
    zr = z.clone().requires_grad_(True)
    loss_r, _, _ = fd.kd_loss(zr, t, return_parts=True, backend="reference", **kw)
    (loss_r * 1.3).backward()
    z64 = as_oracle(z).requires_grad_(True)
    rk = {k: v for k, v in kw.items() if k not in ("divergence",)}
    V = z.shape[-1]
    if isinstance(rk.get("labels"), torch.Tensor):
        rk["labels"] = rk["labels"].reshape(-1)
    loss64, soft64, hard64 = reference.kd_loss(z64.reshape(-1, V), as_oracle(t).reshape(-1, V),
                                               kind=kw.get("divergence", "forward_kl"), **rk)
    (loss64 * 1.3).backward()
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    what = f"kd_loss {backend} {tuple(z.shape)} {z.dtype} {kw.get('divergence')}"
    assert loss.dtype == cd and zz.grad.dtype == z.dtype
    assert_within_budget(f"loss [{what}]", loss, loss64, loss_r, cd, n_reduce=z.numel())
    assert_within_budget(f"grad [{what}]", zz.grad, z64.grad, zr.grad, z.dtype, n_reduce=z.shape[-1], cancels=True)
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_divergences(backend, divergence, dtype):
    z, t = make(5, 301, dtype, seed=DIVS.index(divergence))
    check(backend, z, t, divergence=divergence, temperature=2.0, beta=0.3, alpha=0.1, lam=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints(backend, beta):
    z, t = make(3, 64, torch.float64, seed=1)
    check(backend, z, t, divergence="jsd", beta=beta)
    check(backend, z, t, divergence="jsd_normalized", beta=beta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_hard_label_temperature(backend):
    z, t = make(7, 1000, torch.float32, seed=3)
    labels = torch.tensor([3, -100, 999, 0, -100, 7, 500])
    check(backend, z, t, divergence="forward_kl", temperature=1.5, t_squared=True, labels=labels, hard_weight=0.4,
          soft_weight=0.6)
    check(backend, z, t, divergence="reverse_kl", labels=labels, normalizer=torch.tensor(11.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_is_zero(backend):
    z, t = make(3, 20, torch.float32, seed=4)
    zz = z.clone().requires_grad_(True)
    loss = fd.kd_loss(zz, t, labels=torch.full((3,), -100), hard_weight=1.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zz.grad, torch.zeros_like(z))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_large_vocab(backend):
    z, t = make(2 * 3, 70001, torch.float32, seed=5, scale=2.0)
    z3, t3 = z.reshape(2, 3, -1), t.reshape(2, 3, -1)
    check(backend, z3, t3, divergence="jsd", beta=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z, t = make(4, 33, torch.float32, seed=6)
    w = torch.full((4,), 0.25)
    torch.library.opcheck(torch.ops.flashdistill.kd_loss.default,
                          (z.clone().requires_grad_(True), t, 2, 33, 2.0, 0.3, 0.1, 0.5, None, w, torch.tensor([1, -1, 5, 0]),
                           w * 2, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_matches_eager(backend):
    z, t = make(4, 50, torch.float32, seed=7)
    labels = torch.tensor([1, 2, -100, 4])

    def step(z, t):
        return fd.kd_loss(z, t, divergence="mixed", lam=0.3, labels=labels, hard_weight=0.2, backend=backend)

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        zz = z.clone().requires_grad_(True)
        loss = fn(zz, t)
        loss.backward()
        outs.append((loss, zz.grad))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("call,match", [
    (lambda z, t: fd.kd_loss(z, t[:, :5]), r"kd_loss: argument 'teacher_logits' must match 'student_logits'"),
    (lambda z, t: fd.kd_loss(z, t, divergence="kl"), r"kd_loss: divergence='kl' is not one of"),
    (lambda z, t: fd.kd_loss(z, t, temperature=0.0), r"kd_loss: temperature must be > 0"),
    (lambda z, t: fd.kd_loss(z, t, beta=1.5), r"kd_loss: beta must be in \[0, 1\]"),
    (lambda z, t: fd.kd_loss(z, t, hard_weight=1.0), r"kd_loss: hard_weight=1.0 needs labels"),
    (lambda z, t: fd.kd_loss(z, t, labels=torch.tensor([0, 1, 2])), r"kd_loss: labels must be an int64 tensor of shape \(4,\)"),
    (lambda z, t: fd.kd_loss(z, t, labels=torch.tensor([0, 1, 2, 10])), r"kd_loss: labels\[3\] = 10 is outside \[0, 10\)"),
    (lambda z, t: fd.kd_loss(z, t, backend="cuda"), r"kd_loss: backend 'cuda' cannot run on cpu tensors"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, match):
    z, t = make(4, 10, torch.float32, seed=8)
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(z, t)


def _padded(x, V):
    W = x.shape[-1]
    return x[..., :V] if W >= V else torch.cat([x, x.new_full((*x.shape[:-1], V - W), float("-inf"))], -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", ["truncate", "pad"])
@pytest.mark.parametrize("widths", [(301, 290), (290, 301)], ids=["student_wider", "teacher_wider"])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"])
def test_vocab_mismatch(backend, vocab, widths, divergence):
    """Different vocabulary sizes against the spec on explicitly truncated / -inf-padded logits ("kl":
    the KL that stays finite under padding: forward when the student is wider, reverse otherwise)."""
    Vs, Vt = widths
    if divergence == "kl":
        divergence = "forward_kl" if Vs > Vt else "reverse_kl"
    g = torch.Generator().manual_seed(Vs + len(divergence))
    z = randn((6, Vs), torch.float32, generator=g, scale=3.0)
    t = randn((6, Vt), torch.float32, generator=g, scale=3.0)
    V = min(widths) if vocab == "truncate" else max(widths)
    labels = torch.tensor([0, 5, -100, min(V, Vs) - 1, 17, 2])
    kw = dict(divergence=divergence, temperature=1.7, labels=labels, hard_weight=0.3)
    zz = z.clone().requires_grad_(True)
    loss = fd.kd_loss(zz, t, vocab=vocab, backend=backend, **kw)
    (loss * 1.3).backward()
    z64 = as_oracle(z).requires_grad_(True)
    loss64, _, _ = reference.kd_loss(_padded(z64, V), _padded(as_oracle(t), V), kind=divergence, temperature=1.7,
                                     labels=labels, hard_weight=0.3)
    (loss64 * 1.3).backward()
    z32 = z.clone().requires_grad_(True)
    loss32, _, _ = reference.kd_loss(_padded(z32, V), _padded(t, V), kind=divergence, temperature=1.7,
                                     labels=labels, hard_weight=0.3)
    (loss32 * 1.3).backward()
    what = f"kd_loss {backend} vocab={vocab} {widths} {divergence}"
    assert zz.grad.shape == z.shape
    assert_within_budget(f"loss [{what}]", loss, loss64, loss32, torch.float32, n_reduce=z.numel())
    assert_within_budget(f"grad [{what}]", zz.grad, z64.grad, z32.grad, torch.float32, n_reduce=V, cancels=True)
    if vocab == "truncate" and Vs > Vt:
        assert torch.equal(zz.grad[:, Vt:], torch.zeros_like(zz.grad[:, Vt:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_pad_forward_kl_is_infinite_where_the_student_has_no_mass(backend):
    z, t = make(3, 50, torch.float32, seed=9)
    loss = fd.kd_loss(z[:, :40], t, vocab="pad", backend=backend)  # the teacher has mass on ids 40..49
    assert loss.item() == float("inf")
    loss = fd.kd_loss(z, t[:, :40], vocab="pad", divergence="forward_kl", backend=backend)
    assert torch.isfinite(loss)


def test_vocab_bad_input():
    z, t = make(4, 10, torch.float32, seed=10)
    with pytest.raises(ValueError, match=r"kd_loss: vocab='zeros' is not one of exact, truncate, pad"):
        fd.kd_loss(z, t[:, :8], vocab="zeros")
    with pytest.raises(ValueError, match=r"must match 'student_logits' in every dimension but the last"):
        fd.kd_loss(z, t[:3], vocab="pad")
    with pytest.raises(ValueError, match=r"labels\[0\] = 9 is outside \[0, 8\)"):
        fd.kd_loss(z, t[:, :8], vocab="truncate", labels=torch.tensor([9, 0, 0, 0]), hard_weight=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.35, 1.0])
def test_taid_lam_tensor(backend, lam):
    """TAID's lam as a 0-d tensor (scheduled by the caller) equals the float, the endpoints included
    (lam = 0: the target is the student itself, loss 0; lam = 1: forward KL)."""
    z, t = make(5, 97, torch.float32, seed=11)
    check(backend, z, t, divergence="taid", lam=torch.tensor(lam), temperature=1.5)
    check(backend, z, t, divergence="taid", lam=lam, temperature=1.5)
    if lam == 1.0:
        ref = fd.kd_loss(z, t, divergence="forward_kl", temperature=1.5, backend=backend)
        torch.testing.assert_close(fd.kd_loss(z, t, divergence="taid", lam=torch.tensor(1.0), temperature=1.5,
                                              backend=backend), ref)


def test_taid_lam_tensor_bad_input():
    z, t = make(4, 10, torch.float32, seed=12)
    with pytest.raises(ValueError, match=r"lam may be a tensor only for divergence='taid'"):
        fd.kd_loss(z, t, divergence="mixed", lam=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"kd_loss: lam must be in \[0, 1\], got 1.5"):
        fd.kd_loss(z, t, divergence="taid", lam=torch.tensor(1.5))


GPU_BACKENDS = ["cuda", "triton", "reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_divergences(backend, divergence, dtype):
    """The GPU row kernels on CUDA tensors against the float64 spec (large vocabulary, hard CE, masks)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    z, t = make(37, 32003, dtype, seed=DIVS.index(divergence) + 20)
    labels = torch.randint(0, 32003, (37,), generator=torch.Generator().manual_seed(5))
    labels[::5] = -100
    lam = torch.tensor(0.4, device="cuda") if divergence == "taid" else 0.7
    check(backend, z.cuda(), t.cuda(), divergence=divergence, temperature=2.0, beta=0.3, alpha=0.1, lam=lam,
          labels=labels.cuda(), hard_weight=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("vocab", ["truncate", "pad"])
def test_gpu_vocab_and_all_masked(backend, vocab):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    z, t = make(6, 3001, torch.float32, seed=30)
    zz = z[:, :2990].cuda().requires_grad_(True)
    loss = fd.kd_loss(zz, t.cuda(), vocab=vocab, divergence="jsd", backend=backend)
    loss.backward()
    ref = fd.kd_loss(z[:, :2990].double(), t.double(), vocab=vocab, divergence="jsd", backend="reference")
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    zz = z.cuda().requires_grad_(True)
    loss = fd.kd_loss(zz, t.cuda(), labels=torch.full((6,), -100, device="cuda"), hard_weight=1.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(zz.grad, torch.zeros_like(zz))
