"""``flashdistill demo``: the 8x8 digits teacher distilled into a one-step student, end to end.

Stages (each with a progress bar or one line; cached stages say where their file is):

1. data         scikit-learn's 1,797 handwritten digits, [-1, 1], split in halves (train / held out)
2. classifier   a small CNN on the train half (cached): its features give the Frechet distance, its
                predictions the class coverage and the label accuracy (engine/demo/evaluate.py)
3. teacher      a class-conditional DiT trained with ``dsm_loss`` (cached; engine/demo/teacher.py)
4. baseline     real held-out images, the teacher at several DDIM step counts (guidance fused into the
                step), the student as initialised: FD, coverage, accuracy, samples per second
5. distill      the one-step student trained with a recipe (``--method dmd2 | sid | vsd | consistency``),
                each step through ``engine.capture`` (a CUDA graph on a GPU; eager on the CPU, or
                ``--capture compile``)
6. report       the table on stdout, ``<out>/demo.json``, ``<out>/demo.png`` (sample grids side by side and
                the loss curves)

The student is DMD2's initialisation (a copy of the teacher read once at t = T - 1, engine/demo/dit.py);
the fake score of dmd2 / sid / vsd is another copy of the teacher, trained on the student's samples;
consistency distillation trains the student's network as an LCM consistency function on the train half
(its EMA copy is the target) and samples it in one step the same way.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import flashdistill
from flashdistill.engine import Engine, recipes
from flashdistill.engine.demo import data as D
from flashdistill.engine.demo import evaluate as E
from flashdistill.engine.demo import report as R
from flashdistill.engine.demo import teacher as T
from flashdistill.engine.demo.dit import OneStepGenerator, student_from_teacher

__all__ = ["DistillConfig", "METHODS", "run_demo"]

METHODS = ("dmd2", "sid", "vsd", "consistency")


@dataclass
class DistillConfig:
    """The distillation's knobs; defaults fit the 5-minute budget on 2 CPU cores."""

    method: str = "dmd2"
    steps: int = 600  # iterations (one generator update each for dmd2/sid/vsd; see fake_updates)
    batch_size: int = 64
    gen_lr: float = 2e-4
    fake_lr: float = 4e-4
    guidance: float = 1.5  # the teacher's guidance (Ho form) in the distillation target and its own samples
    fake_updates: int = 1  # dmd2's two-time-scale ratio; 1 is enough at this size
    log_every: int = 10
    eval_samples: int = 1000
    teacher_steps_eval: tuple = (1, 2, 4, 8, 16)
    seed: int = 0


def _say(log: Callable, text: str) -> None:
    if log:
        log(text)


def _timed_samples(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple:
    """(samples, seconds) of ``fn``, run once untimed (compile, caches), then timed once."""
    with torch.no_grad():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        x = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return x, time.perf_counter() - t0


def _build_recipe(cfg: DistillConfig, teacher, student: OneStepGenerator, schedule, source, device):
    null = torch.full((1,), teacher.null_class, dtype=torch.int64, device=device)
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.99), fused=True)  # noqa: E731  DMD2's betas
    if cfg.method == "consistency":
        ema = copy.deepcopy(student.net).requires_grad_(False)
        opt = adamw(student.net.parameters(), cfg.gen_lr)
        recipe = recipes.consistency(student.net, teacher, ema, optimizer=opt, schedule=schedule, source=source,
                                     num_ddim_timesteps=50, prediction=teacher.prediction, guidance=cfg.guidance,
                                     null_cond=null, kind="pseudo_huber")
        return recipe, ema
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    common = dict(gen_optimizer=adamw(student.parameters(), cfg.gen_lr), fake_optimizer=adamw(fake.parameters(),
                  cfg.fake_lr), schedule=schedule, source=source, sample_shape=D.IMAGE_SHAPE,
                  prediction=teacher.prediction, guidance=cfg.guidance, null_cond=null)
    if cfg.method == "dmd2":
        return recipes.dmd2(student, teacher, fake, fake_updates=cfg.fake_updates, **common), None
    if cfg.method == "sid":
        return recipes.sid(student, teacher, fake, alpha=1.0, **common), None
    return recipes.vsd(student, teacher, fake, **common), None


def run_demo(*, method: str = "dmd2", device=None, steps: Optional[int] = None, seed: int = 0,
             out: Path = Path("demo-out"), capture: str = "auto", teacher_steps: Optional[int] = None,
             quick: bool = False, progress: bool = True, cache_dir=None, log: Callable = print) -> dict:
    """Runs the stages of the module docstring; returns the JSON's content. ``quick``: tiny sizes (tests)."""
    if method not in METHODS:
        raise ValueError(f"demo: method={method!r} is not one of {', '.join(METHODS)}")
    if capture not in ("auto", "eager", "compile", "graph"):
        raise ValueError(f"demo: capture={capture!r} is not one of auto, eager, compile, graph")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"demo: steps must be an int >= 1, got {steps!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    cfg = DistillConfig(method=method, seed=seed)
    tcfg = T.TeacherConfig(seed=seed)
    if quick:
        cfg = DistillConfig(method=method, seed=seed, steps=4, batch_size=16, log_every=1, eval_samples=100,
                            teacher_steps_eval=(1, 4))
        tcfg = T.TeacherConfig(seed=seed, steps=20, batch_size=32)
    if steps is not None:
        cfg.steps = steps
    if teacher_steps is not None:
        tcfg = T.TeacherConfig(seed=seed, steps=teacher_steps, batch_size=tcfg.batch_size)
    stamp = {}

    # 1-2. data and classifier
    x_all, y_all = D.load_digits(device=device)
    tr, ev = D.train_eval_split(x_all.shape[0], 0.5, seed=0, labels=y_all)
    x_tr, y_tr = x_all[tr.to(device)], y_all[tr.to(device)]
    x_ev, y_ev = x_all[ev.to(device)], y_all[ev.to(device)]
    _say(log, f"data: {x_all.shape[0]} digits 8x8 (scikit-learn), {x_tr.shape[0]} train / {x_ev.shape[0]} held out; "
              f"device {device}, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    clf, acc, clf_path = E.load_or_train_classifier(cache_dir, images=x_tr, labels=y_tr, eval_images=x_ev,
                                                    eval_labels=y_ev, epochs=5 if quick else 30, seed=seed,
                                                    progress=progress, log=log)
    stamp["classifier_s"] = time.perf_counter() - t0
    _say(log, f"classifier: held-out accuracy {acc:.3f}")
    evaluator = E.Evaluator(clf, x_tr)

    # 3. teacher
    t0 = time.perf_counter()
    teacher, teacher_losses, teacher_path = T.load_or_train_teacher(cache_dir, config=tcfg, images=x_tr, labels=y_tr,
                                                                    device=device, progress=progress, log=log)
    stamp["teacher_s"] = time.perf_counter() - t0
    schedule = tcfg.schedule(device)

    # 4. baselines
    n = cfg.eval_samples
    labels = T.class_labels(n, device=device)
    rows = [evaluator.evaluate_samples("real (held out)", x_ev, labels=y_ev)]
    grids = {"real": D.class_ordered(x_ev, y_ev, 100)}
    for k in cfg.teacher_steps_eval:
        xs, sec = _timed_samples(lambda: T.sample_teacher(teacher, n, k, schedule=schedule, guidance=cfg.guidance,
                                                          seed=seed + 1, cond=labels), device)
        rows.append(evaluator.evaluate_samples(f"teacher, {k} DDIM step{'s' if k > 1 else ''}", xs, sec, labels))
        if k == max(cfg.teacher_steps_eval):
            grids[f"teacher, {k} steps"] = xs[:100]
    student = student_from_teacher(teacher, schedule)
    xs, sec = _timed_samples(lambda: T.sample_student(student, n, seed=seed + 2, cond=labels), device)
    rows.append(evaluator.evaluate_samples("student, before distillation (1 step)", xs, sec, labels))
    grids["student before"] = xs[:100]
    fd_before = rows[-1]["fd"]

    # 5. distillation
    source = flashdistill.NoiseSource(seed + 3, device=device)
    recipe, _ = _build_recipe(cfg, teacher, student, schedule, source, device)
    mode = {"auto": "graph" if device.type == "cuda" else "eager"}.get(capture, capture)
    engine = Engine(mode=mode, verbose=False)
    g = torch.Generator(device="cpu").manual_seed(seed + 4)

    def batch():
        idx = torch.randint(0, x_tr.shape[0], (cfg.batch_size,), generator=g).to(device)
        if cfg.method == "consistency":
            return (x_tr[idx], y_tr[idx])
        return (y_tr[idx],)  # dmd2 / sid / vsd: the class labels the student generates

    t0 = time.perf_counter()
    example = batch()
    steps_fns = {name: engine.capture(step, *example, name=name) for name, step in recipe.steps.items()}
    stamp["capture_s"] = time.perf_counter() - t0
    _say(log, f"distill: {method}, {cfg.steps} iterations of batch {cfg.batch_size}, steps "
              f"{', '.join(recipe.steps)} captured as {mode} in {stamp['capture_s']:.1f} s")
    curves = {name: [] for name in recipe.steps}
    bar = _progress(cfg.steps, f"distill ({method})", progress)
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        b = batch()
        for name in recipe.due(i):
            metrics = steps_fns[name](*b)
            if i % cfg.log_every == 0:
                curves[name].append(metrics["loss"].item())
        if bar is not None:
            bar.update(1)
            if i % cfg.log_every == 0:
                bar.set_postfix({k: f"{v[-1]:.3g}" for k, v in curves.items() if v})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stamp["distill_s"] = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if cfg.method == "consistency":  # the trained consistency function, read once at t = T - 1
        student = OneStepGenerator(student.net, schedule)
    student.eval()
    xs, sec = _timed_samples(lambda: T.sample_student(student, n, seed=seed + 2, cond=labels), device)
    rows.append(evaluator.evaluate_samples(f"student, {method} (1 step)", xs, sec, labels))
    grids[f"student, {method}"] = xs[:100]

    # 6. report
    stamp["total_s"] = time.perf_counter() - t_start
    table = R.format_table(rows)
    print(table)
    summary = (f"one-step student: FD {fd_before:.1f} -> {rows[-1]['fd']:.1f} after {cfg.steps} {method} iterations "
               f"({stamp['distill_s']:.0f} s); whole demo {stamp['total_s']:.0f} s")
    print(summary)
    curves_fig = {"teacher (dsm)": teacher_losses, **{f"{method} {k}": v for k, v in curves.items()}}
    meta = dict(method=method, device=str(device), capture=mode, seed=seed, config=asdict(cfg),
                teacher=tcfg.to_dict(), teacher_cache=str(teacher_path), classifier_cache=str(clf_path),
                classifier_accuracy=acc, seconds=stamp, curves=curves, flashdistill=flashdistill.__version__,
                torch=torch.__version__)
    json_path = R.write_json(out / "demo.json", rows, **meta)
    png_path = R.save_figure(out / "demo.png", grids, curves_fig,
                             title=f"flashdistill demo: {method} on 8x8 digits ({device})")
    _say(log, f"wrote {json_path} and {png_path}")
    return json.loads(Path(json_path).read_text())


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
