"""Score-distillation losses, forward + backward: eager reference vs torch.compile vs flashdistill backends.

One timed run per case: the loss, then ``loss.backward()``; every input that requires grad is a leaf
whose ``.grad`` is set to None before each run (untimed), so the gradients are allocated inside it.

Cases (``--ops`` takes a case name, or an op name for all of its cases):

    case                op                  tensors (N elements each; * = requires grad)   reads writes
    dmd                 dmd_loss            x*, real, fake, real_uncond; guidance 1.75       4     1
    dmd_eps             dmd_loss            x*, real, fake, real_uncond, x_t; eps            5     1
                                            predictions, alpha, sigma [B] (VP), CFG 1.75
    sds                 sds_loss            x*, pred, pred_uncond, noise; guidance 7.5,      4     1
                                            weight [B]
    vsd                 vsd_loss            x*, real, real_uncond, fake, fake_uncond;        5     1
                                            guidance 4.5 on the teacher, 1.5 on the fake
                                            (SwiftBrush: CFG on both)
    sid                 sid_loss            x*, real*, fake*; alpha 1.2                      3     3
    sid_lsg             sid_loss            x*, real*, real_uncond*, fake*, fake_uncond*;    5     5
                                            guidance 1.5 on both (SiD-LSG), alpha 1.0
    sim                 sim_loss            x*, real*, fake*; a [B], c 1.0                   3     3
    consistency_l2      consistency_loss    pred*, target; kind "l2"                         2     1
    consistency_phuber  consistency_loss    pred*, target; kind "pseudo_huber" (iCT c),      2     1
                                            weight [B]
    dsm_eps             dsm_loss            pred*, noise (x0 given, unused); target "eps"    2     1
    dsm_v               dsm_loss            pred*, x0, noise; target "v", alpha, sigma [B]   3     1

impls, in the same run and on the same inputs:
    eager               the paper-level plain-PyTorch function of the op's reference.py
                        (kernels/score_diff/reference.py: dmd_loss, sds_loss, vsd_loss;
                        kernels/score_identity/reference.py: sid_loss, sim_loss;
                        kernels/regression/reference.py: consistency_loss, dsm_loss); dmd_eps passes
                        it x_t and the per-sample (A, C) of x0 = A x_t + C pred, computed untimed
    compile             torch.compile of that same function (inductor, static shapes; compiled untimed)
    flashdistill:NAME   the public op with backend=NAME for each available backend, except "reference"
                        (that is eager) and "triton" on the CPU (interpreter timings mean nothing)
                        unless asked for with --backends

Bytes model (the floor): the minimal fused traffic, each full-size input the loss depends on read once
and each gradient written once: (reads + writes) x N x element size (the table above; [B] tensors are
not counted). The fused K2/K3 backwards re-read their inputs; that re-read is not in the floor.

Shapes: SD latent (64,4,64,64) and video latent (4,16,16,60,104); fp32 on the CPU, bf16 on CUDA.

    python benchmarks/bench_score_losses.py                       # CPU: fp32, 11 cases x 2 shapes, ~6-10 min
    python benchmarks/bench_score_losses.py --quick --check       # SD latent only, < 1 min (warm inductor cache)
    python benchmarks/bench_score_losses.py --ops sid,dsm --shapes 64x4x64x64 --no-compile
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "score_losses"
SHAPES = [(64, 4, 64, 64), (4, 16, 16, 60, 104)]  # SD latent; video latent (e.g. Wan/CogVideoX-like)
QUICK_SHAPES = [(64, 4, 64, 64)]


def log(msg: str) -> None:
    harness.log(f"[{NAME}] {msg}")


def import_flashdistill():
    """Lazily: the harness and --help work without the package; a missing build is one clear message."""
    try:
        import flashdistill
        from flashdistill.kernels import params
        from flashdistill.kernels.regression import reference as reg_ref
        from flashdistill.kernels.score_diff import reference as diff_ref
        from flashdistill.kernels.score_identity import reference as ident_ref
    except ImportError as e:
        raise SystemExit(f"bench_score_losses: cannot import flashdistill ({e}); from the repo root: "
                         "pip install -e .") from e
    return flashdistill, params, diff_ref, ident_ref, reg_ref


# ----------------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    """One benchmark case: which tensors it needs and how each impl is called on them.

    ``full``: names of the N-element tensors, in argument order; ``grad``: those that require grad.
    ``small(B, cd, device, gen)``: dict of per-sample [B] tensors (and other small constants).
    ``ref``: the reference function (eager; compiled for "compile"); ``call_ref(fn, t)`` and
    ``call_fd(fn, t)`` call it / the public op ``fd_op`` (with backend bound) on the dict ``t``.
    """

    key: str
    op: str  # public op name without "_loss": the --ops family
    variant: str  # shown in the CSV case column
    full: tuple[str, ...]
    grad: tuple[str, ...]
    reads: int  # full-size tensors the loss depends on (the floor)
    ref: Callable
    fd_op: Callable
    call_ref: Callable[[Callable, dict], torch.Tensor]
    call_fd: Callable[[Callable, dict], torch.Tensor]
    small: Callable[..., dict] = lambda B, cd, device, gen: {}

    @property
    def writes(self) -> int:
        return len(self.grad)


def _vp_schedule(B, cd, device, gen):
    """Per-sample alpha, sigma of a VP schedule at t ~ U(0.02, 0.98) (alpha^2 + sigma^2 = 1)."""
    t = 0.02 + 0.96 * torch.rand(B, generator=gen, device=device, dtype=torch.float64)
    abar = torch.cos(0.5 * torch.pi * t) ** 2
    return abar.sqrt().to(cd), (1 - abar).sqrt().to(cd)


def make_cases(fd, params, diff_ref, ident_ref, reg_ref) -> list[Case]:
    G = 1.75

    def dmd_eps_small(B, cd, device, gen):
        alpha, sigma = _vp_schedule(B, cd, device, gen)
        A, C = params.x0_coefficients("bench", "eps", alpha, sigma, B, device)  # float64, as the op
        return {"alpha": alpha, "sigma": sigma, "coef": torch.stack([A, C], dim=1).to(cd)}

    def sds_small(B, cd, device, gen):
        _, sigma = _vp_schedule(B, cd, device, gen)
        return {"weight": sigma * sigma}  # DreamFusion's w(t) = sigma_t^2

    def sim_small(B, cd, device, gen):
        sigma = torch.exp(torch.randn(B, generator=gen, device=device, dtype=torch.float64) * 1.2 - 1.2)
        return {"a": (1.0 / (1.0 + sigma) ** 4).to(cd)}  # ~1/sigma^4 (EDM), kept finite for small sigma

    def phuber_small(B, cd, device, gen):
        dt = 0.01 + torch.rand(B, generator=gen, device=device, dtype=torch.float64) * 0.2
        return {"weight": (1.0 / dt).to(cd)}  # ECT / iCT lambda = 1 / (t - r)

    def dsm_v_small(B, cd, device, gen):
        alpha, sigma = _vp_schedule(B, cd, device, gen)
        return {"alpha": alpha, "sigma": sigma}

    return [
        Case("dmd", "dmd", f"cfg={G}", ("x", "real", "fake", "real_uncond"), ("x",), 4, diff_ref.dmd_loss,
             fd.dmd_loss,
             lambda f, t: f(t["x"], t["real"], t["fake"], real_uncond=t["real_uncond"], guidance=G),
             lambda f, t: f(t["x"], t["real"], t["fake"], real_uncond=t["real_uncond"], guidance=G)),
        Case("dmd_eps", "dmd", f"eps cfg={G}", ("x", "real", "fake", "real_uncond", "x_t"), ("x",), 5,
             diff_ref.dmd_loss, fd.dmd_loss,
             lambda f, t: f(t["x"], t["real"], t["fake"], real_uncond=t["real_uncond"], guidance=G,
                            x_t=t["x_t"], coef=t["coef"]),
             lambda f, t: f(t["x"], t["real"], t["fake"], real_uncond=t["real_uncond"], guidance=G,
                            space="eps", x_t=t["x_t"], alpha=t["alpha"], sigma=t["sigma"]),
             dmd_eps_small),
        Case("sds", "sds", "cfg=7.5 w=[B]", ("x", "pred", "pred_uncond", "noise"), ("x",), 4, diff_ref.sds_loss,
             fd.sds_loss,
             lambda f, t: f(t["x"], t["pred"], t["noise"], pred_uncond=t["pred_uncond"], guidance=7.5,
                            weight=t["weight"]),
             lambda f, t: f(t["x"], t["pred"], t["noise"], pred_uncond=t["pred_uncond"], guidance=7.5,
                            weight=t["weight"]),
             sds_small),
        Case("vsd", "vsd", "cfg=4.5/1.5", ("x", "real", "real_uncond", "fake", "fake_uncond"), ("x",), 5,
             diff_ref.vsd_loss, fd.vsd_loss,
             lambda f, t: f(t["x"], t["real"], t["fake"], real_uncond=t["real_uncond"], guidance=4.5,
                            fake_uncond=t["fake_uncond"], fake_guidance=1.5),
             lambda f, t: f(t["x"], t["real"], t["fake"], real_uncond=t["real_uncond"], guidance=4.5,
                            fake_uncond=t["fake_uncond"], fake_guidance=1.5)),
        Case("sid", "sid", "alpha=1.2", ("x", "real", "fake"), ("x", "real", "fake"), 3, ident_ref.sid_loss,
             fd.sid_loss,
             lambda f, t: f(t["x"], t["real"], t["fake"], alpha=1.2),
             lambda f, t: f(t["x"], t["real"], t["fake"], alpha=1.2)),
        Case("sid_lsg", "sid", "lsg cfg=1.5/1.5 alpha=1.0", ("x", "real", "real_uncond", "fake", "fake_uncond"),
             ("x", "real", "real_uncond", "fake", "fake_uncond"), 5, ident_ref.sid_loss, fd.sid_loss,
             lambda f, t: f(t["x"], t["real"], t["fake"], r_uncond=t["real_uncond"], f_uncond=t["fake_uncond"],
                            guidance_real=1.5, guidance_fake=1.5, alpha=1.0),
             lambda f, t: f(t["x"], t["real"], t["fake"], real_uncond=t["real_uncond"], guidance=1.5,
                            fake_uncond=t["fake_uncond"], fake_guidance=1.5, alpha=1.0)),
        Case("sim", "sim", "a=[B] c=1", ("x", "real", "fake"), ("x", "real", "fake"), 3, ident_ref.sim_loss,
             fd.sim_loss,
             lambda f, t: f(t["x"], t["real"], t["fake"], a=t["a"], c=1.0),
             lambda f, t: f(t["x"], t["real"], t["fake"], a=t["a"], c=1.0),
             sim_small),
        Case("consistency_l2", "consistency", "l2", ("pred", "target"), ("pred",), 2, reg_ref.consistency_loss,
             fd.consistency_loss,
             lambda f, t: f(t["pred"], t["target"], kind="l2"),
             lambda f, t: f(t["pred"], t["target"], kind="l2")),
        Case("consistency_phuber", "consistency", "pseudo_huber w=[B]", ("pred", "target"), ("pred",), 2,
             reg_ref.consistency_loss, fd.consistency_loss,
             # the reference has no default c; the op's default for pseudo_huber is iCT's 0.00054 sqrt(D)
             lambda f, t: f(t["pred"], t["target"], kind="pseudo_huber", c=0.00054 * t["pred"][0].numel() ** 0.5,
                            weight=t["weight"]),
             lambda f, t: f(t["pred"], t["target"], kind="pseudo_huber", c=0.00054 * t["pred"][0].numel() ** 0.5,
                            weight=t["weight"]),
             phuber_small),
        Case("dsm_eps", "dsm", "eps", ("pred", "x0", "noise"), ("pred",), 2, reg_ref.dsm_loss, fd.dsm_loss,
             lambda f, t: f(t["pred"], t["x0"], t["noise"], target="eps"),
             lambda f, t: f(t["pred"], t["x0"], t["noise"], target="eps")),
        Case("dsm_v", "dsm", "v", ("pred", "x0", "noise"), ("pred",), 3, reg_ref.dsm_loss, fd.dsm_loss,
             lambda f, t: f(t["pred"], t["x0"], t["noise"], target="v", alpha=t["alpha"], sigma=t["sigma"]),
             lambda f, t: f(t["pred"], t["x0"], t["noise"], target="v", alpha=t["alpha"], sigma=t["sigma"]),
             dsm_v_small),
    ]


def select_cases(cases: list[Case], text: str | None) -> list[Case]:
    if not text:
        return cases
    want = [w.strip() for w in text.split(",") if w.strip()]
    known = {c.key for c in cases} | {c.op for c in cases}
    unknown = [w for w in want if w not in known]
    if unknown:
        raise SystemExit(f"bench_score_losses: unknown --ops {', '.join(unknown)}; cases: "
                         f"{', '.join(c.key for c in cases)}; ops: {', '.join(dict.fromkeys(c.op for c in cases))}")
    return [c for c in cases if c.key in want or c.op in want]


# ----------------------------------------------------------------------------------------------------
# Impls and inputs


def make_step(call: Callable, fn: Callable, names: tuple[str, ...]):
    """The timed run: loss, then backward. Inputs come positionally (the pool's tuple): full tensors
    in ``names`` order, then the dict of small ones."""

    def step(*args):
        call(fn, dict(zip(names, args[:-1]), **args[-1])).backward()

    return step


def reset_grads(*args):
    for t in args[:-1]:
        t.grad = None


def loss_and_grads(call, fn, case: Case, t: dict) -> list[torch.Tensor]:
    """[loss, grad per case.grad name] in float64, on fresh leaves (the inputs are left untouched)."""
    t = {k: (v.detach().clone().requires_grad_(k in case.grad) if k in case.full else v) for k, v in t.items()}
    loss = call(fn, t)
    loss.backward()
    return [loss.detach().double()] + [t[k].grad.double() for k in case.grad]


def check(bench: harness.Bench, label: str, case: Case, impls: dict, t: dict, dtype: torch.dtype) -> set[str]:
    """harness.check_impls on this case's inputs ``t``: each impl's loss and gradients against the float64
    reference (--check). Returns the impls that failed (recorded in ``bench``, not timed)."""
    ref64 = loss_and_grads(case.call_ref, case.ref, case, {k: harness.as_float64(v) for k, v in t.items()})
    return harness.check_impls(bench, label, dtype, impls, lambda impl: loss_and_grads(*impl, case, t), ref64,
                               ["loss"] + [f"d{k}" for k in case.grad])


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = harness.make_parser(__doc__)
    parser.add_argument("--ops", default=None, help="comma list of cases or ops (e.g. dmd,sid_lsg,dsm; default: all)")
    parser.add_argument("--shapes", default=None, help="comma list like 64x4x64x64,4x16x16x60x104 (default: those two)")
    parser.add_argument("--check", action="store_true", help="assert every impl's loss and grads match the reference first")
    cfg = harness.parse_config(parser, argv)
    a = cfg.args
    fd, params, diff_ref, ident_ref, reg_ref = import_flashdistill()
    device, dtype = cfg.device, cfg.dtype_or(cpu=torch.float32, cuda=torch.bfloat16)
    cd = torch.float64 if dtype == torch.float64 else torch.float32  # the ops' compute dtype
    shapes = harness.parse_shapes(a.shapes) if a.shapes else (QUICK_SHAPES if cfg.quick else SHAPES)
    cases = select_cases(make_cases(fd, params, diff_ref, ident_ref, reg_ref), a.ops)
    backends = harness.choose_backends(fd, cfg, "score_losses")
    bench = harness.Bench(NAME, cfg)

    compiled = {}  # one torch.compile wrapper per reference function; it recompiles per shape / case
    if cfg.compile:
        # 11 cases x shapes recompile the same few functions; the default limit (8) would fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for c in cases:
            compiled.setdefault(c.ref, torch.compile(c.ref, dynamic=False))  # static: one graph per shape

    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        n, es = torch.Size(shape).numel(), torch.empty((), dtype=dtype).element_size()
        for case in cases:
            label = "x".join(map(str, shape)) + f" {case.key} {case.variant}"
            nbytes = (case.reads + case.writes) * n * es
            impls: dict[str, tuple[Callable, Callable]] = {"eager": (case.call_ref, case.ref)}
            if case.ref in compiled:
                impls["compile"] = (case.call_ref, compiled[case.ref])
            for b in backends:
                impls[f"flashdistill:{b}"] = (case.call_fd, functools.partial(case.fd_op, backend=b))

            def randn():
                return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

            base = {k: randn() for k in case.full}
            small = case.small(shape[0], cd, device, gen)

            def factory(base=base, small=small, case=case):
                return tuple(base[k].clone().requires_grad_(k in case.grad) for k in case.full) + (small,)

            # inputs + gradients of one run must be evicted between two uses of a copy
            copy_bytes = (len(case.full) + case.writes) * n * es
            inputs = bench.make_inputs(factory, copy_bytes)
            log(f"{label} {harness.dtype_name(dtype)}: N={n:,}, bytes model {nbytes / 1e6:.1f} MB "
                f"({case.reads} reads + {case.writes} writes); {inputs.plan.why}")
            del base

            first = inputs.first()
            notes = {"compile": bench.first_call(label, impls,
                                                 lambda fn: make_step(*fn, case.full)(*first),
                                                 reset=lambda: reset_grads(*first))}
            if a.check:
                t = dict(zip(case.full, first[:-1]), **first[-1])
                for name in check(bench, label, case, impls, t, dtype):
                    del impls[name]

            for name, (call, fn) in impls.items():
                bench.time(case=label, dtype=dtype, impl=name, fn=make_step(call, fn, case.full), inputs=inputs,
                           nbytes=nbytes, setup=reset_grads, note=notes.get(name, ""))  # fmt: skip
            del inputs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    bench.finish()
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
