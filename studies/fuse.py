"""
MoEE with experts that differ: Korean and Python source, one BPE vocabulary trained on both. A dense teacher on the
mix is compressed (its layers averaged into a third, each run 3 times, step embeddings) and recovered twice, on Korean
only (expert K) and on code only (expert C). Then on the mix: MoEE(K, C) top-1 and MoEE + MTP (D = 1); each single
expert for the same steps, and for the steps whose FLOPs match MoEE's pipeline (the second expert's recovery and the
mixture's padded steps); a "soup" (the two experts' tensors averaged into one dense model of the active size, the
same steps: is routing needed?); and a dense model with MoEE's total parameters trained from scratch on the mix with
the FLOPs of MoEE's whole pipeline (teacher included). Every model is scored on the same held-out windows of each
domain (next-token loss only); the seed is the unit of replication (per-seed paired differences, t intervals).

  python -m studies.fuse                  # 3 seeds (the runs a finished study left are kept)
  python -m studies.fuse --smoke          # every arm at a toy size, 2 seeds, in seconds (into --out_dir)
  python -m studies.fuse --gpu DATA       # width 384, on DATA/{mix,korean,code} prepared elsewhere with one tokenizer

Gate first: each expert must be better than the other on its own domain by >= 0.05 nats and >= 5 seed-level standard
errors; otherwise the experts have not become different enough for a mixture to pay: not testable at this scale.
Verdicts (MoEE minus a comparator, on both domains): better if the 95% t interval is below 0, worse if above, else
inconclusive; at equal steps (the best single expert, the soup) and at equal pipeline FLOPs (the best single expert
given the matching steps, the dense model).
"""

import itertools
import os
import sys
import time
from dataclasses import asdict, replace

import torch

import checkpoint
import cherry
from data import prepare as data_prep
from studies import common

CPU = dict(teacher=6, layers=2, width=128, heads=4, teacher_steps=600, expert_steps=300, steps=300, batch=16, block=128,
           windows=200, device="cpu", vocab="bpe:4096", chars=2_500_000, folder="fuse")
SMOKE = dict(teacher=2, layers=1, width=16, heads=2, teacher_steps=10, expert_steps=6, steps=6, batch=4, block=32,
             windows=8, device="cpu", vocab="char", chars=40_000, folder="fuse-smoke")
DOMAINS = ("korean", "code")
GPU = dict(teacher=12, layers=4, width=384, heads=6, teacher_steps=4000, expert_steps=2000, steps=2000, batch=32,
           block=256, windows=400, device="cuda")


def prepare(s):
    """Korean and code, the first ~s["chars"] characters of each (whole documents), one tokenizer trained on both."""
    folder = os.path.join(common.DATA, s["folder"])
    if not os.path.exists(os.path.join(folder, "code", "meta.json")):
        docs = {}
        for name in DOMAINS:  # whole documents, in order, until s["chars"] characters
            texts = data_prep.CORPORA[name]()
            starts = itertools.accumulate([0, *map(len, texts)])
            docs[name] = [d for d, before in zip(texts, starts) if before < s["chars"]]
        data_prep.prepare(docs["korean"] + docs["code"], os.path.join(folder, "mix"), s["vocab"])
        for name in DOMAINS:
            data_prep.prepare(docs[name], os.path.join(folder, name), os.path.join(folder, "mix"))
    return folder


def soup(experts, path):
    """The experts' tensors averaged into one model of their shape (every tensor, MLPs too), saved for --init_from."""
    souped = cherry.soup([checkpoint.load_model(e) for e in experts])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"model": souped.state_dict(), "config": asdict(souped.config)}
    data_prep.atomic_write(path, lambda f: torch.save(state, f))


def verdict(d):
    """MoEE minus a comparator: better / worse / inconclusive by the seed-level 95% t interval."""
    lo, hi = d.interval()
    return "better" if hi < 0 else "worse" if lo > 0 else "inconclusive"


def main(argv=None):
    p = common.parser(__doc__, "fuse")
    p.add_argument("--seeds", type=int, help="seeds (default 3; 2 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="every arm at a toy size; the report goes into --out_dir")
    p.add_argument("--data", help="DATA/mix, DATA/korean, DATA/code: token folders of one tokenizer (default: made)")
    p.add_argument("--gpu", metavar="DATA", help="DATA/mix, DATA/korean, DATA/code: token folders of one tokenizer")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    s, t0 = GPU if args.gpu else SMOKE if args.smoke else CPU, time.time()
    seeds, one_by_one = range(args.seeds or (2 if args.smoke else 3)), args.gpu or args.smoke
    data = args.gpu or args.data or prepare(s)
    out = lambda name, seed: os.path.join(args.out_dir, f"{name}-s{seed}")

    def run(module, name, seed, domain, steps, lr, *flags):  # a job for common.run_all
        return (module, ["--data", os.path.join(data, domain), *flags, *common.run_flags(s, seed, steps), "--lr", lr,
                         "--warmup_iters", min(20, steps // 5), "--out_dir", out(name, seed)])
    shape = ["--n_head", s["heads"], "--n_embd", s["width"]]
    common.run_all([run("train", "teacher", seed, "mix", s["teacher_steps"], 2e-3, "--n_layer", s["teacher"], *shape)
                    for seed in seeds], one_by_one)
    unroll = ",".join([str(s["teacher"] // s["layers"])] * s["layers"])
    common.run_all([run("compress", f"expert-{d}", seed, d, s["expert_steps"], 1e-3, "--init_from",
                        out("teacher", seed), "--layers", s["layers"], "--unroll", unroll)
                    for seed in seeds for d in DOMAINS], one_by_one)
    experts = lambda seed: [out(f"expert-{d}", seed) for d in DOMAINS]
    for seed in seeds:
        if not os.path.exists(os.path.join(out("soup", seed), "summary.json")):
            soup(experts(seed), os.path.join(out("soup-init", seed), "ckpt.pt"))
    # FLOPs of the pipelines from the configs (fuse.py's counts): MoEE's is the teacher, two recoveries, its steps
    f = cherry.flops_per_token
    teacher, expert = (checkpoint.load_model(out(name, 0)).config for name in ("teacher", "expert-code"))
    moee = replace(expert, n_expert=2)
    single_steps = round((s["expert_steps"] * f(expert) + s["steps"] * f(moee)) / f(expert))  # + its own recovery
    dense_layers = max(1, round((cherry.count_params(cherry.GPT(moee)) - expert.vocab_size * s["width"])
                                / (12 * s["width"] ** 2)))
    dense = replace(teacher, n_layer=dense_layers)
    dense_steps = round((s["teacher_steps"] * f(teacher) + 2 * s["expert_steps"] * f(expert)
                         + s["steps"] * f(moee)) / f(dense))
    arms = {"korean": ["--experts", "E-korean"], "code": ["--experts", "E-code"],
            "korean+code": ["--experts", "E-korean", "E-code"], "korean+code-mtp": ["--experts", "E-korean", "E-code",
                                                                                    "--mtp", 1]}
    resolve = lambda flags, seed: [out(f"expert-{f[2:]}", seed) if str(f).startswith("E-") else f for f in flags]
    jobs = [run("fuse", arm, seed, "mix", s["steps"], 1e-3, *resolve(flags, seed))
            for seed in seeds for arm, flags in arms.items()]
    jobs += [run("fuse", f"{d}-long", seed, "mix", single_steps, 1e-3, "--experts", out(f"expert-{d}", seed))
             for seed in seeds for d in DOMAINS]
    jobs += [run("train", "soup", seed, "mix", s["steps"], 1e-3, "--init_from", out("soup-init", seed))
             for seed in seeds]
    jobs += [run("train", "dense", seed, "mix", dense_steps, 2e-3, "--n_layer", dense_layers, *shape) for seed in seeds]
    common.run_all(jobs, one_by_one)
    windows = {d: data_prep.Data(os.path.join(data, d), s["block"]).eval_batch(s["windows"]) for d in DOMAINS}
    names = ["expert-korean", "expert-code", *arms, "korean-long", "code-long", "soup", "dense"]
    losses = {name: {d: torch.stack([common.window_losses(checkpoint.load_model(out(name, seed)), *windows[d], s["device"])
                                     for seed in seeds]) for d in DOMAINS} for name in names}
    both = lambda name: torch.cat([losses[name][d] for d in DOMAINS], dim=1)  # the mix: both domains' windows
    gate_checks = []
    for d, other in (("korean", "code"), ("code", "korean")):
        diff = common.seed_diff(losses[f"expert-{d}"][d], losses[f"expert-{other}"][d])
        gate_checks.append((f"on {d}: expert {d} minus expert {other}: {common.pm(diff, 3)} (<= -0.05 and beyond 5 "
                            f"seed-level standard errors needed)", diff.mean <= -0.05 and -diff.mean >= 5 * diff.se))
    ok, gate_lines = common.gate("MoEE", gate_checks)
    best = min(DOMAINS, key=lambda a: both(a).mean().item())
    table = common.table("model", "params (total)", "active", "training MFLOPs/token", "steps on the mix", "korean",
                         "code", "both", "MoEE minus it")
    steps = {"dense": dense_steps, "korean-long": single_steps, "code-long": single_steps}
    for name in names:
        m = checkpoint.load_model(out(name, 0))
        mix_steps = "" if name.startswith("expert") else steps.get(name, s["steps"])
        diff = "" if name == "korean+code" else common.pm(common.seed_diff(both("korean+code"), both(name)))
        table.append(common.row(name, f"{cherry.count_params(m):,}", f"{cherry.count_params(m, active=True):,}",
                                f"{f(m.config) / 1e6:.1f}", mix_steps,
                                *[f"{losses[name][d].mean():.4f}" for d in DOMAINS], f"{both(name).mean():.4f}", diff))
    body = [f"Scale: {s}; {len(seeds)} seed(s); {s['windows']} held-out windows per domain and seed. The single "
            f"experts at MoEE's pipeline FLOPs: {single_steps} steps; the dense model: {dense_layers} layers, "
            f"{dense_steps} steps.", "", "## Gate", "", *gate_lines, "",
            "## Results (mean over windows and seeds; ± the seed-level standard error, 95% t interval)", "", *table,
            ""]
    if ok:
        comparisons = [("equal steps", f"the best single expert ({best})", best),
                       ("equal steps", "the soup (is routing needed?)", "soup"),
                       ("equal pipeline FLOPs", f"the best single expert ({best}), {single_steps} steps",
                        f"{best}-long"),
                       ("equal pipeline FLOPs", "the dense model from scratch", "dense")]
        body += ["## Verdicts", "", *common.table("budget", "MoEE minus", "difference", "MoEE is")]
        for budget, what, name in comparisons:
            d = common.seed_diff(both("korean+code"), both(name))
            body.append(common.row(budget, what, common.pm(d), f"**{verdict(d)}**"))
        mtp = common.seed_diff(both("korean+code-mtp"), both("korean+code"))
        body += ["", f"MTP (D = 1) on the MoEE: {common.pm(mtp)} (reported to help only at large sizes)."]
    else:
        body.append(f"**Verdict**: {common.NOT_TESTABLE}")
    name = os.path.abspath(os.path.join(args.out_dir, "fuse_smoke.md")) if args.smoke else "fuse_results.md"
    common.report(name, "MoEE: a mixture of efficient experts", " ".join(["python -m studies.fuse", *argv]), t0, body)


if __name__ == "__main__":
    main()
