"""`flashdistill demo --task kd` (issue #8, the language-model part) at tiny sizes: the docstring corpus and
its split, the character vocabulary, the causal CharLM on flashdistill.attention, the eager KD loss against
fused_linear_kd_loss (values, gradients, memory), the teacher cache and a quick whole run. CPU only; a few
seconds."""

import json
import math

import pytest
import torch

import flashdistill
from flashdistill.engine.demo import kd as K

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

TINY = K.LMConfig(width=16, depth=2, heads=2, context=16)


# ---- text --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    return K.load_corpus()


def test_corpus_is_deterministic_and_nontrivial(corpus):
    docs = K.corpus_documents()
    assert docs == K.corpus_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 200_000, (len(docs), sum(map(len, docs)))
    assert len(set(docs)) == len(docs) and all(len(d) >= K.MIN_DOC_CHARS for d in docs)
    again = K.load_corpus()
    assert torch.equal(corpus["train"], again["train"]) and torch.equal(corpus["val"], again["val"])
    assert corpus["sha"] == again["sha"]
    n_train, n_val = corpus["train"].numel(), corpus["val"].numel()
    assert n_train > 100_000 and 0.03 < n_val / (n_train + n_val) < 0.2, (n_train, n_val)
    assert corpus["unknown_fraction"] < 1e-3
    # every character class of English text occurs, and the distribution is far from uniform
    counts = torch.bincount(corpus["train"], minlength=K.VOCAB_SIZE)
    assert (counts[K.encode("etaoin sEATQ.,()\n0123")] > 0).all()
    assert counts[K.encode(" ")].item() > 5 * counts.float().mean().item()


def test_split_is_by_document_and_stable():
    docs = [f"document number {i}: " + "x" * 50 for i in range(400)]
    train, val = K.split_documents(docs, 0.25)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 50 < len(val) < 150
    # a document's side does not depend on the others
    train2, val2 = K.split_documents(docs[::-1][:200], 0.25)
    assert set(val2) == set(val) & set(docs[::-1][:200])
    with pytest.raises(ValueError, match="val_fraction"):
        K.split_documents(docs, 1.0)


def test_vocabulary_round_trip_and_unknown():
    assert K.VOCAB_SIZE == 97 and len(set(K.VOCAB)) == 97
    text = "def f(x):\n    return x ** 2  # ~`|{}\\"
    ids = K.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert K.decode(ids) == text
    assert K.encode("a\u00e9\tb").tolist() == [K.encode("a").item(), K.UNK, K.UNK, K.encode("b").item()]
    assert K.encode("").shape == (0,)


# ---- model ---------------------------------------------------------------------------------------------

def test_charlm_uses_causal_flashdistill_attention(monkeypatch):
    calls = []
    real = flashdistill.attention

    def counting(q, k, v, **kw):
        calls.append((tuple(q.shape), kw.get("causal")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(flashdistill, "attention", counting)
    torch.manual_seed(0)
    model = K.CharLM(TINY)
    x = torch.randint(0, K.VOCAB_SIZE, (3, 13))
    h = model.hidden(x)
    assert h.shape == (3, 13, 16) and len(calls) == 2 and all(c == ((3, 2, 13, 8), True) for c in calls)
    logits = model(x)
    assert logits.shape == (3, 13, K.VOCAB_SIZE) and torch.allclose(logits, model.head(h))
    torch.nn.functional.cross_entropy(logits.reshape(-1, K.VOCAB_SIZE), x.reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n != "pos.weight")
    # causal: changing the last token leaves every earlier position's state unchanged
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % K.VOCAB_SIZE
    with torch.no_grad():
        a, b = model.hidden(x), model.hidden(y)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])
    with pytest.raises(ValueError, match="context"):
        model.hidden(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        model.hidden(x, torch.ones_like(x))


def test_generate_is_seeded():
    torch.manual_seed(0)
    model = K.CharLM(TINY)
    a = K.generate(model, "Return the ", 20, temperature=0.8, seed=3)
    assert a == K.generate(model, "Return the ", 20, temperature=0.8, seed=3) and len(a) == 20
    assert K.VOCAB[K.UNK] not in a
    assert len(K.generate(model, "x" * 40, 5)) == 5  # a prompt longer than the context slides


def test_lr_schedule():
    tc = K.TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert tc.lr_at(0) == pytest.approx(0.1) and tc.lr_at(9) == pytest.approx(1.0)
    assert tc.lr_at(10) == pytest.approx(1.0) and tc.lr_at(100) == pytest.approx(0.1)


# ---- the KD loss: eager against fused, memory ------------------------------------------------------------

@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_eager_kd_loss_matches_fused_in_float64(temperature, hard_weight):
    g = torch.Generator().manual_seed(0)
    N, H, Ht, V = 97, 12, 20, K.VOCAB_SIZE
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(N, Ht, generator=g, dtype=torch.float64)
    w_t = torch.randn(V, Ht, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    a = K.eager_kd_loss(h, w, h_t, w_t, targets, temperature=temperature, hard_weight=hard_weight)
    da = torch.autograd.grad(a, (h, w))
    b = flashdistill.fused_linear_kd_loss(h, w, teacher_hidden=h_t, teacher_weight=w_t, labels=targets,
                                          temperature=temperature, hard_weight=hard_weight, chunk_size=31)
    db = torch.autograd.grad(b, (h, w))
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a.item(), b.item())
    for x, y in zip(da, db):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12), (x - y).abs().max().item()


def test_kd_loss_memory_fused_below_eager():
    torch.manual_seed(0)
    student, teacher = K.CharLM(TINY), K.CharLM(K.LMConfig(width=24, depth=1, heads=2, context=16))
    x = torch.randint(1, K.VOCAB_SIZE, (16, 16))
    m = K.kd_loss_memory(student, teacher, x, hard_weight=0.5, chunk_size=32)
    assert m["tokens"] == 256 and m["vocab"] == K.VOCAB_SIZE and m["logits_bytes"] == 256 * 97 * 4
    e, f = m["eager"], m["fused"]
    # eager holds at least the two [tokens x V] float32 logit tensors at once; the fused op a 32-row chunk
    assert e["peak_bytes"] >= 2 * m["logits_bytes"], m
    assert 0 < f["peak_bytes"] < e["peak_bytes"] and f["saved_bytes"] < e["saved_bytes"], m
    assert m["loss_eager"] == pytest.approx(m["loss_fused"], rel=1e-5) and m["grads_agree"]


def test_analytic_logit_memory():
    a = K.analytic_logit_memory(tokens=8 * 4096, vocab=128_256, logit_bytes=2)
    assert a["eager_bytes"] == 8 * 4096 * 128_256 * 16
    assert a["fused_bytes"] <= 512 << 20 and a["ratio"] > 100 and "not measured" in a["kind"]
    small = K.analytic_logit_memory(tokens=10, vocab=100, logit_bytes=4)
    assert small["fused_chunk_rows"] == 10 and small["fused_bytes"] == 10 * 100 * 8


# ---- the whole demo, quick ------------------------------------------------------------------------------------

def test_quick_demo_writes_report_and_distills(tmp_path):
    lines = []
    cache = tmp_path / "cache"
    r = K.run_kd_demo(out=tmp_path / "out", quick=True, progress=False, log=lines.append, cache_dir=cache)
    js = json.loads((tmp_path / "out" / "kd.json").read_text())
    assert (tmp_path / "out" / "kd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [row["name"] for row in js["results"]]
    assert names == ["teacher", "student (KD)", "student (scratch)", "student (init)"]
    rows = {row["name"]: row for row in js["results"]}
    init = js["initial_student_val_loss"]
    assert init == pytest.approx(math.log(K.VOCAB_SIZE), abs=0.1)  # an untrained model is ~uniform
    assert rows["student (KD)"]["val_loss"] < init - 0.5, rows
    assert rows["student (scratch)"]["val_loss"] < init
    for row in js["results"][:3]:
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / math.log(2))
    assert rows["teacher"]["params"] > rows["student (KD)"]["params"] == rows["student (scratch)"]["params"]
    mem = js["memory"]["measured"]
    assert mem["fused"]["peak_bytes"] < mem["eager"]["peak_bytes"] and mem["grads_agree"]
    assert all("not measured" in a["kind"] for a in js["memory"]["analytic"])
    assert set(js["samples"]) == {"teacher", "student (KD)", "student (scratch)"}
    assert js["capture_mode"] == {"student (KD)": "eager", "student (scratch)": "eager"}
    assert js["teacher"]["loaded"] is False and str(cache) in js["teacher"]["path"]
    assert any("perplexity" in line for line in lines) and any("ANALYTIC" in line for line in lines)
    assert r["results"][1]["val_loss"] == js["results"][1]["val_loss"]
    # the second run loads the teacher from the cache and reproduces the students exactly
    r2 = K.run_kd_demo(out=tmp_path / "out2", quick=True, progress=False, log=lines.append, cache_dir=cache)
    assert r2["teacher"]["loaded"] is True and any("loaded from cache" in line for line in lines)
    assert [row["val_loss"] for row in r2["results"]] == [row["val_loss"] for row in r["results"]]


def test_steps_argument():
    with pytest.raises(ValueError, match="steps"):
        K.run_kd_demo(out="unused", steps=0, quick=True)
