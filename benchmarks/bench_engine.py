"""Whole training steps, eager against the engine: steps per second (issue #7).

Two steps people iterate on at small sizes, where the host's cost of issuing hundreds of kernels is a
large share of the step:

    dit_dmd2     the DMD2 recipe (engine.recipes.dmd2) on the demo's DiT (engine/demo/dit.py; adaLN-Zero
                 blocks, attention = flashdistill.attention): a one-step generator, a frozen teacher and a
                 fake score, all three DiTs of one config; timed: the "fake" step (generator forward
                 under no_grad, noising, fake-score forward + DSM loss + backward + AdamW) and the
                 "generator" step (generator forward, teacher with guidance and fake score under no_grad,
                 dmd_loss, backward, AdamW)
    lm_kd        the llm_kd recipe: a tiny Llama teacher distilled into a smaller Llama student with
                 fused_linear_kd_loss (neither [tokens x vocab] logit tensor exists); one "student" step

Impls: ``eager`` calls the recipe's step; on a GPU ``graph`` is ``engine.capture`` (one CUDA graph
replayed, AdamW fused), timed with CUDA events around each call (host dispatch included, which is what
the graph removes); on the CPU ``compile`` is ``engine.capture(mode="compile")`` (torch.compile of the
whole step with inductor; compile time reported, not timed). Every timed call is a real training step
(parameters move), which does not change a step's cost. The issue's GPU target: graph >= 1.5x eager on
the DiT DMD2 step.

There is no bytes floor for a whole step (the rows' floor columns are 0); the note gives steps/s.
"""

from __future__ import annotations

import copy
import sys
import time

import torch

import harness

SIZES = {  # name: (DiT config, batch) / (teacher, student, batch, seq, vocab)
    "dit_dmd2": {"small": (dict(image_size=16, channels=4, patch=2, width=128, depth=4, heads=4), 32),
                 "quick": (dict(image_size=8, channels=1, patch=2, width=64, depth=2, heads=4), 8)},
    "lm_kd": {"small": ((256, 4, 4, 688), (128, 2, 4, 344), 4, 128, 8192),
              "quick": ((64, 2, 2, 128), (32, 1, 2, 64), 2, 16, 512)},
}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, fused=True)  # fused: a device-side step on CPU and CUDA alike


def build_dit_dmd2(size: str, device: torch.device, dtype: torch.dtype):
    import flashdistill as fd
    from flashdistill.engine import recipes
    from flashdistill.engine.demo.dit import DiT, student_from_teacher

    cfg, batch = SIZES["dit_dmd2"][size]
    torch.manual_seed(0)
    schedule = fd.VPSchedule(device=device)
    teacher = DiT(**cfg).to(device, dtype).eval().requires_grad_(False)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    gen = student_from_teacher(teacher, schedule)
    recipe = recipes.dmd2(gen, teacher, fake, gen_optimizer=_adamw(gen.parameters()),
                          fake_optimizer=_adamw(fake.parameters()), schedule=schedule,
                          source=fd.NoiseSource(0, device=device), sample_shape=(cfg["channels"], cfg["image_size"],
                                                                                   cfg["image_size"]),
                          prediction=teacher.prediction, guidance=2.0,
                          null_cond=torch.full((1,), teacher.null_class, device=device), fake_updates=1)
    cond = [(torch.arange(batch, device=device) % 10 + k) % 10 for k in range(3)]
    desc = f"DiT {cfg['image_size']}x{cfg['image_size']}x{cfg['channels']} w{cfg['width']} d{cfg['depth']} B{batch}"
    return recipe, {name: [(c,) for c in cond] for name in recipe.steps}, desc


def build_lm_kd(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from flashdistill.engine import recipes

    (th, tl, tn, ti), (sh, sl, sn, si), batch, seq, vocab = SIZES["lm_kd"][size]

    def llama(h, layers, heads, inter, seed):
        torch.manual_seed(seed)
        conf = LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=seq,
                           tie_word_embeddings=False)
        conf._attn_implementation = "sdpa"
        return LlamaForCausalLM(conf).to(device, dtype)

    teacher = llama(th, tl, tn, ti, 1).eval().requires_grad_(False)
    student = llama(sh, sl, sn, si, 2).train()
    recipe = recipes.llm_kd(student, teacher, optimizer=_adamw(student.parameters()), hard_weight=0.5)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        batches.append((ids, ids.clone()))
    desc = f"Llama h{th}/l{tl} -> h{sh}/l{sl}, V{vocab}, B{batch}x{seq}"
    return recipe, {"student": batches}, desc


BUILDERS = {"dit_dmd2": build_dit_dmd2, "lm_kd": build_lm_kd}


def main() -> int:
    parser = harness.make_parser(__doc__)
    parser.add_argument("--cases", default="dit_dmd2,lm_kd", help="comma list of %(default)s")
    cfg = harness.parse_config(parser)
    if cfg.device.type == "cuda":
        cfg.timings = ["cuda_event"]  # the engine's graph is the impl; the harness must not capture it again
    bench = harness.Bench("engine", cfg)
    from flashdistill.engine import capture

    dtype = cfg.dtype_or(torch.float32, torch.float32)
    size = "quick" if cfg.quick else "small"
    for case in [c.strip() for c in cfg.args.cases.split(",") if c.strip()]:
        if case not in BUILDERS:
            parser.error(f"--cases: unknown case {case!r}; choose from {', '.join(BUILDERS)}")
        for impl in ["eager"] + (["graph"] if cfg.device.type == "cuda" else ["compile"] if cfg.compile else []):
            recipe, inputs, desc = BUILDERS[case](size, cfg.device, dtype)  # fresh models and optimizers per impl
            for name, step in recipe.steps.items():
                pool = harness.InputPool(inputs[name])
                fn, note = step.fn, ""
                if impl != "eager":
                    t0 = time.perf_counter()
                    try:
                        fn = capture(step, *pool.first(), mode="graph" if impl == "graph" else "compile",
                                     verbose=False)
                    except Exception as exc:  # recorded and reported, as the harness does for a kernel
                        bench.fail(f"{case} {name}", impl, exc)
                        continue
                    note = f"capture {time.perf_counter() - t0:.1f} s; "
                rows = bench.time(case=f"{case} {name} ({desc})", dtype=dtype, impl=impl, fn=fn, inputs=pool,
                                  nbytes=0, note=note)
                for r in rows:
                    r.note += f"{1e3 / r.median_ms:.1f} steps/s"
    print(bench.finish())
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
