"""
MoEE with experts that differ: Korean and Python source, one BPE vocabulary trained on both. A dense teacher on the
mix is compressed (its layers averaged into a third, each run 3 times, step embeddings) and recovered twice, on Korean
only (expert K) and on code only (expert C). Then the same steps on the mix for each of: K, C, each with multi-token
prediction (D = 1), MoEE(K, C) top-1, MoEE + MTP (a 2 x 2 of fusion and MTP); and a dense model with MoEE's total
parameters trained from scratch on the mix with the FLOPs of MoEE's whole pipeline. Every model is scored on the same
held-out windows of each domain (next-token loss only).

  python -m studies.fuse                  # one seed, ~30 min on 2 CPU cores
  python -m studies.fuse --seeds 3        # ~65 min (the README's figures)
  python -m studies.fuse --gpu DATA       # width 384, on DATA/{mix,korean,code} prepared elsewhere with one tokenizer

Gate first: each expert must be better than the other on its own domain by >= 0.05 nats and >= 10 seed-level standard
errors; otherwise the experts have not become different enough for a mixture to pay: not testable at this scale.
"""

import itertools
import os
import sys
import time
from dataclasses import replace

import torch

import cherry
import train
from data import prepare as data_prep
from studies import common

CPU = dict(teacher=6, layers=2, width=128, heads=4, teacher_steps=600, expert_steps=300, steps=300, batch=16, block=128,
           windows=200, device="cpu", vocab="bpe:4096", chars=2_500_000)
DOMAINS = ("korean", "code")
GPU = dict(teacher=12, layers=4, width=384, heads=6, teacher_steps=4000, expert_steps=2000, steps=2000, batch=32,
           block=256, windows=400, device="cuda")


def prepare(s):
    """Korean and code, the first ~s["chars"] characters of each (whole documents), one BPE trained on both."""
    folder = os.path.join(common.DATA, "fuse")
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


def main(argv=None):
    p = common.parser(__doc__, "fuse")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--gpu", metavar="DATA", help="DATA/mix, DATA/korean, DATA/code: token folders of one tokenizer")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    s, t0, seeds = GPU if args.gpu else CPU, time.time(), range(args.seeds)
    data = args.gpu or prepare(s)
    out = lambda name, seed: os.path.join(args.out_dir, f"{name}-s{seed}")

    def run(module, name, seed, domain, steps, lr, *flags):  # a job for common.run_all
        return (module, ["--data", os.path.join(data, domain), *flags, *common.run_flags(s, seed, steps), "--lr", lr,
                         "--warmup_iters", 20, "--out_dir", out(name, seed)])
    shape = ["--n_head", s["heads"], "--n_embd", s["width"]]
    common.run_all([run("train", "teacher", seed, "mix", s["teacher_steps"], 2e-3, "--n_layer", s["teacher"], *shape)
                    for seed in seeds], args.gpu)
    unroll = ",".join([str(s["teacher"] // s["layers"])] * s["layers"])
    common.run_all([run("compress", f"expert-{d}", seed, d, s["expert_steps"], 1e-3, "--init_from",
                        out("teacher", seed), "--layers", s["layers"], "--unroll", unroll)
                    for seed in seeds for d in DOMAINS], args.gpu)
    # the 2 x 2: one expert (a mixture of one is that expert) or both, without or with MTP; the same steps on the mix
    arms = {f"{'+'.join(e)}{'-mtp' if mtp else ''}": (e, mtp) for e in (["korean"], ["code"], list(DOMAINS))
            for mtp in (0, 1)}
    common.run_all([run("fuse", arm, seed, "mix", s["steps"], 1e-3, "--experts", *[out(f"expert-{d}", seed) for d in e],
                        "--mtp", mtp) for seed in seeds for arm, (e, mtp) in arms.items()], args.gpu)
    # a dense model with MoEE's total (non-embedding) parameters, from scratch, with the FLOPs of MoEE's whole pipeline
    moee, teacher, expert = (cherry.load_model(out(name, 0)) for name in ("korean+code", "teacher", "expert-code"))
    dense_layers = max(1, round(cherry.count_params(moee, non_embedding=True) / (12 * s["width"] ** 2)))
    dense = replace(teacher.config, n_layer=dense_layers)
    f = cherry.flops_per_token
    dense_steps = round((s["teacher_steps"] * f(teacher.config) + 2 * s["expert_steps"] * f(expert.config)
                         + s["steps"] * f(moee.config)) / f(dense))
    common.run_all([run("train", "dense", seed, "mix", dense_steps, 2e-3, "--n_layer", dense_layers, *shape)
                    for seed in seeds], args.gpu)
    windows = {d: train.Data(os.path.join(data, d), s["block"]).eval_batch(s["windows"]) for d in DOMAINS}
    names = ["expert-korean", "expert-code", *arms, "dense"]
    losses = {name: {d: torch.stack([common.window_losses(cherry.load_model(out(name, seed)), *windows[d], s["device"])
                                   for seed in seeds]) for d in DOMAINS} for name in names}
    both = lambda name: torch.cat([losses[name][d] for d in DOMAINS], dim=1)  # the mix: both domains' windows
    gate_checks = []
    for d, other in (("korean", "code"), ("code", "korean")):
        diff = common.seed_diff(losses[f"expert-{d}"][d], losses[f"expert-{other}"][d])
        gate_checks.append((f"on {d}: expert {d} minus expert {other}: {common.pm(diff, 3)} (<= -0.05 and beyond 10 "
                            f"standard errors needed)", diff.mean <= -0.05 and -diff.mean >= 10 * diff.se))
    ok, gate_lines = common.gate("MoEE", gate_checks)
    best = min(("korean", "code"), key=lambda a: both(a).mean().item())
    table = common.table("model", "params (total)", "active", "training MFLOPs/token", "korean", "code", "both",
                         "minus best single")
    for name in names:
        m = cherry.load_model(out(name, 0))
        table.append(common.row(name, f"{cherry.count_params(m):,}", f"{cherry.count_params(m, active=True):,}",
                                f"{f(m.config) / 1e6:.1f}", *[f"{losses[name][d].mean():.4f}" for d in DOMAINS],
                                f"{both(name).mean():.4f}",
                                "" if name == best else common.pm(common.seed_diff(both(name), both(best)))))
    body = [f"Scale: {s}; {len(seeds)} seed(s); {s['windows']} held-out windows per domain and seed. The dense model: "
            f"{dense_layers} layers, {dense_steps} steps.", "", "## Gate", "", *gate_lines, "",
            "## Results (mean over windows and seeds; ± the seed-level standard error, 95% t interval)", "", *table, ""]
    if ok:
        fusion = common.seed_diff(both("korean+code"), both(best))
        mtp = common.seed_diff(both("korean+code-mtp"), both("korean+code"))
        body += [f"**Verdict**: MoEE minus the best single expert ({best}) at equal steps: {common.pm(fusion)}: " + (
                 "better (the 95% t interval is below 0): the claim holds here." if fusion.bound(0.975, +1) < 0 else
                 "not better (the 95% t interval reaches 0): the claim does not hold here."),
                 f"MTP (D = 1) on the MoEE: {common.pm(mtp)} (reported to help only at large sizes)."]
    else:
        body.append(f"**Verdict**: {common.NOT_TESTABLE}")
    common.report("fuse_results.md", "MoEE: a mixture of efficient experts",
                  " ".join(["python -m studies.fuse", *argv]), t0, body)


if __name__ == "__main__":
    main()
