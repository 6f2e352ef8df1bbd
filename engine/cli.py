"""The ``flashdistill`` command line.

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
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
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
