"""The one-pass CPU paths (NOTES "regression v2", "score diff v2"): the elementwise K3 losses
(consistency_loss "l2" / "huber", dsm_loss; kernels/regression: _OnePass) and the K1 losses (dmd_loss,
sds_loss, vsd_loss; kernels/score_diff: _OnePass) write d loss / d input in the forward and hand it to
autograd when the upstream gradient is 1. They must give the bits of the custom-op path (taken with
the fast path off) whenever the loss is differentiated with upstream gradient 1 (float32 / float64;
K1 in 16 bits rounds once instead of twice: within the reference's budget), stay within the budget of
the float64 reference otherwise, survive a second backward through a retained graph, and stay out of
the way where they do not apply."""

import pytest
import torch

import flashdistill as fd
from flashdistill.kernels import eager, native
from flashdistill.kernels import regression as R
from flashdistill.kernels import score_diff as K1
from oracle import randn

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 2, 5, 7), (1, 1), (2, 4097)]  # odd sizes; one element; a row longer than a 2048 block


def _data(shape, dtype, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [randn(shape, dtype, generator=g) for _ in range(n)]


def _weight(B, dtype, seed):
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.25
    return w.to(torch.float32).to(cd)  # the same values in either compute dtype


def _losses(dtype, B):
    w = _weight(B, dtype, 5)
    a, s = w.double() * 0.7, w.double() * 0.4
    return {
        "consistency_l2": lambda p, t, n: fd.consistency_loss(p, t, backend="cpu"),
        "consistency_l2_w": lambda p, t, n: fd.consistency_loss(p, t, weight=w, backend="cpu"),
        "consistency_huber": lambda p, t, n: fd.consistency_loss(p, t, kind="huber", c=0.3, weight=w, backend="cpu"),
        "dsm_eps": lambda p, t, n: fd.dsm_loss(p, t, n, backend="cpu"),
        "dsm_x0_sum": lambda p, t, n: fd.dsm_loss(p, t, target="x0", reduction="sum", weight=w, backend="cpu"),
        "dsm_v": lambda p, t, n: fd.dsm_loss(p, t, n, target="v", alpha=a, sigma=s, backend="cpu"),
        "dsm_flow": lambda p, t, n: fd.dsm_loss(p, t, n, target="flow", weight=w, backend="cpu"),
    }


def _run(fn, pred, t, n, upstream=None):
    p = pred.clone().requires_grad_()
    loss = fn(p, t, n)
    (loss if upstream is None else upstream(loss)).backward()
    return loss.detach(), p.grad


@pytest.fixture
def restore_fast_path():
    old = eager.set_fast_path(True)
    yield
    eager.set_fast_path(old)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(_losses(torch.float32, 1)))
def test_one_pass_equals_two_kernels_bit_for_bit(name, shape, dtype, restore_fast_path):
    pred, t, n = _data(shape, dtype, 3, 1)
    fn = _losses(dtype, shape[0])[name]
    eager.set_fast_path(False)
    want = _run(fn, pred, t, n)
    eager.set_fast_path(True)
    before = R.HANDOUTS[0]
    got = _run(fn, pred, t, n)
    assert R.HANDOUTS[0] == before + 1, "the one-pass path was not taken, or did not hand its gradient over"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("upstream", ["scaled", "summed", "two_losses"])
def test_other_upstream_gradients_scale_the_forwards_gradient(upstream, dtype, restore_fast_path):
    """An upstream gradient other than 1 scales the forward's gradient in place: within rounding of
    the two-kernel path, and both within the float64 reference's budget. "two_losses": one call gets
    0.7 (scaled), the other 1 (handed over)."""
    pred, t, n = _data((4, 3, 33), dtype, 3, 2)
    w = _weight(4, dtype, 6)
    if upstream == "two_losses":
        def fn(p, t_, n_):
            return fd.dsm_loss(p, t_, n_, weight=w, backend="cpu") * 0.7 + fd.dsm_loss(p, t_, n_, backend="cpu")
        up, handed = None, 1
    else:
        def fn(p, t_, n_):
            return fd.dsm_loss(p, t_, n_, weight=w, backend="cpu")
        up = (lambda loss: 0.3 * loss) if upstream == "scaled" else (lambda loss: loss + 2.5 * loss)
        handed = 0
    eager.set_fast_path(False)
    want = _run(fn, pred, t, n, up)
    eager.set_fast_path(True)
    before = R.HANDOUTS[0]
    got = _run(fn, pred, t, n, up)
    assert R.HANDOUTS[0] == before + handed
    assert torch.equal(got[0], want[0])
    tol = dict(rtol=2e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(got[1].double(), want[1].double(), **tol)
    p64 = pred.double().requires_grad_()
    w64 = w.double()

    def fn64(p_):
        out = fd.dsm_loss(p_, t.double(), n.double(), weight=w64, backend="reference")
        return out * 0.7 + fd.dsm_loss(p_, t.double(), n.double(), backend="reference") if upstream == "two_losses" \
            else out
    loss64 = fn64(p64)
    (loss64 if up is None else up(loss64)).backward()
    torch.testing.assert_close(got[1].double(), p64.grad, **tol)


def test_a_retained_graph_runs_backward_twice(restore_fast_path):
    pred, t, n = _data((3, 2, 5, 7), torch.float32, 3, 3)
    p = pred.clone().requires_grad_()
    loss = fd.dsm_loss(p, t, n, target="v", alpha=0.8, sigma=0.6, backend="cpu")
    loss.backward(retain_graph=True)
    first = p.grad.clone()
    loss.backward(retain_graph=True)  # the first gradient is p.grad now: this one is recomputed
    loss.backward()
    torch.testing.assert_close(p.grad, 3 * first, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError):  # the graph is freed, as for any op
        loss.backward()


def test_where_it_does_not_apply(restore_fast_path):
    pred, t, n = _data((3, 2, 5, 7), torch.float32, 3, 4)
    before = R.HANDOUTS[0]
    with torch.no_grad():
        a = fd.consistency_loss(pred.clone().requires_grad_(), t, backend="cpu")
    b = fd.consistency_loss(pred, t, backend="cpu")  # nothing requires grad
    p = pred.clone().requires_grad_()
    fd.consistency_loss(p, t, kind="pseudo_huber", backend="cpu").backward()  # per-sample: two kernels
    w = _weight(3, torch.float32, 7).requires_grad_()
    p2 = pred.clone().requires_grad_()
    fd.dsm_loss(p2, t, n, weight=w, backend="cpu").backward()  # a weight to differentiate: two kernels
    assert R.HANDOUTS[0] == before
    assert torch.equal(a, b) and w.grad is not None and p2.grad is not None
    eager.set_fast_path(False)
    p3 = pred.clone().requires_grad_()
    fd.dsm_loss(p3, t, n, weight=w.detach(), backend="cpu").backward()
    assert R.HANDOUTS[0] == before


def test_batch_strided_views(restore_fast_path):
    big = _data((6, 2, 5, 7), torch.float32, 2, 8)
    pred, t = big[0][::2], big[1][1::2]  # rows addressed by their batch stride
    eager.set_fast_path(False)
    want = _run(lambda p, t_, n_: fd.consistency_loss(p, t_, backend="cpu"), pred, t, None)
    eager.set_fast_path(True)
    got = _run(lambda p, t_, n_: fd.consistency_loss(p, t_, backend="cpu"), pred, t, None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_kernel_refuses_the_per_sample_kind():
    mod = native.cpu_module()[0]
    x = torch.ones(2, 3)
    k, s, g = torch.ones(2), torch.empty(2), torch.empty(2, 3)
    with pytest.raises(ValueError, match="regression_forward_grad: kind 2"):
        mod.regression_forward_grad(0, 2, 3, x.data_ptr(), 3, x.data_ptr(), 3, 0, 0, 0, 2, 0.0, k.data_ptr(),
                                    s.data_ptr(), g.data_ptr())


# ----------------------------------------------------------------------------------------------------
# K1: dmd_loss, sds_loss, vsd_loss

def _k1_losses(dtype, B):
    w = _weight(B, dtype, 9)
    return {
        "dmd": lambda x, r, f, u: fd.dmd_loss(x, r, f, backend="cpu"),
        "dmd_cfg": lambda x, r, f, u: fd.dmd_loss(x, r, f, real_uncond=u, guidance=1.75, backend="cpu"),
        "dmd_eps_weight": lambda x, r, f, u: fd.dmd_loss(x, r, f, space="eps", x_t=u, alpha=0.8, sigma=0.6,
                                                         weight=w, backend="cpu"),
        "sds_cfg": lambda x, r, f, u: fd.sds_loss(x, r, f, pred_uncond=u, guidance=7.5, weight=w, backend="cpu"),
        "vsd_cfg_clip": lambda x, r, f, u: fd.vsd_loss(x, r, f, real_uncond=u, guidance=4.5, clip=0.5,
                                                       backend="cpu"),
    }


def _k1_run(fn, x, r, f, u, upstream=None):
    xx = x.clone().requires_grad_()
    loss = fn(xx, r, f, u)
    (loss if upstream is None else upstream(loss)).backward()
    return loss.detach(), xx.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(_k1_losses(torch.float32, 1)))
def test_k1_one_pass_equals_the_custom_op(name, shape, dtype, restore_fast_path):
    x, r, f, u = _data(shape, dtype, 4, 11)
    fn = _k1_losses(dtype, shape[0])[name]
    eager.set_fast_path(False)
    want = _k1_run(fn, x, r, f, u)
    eager.set_fast_path(True)
    before = K1.HANDOUTS[0]
    got = _k1_run(fn, x, r, f, u)
    assert K1.HANDOUTS[0] == before + 1, "the one-pass path was not taken, or did not hand its gradient over"
    assert torch.equal(got[0], want[0])
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(got[1], want[1])
    else:  # one rounding of kappa g instead of two: both within the float64 reference's budget
        x64 = x.double().requires_grad_()
        _k1_losses(torch.float64, shape[0])[name](x64, r.double(), f.double(), u.double()).backward()
        ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        tiny = 0.0 if dtype == torch.bfloat16 else 2.0 ** -23  # kappa g can be an fp16 subnormal (step 2^-24)
        for grad in (got[1], want[1]):
            torch.testing.assert_close(grad.double(), x64.grad, rtol=2 * ulp, atol=tiny + 1e-30)


@pytest.mark.parametrize("upstream", ["scaled", "summed"])
def test_k1_other_upstream_gradients(upstream, restore_fast_path):
    x, r, f, u = _data((4, 3, 33), torch.float32, 4, 12)
    fn = _k1_losses(torch.float32, 4)["dmd_cfg"]
    up = (lambda loss: 0.3 * loss) if upstream == "scaled" else (lambda loss: loss + 2.5 * loss)
    eager.set_fast_path(False)
    want = _k1_run(fn, x, r, f, u, up)
    eager.set_fast_path(True)
    before = K1.HANDOUTS[0]
    got = _k1_run(fn, x, r, f, u, up)
    assert K1.HANDOUTS[0] == before
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=3e-7, atol=0)


def test_k1_retained_graph_and_where_it_does_not_apply(restore_fast_path):
    x, r, f, u = _data((3, 2, 5, 7), torch.float32, 4, 13)
    xx = x.clone().requires_grad_()
    loss = fd.vsd_loss(xx, r, f, real_uncond=u, guidance=4.5, backend="cpu")
    loss.backward(retain_graph=True)
    first = xx.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(xx.grad, 3 * first, rtol=1e-6, atol=0)
    before = K1.HANDOUTS[0]
    with torch.no_grad():
        fd.dmd_loss(x.clone().requires_grad_(), r, f, backend="cpu")
    fd.dmd_loss(x, r, f, backend="cpu")  # nothing requires grad
    fd.dmd_loss(x.clone().requires_grad_(), r, f, backend="reference").backward()
    assert K1.HANDOUTS[0] == before


# ----------------------------------------------------------------------------------------------------
# the KD losses: their forward always wrote the gradient; at upstream 1 the backward now returns it

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kd_gradients_handed_over_at_upstream_one(dtype):
    from flashdistill.kernels import kd as KD

    g = torch.Generator().manual_seed(21)
    s = torch.randn(7, 19, generator=g).to(dtype)
    t = torch.randn(7, 19, generator=g).to(dtype)
    h = torch.randn(7, 5, generator=g).to(dtype)
    w = torch.randn(19, 5, generator=g).to(dtype)
    results = []
    for up in (1.0, 0.5):
        ss, hh, ww = (v.clone().requires_grad_() for v in (s, h, w))
        before = KD.HANDOUTS[0]
        (up * fd.kd_loss(ss, t, divergence="jsd", backend="cpu")).backward()
        assert KD.HANDOUTS[0] == before + (up == 1.0)
        (up * fd.fused_linear_kd_loss(hh, ww, teacher_logits=t, backend="cpu")).backward()
        results.append((ss.grad, hh.grad, ww.grad))
    for a, b in zip(*results):  # g at upstream 1 is g * 0.5 / 0.5: the same bits (a power of two)
        assert torch.equal(a, b * 2)
