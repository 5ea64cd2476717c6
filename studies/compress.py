"""
Depth compression where depth matters at CPU scale: character level, so that the blocks, not the embedding, hold the
parameters. A dense 16-layer teacher is averaged into 2 layers (8 into 1, as the paper's 48 -> 6) and recovered
through the learned unroll (each layer run 8 times, step embeddings, LoRA from the SVD of the residue) by three arms:
cross-entropy (CE), distillation from the teacher (KD: the KL to its next-token distribution) and KD + a hidden-state
loss per application. Dense models of several depths train from scratch at equal total tokens (the teacher's plus the
recovery's: the dense curve), and the comparator ("big", ~2.5x the compressed layers) also at each arm's pipeline
FLOPs (the teacher's training, then the recovery's, the teacher's forward included for KD). Every model is scored on
the same held-out windows; the seed is the unit of replication (per-seed paired differences, t intervals on n - 1
degrees of freedom).

  python -m studies.compress             # 3 seeds (the runs a finished study left are kept)
  python -m studies.compress --pilot     # one seed of the gates' runs only: are they within reach?
  python -m studies.compress --smoke     # every arm at a toy size, 2 seeds, in seconds (into --out_dir)
  python -m studies.compress --gpu DATA  # the paper's 48 -> 6 (1,8,8,8,8,1) at width 384, on a token folder

Gates, at equal total tokens: G1, dense small (the compressed layers) behind dense big by >= 0.05 nats and >= 5
seed-level standard errors; G2, the teacher ahead of dense big by >= 0.02 (otherwise even a perfect student cannot
reach the comparator). Either failing: not testable. Verdict, per arm and budget: an equivalence test of
L_recovered - L_big with the margin delta = max(0.01, 0.2 (L_small - L_big)) (at equal tokens; one margin for both
budgets), fixed here before the runs: holds if the one-sided 95% upper bound is below delta, fails if the lower bound
is above it, else inconclusive. The paper's own figure: the dense size
the recovered model matches (the dense curve, interpolated in log parameters) over the recovered model's parameters
(the paper: 2.5x). The coda A/B (8 -> 4 layers, 1,2,2,1, CE): --coda_from first becomes the default only if first
minus last has its 95% t interval below 0; otherwise last stays.
"""

import math
import os
import sys
import time
from dataclasses import replace

import torch

import checkpoint
import cherry
import compress as compress_script
from data import prepare as data_prep
from studies import common

# The CPU sizes come from pilots (studies/compress_pilot.md): at width 128 dense 2 and 5 layers tied; at width 64 a
# higher lr (6e-3) let the deeper model pull ahead; an 8-layer teacher with 250 recovery steps was behind dense 5 at
# equal total tokens (G2 failed), a 16-layer one (the paper's 8 layers per compressed layer) with 100 is ahead.
CPU = dict(teacher=16, layers=2, depths=(2, 3, 4, 5), big=5, width=64, heads=4, unroll="8,8", lora=16, hidden=1.0,
           teacher_steps=1500, recovery_steps=100, batch=32, block=128, lr=6e-3, windows=400, device="cpu")
GPU = dict(teacher=48, layers=6, depths=(6, 12, 18, 24), big=24, width=384, heads=6, unroll="1,8,8,8,8,1", lora=32,
           hidden=1.0, teacher_steps=6000, recovery_steps=1500, batch=32, block=256, lr=1e-3, windows=400,
           device="cuda")
SMOKE = dict(teacher=4, layers=2, depths=(2, 4), big=4, width=16, heads=2, unroll="2,2", lora=2, hidden=1.0,
             teacher_steps=12, recovery_steps=6, batch=4, block=32, lr=3e-3, windows=8, device="cpu")
ARMS = {"ce": [], "kd": ["--distill", 1], "kd-hidden": ["--distill", 1, "--distill_hidden", "HIDDEN"]}
CODA = {"coda-last": ["--coda_from", "last"], "coda-first": ["--coda_from", "first"]}


def pipeline_flops(s, vocab_size, arm):
    """FLOPs per seed of teacher training plus an arm's recovery (compress.py's count: the teacher's forward for KD)."""
    teacher = cherry.GPTConfig(n_layer=s["teacher"], n_head=s["heads"], n_embd=s["width"], block_size=s["block"],
                               vocab_size=vocab_size)
    schedule = compress_script.parse_unroll(s["unroll"], s["layers"])
    student = replace(teacher, n_layer=s["layers"], schedule=schedule, step_embed=True, lora_rank=s["lora"])
    recovery = cherry.flops_per_token(student)
    if arm != "ce":
        recovery += cherry.flops_per_token(teacher, training=False)
    tokens = s["batch"] * s["block"]
    return tokens * (s["teacher_steps"] * cherry.flops_per_token(teacher) + s["recovery_steps"] * recovery)


def dense_steps(s, vocab_size, depth, flops):
    """Training steps of a dense model of this depth that spend `flops`."""
    cfg = cherry.GPTConfig(n_layer=depth, n_head=s["heads"], n_embd=s["width"], block_size=s["block"],
                           vocab_size=vocab_size)
    return max(1, round(flops / (s["batch"] * s["block"] * cherry.flops_per_token(cfg))))


def jobs(s, seed, out, data, vocab_size, pilot=False):
    """One seed's runs, {name: (module, argv)}, in two stages: the from-scratch runs, then the recoveries."""
    shape = ["--n_head", s["heads"], "--n_embd", s["width"], "--lr", s["lr"],
             "--warmup_iters", min(100, s["teacher_steps"] // 10)]
    total = s["teacher_steps"] + s["recovery_steps"]
    depths = (s["layers"], s["big"]) if pilot else s["depths"]
    run = {"teacher": ("train", s["teacher_steps"], [*shape, "--n_layer", s["teacher"]]),
           **{f"dense{d}": ("train", total, [*shape, "--n_layer", d]) for d in depths}}
    if not pilot:
        for budget in ("ce", "kd"):  # kd-hidden spends kd's FLOPs (the hidden-state loss is no matmul)
            flops = pipeline_flops(s, vocab_size, budget)
            run[f"dense{s['big']}-flops-{budget}"] = ("train", dense_steps(s, vocab_size, s["big"], flops),
                                                      [*shape, "--n_layer", s["big"]])
        teacher = os.path.join(out, f"teacher-s{seed}")
        recover = ["--init_from", teacher, "--lr", s["lr"] / 3, "--warmup_iters", min(20, s["recovery_steps"] // 5),
                   "--lora_rank", s["lora"]]
        for arm, flags in ARMS.items():
            flags = [s["hidden"] if f == "HIDDEN" else f for f in flags]
            run[arm] = ("compress", s["recovery_steps"], [*recover, "--layers", s["layers"], "--unroll", s["unroll"],
                                                          *flags])
        coda = ",".join(["1", *[str(s["teacher"] // (2 * s["layers"]))] * (2 * s["layers"] - 2), "1"])
        for arm, flags in CODA.items():  # a once-run coda: 2 x the compressed layers, the ends once
            run[arm] = ("compress", s["recovery_steps"], [*recover, "--layers", 2 * s["layers"], "--unroll", coda,
                                                          *flags])
    return {name: (module, ["--data", data, *common.run_flags(s, seed, steps), *flags, "--out_dir",
                            os.path.join(out, f"{name}-s{seed}")]) for name, (module, steps, flags) in run.items()}


def matched_size(curve, loss):
    """The non-embedding parameters of the dense model with this loss, interpolated in log parameters on the dense
    curve [(params, loss)] (ascending params); None past either end (the text says which)."""
    for (p0, l0), (p1, l1) in zip(curve, curve[1:]):
        if min(l0, l1) <= loss <= max(l0, l1) and l0 != l1:
            return math.exp(math.log(p0) + (loss - l0) / (l1 - l0) * (math.log(p1) - math.log(p0)))
    return None


def main(argv=None):
    p = common.parser(__doc__, "compress")
    p.add_argument("--seeds", type=int, help="seeds (default 3; 2 with --smoke; 1 with --pilot)")
    p.add_argument("--pilot", action="store_true", help="one seed of the gates' runs only")
    p.add_argument("--smoke", action="store_true", help="every arm at a toy size; the report goes into --out_dir")
    p.add_argument("--data", help="a character-level data folder (default: data/shakespeare_char, made on first use)")
    p.add_argument("--gpu", metavar="DATA", help="the paper's shape on this token folder, on a GPU")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    s, t0 = GPU if args.gpu else SMOKE if args.smoke else CPU, time.time()
    data = args.gpu or args.data or os.path.join(common.DATA, "shakespeare_char")
    meta = data_prep.load(data)[0]  # made here on first use, not by two runs at once
    vocab_size = (meta["vocab_size"] + 63) // 64 * 64  # train.py's padding
    seeds = range(args.seeds or (1 if args.pilot else 2 if args.smoke else 3))
    runs = [jobs(s, seed, args.out_dir, data, vocab_size, args.pilot) for seed in seeds]
    for stage in ("train", "compress"):  # recovery needs its teacher: the from-scratch runs first
        common.run_all([job[name] for job in runs for name in job if job[name][0] == stage], args.gpu or args.smoke)
    x, y = data_prep.Data(data, s["block"]).eval_batch(s["windows"])
    losses, model_of = {}, {}  # model_of: the last seed's, for the counts
    for seed, job in zip(seeds, runs):
        models = {name: checkpoint.load_model(common.out_dir(run)) for name, (_, run) in job.items()}
        if not args.pilot:  # what recovery starts from, untrained
            teacher, schedule = models["teacher"], models["ce"].applications
            models["averaged"] = cherry.compress(teacher, s["layers"], tuple(range(s["layers"])), step_embed=False)
            models["unrolled"] = cherry.compress(teacher, s["layers"], schedule, step_embed=False)
            models["unrolled+LoRA"] = cherry.compress(teacher, s["layers"], schedule, lora_rank=s["lora"])
        for name, model in models.items():
            losses.setdefault(name, []).append(common.window_losses(model, x, y, s["device"]))
            model_of[name] = model
    L = {name: torch.stack(v) for name, v in losses.items()}  # (seeds, windows)
    ps = {name: cherry.count_params(m, non_embedding=True) for name, m in model_of.items()}
    small, big = f"dense{s['layers']}", f"dense{s['big']}"
    g1, g2 = common.seed_diff(L[small], L[big]), common.seed_diff(L["teacher"], L[big])
    se_ok = g1.mean >= 5 * g1.se if g1.n > 1 else args.pilot  # a pilot's one seed has no seed-level SE to judge
    ok, gate_lines = common.gate("depth compression", [
        (f"G1: dense {s['layers']} minus dense {s['big']} layers at equal total tokens: {common.pm(g1, 3)} (>= 0.05 "
         f"and >= 5 seed-level standard errors needed{'; a pilot judges the mean only' if args.pilot else ''})",
         g1.mean >= 0.05 and se_ok),
        (f"G2: the teacher ({s['teacher']} layers) minus dense {s['big']} layers at the pipeline's total tokens: "
         f"{common.pm(g2, 3)} (<= -0.02 needed: otherwise a perfect student cannot reach the comparator)",
         g2.mean <= -0.02)])
    tokens = s["batch"] * s["block"]
    what = {"teacher": f"teacher, dense {s['teacher']} layers ({s['teacher_steps'] * tokens / 1e6:.2f}M tokens)",
            "averaged": "averaged, each layer once, not trained",
            "unrolled": f"averaged, unrolled {s['unroll']}, not trained",
            "unrolled+LoRA": f"... + LoRA {s['lora']} from the SVD, not trained",
            "ce": f"recovered by CE: unroll, step embeddings, LoRA ({s['recovery_steps'] * tokens / 1e6:.2f}M tokens)",
            "kd": "recovered by KD (--distill 1)", "kd-hidden": f"recovered by KD + hidden ({s['hidden']})",
            "coda-last": f"{2 * s['layers']} layers, ends once, CE: coda residue from its group's last layer",
            "coda-first": "... from its group's first layer",
            **{f"dense{d}": f"dense {d} layers from scratch, equal total tokens" for d in s["depths"]},
            **{f"dense{s['big']}-flops-{b}": f"dense {s['big']} layers, the {b.upper()} pipeline's FLOPs"
               for b in ("ce", "kd")}}
    table = common.table("model", "non-embedding params", "training MFLOPs/token", "held-out loss",
                         f"minus dense {s['big']} (equal tokens)")
    for name in [n for n in what if n in L]:
        diff = "" if name == big else common.pm(common.seed_diff(L[name], L[big]))
        flops = cherry.flops_per_token(model_of[name].config)
        table.append(common.row(what[name], f"{ps[name]:,}", f"{flops / 1e6:.1f}", f"{L[name].mean():.4f}", diff))
    body = [f"Scale: {s}; {len(seeds)} seed(s); {s['windows']} held-out windows per seed.", "", "## Gates", "",
            *gate_lines, "", "## Results (mean over seeds; ± the seed-level standard error, 95% t interval)", "",
            *table, ""]
    if not args.pilot:
        body += verdicts(s, L, ps, ok)
    name = os.path.abspath(os.path.join(args.out_dir, "compress_smoke.md")) if args.smoke else \
        "compress_pilot.md" if args.pilot else "compress_results.md"
    common.report(name, "Depth compression with recurrent recovery", " ".join(["python -m studies.compress", *argv]),
                  t0, body)


def verdicts(s, L, ps, ok):
    """Per arm: the equivalence test at equal tokens and at equal pipeline FLOPs, and the matched dense size; then the
    coda A/B by its rule."""
    small, big = f"dense{s['layers']}", f"dense{s['big']}"
    curve = sorted((ps[f"dense{d}"], L[f"dense{d}"].mean().item()) for d in s["depths"])
    delta = max(0.01, 0.2 * (L[small].mean() - L[big].mean()).item())
    lines = ["## Verdicts", "", f"Margin delta = max(0.01, 0.2 (L_small - L_big)) = {delta:.4f}.", "",
             *common.table("arm", "budget", "minus dense big", "verdict", "matched dense params / recovered params")]
    for arm in ARMS:
        budget = "ce" if arm == "ce" else "kd"
        for what, comparator in (("equal tokens", big), ("equal FLOPs", f"{big}-flops-{budget}")):
            d = common.seed_diff(L[arm], L[comparator])
            verdict = common.equivalence(d, delta) if ok else "not testable"
            size = ""
            if what == "equal tokens":
                matched = matched_size(curve, L[arm].mean().item())
                size = f"{matched / ps[arm]:.2f}x" if matched else (
                    f"< {curve[0][0] / ps[arm]:.2f}x (worse than dense {s['depths'][0]})"
                    if L[arm].mean() > curve[0][1] else f"> {curve[-1][0] / ps[arm]:.2f}x")
            lines.append(common.row(arm, what, common.pm(d), f"**{verdict}**", size))
    first = common.seed_diff(L["coda-first"], L["coda-last"])
    winner = "first" if first.bound(0.975, +1) < 0 else "last"
    lines += ["", f"**Coda A/B** (trained, CE): first minus last {common.pm(first)}: the default is **{winner}** "
              f"(first only if the 95% t interval is below 0).", "",
              "The paper claims the recovered model matches a dense model of 2.5x its parameters "
              "(2.934 vs 2.926 at 227M against 566M)."]
    return lines


if __name__ == "__main__":
    main()
