"""The ``flashdistill`` command line.

    flashdistill info     versions, which backends are built and usable here and why not, the device
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
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
