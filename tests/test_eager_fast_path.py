"""The eager fast path (kernels/eager.py): an op called in plain eager mode runs its body directly, or
through an autograd.Function built from its registered backward, instead of through torch.library's
dispatcher. Both paths must give bit-identical values and gradients, and the dispatcher must still be
used wherever a tracer, mode, transform or tensor subclass could observe the difference."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flashdistill as fd
from flashdistill.kernels import eager
from flashdistill.kernels.regression import _grad_op, _sums_op
from oracle import randn


@pytest.fixture
def fast_path():
    """Yields a setter; restores the module's setting afterwards."""
    old = eager.set_fast_path(True)
    yield eager.set_fast_path
    eager.set_fast_path(old)


def _inputs(seed, shape, n, grad=()):
    g = torch.Generator().manual_seed(seed)
    out = [randn(shape, torch.float64, generator=g) for _ in range(n)]
    return [t.requires_grad_(i in grad) for i, t in enumerate(out)]


B = 3
SHAPE = (B, 2, 5, 7)  # odd sizes


def _sched_cases():
    sched = fd.VPSchedule(num_train_timesteps=50)
    t = torch.tensor([40, 30, 20])
    tp = t - 10
    a, s = torch.rand(B, dtype=torch.float64) + 0.5, torch.rand(B, dtype=torch.float64) + 0.5
    return {
        "q_sample_drawn": (2, (0,), lambda x, _: fd.q_sample(x, alpha=a, sigma=s, seed=7, offset=3, backend="cpu")),
        "q_sample_given": (2, (0, 1), lambda x, n: fd.q_sample(x, alpha=a, sigma=s, noise=n, backend="cpu")),
        "ddim_eta": (2, (0, 1), lambda p, x: fd.ddim_step(p, x, t, tp, sched, eta=1.0, seed=3, backend="cpu")),
        "euler": (2, (0, 1), lambda p, x: fd.euler_step(p, x, s, s * 0.5, backend="cpu")),
        "heun_stage1": (2, (0,), lambda p, x: fd.heun_step(p, x, s, s * 0.5, backend="cpu")[1]),
    }


CASES = {
    "dmd": (3, (0,), lambda x, r, f: fd.dmd_loss(x, r, f, backend="cpu")),
    "sds": (3, (0,), lambda x, p, n: fd.sds_loss(x, p, n, backend="cpu")),
    "vsd": (3, (0,), lambda x, r, f: fd.vsd_loss(x, r, f, backend="cpu")),
    "sid": (3, (0, 1, 2), lambda x, r, f: fd.sid_loss(x, r, f, alpha=1.2, backend="cpu")),
    "sim": (3, (0, 1, 2), lambda x, r, f: fd.sim_loss(x, r, f, backend="cpu")),
    "consistency": (2, (0, 1), lambda p, t: fd.consistency_loss(p, t, kind="pseudo_huber", c=0.3, backend="cpu")),
    "dsm": (3, (0,), lambda p, x0, n: fd.dsm_loss(p, x0, n, alpha=0.8, sigma=0.6, target="v", backend="cpu")),
    **_sched_cases(),
}


def _run(fn, tensors, grad_idx):
    out = fn(*tensors)
    outs = out if isinstance(out, tuple) else (out,)
    grads = ()
    if grad_idx:
        g = torch.Generator().manual_seed(11)
        # a loss as loss.backward() differentiates it (the K3 losses' one-pass path hands its gradient
        # over only then: any other upstream value rounds once more, tests/test_regression_one_pass.py)
        seeds = [torch.ones((), dtype=o.dtype) if o.dim() == 0 else torch.randn(o.shape, generator=g, dtype=o.dtype)
                 for o in outs]
        grads = torch.autograd.grad(outs, [tensors[i] for i in grad_idx], seeds, allow_unused=True)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_equals_dispatcher_bit_for_bit(name, fast_path):
    n, grad_idx, fn = CASES[name]
    shape = (B, 2, 5, 7)
    for setting in (False, True):
        fast_path(setting)
        tensors = _inputs(1, shape, n, grad_idx)
        got = _run(fn, tensors, grad_idx)
        if setting is False:
            want = got
    for a, b in zip(want[0], got[0]):
        assert torch.equal(a, b), name
    for a, b in zip(want[1], got[1]):
        assert (a is None and b is None) or torch.equal(a, b), name


def test_fast_path_equals_dispatcher_kd_and_attention(fast_path):
    g = torch.Generator().manual_seed(3)
    results = []
    for setting in (False, True):
        fast_path(setting)
        g.manual_seed(3)
        s = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randn(5, 11, generator=g, dtype=torch.float64)
        h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
        q, k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        lp, ids = torch.log_softmax(t, -1).topk(3, -1)
        losses = [fd.kd_loss(s, t, divergence="jsd", backend="cpu"),
                  fd.fused_linear_kd_loss(h, w, teacher_logits=t, backend="cpu"),
                  fd.topk_kd_loss(s, ids, lp, backend="cpu"),
                  fd.attention(q, k, v, causal=True, backend="cpu").square().sum(),
                  fd.attention_kd_loss(q, k, q.detach() * 0.5, k.detach(), backend="cpu")]
        grads = torch.autograd.grad(sum(losses), [s, h, w, q, k, v])
        results.append(([x.detach() for x in losses], grads))
    for a, b in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
        assert torch.equal(a, b)


def _trap(monkeypatch, op):
    """Make the op's dispatcher entry fail, so a test can see which path a call takes."""
    def boom(*args):
        raise AssertionError(f"{op.name} went through the dispatcher")
    monkeypatch.setattr(op, "custom", boom)


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch, fast_path):
    _trap(monkeypatch, _sums_op)
    _trap(monkeypatch, _grad_op)
    p, t = _inputs(2, SHAPE, 2, grad=(0,))
    loss = fd.consistency_loss(p, t, backend="cpu")  # forward (autograd.Function path) ...
    loss.backward()  # ... and the backward's op
    with torch.no_grad():
        fd.consistency_loss(p, t, backend="cpu")  # the direct body call
    fast_path(False)
    with pytest.raises(AssertionError, match="dispatcher"):
        fd.consistency_loss(p, t, backend="cpu")


@pytest.mark.parametrize("context", ["fake_mode", "device_mode", "subclass"])
def test_modes_and_subclasses_take_the_dispatcher(context, monkeypatch, fast_path):
    _trap(monkeypatch, _sums_op)
    p, t = _inputs(2, SHAPE, 2)
    with pytest.raises(AssertionError, match="dispatcher"):
        if context == "fake_mode":
            with FakeTensorMode() as mode:
                fd.consistency_loss(mode.from_tensor(p), mode.from_tensor(t), backend="cpu")
        elif context == "device_mode":
            with torch.device("cpu"):  # a TorchFunctionMode
                fd.consistency_loss(p, t, backend="cpu")
        else:
            class Tagged(torch.Tensor):
                pass
            fd.consistency_loss(p.as_subclass(Tagged), t, backend="cpu")


def test_functorch_transforms_take_the_dispatcher():
    seen = []
    torch.func.vmap(lambda x: seen.append(eager.fast_path_allowed((x,))) or x)(torch.ones(2, 3))
    torch.func.grad(lambda x: seen.append(eager.fast_path_allowed((x,))) or x.sum())(torch.ones(3))
    assert seen == [False, False]
    assert eager.fast_path_allowed((torch.ones(2), torch.nn.Parameter(torch.ones(2)), 1.0, None))


def test_an_op_without_autograd_keeps_the_dispatchers_error(fast_path):
    """regression_grad has no backward of its own: called on a tensor that requires grad it goes through
    the dispatcher, whose autograd fallback refuses a backward through it, as before."""
    p, t = _inputs(4, SHAPE, 2, grad=(0,))
    k = torch.ones(B, dtype=torch.float64)
    out = _grad_op(p, t, None, None, 0, 0.0, k, "cpu")
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_compiled_calls_stay_one_opaque_op(fast_path):
    """Under torch.compile the public op is traced as the custom op (the fast path is never taken
    while compiling), so the compiled loss equals eager."""
    p, t = _inputs(5, SHAPE, 2, grad=(0,))
    f = torch.compile(lambda a, b: fd.consistency_loss(a, b, backend="cpu"), backend="aot_eager", fullgraph=True)
    want = fd.consistency_loss(p, t, backend="cpu")
    got = f(p, t)
    assert torch.equal(want, got)
    (ga,) = torch.autograd.grad(got, [p])
    (gb,) = torch.autograd.grad(fd.consistency_loss(p, t, backend="cpu"), [p])
    assert torch.equal(ga, gb)
