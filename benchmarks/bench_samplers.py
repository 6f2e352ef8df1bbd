"""Sampler steps and noising (issue #5), forward only: eager PyTorch vs torch.compile vs flashdistill.

Sampler steps are inference, and q_sample is timed forward only too: one timed run is one call of the
step on the case's inputs, output allocated inside it. Every impl starts from the same inputs: the
full-size tensors below and the per-sample times (int64 timesteps t, t_prev [B] on a VPSchedule, or
sigma, sigma_next [B]); every impl computes its per-sample coefficients from those inside the timed
run (eager and compile as a few [B]-sized torch ops, flashdistill in the op's Python wrapper), so the
fixed per-call cost of that is part of each time.

Cases (``--ops`` takes a comma list of them):

    case            what                                                   tensors (N elements)   reads writes
    randn           N standard normals; flashdistill.randn(shape, seed=,    -                        0     1
                    offset=0-d tensor) vs torch.randn (no compile row:
                    compiling one randn call is pointless)
    q_sample        x_t = alpha_t x0 + sigma_t eps, eps drawn (flashdistill  x0                       1     1
                    in-kernel from its Philox stream; eager torch.randn_like),
                    alpha, sigma from t [B] on the VPSchedule
    q_sample_given  the same with eps given                                 x0, eps                  2     1
    ddim_cfg        DDIM eta = 0 with classifier-free guidance 7.5 on eps   x, cond, uncond          3     1
                    predictions, per-sample t -> t_prev = t - 20 (-1: the
                    final step, alpha_bar = 1)
    ddim_eta1       DDIM eta = 1 (noise drawn; in-kernel for flashdistill),  x, pred                  2     1
                    no guidance
    euler           EDM Euler, x0 (denoiser) prediction, per-sample sigma   x, denoised              2     1
                    -> sigma_next on a 40-step Karras grid (EDMSchedule)
    flow_euler      rectified-flow Euler x + (sigma_next - sigma) v,        x, cond, uncond          3     1
                    v = uncond + 3.5 (cond - uncond); per-sample sigmas on a
                    28-step shift-3 grid (FlowSchedule, SD3)
    loop4           a whole 4-step DDIM loop with guidance 7.5 ("trailing"  x                       16    12
                    timesteps 999, 749, 499, 249), the model a stand-in of
                    two elementwise passes (cond = x / 2, uncond = x / 4):
                    eager's loop of ddim_cfg steps vs flashdistill.sample;
                    on CUDA the graph rows are issue #5's "4-step loop
                    captured as one graph" against the eager (event) rows

The VP schedule is Stable Diffusion's: VPSchedule(1000, "scaled_linear", 0.00085, 0.012).

impls, in the same run and on the same inputs:
    eager               plain PyTorch, written the way diffusers / k-diffusion compute it: the guidance
                        combine uncond + w (cond - uncond) first (the pipeline's step), then the
                        scheduler's formula with per-sample coefficient tensors broadcast, e.g. DDIM:
                        x0 = (x - sqrt(1 - ab) eps) / sqrt(ab); x_prev = sqrt(ab_prev) x0
                        + sqrt(1 - ab_prev - std^2) eps (+ std z); noise from torch.randn(_like)
    compile             torch.compile of that same eager function (inductor, static shapes; compiled
                        untimed; its noise comes from inductor's own RNG)
    flashdistill:NAME   the public op (randn, q_sample, ddim_step, euler_step, flow_euler_step) with
                        backend=NAME for each available backend, except "reference" and "triton" on the
                        CPU unless asked for with --backends

Bytes model (the floor): what one fused kernel must move, each full-size input read once and the output
written once: (reads + writes) x N x element size (the table; [B] tensors not counted). Drawn noise
costs no traffic (it is made in registers), so randn is 1 pass and q_sample 2, but both are compute-
bound on the CPU (Philox + Box-Muller: ~1 ns per normal per core), not bandwidth-bound.

--check (before timing): every impl's output against the float64 run of the eager formula, with
harness.check_impls (budget 2 x eager's own fp error + a dtype floor). Cases that draw noise cannot be
compared with eager element by element (other random numbers), so for them the reference is the eager
formula fed the SAME noise flashdistill draws: the spec stream, flashdistill.randn(shape, seed=SEED,
offset=OFFSET, dtype=float64, backend="reference") (kernels/rng/reference.py, exact Philox words and
float64 Box-Muller; computed once per shape, ~6 s at 4 M elements), in float64 for the reference and
rounded to the bench dtype for the "eager" error that sets the budget; flashdistill's in-kernel draw of
(SEED, OFFSET) is then held to it. compile rows of those cases are not checked (inductor's RNG stream).

Shapes: an SD 1024px-latent batch (64,4,128,128) and a video latent (1,16,21,60,104) (issue #5);
fp32 on the CPU, bf16 on CUDA. --quick: (64,4,64,64) only.

Output: the harness's markdown table and CSV rows (benchmark "samplers"), then a summary per case:
flashdistill vs eager and vs compile against issue #5's CPU targets (>= 3x eager, >= 1.2x compile).

    python benchmarks/bench_samplers.py                      # CPU: fp32, 7 cases x 2 shapes, ~1.5-2 min
    python benchmarks/bench_samplers.py --quick --check      # (64,4,64,64) only, < 1 min
    python benchmarks/bench_samplers.py --ops ddim_cfg,euler --shapes 2x4x8x8 --cold none --no-csv
                                                             # tiny shape: the fixed per-call costs
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "samplers"
SHAPES = [(64, 4, 128, 128), (1, 16, 21, 60, 104)]  # SD 1024px latents x 64; a video latent (issue #5)
QUICK_SHAPES = [(64, 4, 64, 64)]
SEED, OFFSET = 1234, 7  # the Philox stream flashdistill draws from (offset as a 0-d int64 tensor)
G_DDIM, G_FLOW, ETA = 7.5, 3.5, 1.0
DDIM_STRIDE = 20  # 1000 / 50 steps
EULER_STEPS, FLOW_STEPS, FLOW_SHIFT = 40, 28, 3.0

# issue #5's CPU targets for every fused step
TARGET_EAGER, TARGET_COMPILE = 3.0, 1.2


def log(msg: str) -> None:
    harness.log(f"[{NAME}] {msg}")


def import_flashdistill():
    return harness.import_flashdistill("bench_samplers")


# ----------------------------------------------------------------------------------------------------
# eager: the formulas as diffusers / k-diffusion compute them (per-sample coefficient tensors broadcast)


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] coefficient in x's dtype, shaped to broadcast against x [B, ...]."""
    return v.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def _abar(t: dict):
    """alpha_bar at t and t_prev ([B] float64 from the schedule's table; t_prev = -1: alpha_bar = 1)."""
    table = t["table"]
    ab = table[t["t"]]
    abp = torch.where(t["t_prev"] >= 0, table[t["t_prev"].clamp(min=0)], torch.ones_like(ab))
    return ab, abp


def randn_eager(t: dict) -> torch.Tensor:
    return torch.randn(t["shape"], dtype=t["dtype"], device=t["device"])


def randn_given(t: dict, noise: torch.Tensor) -> torch.Tensor:
    return noise


def q_sample_given(t: dict, noise: torch.Tensor) -> torch.Tensor:
    x0 = t["x0"]
    ab = t["table"][t["t"]]
    return _b(ab.sqrt(), x0) * x0 + _b((1 - ab).sqrt(), x0) * noise


def q_sample_eager(t: dict) -> torch.Tensor:
    return q_sample_given(t, torch.randn_like(t["x0"]))


def q_sample_given_eager(t: dict) -> torch.Tensor:
    return q_sample_given(t, t["eps"])


def ddim_cfg_eager(t: dict) -> torch.Tensor:
    x, cond, uncond = t["x"], t["cond"], t["uncond"]
    eps = uncond + G_DDIM * (cond - uncond)  # the pipeline's guidance
    ab, abp = _abar(t)  # the scheduler's step, eta = 0
    x0 = (x - _b((1 - ab).sqrt(), x) * eps) / _b(ab.sqrt(), x)
    return _b(abp.sqrt(), x) * x0 + _b((1 - abp).sqrt(), x) * eps


def ddim_eta_given(t: dict, noise: torch.Tensor) -> torch.Tensor:
    x, eps = t["x"], t["pred"]
    ab, abp = _abar(t)
    std = ETA * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()  # diffusers' eta * sqrt(variance)
    x0 = (x - _b((1 - ab).sqrt(), x) * eps) / _b(ab.sqrt(), x)
    direction = _b((1 - abp - std**2).clamp(min=0).sqrt(), x) * eps  # clamp: [B]-sized, rounding only
    return _b(abp.sqrt(), x) * x0 + direction + _b(std, x) * noise


def ddim_eta1_eager(t: dict) -> torch.Tensor:
    return ddim_eta_given(t, torch.randn_like(t["x"]))


def euler_eager(t: dict) -> torch.Tensor:
    x, den, s, sn = t["x"], t["denoised"], t["sigma"], t["sigma_next"]
    d = (x - den) / _b(s, x)  # k-diffusion's to_d
    return x + d * _b(sn - s, x)


LOOP_STEPS = 4


@torch.compiler.disable  # opaque to inductor, as a real network is: else compile fuses it into the steps
def toy_model(x: torch.Tensor, t: torch.Tensor):
    """The loop's stand-in network: (cond, uncond) from two elementwise passes, so the loop's time is
    mostly the sampler's own (the model's traffic: read x, write both, per step)."""
    return x * 0.5, x * 0.25


def loop4_eager(t: dict) -> torch.Tensor:
    x, table = t["x"], t["table"]
    B, T = x.shape[0], table.shape[0]
    grid = (T - 1 - torch.arange(LOOP_STEPS, device=x.device, dtype=torch.float64) * (T / LOOP_STEPS)).round().long()
    for i in range(LOOP_STEPS):
        tt = grid[i].expand(B)
        tp = (grid[i + 1] if i + 1 < LOOP_STEPS else torch.tensor(-1, device=x.device)).expand(B)
        cond, uncond = toy_model(x, tt)
        x = ddim_cfg_eager({"x": x, "cond": cond, "uncond": uncond, "table": table, "t": tt, "t_prev": tp})
    return x


def flow_euler_eager(t: dict) -> torch.Tensor:
    x, cond, uncond = t["x"], t["cond"], t["uncond"]
    v = uncond + G_FLOW * (cond - uncond)
    return x + _b(t["sigma_next"] - t["sigma"], x) * v


# ----------------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    """``full``: names of the N-element inputs, in argument order. ``eager(t)`` is timed as eager and
    compiled for compile; ``fd(t, backend)`` calls the public op; ``t`` is the dict of full tensors and
    the per-sample ones (``small``). ``given(t, noise)``: for cases that draw noise, the eager formula
    with the noise given (the --check reference); None for the others."""

    key: str
    variant: str
    full: tuple[str, ...]
    reads: int
    eager: Callable[[dict], torch.Tensor]
    fd: Callable[[dict, str], torch.Tensor]
    small: str  # "vp" | "euler" | "flow" | "loop" | "none"
    given: Optional[Callable[[dict, torch.Tensor], torch.Tensor]] = None
    compile: bool = True
    writes: int = 1

    @property
    def drawn(self) -> bool:
        return self.given is not None


def make_cases(fd, sched) -> list[Case]:
    off = lambda t: t["off"]  # noqa: E731
    return [
        Case("randn", "N(0,1)", (), 0, randn_eager,
             lambda t, b: fd.randn(t["shape"], seed=SEED, offset=off(t), dtype=t["dtype"], device=t["device"],
                                   backend=b),
             "none", given=randn_given, compile=False),
        Case("q_sample", "drawn eps, VP t=[B]", ("x0",), 1, q_sample_eager,
             lambda t, b: fd.q_sample(t["x0"], t["t"], sched, seed=SEED, offset=off(t), backend=b),
             "vp", given=q_sample_given),
        Case("q_sample_given", "given eps, VP t=[B]", ("x0", "eps"), 2, q_sample_given_eager,
             lambda t, b: fd.q_sample(t["x0"], t["t"], sched, noise=t["eps"], backend=b), "vp"),
        Case("ddim_cfg", f"eta=0 cfg={G_DDIM} eps t=[B]", ("x", "cond", "uncond"), 3, ddim_cfg_eager,
             lambda t, b: fd.ddim_step(t["cond"], t["x"], t["t"], t["t_prev"], sched, uncond=t["uncond"],
                                       guidance=G_DDIM, backend=b),
             "vp"),
        Case("ddim_eta1", f"eta={ETA:g} eps t=[B]", ("x", "pred"), 2, ddim_eta1_eager,
             lambda t, b: fd.ddim_step(t["pred"], t["x"], t["t"], t["t_prev"], sched, eta=ETA, seed=SEED,
                                       offset=off(t), backend=b),
             "vp", given=ddim_eta_given),
        Case("euler", "EDM x0 sigma=[B]", ("x", "denoised"), 2, euler_eager,
             lambda t, b: fd.euler_step(t["denoised"], t["x"], t["sigma"], t["sigma_next"], backend=b), "euler"),
        Case("flow_euler", f"cfg={G_FLOW} sigma=[B]", ("x", "cond", "uncond"), 3, flow_euler_eager,
             lambda t, b: fd.flow_euler_step(t["cond"], t["x"], t["sigma"], t["sigma_next"], uncond=t["uncond"],
                                             guidance=G_FLOW, backend=b),
             "flow"),
        Case("loop4", f"{LOOP_STEPS}-step DDIM cfg={G_DDIM} toy model", ("x",), 4 * 4, loop4_eager,
             lambda t, b: fd.sample(toy_model, t["x"], sched, LOOP_STEPS, method="ddim", guidance=G_DDIM, backend=b),
             "loop", writes=4 * 3),
    ]


def select_cases(cases: list[Case], text: Optional[str]) -> list[Case]:
    if not text:
        return cases
    want = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in want if w not in {c.key for c in cases}]
    if unknown:
        raise SystemExit(f"bench_samplers: unknown --ops {', '.join(unknown)}; cases: {', '.join(c.key for c in cases)}")
    return [c for c in cases if c.key in want]


def make_small(kind: str, fd, sched, shape, dtype, device, gen) -> dict:
    """The per-sample inputs (and the 0-d offset tensor, shape and dtype every case may use)."""
    B = shape[0]
    d = {"shape": shape, "dtype": dtype, "device": device,
         "off": torch.tensor(OFFSET, dtype=torch.int64, device=device)}
    if kind == "vp":
        t = torch.randint(0, 1000, (B,), generator=gen, device=device, dtype=torch.int64)
        d.update(table=sched.alphas_cumprod, t=t, t_prev=t - DDIM_STRIDE)  # t_prev < 0 -> -1 semantics (where)
        d["t_prev"] = d["t_prev"].clamp(min=-1)
    elif kind == "loop":
        d.update(table=sched.alphas_cumprod)
    elif kind in ("euler", "flow"):
        if kind == "euler":
            grid = fd.EDMSchedule().karras_sigmas(EULER_STEPS, device=device)  # [steps + 1], last 0
        else:
            ts = torch.linspace(1, 0, FLOW_STEPS + 1, dtype=torch.float64, device=device)
            grid = FLOW_SHIFT * ts / (1 + (FLOW_SHIFT - 1) * ts)  # FlowSchedule(shift).coefficients' sigma
        i = torch.randint(0, len(grid) - 1, (B,), generator=gen, device=device)
        d.update(sigma=grid[i], sigma_next=grid[i + 1])
    return d


# ----------------------------------------------------------------------------------------------------


def make_step(fn: Callable[[dict], torch.Tensor], names: tuple[str, ...]):
    """The timed run: one call; inputs come positionally (the pool's tuple): full tensors in ``names``
    order, then the dict of small ones. The output is dropped (freed) after the call."""

    def step(*args):
        fn(dict(zip(names, args[:-1]), **args[-1]))

    return step


def main(argv=None) -> int:
    parser = harness.make_parser(__doc__)
    parser.add_argument("--ops", default=None, help="comma list of cases (default: all): randn, q_sample, "
                        "q_sample_given, ddim_cfg, ddim_eta1, euler, flow_euler, loop4")
    parser.add_argument("--shapes", default=None, help="comma list like 64x4x128x128,1x16x21x60x104 (default: those two)")
    parser.add_argument("--check", action="store_true", help="compare every impl's output with the float64 "
                        "reference first (drawn-noise cases: the formula fed the same noise)")
    cfg = harness.parse_config(parser, argv)
    a = cfg.args
    fd = import_flashdistill()
    device, dtype = cfg.device, cfg.dtype_or(cpu=torch.float32, cuda=torch.bfloat16)
    shapes = harness.parse_shapes(a.shapes) if a.shapes else (QUICK_SHAPES if cfg.quick else SHAPES)
    sched = fd.VPSchedule(1000, "scaled_linear", beta_start=0.00085, beta_end=0.012, device=device)
    cases = select_cases(make_cases(fd, sched), a.ops)
    backends = harness.choose_backends(fd, cfg, NAME)
    bench = harness.Bench(NAME, cfg)

    compiled = {}
    if cfg.compile:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for c in cases:
            if c.compile:
                compiled[c.key] = torch.compile(c.eager, dynamic=False)  # static: one graph per shape

    gen = torch.Generator(device=device).manual_seed(0)
    labels = []  # (label, case) in run order, for the summary
    for shape in shapes:
        n, es = torch.Size(shape).numel(), torch.empty((), dtype=dtype).element_size()
        spec_noise = None  # float64 spec stream of (SEED, OFFSET) for this shape, made once if --check needs it
        for case in cases:
            label = "x".join(map(str, shape)) + f" {case.key} {case.variant}"
            labels.append((label, case))
            nbytes = (case.reads + case.writes) * n * es
            impls: dict[str, Callable[[dict], torch.Tensor]] = {"eager": case.eager}
            if case.key in compiled:
                impls["compile"] = compiled[case.key]
            for b in backends:
                impls[f"flashdistill:{b}"] = functools.partial(lambda t, b, case: case.fd(t, b), b=b, case=case)

            base = {k: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
                    for k in case.full}
            small = make_small(case.small, fd, sched, shape, dtype, device, gen)

            def factory(base=base, small=small, case=case):
                return tuple(base[k].clone() for k in case.full) + (small,)

            copy_bytes = max(len(case.full) + case.writes, 1) * n * es  # inputs + output of one run
            inputs = bench.make_inputs(factory, copy_bytes)
            log(f"{label} {harness.dtype_name(dtype)}: N={n:,}, bytes model {nbytes / 1e6:.1f} MB "
                f"({case.reads} reads + {case.writes} writes); {inputs.plan.why}")

            first = inputs.first()
            notes = {"compile": bench.first_call(label, impls,
                                                 lambda fn: make_step(fn, case.full)(*first))}

            if a.check:
                t = dict(zip(case.full, first[:-1]), **first[-1])
                t64 = {k: harness.as_float64(v) for k, v in t.items()}
                t64["dtype"] = torch.float64
                if case.drawn:
                    if spec_noise is None:
                        t0 = time.perf_counter()
                        spec_noise = fd.randn(shape, seed=SEED, offset=OFFSET, dtype=torch.float64, device=device,
                                              backend="reference")
                        log(f"{label}: spec noise (reference Philox, float64) in {time.perf_counter() - t0:.1f} s")
                    ref64 = [case.given(t64, spec_noise).double()]
                    noise = spec_noise.to(dtype)
                    check_impls = dict(impls, eager=lambda t, noise=noise, case=case: case.given(t, noise))
                    skip = lambda name: "draws inductor's random numbers" if name == "compile" else None  # noqa: E731
                else:
                    ref64 = [case.eager(t64).double()]
                    check_impls, skip = impls, None
                failed = harness.check_impls(bench, label, dtype, check_impls, lambda impl: [impl(t).double()],
                                             ref64, ["out"], skip=skip)
                for name in failed:
                    del impls[name]
                del t, t64, ref64

            for name, fn in impls.items():
                bench.time(case=label, dtype=dtype, impl=name, fn=make_step(fn, case.full), inputs=inputs,
                           nbytes=nbytes, note=notes.get(name, ""))
            del inputs, base
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del spec_noise

    bench.finish()
    print(summary(bench, labels, backends), flush=True)
    return bench.exit_code()


def summary(bench: harness.Bench, labels: list, backends: list[str]) -> str:
    """Per case: eager, compile and flashdistill medians, the floor, and the issue's targets."""
    fmt = harness.fmt
    rows = {(r.case, r.impl): r for r in bench.results}
    lines = [f"### {NAME}: flashdistill vs eager and compile (targets: >= {TARGET_EAGER:g}x eager, "
             f">= {TARGET_COMPILE:g}x compile)", "",
             "| case | impl | floor ms | eager ms | compile ms | fd ms | fd % bw | vs eager | vs compile | target |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    busy = False
    for label, case in labels:
        e, c = rows.get((label, "eager")), rows.get((label, "compile"))
        for b in backends:
            f = rows.get((label, f"flashdistill:{b}"))
            if f is None:
                continue
            star = lambda r: "*" if r is not None and r.other_load_pct > 100 * harness.BUSY_WARN else ""  # noqa: E731
            busy = busy or any(star(r) for r in (e, c, f))
            ve = e.median_ms / f.median_ms if e else None
            vc = c.median_ms / f.median_ms if c else None
            meets = []
            if ve is not None:
                meets.append(("eager ok" if ve >= TARGET_EAGER else "eager MISSED"))
            if vc is not None:
                meets.append(("compile ok" if vc >= TARGET_COMPILE else "compile MISSED"))
            elif not case.compile:
                meets.append("no compile row")
            lines.append(
                f"| {label} | {b} | {fmt(f.floor_ms)} | {fmt(e.median_ms) + star(e) if e else '–'} | "
                f"{fmt(c.median_ms) + star(c) if c else '–'} | {fmt(f.median_ms) + star(f)} | {fmt(f.pct_of_bw, 2)}% | "
                f"{fmt(ve) + 'x' if ve else '–'} | {fmt(vc) + 'x' if vc else '–'} | {', '.join(meets)} |")
    if busy:
        lines += ["", f"\\* other processes used more than {harness.BUSY_WARN:.0%} of the CPUs: not reliable"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
