"""
The SGT study: how much of full supervision's loss reduction does supervising 15% of the targets recover, with which
selector, and why (gradient coupling, Theorem 1)? Every run is train.py's own.

  python -m studies.sgt               # text, shuffled text, code; 3 seeds; scratch and continued (~30 min, 2 CPU cores)
  python -m studies.sgt --full        # also code with 3 seeds and continued runs on every domain
  python -m studies.sgt --defaults    # the rule that picks train.py's default selector (default-length runs: hours)
  python -m studies.sgt --gpu         # 6 x 384 on GPT-2's whole vocabulary, one run at a time on a GPU

Selectors, each at f = 0.15 against full supervision with the same seed: a surprisal-tilted draw with beta 0
(uniform), 1, 2, 3 and inf (top-k), beta inf with a third or two thirds of the picks uniform, and Rho-1's excess loss
over the unigram model. From scratch, and continued for the second half of the steps from the full run's checkpoint
at half time. Flags after -- go to train.py for every run (argparse keeps the last of a flag).
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

import cherry
import train
from studies import common

DATA = os.path.join(os.path.dirname(common.HERE), "data")
SCALE = ["--n_layer", 4, "--n_head", 4, "--n_embd", 64, "--block_size", 128, "--batch_size", 8, "--max_iters", 400,
         "--lr", 6e-3, "--warmup_iters", 20, "--eval_interval", 50, "--eval_iters", 8, "--log_interval", 10**6,
         "--device", "cpu"]
GPU = ["--n_layer", 6, "--n_head", 6, "--n_embd", 384, "--block_size", 256, "--batch_size", 32, "--max_iters", 2000,
       "--lr", 1e-3, "--warmup_iters", 100, "--eval_interval", 100, "--eval_iters", 16, "--device", "cuda", "--compile"]
SELECTORS = {"beta 0": [0, 0], "beta 1": [1, 0], "beta 2": [2, 0], "beta 3": [3, 0], "beta inf": ["inf", 0],
             "beta inf, mix 1/3": ["inf", 1 / 3], "beta inf, mix 2/3": ["inf", 2 / 3], "excess": None}
PAPER_R = 0.67
RULE = ("The default selector is the first of these candidates (beta, mix), ordered from the most to the least tilted, "
        "whose held-out loss, once below the unigram model's, never rises above it again and ends below it, in "
        "default-length runs (python train.py --sgt 0.15 --sgt_beta B --sgt_mix M) on Shakespeare and on Python "
        "source, 3 seeds each. Tilt: the mean unigram surprisal of the targets a candidate picks minus that of all "
        "targets, on Shakespeare's held-out split (4.35, 2.94, 2.56, 1.98, 1.63, 1.27, 1.14, 0.75, 0.61, 0.00 nats). "
        "Fixed before its runs.")
CANDIDATES = [("inf", 0), ("inf", 1 / 3), (3, 0), (2, 0), (3, 1 / 3), (2, 1 / 3), (1, 0), (1, 1 / 3), (0.5, 0), (0, 0)]
DEFAULT_SEEDS = (1337, 1338, 1339)


def selector_flags(name):
    beta_mix = SELECTORS[name]
    return ["--sgt_select", "excess"] if beta_mix is None else ["--sgt_beta", beta_mix[0], "--sgt_mix", beta_mix[1]]


def plan(args, scale, domains, out):
    """{(domain, setting, seed, start): train.py argv}; setting 'full' or a selector; start 'scratch' or 'continued'."""
    runs, half = {}, int(scale[scale.index("--max_iters") + 1]) // 2
    for domain, seeds in domains.items():
        folder = domains_data(args)[domain]
        for seed in range(seeds):
            for setting in ("full", *SELECTORS):
                base = ["--data", folder, "--seed", seed, *scale, *(["--shuffle_tokens"] if domain == "shuffled" else [])]
                sgt = [] if setting == "full" else ["--sgt", 0.15, *selector_flags(setting)]
                name = f"{domain}-{setting.replace(' ', '').replace(',', '-').replace('/', '')}-s{seed}"
                runs[domain, setting, seed, "scratch"] = [*base, *sgt, *args.train, "--out_dir", os.path.join(out, name)]
                if seed == 0 or args.full:  # continued: the second half from the full run's checkpoint at half time
                    runs[domain, setting, seed, "continued"] = [*base, *sgt, *args.train, "--max_iters", half,
                                                                "--init_from", os.path.join(out, f"{domain}-half-s{seed}"),
                                                                "--out_dir", os.path.join(out, name + "-cont")]
            runs[domain, "half", seed, "scratch"] = [*base, "--max_iters", half, "--lr_decay_iters", 2 * half,
                                                     *args.train, "--out_dir", os.path.join(out, f"{domain}-half-s{seed}")]
    return runs


def domains_data(args):
    """Shakespeare and the standard library's sources, compact vocabularies (GPT-2's whole one with --gpu)."""
    from data import prepare as data_prep
    folders = {}
    for domain, corpus in (("text", "shakespeare"), ("shuffled", "shakespeare"), ("code", "code")):
        folders[domain] = os.path.join(DATA, f"sgt-{corpus}" + ("-gpt2" if args.gpu else ""))
        if not os.path.exists(os.path.join(folders[domain], "meta.json")):
            docs = data_prep.CORPORA[corpus]()
            data_prep.prepare(docs, folders[domain], compact_vocab=not args.gpu, max_tokens=1_500_000)
    return folders


def recovery(init, sgt, full):
    return (init - sgt) / (init - full)


def compare(rows, full_rows, unigram):
    """One SGT run against the full run of its seed: R at each step, best vs best, beyond the unigram model, gamma."""
    by_step = {r["iter"]: r["loss"] for r in full_rows}
    init = full_rows[0]["loss"]
    best, full_best = min(rows, key=lambda r: r["loss"]), min(r["loss"] for r in full_rows)
    gamma = lambda key: statistics.mean(r[key] for r in rows if key in r and not math.isnan(r[key]))
    return {"R_t": {r["iter"]: recovery(init, r["loss"], by_step[r["iter"]]) for r in rows[1:]},
            "R": recovery(init, best["loss"], full_best), "R_opt": recovery(init, best["loss"], by_step[best["iter"]]),
            "R_ctx": recovery(unigram, best["loss"], full_best), "best_iter": best["iter"], "final": rows[-1]["loss"],
            "unsup": (rows[0]["loss_unsup"], rows[-1]["loss_unsup"]),
            **{k: gamma(k) for k in ("gamma", "gamma_trunk", "gamma_embedding_head", "gamma_naive") if k in rows[-1]}}


def mean_sd(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    return fmt.format(statistics.mean(values)) + (f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else "")


def theorem1(out_dir):
    """Theorem 1 out of sample at the end of a run: g_S from two training batches, L_U on two held-out batches; a plain
    SGD step, and one step of the run's own AdamW (its state from the checkpoint, at its last learning rate)."""
    ckpt = cherry.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    args = argparse.Namespace(**ckpt["args"])
    model = cherry.build_model(ckpt["config"], ckpt["model"], out_dir)
    data = train.Data(args.data, args.block_size, args.shuffle_tokens)
    selector = train.Selector(args, data.meta, "cpu")
    with torch.no_grad():
        held_out = [(x, y, mask) for x, y, mask, _ in train.HeldOut(args, data, selector, "cpu").masks(model, ctx)][:2]
        train_batches = []
        for i in range(2):
            x, y = data.train_batch(args.batch_size, torch.Generator().manual_seed(i))
            picked = selector.excess(x, y)(model.token_losses(x, y)) if args.sgt_select == "excess" else \
                selector.draw(y, torch.Generator().manual_seed(i))
            train_batches.append((x, y, cherry.selection_mask(picked, y.size(1))))

    def adamw(model, grads):
        optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, args.beta2), "cpu")
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = ckpt["metrics"][-1]["lr"]
        for p, g in zip([p for p in model.parameters() if p.requires_grad], grads):
            p.grad = g
        optimizer.step()

    updates = {"SGD 1e-3": cherry.sgd_update(1e-3), "SGD 1e-2": cherry.sgd_update(1e-2), "AdamW": adamw}
    return {name: cherry.theorem1_check(model, train_batches, held_out, update) for name, update in updates.items()}


ctx = train.nullcontext()


def stays_below(rows, unigram):
    """The rule's test: once below the unigram model's held-out loss, never above it again, and below it at the end."""
    below = [r["loss"] < unigram for r in rows]
    return below[-1] and all(below[below.index(True):])


def defaults(args):
    """Run the default rule (CANDIDATES, above) and write studies/sgt_defaults.md: the first candidate whose 6 runs
    all pass is the default; a candidate is dropped at its first failing run."""
    from data import prepare as data_prep
    code = os.path.join(DATA, "code")
    if not os.path.exists(os.path.join(code, "meta.json")):
        data_prep.main(["--corpus", "code"])
    lines, chosen, t0 = ["| beta | mix | data | seed | held-out loss: best / final | unigram | unsupervised: start -> end "
                         "| gamma (end) | passes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"], None, time.time()
    for beta, mix in CANDIDATES:
        passed = True
        for seed in DEFAULT_SEEDS:
            jobs = {domain: os.path.join(args.out_dir, "defaults", f"b{beta}-m{mix:.2f}-{domain}-s{seed}")
                    for domain in ("text", "code")}
            common.run_all([("train", ["--data", {"text": data_prep.DEFAULT_DIR, "code": code}[domain], "--sgt", 0.15,
                                       "--sgt_beta", beta, "--sgt_mix", mix, "--seed", seed, *args.train,
                                       "--out_dir", out]) for domain, out in jobs.items()])
            for domain, out in jobs.items():
                rows, uni = common.metrics(out), common.summary(out)["unigram_loss"]
                ok = stays_below(rows, uni)
                passed &= ok
                lines.append(f"| {beta} | {mix:.2f} | {domain} | {seed} | {min(r['loss'] for r in rows):.3f} / "
                             f"{rows[-1]['loss']:.3f} | {uni:.3f} | {rows[0]['loss_unsup']:.3f} -> "
                             f"{rows[-1]['loss_unsup']:.3f} | {rows[-1]['gamma']:.2f} | {'yes' if ok else 'no'} |")
            if not passed:
                break
        if passed:
            chosen = (beta, mix)
            break
    common.report(os.path.join(common.HERE, "sgt_defaults.md"), "SGT: the default selector, by a rule",
                  "python -m studies.sgt --defaults", time.time() - t0,
                  [RULE, f"Candidates: {CANDIDATES}.", "", *lines, "",
                   f"Default: --sgt_beta {chosen[0]} --sgt_mix {chosen[1]:.2f}." if chosen else "No candidate passed."])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join("out", "study-sgt"), help="one folder per run")
    p.add_argument("--full", action="store_true", help="also code with 3 seeds and continued runs everywhere")
    p.add_argument("--defaults", action="store_true", help="run the default rule instead of the study")
    p.add_argument("--gpu", action="store_true", help="the GPU scale: one run at a time")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.train = argv[split + 1:]
    if args.defaults:
        return defaults(args)
    study(args)


if __name__ == "__main__":
    main()
