"""Knowledge distillation inside a Hugging Face ``transformers.Trainer``: the example, tested.

``KDTrainer`` below is written to be copied. Its ``compute_loss`` trains the student on
``fused_linear_kd_loss`` of the student's last hidden states and LM head against the teacher's last
hidden states and LM head, so neither model's [tokens x vocabulary] logits are ever materialized (the op
projects and reduces chunk by chunk). What it has to get right, and what the tests pin:

- the hidden state is the one *before* the head (after the final norm): ``hidden_states[-1]``, which
  transformers ties to ``last_hidden_state``; the forward runs with ``logits_to_keep=1`` so the model
  does not project every position itself;
- the student runs through ``model`` as the Trainer hands it over (possibly wrapped, e.g. by DDP,
  whose forward must run for its gradient sync); only the head is taken from the unwrapped model;
- the next-token shift: position i predicts token i + 1; the labels are shifted left with -100 at the
  end (as transformers' causal-LM loss does), so the hidden states are used whole;
- padding carries label -100 and drops out of both terms, the KL and the hard-label CE (the labels
  are the op's only mask: with hard_weight = 0 they still say which positions count);
- ``num_items_in_batch``, the valid-target count over the whole accumulated batch that the Trainer
  passes for models that take loss kwargs, is the op's ``normalizer``: gradient accumulation then
  gives the full batch's gradient, and the Trainer (which counts such a loss as already scaled for
  accumulation) does not divide it again;
- a model that transforms its logits after the head (Gemma 2's ``final_logit_softcapping``, Cohere's
  ``logit_scale``) needs that transform given to the op (``softcap=``, ``teacher_softcap=``).

Tests, on tiny randomly initialized Llama models built from configs (no hub downloads):
the gradient of every student parameter through the Trainer's ``compute_loss`` equals, in float64,
plain PyTorch's KD + CE loss on materialized logits (for every backend of the op); one step with
gradient accumulation (2 x 2 sequences) equals one step on the 4 sequences at once; and a short
training run's loss goes down, and the student's KL to the teacher with it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import flashdistill as fd
from flashdistill.kernels.kd import linear
from oracle import backends_under_test

transformers = pytest.importorskip("transformers", minversion="5.0")  # tested with 5.24
pytest.importorskip("accelerate")  # the Trainer's runtime

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

IGNORE = -100  # the label transformers' losses and the Trainer's token count ignore


class KDTrainer(Trainer):
    """A Trainer that distills ``teacher`` into the model it trains with fused_linear_kd_loss.

    ``kd_options``: keyword arguments of fused_linear_kd_loss (divergence, temperature, t_squared,
    hard_weight, soft_weight, chunk_size, backend, ...). The teacher must share the student's
    vocabulary (or pass vocab="truncate" / "pad"); its hidden size may differ.
    """

    def __init__(self, *args, teacher, kd_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.kd_options = dict(kd_options or {})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # position i predicts token i + 1: shift the labels, keep the hidden states whole
        targets = inputs.get("shift_labels")
        if targets is None:
            targets = F.pad(inputs["labels"][:, 1:], (0, 1), value=IGNORE)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}

        # the hidden states before the LM head; logits_to_keep=1: the model projects one position only
        out = model(**model_inputs, output_hidden_states=True, logits_to_keep=1)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with torch.no_grad():
            teacher_out = self.teacher(**model_inputs, output_hidden_states=True, logits_to_keep=1)
        teacher_head = self.teacher.get_output_embeddings()

        loss = fd.fused_linear_kd_loss(
            out.hidden_states[-1], head.weight, student_bias=head.bias,
            teacher_hidden=teacher_out.hidden_states[-1], teacher_weight=teacher_head.weight,
            teacher_bias=teacher_head.bias,
            labels=targets, ignore_index=IGNORE,
            normalizer=num_items_in_batch,  # the accumulated batch's count; None: this batch's
            **self.kd_options)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # a global count, and DDP averages gradients
        return (loss, out) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------
# tiny models and data

VOCAB, SEQ = 257, 24
KD = dict(divergence="forward_kl", temperature=2.0, t_squared=True, hard_weight=0.5)


def tiny_llama(hidden, layers, heads, seed, init=0.02):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=SEQ, tie_word_embeddings=False, initializer_range=init,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def teacher_and_student():
    # a teacher with a larger init is confident, so there is something to distill
    return tiny_llama(64, 2, 4, seed=1, init=0.1), tiny_llama(32, 1, 2, seed=2)


class Sequences(torch.utils.data.Dataset):
    """Token sequences right-padded to SEQ (pad 0, attention 0, label -100): a random first token, then
    each the image of the previous one under a fixed random permutation (a bigram language that a
    student can learn in a few steps)."""

    def __init__(self, lengths, seed=0):
        g = torch.Generator().manual_seed(seed)
        successor = 3 + torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(7))
        self.items = []
        for n in lengths:
            ids = torch.zeros(SEQ, dtype=torch.long)
            ids[0] = torch.randint(3, VOCAB, (), generator=g)
            for i in range(1, n):
                ids[i] = successor[ids[i - 1] - 3]
            mask = (torch.arange(SEQ) < n).long()
            self.items.append(dict(input_ids=ids, attention_mask=mask,
                                   labels=torch.where(mask.bool(), ids, IGNORE)))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                dataloader_num_workers=0, disable_tqdm=True, seed=0, logging_steps=1)
    return TrainingArguments(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------
# tests


def plain_kd_loss(student, teacher, batch, n, *, temperature, t_squared, hard_weight, **_):
    """The same loss in plain PyTorch on full logits: sum over valid targets of T^2 KL(p_T || q_T)
    + hard_weight CE(z), divided by n."""
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    y = batch["labels"][:, 1:]
    valid = y != IGNORE
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * (temperature**2 if t_squared else 1.0)
    ce = F.cross_entropy(s.reshape(-1, VOCAB), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return (kl[valid].sum() + hard_weight * ce) / n


@pytest.mark.parametrize("backend", [b for b in backends_under_test("cpu") if b in linear.IMPLEMENTED])
def test_gradient_matches_plain_pytorch(tmp_path, backend):
    """In float64, the fused loss through KDTrainer.compute_loss gives the loss and the gradient of
    every student parameter of the plain loss on materialized logits. Both sides are float64 sums
    over at most a few hundred terms (V = 257, 4 x 23 targets, hidden 32), so they agree to ~1e-13
    relative; 1e-9 is margin, while a wrong shift, mask or normalizer is off by O(1)."""
    teacher, student = (m.double() for m in teacher_and_student())
    data = Sequences([24, 19, 10, 4])
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    n = (batch["labels"][:, 1:] != IGNORE).sum()  # what the Trainer passes as num_items_in_batch
    trainer = KDTrainer(model=student, args=training_args(tmp_path), train_dataset=data, teacher=teacher,
                        kd_options=dict(KD, backend=backend))

    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=n)
    loss.backward()
    fused = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    ref = plain_kd_loss(student, teacher, batch, n, **KD)
    ref.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    for k, p in student.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, k
        torch.testing.assert_close(fused[k], p.grad, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"{k}: {m}")


def _one_step(tmp_path, batch_size, accumulation, trainer_cls=KDTrainer):
    teacher, student = (m.double() for m in teacher_and_student())
    before = copy.deepcopy(student.state_dict())
    trainer = trainer_cls(model=student, teacher=teacher, kd_options=KD, train_dataset=Sequences([24, 19, 10, 4]),
                          args=training_args(tmp_path, max_steps=1, per_device_train_batch_size=batch_size,
                                             gradient_accumulation_steps=accumulation, optim="sgd",
                                             learning_rate=1.0, lr_scheduler_type="constant",
                                             max_grad_norm=0.0))  # no clipping: it would hide a scale error
    trainer.train()
    return {k: p.detach() - before[k] for k, p in student.named_parameters()}


class PerBatchMeanKDTrainer(KDTrainer):
    """The mistake the normalizer avoids: each micro-batch normalized by its own count."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs)


def test_gradient_accumulation_equals_full_batch(tmp_path):
    """One SGD step on 4 sequences of 24, 19, 10 and 4 tokens, as one batch of 4 or as 2 accumulated
    batches of 2 (whose valid-target counts differ, however the sampler pairs them): the same update,
    because num_items_in_batch (the 4 sequences' count) is the normalizer of both micro-batches.
    Normalizing each micro-batch by its own count instead gives another update."""
    full = _one_step(tmp_path / "full", 4, 1)
    accumulated = _one_step(tmp_path / "ga", 2, 2)
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-9, atol=1e-9 * full[k].abs().max().item(),
                                   msg=lambda m: f"{k}: {m}")
    wrong = _one_step(tmp_path / "wrong", 2, 2, PerBatchMeanKDTrainer)
    off = ((wrong["lm_head.weight"] - full["lm_head.weight"]).norm() / full["lm_head.weight"].norm()).item()
    assert off > 0.1, off  # ~1.9 here: the sum of two micro-batch means, not the mean


def test_training_loss_decreases(tmp_path):
    """A teacher that knows the language (20 steps of plain next-token training), distilled into the
    student by 20 AdamW steps (float32): finite losses, the last five well below the first five (by
    ~30% with this seed), and the student's KL to the teacher on the training data down too (~35%)."""
    teacher, student = teacher_and_student()
    data = Sequences(torch.randint(8, SEQ + 1, (64,), generator=torch.Generator().manual_seed(3)).tolist())
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-2)
    for _ in range(20):
        opt.zero_grad()
        teacher(**batch).loss.backward()
        opt.step()
    with torch.no_grad():
        kl_before = plain_kd_loss(student, teacher, batch, n, **dict(KD, hard_weight=0.0))

    trainer = KDTrainer(model=student, teacher=teacher, kd_options=KD, train_dataset=data,
                        args=training_args(tmp_path, max_steps=20, per_device_train_batch_size=8,
                                           learning_rate=1e-2, lr_scheduler_type="constant"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
    with torch.no_grad():
        kl_after = plain_kd_loss(student, teacher, batch, n, **dict(KD, hard_weight=0.0))
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
