"""The nn.Module form of every loss (flashdistill.engine.modules) against the functional ops.

A module computes nothing itself: with the same configuration and inputs it must give the op's
values and gradients bit for bit (torch.equal, not a tolerance) on every backend. Beside that: the
constructor and forward mirror the op's signature (names, defaults, positions) so they cannot drift
apart, bad configuration fails at construction under the class name, repr shows the configuration,
a module holds no state, and it works in a training step and under torch.compile(fullgraph=True).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import flashdistill as fd
from flashdistill.engine.modules import (AttentionKDLoss, ConsistencyLoss, DMDLoss, DSMLoss, FusedLinearKDLoss,
                                         KDLoss, SDSLoss, SFDLoss, SIMLoss, SiDLoss, TopKKDLoss, VSDLoss)
from oracle import randn

BACKENDS = ["reference", "cpu"]  # the two CPU backends that run at full speed here (no interpreter)
SHAPE = (3, 4, 5)  # B = 3 samples of 20 elements, a size no kernel's block divides

# every module beside the op it wraps (sfd_loss forwards **kwargs to sid_loss: its signature is sid_loss's)
PAIRS = [(DMDLoss, fd.dmd_loss), (SDSLoss, fd.sds_loss), (VSDLoss, fd.vsd_loss), (SiDLoss, fd.sid_loss),
         (SIMLoss, fd.sim_loss), (SFDLoss, fd.sid_loss), (ConsistencyLoss, fd.consistency_loss),
         (DSMLoss, fd.dsm_loss), (KDLoss, fd.kd_loss), (FusedLinearKDLoss, fd.fused_linear_kd_loss),
         (TopKKDLoss, fd.topk_kd_loss), (AttentionKDLoss, fd.attention_kd_loss)]
MODULES = [cls for cls, _ in PAIRS]


# ----------------------------------------------------------------------------------------------------
# cases: (module class, op, configuration, positional tensors, per-call keywords, names to differentiate)

def _ps(g, lo, hi, dtype=torch.float32):
    """A per-sample [B] tensor with values in [lo, hi)."""
    return (torch.rand(SHAPE[0], generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


def _case(name, g):
    t = lambda shift=0.0: randn(SHAPE, torch.float32, generator=g, shift=shift)  # noqa: E731
    if name == "dmd":
        return (DMDLoss, fd.dmd_loss, dict(guidance=2.5, cfg="offset", eps=1e-3, clip=0.8),
                dict(x=t(), real=t(0.3), fake=t(-0.2)), dict(real_uncond=t(0.1), weight=_ps(g, 0.2, 3.0)), {"x"})
    if name == "dmd_eps_space_guidance_per_call":  # the per-call guidance tensor overrides the configured float
        return (DMDLoss, fd.dmd_loss, dict(guidance=1.5, space="eps"),
                dict(x=t(), real=t(0.3), fake=t(-0.2)),
                dict(real_uncond=t(0.1), guidance=_ps(g, 1.0, 7.0), x_t=t(0.05),
                     alpha=_ps(g, 0.3, 0.99, torch.float64), sigma=0.6), {"x"})
    if name == "sds":
        return (SDSLoss, fd.sds_loss, dict(guidance=3.0, reduction="batch", clip=2.0),
                dict(x=t(), pred=t(0.2), noise=t()), dict(pred_uncond=t(-0.1), weight=_ps(g, 0.5, 2.0)), {"x"})
    if name == "vsd":
        return (VSDLoss, fd.vsd_loss, dict(guidance=2.0, fake_guidance=1.5, space="v"),
                dict(x=t(), real=t(0.3), fake=t(-0.2)), dict(real_uncond=t(0.1), fake_uncond=t(-0.1)), {"x"})
    if name == "sid":
        return (SiDLoss, fd.sid_loss, dict(guidance=2.0, alpha=1.0, eps=1e-4, scale=0.5),
                dict(x=t(), real=t(0.3), fake=t(-0.2)), dict(real_uncond=t(0.1)), {"x", "real", "fake", "real_uncond"})
    if name == "sim_a_per_call":
        return (SIMLoss, fd.sim_loss, dict(c=0.5, nan_policy="drop"),
                dict(x=t(), real=t(0.3), fake=t(-0.2)), dict(a=_ps(g, 0.5, 4.0)), {"x", "real", "fake"})
    if name == "sfd":
        return (SFDLoss, fd.sfd_loss, dict(alpha=1.2, fake_guidance=1.5),
                dict(x=t(), real_safe=t(0.3), fake=t(-0.2)), dict(fake_uncond=t(-0.3)), {"x", "real_safe", "fake"})
    if name == "consistency":
        return (ConsistencyLoss, fd.consistency_loss, dict(kind="pseudo_huber"),
                dict(pred=t(), target=t(0.2)), dict(weight=_ps(g, 0.5, 2.0)), {"pred"})
    if name == "consistency_huber":
        return (ConsistencyLoss, fd.consistency_loss, dict(kind="huber", c=0.05),
                dict(pred=t(), target=t(0.2)), {}, {"pred"})
    if name == "dsm":
        return (DSMLoss, fd.dsm_loss, dict(target="v", reduction="sum"),
                dict(pred=t(), x0=t(0.1), noise=t()),
                dict(alpha=_ps(g, 0.3, 0.9, torch.float64), sigma=_ps(g, 0.3, 0.9, torch.float64),
                     weight=_ps(g, 0.5, 2.0)), {"pred"})
    if name in ("kd", "kd_taid_parts"):
        z, tl = (randn((2, 3, 33), torch.float32, generator=g, scale=2.0) for _ in range(2))
        if name == "kd":
            labels = torch.tensor([[1, 2, -100], [4, 32, 0]])
            return (KDLoss, fd.kd_loss, dict(divergence="mixed", temperature=2.0, t_squared=True, lam=0.3,
                                             hard_weight=0.2),
                    dict(student_logits=z, teacher_logits=tl), dict(labels=labels), {"student_logits"})
        return (KDLoss, fd.kd_loss, dict(divergence="taid", return_parts=True),
                dict(student_logits=z, teacher_logits=tl), dict(lam=torch.tensor(0.7)), {"student_logits"})
    if name == "fused_linear":
        N, H, V, Ht = 6, 8, 33, 13
        h, w, b = randn((N, H), torch.float32, generator=g), randn((V, H), torch.float32, generator=g, scale=1.0), \
            randn((V,), torch.float32, generator=g)
        th, tw = randn((N, Ht), torch.float32, generator=g), randn((V, Ht), torch.float32, generator=g, scale=0.8)
        return (FusedLinearKDLoss, fd.fused_linear_kd_loss, dict(divergence="jsd", temperature=1.5, softcap=4.0,
                                                                 chunk_size=4),
                dict(student_hidden=h, student_weight=w),
                dict(student_bias=b, teacher_hidden=th, teacher_weight=tw, labels=torch.tensor([1, -100, 5, 0, 32, 3])),
                {"student_hidden", "student_weight", "student_bias"})
    if name == "topk":
        z = randn((4, 33), torch.float32, generator=g, scale=2.0)
        lt = torch.log_softmax(torch.randn((4, 33), dtype=torch.float64, generator=g) * 3.0, -1)
        ids = lt.topk(5, -1).indices
        return (TopKKDLoss, fd.topk_kd_loss, dict(mode="renorm_both", temperature=2.0, gen_temperature=1.0,
                                                  hard_weight=0.3),
                dict(student_logits=z, teacher_ids=ids, teacher_logprobs=lt.gather(-1, ids).float()),
                dict(labels=torch.tensor([1, 2, -100, 4])), {"student_logits"})
    if name == "attention_kd":
        q_s, k_s = randn((1, 2, 9, 16), torch.float32, generator=g), randn((1, 1, 7, 16), torch.float32, generator=g)
        q_t, k_t = randn((1, 2, 9, 8), torch.float32, generator=g), randn((1, 2, 7, 8), torch.float32, generator=g)
        return (AttentionKDLoss, fd.attention_kd_loss, dict(causal=True, scale_s=0.3, reduction="none"),
                dict(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t), {}, {"q_s", "k_s"})
    raise ValueError(name)


CASES = ["dmd", "dmd_eps_space_guidance_per_call", "sds", "vsd", "sid", "sim_a_per_call", "sfd", "consistency",
         "consistency_huber", "dsm", "kd", "kd_taid_parts", "fused_linear", "topk", "attention_kd"]


def _run(call, args, per_call, grads):
    """call(*args, **per_call) with fresh leaves for ``grads``; the outputs and the gradients after a
    backward with an upstream gradient != 1."""
    inputs = {**args, **per_call}
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in grads else v) for k, v in inputs.items()}
    out = call(*(leaves[k] for k in args), **{k: leaves[k] for k in per_call})
    first = out[0] if isinstance(out, tuple) else out
    upstream = torch.linspace(0.5, 1.5, first.numel(), dtype=first.dtype).reshape(first.shape)
    (first * upstream).sum().backward()
    return (out if isinstance(out, tuple) else (out,)), [leaves[k].grad for k in sorted(grads)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_module_equals_the_op(case, backend):
    cls, fn, config, args, per_call, grads = _case(case, torch.Generator().manual_seed(CASES.index(case)))
    module = cls(**config, backend=backend)
    got, got_grads = _run(module, args, per_call, grads)
    want, want_grads = _run(lambda *a, **kw: fn(*a, **{**config, "backend": backend, **kw}), args, per_call, grads)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{case}: output {i}: module {a} != op {b}"
    for name, a, b in zip(sorted(grads), got_grads, want_grads):
        assert a is not None and torch.equal(a, b), f"{case}: d/d{name} differs (max {(a - b).abs().max()})"


# ----------------------------------------------------------------------------------------------------
# the signatures mirror the ops', so the two cannot drift apart

@pytest.mark.parametrize("cls,fn", PAIRS, ids=[cls.__name__ for cls in MODULES])
def test_signature_mirrors_the_op(cls, fn):
    op = dict(inspect.signature(fn).parameters)
    if cls is SFDLoss:
        op = {("real_safe" if k == "real" else k): p for k, p in op.items()}
    init = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    fwd = {k: p for k, p in inspect.signature(cls.forward).parameters.items() if k != "self"}
    assert set(init) | set(fwd) == set(op), f"{cls.__name__} misses {set(op) - set(init) - set(fwd)} or adds " \
                                            f"{set(init) | set(fwd) - set(op)}"
    assert list(init) == [k for k in op if k in init], "constructor options are not in the op's order"
    for k, p in init.items():
        assert p.kind is p.KEYWORD_ONLY and p.default == op[k].default, f"{cls.__name__}({k}=...) vs the op's {op[k]}"
    for k, p in fwd.items():
        if k in init:  # a per-call override: None keeps the configured value
            assert k in cls._PER_CALL and p.default is None and p.kind is p.KEYWORD_ONLY, k
        else:
            assert (p.kind, p.default) == (op[k].kind, op[k].default), f"{cls.__name__}.forward {k}: {p} vs {op[k]}"
    assert [k for k in fwd if k not in init] == [k for k in op if k not in init], "forward is not in the op's order"
    assert fn.__name__ in cls.__doc__ and "forward(" in cls.__doc__


# ----------------------------------------------------------------------------------------------------
# configuration: errors at construction, overrides, repr, no state

@pytest.mark.parametrize("make,error,match", [
    (lambda: KDLoss(divergence="foo"), ValueError, r"^KDLoss: divergence='foo' is not one of forward_kl, reverse_kl"),
    (lambda: KDLoss(temperature=0.0), ValueError, r"^KDLoss: temperature must be > 0"),
    (lambda: KDLoss(beta=1.5), ValueError, r"^KDLoss: beta must be in \[0, 1\]"),
    (lambda: KDLoss(vocab="same"), ValueError, r"^KDLoss: vocab='same' is not one of exact, truncate, pad"),
    (lambda: KDLoss(lam=torch.tensor(0.5)), TypeError, r"^KDLoss: lam must be a plain value .* forward\(\.\.\., lam="),
    (lambda: FusedLinearKDLoss(divergence="skew_forward_kl", alpha=1.0), ValueError,
     r"^FusedLinearKDLoss: alpha must be < 1 for skew_forward_kl"),
    (lambda: FusedLinearKDLoss(topk_mode="tail"), ValueError, r"^FusedLinearKDLoss: topk_mode='tail' is not one of"),
    (lambda: TopKKDLoss(mode="renorm"), ValueError, r"^TopKKDLoss: mode='renorm' is not one of renorm_teacher"),
    (lambda: TopKKDLoss(gen_temperature=-1.0), ValueError, r"^TopKKDLoss: temperature and gen_temperature must be"),
    (lambda: DMDLoss(cfg="cfg++"), ValueError, r"^DMDLoss: cfg='cfg\+\+' is not one of ho, offset"),
    (lambda: DMDLoss(space="score"), ValueError, r"^DMDLoss: space='score' is not one of x0, eps, v, flow"),
    (lambda: DMDLoss(backend="gpu"), ValueError, r"^DMDLoss: backend='gpu' is not a backend; choose one of None, auto"),
    (lambda: SDSLoss(reduction="sum"), ValueError, r"^SDSLoss: reduction='sum' is not one of mean, batch"),
    (lambda: VSDLoss(space="score"), ValueError, r"^VSDLoss: space='score' is not one of"),
    (lambda: SiDLoss(nan_policy="skip"), ValueError, r"^SiDLoss: nan_policy='skip' is not one of propagate, drop"),
    (lambda: SFDLoss(cfg="x"), ValueError, r"^SFDLoss: cfg='x' is not one of"),
    (lambda: SIMLoss(a=torch.ones(3)), TypeError, r"^SIMLoss: a must be a plain value .* forward\(\.\.\., a="),
    (lambda: ConsistencyLoss(kind="l1"), ValueError, r"^ConsistencyLoss: kind='l1' is not one of l2, huber, pseudo"),
    (lambda: DSMLoss(target="score"), ValueError, r"^DSMLoss: target='score' is not one of eps, x0, v, flow"),
    (lambda: DSMLoss(reduction="batch"), ValueError, r"^DSMLoss: reduction='batch' is not one of mean, sum"),
    (lambda: AttentionKDLoss(reduction="batchmean"), ValueError, r"^AttentionKDLoss: reduction='batchmean' is not"),
    (lambda: DMDLoss(1.5), TypeError, r"positional"),  # configuration is keyword-only
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_configuration_fails_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_per_call_override_and_live_options():
    g = torch.Generator().manual_seed(99)
    x, real, fake, u = (randn(SHAPE, torch.float32, generator=g, shift=s) for s in (0.0, 0.3, -0.2, 0.1))
    loss = DMDLoss(guidance=2.0, backend="cpu")
    op = lambda w: fd.dmd_loss(x, real, fake, real_uncond=u, guidance=w, backend="cpu")  # noqa: E731
    assert torch.equal(loss(x, real, fake, real_uncond=u), op(2.0))
    assert torch.equal(loss(x, real, fake, real_uncond=u, guidance=5.0), op(5.0))
    assert loss.guidance == 2.0  # an override is for one call
    loss.guidance = 3.0  # options are plain attributes, read at every call
    assert torch.equal(loss(x, real, fake, real_uncond=u), op(3.0))
    assert loss.options()["guidance"] == 3.0
    with pytest.raises(ValueError, match=r"dmd_loss: guidance is given but real_uncond is None"):
        loss(x, real, fake)  # the op's own checks run at the call


def test_repr_shows_the_configuration():
    r = repr(KDLoss(divergence="jsd", temperature=2.0, backend="cpu"))
    assert r.startswith("KDLoss(divergence='jsd', temperature=2.0, t_squared=False, ")
    assert "backend='cpu')" in r
    assert repr(AttentionKDLoss(causal=True)) == \
        "AttentionKDLoss(causal=True, scale_s=None, scale_t=None, reduction='mean', backend=None)"
    model = nn.Sequential(nn.Linear(2, 2))
    model.loss = SIMLoss(c=0.5)
    assert "(loss): SIMLoss(guidance=None, fake_guidance=None, cfg='ho', a=1.0, c=0.5, " in repr(model)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_no_state(cls):
    loss = cls()
    assert loss.state_dict() == {} and list(loss.parameters()) == [] and list(loss.buffers()) == []
    assert copy.deepcopy(loss).options() == loss.options()
    holder = nn.Linear(3, 3)
    holder.loss = loss
    assert set(holder.state_dict()) == {"weight", "bias"}
    holder.to(torch.float64)  # moving the model leaves the loss's configuration alone
    assert loss.options() == cls().options()


# ----------------------------------------------------------------------------------------------------
# in a training loop, and under torch.compile

def test_tiny_dmd_training_loop():
    """A linear generator trained by DMDLoss in a toy: the teacher denoises everything to ``target``, the fake
    score returns the generated sample itself, so the DMD gradient (fake - real) / norm pulls every sample to
    ``target``: the distance must fall, with finite gradients at every step."""
    torch.manual_seed(0)
    gen = nn.Linear(8, 16)
    opt = torch.optim.Adam(gen.parameters(), lr=3e-2)
    loss_fn = DMDLoss(backend="cpu")
    target = torch.linspace(-1.0, 1.0, 16)
    z_eval = torch.randn(64, 8)
    dist = lambda: (gen(z_eval) - target).pow(2).mean().item()  # noqa: E731
    start = dist()
    for _ in range(40):
        x = gen(torch.randn(8, 8))
        with torch.no_grad():
            real, fake = target.expand_as(x).contiguous(), x.clone()
        loss = loss_fn(x, real, fake)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in gen.parameters())
        opt.step()
    assert dist() < 0.1 * start, (start, dist())


@pytest.mark.parametrize("case", ["dmd_eps_space_guidance_per_call", "kd"])
def test_compile_fullgraph_matches_eager(case):
    cls, _, config, args, per_call, grads = _case(case, torch.Generator().manual_seed(7))
    module = cls(**config, backend="cpu")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    want, want_grads = _run(module, args, per_call, grads)
    got, got_grads = _run(compiled, args, per_call, grads)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grads, want_grads, rtol=0, atol=0)
