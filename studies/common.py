"""What the three studies share: running the scripts, reading their outputs, scoring models on the same held-out
windows, seed-level statistics (the seed is the unit of replication), the testability gate, the equivalence test,
Markdown tables, the machine line, plots and the report."""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import time

import torch

import cherry
from data import prepare as data_prep

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "data")
NOT_TESTABLE = "not testable at this scale (the gate failed)."


def parser(doc, study):
    """A study's command line: its docstring as the help, and --out_dir (out/study-<study>) for the runs' folders."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join("out", f"study-{study}"), help="one folder per run")
    return p


def run_flags(s, seed, steps):
    """train.py's flags for a run of `steps` at scale s: its batch shape and device, 5 evaluations, no step logs."""
    return ["--block_size", s["block"], "--batch_size", s["batch"], "--device", s["device"], "--seed", seed,
            "--max_iters", steps, "--eval_interval", max(1, steps // 5), "--eval_iters", 8, "--log_interval", 10**6]


def out_dir(argv):
    return argv[argv.index("--out_dir") + 1]


def run_one(job):
    """One script run (train, compress or fuse: its main(argv)) in this process, its printout in <out_dir>/log.txt.
    A finished run (summary.json) is kept; an unfinished one is cleared and run again: the study does it on purpose."""
    module, argv = job
    out = out_dir(argv)
    if os.path.exists(os.path.join(out, "summary.json")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.set_num_threads(1)
    with open(os.path.join(out, "log.txt"), "w", buffering=1) as log, contextlib.redirect_stdout(log):
        __import__(module).main([str(a) for a in argv])
    return out


def run_all(jobs, gpu=False):
    """[(module, argv)] runs, one at a time in this process on a GPU (or gpu=True: a toy run); on the CPU two at a time
    with one torch thread each: one thread per run and one run per core is fastest (OpenMP threads stall whenever
    another process takes their core)."""
    t0 = time.time()
    with contextlib.nullcontext() if gpu else multiprocessing.get_context("spawn").Pool(2) as pool:
        done = (pool.imap_unordered if pool else map)(run_one, jobs)
        for i, out in enumerate(done):
            print(f"[{time.time() - t0:5.0f}s] {i + 1}/{len(jobs)} {out}", flush=True)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def summary(out):
    return json.load(open(os.path.join(out, "summary.json")))


def machine():
    """The CPU's model and cores, the GPU if any, and torch's version: the line every report starts with."""
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


@torch.no_grad()
def window_losses(model, x, y, device="cpu", batch=32):
    """Held-out loss of each window (n_windows,), to pair models scored on the same windows."""
    model.eval().to(device)
    return torch.cat([model.token_losses(x[i:i + batch].to(device), y[i:i + batch].to(device)).mean(1).double().cpu()
                      for i in range(0, len(x), batch)])


@torch.no_grad()
def detilted_window_losses(model, x, y, log_rates, batch=8):
    """For each log_rate (vocab_size,): the mean cross-entropy of each held-out window of the logits
    minus it, a selector's tilt of token frequencies undone (one forward for all of them)."""
    out = [[] for _ in log_rates]
    for i in range(0, len(x), batch):
        logits = model.lm_head(model.hidden(x[i:i + batch])).double()
        for losses, log_rate in zip(out, log_rates):
            losses += cherry.cross_entropy(logits - log_rate, y[i:i + batch]).mean(1).tolist()
    return out


# Student's t quantiles for one-sided levels 0.95 and 0.975 (two-sided 90% and 95%) on 1 .. 30 degrees of freedom
T_TABLE = {0.95: (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
                  1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
                  1.699, 1.697),
           0.975: (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
                   2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
                   2.045, 2.042)}
NORMAL = {0.95: 1.6449, 0.975: 1.9600}


def t_quantile(p, df):
    """Student's t quantile at p (0.95 or 0.975) on df degrees of freedom: the table, past 30 the Cornish-Fisher
    expansion around the normal quantile (within 0.001 there); no degrees of freedom (one seed): inf."""
    if df < 1:
        return math.inf
    if df <= 30:
        return T_TABLE[p][df - 1]
    z = NORMAL[p]
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


class Diff:
    """A difference over n seeds: the mean of the per-seed values, its standard error sd / sqrt(n) (nan for one seed)
    and t intervals on n - 1 degrees of freedom. window_se: the window-level standard error within a seed (the root
    mean square over seeds), a diagnostic of the evaluation's own noise, never the error of the difference."""

    def __init__(self, per_seed, window_se=math.nan):
        self.per_seed = [float(v) for v in per_seed]
        self.n, self.window_se = len(self.per_seed), window_se
        self.mean = sum(self.per_seed) / self.n
        var = sum((v - self.mean) ** 2 for v in self.per_seed) / (self.n - 1) if self.n > 1 else math.nan
        self.se = math.sqrt(var / self.n)

    def bound(self, p, side):
        """The one-sided p bound: side +1 upper, -1 lower (a two-sided interval of 2p - 1 is both)."""
        return self.mean + side * t_quantile(p, self.n - 1) * (0 if self.se == 0 else self.se)

    def interval(self):
        """The two-sided 95% t interval."""
        return self.bound(0.975, -1), self.bound(0.975, +1)


def seed_diff(a, b):
    """a - b for two models scored on the same held-out windows, a and b (seeds, windows) (or (windows,): one seed):
    the per-seed mean differences over seeds, with the within-seed window-level SE as a diagnostic."""
    d = (a - b).double().reshape(-1, a.size(-1))
    window_se = (d.var(dim=1) / d.size(1)).mean().sqrt().item() if d.size(1) > 1 else math.nan
    return Diff(d.mean(dim=1).tolist(), window_se)


def equivalence(d, delta):
    """Is a - b within the margin delta (fixed in advance)? holds: the one-sided 95% upper bound is below delta;
    fails: the one-sided 95% lower bound is above it; else inconclusive (also with one seed: no interval)."""
    if d.bound(0.95, +1) < delta:
        return "holds"
    if d.bound(0.95, -1) > delta:
        return "fails"
    return "inconclusive"


def pm(d, digits=4):
    """A Diff as "+0.1234 ± 0.0056 [95% CI +0.11, +0.14]" (± the seed-level SE); one seed: "± ? (1 seed)"."""
    if d.n < 2:
        return f"{d.mean:+.{digits}f} ± ? (1 seed; within-seed window SE {d.window_se:.{digits}f})"
    lo, hi = d.interval()
    return f"{d.mean:+.{digits}f} ± {d.se:.{digits}f} [95% CI {lo:+.{digits}f}, {hi:+.{digits}f}]"


def row(*cells):
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def table(*columns):
    """A Markdown table's header: its row of column names and the rule under it."""
    return [row(*columns), "|" + " --- |" * len(columns)]


def gate(name, checks):
    """The testability gate: [(what, passed)]. Printed, and returned as (passed, lines for the report)."""
    lines = [f"- {'pass' if ok else 'FAIL'}: {what}" for what, ok in checks]
    ok = all(passed for _, passed in checks)
    lines.append(f"- gate: {'passed' if ok else f'failed: {name} is not testable at this scale'}")
    print("\n".join(lines))
    return ok, lines


def report(name, title, command, t0, body):
    """Write studies/<name>, a study's Markdown results: the command, the wall time since t0 and the machine first."""
    path = os.path.join(HERE, name)
    text = f"# {title}\n\n`{command}`: {(time.time() - t0) / 60:.1f} min on {machine()}.\n\n" + "\n".join(body) + "\n"
    data_prep.atomic_write(path, lambda f: f.write(text.encode()))
    print(f"wrote {path}")


def figure(path, draw):
    """draw(plt) makes a figure, saved to path; without matplotlib, say so and go on."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no matplotlib: {path} is not drawn (pip install matplotlib)")
        return False
    draw(plt)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    plt.tight_layout()
    plt.savefig(path, dpi=90)
    plt.close("all")
    return True
