"""What the three studies share: running the scripts, reading their outputs, scoring models on the same held-out
windows with paired standard errors, the testability gate, Markdown tables, the machine line, plots and the report."""

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import time

import torch

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
    """[(module, argv)] runs, one at a time on a GPU; on the CPU two at a time with one torch thread each: one thread
    per run and one run per core is fastest (OpenMP threads stall whenever another process takes their core)."""
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


def paired(a, b):
    """Mean of a - b over the windows (and seeds, stacked), with its standard error: (mean, se)."""
    d = (a - b).flatten()
    return d.mean().item(), (d.std() / len(d) ** 0.5).item()


def pm(diff, digits=4):
    """A paired difference (mean, se) as "+0.1234 ± 0.0056"."""
    return f"{diff[0]:+.{digits}f} ± {diff[1]:.{digits}f}"


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
