"""The ranks of tests/test_distributed.py: each case runs on every rank of a 2-process gloo group.

``main(rank, world, init_file, out_dir, names)`` (the target of ``torch.multiprocessing``'s spawn) joins the group
through a FileStore (no port), runs the named cases in order and writes ``<case>.rank<r>`` to ``out_dir``: "ok",
"skip: <why>" or the traceback. A failing case raises, so the process exits and the launcher ends the other rank
(which may be waiting in a collective); the cases after it are not run.

The oracle of every case is a single-process float64 run on the whole batch (or the whole vocabulary), made on
each rank beside the distributed one. What is equivalent, and why, is said at each case.
"""

from __future__ import annotations

import copy
import datetime
import os
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn

F64 = torch.float64
CASES = {}
TOL = dict(rtol=1e-9, atol=1e-12)  # float64: each side ~1e-15 relative per op over a few dozen; O(1) if wrong


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def main(rank, world, init_file, out_dir, names):
    torch.set_num_threads(1)  # 2 processes on 2 cores; tensors of a few hundred elements
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a lost peer fails a collective, not hangs
    # test_recipes' networks return x.view_as(z), on which FSDP2 warns that an in-place op would skip its
    # pre-backward hook; no step modifies a network's output in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for name in names:
        try:
            CASES[name](rank, world)
        except BaseException as e:  # written for the parent, then re-raised (pytest's Skipped is no Exception)
            if type(e).__name__ == "Skipped":  # pytest.importorskip without transformers
                _write(out_dir, name, rank, f"skip: {e}")
                continue
            _write(out_dir, name, rank, traceback.format_exc())
            raise
        _write(out_dir, name, rank, "ok")
    dist.destroy_process_group()


def _write(out_dir, name, rank, text):
    path = os.path.join(out_dir, f"{name}.rank{rank}")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------
# helpers

def gathered(module):
    """{name: the whole parameter} on every rank: an FSDP2 DTensor shard gathered with full_tensor()."""
    return {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for k, p in module.named_parameters()}


def assert_same_on_ranks(params, what):
    """Every rank holds bit-identical parameters (exchanged with all_gather_object)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, params)
    for r, theirs in enumerate(everyone):
        for k, p in params.items():
            assert torch.equal(p, theirs[k]), f"{what}.{k}: rank {dist.get_rank()} differs from rank {r} " \
                                              f"(max |diff| {(p - theirs[k]).abs().max():.3g})"


def assert_close_params(got, want, what):
    for k, p in got.items():
        torch.testing.assert_close(p, want[k], **TOL, msg=lambda m: f"{what}.{k}: {m}")


def inner(net):
    """The module inside a DDP wrapper (FSDP2 wraps nothing: the module is its own FSDPModule)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


_mesh = []


def mesh():
    """The 1-D device mesh of the world on the CPU (gloo), made once."""
    from torch.distributed.device_mesh import init_device_mesh

    if not _mesh:
        _mesh.append(init_device_mesh("cpu", (dist.get_world_size(),)))
    return _mesh[0]


# ----------------------------------------------------------------------------------------------------
# score distillation (DMD2, SiD): data parallel (DDP, FSDP2) equals one process on the whole batch

SEED, COND, B_RANK = 1234, 4, 3  # 3 samples a rank, 6 in all


class SplitSource:
    """The noise the ranks draw, as one full-batch source for the single-process reference: every draw of
    batch n is rank 0's draw of n / world rows from its source, then rank 1's, ... (the ranks' sources are
    NoiseSource(SEED + r)). Duck-types NoiseSource's randn and rand (uniform_timesteps draws with rand)."""

    def __init__(self, world):
        import flashdistill as fd

        self.sources = [fd.NoiseSource(SEED + r) for r in range(world)]

    def _split(self, draw, shape, dtype):
        n = shape[0] // len(self.sources)
        return torch.cat([getattr(s, draw)((n, *shape[1:]), dtype=dtype) for s in self.sources])

    def randn(self, shape, dtype=torch.float32):
        return self._split("randn", shape, dtype)

    def rand(self, shape, dtype=torch.float32):
        return self._split("rand", shape, dtype)


def score_data_parallel(rank, world, method, wrap, iterations=3):
    """A score-distillation recipe (VP schedule, eps prediction, classifier-free guidance 3; SiD and VSD with the
    fake score's guidances as in test_recipes) with the generator and the fake score wrapped by ``wrap`` (the teacher
    too, for FSDP2), each rank a different 3 of the 6 conditions and its own noise, 3 iterations (DMD2 with
    fake_updates=2: fake + generator, fake, fake + generator); against test_recipes' plain-PyTorch formula
    reference on all 6 conditions with the same noise (SplitSource).

    The equivalence asserted, and why it holds: DDP and FSDP2 average the ranks' gradients, and every loss here
    is a mean over the batch of per-sample terms whose normalizers are per-sample: DSM's mean squared error,
    DMD's 0.5 mean_i (x - sg(x - g))^2 with g = (x0_fake - x0_real) / mean_{i in b} |x - x0_real| (the mean over
    the elements of sample b only), VSD's the same with g = sigma_b^2 (eps_real - eps_fake), SiD's (1/B) sum_b (...) / w_b with w_b = sg(mean_{i in b} |x - r|). So the
    mean of two half-batch gradients is the whole batch's gradient, up to float64 rounding: the same SGD
    (momentum) updates, the same parameters (TOL), and each rank's loss is its half's, the two averaging to the
    reference's. A batch-wide normalizer (e.g. a mean over the batch of |x - x0|) would break this: each rank
    would normalize by its own half."""
    import test_recipes as tr

    import flashdistill as fd

    opts = {"dmd2": dict(guidance=3.0), "vsd": dict(guidance=3.0, fake_guidance=1.5),
            "sid": dict(guidance=3.0, fake_guidance=1.5, fake_train_guidance=2.0)}[method]
    nets = (tr.Gen(COND, 0), tr.Score(COND, 1), tr.Score(COND, 2))
    cond = torch.linspace(-1, 1, world * B_RANK * COND, dtype=F64).reshape(world * B_RANK, COND)
    sched = fd.VPSchedule()
    ref = tr.Reference(method, nets, sched, "eps", opts)
    ref.src = SplitSource(world)
    G, real, fake = (wrap(copy.deepcopy(n), trained) for n, trained in zip(nets, (True, False, True)))
    recipe = tr.BUILDERS[method](G, real, fake, gen_optimizer=tr.sgd(G), fake_optimizer=tr.sgd(fake), schedule=sched,
                                 source=fd.NoiseSource(SEED + rank), sample_shape=tr.SHAPE, prediction="eps",
                                 null_cond=tr.NULL, **opts, **(dict(fake_updates=2) if method == "dmd2" else {}))
    mine = cond[rank * B_RANK:(rank + 1) * B_RANK]
    for i in range(iterations):
        for name in recipe.due(i):
            loss = recipe[name](mine)["loss"].clone()
            want = ref.fake_step(cond) if name == "fake" else ref.generator_step(cond)
            dist.all_reduce(loss)
            torch.testing.assert_close(loss / world, want.detach(), **TOL,
                                       msg=lambda m: f"iteration {i}, step {name}, mean of the ranks' losses: {m}")
    for what, net, ref_net in (("generator", G, ref.G), ("fake_score", fake, ref.fake), ("teacher", real, ref.real)):
        got = gathered(inner(net))
        assert_same_on_ranks(got, what)
        assert_close_params(got, dict(ref_net.named_parameters()), what)
    start = dict(nets[0].named_parameters())
    assert any((p - start[k]).abs().max() > 1e-6 for k, p in gathered(inner(G)).items()), "the generator is unchanged"


def ddp(module, trained):
    """DistributedDataParallel around a trained network; the teacher stays a plain replica."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module) if trained else module


def fsdp2(module, trained):
    """fully_shard on every network, the teacher frozen: sharded parameters, gathered for the checks with
    full_tensor()."""
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module.requires_grad_(trained), mesh=mesh())


@case
def ddp_dmd2(rank, world):
    score_data_parallel(rank, world, "dmd2", ddp)


@case
def fsdp2_dmd2(rank, world):
    score_data_parallel(rank, world, "dmd2", fsdp2)


@case
def ddp_sid(rank, world):
    """SiD's generator step backpropagates through the teacher and the fake score (called through .module)."""
    score_data_parallel(rank, world, "sid", ddp)


@case
def fsdp2_sid(rank, world):
    """... and here through their FSDP2 forwards (unsharded for the backward, no gradient kept); the fake step
    calls the fake score twice (its guided DSM target)."""
    score_data_parallel(rank, world, "sid", fsdp2)


@case
def ddp_vsd(rank, world):
    score_data_parallel(rank, world, "vsd", ddp)


@case
def fsdp2_vsd(rank, world):
    score_data_parallel(rank, world, "vsd", fsdp2)


def consistency_data_parallel(rank, world, wrap, prediction, kind, N, iterations=3):
    """consistency (LCM, guidance 3) with the student, the teacher and the EMA student wrapped by ``wrap`` (the
    teacher and the EMA frozen replicas under DDP, sharded under FSDP2), each rank a different 3 of 6 data
    samples and conditions and its own noise, 3 steps; against test_recipes' lcm_reference (diffusers' script
    written out) on all 6 with the same noise (SplitSource).

    Why it holds: "l2" and "huber" are means over all elements and "pseudo_huber" a mean over samples of a
    per-sample term, all samples the same size, so the mean of the two half-batch gradients is the whole
    batch's; the EMA update then reads the same student on every rank. Under FSDP2 the EMA is updated on its
    shards and its forward must gather the updated values (FSDP2 keeps a root unit gathered after a no_grad
    forward: a stale gathered EMA would give the second step's target from the first step's EMA)."""
    import test_recipes as tr

    import flashdistill as fd
    from flashdistill.engine import recipes

    sched = fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    student, teacher = tr.Score(COND, 3), tr.Score(COND, 4)
    ref = [copy.deepcopy(m) for m in (student, teacher, student)]
    ref_opt, src = tr.sgd(ref[0]), SplitSource(world)
    c = {"l2": None, "huber": 1e-3, "pseudo_huber": 0.05}[kind]
    S, T, E = (wrap(copy.deepcopy(m), trained) for m, trained in ((student, True), (teacher, False), (student, False)))
    recipe = recipes.consistency(S, T, E, optimizer=tr.sgd(S), schedule=sched, source=fd.NoiseSource(SEED + rank),
                                 num_ddim_timesteps=N, prediction=prediction, guidance=3.0, null_cond=tr.NULL,
                                 ema_decay=0.9, kind=kind, c=c)
    n = world * B_RANK
    x0 = torch.sin(torch.arange(n * tr.D, dtype=F64)).reshape(n, *tr.SHAPE)
    cond = torch.linspace(-1, 1, n * COND, dtype=F64).reshape(n, COND)
    half = slice(rank * B_RANK, (rank + 1) * B_RANK)
    for i in range(iterations):
        loss = recipe["student"](x0[half], cond[half])["loss"].clone()
        want = tr.lcm_reference(*ref, sched, src, x0, cond, N=N, w=3.0, prediction=prediction, kind=kind,
                                c=c if c is not None else 0.0, decay=0.9, opt=ref_opt)
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / world, want.detach(), **TOL,
                                   msg=lambda m: f"iteration {i}, mean of the ranks' losses: {m}")
    for what, net, ref_net in (("student", S, ref[0]), ("teacher", T, ref[1]), ("ema_student", E, ref[2])):
        got = gathered(inner(net))
        assert_same_on_ranks(got, what)
        assert_close_params(got, dict(ref_net.named_parameters()), what)
    got_s, got_e = gathered(inner(S)), gathered(inner(E))
    assert any((p - got_e[k]).abs().max() > 1e-8 for k, p in got_s.items()), "the EMA equals the student"


@case
def ddp_consistency(rank, world):
    consistency_data_parallel(rank, world, ddp, "eps", "huber", 50)


@case
def fsdp2_consistency(rank, world):
    consistency_data_parallel(rank, world, fsdp2, "v", "pseudo_huber", 7)


# ----------------------------------------------------------------------------------------------------
# LLM KD on tiny Hugging Face Llamas

KD = dict(divergence="forward_kl", temperature=2.0, t_squared=True, hard_weight=0.5, soft_weight=0.7)
LENGTHS = (12, 5, 9, 8)  # rank 0 the first two, rank 1 the last two: 11 + 4 = 8 + 7 = 15 valid targets each


def token_batch(seed):
    """4 right-padded sequences (pad 0, attention 0, label -100) of LENGTHS."""
    import test_recipes as tr

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tr.VOCAB, (len(LENGTHS), tr.SEQ), generator=g)
    mask = (torch.arange(tr.SEQ)[None] < torch.tensor(LENGTHS)[:, None]).long()
    return ids * mask, torch.where(mask.bool(), ids, tr.IGNORE), mask


def llm_models():
    import test_recipes as tr

    teacher = tr.tiny_llama(48, 2, 4, seed=1, init=0.1).double().eval().requires_grad_(False)
    student = tr.tiny_llama(32, 2, 2, seed=2).double()
    return teacher, student


def llm_kd_data_parallel(rank, world, wrap, wrap_teacher=None, steps=2):
    """llm_kd with the student wrapped by ``wrap`` (DDP or FSDP2; the teacher by ``wrap_teacher``), each rank 2
    of the 4 sequences of a batch, 2 SGD steps; against the same recipe in one process on the whole batch
    (tests/test_recipes.py checks that one against KL + CE on materialized logits).

    The equivalence asserted, and why it holds here only: the recipe divides the loss by the number of valid
    targets of the batch it is given, here each rank's. DDP and FSDP2 average the ranks' gradients, i.e. give
    the mean of the per-rank means, which is the whole batch's mean only when the ranks have equally many valid
    targets (LENGTHS: 15 and 15). With unequal counts the distributed run weights a target of the emptier rank
    more, as any per-rank-normalized loss under DDP does."""
    from flashdistill.engine import recipes

    teacher, student = llm_models()
    ref = copy.deepcopy(student)
    ref_recipe = recipes.llm_kd(ref, teacher, optimizer=torch.optim.SGD(ref.parameters(), lr=0.5), **KD)
    net = wrap(student)
    teacher = wrap_teacher(copy.deepcopy(teacher)) if wrap_teacher else teacher
    recipe = recipes.llm_kd(net, teacher, optimizer=torch.optim.SGD(net.parameters(), lr=0.5), **KD)
    half = slice(rank * len(LENGTHS) // world, (rank + 1) * len(LENGTHS) // world)
    for step in range(steps):
        ids, labels, mask = token_batch(seed=step)
        out = recipe["student"](ids[half], labels[half], mask[half])
        want = ref_recipe["student"](ids, labels, mask)
        for k in ("loss", "soft", "hard"):
            got = out[k].clone()
            dist.all_reduce(got)
            torch.testing.assert_close(got / world, want[k], **TOL, msg=lambda m: f"step {step}, {k}: {m}")
    got = gathered(inner(net))
    assert_same_on_ranks(got, "student")
    assert_close_params(got, dict(ref.named_parameters()), "student")
    return net, teacher


@case
def ddp_llm_kd(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    llm_kd_data_parallel(rank, world, DDP)


def shard_llama(reshard_root=None, head_unit=False):
    """fully_shard on every decoder layer (optionally on the LM head alone) and then on the model."""
    from torch.distributed.fsdp import fully_shard

    def wrap(model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh())
        if head_unit:
            fully_shard(model.lm_head, mesh=mesh())
        return fully_shard(model, mesh=mesh(), reshard_after_forward=reshard_root)

    return wrap


@case
def fsdp2_llm_kd(rank, world):
    """The usual layout: every decoder layer a unit, then the model (embeddings, final norm and LM head in the
    root unit, which FSDP2 keeps gathered after the forward: the recipe reads the head's weight there)."""
    llm_kd_data_parallel(rank, world, shard_llama())


@case
def fsdp2_llm_kd_resharded(rank, world):
    """Every unit resharded after its forward, the LM heads units of their own, the teacher sharded alike: the
    recipe gathers the heads for the loss (unshard()), runs the sharded teacher through its root forward, and
    leaves the teacher's head resharded after the step."""
    from torch.distributed.tensor import DTensor

    wrap = shard_llama(reshard_root=True, head_unit=True)
    student, teacher = llm_kd_data_parallel(rank, world, wrap, wrap_teacher=wrap)
    for name, model in (("student", student), ("teacher", teacher)):
        assert all(isinstance(p, DTensor) for p in model.parameters()), f"{name}: a unit was left gathered"


# ----------------------------------------------------------------------------------------------------
# vocab-parallel LLM KD: the LM heads split by vocabulary across the ranks (process_group)

WIDTHS = (45, 52)  # uneven slices of test_recipes' 97-id vocabulary, rank 0 the first ids


def vocab_rows(linear, rank):
    """A Linear holding this rank's rows [start_r, start_r + V_r) of ``linear`` (weight and bias)."""
    a, n = sum(WIDTHS[:rank]), WIDTHS[rank]
    part = nn.Linear(linear.in_features, n, bias=linear.bias is not None, dtype=linear.weight.dtype)
    with torch.no_grad():
        part.weight.copy_(linear.weight[a:a + n])
        if linear.bias is not None:
            part.bias.copy_(linear.bias[a:a + n])
    return part


class TinyLM(nn.Module):
    """Embedding, one tanh layer, an LM head with bias: hidden(ids, mask) -> [B, L, H]."""

    def __init__(self, hidden, seed, vocab=97):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.body, self.head = nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden), \
            nn.Linear(hidden, vocab)
        self.double()

    def hidden(self, ids, mask):
        return torch.tanh(self.body(self.embed(ids))) * mask[..., None].to(self.body.weight.dtype)


def vocab_parallel(rank, world, make, steps=2):
    """llm_kd(..., process_group=WORLD) with each rank's student and teacher heads holding its WIDTHS slice of the
    vocabulary (``make(rank)`` -> (student, teacher, recipe options), the heads sliced when rank is not None),
    every rank the same whole batch and a replica of the rest of the student; 2 SGD steps against the same
    recipe in one process with the whole heads (tensor parallelism changes only where the vocabulary lives, so
    everything is equal up to float64 rounding: the loss and its parts on every rank, the gradient of the
    replicated body on every rank (the op all-reduces dL/dh), and each rank's head gradient and parameters are
    its rows of the unsplit ones)."""
    from flashdistill.engine import recipes

    assert world == len(WIDTHS)
    student, teacher, kw = make(rank)
    ref, ref_teacher, ref_kw = make(None)
    recipe = recipes.llm_kd(student, teacher, optimizer=torch.optim.SGD(student.parameters(), lr=0.5),
                            process_group=dist.group.WORLD, **kw, **KD)
    ref_recipe = recipes.llm_kd(ref, ref_teacher, optimizer=torch.optim.SGD(ref.parameters(), lr=0.5), **ref_kw, **KD)
    head = kw["student_head"] if "student_head" in kw else student.get_output_embeddings()
    head_names = {k for k, p in student.named_parameters() if any(p is q for q in head.parameters())}
    a, n = sum(WIDTHS[:rank]), WIDTHS[rank]

    def mine(k, t):  # this rank's part of an unsplit parameter or gradient
        return t[a:a + n] if k in head_names else t

    for step in range(steps):
        ids, labels, mask = token_batch(seed=step)
        out, want = recipe["student"](ids, labels, mask), ref_recipe["student"](ids, labels, mask)
        for k in ("loss", "soft", "hard"):
            torch.testing.assert_close(out[k], want[k], **TOL, msg=lambda m: f"step {step}, {k}: {m}")
        ref_grads = {k: p.grad for k, p in ref.named_parameters()}
        for k, p in student.named_parameters():
            torch.testing.assert_close(p.grad, mine(k, ref_grads[k]), **TOL,
                                       msg=lambda m: f"step {step}, grad {k}: {m}")
    ref_params = dict(ref.named_parameters())
    assert_close_params(dict(student.named_parameters()), {k: mine(k, p) for k, p in ref_params.items()}, "student")
    assert_same_on_ranks({k: p.detach() for k, p in student.named_parameters() if k not in head_names}, "student body")


@case
def vocab_parallel_kd(rank, world):
    """A small LM given as student_hidden and student_head (the head a module of the student), likewise the
    teacher."""
    def make(r):
        student, teacher = TinyLM(16, seed=2), TinyLM(24, seed=1).requires_grad_(False)
        if r is not None:
            student.head, teacher.head = vocab_rows(student.head, r), vocab_rows(teacher.head, r)
        return student, teacher, dict(student_hidden=student.hidden, student_head=student.head,
                                      teacher_hidden=teacher.hidden, teacher_head=teacher.head)

    vocab_parallel(rank, world, make)


@case
def vocab_parallel_llm_kd(rank, world):
    """Hugging Face Llamas, the recipe's default path: each model's lm_head replaced by this rank's rows
    (get_output_embeddings() is then the slice; the model's own last-position logits are a slice too, unused)."""
    def make(r):
        teacher, student = llm_models()
        if r is not None:
            student.lm_head, teacher.lm_head = vocab_rows(student.lm_head, r), vocab_rows(teacher.lm_head, r)
            teacher.requires_grad_(False)
        return student, teacher, {}

    vocab_parallel(rank, world, make)
