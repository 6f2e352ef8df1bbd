"""The pieces of `flashdistill demo` (issue #8) at tiny sizes: data, the DiT, the teacher's training,
caching and sampling, the one-step student's initialisation, the evaluation (Frechet distance, class
coverage) and the report files. CPU only; the whole file runs in well under a minute."""

import json
import math
import sys

import pytest
import torch

import flashdistill
from flashdistill.engine.demo import data as D
from flashdistill.engine.demo import evaluate as E
from flashdistill.engine.demo import report as R
from flashdistill.engine.demo import teacher as TT
from flashdistill.engine.demo.dit import DiT, DiTConfig, OneStepGenerator, student_from_teacher

pytest.importorskip("sklearn")

TINY = DiTConfig(width=32, depth=2, heads=2, freq_dim=32)


@pytest.fixture(scope="module")
def digits():
    x, y = D.load_digits()
    tr, ev = D.train_eval_split(x.shape[0], 0.5, seed=0, labels=y)
    return x, y, tr, ev


@pytest.fixture(scope="module")
def classifier(digits):
    x, y, tr, ev = digits
    return E.train_classifier(x[tr], y[tr], epochs=6, batch_size=128, lr=4e-3, progress=False)


# ---- data --------------------------------------------------------------------------------------------

def test_load_digits_shapes_and_range(digits):
    x, y, _, _ = digits
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(torch.unique(y), torch.arange(10))
    assert D.load_digits(dtype=torch.float64)[0].dtype == torch.float64


def test_split_is_deterministic_disjoint_stratified(digits):
    x, y, tr, ev = digits
    assert torch.equal(torch.sort(torch.cat([tr, ev])).values, torch.arange(1797))
    tr2, ev2 = D.train_eval_split(1797, 0.5, seed=0, labels=y)
    assert torch.equal(tr, tr2) and torch.equal(ev, ev2)
    assert not torch.equal(D.train_eval_split(1797, 0.5, seed=1, labels=y)[1], ev)
    per_tr, per_ev = torch.bincount(y[tr], minlength=10), torch.bincount(y[ev], minlength=10)
    assert (per_tr - per_ev).abs().max().item() <= 1
    with pytest.raises(ValueError, match="eval_fraction"):
        D.train_eval_split(10, 1.0)


def test_class_ordered_lines_up_with_class_labels(digits):
    x, y, _, ev = digits
    grid = D.class_ordered(x[ev], y[ev], 23)
    assert grid.shape == (23, 1, 8, 8)
    want = TT.class_labels(23)
    for i in range(23):
        assert any(torch.equal(grid[i], img) for img in x[ev][y[ev] == want[i]])
    with pytest.raises(ValueError, match="fewer than"):
        D.class_ordered(x[:20], y[:20], 100)


def test_missing_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'flashdistill\[demo\]'"):
        D.load_digits()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDISTILL_CACHE", str(tmp_path / "c"))
    assert D.cache_dir() == tmp_path / "c" / "demo" and (tmp_path / "c" / "demo").is_dir()
    assert D.cache_dir(tmp_path / "x") == tmp_path / "x"


# ---- DiT ---------------------------------------------------------------------------------------------

def _randomize(model):
    """Leave the adaLN-Zero initialisation (zero gates and output: no gradient reaches attention yet)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("B", [1, 5, 7])
def test_dit_forward_backward_through_flashdistill_attention(monkeypatch, B):
    calls = []
    real = flashdistill.attention

    def counting(q, k, v, **kw):
        calls.append(tuple(q.shape))
        return real(q, k, v, **kw)
    monkeypatch.setattr(flashdistill, "attention", counting)
    torch.manual_seed(0)
    model = DiT(TINY)
    _randomize(model)
    x = torch.randn(B, 1, 8, 8)
    t = torch.randint(0, 1000, (B,))
    cond = torch.randint(0, 11, (B,))  # 10 = the null class
    cond[0] = model.null_class
    out = model(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert calls == [(B, 2, 16, 16)] * TINY.depth  # 16 tokens of 2x2 patches, 2 heads of 16
    out.square().sum().backward()
    for blk in model.blocks:
        assert blk.attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dit_zero_init_and_errors():
    model = DiT(TINY)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, 10])), torch.zeros_like(x))
    model(x, 3.5, torch.tensor([0, 1, 2]))  # a scalar (float) t broadcasts
    with pytest.raises(ValueError, match="cond must be int64"):
        model(x, torch.tensor([1, 2, 3]), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="x_t must be"):
        model(torch.randn(3, 1, 7, 7), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="prediction"):
        DiTConfig(prediction="score")


# ---- teacher -----------------------------------------------------------------------------------------

TINY_TEACHER = TT.TeacherConfig(dit=TINY, steps=60, batch_size=64, lr=3e-3, warmup=5, ema=0.9)


def test_teacher_dsm_loss_falls(digits):
    x, y, tr, _ = digits
    model, losses = TT.train_teacher(x[tr], y[tr], config=TINY_TEACHER, progress=False, log_every=10)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.75 * losses[0], f"DSM loss did not fall: {losses}"
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_teacher_training_is_reproducible(digits):
    x, y, tr, _ = digits
    cfg = TT.TeacherConfig(dit=TINY, steps=3, batch_size=16)
    state = torch.get_rng_state()
    (m1, l1), (m2, l2) = (TT.train_teacher(x[tr], y[tr], config=cfg, progress=False) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_teacher_cache_roundtrip(digits, tmp_path, capsys):
    x, y, tr, _ = digits
    cfg = TT.TeacherConfig(dit=TINY, steps=3, batch_size=16)
    m1, l1, p1 = TT.load_or_train_teacher(tmp_path, config=cfg, images=x[tr], labels=y[tr], progress=False)
    assert p1.exists() and p1.parent == tmp_path and p1.name.startswith("teacher-")
    m2, l2, p2 = TT.load_or_train_teacher(tmp_path, config=cfg, images=x[tr], labels=y[tr], progress=False)
    out = capsys.readouterr().out
    assert "cached at" in out and "loaded from cache" in out and str(p1) in out
    assert p1 == p2 and l1 == l2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    _, _, p3 = TT.load_or_train_teacher(tmp_path, config=TT.TeacherConfig(dit=TINY, steps=4, batch_size=16),
                                        images=x[tr], labels=y[tr], progress=False, log=None)
    assert p3 != p1  # another config, another file


def test_sample_teacher_with_and_without_guidance():
    torch.manual_seed(0)
    model = DiT(TINY)
    _randomize(model)
    sched = flashdistill.VPSchedule()
    for guidance in (None, 2.0):
        a = TT.sample_teacher(model, 7, 3, schedule=sched, guidance=guidance, seed=1)
        b = TT.sample_teacher(model, 7, 3, schedule=sched, guidance=guidance, seed=1)
        assert a.shape == (7, 1, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    cond = torch.full((7,), 3)
    assert TT.sample_teacher(model, 7, 2, schedule=sched, cond=cond).shape == (7, 1, 8, 8)
    with pytest.raises(ValueError, match="cond"):
        TT.sample_teacher(model, 7, 2, schedule=sched, cond=torch.zeros(6, dtype=torch.int64))


def test_student_from_teacher_is_x0_at_max_timestep():
    torch.manual_seed(0)
    teacher = DiT(TINY).requires_grad_(False).eval()
    _randomize(teacher)
    sched = flashdistill.VPSchedule()
    student = student_from_teacher(teacher, sched)
    assert isinstance(student, OneStepGenerator) and student.net is not teacher
    z, cond = torch.randn(5, 1, 8, 8), torch.arange(5)
    t = torch.full((5,), 999)
    a, s = sched.coefficients(t)
    want = a.float()[:, None, None, None] * z - s.float()[:, None, None, None] * teacher(z, t, cond)  # v -> x0
    torch.testing.assert_close(student(z, cond), want)
    # training the student leaves the teacher alone
    before = [p.clone() for p in teacher.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student(z, cond).square().mean().backward()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, teacher.parameters()))
    assert not torch.equal(student(z, cond), want)
    assert TT.sample_student(student, 6, seed=0).shape == (6, 1, 8, 8)


# ---- evaluation --------------------------------------------------------------------------------------

def test_frechet_distance_matches_scipy_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(200, 6, generator=g, dtype=torch.float64) + 0.3
    sa, sb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    covmean = scipy_linalg.sqrtm(sa @ sb).real
    want = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + sa.trace() + sb.trace() - 2 * covmean.trace()
    assert E.frechet_distance(a, b) == pytest.approx(want, rel=1e-8, abs=1e-10)
    assert E.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert E.frechet_distance(a.float(), a.float() + 1.0) == pytest.approx(6.0, rel=1e-5)  # |mu shift|^2
    with pytest.raises(ValueError, match="feature dims"):
        E.frechet_distance(a, b[:, :5])


def test_class_coverage_definition():
    balanced = torch.arange(1000) % 10
    assert E.class_coverage(balanced) == 1.0 and E.prediction_entropy(balanced) == pytest.approx(1.0)
    assert E.class_coverage(torch.full((500,), 3)) == 0.1 and E.prediction_entropy(torch.full((500,), 3)) == 0.0
    rare = torch.cat([torch.arange(990) % 9, torch.full((10,), 9)])  # class 9: 1 % < 2 %
    assert E.class_coverage(rare) == pytest.approx(0.9)
    assert E.class_coverage(rare, min_share=0.01) == 1.0
    scores = torch.nn.functional.one_hot(balanced, 10).float()
    assert E.class_coverage(scores) == 1.0


def test_evaluator_real_vs_noise(digits, classifier):
    x, y, tr, ev = digits
    acc = E.accuracy(classifier, x[ev], y[ev])
    assert acc > 0.85, f"tiny classifier accuracy {acc:.3f}"
    evaluator = E.Evaluator(classifier, x[tr])
    real = evaluator.evaluate_samples("real", x[ev], seconds=0.5, labels=y[ev])
    gauss = torch.randn(len(ev), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = evaluator.evaluate_samples("noise", gauss)
    one = evaluator.evaluate_samples("one digit", x[ev][:1].expand(len(ev), 1, 8, 8))
    assert real["fd"] < noise["fd"] / 20, (real["fd"], noise["fd"])
    assert real["coverage"] == 1.0 and one["coverage"] == 0.1
    assert real["accuracy"] == pytest.approx(acc) and noise["accuracy"] is None
    assert real["samples_per_s"] == pytest.approx(len(ev) / 0.5) and noise["samples_per_s"] is None
    assert real["n"] == len(ev) and real["entropy"] > 0.99 and one["entropy"] == 0.0


def test_classifier_cache(digits, tmp_path):
    x, y, tr, ev = digits
    kw = dict(images=x[tr][:200], labels=y[tr][:200], eval_images=x[ev], eval_labels=y[ev], epochs=1, progress=False,
              log=None)
    m1, a1, p1 = E.load_or_train_classifier(tmp_path, **kw)
    m2, a2, p2 = E.load_or_train_classifier(tmp_path, **kw)
    assert p1 == p2 and p1.exists() and a1 == a2
    assert torch.equal(m1.head.weight, m2.head.weight)


# ---- report ------------------------------------------------------------------------------------------

def test_report_files(tmp_path, digits):
    x, y, _, _ = digits
    rows = [{"name": "real", "n": 898, "fd": 1.9, "coverage": 1.0, "entropy": 0.9998, "accuracy": 0.99,
             "samples_per_s": None},
            {"name": "teacher@8", "n": 898, "fd": float("nan"), "coverage": 0.9, "entropy": 0.97, "accuracy": None,
             "samples_per_s": 1234.5}]
    table = R.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and "teacher@8" in lines[3] and "1,234" in lines[3] and "FD" in lines[0]
    p = R.write_json(tmp_path / "out" / "results.json", rows, timings={"teacher_s": 12.0}, curves={"a": [1.0, 0.5]})
    doc = json.loads(p.read_text())
    assert doc["results"][1]["fd"] is None and doc["results"][0]["fd"] == 1.9 and doc["timings"]["teacher_s"] == 12.0
    grids = {"real": x[:100], "teacher@8": x[100:200].flip(-1), "student": torch.randn(37, 1, 8, 8)}
    curves = {"teacher DSM loss": [1.0, 0.5, 0.3], "student": {"generator": [0.2, 0.1], "fake score": [-1.0, 0.5]}}
    png = R.save_figure(tmp_path / "demo.png", grids, curves, title="flashdistill demo")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert R.save_figure(tmp_path / "grids_only.png", {"real": x[:10]}).exists()
    g = R.image_grid(x[:23], nrow=10)
    assert g.shape == (3 * 9 - 1, 10 * 9 - 1) and g.min() >= 0 and g.max() <= 1
