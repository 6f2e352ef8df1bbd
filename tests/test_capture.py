"""engine.capture: the captured (GPU) or compiled (CPU) step trains exactly like the eager step.

The invariant (STYLE.md): N steps through ``capture`` from one seed give the losses and parameters of N
plain eager steps. On the CPU, eager mode must be bit-identical and compile mode equal within float32
rounding; the warm-up that compiles (and, on a GPU, records) the step must leave no trace. The GPU tests
(``-m gpu``) hold the CUDA-graph path to the same eager loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flashdistill as fd
from flashdistill.engine import Engine, Step, capture


# Under torch.compile, Adam takes its capturable path, which orders the bias corrections and eps
# differently: in float64, a plain torch.compile(step) (no flashdistill) already moves lr=1e-2 parameters
# by ~1e-7 from the eager step after 1-3 steps. A wrong roll-back moves them by ~lr = 1e-2.
_COMPILED_ADAM_ATOL = 1e-6


def _model(seed: int = 0, device="cpu", dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 6)).to(device, dtype)


def _make_step(model: nn.Module, opt: torch.optim.Optimizer, source: fd.NoiseSource):
    """A miniature distillation update: noise the batch, regress a fixed 'teacher', step the optimizer."""
    teacher = lambda x: torch.tanh(x) * 0.5  # noqa: E731

    def step(x0):
        opt.zero_grad(set_to_none=True)
        noise = source.randn(x0.shape, dtype=x0.dtype)
        x_t = 0.8 * x0 + 0.6 * noise
        loss = fd.consistency_loss(model(x_t), teacher(x_t))
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    return step


def _run(n, device, mode, *, opt_kwargs=None, **capture_kwargs):
    model = _model(device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **(opt_kwargs or {}))
    source = fd.NoiseSource(7, device=device)
    step = _make_step(model, opt, source)
    batches = [torch.randn(5, 6, generator=torch.Generator().manual_seed(100 + i)).to(device) for i in range(n)]
    if mode is not None:
        step = capture(step, batches[0], optimizers=[opt], sources=[source], mode=mode, verbose=False,
                       **capture_kwargs)
    losses = [step(b)["loss"].clone() for b in batches]
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], source.offset.clone()


def test_eager_mode_is_the_plain_loop_bit_for_bit():
    ref_losses, ref_params, ref_offset = _run(4, "cpu", None)
    losses, params, offset = _run(4, "cpu", "eager")
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert torch.equal(offset, ref_offset)


def test_auto_mode_on_cpu_is_eager(capsys):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = capture(_make_step(model, opt, fd.NoiseSource(1)), torch.randn(3, 6), optimizers=[opt])
    assert step.mode == "eager" and step.num_graphs == 0
    said = capsys.readouterr().err
    assert "eager on cpu" in said and "not fused=True" in said  # says once what it did, and the fused hint


@pytest.mark.parametrize("opt_kwargs", [{}, {"fused": True}])
def test_compile_mode_matches_eager_and_its_warmup_leaves_no_trace(opt_kwargs):
    """The compiling warm-up ran a real update (AdamW state created, noise drawn); all of it is rolled back."""
    ref_losses, ref_params, ref_offset = _run(3, "cpu", None, opt_kwargs=opt_kwargs)
    losses, params, offset = _run(3, "cpu", "compile", opt_kwargs=opt_kwargs,
                                  compile_options={"backend": "aot_eager"})
    assert torch.equal(offset, ref_offset)  # the warm-up's draw was rolled back: same noise stream
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rollback_restores_parameters_optimizer_state_sources_and_state():
    """Warm-up of a step whose optimizer already has state, plus an EMA copy in ``state``."""
    model = _model(dtype=torch.float64)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    source = fd.NoiseSource(3)
    gen = torch.Generator().manual_seed(5)

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss = (model(x + source.randn(x.shape, dtype=x.dtype)) ** 2).mean() + torch.rand((), generator=gen,
                                                                                              dtype=x.dtype)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.1)
        return {"loss": loss.detach()}

    x = torch.randn(4, 6, dtype=torch.float64)
    step(x)  # the optimizer now has state that the warm-up must put back, not zero
    twin_model, twin_ema = copy.deepcopy(model), copy.deepcopy(ema)
    twin_opt = torch.optim.AdamW(twin_model.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = [p.clone() for p in model.parameters()] + [p.clone() for p in ema.parameters()]
    offset, gen_state = source.offset.clone(), gen.get_state()

    captured = capture(Step(step, optimizers=(opt,), sources=(source, gen), state=(ema,)), x, mode="compile",
                       warmup=2, compile_options={"backend": "eager"}, verbose=False)
    after = [p for p in model.parameters()] + [p for p in ema.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert torch.equal(source.offset, offset) and torch.equal(gen.get_state(), gen_state)
    for p, tp in zip(model.parameters(), twin_model.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], twin_opt.state[tp][k]), k
    # and the next captured step is the twin's next eager step
    captured(x)
    twin_source, twin_gen = fd.NoiseSource(3), torch.Generator()
    twin_source.offset.copy_(offset)
    twin_gen.set_state(gen_state)
    twin_opt.zero_grad()
    loss = (twin_model(x + twin_source.randn(x.shape, dtype=x.dtype)) ** 2).mean() + torch.rand(
        (), generator=twin_gen, dtype=x.dtype)
    loss.backward()
    twin_opt.step()
    for p, tp in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, tp, rtol=0, atol=_COMPILED_ADAM_ATOL)


def test_fresh_optimizer_state_created_by_the_warmup_is_zeroed_in_place():
    """The graph reads the state tensors at fixed addresses, so the roll-back zeroes what it cannot delete;
    zero Adam state is a fresh Adam (step 0)."""
    model = _model(dtype=torch.float64)
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    x = torch.randn(4, 6, dtype=torch.float64)

    def make(m, o):
        def step(x):
            o.zero_grad(set_to_none=True)
            loss = (m(x) ** 2).mean()
            loss.backward()
            o.step()
            return loss.detach()
        return step

    captured = capture(make(model, opt), x, optimizers=[opt], mode="compile", warmup=3,
                       compile_options={"backend": "eager"}, verbose=False)
    state_ids = {id(v) for st in opt.state.values() for v in st.values()}
    eager = make(twin, twin_opt)
    for _ in range(3):
        torch.testing.assert_close(captured(x), eager(x), rtol=0, atol=_COMPILED_ADAM_ATOL)
    assert state_ids == {id(v) for st in opt.state.values() for v in st.values()}  # same tensors, not new ones
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=_COMPILED_ADAM_ATOL)


def test_restore_false_keeps_the_warmup_as_training_steps():
    model = _model()
    before = [p.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    capture(_make_step(model, opt, fd.NoiseSource(0)), torch.randn(3, 6), optimizers=[opt], mode="compile",
            warmup=1, restore=False, compile_options={"backend": "eager"}, verbose=False)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_one_engine_captures_several_steps():
    """A DMD2-shaped pair: two steps, two optimizers, one engine."""
    engine = Engine(mode="eager", verbose=False)
    a, b = _model(1), _model(2)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    src = fd.NoiseSource(0)
    step_a = engine.capture(_make_step(a, opt_a, src), torch.randn(2, 6), optimizers=[opt_a], name="a")
    step_b = engine.capture(_make_step(b, opt_b, src), torch.randn(2, 6), optimizers=[opt_b], name="b")
    assert repr(step_a) == "CapturedStep(a, mode=eager, graphs=0)" and step_b.name == "b"
    assert step_a(torch.randn(2, 6))["loss"].shape == ()


def test_errors_name_the_op_and_the_argument():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = _make_step(model, opt, fd.NoiseSource(0))
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"capture\(step\): mode='graph' records a CUDA graph.*cpu"):
        capture(step, x, optimizers=[opt], mode="graph", verbose=False)
    with pytest.raises(ValueError, match="mode='fast' is not one of auto, graph, compile, eager"):
        capture(step, x, mode="fast")
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        capture(step, x, warmup=-1)
    with pytest.raises(TypeError, match="optimizers must be torch.optim.Optimizer objects, got Sequential"):
        capture(step, x, optimizers=[model], verbose=False)
    with pytest.raises(TypeError, match="sources must be flashdistill.NoiseSource or torch.Generator"):
        capture(step, x, sources=[3], verbose=False)
    with pytest.raises(TypeError, match="step must be a function"):
        capture(3, x)
    with pytest.raises(ValueError, match="a Step carries its own optimizers"):
        capture(Step(step, optimizers=(opt,)), x, optimizers=[opt])
    with pytest.raises(ValueError, match="Step: every must be an int >= 1"):
        Step(step, every=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_on_another_device_than_the_parameters_is_an_error():
    model = _model(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="must be on one device"):
        capture(_make_step(model, opt, fd.NoiseSource(0)), torch.randn(2, 6), optimizers=[opt], verbose=False)


# ---- CUDA graphs -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_graph_steps_equal_eager_steps(fused):
    """N replays of the captured step == N eager steps from the same seed (fresh noise at every replay)."""
    kw = {"fused": True} if fused else {"capturable": True}
    lr = torch.tensor(1e-2, device="cuda")
    ref_losses, ref_params, ref_offset = _run(6, "cuda", None, opt_kwargs=dict(kw, lr=lr.clone()))
    losses, params, offset = _run(6, "cuda", "graph", opt_kwargs=dict(kw, lr=lr.clone()))
    assert torch.equal(offset, ref_offset)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(set(losses.tolist())) == len(losses)  # each replay drew new noise and saw a new batch


@pytest.mark.gpu
def test_graph_buckets_share_one_pool_and_lr_schedules_reach_the_graph():
    model = _model(device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    step = capture(_make_step(model, opt, fd.NoiseSource(0, device="cuda")), torch.randn(4, 6, device="cuda"),
                   optimizers=[opt], verbose=False)
    step(torch.randn(4, 6, device="cuda"))
    step(torch.randn(8, 6, device="cuda"))  # a new bucket
    assert step.num_graphs == 2
    sched.step()  # lr -> 0 in place: the next replay must not move the parameters
    before = [p.clone() for p in model.parameters()]
    step(torch.randn(4, 6, device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.gpu
def test_a_host_sync_fails_in_the_warmup_with_a_clear_message():
    model = _model(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    with pytest.raises(RuntimeError, match=r"capture\(step\): the step synchronizes with the host"):
        capture(step, torch.randn(2, 6, device="cuda"), optimizers=[opt], verbose=False)


@pytest.mark.gpu
def test_an_uncapturable_optimizer_is_refused_before_capture():
    model = _model(device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="capturable=False and fused=False"):
        capture(_make_step(model, opt, fd.NoiseSource(0, device="cuda")), torch.randn(2, 6, device="cuda"),
                optimizers=[opt], verbose=False)




def test_a_step_without_tensor_inputs_copies_nothing():
    """An unconditional recipe step takes only cond=None: there is nothing to copy into the graph (an empty
    torch._foreach_copy_ raises), and the key holds the None."""
    from flashdistill.engine.runtime import _copy_into

    _copy_into([], [])
    a, b = torch.zeros(3), torch.arange(3.0)
    _copy_into([a], [b])
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_graph_of_an_unconditional_step():
    model = _model(device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    source = fd.NoiseSource(0, device="cuda")

    def step(cond=None):
        opt.zero_grad(set_to_none=True)
        loss = model(source.randn((4, 6))).square().mean()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    captured = capture(step, None, optimizers=[opt], sources=[source], verbose=False)
    first, second = captured(None)["loss"].clone(), captured(None)["loss"].clone()
    assert captured.num_graphs == 1 and not torch.equal(first, second)  # fresh noise at every replay
