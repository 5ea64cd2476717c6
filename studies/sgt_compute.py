"""
SGT's default selector, by a rule written before its runs, and the question a practitioner asks first: at equal
compute, does SGT reach a lower held-out loss than full supervision, or the same loss sooner? Every run is train.py's.

  python -m studies.sgt_compute              # small-scale runs of every candidate, then the finalists at the default
                                             # size, on Shakespeare, Python source and Korean (hours on 2 CPU cores)
  python -m studies.sgt_compute --small      # the small-scale runs only (writes the report from what is done)
  python -m studies.sgt_compute --timing     # also seconds per step of each arm, one run at a time (quiet machine)
  python -m studies.sgt_compute --untried data/untried-docs data/untried-korean-law   # the finalists, elsewhere

The corpora no run of the rule saw, made with data/prepare.py: Python's documentation topics (English prose), and Korean
law and bills, the corpus files of konlpy 0.6.0 (a registry package, not a dependency; GPT-2 tokens, mostly bytes):
  python data/prepare.py --corpus docs --compact_vocab --out_dir data/untried-docs
  pip download konlpy==0.6.0 --no-deps -d /tmp/konlpy && unzip -q /tmp/konlpy/*.whl 'konlpy/data/corpus/*' -d /tmp/konlpy
  python data/prepare.py --input /tmp/konlpy/konlpy/data/corpus --compact_vocab --out_dir data/untried-korean-law

Writes studies/sgt_defaults.md (the rule, every run, the winner) and studies/sgt_compute.md with its figures: held-out
loss against training FLOPs and against seconds, and the FLOPs and seconds each arm needs to reach full supervision's
loss at 1/4, 1/2 and all of its steps. Finished runs are kept; a study run again reuses them.
"""

import os
import statistics
import sys
import time

import torch

import cherry
import train
from data import prepare as data_prep
from studies import common

# The rule, fixed before its runs (commit 'studies/sgt_compute.py: the rule', before any run of it).
RULE = ("Each candidate is trained with train.py at f = 0.15 on Shakespeare, Python source and Korean (bpe:8192): at "
        "the small scale (4 x 64, compact vocabularies, 400 steps, lr 6e-3; seeds 0 and 1), then the finalists, the "
        "two qualifying candidates with the lowest mean final held-out loss at the small scale, at the default "
        "size (train.py's own defaults, 600 steps; seed 1337). A candidate qualifies if it ends below the unigram "
        "model's held-out loss in every one of its runs. The default is the qualifying finalist with the lowest mean "
        "final held-out loss over its default-size runs; a tie (within 0.005 nats) goes to the one listed first. If no "
        "candidate qualifies, the default stays as it is and the report says so.")
CANDIDATES = {  # train.py flags, simplest first; every SGT flag given (the defaults changed after the rule's runs)
    "uniform": ["--sgt_select", "surprisal", "--sgt_beta", 0, "--sgt_weights", "none", "--sgt_floor", 0],
    "beta 2, plain mean (the old default)": ["--sgt_select", "surprisal", "--sgt_beta", 2, "--sgt_weights", "none",
                                             "--sgt_floor", 0],
    "beta 2, weighted": ["--sgt_select", "surprisal", "--sgt_beta", 2, "--sgt_weights", "inverse", "--sgt_floor", 0],
    "beta 2, weighted, floor 0.1": ["--sgt_select", "surprisal", "--sgt_beta", 2, "--sgt_weights", "inverse",
                                    "--sgt_floor", 0.1],
    "beta 1, weighted, floor 0.1": ["--sgt_select", "surprisal", "--sgt_beta", 1, "--sgt_weights", "inverse",
                                    "--sgt_floor", 0.1],
    "gradient, weighted, floor 0.1": ["--sgt_select", "gradient", "--sgt_beta", 1, "--sgt_weights", "inverse",
                                      "--sgt_floor", 0.1],
}
FINALISTS = 2
OLD_DEFAULT = "beta 2, plain mean (the old default)"
CORPORA = ("shakespeare", "code", "korean")
SMALL = ["--n_layer", 4, "--n_head", 4, "--n_embd", 64, "--block_size", 128, "--batch_size", 8, "--max_iters", 400,
         "--lr", 6e-3, "--warmup_iters", 20, "--eval_interval", 40, "--eval_iters", 8, "--log_interval", 10**6,
         "--device", "cpu"]
DEFAULT = ["--eval_interval", 60, "--log_interval", 10**6, "--device", "cpu"]  # train.py's defaults otherwise
SCALES = {"small": (SMALL, (0, 1)), "default": (DEFAULT, (1337,))}
ARMS = {"full": [], **{name: ["--sgt", 0.15, *flags] for name, flags in CANDIDATES.items()}}


def data_folders(scale):
    """The small scale: each corpus's first 1.5M tokens, compact vocabularies (the SGT study's Shakespeare folder).
    The default size: each corpus's own folder (GPT-2's tokens; Korean a BPE of 8192), made on first use."""
    folders = {}
    for corpus in CORPORA:
        if scale == "default":
            folders[corpus] = os.path.join(common.DATA, corpus)
            data_prep.load(folders[corpus])  # made here, not by two runs at once
            continue
        folders[corpus] = os.path.join(common.DATA, f"sgt-{corpus}")
        if not os.path.exists(os.path.join(folders[corpus], "meta.json")):
            tokenizer = "bpe:8192" if corpus == "korean" else "gpt2"
            documents = data_prep.CORPORA[corpus]()
            data_prep.prepare(documents, folders[corpus], tokenizer, compact_vocab=True, max_tokens=1_500_000)
    return folders


def folder_name(arm):
    """'beta 2, weighted, floor 0.1' -> 'beta2-weighted-floor0.1'."""
    return arm.split(" (")[0].replace(", ", "-").replace(" ", "")


def train_all(args, prefix, folders, flags, seeds, arms):
    """Train every arm on every data folder {name: path} (finished runs are kept); {(name, arm, seed): out_dir}."""
    runs = {(n, a, s): os.path.join(args.out_dir, f"{prefix}{n}-{folder_name(a)}-s{s}")
            for a in arms for n in folders for s in seeds}
    jobs = [("train", ["--data", folders[n], "--seed", s, *flags, *ARMS[a], "--out_dir", out])
            for (n, a, s), out in runs.items()]
    common.run_all(jobs)
    return runs


def run_scale(args, scale, arms):
    """Every arm on every corpus at this scale; {(corpus, arm, seed): out_dir}."""
    flags, seeds = SCALES[scale]
    return train_all(args, f"{scale}-", data_folders(scale), flags, seeds, arms)


def run_untried(args, folders, finalists):
    """Full supervision, the finalists (the default among them) and the old default at the small scale, on prepared
    data folders that none of the rule's runs used; {(folder's name, arm, seed): out_dir}."""
    flags, seeds = SCALES["small"]
    names = {os.path.basename(os.path.normpath(f)): f for f in folders}
    return train_all(args, "", names, flags, seeds, list(dict.fromkeys(["full", *finalists, OLD_DEFAULT])))


def winner_of(default, finalists):
    """The rule's last stage: the qualifying finalist with the lowest mean final loss at the default size (a tie within
    0.005 nats goes to the one listed first); None if the stage is not done or no finalist qualifies."""
    winners = [a for a in finalists if default and qualifies(default, a)]
    if not winners:
        return None
    scores = {a: mean_final(default, a) for a in winners}
    return next(a for a in winners if scores[a] <= min(scores.values()) + 0.005)


def final_losses(runs, arm):
    """[(final held-out loss, unigram loss)] of an arm's runs."""
    return [(common.metrics(out)[-1]["loss"], common.summary(out)["unigram_loss"])
            for (_, a, _), out in runs.items() if a == arm]


def qualifies(runs, arm):
    return all(loss < unigram for loss, unigram in final_losses(runs, arm))


def mean_final(runs, arm):
    return statistics.mean(loss for loss, _ in final_losses(runs, arm))


# ----------------------------------------------------------------------------
# equal compute


def curve(out):
    """[(step, training FLOPs so far, held-out loss)] of a run."""
    s = common.summary(out)
    per_step = s["flops_per_token"] * s["tokens_per_step"]
    return [(r["iter"], r["iter"] * per_step, r["loss"]) for r in common.metrics(out)]


def first_reach(points, target):
    """The x at which a curve [(x, loss)] first reaches the target loss, linear between evaluations; None: never."""
    for (x0, l0), (x1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return x1 if l0 == l1 else x0 + (x1 - x0) * (l0 - target) / (l0 - l1)
    return None


def seconds_per_step(args, scale, folders):
    """Each arm's seconds per training step on corpus 0 (20 steps after 5 untimed, one run at a time, 2 threads):
    the wall-clock axis. Measured apart from the runs, which share the cores two at a time."""
    flags, _ = SCALES[scale]
    times = {}
    torch.set_num_threads(2)
    for arm in ARMS:
        out = os.path.join(args.out_dir, "timing", f"{scale}-{folder_name(arm)}")
        argv = ["--data", folders[CORPORA[0]], *flags, *ARMS[arm], "--max_iters", 25, "--eval_interval", 25,
                "--eval_iters", 1, "--out_dir", out]
        if not os.path.exists(os.path.join(out, "summary.json")):
            train.main([str(a) for a in argv])
        times[arm] = 1 / (common.metrics(out)[-1]["tokens_per_s"] / common.summary(out)["tokens_per_step"])
    return times


def runs_time(run_sets):
    """How many runs, and their own wall time summed (each had one core of a shared machine)."""
    outs = {out for runs in run_sets for out in runs.values()}
    return f"{len(outs)} runs, {sum(common.summary(out)['wall_s'] for out in outs) / 3600:.1f} h of their own wall time"


def arms_of(runs):
    return sorted({arm for _, arm, _ in runs}, key=list(ARMS).index)


def reach_table(runs, seeds, times):
    """FLOPs (and seconds) each arm needs to reach full supervision's loss at 1/4, 1/2 and all of its steps."""
    lines = common.table("corpus", "arm", "FLOPs to full's loss at 1/4 of its steps (x full's)", "at 1/2",
                         "at the end", "final loss")
    for corpus in CORPORA:
        for arm in arms_of(runs):
            cells = []
            for fraction in (0.25, 0.5, 1.0):
                needs, full_flops = [], []
                for seed in seeds:
                    full = curve(runs[corpus, "full", seed])
                    step = round(fraction * full[-1][0])
                    target = min(loss for it, _, loss in full if it <= step)
                    full_flops.append(first_reach([(flops, loss) for _, flops, loss in full], target))
                    reach = first_reach([(flops, loss) for _, flops, loss in curve(runs[corpus, arm, seed])], target)
                    needs.append(reach)
                points = curve(runs[corpus, arm, seeds[0]])
                timed = times.get(arm) if corpus == CORPORA[0] else None  # each step was timed on corpus 0 only
                cells.append(reach_cell(needs, statistics.mean(full_flops), timed, points))
            ends = statistics.mean(common.metrics(runs[corpus, arm, s])[-1]["loss"] for s in seeds)
            lines.append(common.row(corpus, arm, *cells, f"{ends:.3f}"))
    return lines


def reach_cell(needs, full_flops, seconds_per_step, points):
    """'never' if a seed never reaches it, else the mean FLOPs, as a multiple of full supervision's (and seconds,
    where timed)."""
    if any(n is None for n in needs):
        return "never"
    flops = statistics.mean(needs)
    text = f"{flops:.2e} ({flops / full_flops:.2f}x)"
    if seconds_per_step:
        per_step = points[1][1] / points[1][0]
        text += f", {flops / per_step * seconds_per_step:.0f} s"
    return text


def preset_ratios():
    """SGT 0.15's training FLOPs over full supervision's, per preset: where the head's saving shrinks."""
    lines = common.table("preset", "full: GFLOP/token", "SGT 0.15 drawn", "SGT 0.15 gradient or excess")
    for name, shape in cherry.PRESETS.items():
        cfg = cherry.GPTConfig(**shape)
        full = cherry.flops_per_token(cfg)
        drawn = cherry.flops_per_token(cfg, 0.15) / full
        model_picked = cherry.flops_per_token(cfg, 0.15, full_head_forward=True) / full
        lines.append(common.row(name, f"{full / 1e9:.2f}", f"{drawn:.2f}", f"{model_picked:.2f}"))
    return lines


def figure(runs, scale, seeds, times):
    """Held-out loss against training FLOPs (top, one panel per corpus) and seconds (below, corpus 0's: where each arm's
    step was timed), seed 0."""
    def draw(plt):
        fig, axes = plt.subplots(2, len(CORPORA), figsize=(5 * len(CORPORA), 7), squeeze=False)
        for j, corpus in enumerate(CORPORA):
            for arm in arms_of(runs):
                points = curve(runs[corpus, arm, seeds[0]])
                flops = [f for _, f, _ in points]
                losses = [loss for _, _, loss in points]
                axes[0][j].plot(flops, losses, label=arm)
                if arm in times and j == 0:  # timed on corpus 0 only
                    axes[1][j].plot([it * times[arm] for it, _, _ in points], losses, label=arm)
            axes[0][j].set(title=f"{corpus}, {scale}", xlabel="training FLOPs", ylabel="held-out loss")
            if j:
                axes[1][j].axis("off")
        axes[1][0].set(title=f"{CORPORA[0]}, {scale}", xlabel="seconds (each step timed apart)", ylabel="held-out loss")
        axes[0][0].legend(fontsize=7)
    common.figure(os.path.join(common.HERE, "img", f"sgt_compute_{scale}.png"), draw)


# ----------------------------------------------------------------------------
# the study


def main(argv=None):
    p = common.parser(__doc__, "sgt-compute")
    p.add_argument("--small", action="store_true", help="the small-scale runs only")
    p.add_argument("--timing", action="store_true", help="also time each arm's step, one run at a time")
    p.add_argument("--untried", nargs="+", metavar="FOLDER", default=[],
                   help="prepared data folders the rule never saw: the chosen default tried there (small scale)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.command = " ".join(["python -m studies.sgt_compute", *argv])
    t0 = time.time()
    small = run_scale(args, "small", ARMS)
    ranked = sorted((a for a in CANDIDATES if qualifies(small, a)), key=lambda a: mean_final(small, a))
    finalists = ranked[:FINALISTS]
    # the rule's own runs first, so that the default is decided before the full-supervision curves are run
    default = run_scale(args, "default", finalists) if finalists and not args.small else {}
    untried = run_untried(args, args.untried, finalists) if args.untried and finalists else {}
    write_defaults(args, t0, small, default, ranked, finalists, untried)
    if default:
        default.update(run_scale(args, "default", ["full"]))
    times = {}
    if args.timing:
        times = {scale: seconds_per_step(args, scale, data_folders(scale)) for scale in ("small", "default")}
    write_compute(args, t0, {"small": small, "default": default}, times)


def write_defaults(args, t0, small, default, ranked, finalists, untried):
    lines = [f"Rule: {RULE}", "", "Candidates: " + "; ".join(f"{a}: `{' '.join(map(str, f))}`"
                                                          for a, f in CANDIDATES.items()), ""]
    lines += common.table("scale", "corpus", "candidate", "seed", "final held-out loss", "unigram", "below")
    for scale, runs in (("small", small), ("default", default)):
        for (corpus, arm, seed), out in runs.items():
            loss, unigram = common.metrics(out)[-1]["loss"], common.summary(out)["unigram_loss"]
            lines.append(common.row(scale, corpus, arm, seed, f"{loss:.4f}", f"{unigram:.4f}",
                                    "yes" if loss < unigram else "NO"))
    lines += ["", f"The runs behind this table: {runs_time((small, default))}, two at a time on the 2 cores.", ""]
    lines += ["Qualifying at the small scale, by mean final loss: "
              + (", ".join(f"{a} ({mean_final(small, a):.4f})" for a in ranked) or "none")]
    winner = winner_of(default, finalists)
    if not default:
        lines.append("The default-size runs are not done yet (a later invocation reuses every finished run). Until "
                     f"they are, train.py's default is the first finalist, {finalists[0] if finalists else 'none'}: "
                     "an interim choice that the rule's last stage confirms or replaces.")
    elif not winner:
        lines.append("No finalist qualifies at the default size: the default stays as it is.")
    else:
        scores = {a: mean_final(default, a) for a in finalists if qualifies(default, a)}
        lines.append("At the default size: " + ", ".join(f"{a} {s:.4f}" for a, s in scores.items()))
        lines.append(f"**Winner: {winner}**: `{' '.join(map(str, CANDIDATES[winner]))}`.")
    if untried:
        lines += ["", "## On corpora the rule never saw (small scale, the rule's flags)", ""]
        lines += common.table("data", "arm", "seed", "final held-out loss", "unigram", "below")
        for (name, arm, seed), out in sorted(untried.items(), key=lambda run: run[0][0]):  # by data folder
            loss, unigram = common.metrics(out)[-1]["loss"], common.summary(out)["unigram_loss"]
            lines.append(common.row(name, arm, seed, f"{loss:.4f}", f"{unigram:.4f}", "yes" if loss < unigram else "NO"))
    common.report("sgt_defaults.md", "SGT: the default selector, by a rule", args.command, t0, lines)


def write_compute(args, t0, runs_by_scale, times):
    lines = ["FLOPs are train.py's own count (`cherry.flops_per_token`: matmuls, the head on the picked positions, "
             "gradient's extra head pass). Seconds come from `--timing` (each arm's step timed alone, on "
             f"{CORPORA[0]}'s data: the other corpora's vocabularies cost other seconds), where run.", "",
             f"The runs behind these tables: {runs_time(runs_by_scale.values())}.", ""]
    for scale, runs in runs_by_scale.items():
        if not runs:
            continue
        seeds = SCALES[scale][1]
        lines += [f"## {scale} scale: seeds {', '.join(map(str, seeds))}", ""]
        lines += reach_table(runs, seeds, times.get(scale, {}))
        lines += ["", f"![held-out loss against compute](img/sgt_compute_{scale}.png)", ""]
        figure(runs, scale, seeds, times.get(scale, {}))
    lines += ["## SGT's FLOPs over full supervision's, per preset", "", *preset_ratios()]
    common.report("sgt_compute.md", "SGT at equal compute", args.command, t0, lines)


if __name__ == "__main__":
    main()
