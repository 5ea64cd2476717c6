"""
MoEE at small scale: two compressed experts, one recovered on text and one on code, fused into a Mixture of
Efficient Experts, against each single expert trained on for the same steps. Runs on 2 CPU cores in ~20 minutes.

  python -m studies.fuse                  # writes studies/fuse_results.md and studies/img/fuse.png
  python -m studies.fuse --threads 1      # one thread: faster when another job shares the cores

The recipe (DESIGN.md section 3; Branch-Train-MiX):
  1. a dense 6-layer teacher on the mixed corpus (Shakespeare + Python standard library source, one vocabulary)
  2. the teacher compressed to 2 layers (unrolled 3,3, step embeddings), recovered twice: on the text half of
     the training split (expert A) and on the code half (expert B)
  3. equal compute, the same steps on the mixed corpus for each of: A alone, B alone, MoEE(A, B) top-1 without
     MTP, MoEE(A, B) top-1 with MTP (D = 1; its module costs extra training FLOPs, counted in the table)
All models are scored on the same held-out windows (the held-out split of both domains), next-token loss only.
One seed: seed-to-seed spread is not measured; the noise column is the standard error of the per-window
difference from the best single expert (paired, the windows being shared).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig
import time

import numpy as np
import torch

import cherry
import compress
import fuse
import train
from data import prepare as data_prep
from studies.compress import load, window_losses  # the same scoring as the compression study

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "data", "fuse")  # mix/, text/, code/: one compact vocabulary
SHAPE = ["--n_head", "4", "--n_embd", "128"]
COMMON = ["--block_size", "128", "--batch_size", "8", "--eval_iters", "10", "--eval_interval", "50",
          "--log_interval", "50", "--device", "cpu", "--seed", "1337"]
EVAL_WINDOWS = 200


def prepare_data(code_tokens):
    """The mixed corpus (text documents first, then code) and its two training halves, all with one vocabulary."""
    if os.path.exists(os.path.join(DATA, "code", "meta.json")):
        return
    text = data_prep.shakespeare_documents()
    code = data_prep.file_documents(sysconfig.get_paths()["stdlib"], "*.py", code_tokens)
    mix = os.path.join(DATA, "mix")
    meta = data_prep.prepare(text + code, mix, compact_vocab=True)
    text_meta = data_prep.prepare(text, os.path.join(DATA, "text-only"))  # only for where text ends in each split
    meta["text_train_tokens"], meta["text_val_tokens"] = text_meta["train_tokens"], text_meta["val_tokens"]
    shutil.rmtree(os.path.join(DATA, "text-only"))
    with open(os.path.join(mix, "meta.json"), "w") as f:
        json.dump(meta, f)
    ids = np.fromfile(os.path.join(mix, "train.bin"), dtype=meta["dtype"])
    cut = meta["text_train_tokens"]
    for name, part in (("text", ids[:cut]), ("code", ids[cut:])):  # each half trains on its own; both score on mix's val
        os.makedirs(os.path.join(DATA, name), exist_ok=True)
        part.tofile(os.path.join(DATA, name, "train.bin"))
        shutil.copy(os.path.join(mix, "val.bin"), os.path.join(DATA, name, "val.bin"))
        counts = np.bincount(part, minlength=meta["vocab_size"])
        with open(os.path.join(DATA, name, "meta.json"), "w") as f:
            json.dump({**meta, "train_tokens": int(part.size), "unigram_counts": {str(i): int(c) for i, c in enumerate(counts) if c}}, f)


def held_out_windows():
    """EVAL_WINDOWS windows spread over the held-out split, and which of them are text (the rest are code)."""
    meta = json.load(open(os.path.join(DATA, "mix", "meta.json")))
    x, y = train.Data(os.path.join(DATA, "mix"), 128).eval_batch(EVAL_WINDOWS)
    val = np.fromfile(os.path.join(DATA, "mix", "val.bin"), dtype=meta["dtype"])
    starts = np.linspace(0, len(val) - 129, EVAL_WINDOWS).astype(np.int64)  # train.Data.eval_batch's windows
    assert torch.equal(x[:, 0], torch.from_numpy(val[starts].astype(np.int64)))
    return x, y, torch.from_numpy(starts + 128 < meta["text_val_tokens"])


def curve(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r["iter"] for r in rows], [r["loss"] for r in rows]


def plot(curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, (steps, losses), style in curves:
        ax.plot(steps, losses, style, label=label, markersize=3)
    ax.set(xlabel="step of the equal-compute phase", ylabel="held-out loss, text + code (next token)",
           title="Two compressed experts (text, code): single vs MoEE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out-study-fuse"), help="where the runs write")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--teacher_steps", type=int, default=300)
    p.add_argument("--expert_steps", type=int, default=150, help="recovery steps of each expert on its own half")
    p.add_argument("--steps", type=int, default=200, help="steps of the equal-compute phase")
    p.add_argument("--code_tokens", type=int, default=1_000_000, help="about this many tokens of standard-library source")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, load_start = time.time(), os.getloadavg()
    out = lambda name: os.path.join(args.out_dir, name)
    shutil.rmtree(args.out_dir, ignore_errors=True)  # every run of the study starts from nothing
    prepare_data(args.code_tokens)
    mix, lr = ["--data", os.path.join(DATA, "mix")], ["--lr", "1e-3", "--warmup_iters", "20"]

    # 1. teacher; 2. two experts; 3. equal compute on the mix
    train.main([*COMMON, *SHAPE, *mix, "--n_layer", "6", "--max_iters", str(args.teacher_steps), "--lr", "2e-3",
                "--warmup_iters", "50", "--out_dir", out("teacher")])
    for name in ("text", "code"):
        compress.main([*COMMON, *lr, "--data", os.path.join(DATA, name), "--init_from", out("teacher"), "--layers", "2",
                       "--max_iters", str(args.expert_steps), "--out_dir", out(f"expert-{name}")])
    phase = [*COMMON, *mix, *lr, "--max_iters", str(args.steps)]
    for name in ("text", "code"):  # a single expert trained on: train.py's loop with the expert as the model
        flags = [*phase, "--out_dir", out(f"single-{name}")]
        expert = load(out(f"expert-{name}"))
        p_train = train.training_args()
        p_train.set_defaults(**{k: getattr(expert.config, k) for k in train.SHAPE_FLAGS})
        train.train(train.parse_args(p_train, flags), expert)
    experts = [os.path.join(out(f"expert-{name}"), "ckpt.pt") for name in ("text", "code")]
    fuse.main([*phase, "--experts", *experts, "--out_dir", out("moee")])
    fuse.main([*phase, "--experts", *experts, "--mtp", "1", "--out_dir", out("moee-mtp")])
    train_s = time.time() - t0

    # 4. every model on the same held-out windows
    x, y, is_text = held_out_windows()
    rows = [("teacher, dense 6 layers", "teacher"), ("expert A (text), before the phase", "expert-text"),
            ("expert B (code), before the phase", "expert-code"), ("expert A (text) trained on", "single-text"),
            ("expert B (code) trained on", "single-code"), ("MoEE(A, B) top-1", "moee"), ("MoEE(A, B) top-1 + MTP 1", "moee-mtp")]
    models = {name: load(out(name)) for _, name in rows}
    losses = {name: window_losses(model, x, y) for name, model in models.items()}
    best_single = min(("single-text", "single-code"), key=lambda n: losses[n].mean().item())
    lines = ["| model | params (total) | params (active) | training GFLOPs/token | held-out loss | text | code | minus best single | expert load by layer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = {}
    for what, name in rows:
        model, loss = models[name], losses[name]
        diff = loss - losses[best_single]
        se = diff.std().item() / len(diff) ** 0.5
        summary = json.load(open(os.path.join(out(name), "summary.json")))
        load_by_layer = summary.get("fuse", {}).get("expert_load")
        results[name] = {"model": what, "params": cherry.count_params(model), "active": cherry.count_params(model, active=True),
                         "training_flops_per_token": cherry.flops_per_token(model.config), "loss": loss.mean().item(),
                         "text": loss[is_text].mean().item(), "code": loss[~is_text].mean().item(),
                         "minus_best_single": diff.mean().item(), "se": se, "expert_load": load_by_layer}
        r = results[name]
        gap = "" if name == best_single or name == "teacher" or name.startswith("expert") else f"{r['minus_best_single']:+.3f} ± {se:.3f}"
        load_text = "; ".join("/".join(f"{f:.2f}" for f in layer) for layer in load_by_layer) if load_by_layer else ""
        lines.append(f"| {what} | {r['params']:,} | {r['active']:,} | {r['training_flops_per_token'] / 1e9:.3f} | "
                     f"{r['loss']:.3f} | {r['text']:.3f} | {r['code']:.3f} | {gap} | {load_text} |")
    wall = time.time() - t0
    drawn = plot([("expert A (text) trained on", curve(out("single-text")), "b-s"),
                  ("expert B (code) trained on", curve(out("single-code")), "g-s"),
                  ("MoEE top-1", curve(out("moee")), "r-o"), ("MoEE top-1 + MTP 1", curve(out("moee-mtp")), "m-o")],
                 os.path.join(HERE, "img", "fuse.png"))
    meta = json.load(open(os.path.join(DATA, "mix", "meta.json")))
    machine = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch thread(s), fp32; load average {load_start[0]:.1f} at the start, "
               f"{os.getloadavg()[0]:.1f} at the end")
    report = f"""# MoEE at small scale

`python -m studies.fuse {' '.join(argv if argv is not None else sys.argv[1:])}`: wall time {wall / 60:.1f} min ({train_s / 60:.1f} min training), {machine}.

{chr(10).join(lines)}

- Data: Shakespeare ({meta['text_train_tokens']:,} training tokens) + Python standard library source
  ({meta['train_tokens'] - meta['text_train_tokens']:,}), one compact vocabulary of {meta['vocab_size']:,} ids; held-out: both
  domains' held-out splits, {EVAL_WINDOWS} windows of 128 ({int(is_text.sum())} text, {int((~is_text).sum())} code).
- Width 128, 4 heads, block 128, batch 8 (1,024 tokens a step). Teacher: {args.teacher_steps} steps at lr 2e-3. Experts: the
  teacher averaged into 2 layers, unrolled 3,3 (6 applications) with step embeddings, {args.expert_steps} recovery steps at lr 1e-3
  on their own half. Phase: {args.steps} steps at lr 1e-3 on the mix for every row below the experts.
- Active parameters: what one token uses (top-1 of the experts' MLPs, the routers; no MTP module). "minus best single":
  held-out loss minus that of the best single expert after the phase ({best_single}), mean over windows ± standard error.
- Expert load: share of held-out tokens routed to expert A / B, per layer (all applications of the layer).
{'' if drawn else '- No plot: matplotlib is not installed.'}
"""
    with open(os.path.join(HERE, "fuse_results.md"), "w") as f:
        f.write(report)
    with open(out("results.json"), "w") as f:
        json.dump({"rows": results, "wall_s": wall, "machine": machine}, f, indent=2)
    print(report)


if __name__ == "__main__":
    main()
