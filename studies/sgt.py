"""
The SGT study: how much of full supervision does supervising a fraction f of the tokens recover, and why?

  python -m studies.sgt              # the small default: about 15 minutes on 2 quiet CPU cores
  python -m studies.sgt --reuse      # keep the finished runs in out/sgt, continue the unfinished ones (--resume)
  python -m studies.sgt --n_layer 6 --n_head 6 --n_embd 384 --max_iters 3000 --eval_interval 250 \\
      --batch_size 32 --lr 1e-3 --device cuda --jobs 1 --gpt2_vocab          # bigger, on a GPU

Every run is train.py's own loop (train.main), writing into <out_dir>/<run>/:
  text      full supervision and SGT at f = 0.15 for each selector, --seeds seeds (Shakespeare)
  sweep     SGT at each of --fractions for each selector, first seed
  controls  the same text with every window's tokens shuffled (--shuffle_tokens), and Python source code
            (the standard library's own): full and f = 0.15 for each selector, first seed
  bench     full vs SGT steps alone on the machine, for tokens/s against the FLOP ratio
Then it reads them back and writes the Markdown table (--results) and, with matplotlib, PNGs (--img_dir).
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import time

import torch

import cherry
import train
from data import prepare as data_prep

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.dirname(os.path.abspath(data_prep.__file__))
FREQ_BUCKETS = [(0, 10), (10, 100), (100, 1000), (1000, math.inf)]  # ranks of token types by training count
THEOREM1_LRS = [1e-3, 1e-2, 1e-1]


def study_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out_dir", default="out/sgt", help="one folder per run (train.py's outputs)")
    a("--results", default=os.path.join(HERE, "sgt_results.md"), help="the Markdown table")
    a("--img_dir", default=os.path.join(HERE, "img"), help="the plots (needs matplotlib)")
    a("--seeds", type=int, default=3, help="seeds of the main text comparison")
    a("--fractions", type=float, nargs="+", default=[0.05, 0.15, 0.3, 0.5], help="the f sweep (1.0 is the full run)")
    a("--selectors", nargs="+", default=["surprisal", "random"], help="SGT selectors to compare")
    # the scale: train.py's flags
    a("--n_layer", type=int, default=4)
    a("--n_head", type=int, default=4)
    a("--n_embd", type=int, default=64)
    a("--block_size", type=int, default=128)
    a("--batch_size", type=int, default=8)
    a("--max_iters", type=int, default=400)
    a("--lr", type=float, default=6e-3)
    a("--warmup_iters", type=int, default=20)
    a("--eval_interval", type=int, default=100)
    a("--eval_iters", type=int, default=12, help="held-out batches per evaluation")
    a("--gpt2_vocab", action="store_true", help="keep all 50,257 GPT-2 types in the head (default: only the types in the data)")
    a("--code_tokens", type=int, default=1_500_000, help="about this many tokens of standard-library source")
    a("--bench_iters", type=int, default=30, help="steps of each throughput benchmark run (0: skip)")
    a("--device", default="cpu")
    a("--jobs", type=int, default=2, help="runs at a time; on the CPU each gets --threads threads")
    a("--threads", type=int, default=1, help="torch threads per run on the CPU (one thread per run and one run per core "
                                             "is fastest: OpenMP threads stall whenever another process takes their core)")
    a("--reuse", action="store_true", help="skip runs that already have a summary.json; continue the others with --resume")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# data and runs


def prepare_data(args):
    """Shakespeare and Python source in train.py's format, each prepared once. Returns their folders."""
    suffix = "-gpt2" if args.gpt2_vocab else ""
    text, code = os.path.join(DATA, "sgt-text" + suffix), os.path.join(DATA, "sgt-code" + suffix)
    if not os.path.exists(os.path.join(text, "meta.json")):
        data_prep.prepare(data_prep.shakespeare_documents(), text, compact_vocab=not args.gpt2_vocab)
    if not os.path.exists(os.path.join(code, "meta.json")):
        # the first files of the standard library in sorted order (asyncio, collections, email, ...), up to the cap
        docs = data_prep.file_documents(sysconfig.get_paths()["stdlib"], "*.py", args.code_tokens)
        data_prep.prepare(docs, code, compact_vocab=not args.gpt2_vocab)
    return text, code


def run_name(domain, f, select, seed):
    return f"{domain}-{'full' if f == 1 else f'{select}{f:g}'}-s{seed}"


def train_flags(args, data, out, seed=0, f=1.0, select="surprisal", extra=()):
    """train.py's flags for one run at the study's scale (flags in extra win: argparse keeps the last)."""
    flags = ["--data", data, "--out_dir", out, "--seed", seed, "--sgt", f, "--sgt_select", select,
             "--n_layer", args.n_layer, "--n_head", args.n_head, "--n_embd", args.n_embd, "--block_size", args.block_size,
             "--batch_size", args.batch_size, "--max_iters", args.max_iters, "--lr", args.lr, "--warmup_iters", args.warmup_iters,
             "--eval_interval", args.eval_interval, "--eval_iters", args.eval_iters, "--log_interval", 10**9, "--device", args.device]
    return [str(v) for v in (*flags, *extra)]


def plan(args, text, code):
    """{run name: train.py flags}; each domain's full run (same seed) is the reference of its SGT runs."""
    runs = {}

    def add(domain, data, seed, f, select="surprisal", extra=()):
        name = run_name(domain, f, select, seed)
        runs[name] = train_flags(args, data, os.path.join(args.out_dir, name), seed, f, select, extra)

    for seed in range(args.seeds):
        add("text", text, seed, 1.0)
        for s in args.selectors:
            add("text", text, seed, 0.15, s)
    for f in args.fractions:
        for s in args.selectors:
            add("text", text, 0, f, s)
    for domain, data, extra in (("shuffled", text, ["--shuffle_tokens"]), ("code", code, [])):
        add(domain, data, 0, 1.0, extra=extra)
        for s in args.selectors:
            add(domain, data, 0, 0.15, s, extra)
    return runs


def run_one(job):
    """One train.py run in this process; its printout goes to <run>/train.log."""
    flags, threads = job
    if threads:
        torch.set_num_threads(threads)
    out = flags[flags.index("--out_dir") + 1]
    resume = "--resume" in flags
    if not resume:  # the study runs it again on purpose; train.py itself never overwrites a run
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.log"), "a" if resume else "w", buffering=1) as log, contextlib.redirect_stdout(log):
        train.main(flags)
    return out


def run_all(args, runs):
    """The runs, --jobs at a time, the costly ones (largest f) first so that the jobs end together."""
    resume = ["--resume"] if args.reuse else []  # an unfinished run continues exactly where it stopped
    todo = [flags + resume for name, flags in runs.items()
            if not (args.reuse and os.path.exists(os.path.join(args.out_dir, name, "summary.json")))]
    todo.sort(key=lambda flags: -float(flags[flags.index("--sgt") + 1]))
    threads = args.threads if args.device == "cpu" else None
    loads, t0 = [], time.time()
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(args.jobs))
            done = pool.imap_unordered(run_one, [(flags, threads) for flags in todo])
        else:
            done = (run_one((flags, threads)) for flags in todo)
        for i, out in enumerate(done):
            loads.append(os.getloadavg()[0])
            print(f"[{time.time() - t0:5.0f}s] {i + 1}/{len(todo)} {out} (load {loads[-1]:.1f})", flush=True)
    return loads


def bench(args, text):
    """Tokens/s of full and SGT steps (surprisal), run alone one after the other, for the FLOP ratio beside them."""
    rows = []
    for f in [1.0, *args.fractions]:
        out = os.path.join(args.out_dir, f"bench-{f:g}")
        n = args.bench_iters
        if not (args.reuse and os.path.exists(os.path.join(out, "summary.json"))):
            run_one((train_flags(args, text, out, f=f, extra=["--max_iters", n, "--eval_interval", n, "--eval_iters", 1,
                                                           *(["--resume"] if args.reuse else [])]),
                     args.threads if args.device == "cpu" else None))
        summary = json.load(open(os.path.join(out, "summary.json")))
        rows.append({"f": f, "tokens_per_s": summary["final"]["tokens_per_s"], "flops": summary["flops_per_token"]})
    return rows


def load(args, runs):
    result = {}
    for name in runs:
        out = os.path.join(args.out_dir, name)
        result[name] = {"rows": [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))],
                        "summary": json.load(open(os.path.join(out, "summary.json"))), "dir": out}
    return result


# ----------------------------------------------------------------------------
# metrics


def best(rows):
    """The evaluation with the lowest held-out loss on all tokens."""
    return min(rows, key=lambda r: r["loss"])


def recovery(baseline, sgt, full):
    """Share of full supervision's loss reduction from baseline that SGT reaches: 1 = as good as full."""
    return (baseline - sgt) / (baseline - full)


def compare(run, full, f):
    """One SGT run against the full run of its domain and seed, each at its best evaluation."""
    init, l_uni = full["rows"][0]["loss"], full["summary"]["unigram_loss"]
    b, bf = best(run["rows"]), best(full["rows"])
    r = recovery(init, b["loss"], bf["loss"])
    gammas = [row["gamma"] for row in run["rows"] if "gamma" in row]
    speeds = [row["tokens_per_s"] for row in run["rows"] if row["tokens_per_s"]]
    return {"loss": b["loss"], "iter": b["iter"], "loss_unsup": b["loss_unsup"], "R": r, "R_ctx": recovery(l_uni, b["loss"], bf["loss"]),
            "eff": r / f, "gamma_bar": statistics.mean(gammas) if gammas else None, "tokens_per_s": statistics.median(speeds)}


def eval_windows(run):
    """The held-out windows, targets' unigram surprisal and training-frequency rank of a run (as train.py saw them)."""
    a = run["summary"]["args"]
    data = train.Data(a["data"], a["block_size"], a["shuffle_tokens"])
    x, y = data.eval_batch(a["eval_iters"] * a["batch_size"])
    surprisal = cherry.surprisal_table(data.meta["unigram_counts"], data.meta["vocab_size"])
    rank = torch.empty(len(surprisal), dtype=torch.long)
    rank[surprisal.argsort()] = torch.arange(len(surprisal))  # 0 = the most frequent type
    return x, y, surprisal, rank[y]


def load_model(run):
    return cherry.GPT.from_pretrained(run["dir"]).eval()


@torch.no_grad()
def loss_by_frequency(run, x, y, rank):
    """Held-out loss (at the end of training) of the targets in each frequency bucket."""
    model = load_model(run)
    losses = torch.cat([model.token_losses(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)])
    return [losses[(rank >= lo) & (rank < hi)].mean().item() for lo, hi in FREQ_BUCKETS]


def theorem1(run):
    """Theorem 1's first-order check on one held-out batch split by the run's selector, before and after training."""
    a = run["summary"]["args"]
    x, y, surprisal, _ = eval_windows(run)
    x, y = x[:a["batch_size"]], y[:a["batch_size"]]
    select = cherry.select_tokens(y, a["sgt"], a["sgt_select"], surprisal, torch.Generator().manual_seed(0))
    trained = load_model(run)
    torch.manual_seed(a["seed"])
    fresh = cherry.GPT(trained.config).eval()  # the run's initialisation (train.py seeds torch the same way)
    out = []
    for label, model in (("init", fresh), ("trained", trained)):
        gamma, norm_s, norm_u = cherry.gradient_coupling(model, x, y, select)
        out.append({"model": label, "gamma": gamma, "norm_s": norm_s, "norm_u": norm_u,
                    "checks": [(lr, *cherry.theorem1_check(model, x, y, select, lr)) for lr in THEOREM1_LRS]})
    return out


# ----------------------------------------------------------------------------
# table and plots


def machine():
    """The CPU's model name and core count (and the GPU's name when there is one)."""
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def mean_sd(values, fmt="{:.3f}"):
    if len(values) == 1:
        return fmt.format(values[0])
    return (fmt + " ± " + fmt).format(statistics.mean(values), statistics.stdev(values))


def report(args, runs, bench_rows, timing):
    t0 = time.time()
    R, lines = runs, []
    add = lines.append
    first = R[run_name("text", 1.0, "", 0)]["summary"]
    cfg = first["config"]
    add("# SGT study: results\n")
    add(f"Command: `python -m studies.sgt{''.join(' ' + a for a in sys.argv[1:])}`  ")
    add(f"Scale: {cfg['n_layer']} layers x {cfg['n_embd']}, block {cfg['block_size']}, batch {args.batch_size}, {args.max_iters} steps "
        f"({args.max_iters * args.batch_size * args.block_size:,} tokens per run), lr {args.lr:g}, vocabulary {cfg['vocab_size']:,}  ")
    add(f"Machine: {machine()}, torch {torch.__version__}, {first['device']} {first['dtype']}, {args.jobs} runs at a time"
        f"{f' with {args.threads} thread(s) each' if args.device == 'cpu' else ''}  ")
    add(f"Wall time: {timing['wall_s'] / 60:.1f} min for the runs and the benchmark (mean 1-min load average "
        f"{statistics.mean(timing['loads']):.1f} meanwhile; ours alone make {args.jobs}), TABLE_TIME min for the table and plots\n")

    # 1. the main comparison
    add(f"## Text (Shakespeare): full vs SGT at f = 0.15, {args.seeds} seeds (mean ± sd)\n")
    add(f"Held-out loss of the unigram distribution: {first['unigram_loss']:.3f}; at initialisation: {R[run_name('text', 1.0, '', 0)]['rows'][0]['loss']:.3f}.\n")
    add("| run | best loss | at step | loss_unsup | R | R_ctx | efficiency R/f | gamma-bar | tokens/s |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    full = [R[run_name("text", 1.0, "", s)] for s in range(args.seeds)]
    fb = [best(r["rows"]) for r in full]
    add(f"| full | {mean_sd([b['loss'] for b in fb])} | {mean_sd([b['iter'] for b in fb], '{:.0f}')} | "
        f"{mean_sd([b['loss_unsup'] for b in fb])} | 1 | 1 | 1 | - | {mean_sd([compare(r, r, 1)['tokens_per_s'] for r in full], '{:.0f}')} |")
    main = {}
    for s in args.selectors:
        c = main[s] = [compare(R[run_name("text", 0.15, s, seed)], full[seed], 0.15) for seed in range(args.seeds)]
        col = lambda k, fmt="{:.3f}": mean_sd([x[k] for x in c], fmt)
        add(f"| {s} 15% | {col('loss')} | {col('iter', '{:.0f}')} | {col('loss_unsup')} | {col('R')} | {col('R_ctx')} | "
            f"{col('eff', '{:.2f}')} | {col('gamma_bar')} | {col('tokens_per_s', '{:.0f}')} |")
    add("\nR = (L(init) - L(SGT)) / (L(init) - L(full)), R_ctx = (L_uni - L(SGT)) / (L_uni - L(full)), each run at its best "
        "evaluation, against the full run of its seed. loss_unsup: the held-out tokens the run's own selector leaves out "
        "(for full: those surprisal would leave out). gamma-bar: mean of cos(g_S, g_U) over the evaluations. "
        "Paper: R = 0.67, R/f = 4.5, gamma-bar = 0.72.\n")

    # 2. controls
    add("## Controls: shuffled text and Python source (first seed)\n")
    add("| data | run | L_uni | best loss | R | R_ctx | efficiency R/f | gamma-bar |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for domain in ("text", "shuffled", "code"):
        fr = R[run_name(domain, 1.0, "", 0)]
        add(f"| {domain} | full | {fr['summary']['unigram_loss']:.3f} | {best(fr['rows'])['loss']:.3f} | 1 | 1 | 1 | - |")
        for s in args.selectors:
            c = compare(R[run_name(domain, 0.15, s, 0)], fr, 0.15)
            add(f"| {domain} | {s} 15% | | {c['loss']:.3f} | {c['R']:.3f} | {c['R_ctx']:.3f} | {c['eff']:.2f} | {c['gamma_bar']:.3f} |")

    # 3. the f sweep
    add("\n## Sweep of f (text, first seed)\n")
    add("| f | " + " | ".join(f"{s}: R | R_ctx | R/f" for s in args.selectors) + " |")
    add("| --- |" + " --- | --- | --- |" * len(args.selectors))
    sweep = {s: [compare(R[run_name("text", f, s, 0)], full[0], f) for f in args.fractions] for s in args.selectors}
    for i, f in enumerate(args.fractions):
        add(f"| {f:g} | " + " | ".join(f"{sweep[s][i]['R']:.3f} | {sweep[s][i]['R_ctx']:.3f} | {sweep[s][i]['eff']:.2f}" for s in args.selectors) + " |")
    add("| 1 |" + " 1 | 1 | 1 |" * len(args.selectors))

    # 4. compute
    if bench_rows:
        add("\n## Compute: the SGT step vs the full step (same config, run alone, one after the other)\n")
        add("| f | training FLOPs/token | FLOP ratio full/SGT | tokens/s | measured speed-up |")
        add("| --- | --- | --- | --- | --- |")
        b1 = bench_rows[0]
        for b in bench_rows:
            add(f"| {b['f']:g} | {b['flops'] / 1e6:.1f}M | {b1['flops'] / b['flops']:.2f} | {b['tokens_per_s']:.0f} | "
                f"{b['tokens_per_s'] / b1['tokens_per_s']:.2f} |")
        gpt2 = cherry.GPTConfig(**{**cfg, "vocab_size": 50304})
        add(f"\nWith the whole GPT-2 head (50,304) at this shape the FLOP ratio at f = 0.15 would be "
            f"{cherry.flops_per_token(gpt2) / cherry.flops_per_token(gpt2, 0.15):.2f}.")

    # 5. frequency buckets
    x, y, surprisal, rank = eval_windows(full[0])
    selected = cherry.selection_mask(cherry.select_tokens(y, 0.15, "surprisal", surprisal), y.size(1))
    add("\n## Held-out loss by training frequency of the target (text, first seed, end of training)\n")
    add("| run | " + " | ".join(f"types {lo}-{hi if hi < math.inf else 'rest'}" for lo, hi in FREQ_BUCKETS) + " |")
    add("| --- |" + " --- |" * len(FREQ_BUCKETS))
    buckets = [(rank >= lo) & (rank < hi) for lo, hi in FREQ_BUCKETS]
    add("| share of held-out tokens | " + " | ".join(f"{m.float().mean():.1%}" for m in buckets) + " |")
    add("| ... of which surprisal 15% supervises | " + " | ".join(f"{selected[m].float().mean():.1%}" for m in buckets) + " |")
    add("| unigram | " + " | ".join(f"{surprisal[y][m].mean():.3f}" for m in buckets) + " |")
    for name in [run_name("text", 1.0, "", 0)] + [run_name("text", 0.15, s, 0) for s in args.selectors]:
        add(f"| {name} | " + " | ".join(f"{v:.3f}" for v in loss_by_frequency(R[name], x, y, rank)) + " |")

    # 6. Theorem 1
    add("\n## Theorem 1, first order: an SGD step of size lr along -g_S changes L_U by -lr |g_S| |g_U| gamma\n")
    add("One held-out batch (8 sequences), split at f = 0.15 by the run's selector, at initialisation and after training "
        "(first seed).\n")
    add("| data | selector | model | gamma | abs g_S | abs g_U | "
        + " | ".join(f"lr {lr:g}: predicted / measured" for lr in THEOREM1_LRS) + " |")
    add("| --- | --- | --- | --- | --- | --- |" + " --- |" * len(THEOREM1_LRS))
    checks = {}
    for domain in ("text", "shuffled", "code"):
        for s in args.selectors:
            checks[domain, s] = theorem1(R[run_name(domain, 0.15, s, 0)])
            for t in checks[domain, s]:
                add(f"| {domain} | {s} | {t['model']} | {t['gamma']:.3f} | {t['norm_s']:.2f} | {t['norm_u']:.2f} | "
                    + " | ".join(f"{p:+.2e} / {m:+.2e}" for _, p, m in t["checks"]) + " |")

    plots(args, R, full, sweep, checks)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("\n".join(lines).replace("TABLE_TIME", f"{(time.time() - t0) / 60:.1f}") + "\n")
    print(f"wrote {args.results}")


def plots(args, R, full, sweep, checks):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: the table is written, the plots are not (pip install matplotlib)")
        return
    os.makedirs(args.img_dir, exist_ok=True)
    kinds = [("full", 1.0, "")] + [(f"{s} 15%", 0.15, s) for s in args.selectors]
    color = {label: f"C{i}" for i, (label, _, _) in enumerate(kinds)}
    domains = ("text", "shuffled", "code")

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(args.img_dir, name), dpi=80)

    def curves(ax, domain, key, seeds):
        for label, f, s in kinds:
            ys = torch.tensor([[r[key] for r in R[run_name(domain, f, s, seed)]["rows"]] for seed in range(seeds)])
            it = [r["iter"] for r in R[run_name(domain, f, s, 0)]["rows"]]
            ax.plot(it, ys.mean(0), color=color[label], label=label)
            if seeds > 1:
                ax.fill_between(it, ys.min(0).values, ys.max(0).values, color=color[label], alpha=0.2)
        ax.axhline(R[run_name(domain, 1.0, "", 0)]["summary"]["unigram_loss"], color="gray", ls="--", label="unigram")
        ax.set_xlabel("step")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("loss", "loss_sup", "loss_unsup")):
        curves(ax, "text", key, args.seeds)
        ax.set_title(f"text: held-out {key} (mean and range of {args.seeds} seeds)", fontsize=10)
    axes[0].legend()
    save(fig, "sgt_curves.png")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, domain in zip(axes, domains):
        curves(ax, domain, "loss", 1)
        ax.set_title(f"{domain}: held-out loss (first seed)", fontsize=10)
    axes[0].legend()
    save(fig, "sgt_controls.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for domain, ls in zip(domains, ("-", ":", "--")):
        for label, f, s in kinds[1:]:
            rows = R[run_name(domain, f, s, 0)]["rows"]
            ax.plot([r["iter"] for r in rows], [r["gamma"] for r in rows], ls=ls, color=color[label], label=f"{domain}, {label}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="step", ylabel="gamma = cos(g_S, g_U)", title="gradient coupling over training (first seed)")
    ax.legend(fontsize=8)
    save(fig, "sgt_gamma.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fs = [*args.fractions, 1.0]
    for label, _, s in kinds[1:]:
        axes[0].plot(fs, [c["eff"] for c in sweep[s]] + [1], "o-", color=color[label], label=s)
        axes[1].plot(fs, [c["R"] for c in sweep[s]] + [1], "o-", color=color[label], label=f"{s}: R")
        axes[1].plot(fs, [c["R_ctx"] for c in sweep[s]] + [1], "x:", color=color[label], label=f"{s}: R_ctx")
    axes[0].plot([0.15], [4.5], "k*", ms=12, label="paper")
    axes[1].plot([0.15], [0.67], "k*", ms=12, label="paper: R")
    for ax, title in zip(axes, ("efficiency R/f", "recovery")):
        ax.axhline(0, color="gray", lw=0.5)
        ax.set(xscale="log", xlabel="supervised fraction f", title=f"text: {title} vs f (first seed)")
        ax.legend(fontsize=8)
    save(fig, "sgt_fsweep.png")

    fig, ax = plt.subplots(figsize=(6, 5.5))
    for (domain, s), marker in zip(checks, "os^vD<>p"):
        for t, fill in zip(checks[domain, s], ("none", None)):
            ax.scatter([p for _, p, _ in t["checks"]], [m for _, _, m in t["checks"]], marker=marker, color=color[f"{s} 15%"],
                       facecolors=fill, label=f"{domain}, {s}, {t['model']}")
    lim = max(abs(v) for c in checks.values() for t in c for _, p, m in t["checks"] for v in (p, m))
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.5)
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set(xlabel="predicted change of L_U: -lr g_S.g_U", ylabel="measured change of L_U",
           title=f"Theorem 1, first order (SGD step, lr {', '.join(f'{lr:g}' for lr in THEOREM1_LRS)})")
    ax.legend(fontsize=7)
    save(fig, "sgt_theorem1.png")
    plt.close("all")
    print(f"wrote the plots in {args.img_dir}")


def main(argv=None):
    args = study_args(argv)
    t0 = time.time()
    text, code = prepare_data(args)
    runs = plan(args, text, code)
    loads = run_all(args, runs)
    bench_rows = bench(args, text) if args.bench_iters else []
    timing_path = os.path.join(args.out_dir, "timing.json")
    if loads or not os.path.exists(timing_path):  # keep the timing of the last invocation that trained
        train.write_json({"wall_s": time.time() - t0, "loads": loads or [os.getloadavg()[0]]}, timing_path)
    report(args, load(args, runs), bench_rows, json.load(open(timing_path)))


if __name__ == "__main__":
    main()
