"""The package as a user meets it: the CLI, the backend registry, the installed layout."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import flashdistill
from flashdistill.kernels import backends

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flashdistill.engine.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_info_lists_every_backend_with_a_reason():
    out = _cli("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"torch        {torch.__version__}" in text
    for name in backends.BACKENDS:
        assert f"cpu   {name:10s}" in text
    # the compiled CPU module is required on every machine we support
    assert "cpu   cpu        yes" in text
    if not torch.cuda.is_available():
        assert "cpu   cuda       no   " in text and "FLASHDISTILL_CUDA=1" in text


def test_cli_rejects_unknown_command():
    out = _cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_available_backends_cpu():
    names = flashdistill.available_backends("cpu")
    assert names[0] == "reference" and "cpu" in names and "cuda" not in names
    assert ("triton" in names) == (os.environ.get("TRITON_INTERPRET") == "1")


def test_env_default_backend_is_validated():
    code = "import flashdistill"
    env = dict(os.environ, FLASHDISTILL_BACKEND="bogus")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "FLASHDISTILL_BACKEND='bogus' is not a backend" in out.stderr
    env["FLASHDISTILL_BACKEND"] = "reference"
    code = "import flashdistill.kernels.backends as b; print(b.default_backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "reference"


def test_every_op_package_is_installed():
    """pyproject lists packages by hand (three source roots): a new op folder must be listed too."""
    text = (ROOT / "pyproject.toml").read_text()
    for init in (ROOT / "kernels").glob("*/__init__.py"):
        assert f'"flashdistill.kernels.{init.parent.name}"' in text, f"add flashdistill.kernels.{init.parent.name}"


@pytest.mark.parametrize("op", ["score_diff", "score_identity_sums", "score_identity_grads", "regression_sums", "regression_grad", "grad_scale"])
def test_ops_are_registered(op):
    assert hasattr(torch.ops.flashdistill, op)
