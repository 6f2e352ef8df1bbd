"""`flashdistill demo --task kd`: a character-level teacher language model distilled into a smaller student
with ``fused_linear_kd_loss`` (issue #8, the language-model part).

    run_kd_demo(*, out, device=None, steps=None, seed=0, progress=True, quick=False, log=print,
                cache_dir=None, config=None) -> dict        writes out/kd.json and out/kd.png, prints a table

The pieces, each usable alone:

    corpus_documents(modules=STDLIB_MODULES) -> [str]     docstrings of the standard library, in a fixed order
    split_documents(docs, val_fraction=0.1) -> (train, val) by document, from a hash of each document's text
    encode(text) -> int64 [N];  decode(ids) -> str         the fixed 97-symbol character vocabulary (VOCAB)
    CharLM(LMConfig)                                       causal transformer: .hidden(ids) -> [B, L, H], .head
    train_lm(model, ids, train_config, ...) -> curve       next-character cross-entropy (teacher, scratch student)
    load_or_train_teacher(...) -> (teacher, info)          cached in the demo cache folder under a config hash
    distill(student, teacher, ids, train_config, ...)      engine.recipes.llm_kd captured with engine.capture
    evaluate_lm(model, ids, context) -> nats per character on non-overlapping windows
    kd_loss_memory(student, teacher, input_ids, ...)       peak memory of one eager KD loss vs the fused one
    analytic_logit_memory(tokens, vocab, ...)              the same comparison, computed, at an LLM's size
    generate(model, prompt, n, temperature=0.0, seed=0) -> str

Text. The training text is what every Python installation has offline: the docstrings of 64 standard-library
modules (STDLIB_MODULES: the module's own docstring, then those of its public functions and classes and of
the classes' public methods, each cleaned by ``inspect.cleandoc``; duplicates and docstrings under 40
characters dropped): ~0.6 MB of English prose about programming (CPython 3.11.7: 2,085 documents, 504 k
training and 60 k validation characters, 221 validation documents). A document goes to the validation set
when the first byte of the SHA-256 of its text is below ``val_fraction`` x 256, so the split never depends
on which other documents exist. Documents are joined with a blank line. The text differs between Python
versions; its hash is part of the teacher's cache key.

Vocabulary. 97 symbols, fixed so that model files never depend on the text: 0 = unknown (any other
character, shown as U+FFFD), 1 = newline, 2..96 = the printable ASCII characters 32..126.

Models. ``CharLM``: token and learned position embeddings, ``depth`` pre-norm blocks (LayerNorm, causal
multi-head self-attention through ``flashdistill.attention(q, k, v, causal=True)`` -- looked up on the
``flashdistill`` module at each call, so a test can count the calls -- and a GELU MLP), a final LayerNorm,
and an untied bias-free ``nn.Linear`` head: ``hidden(input_ids)`` is the state after the final norm, so
``llm_kd`` gets (hidden, head) for each model and no [tokens x vocabulary] logits are formed in distillation.
GPT-2's initialisation (normal 0.02, residual projections 0.02 / sqrt(2 depth)).

Training. Windows of ``context`` characters drawn uniformly from the training text (a host generator:
the batch order is reproducible); position i predicts character i + 1 (llm_kd's convention: the labels are
the inputs, shifted inside the step). AdamW (fused; lr as a tensor, warm-up then cosine to 10 %) on
cross-entropy for the teacher and for the scratch student; the distilled student takes ``llm_kd``'s step
(``fused_linear_kd_loss`` with the teacher's hidden states and head, forward KL(teacher || student) at
temperature ``temperature``, plus ``hard_weight`` x the label cross-entropy) captured by
``flashdistill.engine.capture`` (a CUDA graph on a GPU, eager on the CPU). The scratch student starts from
the same weights and sees the same batches for the same number of steps: the table shows what the
teacher's soft targets bought, whatever that is.

Memory. ``kd_loss_memory`` runs one KD loss forward and backward from the hidden states twice: eagerly
with materialized logits (both heads, log-softmaxes, KL and cross-entropy in PyTorch) and with
``fused_linear_kd_loss``; it reports the peak of live memory each allocates (CUDA: the caching allocator's
peak over the memory held before; CPU: the allocation and free events of ``torch.profiler``, frees counted
at the end of the op that made them, so an upper bound) and the bytes autograd saves for the backward
(``saved_tensors_hooks``, distinct storages). At the demo's 97-symbol vocabulary the logits are no larger
than the hidden states, so the measured saving is modest (5 x); ``analytic_logit_memory`` gives the
[tokens x V] terms at an LLM's size (computed, not measured; the table says so).

Measured on this repository's 2-core CPU machine (DEFAULT, seed 0, the 943 windows of the validation text;
the machine was shared, so times move by ~20 %, and under heavy contention a KD step was once 5x slower:
torch's two OpenMP threads wait on each other):

    model                params   val nats/char  perplexity  bits/char  steps  train time  tokens/s
    teacher (w128, d4)   826,368  1.732          5.65        2.50       700    90 s        16,000
    student KD (w64, d2) 116,608  1.851          6.37        2.67       600    42-48 s     26-29,000
    student scratch      116,608  2.101          8.17        3.03       600    17-19 s     65-70,000
    student at init      116,608  4.586          98.1        6.62
    (seed 1: KD 1.858, scratch 1.998)

KD loss memory at the demo's batch (2,048 tokens x 97): eager peak 5.31 MiB, fused (chunk 512) 1.05 MiB.
The whole default run took ~160 s with the teacher trained, 72 s with it loaded from the cache; a KD step
costs ~2.5x a scratch one, most of it the teacher's forward. With an equal number of steps the distilled
student was 0.14-0.25 nats per character better than the scratch one (two seeds).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flashdistill
from flashdistill.engine import recipes
from flashdistill.engine.demo import data as D
from flashdistill.engine.demo import report as R
from flashdistill.engine.demo.dit import Attention
from flashdistill.engine.runtime import capture

__all__ = ["STDLIB_MODULES", "VOCAB", "VOCAB_SIZE", "UNK", "corpus_documents", "split_documents", "encode", "decode",
           "load_corpus", "LMConfig", "TrainConfig", "KDConfig", "DEFAULT", "QUICK", "CharLM", "train_lm",
           "load_or_train_teacher", "distill", "evaluate_lm", "kd_loss_memory", "eager_kd_loss",
           "analytic_logit_memory", "generate", "format_kd_table", "run_kd_demo", "CACHE_FORMAT"]

CACHE_FORMAT = 1  # bump when the checkpoint layout or the training code changes what a config produces

# ----------------------------------------------------------------------------------------------------
# text

STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions",
    "functools", "glob", "hashlib", "heapq", "hmac", "html", "http.client", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "types", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
)
MIN_DOC_CHARS = 40
SEPARATOR = "\n\n"

UNK = 0
VOCAB = "\ufffd" + "\n" + "".join(chr(c) for c in range(32, 127))  # index = token id
VOCAB_SIZE = len(VOCAB)  # 97
_LUT = torch.full((128,), UNK, dtype=torch.int64)
for _i, _c in enumerate(VOCAB[1:], start=1):
    _LUT[ord(_c)] = _i


def corpus_documents(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """The docstrings of ``modules`` (see the module docstring), cleaned, deduplicated, in a fixed order.
    A module this Python lacks (e.g. sqlite3 in a trimmed build) is skipped."""
    docs, seen = [], set()

    def add(doc):
        if not isinstance(doc, str):  # a class whose __doc__ is a descriptor, or None
            return
        text = inspect.cleandoc(doc).strip()
        if len(text) >= MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            docs.append(text)

    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        add(mod.__doc__)
        public = getattr(mod, "__all__", None)
        names = sorted(public) if isinstance(public, (list, tuple)) else [n for n in sorted(dir(mod))
                                                                         if not n.startswith("_")]
        for attr in names:
            obj = getattr(mod, attr, None)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            add(obj.__doc__)
            if inspect.isclass(obj):
                for key, member in sorted(vars(obj).items()):
                    if not key.startswith("_") and inspect.isroutine(member):
                        add(member.__doc__)
    return docs


def split_documents(docs: Sequence[str], val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, val): a document is in val when the first byte of sha256(text) < val_fraction * 256."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"split_documents: val_fraction must be in (0, 1), got {val_fraction}")
    cut = val_fraction * 256
    train, val = [], []
    for d in docs:
        (val if hashlib.sha256(d.encode()).digest()[0] < cut else train).append(d)
    return train, val


def encode(text: str) -> Tensor:
    """int64 ids [len(text)]: the VOCAB index of each character, UNK for characters outside it."""
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).to(torch.int64) \
        if text else torch.zeros(0, dtype=torch.int64)
    return torch.where(codes < 128, _LUT[codes.clamp(0, 127)], torch.full_like(codes, UNK))


def decode(ids) -> str:
    """The text of ids (a tensor or a list of ints)."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return "".join(VOCAB[i] if 0 <= i < VOCAB_SIZE else VOCAB[UNK] for i in ids)


def load_corpus(val_fraction: float = 0.1, modules: Sequence[str] = STDLIB_MODULES) -> dict:
    """{"train": ids, "val": ids, "documents": n, "train_documents": n, "val_documents": n, "sha": 12 hex,
    "unknown_fraction": float}: the documents split and encoded (CPU tensors)."""
    docs = corpus_documents(modules)
    if not docs:
        raise RuntimeError("kd demo: no docstrings found (is this Python run with -OO, which strips them?)")
    train_docs, val_docs = split_documents(docs, val_fraction)
    train, val = encode(SEPARATOR.join(train_docs)), encode(SEPARATOR.join(val_docs))
    return {"train": train, "val": val, "documents": len(docs), "train_documents": len(train_docs),
            "val_documents": len(val_docs), "sha": D.tensor_hash(train, val),
            "unknown_fraction": float((torch.cat([train, val]) == UNK).double().mean())}


# ----------------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class LMConfig:
    """A CharLM's architecture."""

    width: int = 128
    depth: int = 4
    heads: int = 4
    context: int = 64
    mlp_ratio: float = 4.0
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self):
        for name in ("width", "depth", "heads", "context", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"LMConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"LMConfig: heads={self.heads} does not divide width={self.width}")


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    """A causal character-level transformer (module docstring). ``forward(ids)`` -> logits [B, L, V];
    ``hidden(ids)`` -> [B, L, width] after the final norm; ``head`` the nn.Linear(width, V, bias=False)."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Embedding(c.context, c.width)
        self.blocks = nn.ModuleList(_Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2: N(0, 0.02), the residual branches' output layers scaled by 1/sqrt(2 depth)
                std = 0.02 / math.sqrt(2 * c.depth) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """[B, L, width]: the final-norm states (what the head multiplies). No padding: the mask must be None."""
        if attention_mask is not None:
            raise ValueError("CharLM.hidden: the demo's batches have no padding; attention_mask must be None")
        L = input_ids.shape[-1]
        if L > self.config.context:
            raise ValueError(f"CharLM: {L} tokens exceed the context of {self.config.context}")
        x = self.tok(input_ids) + self.pos.weight[:L]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.hidden(input_ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TrainConfig:
    """One model's optimisation: AdamW (fused), linear warm-up then cosine to ``min_lr_ratio`` x lr."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class KDConfig:
    """Everything a run depends on. ``teacher`` + ``teacher_train`` + ``teacher_seed`` (and the text) name the
    cached teacher; the run's ``seed`` moves the students' initialisation and batches only.

    How the defaults were chosen (2-core CPU, ~90 s of teacher training each, validation nats/char): width
    128 / depth 4 / context 64 / batch 32 for 700 steps 1.749; width 192 for 400 steps 1.951; context 128
    with batch 16 for 700 steps 2.006; lr 6e-3 instead of 3e-3 2.322. Students (width 64, depth 2, 300
    steps, lr 3e-3): scratch 2.630, forward KL at T = 1 2.571, + 0.5 x hard CE 2.627, T = 2 2.725; at 600
    steps lr 1e-2 left the scratch student on the bigram plateau (2.633; KD 2.356), 5e-3 gave 2.129 / 1.868.
    """

    teacher: LMConfig = field(default_factory=lambda: LMConfig(width=128, depth=4, heads=4, context=64))
    student: LMConfig = field(default_factory=lambda: LMConfig(width=64, depth=2, heads=2, context=64))
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=700, batch_size=32, lr=3e-3,
                                                                           warmup=50))
    student_train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, batch_size=32, lr=5e-3,
                                                                           warmup=25))
    teacher_seed: int = 0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    hard_weight: float = 0.0
    chunk_size: Optional[int] = 512   # fused_linear_kd_loss rows per chunk (None: the op's 64 MiB default)
    # Only the last position of each window has no target (1 in 64): packing the valid rows (the op's CPU
    # default) would copy both models' hidden states to skip 1.6 % of the rows (+1.4 MiB of the 2.5 MiB peak
    # measured at the default batch), so the demo turns it off, in training and in the memory measurement.
    pack_valid: Optional[bool] = False
    val_fraction: float = 0.1
    eval_windows: int = 1024          # validation windows of ``context`` characters for the final numbers (all 943)
    curve_windows: int = 48           # ... for the students' validation curves
    curve_points: int = 10
    sample_chars: int = 80
    log_every: int = 10

    def to_dict(self) -> dict:
        return asdict(self)

    def teacher_key(self) -> dict:
        return {"model": asdict(self.teacher), "train": asdict(self.teacher_train), "seed": self.teacher_seed,
                "val_fraction": self.val_fraction}


DEFAULT = KDConfig()
QUICK = KDConfig(teacher=LMConfig(width=32, depth=1, heads=2, context=32),
                 student=LMConfig(width=16, depth=1, heads=2, context=32),
                 teacher_train=TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=5),
                 student_train=TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=5),
                 chunk_size=64, eval_windows=16, curve_windows=8, curve_points=3, sample_chars=12, log_every=5)


# ----------------------------------------------------------------------------------------------------
# training


def _adamw(model: nn.Module, tc: TrainConfig, device) -> tuple[torch.optim.Optimizer, Tensor]:
    """AdamW (fused on CPU and CUDA) with a tensor lr (updated in place: a captured step reads it)."""
    lr = torch.tensor(tc.lr_at(0), dtype=torch.float32, device=device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused), lr


class _Batches:
    """Random windows [B, L] of ``ids`` (on its device), start offsets from a seeded host generator."""

    def __init__(self, ids: Tensor, batch_size: int, context: int, seed: int):
        if ids.numel() <= context:
            raise ValueError(f"kd demo: {ids.numel()} training characters for a context of {context}")
        self.ids, self.B, self.L = ids, batch_size, context
        self.g = torch.Generator().manual_seed(seed)
        self.arange = torch.arange(context, device=ids.device)

    def __call__(self) -> Tensor:
        starts = torch.randint(0, self.ids.numel() - self.L + 1, (self.B,), generator=self.g)
        return self.ids[starts.to(self.ids.device)[:, None] + self.arange]


def _ce_step(model: CharLM, optimizer) -> Callable:
    """fn(input_ids, labels) -> {"loss"}: one cross-entropy update, position i predicting label i + 1."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(input_ids, labels):
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward(inputs=params)
        optimizer.step()
        return {"loss": loss.detach()}

    return step


def _train_loop(name: str, step_fn, optimizer_lr: Tensor, tc: TrainConfig, batches: _Batches, *, mode: str,
                progress: bool, log_every: int, optimizer, on_point: Optional[Callable[[int], None]] = None,
                points: Sequence[int] = (), metric: str = "loss") -> dict:
    """Runs ``tc.steps`` steps of ``step_fn`` captured with engine.capture; the curve of ``metric`` averaged
    over each ``log_every`` window (a host read there only, which also ends the timed GPU work: the last step
    always closes a window); ``on_point(step)`` after the steps in ``points``, untimed. Returns {"curve",
    "seconds" (the training steps only, not the capture and its warm-up), "tokens_per_s", "capture_mode"}."""
    x = batches()
    captured = capture(step_fn, x, x, optimizers=(optimizer,), mode=mode, verbose=progress, name=name)
    tqdm = D.require_demo_extra("tqdm", "the progress bar") if progress else None
    bar = tqdm.tqdm(total=tc.steps, desc=name, unit="step", leave=True) if progress else None
    curve, window = [], torch.zeros((), dtype=torch.float64, device=x.device)
    seconds, points = 0.0, set(points)
    for step in range(tc.steps):
        t0 = time.perf_counter()
        optimizer_lr.fill_(tc.lr_at(step))
        out = captured(x, x)
        window += out[metric]
        if (step + 1) % log_every == 0 or step + 1 == tc.steps:
            n = step % log_every + 1
            curve.append(window.item() / n)  # the host read also ends the timed work of the window
            window.zero_()
            if bar is not None:
                bar.update(n)
                bar.set_postfix({metric: f"{curve[-1]:.3f}"})
        seconds += time.perf_counter() - t0
        if step + 1 < tc.steps:
            x = batches()
        if step + 1 in points and on_point is not None:
            on_point(step + 1)
    if bar is not None:
        bar.close()
    return {"curve": curve, "seconds": seconds, "tokens_per_s": tc.steps * x.numel() / max(seconds, 1e-9),
            "capture_mode": captured.mode}


def _mode(device: torch.device) -> str:
    return "graph" if device.type == "cuda" else "eager"


def train_lm(model: CharLM, ids: Tensor, tc: TrainConfig, *, seed: int = 0, name: str = "lm (cross-entropy)",
             progress: bool = True, log_every: int = 10, on_point=None, points=()) -> dict:
    """Trains ``model`` (on ``ids``' device) with next-character cross-entropy (module docstring); see
    ``_train_loop`` for the returned dict. The model is left in train mode."""
    dev = ids.device
    model.train()
    opt, lr = _adamw(model, tc, dev)
    batches = _Batches(ids, tc.batch_size, model.config.context, seed)
    return _train_loop(name, _ce_step(model, opt), lr, tc, batches, mode=_mode(dev), progress=progress,
                       log_every=log_every, optimizer=opt, on_point=on_point, points=points)


def distill(student: CharLM, teacher: CharLM, ids: Tensor, tc: TrainConfig, *, config: KDConfig = DEFAULT,
            seed: int = 0, name: str = "student (llm_kd, fused_linear_kd_loss)", progress: bool = True,
            log_every: int = 10, on_point=None, points=()) -> dict:
    """Trains ``student`` on ``teacher``'s distributions with ``recipes.llm_kd`` (module docstring); the
    step is ``engine.capture``d. Returns ``_train_loop``'s dict (the curve of the recipe's "loss")."""
    dev = ids.device
    if student.config.context != teacher.config.context:
        raise ValueError("distill: the student and the teacher must share the context length")
    teacher.eval().requires_grad_(False)
    student.train()
    opt, lr = _adamw(student, tc, dev)
    recipe = recipes.llm_kd(student, teacher, optimizer=opt, divergence=config.divergence,
                            temperature=config.temperature, hard_weight=config.hard_weight,
                            chunk_size=config.chunk_size, pack_valid=config.pack_valid, student_hidden=student.hidden,
                            student_head=student.head, teacher_hidden=teacher.hidden, teacher_head=teacher.head)
    batches = _Batches(ids, tc.batch_size, student.config.context, seed)
    return _train_loop(name, recipe.steps["student"].fn, lr, tc, batches, mode=_mode(dev), progress=progress,
                       log_every=log_every, optimizer=opt, on_point=on_point, points=points)


def load_or_train_teacher(corpus: dict, *, config: KDConfig = DEFAULT, device=None, cache_dir=None,
                          progress: bool = True, log: Optional[Callable[[str], None]] = print) -> tuple[CharLM, dict]:
    """The teacher for ``config`` and the text from the cache, or trained now and cached at
    ``<cache>/kd-teacher-<hash>.pt`` (hash over CACHE_FORMAT, ``config.teacher_key()`` and the text's hash).
    Returns (model in eval mode, gradients off; {"path", "loaded", "curve", "train_seconds",
    "tokens_per_s"})."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = D.config_hash({"format": CACHE_FORMAT, "teacher": config.teacher_key(), "text": corpus["sha"]})
    path = D.cache_dir(cache_dir) / f"kd-teacher-{key}.pt"
    if path.exists():
        try:
            ck = torch.load(path, map_location=dev, weights_only=True)
            model = CharLM(LMConfig(**ck["model"])).to(dev)
            model.load_state_dict(ck["state_dict"])
            info = {"path": str(path), "loaded": True, "curve": [float(v) for v in ck["curve"]],
                    "train_seconds": float(ck["train_seconds"]), "tokens_per_s": float(ck["tokens_per_s"])}
        except Exception as e:  # a corrupt or foreign file: say so, retrain over it
            if log:
                log(f"kd teacher: cache file {path} unreadable ({type(e).__name__}: {e}); retraining")
        else:
            if log:
                log(f"kd teacher: loaded from cache {path} (trained in {info['train_seconds']:.0f} s)")
            return model.eval().requires_grad_(False), info
    tc = config.teacher_train
    if log:
        log(f"kd teacher: training ({tc.steps} steps, batch {tc.batch_size} x {config.teacher.context} characters); "
            f"will cache at {path}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.teacher_seed)
        model = CharLM(config.teacher).to(dev)
    res = train_lm(model, corpus["train"].to(dev), tc, seed=config.teacher_seed,
                   name="teacher (CharLM, cross-entropy)", progress=progress, log_every=config.log_every)
    D.save_checkpoint(path, {"format": CACHE_FORMAT, "model": asdict(config.teacher),
                             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                             "curve": res["curve"], "train_seconds": res["seconds"],
                             "tokens_per_s": res["tokens_per_s"], "key": config.teacher_key()})
    if log:
        log(f"kd teacher: trained in {res['seconds']:.0f} s ({res['tokens_per_s']:,.0f} tokens/s), cached at {path}")
    info = {"path": str(path), "loaded": False, "curve": res["curve"], "train_seconds": res["seconds"],
            "tokens_per_s": res["tokens_per_s"]}
    return model.eval().requires_grad_(False), info


# ----------------------------------------------------------------------------------------------------
# evaluation and sampling


def _windows(ids: Tensor, context: int, max_windows: int) -> Tensor:
    """Up to ``max_windows`` non-overlapping windows [n, context] of ids, evenly spread over the text."""
    n = ids.numel() // context
    if n < 1:
        raise ValueError(f"kd demo: {ids.numel()} validation characters for a context of {context}")
    starts = torch.arange(n) * context
    if n > max_windows:
        starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
    return ids[starts.to(ids.device)[:, None] + torch.arange(context, device=ids.device)]


@torch.no_grad()
def evaluate_lm(model: CharLM, ids: Tensor, context: Optional[int] = None, max_windows: int = 256,
                batch_size: int = 64) -> float:
    """Mean next-character cross-entropy in nats over non-overlapping windows of ``context`` characters
    (positions 1..L-1 of each window, predicted from the ones before). exp() is the perplexity."""
    context = context or model.config.context
    was = model.training
    model.eval()
    try:
        win = _windows(ids.to(next(model.parameters()).device), context, max_windows)
        total, count = 0.0, 0
        for i in range(0, win.shape[0], batch_size):
            x = win[i:i + batch_size]
            logits = model(x)[:, :-1]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += x[:, 1:].numel()
        return total / count
    finally:
        model.train(was)


@torch.no_grad()
def generate(model: CharLM, prompt: str, n: int, temperature: float = 0.0, seed: int = 0) -> str:
    """``n`` characters after ``prompt``: greedy when temperature is 0, else sampled from softmax(z / T) with
    a seeded host generator. The window slides over the last ``context - 1`` characters: in training the last
    position never predicts anything (llm_kd's shifted labels leave it without a target), so its position
    embedding is untrained as a predictor."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = encode(prompt).tolist() or [VOCAB.index("\n")]
    out = []
    try:
        for _ in range(n):
            x = torch.tensor([ids[-max(1, model.config.context - 1):]], device=dev)
            z = model(x)[0, -1].float().cpu()
            z[UNK] = -math.inf  # never emit the unknown symbol
            if temperature <= 0:
                nxt = int(z.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=g))
            ids.append(nxt)
            out.append(nxt)
    finally:
        model.train(was)
    return decode(out)


# ----------------------------------------------------------------------------------------------------
# memory: the eager loss with materialized logits vs fused_linear_kd_loss


def eager_kd_loss(h: Tensor, w: Tensor, h_t: Tensor, w_t: Tensor, targets: Tensor, *, temperature: float = 1.0,
                  hard_weight: float = 0.0, soft_weight: float = 1.0, ignore_index: int = -100) -> Tensor:
    """fused_linear_kd_loss's forward-KL loss written in plain PyTorch: both heads' logits [N, V] in memory,
    log-softmaxes, ``kl_div`` per row and the label cross-entropy, divided by the valid targets."""
    cd = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 inputs (the op's rule)
    logits, t_logits = F.linear(h, w).to(cd), F.linear(h_t, w_t).to(cd)
    valid = targets != ignore_index
    n = valid.sum().clamp(min=1)
    logp = F.log_softmax(logits / temperature, dim=-1)
    logq = F.log_softmax(t_logits / temperature, dim=-1)
    soft = (F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1) * valid).sum()
    loss = soft_weight * soft
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss / n


@contextlib.contextmanager
def _quiet_stderr():
    """fd 2 to /dev/null (the profiler's native library prints start/stop lines there)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of live bytes allocated while fn runs on the CPU, from torch.profiler's memory events: each op's
    own allocations at its start, its own frees at its end (an upper bound on the true peak)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    marks = []
    for e in prof.events():
        b = e.self_cpu_memory_usage
        if b > 0:
            marks.append((e.time_range.start, 0, b))
        elif b < 0:
            marks.append((e.time_range.end, 1, b))
    live = peak = 0
    for _, _, b in sorted(marks):
        live += b
        peak = max(peak, live)
    return peak


def _measure(fn: Callable[[], None], device: torch.device) -> dict:
    """{"peak_bytes", "saved_bytes"} of fn (a forward and backward)."""
    saved: dict = {}

    def pack(t):
        try:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a subclass)
            saved[id(t)] = t.numel() * t.element_size()
        return t

    def run():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _cpu_peak_bytes(run)
    return {"peak_bytes": int(peak), "saved_bytes": int(sum(saved.values()))}


def kd_loss_memory(student: CharLM, teacher: CharLM, input_ids: Tensor, *, temperature: float = 1.0,
                   hard_weight: float = 0.0, chunk_size: Optional[int] = None,
                   pack_valid: Optional[bool] = None) -> dict:
    """One KD loss forward + backward at the batch ``input_ids`` [B, L], from the two models' hidden states
    (computed beforehand, not counted), eager (``eager_kd_loss``) and fused (``fused_linear_kd_loss`` with
    ``chunk_size`` and ``pack_valid``): peak live bytes and bytes saved for the backward of each, the
    [tokens x V] logit size, and both losses (they agree to float32 rounding). Gradients go to the student's
    hidden states and head; ``grads_agree`` says whether the two runs' gradients match (rtol 1e-3)."""
    dev = input_ids.device
    with torch.no_grad():
        h0, h_t = student.hidden(input_ids), teacher.hidden(input_ids)
    H = h0.shape[-1]
    h0, h_t = h0.reshape(-1, H).contiguous(), h_t.reshape(-1, h_t.shape[-1]).contiguous()
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100).reshape(-1)
    w_t = teacher.head.weight.detach()
    w0 = student.head.weight.detach()
    N, V = h0.shape[0], w0.shape[0]
    losses = {}

    def leaves():
        return h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)

    def eager():
        h, w = inputs["eager"]
        loss = eager_kd_loss(h, w, h_t, w_t, targets, temperature=temperature, hard_weight=hard_weight)
        loss.backward()
        losses["eager"] = loss.detach()

    def fused():
        h, w = inputs["fused"]
        loss = flashdistill.fused_linear_kd_loss(h, w, teacher_hidden=h_t, teacher_weight=w_t, labels=targets,
                                                 temperature=temperature, hard_weight=hard_weight,
                                                 chunk_size=chunk_size, pack_valid=pack_valid)
        loss.backward()
        losses["fused"] = loss.detach()

    inputs = {"eager": leaves(), "fused": leaves()}
    eager_m, fused_m = _measure(eager, dev), _measure(fused, dev)
    grads_agree = all(torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6)
                      for a, b in zip(inputs["eager"], inputs["fused"]))
    logit_bytes = N * V * 4
    return {"tokens": N, "vocab": V, "hidden": H, "chunk_size": chunk_size, "pack_valid": pack_valid,
            "logits_bytes": logit_bytes,
            "eager": eager_m, "fused": fused_m, "peak_saved_bytes": eager_m["peak_bytes"] - fused_m["peak_bytes"],
            "peak_ratio": eager_m["peak_bytes"] / max(fused_m["peak_bytes"], 1),
            "loss_eager": float(losses["eager"]), "loss_fused": float(losses["fused"]), "grads_agree": grads_agree,
            "method": ("torch.cuda.max_memory_allocated over the memory held before" if dev.type == "cuda" else
                       "torch.profiler CPU memory events (allocations at an op's start, frees at its end)")}


def analytic_logit_memory(tokens: int = 8 * 4096, vocab: int = 128_256, *, logit_bytes: int = 2,
                          chunk_bytes: int = 512 << 20) -> dict:
    """Computed, not measured: the [tokens x V] tensors of one eager KD loss against the fused op's chunk
    workspace, at an LLM's size (default: 8 sequences x 4096 tokens, Llama 3's 128,256-symbol vocabulary).

    Eager, a lower bound of what ``eager_kd_loss`` holds at once: the student's and the teacher's logits in
    the model dtype (``logit_bytes`` each per element: 2 for bf16, 4 for fp32), both log-softmaxes in float32
    and the float32 gradient of the student's log-probs: tokens x V x (2 logit_bytes + 3 x 4). (The demo's
    measured eager peak is ~7 float32 [tokens x V] tensors, above this formula's 5 at fp32: the elementwise
    KL and the gradients of the backward add theirs.) Fused: per chunk of c rows the student
    and teacher logits in float32, c x V x 8 bytes, c chosen so that this is ``chunk_bytes`` (the op's GPU
    default, 512 MiB) or the whole batch if smaller. Hidden states, heads and their gradients are the same
    in both and not counted."""
    per = 2 * logit_bytes + 3 * 4
    eager = tokens * vocab * per
    chunk = max(1, min(tokens, chunk_bytes // (vocab * 8)))
    fused = chunk * vocab * 8
    return {"kind": "analytic (computed, not measured)", "tokens": tokens, "vocab": vocab,
            "logit_dtype_bytes": logit_bytes, "eager_bytes": eager, "fused_bytes": fused, "fused_chunk_rows": chunk,
            "saved_bytes": eager - fused, "ratio": eager / fused,
            "eager_formula": f"tokens x V x (2 x {logit_bytes} + 3 x 4) bytes",
            "fused_formula": "chunk x V x 8 bytes, chunk = 512 MiB / (V x 8)"}


# ----------------------------------------------------------------------------------------------------
# report


# (key, header, format)
KD_COLUMNS = (
    ("name", "model", "{}"),
    ("params", "params", "{:,d}"),
    ("val_loss", "val loss (nats/char)", "{:.3f}"),
    ("val_ppl", "perplexity", "{:.2f}"),
    ("val_bpc", "bits/char", "{:.3f}"),
    ("steps", "train steps", "{:d}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
)


def _mib(b) -> str:
    return f"{b / 2**20:,.2f} MiB" if b < 2**30 else f"{b / 2**30:,.1f} GiB"


def format_kd_table(report: dict) -> str:
    """The result rows as a table, then the memory comparison (measured, then analytic) and the samples."""
    out = [R.format_table(report["results"], KD_COLUMNS)]
    m = report.get("memory", {})
    if "measured" in m:
        x = m["measured"]
        out += ["", f"KD loss memory, measured at the demo's batch ({x['tokens']:,} tokens x {x['vocab']} symbols, "
                    f"hidden {x['hidden']}; {x['method']}):",
                f"  eager (materialized logits)        peak {_mib(x['eager']['peak_bytes'])}, "
                f"saved for backward {_mib(x['eager']['saved_bytes'])}",
                f"  fused_linear_kd_loss (chunk {x['chunk_size']})   peak {_mib(x['fused']['peak_bytes'])}, "
                f"saved for backward {_mib(x['fused']['saved_bytes'])}",
                f"  saved: {_mib(x['peak_saved_bytes'])} of peak ({x['peak_ratio']:.1f}x less); losses "
                f"{x['loss_eager']:.5f} eager, {x['loss_fused']:.5f} fused"]
    for a in m.get("analytic", []):
        out.append(f"KD loss memory, ANALYTIC (computed, not measured) at {a['tokens']:,} tokens x {a['vocab']:,} "
                   f"vocab, {'bf16' if a['logit_dtype_bytes'] == 2 else 'fp32'} logits: eager "
                   f"{_mib(a['eager_bytes'])} vs fused {_mib(a['fused_bytes'])} ({a['ratio']:.0f}x)")
    if report.get("samples"):
        out.append("")
        for name, s in report["samples"].items():
            for kind, text in s.items():
                out.append(f"  {name:<18} {kind:<9} {text!r}")
    return "\n".join(out)


def _save_kd_figure(path: Path, curves: dict, memory: dict, title: str) -> Path:
    """Two panels: training / validation loss curves and the measured peak memory."""
    D.require_demo_extra("matplotlib", "the figure")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8), dpi=120)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, (xs, ys, style, color) in curves.items():
        if len(xs) == 1:  # a constant (the teacher's validation loss)
            ax.axhline(ys[0], ls=":", color=color, lw=1.2, label=label)
        else:
            ax.plot(xs, ys, style, lw=1.2, label=label, ms=3, color=color)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel("nats / character", fontsize=8)
    ax.set_title("loss", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    x = memory["measured"]
    vals = [x["eager"]["peak_bytes"] / 2**20, x["fused"]["peak_bytes"] / 2**20]
    bx.bar(["eager (logits)", f"fused (chunk {x['chunk_size']})"], vals, color=["tab:red", "tab:green"])
    for i, v in enumerate(vals):
        bx.text(i, v, f"{v:.2f} MiB", ha="center", va="bottom", fontsize=8)
    bx.set_title(f"peak memory of one KD loss fwd+bwd, measured ({x['tokens']:,} tokens x {x['vocab']})", fontsize=9)
    bx.set_ylabel("MiB", fontsize=8)
    bx.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------------------------
# the demo


PROMPTS = (("Return the ", 0.0), ("This module ", 0.8))


def run_kd_demo(*, out: Path, device=None, steps: Optional[int] = None, seed: int = 0, progress: bool = True,
                quick: bool = False, log: Optional[Callable[[str], None]] = print, cache_dir=None,
                config: Optional[KDConfig] = None) -> dict:
    """The whole language-model demo (module docstring): text, cached teacher, distilled and scratch students,
    evaluation, memory, samples. ``steps`` overrides the students' step count; ``seed`` their initialisation
    and batches (the teacher is the cached one of ``config``); ``quick`` the tiny QUICK config (tests);
    ``cache_dir`` the cache folder (default ``data.cache_dir()``). Writes ``out/kd.json`` and ``out/kd.png``,
    logs a table, returns the report dict (the JSON's content)."""
    t_start = time.perf_counter()
    log = log or (lambda s: None)
    cfg = config or (QUICK if quick else DEFAULT)
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"run_kd_demo: steps must be an int >= 1, got {steps!r}")
        cfg = replace(cfg, student_train=replace(cfg.student_train, steps=steps,
                                                 warmup=min(cfg.student_train.warmup, max(1, steps // 10))))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(cfg.val_fraction)
    log(f"kd demo: {corpus['documents']:,} standard-library docstrings, {corpus['train'].numel():,} training and "
        f"{corpus['val'].numel():,} validation characters ({corpus['val_documents']} documents), vocabulary "
        f"{VOCAB_SIZE}; device {dev}")
    train_ids, val_ids = corpus["train"].to(dev), corpus["val"].to(dev)

    teacher, tinfo = load_or_train_teacher(corpus, config=cfg, device=dev, cache_dir=cache_dir, progress=progress,
                                           log=log)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scratch = CharLM(cfg.student).to(dev)
    student = copy.deepcopy(scratch)
    ctx, tc = cfg.student.context, cfg.student_train
    initial = evaluate_lm(student, val_ids, ctx, cfg.eval_windows)

    points = sorted({max(1, round(tc.steps * (i + 1) / cfg.curve_points)) for i in range(cfg.curve_points)})
    val_curves: dict = {"student (KD)": [(0, evaluate_lm(student, val_ids, ctx, cfg.curve_windows))],
                        "student (scratch)": [(0, evaluate_lm(scratch, val_ids, ctx, cfg.curve_windows))]}

    def recorder(name, model):
        return lambda n: val_curves[name].append((n, evaluate_lm(model, val_ids, ctx, cfg.curve_windows)))

    kd = distill(student, teacher, train_ids, tc, config=cfg, seed=seed + 1, progress=progress,
                 log_every=cfg.log_every, on_point=recorder("student (KD)", student), points=points)
    sc = train_lm(scratch, train_ids, tc, seed=seed + 1, name="student (scratch, cross-entropy)", progress=progress,
                  log_every=cfg.log_every, on_point=recorder("student (scratch)", scratch), points=points)
    for m in (student, scratch):
        m.eval()

    def row(name, model, steps_, seconds, tps):
        loss = evaluate_lm(model, val_ids, ctx, cfg.eval_windows)
        return {"name": name, "params": model.num_parameters(), "val_loss": loss, "val_ppl": math.exp(loss),
                "val_bpc": loss / math.log(2), "steps": steps_, "train_seconds": seconds, "tokens_per_s": tps}

    rows = [row("teacher", teacher, cfg.teacher_train.steps, tinfo["train_seconds"], tinfo["tokens_per_s"]),
            row("student (KD)", student, tc.steps, kd["seconds"], kd["tokens_per_s"]),
            row("student (scratch)", scratch, tc.steps, sc["seconds"], sc["tokens_per_s"]),
            {"name": "student (init)", "params": scratch.num_parameters(), "val_loss": initial,
             "val_ppl": math.exp(initial), "val_bpc": initial / math.log(2), "steps": 0}]

    mem_batch = _Batches(val_ids, tc.batch_size, ctx, seed)()  # the training batch's shape
    measured = kd_loss_memory(student, teacher, mem_batch, temperature=cfg.temperature, hard_weight=cfg.hard_weight,
                              chunk_size=cfg.chunk_size, pack_valid=cfg.pack_valid)
    memory = {"measured": measured, "analytic": [analytic_logit_memory(logit_bytes=2),
                                                 analytic_logit_memory(logit_bytes=4)]}

    samples = {}
    for name, model in (("teacher", teacher), ("student (KD)", student), ("student (scratch)", scratch)):
        samples[name] = {}
        for prompt, temp in PROMPTS:
            text = generate(model, prompt, cfg.sample_chars, temperature=temp, seed=seed)
            samples[name][f"{'greedy' if temp == 0 else f'T={temp}'}"] = prompt + text

    soft_key = "KL(teacher||student)" if cfg.divergence == "forward_kl" else cfg.divergence
    if cfg.hard_weight:
        soft_key = f"loss ({soft_key} + {cfg.hard_weight:g} CE)"
    le = cfg.log_every

    def xs(curve, steps_):  # the step that ends each logged window (the last one may be shorter)
        return [min((i + 1) * le, steps_) for i in range(len(curve))]

    color = {"teacher": "tab:blue", "student (KD)": "tab:orange", "student (scratch)": "tab:green"}
    curves = {"teacher train CE": (xs(tinfo["curve"], cfg.teacher_train.steps), tinfo["curve"], "-", color["teacher"]),
              "teacher val CE": ([0], [rows[0]["val_loss"]], ":", color["teacher"]),
              f"KD student train {soft_key}": (xs(kd["curve"], tc.steps), kd["curve"], "-", color["student (KD)"]),
              "scratch student train CE": (xs(sc["curve"], tc.steps), sc["curve"], "-", color["student (scratch)"])}
    for name, pts in val_curves.items():
        curves[f"{name} val CE"] = ([p[0] for p in pts], [p[1] for p in pts], "o--", color[name])
    total = time.perf_counter() - t_start
    report = {
        "task": "kd", "device": str(dev), "quick": quick, "seed": seed, "config": cfg.to_dict(),
        "corpus": {k: v for k, v in corpus.items() if k not in ("train", "val")} |
                  {"train_chars": corpus["train"].numel(), "val_chars": corpus["val"].numel(),
                   "vocab_size": VOCAB_SIZE, "modules": len(STDLIB_MODULES)},
        "teacher": {k: v for k, v in tinfo.items() if k != "curve"},
        "results": rows, "initial_student_val_loss": initial,
        "kd_vs_scratch": {"val_loss_difference": rows[2]["val_loss"] - rows[1]["val_loss"],
                          "kd_better": rows[1]["val_loss"] < rows[2]["val_loss"]},
        "capture_mode": {"student (KD)": kd["capture_mode"], "student (scratch)": sc["capture_mode"]},
        "memory": memory, "samples": samples,
        "curves": {"teacher_train_ce": tinfo["curve"], "kd_train_loss": kd["curve"], "scratch_train_ce": sc["curve"],
                   "log_every": le, "val": {k: [list(p) for p in v] for k, v in val_curves.items()}},
        "seconds": {"total": total, "teacher": tinfo["train_seconds"], "teacher_loaded": tinfo["loaded"],
                    "kd_student": kd["seconds"], "scratch_student": sc["seconds"]},
    }
    R.write_json(out / "kd.json", rows, **{k: v for k, v in report.items() if k != "results"})
    _save_kd_figure(out / "kd.png", curves, memory,
                    f"char-level LM distillation on stdlib docstrings: teacher {rows[0]['params']:,} params, "
                    f"students {rows[1]['params']:,}")
    report["files"] = {"json": str(out / "kd.json"), "png": str(out / "kd.png")}
    log(format_kd_table(report))
    log(f"kd demo: {total:.0f} s in all; wrote {out / 'kd.json'} and {out / 'kd.png'}")
    return report
