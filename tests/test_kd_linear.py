"""fused_linear_kd_loss: every implemented backend against the float64 spec on materialized logits, the
chunking (equal to unchunked, workspace independent of the token count), options, the torch.library
contract and bad input.

The oracle projects in float64 and runs reference.kd_loss with autograd, so it shares none of the op's
shortcuts (chunking, gradients in the forward, in-place gradient, widened 16-bit heads); the budget's
"reference in dtype" is the same materialized computation in float32 (how well float32 can do), not
the op's reference backend (which shares its chunk loop and matmuls, and so would share a precision
bug such as rounding the logits to bf16).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashdistill as fd
from flashdistill.kernels.kd import linear, topk
from flashdistill.kernels.kd import reference
from oracle import as_oracle, assert_within_budget, backends_under_test, randn

BACKENDS = [b for b in backends_under_test("cpu") if b in linear.IMPLEMENTED]
DIVS = ["forward_kl", "reverse_kl", "jsd", "jsd_normalized", "tvd", "skew_forward_kl", "skew_reverse_kl", "mixed"]


def make(N, H, V, dtype, seed, *, Ht=None, bias=True, teacher="hidden", Vt=None):
    g = torch.Generator().manual_seed(seed)
    d = dict(h=randn((N, H), dtype, generator=g), w=randn((V, H), dtype, generator=g, scale=H**-0.5 * 3),
             b=randn((V,), dtype, generator=g) if bias else None)
    if teacher == "logits":
        d["tl"] = randn((N, Vt or V), dtype, generator=g, scale=3.0)
    elif teacher == "topk":  # K = 7 distinct ids per token, shuffled, with the teacher's log-probs there
        lt = torch.log_softmax(torch.randn((N, V), dtype=torch.float64, generator=g) * 3.0, -1)
        ids = lt.topk(7, -1).indices.gather(-1, torch.argsort(torch.rand((N, 7), generator=g), -1))
        d["ids"], d["lp"] = ids, lt.gather(-1, ids).float()
    else:
        Ht = Ht or H + 5
        d["th"] = randn((N, Ht), dtype, generator=g)
        d["tw"] = randn((Vt or V, Ht), dtype, generator=g, scale=Ht**-0.5 * 3)
        d["tb"] = randn((Vt or V,), dtype, generator=g) if bias else None
    return d


def teacher_kwargs(d):
    if "ids" in d:
        return dict(teacher_ids=d["ids"], teacher_logprobs=d["lp"])
    if "tl" in d:
        return dict(teacher_logits=d["tl"])
    return dict(teacher_hidden=d["th"], teacher_weight=d["tw"], teacher_bias=d["tb"])


def materialized(d, dtype, softcap=None, teacher_softcap=None, **kw):
    """Loss and grads (h, w, b) on full logits, in ``dtype`` (float64: the oracle; float32: how well
    plain float32 does), through reference.kd_loss and autograd."""
    leaves = {k: (None if d[k] is None else d[k].detach().to(dtype).requires_grad_(True)) for k in ("h", "w", "b")}
    H = d["h"].shape[-1]
    V = d["w"].shape[0]
    z = leaves["h"].reshape(-1, H) @ leaves["w"].t()
    if leaves["b"] is not None:
        z = z + leaves["b"]
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    rk = dict(kw)
    if "ids" in d:  # the top-k teacher: topk_forward_kl and the hard CE, masked and normalized as kd_loss
        T = rk.get("temperature", 1.0)
        soft = reference.topk_forward_kl(z, d["ids"], d["lp"].to(dtype), mode=rk.get("topk_mode", "tail_bucket"),
                                         temperature=T, gen_temperature=rk.get("gen_temperature"))
        labels = rk.get("labels")
        valid = torch.ones(z.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1) != -100
        n = valid.sum().clamp(min=1).to(dtype)
        loss = torch.where(valid, soft, 0).sum() / n
        if rk.get("hard_weight"):
            ce = torch.nn.functional.cross_entropy(z, torch.where(valid, labels.reshape(-1), 0), reduction="none")
            loss = loss + rk["hard_weight"] * torch.where(valid, ce, 0).sum() / n
        (loss * 1.3).backward()
        return loss, {k: (None if v is None else v.grad) for k, v in leaves.items()}
    if "tl" in d:
        t = d["tl"].to(dtype).reshape(-1, d["tl"].shape[-1])
    else:
        t = d["th"].to(dtype).reshape(-1, d["th"].shape[-1]) @ d["tw"].to(dtype).t()
        if d["tb"] is not None:
            t = t + d["tb"].to(dtype)
    if teacher_softcap:
        t = teacher_softcap * torch.tanh(t / teacher_softcap)
    vocab = rk.pop("vocab", "exact")
    if vocab != "exact":  # explicit truncation / -inf padding, as kd_loss's docstring specifies
        W = (min if vocab == "truncate" else max)(z.shape[-1], t.shape[-1])
        z, t = (x[:, :W] if x.shape[-1] >= W else
                torch.cat([x, x.new_full((x.shape[0], W - x.shape[-1]), float("-inf"))], -1) for x in (z, t))
    rk["kind"] = rk.pop("divergence", "forward_kl")
    if isinstance(rk.get("labels"), torch.Tensor):
        rk["labels"] = rk["labels"].reshape(-1)
    loss, _, _ = reference.kd_loss(z, t, **rk)
    (loss * 1.3).backward()
    return loss, {k: (None if v is None else v.grad) for k, v in leaves.items()}


def run(backend, d, **kw):
    leaves = {k: (None if d[k] is None else d[k].clone().requires_grad_(True)) for k in ("h", "w", "b")}
    loss = fd.fused_linear_kd_loss(leaves["h"], leaves["w"], student_bias=leaves["b"], **teacher_kwargs(d),
                                   backend=backend, **kw)
    (loss * 1.3).backward()
    return loss, {k: (None if v is None else v.grad) for k, v in leaves.items()}


def check(backend, d, **kw):
    dtype = d["h"].dtype
    loss, grads = run(backend, d, **kw)
    opts = {k: v for k, v in kw.items() if k not in ("chunk_size", "pack_valid")}
    loss64, grads64 = materialized(d, torch.float64, **opts)
    loss32, grads32 = materialized(d, torch.float32 if dtype != torch.float64 else torch.float64, **opts)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    N, V, H = d["h"].numel() // d["h"].shape[-1], d["w"].shape[0], d["h"].shape[-1]
    what = f"fused_linear_kd_loss {backend} {tuple(d['h'].shape)}x{V} {dtype} {kw.get('divergence', 'forward_kl')}"
    assert loss.dtype == cd
    assert_within_budget(f"loss [{what}]", loss, loss64, loss32, cd, n_reduce=N * V)
    for k, n_red in (("h", V), ("w", N), ("b", N)):
        if d[k] is None:
            continue
        assert grads[k].dtype == d[k].dtype and grads[k].shape == d[k].shape
        assert_within_budget(f"grad {k} [{what}]", grads[k], grads64[k], grads32[k], dtype,
                             n_reduce=n_red * (H if k != "b" else 1), cancels=True)
    return loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_divergences(backend, divergence, teacher):
    d = make(19, 24, 301, torch.float32, seed=DIVS.index(divergence), teacher=teacher)
    check(backend, d, divergence=divergence, temperature=2.0, beta=0.3, alpha=0.1, lam=0.7, chunk_size=8)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in topk.IMPLEMENTED])
@pytest.mark.parametrize("topk_mode", ["renorm_teacher", "renorm_both", "tail_bucket"])
def test_topk_teacher(backend, topk_mode):
    d = make(17, 16, 203, torch.float32, seed=13, teacher="topk")
    labels = torch.randint(0, 203, (17,), generator=torch.Generator().manual_seed(3))
    labels[::3] = -100
    check(backend, d, topk_mode=topk_mode, temperature=1.5, gen_temperature=0.8, labels=labels, hard_weight=0.25,
          chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab,V,Vt,divergence", [("truncate", 130, 121, "reverse_kl"), ("truncate", 121, 130, "jsd"),
                                                   ("pad", 130, 121, "forward_kl"), ("pad", 121, 130, "reverse_kl")])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_vocab_mismatch(backend, vocab, V, Vt, divergence, teacher):
    d = make(11, 16, V, torch.float32, seed=V + Vt, teacher=teacher, Vt=Vt)
    labels = torch.tensor([0, 5, -100, min(V, Vt) - 1, 17, 2, 3, 4, -100, 6, 7])
    check(backend, d, vocab=vocab, divergence=divergence, temperature=1.3, labels=labels, hard_weight=0.2,
          chunk_size=4, softcap=6.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_valid_equals_unpacked(backend):
    """Dropping the masked rows before the GEMMs changes nothing but the work (dh of a masked row is 0)."""
    d = make(21, 16, 97, torch.float32, seed=15)
    labels = torch.randint(0, 97, (21,), generator=torch.Generator().manual_seed(4))
    labels[::3] = -100
    kw = dict(divergence="jsd", temperature=2.0, labels=labels, hard_weight=0.3, chunk_size=4)
    loss_p, g_p = run(backend, d, pack_valid=True, **kw)
    loss_u, g_u = run(backend, d, pack_valid=False, **kw)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-6, atol=0)
    for k in ("h", "w", "b"):
        torch.testing.assert_close(g_p[k], g_u[k], rtol=0, atol=1e-5 * g_u[k].abs().max().item())
    assert torch.equal(g_p["h"][::3], torch.zeros_like(g_p["h"][::3]))
    check(backend, d, pack_valid=True, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_taid_lam_tensor(backend):
    d = make(9, 16, 150, torch.float32, seed=14)
    check(backend, d, divergence="taid", lam=torch.tensor(0.3), temperature=2.0, chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    d = make(13, 32, 257, dtype, seed=11)
    labels = torch.randint(0, 257, (13,), generator=torch.Generator().manual_seed(1))
    check(backend, d, divergence="jsd", temperature=1.5, labels=labels, hard_weight=0.5, chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masking_hard_label_normalizer_t_squared(backend):
    d = make(9, 16, 1000, torch.float32, seed=3, teacher="logits")
    labels = torch.tensor([3, -100, 999, 0, -100, 7, 500, 2, -100])
    check(backend, d, divergence="forward_kl", temperature=1.5, t_squared=True, labels=labels, hard_weight=0.4,
          soft_weight=0.6, chunk_size=4)
    check(backend, d, divergence="reverse_kl", labels=labels, normalizer=torch.tensor(11.0), chunk_size=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap(backend):
    d = make(11, 16, 200, torch.float32, seed=4)
    check(backend, d, divergence="mixed", softcap=2.5, teacher_softcap=3.0, labels=torch.arange(11) * 7,
          hard_weight=0.3, chunk_size=3)
    d = make(5, 16, 200, torch.float32, seed=5, teacher="logits")
    check(backend, d, divergence="tvd", teacher_softcap=1.5)  # the teacher's logits are copied, not capped in place
    assert torch.equal(d["tl"], make(5, 16, 200, torch.float32, seed=5, teacher="logits")["tl"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_no_bias_large_vocab(backend):
    d = make(2 * 3, 8, 70001, torch.float32, seed=6, bias=False)
    d["h"], d["th"] = d["h"].reshape(2, 3, 8), d["th"].reshape(2, 3, -1)
    check(backend, d, divergence="jsd", beta=0.5, labels=torch.tensor([[1, 70000, -100], [5, 6, 7]]),
          hard_weight=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_equals_unchunked(backend):
    d = make(23, 16, 97, torch.float32, seed=7)
    labels = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(2))
    labels[::4] = -100
    kw = dict(divergence="skew_reverse_kl", temperature=3.0, labels=labels, hard_weight=0.2)
    base_loss, base = run(backend, d, chunk_size=23, **kw)
    for chunk in (1, 5, 22, 1000):
        loss, grads = run(backend, d, chunk_size=chunk, **kw)
        # BLAS may pick another kernel for another row count, so the logits can differ in the last bit;
        # the accumulation of dW and db over chunks also changes the order of a sum over tokens
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=0)
        for k in ("h", "w", "b"):
            scale = base[k].abs().max().item()
            torch.testing.assert_close(grads[k], base[k], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_and_frozen_head(backend):
    d = make(3, 8, 20, torch.float32, seed=8)
    h = d["h"].clone().requires_grad_(True)
    w = d["w"].clone().requires_grad_(True)
    loss = fd.fused_linear_kd_loss(h, w, **teacher_kwargs(d), labels=torch.full((3,), -100), hard_weight=1.0,
                                   backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    # a frozen head: no weight gradient computed, the hidden one still right
    h = d["h"].clone().requires_grad_(True)
    loss = fd.fused_linear_kd_loss(h, d["w"], student_bias=d["b"], **teacher_kwargs(d), backend=backend)
    loss.backward()
    _, g64 = materialized(d, torch.float64)
    torch.testing.assert_close(h.grad.double() * 1.3, g64["h"], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no gradient at all: the loss only
        loss2 = fd.fused_linear_kd_loss(d["h"], d["w"], student_bias=d["b"], **teacher_kwargs(d), backend=backend)
    torch.testing.assert_close(loss2, loss.detach())


class _Sizes(TorchDispatchMode):
    """Records the size in bytes of every tensor an aten op returns (bytes: the Triton interpreter
    moves a kernel's arguments as uint8 views of their storage)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_workspace_independent_of_tokens(backend):
    """No tensor of [tokens x V] is ever created: the largest is a chunk of logits, the weight gradient
    or the hidden gradient."""
    N, H, V, chunk = 96, 8, 500, 4
    d = make(N, H, V, torch.float32, seed=9)
    args = (d["h"], d["w"], d["b"], None, d["th"], d["tw"], d["tb"], None, None, 2, V, 1.0, 1.0, 0.5, 0.1, 0.5, 0.0, 0.0,
            torch.full((N,), 1.0 / N), None, None, chunk, linear.NEED_H | linear.NEED_W | linear.NEED_B, backend)
    with _Sizes() as sizes:
        linear._run(*args)
    allowed = 4 * max(chunk * V, V * max(H, d["th"].shape[1]), N * H)  # float32
    assert 0 < sizes.largest <= allowed < 4 * N * V


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    d = make(6, 8, 33, torch.float32, seed=10)
    h, w, b = (d[k].clone().requires_grad_(True) for k in ("h", "w", "b"))
    torch.library.opcheck(torch.ops.flashdistill.fused_linear_kd.default,
                          (h, w, b, None, d["th"], d["tw"], d["tb"], None, None, 2, 33, 1.0, 2.0, 0.3, 0.1, 0.5, None, 3.0, 0.0,
                           torch.full((6,), 0.25), torch.tensor([1, -1, 5, 0, 32, 3]), torch.full((6,), 0.5), 4,
                           linear.NEED_H | linear.NEED_W | linear.NEED_B, backend))

    def step(h, w, b):
        return fd.fused_linear_kd_loss(h, w, student_bias=b, **teacher_kwargs(d), divergence="mixed", lam=0.3,
                                       softcap=4.0, chunk_size=4, backend=backend)

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [d[k].clone().requires_grad_(True) for k in ("h", "w", "b")]
        loss = fn(*leaves)
        loss.backward()
        outs.append((loss, *(x.grad for x in leaves)))
    torch.testing.assert_close(outs[0], outs[1])


def _bad(**over):
    d = make(4, 8, 10, torch.float32, seed=12)
    kw = dict(student_hidden=d["h"], student_weight=d["w"], teacher_hidden=d["th"], teacher_weight=d["tw"])
    kw.update(over)
    h, w = kw.pop("student_hidden"), kw.pop("student_weight")
    return lambda: fd.fused_linear_kd_loss(h, w, **kw)


@pytest.mark.parametrize("call,match", [
    (_bad(student_weight=torch.randn(10, 7)), r"student_weight must be \[V, H\] with H = student_hidden.shape\[-1\] = 8"),
    (_bad(student_weight=torch.randn(10, 8, dtype=torch.float64)), r"'student_weight' must have the dtype and device"),
    (_bad(student_bias=torch.randn(11)), r"student_bias must be \[V\] = \(10,\)"),
    (_bad(teacher_logits=torch.randn(4, 10)), r"give the teacher as one of teacher_logits, teacher_hidden \+ teacher_weight"),
    (_bad(teacher_weight=None, teacher_hidden=None), r"got neither"),
    (_bad(teacher_ids=torch.zeros(4, 2, dtype=torch.int64)), r"got teacher_weight and teacher_ids"),
    (_bad(teacher_weight=None, teacher_hidden=None, teacher_ids=torch.tensor([[0, 1]] * 4),
          teacher_logprobs=torch.zeros(4, 2), divergence="jsd"), r"top-k teacher supports divergence='forward_kl'"),
    (_bad(teacher_weight=None, teacher_hidden=None, teacher_ids=torch.tensor([[0, 0]] * 4),
          teacher_logprobs=torch.zeros(4, 2)), r"teacher_ids row 0 .* repeats id 0"),
    (_bad(teacher_weight=torch.randn(12, 13)), r"teacher_weight must be \[V, Ht\] = \(10, 13\)"),
    (_bad(teacher_hidden=torch.randn(5, 13)), r"teacher_hidden must be \[..., Ht\] over the student's tokens \(4,\)"),
    (_bad(teacher_weight=None, teacher_hidden=None, teacher_logits=torch.randn(4, 11)),
     r"teacher_logits must be \[..., V\] = \(4, 10\)"),
    (_bad(softcap=0.0), r"softcap must be None or a finite float > 0"),
    (_bad(chunk_size=0), r"chunk_size must be None or an int >= 1"),
    (_bad(labels=torch.tensor([0, 1, 2, 10]), hard_weight=1.0), r"labels\[3\] = 10 is outside \[0, 10\)"),
    (_bad(divergence="kl"), r"fused_linear_kd_loss: divergence='kl' is not one of"),
    (_bad(backend="cuda"), r"fused_linear_kd_loss: backend 'cuda' cannot run on cpu tensors"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, match):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_gpu(backend, dtype, teacher):
    """On CUDA tensors: the 16-bit head takes the out_dtype GEMM path (linear._Head), float32 the
    widened one; both against the float64 spec."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    d = make(300, 64, 5003, dtype, seed=16, teacher=teacher)
    d = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    labels = torch.randint(0, 5003, (300,), generator=torch.Generator().manual_seed(6))
    labels[::7] = -100
    check(backend, d, divergence="jsd", temperature=2.0, labels=labels.cuda(), hard_weight=0.3, chunk_size=128,
          softcap=30.0)
