"""
Depth compression at small scale: train a 12-layer dense teacher, average it into 3 layers, recover through the
learned recurrent unroll, and compare with dense models trained from scratch. Runs on 2 CPU cores in ~20 minutes.

  python -m studies.compress                 # writes studies/compress_results.md and studies/img/compress.png
  python -m studies.compress --threads 1     # one thread per process: faster when another job shares the cores

The rows (DESIGN.md section 2; the paper compresses 48 -> 6 layers and unrolls 1,8,8,8,8,1 = 34):
  (a) the teacher, 12 layers                     (b) averaged into 3 layers, each run once, not trained
  (c) averaged, unrolled 1,4,1, not trained      (c+) the same with the LoRA set from the SVD, not trained
  (c') averaged, unrolled 4,4,4 (the teacher's depth), not trained, and (c'+) with the LoRA
  (d) recovered: (b), (c), (c+) and (c'+) each trained for the recovery steps
  (e) dense, 3 layers, from scratch              (f) dense, 8 layers (~2.5x the non-embedding parameters of (d))
Token budget: every trained model has seen the same number of training tokens in total. (e) and (f) train for
the teacher's steps plus the recovery steps; a recovered model's count includes the tokens its teacher saw.
All models are scored on the same 200 held-out windows (25,600 tokens); the noise is the standard error of the
per-window difference from (f), the windows being shared (paired). One seed: seed-to-seed spread is not measured.

Vocabulary: the GPT-2 ids that occur in the training split of Shakespeare, renumbered 0..18,709, plus one id for
the held-out tokens never seen in training (0.35% of them). Softmax over 50,304 logits is most of a step's time at
this width; over 18,711 the same runs take half the time. The token sequence is the same; the losses are not
comparable with runs on the full GPT-2 vocabulary.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

import cherry
import compress
import train
from data import prepare as data_prep

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "data", "shakespeare-compact")

TEACHER_LAYERS, LAYERS, DENSE_BIG_LAYERS = 12, 3, 8
SHAPE = ["--n_head", "4", "--n_embd", "128"]
COMMON = ["--data", DATA, "--block_size", "128", "--batch_size", "8", "--eval_iters", "10", "--eval_interval", "50",
          "--log_interval", "50", "--device", "cpu", "--seed", "1337"]
FROM_SCRATCH = ["--lr", "2e-3", "--warmup_iters", "50"]
RECOVERY = ["--lr", "1e-3", "--warmup_iters", "20"]
EVAL_WINDOWS = 200


def compact_vocabulary(src=data_prep.DEFAULT_DIR, dst=DATA):
    """A copy of the data with the token ids that occur in the training split renumbered densely (see above)."""
    if os.path.exists(os.path.join(dst, "meta.json")):
        return
    if not os.path.exists(os.path.join(src, "meta.json")):
        data_prep.main([])
    meta = json.load(open(os.path.join(src, "meta.json")))
    train_ids = np.fromfile(os.path.join(src, "train.bin"), dtype=meta["dtype"])
    val_ids = np.fromfile(os.path.join(src, "val.bin"), dtype=meta["dtype"])
    used = np.unique(train_ids)
    lookup = np.full(meta["vocab_size"], len(used), dtype=np.uint16)  # unseen in training -> one shared id
    lookup[used] = np.arange(len(used))
    os.makedirs(dst, exist_ok=True)
    lookup[train_ids].tofile(os.path.join(dst, "train.bin"))
    lookup[val_ids].tofile(os.path.join(dst, "val.bin"))
    counts = np.bincount(lookup[train_ids], minlength=len(used) + 1)
    meta.update(vocab_size=len(used) + 1, dtype="uint16", tokenizer="gpt2, renumbered to the ids in train.bin",
                unigram_counts={str(i): int(c) for i, c in enumerate(counts) if c})
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(meta, f)


@torch.no_grad()
def window_losses(model, x, y):
    """Mean held-out loss of each window, (n_windows,)."""
    model.eval()
    return torch.cat([model.token_losses(x[i:i + 20], y[i:i + 20]).mean(dim=1) for i in range(0, len(x), 20)]).double()


def load(out_dir):
    return cherry.GPT.from_pretrained(out_dir)


def curve(out_dir, token_offset=0):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    per_step = json.load(open(os.path.join(out_dir, "summary.json")))["tokens_per_step"]
    return [token_offset + r["iter"] * per_step for r in rows], [r["loss"] for r in rows]


def plot(curves, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, (tokens, losses), style in curves:
        ax.plot(np.array(tokens) / 1e6, losses, style, label=label, markersize=3)
    ax.set_xlabel("training tokens seen, teacher's included (millions)")
    ax.set_ylabel("held-out loss (train.py's evaluation)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{TEACHER_LAYERS} layers averaged into {LAYERS}, then recovered (Shakespeare, width 128)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out-study-compress"), help="where the runs write")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--teacher_steps", type=int, default=500, help="the teacher's training steps")
    p.add_argument("--recovery_steps", type=int, default=150, help="recovery steps; scratch runs get both")
    args = p.parse_args(argv)
    teacher_steps, recovery_steps = args.teacher_steps, args.recovery_steps
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, load_start = time.time(), os.getloadavg()
    out = lambda name: os.path.join(args.out_dir, name)
    for name in ("teacher", "d_once", "d_unroll", "d_unroll_lora", "d_full_lora", "e_dense_small", "f_dense_big"):
        shutil.rmtree(out(name), ignore_errors=True)  # the study re-runs them on purpose; train.py never overwrites a run
    compact_vocabulary()

    # 1. the teacher; 2. compress and recover three ways; 3. dense from scratch on the same total tokens
    train.main([*COMMON, *SHAPE, *FROM_SCRATCH, "--n_layer", str(TEACHER_LAYERS), "--max_iters", str(teacher_steps),
                "--out_dir", out("teacher")])
    teacher_ckpt = os.path.join(out("teacher"), "ckpt.pt")
    full_depth = ",".join([str(TEACHER_LAYERS // LAYERS)] * LAYERS)  # each layer group-size times: the teacher's depth
    recoveries = {"d_once": ["--unroll", "none", "--no_step_embed"],
                  "d_unroll": [],
                  "d_unroll_lora": ["--lora_rank", "8"],
                  "d_full_lora": ["--unroll", full_depth, "--lora_rank", "8"]}
    for name, flags in recoveries.items():
        compress.main([*COMMON, *RECOVERY, "--max_iters", str(recovery_steps), "--init_from", teacher_ckpt, "--layers", str(LAYERS), *flags, "--out_dir", out(name)])
    for name, layers in (("e_dense_small", LAYERS), ("f_dense_big", DENSE_BIG_LAYERS)):
        train.main([*COMMON, *SHAPE, *FROM_SCRATCH, "--n_layer", str(layers), "--max_iters", str(teacher_steps + recovery_steps),
                    "--out_dir", out(name)])
    train_s = time.time() - t0

    # 4. every model on the same held-out windows
    teacher = load(out("teacher"))
    schedule, full_schedule = load(out("d_unroll")).schedule, load(out("d_full_lora")).schedule
    tokens_per_step = json.load(open(os.path.join(out("teacher"), "summary.json")))["tokens_per_step"]
    teacher_tokens, total_tokens = teacher_steps * tokens_per_step, (teacher_steps + recovery_steps) * tokens_per_step
    rows = [  # key, what, model, training tokens
        ("a", f"teacher, dense {TEACHER_LAYERS} layers", teacher, teacher_tokens),
        ("b", f"averaged into {LAYERS} layers, each run once", cherry.compress(teacher, LAYERS, tuple(range(LAYERS)), step_embed=False), teacher_tokens),
        ("c", f"averaged, unrolled {schedule}, nothing learned", cherry.compress(teacher, LAYERS, schedule, step_embed=False), teacher_tokens),
        ("c+", "(c) + LoRA rank 8 from the SVD of (layer - mean)", cherry.compress(teacher, LAYERS, schedule, lora_rank=8), teacher_tokens),
        ("c'", f"averaged, unrolled {full_depth} (the teacher's depth), nothing learned", cherry.compress(teacher, LAYERS, full_schedule, step_embed=False), teacher_tokens),
        ("c'+", "(c') + LoRA rank 8 from the SVD", cherry.compress(teacher, LAYERS, full_schedule, lora_rank=8), teacher_tokens),
        ("d1", "(b) recovered: no unroll", load(out("d_once")), total_tokens),
        ("d2", "(c) recovered: unroll + step embeddings", load(out("d_unroll")), total_tokens),
        ("d3", "(c+) recovered: unroll + step embeddings + LoRA 8", load(out("d_unroll_lora")), total_tokens),
        ("d4", "(c'+) recovered: full-depth unroll + step embeddings + LoRA 8", load(out("d_full_lora")), total_tokens),
        ("e", f"dense {LAYERS} layers from scratch", load(out("e_dense_small")), total_tokens),
        ("f", f"dense {DENSE_BIG_LAYERS} layers from scratch", load(out("f_dense_big")), total_tokens),
    ]
    data = train.Data(DATA, 128)
    x, y = data.eval_batch(EVAL_WINDOWS)
    losses = {key: window_losses(model, x, y) for key, _, model, _ in rows}
    non_embedding = lambda model: cherry.count_params(model) - model.wte.weight.numel()
    reference_params = non_embedding(next(model for key, _, model, _ in rows if key == "d3"))  # the paper's method

    lines = ["| row | model | layers (distinct / run) | non-embedding params | x (d3) | training GFLOPs/token | training tokens | held-out loss | minus (f) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = {}
    for key, what, model, tokens in rows:
        params = non_embedding(model)
        diff = losses[key] - losses["f"]
        se = diff.std().item() / len(diff) ** 0.5
        results[key] = {"model": what, "layers": model.config.n_layer, "effective_layers": len(model.schedule),
                        "non_embedding_params": params, "params": cherry.count_params(model),
                        "training_flops_per_token": cherry.flops_per_token(model.config), "training_tokens": tokens,
                        "loss": losses[key].mean().item(), "minus_f": diff.mean().item(), "minus_f_se": se}
        gap = "" if key == "f" else f"{diff.mean().item():+.3f} ± {se:.3f}"
        lines.append(f"| ({key}) | {what} | {model.config.n_layer} / {len(model.schedule)} | {params:,} | {params / reference_params:.2f} "
                     f"| {cherry.flops_per_token(model.config) / 1e9:.3f} | {tokens / 1e6:.3f}M | {losses[key].mean().item():.3f} | {gap} |")
    wall = time.time() - t0
    table = "\n".join(lines)
    early = {}  # the scratch runs after as many tokens as a recovery alone (mid-schedule, from train.py's evaluations)
    for key, name in (("e", "e_dense_small"), ("f", "f_dense_big")):
        tokens, run_losses = curve(out(name))
        early[key] = min(zip(tokens, run_losses), key=lambda t: abs(t[0] - recovery_steps * tokens_per_step))

    drawn = plot([("(a) teacher, 12 layers", curve(out("teacher")), "k-o"),
                  ("(d1) recovered, no unroll", curve(out("d_once"), teacher_tokens), "c-s"),
                  ("(d2) recovered, unroll", curve(out("d_unroll"), teacher_tokens), "b-s"),
                  ("(d3) recovered, unroll + LoRA 8", curve(out("d_unroll_lora"), teacher_tokens), "m-s"),
                  ("(d4) recovered, full-depth unroll + LoRA 8", curve(out("d_full_lora"), teacher_tokens), "y-s"),
                  ("(e) dense 3 layers, scratch", curve(out("e_dense_small")), "g-^"),
                  ("(f) dense 8 layers, scratch", curve(out("f_dense_big")), "r-^")],
                 os.path.join(HERE, "img", "compress.png"))
    machine = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
               f"{torch.get_num_threads()} torch thread(s), fp32; load average {load_start[0]:.1f} at the start, "
               f"{os.getloadavg()[0]:.1f} at the end")
    report = f"""# Depth compression at small scale

`python -m studies.compress {' '.join(argv if argv is not None else sys.argv[1:])}`: wall time {wall / 60:.1f} min ({train_s / 60:.1f} min training), {machine}.

{table}

- Width 128, 4 heads, block 128, batch 8; Shakespeare with the compact vocabulary of 18,711 ids (see the docstring).
- Teacher and scratch runs: AdamW, lr 2e-3, 50 warm-up steps, cosine to lr/10. Teacher: {teacher_steps} steps;
  (e) and (f): {teacher_steps + recovery_steps} steps. Recovery: {recovery_steps} steps at lr 1e-3 (20 warm-up).
  A step is {tokens_per_step:,} tokens.
- Non-embedding parameters: all but the token and position embeddings (the token table is 18,711 x 128 = 2.39M
  in every model). FLOPs per token: matmuls, forward + backward, every application of an unrolled layer counted.
- "minus (f)": held-out loss minus that of (f), mean over {EVAL_WINDOWS} windows ± its standard error (paired).
- Counting the teacher as free (the recovery tokens alone, {recovery_steps * tokens_per_step / 1e6:.3f}M): the scratch runs were at
  {early['e'][1]:.3f} (e) and {early['f'][1]:.3f} (f) after {early['e'][0] / 1e6:.3f}M tokens (train.py's evaluation, mid-schedule; plot).
{'' if drawn else '- No plot: matplotlib is not installed.'}
"""
    with open(os.path.join(HERE, "compress_results.md"), "w") as f:
        f.write(report)
    with open(out("results.json"), "w") as f:
        json.dump({"rows": results, "wall_s": wall, "machine": machine}, f, indent=2)
    print(report)


if __name__ == "__main__":
    main()
