"""The ``flashdistill`` command line.

    flashdistill demo                 distill a digits DiT into a one-step student end to end (engine/demo/run.py);
                                      --task kd: a character-level language model (engine/demo/kd.py)
    flashdistill info                 versions, which backends are built and usable here and why not, the device
    flashdistill bench [NAME ...]     run the benchmark suite (or the named benches) into one folder: CSV,
                                      markdown report, PNG plots (engine/bench_report.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def info() -> int:
    import torch

    import flashdistill
    from flashdistill.kernels import backends, native

    print(f"flashdistill {flashdistill.__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton       {triton.__version__}"
              f"{' (interpreter: TRITON_INTERPRET=1)' if os.environ.get('TRITON_INTERPRET') == '1' else ''}")
    except ImportError:
        print("triton       not installed")

    cpu_mod, cpu_err = native.cpu_module()
    build = cpu_mod.build_info() if cpu_mod is not None else {}
    if cpu_mod is not None:
        isa = ", ".join(k for k in ("avx512f", "avx2", "fma", "f16c") if build.get(k))
        print(f"_C (cpu)     built with gcc {build.get('compiler', '?')}, -march={build.get('cpu_arch', '?')} "
              f"({isa or 'no SIMD extensions'}), OpenMP {build.get('openmp', 'off')}")
    else:
        print(f"_C (cpu)     not importable: {cpu_err}")
    cuda_mod, cuda_err = native.cuda_module()
    if cuda_mod is not None:
        print(f"_C_cuda      built: {cuda_mod.build_info()}")
    else:
        why = build.get("cuda_reason") or cuda_err
        print(f"_C_cuda      not built ({why}); reinstall with FLASHDISTILL_CUDA=1 to build it")

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        print(f"device       cuda: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
    else:
        print("device       cpu only (torch sees no CUDA device)")
    print(f"cpu          {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
          f"torch threads {torch.get_num_threads()}")
    print(f"default      backend={backends.default_backend()!r} (FLASHDISTILL_BACKEND or use_backend())")
    print("backends")
    for dev in devices:
        for name in backends.BACKENDS:
            ok, why = backends.backend_status(name, dev)
            print(f"  {dev:5s} {name:10s} {'yes' if ok else 'no ':3s}  {why}")
    return 0


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from flashdistill.engine.demo import run as demo_run

    if args.method not in demo_run.METHODS:
        parser.error(f"--method {args.method!r} is not one of {', '.join(demo_run.METHODS)}")
    if args.task == "kd" and args.method != "dmd2":
        parser.error("--method applies to the image task; --task kd distills with llm_kd")
    if args.capture not in ("auto", "eager", "compile", "graph"):
        parser.error(f"--capture {args.capture!r} is not one of auto, eager, compile, graph")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: the demo runs on cpu or cuda")
    try:
        if args.task == "kd":
            from flashdistill.engine.demo import kd

            kd.run_kd_demo(out=Path(args.out), device=device, steps=args.steps, seed=args.seed, quick=args.quick)
        else:
            demo_run.run_demo(method=args.method, device=device, steps=args.steps, seed=args.seed, out=Path(args.out),
                              capture=args.capture, quick=args.quick)
    except ImportError as exc:  # the demo extra (scikit-learn, matplotlib, tqdm) is missing
        print(f"flashdistill demo: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashdistill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built and usable backends, the device")
    from flashdistill.engine import bench_report

    bench = sub.add_parser("bench", help="run the benchmarks; write CSV, report.md and plots into one folder",
                           description=bench_report.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help=f"benches to run (default: all): {', '.join(bench_report.BENCHES)}")
    bench.add_argument("--out", default=None, help="output folder (default: bench-<UTC date-time>)")
    bench.add_argument("--quick", action="store_true", help="each bench's smoke size (fewer shapes and runs)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--benchmarks", default=None, help="the benchmarks folder (default: the checkout's)")
    bench.add_argument("--bench-args", default="", help="more options for every bench, with =: --bench-args=\"--no-compile --threads 2\"")
    demo = sub.add_parser("demo", help="distill a real teacher into a one-step student, end to end",
                          description="Trains (or loads from its cache) a small DiT teacher on scikit-learn's 8x8 "
                          "digits, distills it into a one-step student with a recipe, and reports Frechet distance, "
                          "class coverage and samples/s for real data, the teacher and the student (table, JSON, PNG).")
    demo.add_argument("--task", default="image", choices=["image", "kd"],
                      help="image: the digits DiT (default); kd: a character-level language model")
    demo.add_argument("--method", default="dmd2", help="image task: dmd2 (default), sid, vsd or consistency")
    demo.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    demo.add_argument("--steps", type=int, default=None, help="distillation iterations (default: the task's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    demo.add_argument("--capture", default="auto", help="auto (CUDA graph on a GPU, eager on the CPU), eager, compile")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "demo":
        return _demo(demo, args)
    if args.command == "bench":
        import datetime
        import shlex
        from pathlib import Path

        bad = [n for n in args.names if n not in bench_report.BENCHES]
        if bad:
            bench.error(f"unknown bench {', '.join(map(repr, bad))}; choose from {', '.join(bench_report.BENCHES)}")
        out = Path(args.out or datetime.datetime.now(datetime.timezone.utc).strftime("bench-%Y%m%d-%H%M%S"))
        try:
            failed = bench_report.run(args.names, out, bench_dir=args.benchmarks, extra=shlex.split(args.bench_args),
                                      quick=args.quick, device=args.device)
        except FileNotFoundError as exc:
            print(exc, file=sys.stderr)
            return 2
        return 1 if failed else 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
