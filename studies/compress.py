"""
Depth compression where depth matters at CPU scale: character level, so that the blocks, not the embedding, hold the
parameters. A dense 8-layer teacher is averaged into 2 layers and recovered through the learned unroll (each layer run
4 times, step embeddings, LoRA from the SVD of the residue); dense 2- and 5-layer models (5: ~2.5x the recovered model's
parameters) train from scratch on the same total tokens (the teacher's plus the recovery's). Every model is scored on
the same held-out windows; differences are paired by window, their standard errors over the 3 seeds.

  python -m studies.compress             # 3 seeds, with the recovery runs (~30 min on 2 CPU cores)
  python -m studies.compress --pilot     # one seed of the gate's runs only (10 min): is the gate within reach?
  python -m studies.compress --gpu DATA  # the paper's 48 -> 6 (1,8,8,8,8,1) at width 384, dense 24 and 6 layers,
                                         # on a token folder prepared elsewhere (a GPU machine may have no network)

The question: does the recovered model get within noise of the dense model with ~2.5x its parameters (the paper:
2.934 vs 2.926)? First the gate: at equal tokens the small dense model must be >= 0.05 nats and >= 10 seed-level standard
errors worse than the large one, and the teacher better than the large one trained on as many tokens; otherwise: not
testable at this scale.
"""

import os
import sys
import time

import torch

import cherry
import train
from data import prepare as data_prep
from studies import common

# The CPU sizes come from pilots (--pilot; studies/compress_pilot.md): at width 128 dense 2 and 5 layers tied; at
# width 64 a higher lr (6e-3) let the deeper model pull ahead (+0.072 nats, one seed).
CPU = dict(teacher=8, layers=2, big=5, width=64, heads=4, unroll="4,4", lora=16, teacher_steps=1500, recovery_steps=250,
           batch=32, block=128, lr=6e-3, windows=400, device="cpu")
GPU = dict(teacher=48, layers=6, big=24, width=384, heads=6, unroll="1,8,8,8,8,1", lora=32, teacher_steps=6000,
           recovery_steps=1500, batch=32, block=256, lr=1e-3, windows=400, device="cuda")


def jobs(s, seed, out, data, pilot=False):
    """One seed's runs, {name: (module, argv)}; big_at_teacher: big on the teacher's tokens, for the gate."""
    shape = ["--n_head", s["heads"], "--n_embd", s["width"], "--lr", s["lr"], "--warmup_iters", 100]
    steps = s["teacher_steps"] + s["recovery_steps"]
    run = {"teacher": ("train", s["teacher_steps"], [*shape, "--n_layer", s["teacher"]]),
           "small": ("train", steps, [*shape, "--n_layer", s["layers"]]),
           "big": ("train", steps, [*shape, "--n_layer", s["big"]]),
           "big_at_teacher": ("train", s["teacher_steps"], [*shape, "--n_layer", s["big"]])}
    recover = ["--init_from", os.path.join(out, f"teacher-s{seed}"), "--layers", s["layers"], "--unroll", s["unroll"],
               "--lr", s["lr"] / 3, "--warmup_iters", 20]
    if not pilot:
        run["recovered"] = ("compress", s["recovery_steps"], [*recover, "--lora_rank", s["lora"]])
        run["recovered_no_lora"] = ("compress", s["recovery_steps"], recover)
    return {name: (module, ["--data", data, *common.run_flags(s, seed, steps), *flags, "--out_dir",
                            os.path.join(out, f"{name}-s{seed}")]) for name, (module, steps, flags) in run.items()}


def main(argv=None):
    p = common.parser(__doc__, "compress")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pilot", action="store_true", help="one seed of the gate's runs only")
    p.add_argument("--gpu", metavar="DATA", help="the paper's shape on this token folder, on a GPU")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    s, t0 = GPU if args.gpu else CPU, time.time()
    data = args.gpu or os.path.join(common.DATA, "shakespeare_char")
    data_prep.load(data)  # made here on first use, not by two runs at once
    seeds = range(1 if args.pilot else args.seeds)
    runs = [jobs(s, seed, args.out_dir, data, args.pilot) for seed in seeds]
    # recovery needs its teacher: the from-scratch runs first
    for stage in (("teacher", "small", "big", "big_at_teacher"), ("recovered", "recovered_no_lora")):
        common.run_all([job[name] for job in runs for name in stage if name in job], args.gpu)
    x, y = train.Data(data, s["block"]).eval_batch(s["windows"])
    losses, model_of = {}, {}  # model_of: the last seed's, for the counts
    for job in runs:
        models = {name: cherry.load_model(common.out_dir(run)) for name, (_, run) in job.items()}
        if not args.pilot:
            teacher, schedule = models["teacher"], models["recovered"].applications
            models["averaged"] = cherry.compress(teacher, s["layers"], tuple(range(s["layers"])), step_embed=False)
            models["unrolled"] = cherry.compress(teacher, s["layers"], schedule, step_embed=False)
            models["unrolled+LoRA"] = cherry.compress(teacher, s["layers"], schedule, lora_rank=s["lora"])
            for coda in ("last", "first"):  # a once-run coda (8 -> 4 layers, 1,2,2,1): its residue from which layer?
                models[f"coda from {coda}"] = cherry.compress(teacher, s["layers"] * 2, cherry.repeat_schedule(
                    (1, *[s["teacher"] // s["layers"] // 2] * (s["layers"] * 2 - 2), 1)), lora_rank=s["lora"],
                    coda_from_end=coda == "last")
        for name, model in models.items():
            losses.setdefault(name, []).append(common.window_losses(model, x, y, s["device"]))
            model_of[name] = model
    L = {name: torch.stack(v) for name, v in losses.items()}
    ps = {name: cherry.count_params(m, non_embedding=True) for name, m in model_of.items()}
    small_big, teacher_big = common.seed_diff(L["small"], L["big"]), common.seed_diff(L["teacher"], L["big_at_teacher"])
    ok, gate_lines = common.gate("depth compression", [
        (f"dense {s['layers']} layers minus dense {s['big']} layers: {common.pm(small_big, 3)} "
         f"(>= 0.05 and >= 10 standard errors needed)", small_big.mean >= 0.05 and small_big.mean >= 10 * small_big.se),
        (f"teacher ({s['teacher']} layers) minus dense {s['big']} layers, both on the teacher's tokens: "
         f"{common.pm(teacher_big, 3)} (< 0 needed)", teacher_big.mean < 0)])
    tokens = s["batch"] * s["block"]
    what = {"teacher": f"teacher, dense {s['teacher']} layers ({s['teacher_steps'] * tokens / 1e6:.2f}M tokens)",
            "averaged": "averaged, each layer once, not trained",
            "unrolled": f"averaged, unrolled {s['unroll']}, not trained",
            "unrolled+LoRA": f"... + LoRA {s['lora']} from the SVD, not trained",
            "recovered_no_lora": f"recovered: unrolled + step embeddings "
                                 f"({s['recovery_steps'] * tokens / 1e6:.2f}M tokens)",
            "recovered": "recovered: unrolled + step embeddings + LoRA (the paper's method)",
            "small": f"dense {s['layers']} layers from scratch, same total tokens",
            "big": f"dense {s['big']} layers from scratch, same total tokens",
            "big_at_teacher": f"dense {s['big']} layers from scratch, the teacher's tokens (for the gate)",
            "coda from last": "4 layers, 1,2,2,1 + LoRA, coda residue from its group's last layer, not trained",
            "coda from first": "... from its group's first layer (the original's final layer dropped), not trained"}
    table = common.table("model", "non-embedding params", "x recovered", "training MFLOPs/token", "held-out loss",
                         "minus dense big")
    for name in [n for n in what if n in L]:
        table.append(common.row(what[name], f"{ps[name]:,}", f"{ps[name] / ps.get('recovered', ps['small']):.2f}",
                                f"{cherry.flops_per_token(model_of[name].config) / 1e6:.1f}", f"{L[name].mean():.4f}",
                                "" if name == "big" else common.pm(common.seed_diff(L[name], L["big"]))))
    body = [f"Scale: {s}; {len(seeds)} seed(s); {s['windows']} held-out windows per seed.", "", "## Gate", "",
            *gate_lines, "", "## Results (mean over seeds; ± the seed-level standard error, 95% t interval)", "", *table, ""]
    if ok and not args.pilot:
        d = common.seed_diff(L["recovered"], L["big"])
        body.append(f"**Verdict**: the recovered model minus the dense {s['big']}-layer model: {common.pm(d)}: " + (
            "within noise or better: the claim holds here." if d.mean <= 2 * d.se else
            f"{d.mean / d.se:.0f} seed-level standard errors worse: the claim does not hold at this scale."))
    elif not ok:
        body.append(f"**Verdict**: {common.NOT_TESTABLE}")
    common.report("compress_pilot.md" if args.pilot else "compress_results.md", "Depth compression with recurrent "
                  "recovery", " ".join(["python -m studies.compress", *argv]), t0, body)


if __name__ == "__main__":
    main()
