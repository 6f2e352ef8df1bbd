"""The demo's data: scikit-learn's 8x8 handwritten digits, and where the demo caches what it trains.

The digits (UCI "Optical Recognition of Handwritten Digits", the test part; Alpaydin & Kaynak 1998) ship
inside scikit-learn, so nothing is downloaded at run time: 1,797 grey images of 8 x 8 pixels with
integer intensities 0..16 and labels 0..9 (~180 per class).

    load_digits(device=None, dtype=torch.float32) -> (images [1797, 1, 8, 8] in [-1, 1], labels int64 [1797])
    train_eval_split(n, eval_fraction=0.5, seed=0, labels=None) -> (train_idx, eval_idx)
    class_ordered(images, labels, n=100) -> images [n]: the i-th of label i % 10 (as sampling's labels)
    cache_dir(override=None) -> Path      the demo's cache folder (created)
    config_hash(obj) -> str               12 hex digits of a canonical JSON of obj
    tensor_hash(*tensors) -> str          12 hex digits of the tensors' dtypes, shapes and bytes
    save_checkpoint(path, payload)        torch.save, atomically (temporary file, then rename)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["load_digits", "train_eval_split", "cache_dir", "config_hash", "tensor_hash", "save_checkpoint",
           "require_demo_extra", "class_ordered", "NUM_CLASSES", "IMAGE_SHAPE"]

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
PIXEL_MAX = 16.0
INSTALL_HINT = "pip install 'flashdistill[demo]'"


def require_demo_extra(module: str, what: str):
    """Import ``module`` (one of the demo extra's packages) or raise an ImportError saying how to get it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"flashdistill demo: {what} needs {module.split('.')[0]}, which is not installed; "
                          f"install the demo extra: {INSTALL_HINT}") from e


def load_digits(device=None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images [N, 1, 8, 8] scaled from 0..16 to [-1, 1] (x / 8 - 1), labels int64 [N]."""
    if not dtype.is_floating_point:
        raise ValueError(f"load_digits: dtype must be a floating dtype, got {dtype}")
    datasets = require_demo_extra("sklearn.datasets", "the digits data set")
    d = datasets.load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float64).reshape(-1, *IMAGE_SHAPE)
    images = (x * (2.0 / PIXEL_MAX) - 1.0).to(device=device, dtype=dtype)
    labels = torch.as_tensor(d.target, dtype=torch.int64, device=device)
    return images, labels


def train_eval_split(n: int, eval_fraction: float = 0.5, seed: int = 0,
                     labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Deterministic disjoint index sets (int64, CPU) covering range(n). With ``labels`` the split is
    stratified: each class is shuffled and split in the same proportion, so both halves hold every class
    alike (what a Frechet distance between the halves needs)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"train_eval_split: eval_fraction must be in (0, 1), got {eval_fraction}")
    if n < 2:
        raise ValueError(f"train_eval_split: need n >= 2, got {n}")
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        groups = [torch.arange(n)]
    else:
        if labels.shape != (n,):
            raise ValueError(f"train_eval_split: labels must be [{n}], got {tuple(labels.shape)}")
        lab = labels.detach().cpu()
        groups = [torch.nonzero(lab == c).flatten() for c in torch.unique(lab)]
    train, ev = [], []
    for idx in groups:
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * eval_fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        ev.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(ev)).values


def class_ordered(images: Tensor, labels: Tensor, n: int = 100, num_classes: int = NUM_CLASSES) -> Tensor:
    """n images whose i-th has label i % num_classes (the first of each class in order), so a grid of real
    digits lines up with samples drawn for ``teacher.class_labels(n)``."""
    pools = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    need = -(-n // num_classes)
    short = [c for c, p in enumerate(pools) if len(p) < need]
    if short:
        raise ValueError(f"class_ordered: classes {short} have fewer than {need} images")
    idx = torch.stack([p[:need] for p in pools], dim=1).reshape(-1)[:n]
    return images[idx.to(images.device)]


def cache_dir(override=None) -> Path:
    """``override``, else ``$FLASHDISTILL_CACHE/demo``, else ``~/.cache/flashdistill/demo``; created."""
    if override is not None:
        path = Path(override)
    elif os.environ.get("FLASHDISTILL_CACHE"):
        path = Path(os.environ["FLASHDISTILL_CACHE"]) / "demo"
    else:
        path = Path.home() / ".cache" / "flashdistill" / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_hash(obj) -> str:
    """12 hex digits of sha256 over a canonical JSON of ``obj`` (dicts with sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tensor_hash(*tensors: Tensor) -> str:
    """12 hex digits of sha256 over each tensor's dtype, shape and bytes (a data set's fingerprint)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
