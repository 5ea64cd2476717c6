"""
The SGT study: how much of full supervision's loss reduction does supervising 15% of the targets recover, with which
selector, how much of it is context rather than the selector's tilt of token frequencies, and does the sign of the
gradient coupling (Theorem 1) predict what a step on the selected targets does to the others? Every run is train.py's.

  python -m studies.sgt             # text, shuffled text, i.i.d. tokens, code; 3 seeds (~90 min, 2 CPU cores)
  python -m studies.sgt --full      # also beta 1, beta 3, beta inf with 2/3 uniform, and code with 3 seeds
  python -m studies.sgt --smoke     # every step, tiny model (~15 CPU seconds); report: <out_dir>/sgt_smoke.md
  python -m studies.sgt --gpu       # 6 x 384 on GPT-2's whole vocabulary, one run at a time on a GPU

(The rule that picked train.py's default selector: studies/sgt_compute.py.) Flags after -- go to train.py for every
run. Finished runs and finished measurements (sgt_*.json in a run's folder) are reused; the study runs in this order:

1. Learning rates. Full supervision and every selector on text, first seed, at 3 rates; all of a setting's other runs
   use its best (the lowest best held-out loss), so no arm is compared at another arm's rate.
2. Runs. Every setting on text and code; full supervision on i.i.d. unigram tokens (no context at all) and on
   shuffled text (each window's tokens permuted: a bag of tokens, no order), at the first window length where the
   collapse's gate passes, then every selector on shuffled text (and on text) at that length.
3. De-tilted loss, at the end of every SGT run: a selector whose picks favour some token types teaches q(y|c) ~ p(y|c)
   pi(y), pi(y) the share of the training loss a target of type y gets. pi_hat(y) is measured on 2048 training
   windows under the run's own selector (gradient and excess: with the run's final model): each target's weight in
   the training loss as a multiple of full supervision's 1/T (T/k for a plain pick, T w for an inverse-weighted one,
   0 unpicked), averaged over the type's occurrences and 16 draws of each window, with one pseudo-draw at 1 (a type
   never picked, like top-k's frequent ones, is not at 0; a type that never occurs is left alone).
   The de-tilted loss is the cross-entropy of logits - log pi_hat(y): the softmax renormalises, so only the
   ratios between types matter, and a selector without a tilt (pi_hat = 1, or inverse weights, E[T w] = 1 at every
   target) needs no correction; the study checks that it gets none (de-tilting lowers its loss by less than 0.01 nats;
   the uniform draw, untilted by construction, is printed beside it as pi_hat's own noise), and that de-tilting an
   inverse-weighted run by its plain pick rate instead would hurt it.
4. Coupling and Theorem 1, on text, first seed, at steps 50, 100, 200 and the end. The checkpoints at 50, 100 and 200
   come from train.py runs stopped there on the full run's schedule (--lr_decay_iters = its max_iters: the same
   trajectory). train.py's own gamma (every evaluation, 4 batches of batch_size) is the cheap reading; the careful one
   is here: from 16 held-out batches of 32 sequences, the numerator E[g_S] . E[g_U] and gamma (cherry.py,
   coupling_with_error), each with a jackknife standard error over the batches, the undefined estimates counted.
   Theorem 1: over 16 independent pairs (a training batch, a held-out batch of 16 sequences, both apart from the
   coupling's batches), the change of L_U (the held-out batch's loss on the targets its selector does not pick) after
   one step on the training batch's g_S, at the run's learning rate of that step: plain SGD, and Adam's step from
   the run's own state without momentum or weight decay (g / (sqrt(v_hat) + eps), v updated with g as Adam does, so a
   coordinate with no history moves by at most lr / sqrt(1 - beta2)). To first order the change is -lr g_U . P g_S,
   P = 1 / (sqrt(v_hat) + eps) (v updated with the coupling batches' mean squared g_S, as a step updates it with its
   own), so the predicted sign is minus the sign of the numerator E[g_S] . P E[g_U] measured on the coupling's
   batches (P = 1 for SGD).

Statistics: the seed is the unit of replication (common.Diff: per-seed values, mean ± sd / sqrt(n)); the coupling's
error is over held-out batches, Theorem 1's over pairs.
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch

import checkpoint
import cherry
import coupling
import guards
import train
from data import prepare as data_prep
from studies import common

SCALE = ["--n_layer", 4, "--n_head", 4, "--n_embd", 64, "--block_size", 128, "--batch_size", 8, "--max_iters", 400,
         "--warmup_iters", 20, "--eval_interval", 50, "--eval_iters", 8, "--log_interval", 10**6, "--device", "cpu"]
GPU = ["--n_layer", 6, "--n_head", 6, "--n_embd", 384, "--block_size", 256, "--batch_size", 32, "--max_iters", 2000,
       "--warmup_iters", 100, "--eval_interval", 100, "--eval_iters", 16, "--device", "cuda", "--compile"]
SMOKE = ["--n_layer", 1, "--n_head", 2, "--n_embd", 16, "--block_size", 32, "--batch_size", 4, "--max_iters", 8,
         "--warmup_iters", 2, "--eval_interval", 4, "--eval_iters", 2, "--log_interval", 10**6, "--device", "cpu"]
# the sizes of the measurements: learning rates, seeds, snapshot steps, coupling batches x sequences, Theorem 1 pairs,
# training windows for pi_hat, the collapse's window lengths (tried in order), code seeds
SIZES = dict(lrs=(3e-3, 6e-3, 1.2e-2), seeds=3, steps=(50, 100, 200), batches=16, sequences=32, pairs=16,
             windows=2048, collapse_blocks=(128, 512), code_seeds=1)
GPU_SIZES = {**SIZES, "lrs": (5e-4, 1e-3, 2e-3), "steps": (100, 500, 1000), "collapse_blocks": (256, 1024)}
SMOKE_SIZES = dict(lrs=(3e-3, 6e-3, 1.2e-2), seeds=2, steps=(4,), batches=4, sequences=4, pairs=4, windows=16,
                   collapse_blocks=(32,), code_seeds=0)
PLAIN = ["--sgt_select", "surprisal", "--sgt_weights", "none", "--sgt_floor", 0]  # then each selector's own flags
SELECTORS = {name: [*PLAIN, *flags] for name, flags in {  # train.py's flags (the last of a flag given wins)
    "beta 0 (uniform)": ["--sgt_beta", 0], "beta 2": ["--sgt_beta", 2],
    "beta 2, inverse, floor 0.1": ["--sgt_beta", 2, "--sgt_weights", "inverse", "--sgt_floor", 0.1],
    "gradient, inverse": ["--sgt_select", "gradient", "--sgt_beta", 1, "--sgt_weights", "inverse"],
    "beta inf, mix 1/3": ["--sgt_beta", "inf", "--sgt_mix", 1 / 3], "beta inf (top-k)": ["--sgt_beta", "inf"],
    "excess (Rho-1)": ["--sgt_select", "excess"]}.items()}
MORE_SELECTORS = {name: [*PLAIN, *flags] for name, flags in {
    "beta 1": ["--sgt_beta", 1], "beta 3": ["--sgt_beta", 3], "beta inf, mix 2/3": ["--sgt_beta", "inf", "--sgt_mix", 2 / 3]
}.items()}
SMOKE_SELECTORS = ("beta 2", "beta 2, inverse, floor 0.1", "gradient, inverse")
PAPER_R = 0.67
NO_CORRECTION = 0.01  # nats: de-tilting an inverse-weighted run by its loss shares may lower its loss by less
COLLAPSE_GAP = 0.1  # nats full supervision must gain over the unigram model on shuffled text for a collapse to show


def recovery(base, sgt, full):
    """The share of full supervision's loss reduction from base (init, or the unigram model) that SGT reaches."""
    return (base - sgt) / (base - full) if base != full else math.nan


def compare(rows, full_rows, unigram):
    """One SGT run against the full run of its seed, from their metrics: R at each step, best vs best, beyond the
    unigram model; train.py's cheap gamma: its mean over the evaluations after step 0 that define it, and how many
    do not."""
    by_step = {r["iter"]: r["loss"] for r in full_rows}
    init = full_rows[0]["loss"]
    best, full_best = min(rows[1:], key=lambda r: r["loss"]), min(r["loss"] for r in full_rows[1:])
    gammas = [r["gamma"] for r in rows[1:] if "gamma" in r]
    defined = [g for g in gammas if not math.isnan(g)]
    return {"R_t": {r["iter"]: recovery(init, r["loss"], by_step[r["iter"]]) for r in rows[1:]},
            "R": recovery(init, best["loss"], full_best), "R_opt": recovery(init, best["loss"], by_step[best["iter"]]),
            "R_ctx": recovery(unigram, best["loss"], full_best), "best_iter": best["iter"], "final": rows[-1]["loss"],
            "gamma": statistics.mean(defined) if defined else math.nan, "gamma_undefined": len(gammas) - len(defined),
            "gamma_evaluations": len(gammas)}


def stays_below(rows, unigram):
    """Once below the unigram model's held-out loss, never above it again, and below it at the end."""
    below = [r["loss"] < unigram for r in rows]
    return below[-1] and all(below[below.index(True):])


# ----------------------------------------------------------------------------
# measurements on a run's checkpoint (in worker processes; cached in the run's folder)


def load_run(out, device="cpu"):
    ckpt = checkpoint.load_checkpoint(os.path.join(out, "ckpt.pt"))
    args = argparse.Namespace(**ckpt["args"])
    model = checkpoint.build_model(ckpt["config"], ckpt["model"], out).to(device).eval()
    return ckpt, args, model, data_prep.Data(args.data, args.block_size or model.config.block_size, args.shuffle_tokens)


def picks(selector, model, x, y, generator):
    """The selector's (positions, weights) in a batch (weights None: the plain mean), by the model's losses where the
    selector picks by them."""
    drawn = selector.draw(y.cpu(), generator)
    if drawn is not None:
        weights = drawn["weights"]
        return drawn["positions"].to(y.device), None if weights is None else weights.to(y.device)
    with torch.no_grad():
        return selector.chooser(x, y, generator, track=False)(model.token_losses(x, y))


def shares(selector, model, data, windows, batch, vocab_size, device, draws=16):
    """pi_hat by type (vocab_size,), twice: each target's weight in the training loss as a multiple of 1/T (T/k plain,
    T w weighted, 0 unpicked), and its plain pick rate as a multiple of f (T/k per pick, weights ignored); the mean
    over the type's occurrences in training windows and over `draws` draws of each batch (the picks' own noise
    averages out; a rare type is not read from one draw), with one pseudo-draw at 1."""
    generator = torch.Generator().manual_seed(12345)
    sums, counts = torch.zeros(2, vocab_size, dtype=torch.float64), torch.zeros(vocab_size, dtype=torch.float64)
    for _ in range(0, windows, batch):
        x, y = (t.to(device) for t in data.train_batch(batch, generator))
        losses = None
        for _ in range(draws):
            drawn = selector.draw(y.cpu(), generator)
            if drawn is None:  # gradient and excess: by the model's losses, computed once
                with torch.no_grad():
                    losses = model.token_losses(x, y) if losses is None else losses
                positions, weights = selector.chooser(x, y, generator, track=False)(losses)
            else:
                positions, weights = drawn["positions"].to(device), drawn["weights"]
            T, k = y.size(1), positions.size(1)
            plain = torch.zeros(y.shape, dtype=torch.float64, device=device).scatter_(1, positions, T / k)
            share = plain if weights is None else torch.zeros_like(plain).scatter_(1, positions,
                                                                                   T * weights.to(device).double())
            for i, values in enumerate((share, plain)):
                sums[i].index_add_(0, y.flatten().cpu(), values.flatten().cpu())
        counts.index_add_(0, y.flatten().cpu(), torch.full((y.numel(),), float(draws), dtype=torch.float64))
    return (sums + 1) / (counts + 1)  # one pseudo-pick: a type never picked (top-k's frequent ones) is not at 0


def cached(out, name, compute):
    """compute() once; its JSON in <out>/<name> from then on (a run redone clears its folder, and this with it)."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        result = compute()
        data_prep.atomic_write(path, lambda f: f.write(json.dumps(result).encode()))
    return json.load(open(path))


def measure_end(job):
    """At the end of an SGT run: the held-out loss of every held-out window of train.py's evaluation, as is, de-tilted
    by pi_hat's loss shares and by its plain pick rates; and full supervision's final model (full_out) split by this
    run's selector (its loss on the targets the selector picks and on the rest)."""
    out, full_out, windows, device = job

    def compute():
        torch.set_num_threads(1)
        _, args, model, data = load_run(out, device)
        selector = train.Selector(args, data.meta, device)
        rates = shares(selector, model, data, windows, args.batch_size, model.config.vocab_size, device)
        x, y = (t.to(device) for t in data.eval_batch(args.eval_iters * args.batch_size))
        raw, share, plain = common.detilted_window_losses(
            model, x, y, [torch.zeros(1, device=device), *rates.log().to(device)])
        full = load_run(full_out, device)[2]
        full_split = train.HeldOut(args, data, selector, device).evaluate(full, contextlib.nullcontext())
        return {"raw": raw, "detilted": share, "by_pick_rate": plain, "full_split": full_split}
    return cached(out, "sgt_detilt.json", compute)


def adam_state(ckpt, args, model):
    """Adam's second moments from a run's own state, per parameter: (v, step count, beta2, eps)."""
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, args.beta2), "cpu")
    optimizer.load_state_dict(ckpt["optimizer"])
    params = [p for p in model.parameters() if p.requires_grad]
    steps = float(optimizer.state[params[0]]["step"])
    return [optimizer.state[p]["exp_avg_sq"] for p in params], steps, args.beta2, optimizer.param_groups[0]["eps"]


def adam_preconditioner(state, g2):
    """P = 1 / (sqrt(v_hat) + eps) of a step (flattened), v updated with g2 (the mean squared g_S of the coupling's
    batches: what a step's own gradient adds) as in adam_direction, so the prediction and the step agree."""
    v, steps, beta2, eps = state
    v = torch.cat([s.flatten() for s in v]).double().to(g2.device)
    return 1 / (((beta2 * v + (1 - beta2) * g2) / (1 - beta2 ** (steps + 1))).sqrt() + eps)


def adam_direction(state):
    """Adam's step direction without momentum or weight decay, per parameter: g / (sqrt(v_hat) + eps), v updated with
    g first as Adam's own step does (beta1 = 0)."""
    v, steps, beta2, eps = state
    return lambda grads: [g / (((beta2 * s + (1 - beta2) * g * g) / (1 - beta2 ** (steps + 1))).sqrt() + eps)
                          for g, s in zip(grads, v)]


def l_u(model, x, y, mask):
    """L_U: the mean loss of the targets the selector does not pick."""
    return model.token_losses(x, y)[~mask].double().mean().item()


def theorem1_changes(model, pairs, lr, directions=(None,)):
    """Theorem 1 as a test: for each independent pair (training batch, held-out batch), each (x, y, mask), the change
    of the held-out batch's L_U after one step on the training batch's g_S (the gradient of its picked targets' mean
    loss): weights -= lr direction(g_S), for each direction (None: plain SGD, g_S itself). On the model in place,
    restored after every step. Returns one list of changes per direction. To first order a step P g_S changes L_U by
    -lr g_U . P g_S."""
    params = [p for p in model.parameters() if p.requires_grad]
    changes = [[] for _ in directions]
    for (x, y, mask), (hx, hy, hmask) in pairs:
        g_s = torch.autograd.grad(model.token_losses(x, y)[mask].mean(), params, allow_unused=True)
        g_s = [g if g is not None else torch.zeros_like(p) for g, p in zip(g_s, params)]
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            before = l_u(model, hx, hy, hmask)
            for direction, out in zip(directions, changes):
                for p, d in zip(params, direction(g_s) if direction else g_s):
                    p.sub_(lr * d)
                out.append(l_u(model, hx, hy, hmask) - before)
                for p, o in zip(params, old):
                    p.copy_(o)
    return changes


def measure_coupling(job):
    """At a checkpoint of an SGT run: the careful coupling (plain, and under Adam's preconditioner) on `batches`
    held-out batches of `sequences`, and Theorem 1's changes over `pairs` other pairs, with SGD and with Adam's P."""
    out, batches, sequences, pairs, device = job

    def compute():
        torch.set_num_threads(1)
        ckpt, args, model, data = load_run(out, device)
        selector, generator = train.Selector(args, data.meta, device), torch.Generator().manual_seed(args.seed + 3)
        n = batches + pairs  # the coupling's batches of `sequences`, then Theorem 1's of half as many, interleaved
        x, y = (t.to(device) for t in data.eval_batch(n * sequences))

        def with_mask(x, y):
            return x, y, cherry.selection_mask(picks(selector, model, x, y, generator)[0], y.size(1))
        held = [with_mask(x[i::n], y[i::n]) for i in range(batches)]
        held += [with_mask(x[i::n][:max(1, sequences // 2)], y[i::n][:max(1, sequences // 2)])
                 for i in range(batches, n)]
        state = adam_state(ckpt, args, model)
        g_s, g_u = coupling.batch_gradients(model, held[:batches])
        plain = coupling.coupling_with_error(g_s, g_u)
        root = adam_preconditioner(state, (g_s * g_s).mean(0)).sqrt()
        adam = coupling.coupling_with_error(g_s.mul_(root), g_u.mul_(root))  # g_S . P g_U = (P^1/2 g_S) . (P^1/2 g_U)
        del g_s, g_u
        training = [with_mask(*(t.to(device) for t in data.train_batch(args.batch_size, generator)))
                    for _ in range(pairs)]
        lr = train.lr_at(ckpt["iter"], args)  # the rate of the run's next step
        sgd, adam_changes = theorem1_changes(model, list(zip(training, held[batches:])), lr,
                                             (None, adam_direction(state)))
        return {"iter": ckpt["iter"], "lr": lr, "coupling": plain, "coupling_adam": adam, "sgd": sgd,
                "adam": adam_changes}
    return cached(out, "sgt_coupling.json", compute)


def measure_all(function, jobs, gpu=False):
    """[job] through function in worker processes, two at a time on the CPU (as common.run_all): [result]."""
    with contextlib.nullcontext() if gpu else multiprocessing.get_context("spawn").Pool(2) as pool:
        return list((pool.imap if pool else map)(function, jobs))


def sign_verdict(numerator, numerator_se, changes):
    """Did the coupling's sign predict the change of L_U? The change's sign is predicted to be minus the numerator's.
    Each is resolved where its 95% interval excludes 0 (the numerator's: 1.96 jackknife SEs; the mean change's: a t
    interval over the pairs). Returns (verdict, the mean change as a common.Diff, the share of pairs whose change has
    the predicted sign)."""
    change = common.Diff(changes)
    predicted = -math.copysign(1, numerator)
    hits = sum(math.copysign(1, c) == predicted for c in changes) / len(changes)
    lo, hi = change.interval()
    if abs(numerator) <= 1.96 * numerator_se or lo <= 0 <= hi:
        return "unresolved", change, hits
    return ("predicted" if math.copysign(1, change.mean) == predicted else "contradicted"), change, hits


# ----------------------------------------------------------------------------
# the study


def iid_folder(text):
    """i.i.d. draws from text's training unigram distribution, as many tokens as it has: the no-context control."""
    folder = text.rstrip("/") + "-iid"
    if not os.path.exists(os.path.join(folder, "meta.json")):
        meta, tokens, _ = data_prep.load(text)
        counts = torch.bincount(torch.from_numpy(tokens.astype("int64")), minlength=meta["vocab_size"]).double()
        generator = torch.Generator().manual_seed(0)
        draw = lambda n: torch.multinomial(counts, n, True, generator=generator).numpy().astype(meta["dtype"])
        splits = {"train": draw(meta["train_tokens"]), "val": draw(meta["val_tokens"])}
        os.makedirs(folder, exist_ok=True)
        for name, values in splits.items():
            data_prep.atomic_write(os.path.join(folder, f"{name}.bin"), values.tofile)
        new = torch.bincount(torch.from_numpy(splits["train"].astype("int64")), minlength=meta["vocab_size"])
        meta = {**meta, "unigram_counts": {str(i): int(c) for i, c in enumerate(new.tolist()) if c}}
        data_prep.atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(meta).encode()))
    return folder


def data_folders(args):
    """Shakespeare and the standard library's sources (1.5M tokens each), compact vocabularies (GPT-2's with --gpu);
    --data replaces Shakespeare (the smoke test's tiny folder)."""
    folders = {"text": args.data} if args.data else {}
    for domain, corpus in (("text", "shakespeare"), ("code", "code")):
        if domain in folders or (domain == "code" and not args.sizes["code_seeds"]):
            continue
        folders[domain] = os.path.join(common.DATA, f"sgt-{corpus}" + ("-gpt2" if args.gpu else ""))
        if not os.path.exists(os.path.join(folders[domain], "meta.json")):
            docs = data_prep.CORPORA[corpus]()
            data_prep.prepare(docs, folders[domain], compact_vocab=not args.gpu, max_tokens=1_500_000)
    folders["iid"] = iid_folder(folders["text"])
    return folders


class Plan:
    """The runs' train.py argv: Plan.argv(domain, setting, seed, lr, stop), domain text, code, or shuffled / iid / text
    at a window length (collapse domains: 'shuffled@512'); stop: a snapshot's step (None: the whole run)."""

    def __init__(self, args, folders):
        self.args, self.folders, self.scale = args, folders, args.scale
        flags = guards.parse_args(guards.training_args("train", train.__doc__), [str(a) for a in (*self.scale, *args.train)])
        self.block, self.batch, self.eval_iters = flags.block_size, flags.batch_size, flags.eval_iters
        self.max_iters, self.decay = flags.max_iters, flags.lr_decay_iters or flags.max_iters
        self.selectors = args.selectors

    def argv(self, domain, setting, seed, lr, stop=None):
        kind, _, block = domain.partition("@")
        shape = []
        if block and int(block) != self.block:  # as many tokens per step and per evaluation as at the study's length
            tokens = self.batch * self.block
            batch = max(1, tokens // int(block))
            shape = ["--block_size", block, "--batch_size", batch, "--eval_iters",
                     max(1, self.eval_iters * tokens // int(block) // batch)]
        data = self.folders.get(kind, self.folders["text"])  # shuffled text: the text's folder
        sgt = [] if setting == "full" else ["--sgt", 0.15, *self.selectors[setting]]
        name = setting.split(" (")[0].replace(" ", "").replace(",", "-").replace("/", "")
        out = f"{domain.replace('@', '-L')}-{name}-lr{lr:g}-s{seed}" + (f"-at{stop}" if stop else "")
        stopped = ["--max_iters", stop, "--lr_decay_iters", self.decay, "--eval_interval", stop] if stop else []
        shuffle = ["--shuffle_tokens"] if kind == "shuffled" else []
        return ["--data", data, "--seed", seed, *self.scale, *shape, *shuffle, "--lr", lr, *sgt, *self.args.train,
                *stopped, "--out_dir", os.path.join(self.args.out_dir, out)]


def pm_cell(values, digits=2):
    """A table cell: the mean over seeds ± its standard error (common.Diff); '-' for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    d = common.Diff(values)
    return f"{d.mean:.{digits}f}" + (f" ± {d.se:.{digits}f}" if d.n > 1 else "")


def main(argv=None):
    p = common.parser(__doc__, "sgt")
    p.add_argument("--full", action="store_true", help="also beta 1, beta 3, beta inf with 2/3 uniform; code 3 seeds")
    p.add_argument("--gpu", action="store_true", help="the GPU scale: one run at a time")
    p.add_argument("--smoke", action="store_true", help="a tiny model and few measurements: checks the code, < 1 min")
    p.add_argument("--data", help="the text's folder instead of Shakespeare's (with --smoke: a tiny one)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.train, args.command = argv[split + 1:], " ".join(["python -m studies.sgt", *argv])
    args.scale, args.sizes = SCALE, dict(SIZES)
    if args.gpu:
        args.scale, args.sizes = GPU, dict(GPU_SIZES)
    if args.smoke:
        args.scale, args.sizes = SMOKE, dict(SMOKE_SIZES)
    if args.full:
        args.sizes.update(code_seeds=args.sizes["seeds"])
    args.selectors = {**SELECTORS, **(MORE_SELECTORS if args.full else {})}
    if args.smoke:
        args.selectors = {name: SELECTORS[name] for name in SMOKE_SELECTORS}
    return study(args)


def study(args):
    """Run the study (finished runs and measurements are kept) and write studies/sgt_results.md (--smoke: into
    --out_dir)."""
    t0, sizes, serial = time.time(), args.sizes, args.gpu or args.smoke  # smoke: in this process (no start-up)
    plan = Plan(args, data_folders(args))
    settings, seeds = ("full", *args.selectors), range(sizes["seeds"])
    run = lambda argvs: common.run_all([("train", a) for a in argvs], serial)
    out = lambda *key: common.out_dir(plan.argv(*key))
    rows = lambda *key: common.metrics(out(*key))

    # 1. learning rates: each setting's best on text, first seed
    run([plan.argv("text", s, 0, lr) for s in settings for lr in sizes["lrs"]])
    grid = {s: {lr: min(r["loss"] for r in rows("text", s, 0, lr)[1:]) for lr in sizes["lrs"]} for s in settings}
    lr = {s: min(grid[s], key=grid[s].get) for s in settings}
    body = [f"Scale: train.py {' '.join(str(a) for a in args.scale)} {' '.join(args.train)}; f = 0.15; seeds "
            f"{sizes['seeds']} (code {sizes['code_seeds']}); each setting at its best rate (below).", "",
            "## Learning rates (text, first seed: the best held-out loss at each rate)", "",
            *common.table("setting", *[f"lr {r:g}" for r in sizes["lrs"]], "chosen"),
            *[common.row(s, *[f"{grid[s][r]:.4f}" for r in sizes["lrs"]], f"{lr[s]:g}") for s in settings]]

    # 2. runs: text and code; the collapse's gate, window length by window length; then its SGT runs
    domains = {"text": sizes["seeds"], "code": sizes["code_seeds"]}
    run([plan.argv(d, s, seed, lr[s]) for d, n in domains.items() for s in settings for seed in range(n)])
    unigram = lambda domain, seed=0: common.summary(out(domain, "full", seed, lr["full"]))["unigram_loss"]
    gain = lambda domain: statistics.mean(unigram(domain, s) - min(r["loss"] for r in rows(domain, "full", s,
                                                                                          lr["full"])[1:])
                                          for s in seeds)
    collapse, gate_lines = None, []
    for block in sizes["collapse_blocks"]:
        shuffled, iid = f"shuffled@{block}", f"iid@{block}"
        run([plan.argv(d, "full", seed, lr["full"]) for d in (shuffled, iid) for seed in seeds])
        passed, lines = common.gate(f"the collapse at window length {block}", [
            (f"window {block}, shuffled text: full supervision beats the unigram model by {gain(shuffled):.3f} nats "
             f"(>= {COLLAPSE_GAP} needed: an in-window bag of tokens is learned)", gain(shuffled) >= COLLAPSE_GAP),
            (f"window {block}, i.i.d. unigram tokens: by {gain(iid):+.3f} (< {COLLAPSE_GAP} needed: nothing to learn "
             f"beyond the unigram model)", gain(iid) < COLLAPSE_GAP)])
        gate_lines += lines
        if passed:
            collapse = block
            break
    text_at = lambda block: "text" if block == plan.block else f"text@{block}"
    if collapse:
        run([plan.argv(d, s, seed, lr[s]) for d in (f"shuffled@{collapse}", text_at(collapse))
             for s in settings for seed in seeds])

    # 3. de-tilted losses at the end of every SGT run; 4. coupling and Theorem 1 on text, first seed
    sgt_runs = [(d, s, seed) for d, n in domains.items() for s in args.selectors for seed in range(n)]
    if collapse:
        sgt_runs += [(d, s, seed) for d in (f"shuffled@{collapse}", text_at(collapse)) for s in args.selectors
                     for seed in seeds if (d, s, seed) not in sgt_runs]
    device = "cuda" if args.gpu else "cpu"
    ends = measure_all(measure_end, [(out(d, s, seed, lr[s]), out(d, "full", seed, lr["full"]), sizes["windows"],
                                      device) for d, s, seed in sgt_runs], serial)
    end = dict(zip(sgt_runs, ends))
    run([plan.argv("text", s, 0, lr[s], stop) for s in args.selectors for stop in sizes["steps"]])
    points = [(s, stop) for s in args.selectors for stop in (*sizes["steps"], None)]
    couplings = measure_all(measure_coupling, [(out("text", s, 0, lr[s], stop), sizes["batches"], sizes["sequences"],
                                                sizes["pairs"], device) for s, stop in points], serial)
    coupling = dict(zip(points, couplings))

    # the tables
    def detilted_ctx(domain, s, seed, key="detilted"):  # R_ctx at the end, from the mean loss of the windows
        full_end = rows(domain, "full", seed, lr["full"])[-1]["loss"]
        return recovery(unigram(domain, seed), statistics.mean(end[domain, s, seed][key]), full_end)

    c = {(d, s, seed): compare(rows(d, s, seed, lr[s]), rows(d, "full", seed, lr["full"]), unigram(d, seed))
         for d, s, seed in sgt_runs}
    steps = sorted(c["text", next(iter(args.selectors)), 0]["R_t"])
    marks = [t for t in steps if t in sizes["steps"] or t == steps[-1]]
    ok, lines = common.gate("recovery on text", [(f"text: full supervision beats the unigram model by "
                                                  f"{gain('text'):.2f} nats (>= 0.5 needed)", gain("text") >= 0.5)])
    body += ["", "## Can the comparison discriminate?", "", *lines, "",
             f"## Text (Shakespeare), {sizes['seeds']} seeds: mean ± the seed-level standard error", "",
             "R(t) = (L(init) - L_SGT(t)) / (L(init) - L_full(t)) at the same step t; R: best vs best; R_opt: at the "
             "SGT run's own best step; R_ctx: best vs best beyond the unigram model (L(init) replaced by its loss). "
             "At the end of training (the checkpoints train.py keeps): R_ctx end, and de-tilted, from the held-out "
             "loss with the selector's tilt of token frequencies removed (logits - log pi_hat(y)); de-tilting: the "
             "nats it removes. L_unsup (end): the held-out loss on the targets this selector leaves out, SGT / full "
             "supervision split by the same selector. gamma (train.py): the cheap per-evaluation reading, its mean "
             "over evaluations after step 0, [undefined / evaluations].", "",
             *common.table("selector", *[f"R@{t}" for t in marks], "R", "R_opt (step)", "R_ctx", "R_ctx end",
                           "**de-tilted R_ctx end**", "de-tilting (nats)", "L_unsup end: SGT / full",
                           "gamma (train.py)")]
    for s in args.selectors:
        r = [c["text", s, seed] for seed in seeds]
        e = [end["text", s, seed] for seed in seeds]
        undefined = sum(x["gamma_undefined"] for x in r)
        body.append(common.row(
            s, *[pm_cell([x["R_t"][t] for x in r]) for t in marks], pm_cell([x["R"] for x in r]),
            f"{pm_cell([x['R_opt'] for x in r])} ({pm_cell([x['best_iter'] for x in r], 0)})",
            pm_cell([x["R_ctx"] for x in r]), pm_cell([detilted_ctx("text", s, seed, "raw") for seed in seeds]),
            f"**{pm_cell([detilted_ctx('text', s, seed) for seed in seeds])}**",
            pm_cell([statistics.mean(x["raw"]) - statistics.mean(x["detilted"]) for x in e], 3),
            f"{pm_cell([rows('text', s, seed, lr[s])[-1]['loss_unsup'] for seed in seeds])} / "
            f"{pm_cell([x['full_split']['loss_unsup'] for x in e])}",
            f"{pm_cell([x['gamma'] for x in r])} [{undefined} / {sum(x['gamma_evaluations'] for x in r)}]"))
    body += ["", "excess picks by the model's own loss in its context, not by token type: a per-type pi_hat does not "
             "describe its tilt, and its de-tilted column is not a reading of what it learned from context.", "",
             f"Do inverse weights need de-tilting? The nats de-tilting by their loss shares removes (needs none: less "
             f"than {NO_CORRECTION}; a negative value is a correction that hurts, i.e. no tilt to remove: pi_hat's "
             f"own sampling noise, which the uniform draw, untilted by construction, shows), and what de-tilting by "
             f"their plain pick rate would remove instead (needs none: it should not help, <= 0), over seeds:"]
    uniform = [s for s in args.selectors if "uniform" in s]
    for s in (s for s in args.selectors if "inverse" in s or s in uniform):  # the uniform draw: the noise floor
        e = [end["text", s, seed] for seed in seeds]
        by_share = common.Diff([statistics.mean(x["raw"]) - statistics.mean(x["detilted"]) for x in e])
        by_pick = common.Diff([statistics.mean(x["raw"]) - statistics.mean(x["by_pick_rate"]) for x in e])
        needs = "needs none" if by_share.mean < NO_CORRECTION and by_pick.mean <= 0 else "NEEDS A CORRECTION"
        body.append(f"- {s}: by loss share {common.pm(by_share, 4)}; by pick rate {common.pm(by_pick, 4)}: " +
                    ("the reference (no tilt)." if s in uniform else f"{needs}."))
    paper = min(args.selectors, key=lambda n: abs(statistics.mean(c["text", n, s]["R_opt"] for s in seeds) - PAPER_R))
    body += ["", f"Paper setting (early-optimum R closest to the paper's {PAPER_R}): **{paper}**.", ""]

    body += [f"## Gradient coupling with an error bar (text, first seed; {sizes['batches']} held-out batches of "
             f"{sizes['sequences']} sequences, jackknife SE over batches)", "",
             "numerator: E[g_S] . E[g_U], the mean over batch pairs i != j of g_S^i . g_U^j (its sign is what Theorem "
             "1 needs); gamma: the ratio of pooled pair sums; Adam: the numerator E[g_S] . P E[g_U] under the run's "
             "preconditioner; undefined: of the gamma estimates from all batches and each batch left out.", "",
             *common.table("selector", "step", "numerator ± SE", "gamma ± SE", "undefined", "Adam: numerator ± SE")]
    undefined = 0
    for s, stop in points:
        m = coupling[s, stop]
        g, a = m["coupling"], m["coupling_adam"]
        undefined += g["undefined"]
        body.append(common.row(s, m["iter"], f"{g['numerator']:+.3e} ± {g['numerator_se']:.1e}",
                               f"{g['gamma']:.2f} ± {g['gamma_se']:.2f}", f"{g['undefined']} / {g['batches'] + 1}",
                               f"{a['numerator']:+.3e} ± {a['numerator_se']:.1e}"))
    body += ["", f"Undefined gamma estimates: {undefined} of {len(points) * (sizes['batches'] + 1)}.", "",
             f"## Theorem 1 as a test (text, first seed; {sizes['pairs']} independent pairs)", "",
             "The change of L_U on a held-out batch after one step on a training batch's g_S, at the run's learning "
             "rate of that step, mean ± SE over pairs; predicted sign: minus the numerator's, measured on the "
             "coupling's batches. Resolved where both 95% intervals exclude 0.", "",
             *common.table("selector", "step", "update", "numerator", "mean change of L_U", "pairs of the predicted "
                           "sign", "verdict")]
    verdicts = []
    for s, stop in points:
        m = coupling[s, stop]
        for update, key, name in (("sgd", "coupling", "SGD"), ("adam", "coupling_adam", "Adam's P")):
            g = m[key]
            verdict, change, hits = sign_verdict(g["numerator"], g["numerator_se"], m[update])
            verdicts.append(verdict)
            body.append(common.row(s, m["iter"], name, f"{g['numerator']:+.2e} ± {g['numerator_se']:.1e}",
                                   common.pm(change, 5) if change.n > 1 else f"{change.mean:+.5f}", f"{hits:.0%}",
                                   verdict))
    resolved = verdicts.count("predicted") + verdicts.count("contradicted")
    body += ["", f"**Verdict on Theorem 1's sign**: of {len(verdicts)} tests, {resolved} resolved; the sign predicted "
             f"the change in {verdicts.count('predicted')} and was contradicted in {verdicts.count('contradicted')} ("
             f"{verdicts.count('unresolved')} unresolved).", ""]

    body += ["## The collapse on shuffled text", "",
             "Gate, window length by window length (the first that passes is used):", *gate_lines, ""]
    if collapse:
        shuffled, text = f"shuffled@{collapse}", text_at(collapse)
        fall = {s: common.Diff([detilted_ctx(shuffled, s, seed) - detilted_ctx(text, s, seed) for seed in seeds])
                for s in args.selectors}
        falls = [s for s, d in fall.items() if d.bound(0.975, +1) < 0]
        body += [*common.table("selector", f"de-tilted R_ctx end, text (window {collapse})", "shuffled",
                               "shuffled - text (paired by seed)"),
                 *[common.row(s, pm_cell([detilted_ctx(text, s, seed) for seed in seeds]),
                              pm_cell([detilted_ctx(shuffled, s, seed) for seed in seeds]), common.pm(d, 2))
                   for s, d in fall.items()], "",
                 "**Verdict on the collapse**: " + (f"de-tilted R_ctx falls on shuffled text (95% t interval below 0) "
                                                    f"for {', '.join(falls)}." if falls else
                                                    "de-tilted R_ctx falls for no selector at this scale.")]
    else:
        body += [f"**Verdict on the collapse**: {common.NOT_TESTABLE}"]
    if domains["code"]:
        body += ["", f"## Control: Python source ({domains['code']} seed(s))", "",
                 *common.table("selector", "R", "R_ctx", "de-tilted R_ctx end", "gamma (train.py)"),
                 *[common.row(s, pm_cell([c["code", s, seed]["R"] for seed in range(domains["code"])]),
                              pm_cell([c["code", s, seed]["R_ctx"] for seed in range(domains["code"])]),
                              pm_cell([detilted_ctx("code", s, seed) for seed in range(domains["code"])]),
                              pm_cell([c["code", s, seed]["gamma"] for seed in range(domains["code"])]))
                   for s in args.selectors]]

    def draw(plt):  # held-out loss on text, the mean of the seeds
        for s in settings:
            runs = [rows("text", s, seed, lr[s]) for seed in seeds]
            mean = [statistics.mean(r[j]["loss"] for r in runs) for j in range(len(runs[0]))]
            plt.plot([r["iter"] for r in runs[0]], mean, "k" if s == "full" else "-", label=f"{s} (lr {lr[s]:g})")
        plt.axhline(unigram("text"), color="k", ls=":", label="unigram")
        plt.gca().set(xlabel="step", ylabel="held-out loss", title="SGT at f = 0.15 on Shakespeare (mean of seeds)")
        plt.legend(fontsize=7)
    if args.smoke:
        common.report(os.path.join(os.path.abspath(args.out_dir), "sgt_smoke.md"), "SGT study: smoke test",
                      args.command, t0, body)
        return body
    common.figure(os.path.join(common.HERE, "img", "sgt.png"), draw)
    common.report("sgt_results.md", "SGT study: results", args.command, t0, [*body, "", "![SGT](img/sgt.png)"])
    return body


if __name__ == "__main__":
    guards.cli(main, "studies.sgt")
