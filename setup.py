"""Build the compiled kernels with ninja: `flashdistill._C` (CPU, always) and `flashdistill._C_cuda`.

Neither module includes a torch header: kernels take raw pointers, sizes, strides and the CUDA stream
as integers through pybind11 (csrc/README.md), so one build survives torch upgrades and the CUDA
module builds against the CPU torch wheel.

Environment:
  FLASHDISTILL_CUDA        1: build the CUDA module; 0: never; unset: build it when nvcc is found and
                           a CUDA device is visible (nvidia-smi -L succeeds).
  FLASHDISTILL_CUDA_ARCHS  semicolon list of SM versions, default "80;90" (sm_80, sm_90, + PTX of the last).
  FLASHDISTILL_CPU_ARCH    value of g++ -march, default "native" (the extension is built where it runs).
  FLASHDISTILL_BUILD_JOBS  ninja -j (default: ninja's choice). nvcc needs ~1 GB per job.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_decision():
    """(build: bool, reason: str) for the CUDA module."""
    flag = os.environ.get("FLASHDISTILL_CUDA")
    nvcc = _find_nvcc()
    if flag == "0":
        return False, "FLASHDISTILL_CUDA=0"
    if flag == "1":
        if nvcc is None:
            raise RuntimeError("FLASHDISTILL_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return True, "FLASHDISTILL_CUDA=1"
    if nvcc is None:
        return False, "nvcc not found"
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False, "no CUDA device visible at build time"
    return True, "CUDA device visible at build time"


def _ninja():
    try:
        import ninja  # the PyPI package ships the binary

        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        exe = shutil.which("ninja")
        if exe is None:
            raise RuntimeError("ninja is required to build flashdistill (pip install ninja)")
        return exe


def _q(path):
    return path.replace(" ", "$ ").replace(":", "$:")


class NinjaBuildExt(build_ext):
    """Writes one build.ninja per extension and runs it; object files persist in build/ninja/."""

    def build_extension(self, ext):
        import pybind11

        start = time.time()
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        tag = ext.name.rsplit(".", 1)[-1]
        bdir = os.path.join(ROOT, "build", "ninja", f"{tag}-py{sys.version_info[0]}{sys.version_info[1]}")
        os.makedirs(bdir, exist_ok=True)
        os.makedirs(os.path.dirname(out_path), exist_ok=True)

        self._write_build_header(bdir)
        includes = [bdir, os.path.join(ROOT, "csrc", "include"), pybind11.get_include(), sysconfig.get_paths()["include"]]
        inc = " ".join(f"-I{_q(p)}" for p in includes)
        march = os.environ.get("FLASHDISTILL_CPU_ARCH", "native")
        cxx = os.environ.get("CXX", "g++")
        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            # -fno-math-errno: no kernel reads errno, and without it gcc keeps sqrt a call that stops
            # vectorization (the values are the same: IEEE sqrt either way)
            f"cflags = -O3 -std=c++17 -fPIC -fvisibility=hidden -Wall -Wextra -fno-math-errno -march={march} -fopenmp "
            f"{inc}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $in",
        ]
        objs = []
        linker, link_libs = "$cxx", "-fopenmp"
        for src in ext.sources:
            if src.endswith(".cu"):
                continue
            obj = os.path.join(bdir, os.path.relpath(src, ROOT).replace("/", "_") + ".o")
            lines.append(f"build {_q(obj)}: cxx {_q(os.path.join(ROOT, src))}")
            objs.append(obj)

        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            nvcc = ext.nvcc
            archs = [a.strip() for a in os.environ.get("FLASHDISTILL_CUDA_ARCHS", "80;90").split(";") if a.strip()]
            gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in archs)
            gencode += f" -gencode arch=compute_{archs[-1]},code=compute_{archs[-1]}"
            lines += [
                f"nvcc = {nvcc}",
                f"nvflags = -O3 -std=c++17 -Xcompiler -fPIC,-fvisibility=hidden,-Wall -lineinfo "
                f"{gencode} "
                f"-I{_q(os.path.join(ROOT, 'csrc', 'include'))}",
                "rule nvcc",
                "  command = $nvcc -MD -MF $out.d $nvflags -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
                "  description = nvcc $in",
            ]
            for src in cu:
                obj = os.path.join(bdir, os.path.relpath(src, ROOT).replace("/", "_") + ".o")
                lines.append(f"build {_q(obj)}: nvcc {_q(os.path.join(ROOT, src))}")
                objs.append(obj)
            # nvcc links: it knows where its own static runtime lives (the module then needs only
            # the driver, not a libcudart of a matching version).
            linker, link_libs = "$nvcc", "-cudart static"

        lines += [
            "rule link",
            f"  command = {linker} -shared $in -o $out {link_libs}",
            "  description = link $out",
            f"build {_q(out_path)}: link {' '.join(_q(o) for o in objs)}",
        ]
        with open(os.path.join(bdir, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        cmd = [_ninja(), "-C", bdir]
        if os.environ.get("FLASHDISTILL_BUILD_JOBS"):
            cmd += ["-j", os.environ["FLASHDISTILL_BUILD_JOBS"]]
        subprocess.run(cmd, check=True)
        print(f"flashdistill: built {ext.name} in {time.time() - start:.1f} s")

    @staticmethod
    def _write_build_header(bdir):
        """fd_build_config.h: how this build was configured, for build_info() and `flashdistill info`."""
        march = os.environ.get("FLASHDISTILL_CPU_ARCH", "native")
        archs = os.environ.get("FLASHDISTILL_CUDA_ARCHS", "80;90") if CUDA_BUILD else ""
        text = ("#pragma once\n"
                f"#define FD_CPU_ARCH {march!r}\n"
                f"#define FD_CUDA_BUILT {int(CUDA_BUILD)}\n"
                f"#define FD_CUDA_REASON {CUDA_REASON!r}\n"
                f"#define FD_CUDA_ARCHS_REQUESTED {archs!r}\n").replace("'", '"')
        path = os.path.join(bdir, "fd_build_config.h")
        if not os.path.exists(path) or open(path).read() != text:  # unchanged: no rebuild
            with open(path, "w") as f:
                f.write(text)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


CUDA_BUILD, CUDA_REASON = _cuda_decision()
ext_modules = [Extension("flashdistill._C", sources=_sources("csrc/cpu/*.cpp"))]
if CUDA_BUILD:
    cuda_ext = Extension("flashdistill._C_cuda", sources=_sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"))
    cuda_ext.nvcc = _find_nvcc()
    ext_modules.append(cuda_ext)

setup(ext_modules=ext_modules, cmdclass={"build_ext": NinjaBuildExt})
