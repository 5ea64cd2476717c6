"""
The three claims on one GPU in under eight minutes, at a scale the CPU cannot reach: 8 x 512 models (a 12 x 512
teacher), one BPE of 8192 tokens for Korean and Python source, context 256, batches of 16k tokens, ~10-20M tokens per
arm. One seed is what fits: every difference is a point estimate, without an interval.

  python -m studies.gpu --prepare          # here (corpus packages, rustbpe): data/gpu/, ~38 MB, ~1.5 min
  python -m studies.gpu --out_dir $OUT     # on the GPU machine (carry data/gpu): ~7.5 min
  python -m studies.gpu --smoke            # every phase at toy size on the CPU, in seconds: out/study-gpu-smoke/

Its own short loop over cherry.GPT (no checkpoints, the models stay on the device, bf16 autocast on CUDA, nothing
compiled: a dozen shapes would each pay for it) with the project's SGT selector, compression, fusion and FLOP counts.
It times a few steps, sizes every arm from its FLOPs to fill the time (the plan is printed), then runs the arms in
priority order (SGT on Korean, compression, MoEE, SGT on code), skipping any that would pass the deadline (--minutes).
--out_dir gets gpu.jsonl (a line per evaluation) and gpu_results.md, rewritten after each phase (a real run also
writes studies/gpu_results.md).
"""

import copy
import json
import math
import os
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

import cherry
import train
from data import prepare as data_prep
from studies import common
import guards

DOMAINS = ("korean", "code")
VOCAB = 8192
MAX_TOKENS = 9_500_000  # per domain: both in uint16 are ~38 MB, inside the 64 MiB that travels to a GPU machine
FRACTION = 0.15  # SGT's share of the targets
GPU = dict(width=512, heads=8, layers=8, teacher=12, small=3, lora=32, block=256, batch=64, windows=256, lr=1.5e-3,
           evals=6, calibrate=8, minutes=7.5)
SMOKE = dict(GPU, width=32, heads=2, lora=4, block=32, batch=4, windows=4, lr=3e-3, evals=2, calibrate=1, steps=4,
             vocab=128)
RESERVE_S = 10  # kept free before the deadline for the report
DISTILL = getattr(cherry, "distill_loss", None)  # distillation where cherry has it: the one place that checks

# ----------------------------------------------------------------------------
# data: prepared here, read there (no tokenizer needed at run time)


def prepare(folder):
    """One BPE of VOCAB tokens trained on the train part of both domains (data/prepare.py's rustbpe trainer), its
    meta.json in folder; then each domain's folder (train.bin, val.bin, meta.json with its unigram counts)."""
    if os.path.exists(os.path.join(folder, "code", "meta.json")):
        raise ValueError(f"{folder} is already prepared; delete it to prepare it again")
    os.makedirs(folder, exist_ok=True)
    docs = {d: data_prep.CORPORA[d]() for d in DOMAINS}
    head = lambda d: d[:len(d) - int(len(d) * 0.1)]  # the BPE never sees what will be held out
    _, meta = data_prep.train_bpe([head(d) for name in DOMAINS for d in docs[name]], VOCAB, folder)
    data_prep.atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(json.dumps(meta).encode()))
    for name in DOMAINS:  # prepare() takes a folder with a meta.json as the tokenizer: one vocabulary for both
        m = data_prep.prepare(docs[name], os.path.join(folder, name), folder, max_tokens=MAX_TOKENS)
        print(f"{name}: {m['train_tokens']:,} train and {m['val_tokens']:,} val tokens")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    print(f"{folder}: {size / 1e6:.1f} MB; on the GPU machine: python -m studies.gpu --out_dir $OUT (carry {folder})")


def generated(vocab, n=4000):
    """--smoke without a prepared folder: two made-up domains, each a random walk over its own half of the ids."""
    g, out = torch.Generator().manual_seed(0), {}
    for i, d in enumerate(DOMAINS):
        tokens = torch.randint(1, 4, (n,), generator=g).cumsum(0) % (vocab // 2) + i * (vocab // 2)
        counts = torch.bincount(tokens[:int(0.9 * n)], minlength=vocab).tolist()
        meta = {"vocab_size": vocab, "unigram_counts": {str(t): c for t, c in enumerate(counts) if c}}
        out[d] = (meta, tokens[:int(0.9 * n)], tokens[int(0.9 * n):])
    return out


def load(folder, s, device):
    """{domain: (meta, train, val)}, the tokens on the device: the prepared folder, or made-up tokens for --smoke."""
    if not os.path.exists(os.path.join(folder, "code", "meta.json")):
        if "steps" not in s:
            raise ValueError(f"no prepared data in {folder}: run python -m studies.gpu --prepare where the corpus "
                             f"packages are, and carry {folder} to the GPU machine")
        return {d: (m, tr.to(device), va.to(device)) for d, (m, tr, va) in generated(s["vocab"]).items()}
    out = {}
    for d in DOMAINS:
        meta, tr, va = data_prep.load(os.path.join(folder, d))
        out[d] = (meta, *(torch.from_numpy(t.astype(np.int64)).to(device) for t in (tr, va)))
    return out


def windows(tokens, n, block, generator=None, shuffle=False):
    """n windows (x, y) at random starts (generator, on the tokens' device: no host sync), else spread evenly (the
    held-out ones, the same every time). shuffle: each window's block + 1 tokens permuted (the control: no order)."""
    top, device = len(tokens) - block - 1, tokens.device
    starts = torch.randint(top, (n,), generator=generator, device=device) if generator else \
        torch.linspace(0, top, n).long().to(device)
    w = tokens[starts[:, None] + torch.arange(block + 1, device=device)]
    if shuffle:
        g = generator or torch.Generator(device).manual_seed(0)
        w = w.gather(1, torch.rand(w.shape, generator=g, device=device).argsort(dim=1))
    return w[:, :-1], w[:, 1:]


# ----------------------------------------------------------------------------
# the arms, the plan, the run (device, data, deadline, log) and the training loop


def configs(s, vocab):
    """Dense 8 (base), the 12-layer teacher, dense 3, the teacher compressed to 3 layers run (4, 4, 4) with step
    embeddings and LoRA, the MoEE of two such experts, and that MoEE with MTP (D = 1)."""
    base = cherry.GPTConfig(block_size=s["block"], vocab_size=vocab, n_layer=s["layers"], n_head=s["heads"],
                            n_embd=s["width"])
    repeats = (s["teacher"] // s["small"],) * s["small"]
    compressed = replace(base, n_layer=s["small"], schedule=cherry.repeat_schedule(repeats), step_embed=True,
                         lora_rank=s["lora"])
    return dict(base=base, teacher=replace(base, n_layer=s["teacher"]), small=replace(base, n_layer=s["small"]),
                compressed=compressed, moee=replace(compressed, n_expert=2), mtp=replace(compressed, n_expert=2, mtp=1))


def sgt_specs():
    """The SGT arms as train.py's selector flags (None: full supervision); "default" is train.py's, listed once."""
    flags = lambda select="surprisal", beta=0.0, weights="none", floor=0.0, mix=0.0: dict(
        sgt_select=select, sgt_beta=beta, sgt_weights=weights, sgt_floor=floor, sgt_mix=mix)
    default = flags(guards.DEFAULT_SELECT, guards.DEFAULT_BETA, guards.DEFAULT_WEIGHTS, guards.DEFAULT_FLOOR,
                    guards.DEFAULT_MIX)
    arms = {"full": None, "uniform": flags(), "default": default, "beta 2": flags(beta=2.0),
            "beta 2, weighted": flags(beta=2.0, weights="inverse"), "gradient": flags("gradient", 1.0, "inverse", 0.1)}
    return {name: a for name, a in arms.items() if name == "default" or a != default}


def plan(n, cfg):
    """{arm: (optimizer steps, training FLOPs per token)} in priority order, n the steps of an SGT arm. At equal
    pipeline FLOPs a dense model gets those of teacher + recovery (compression) or of teacher + both experts + the
    steps on the mix (MoEE); a single expert gets what the MoEE pipeline spent on the other expert and the mixture."""
    f = cherry.flops_per_token
    sgt = lambda a: f(cfg["base"]) if a is None else f(cfg["base"], FRACTION,
                                                         full_head_forward=a["sgt_select"] == "gradient")
    p = {f"korean/{name}": (n, sgt(a)) for name, a in sgt_specs().items()}
    p.update({f"shuffled/{name}": (n, sgt(sgt_specs()[name])) for name in ("full", "default")})
    ft, fc, fm, fb, fs = (f(cfg[k]) for k in ("teacher", "compressed", "moee", "base", "small"))
    t, r = n, n / 4  # the teacher's steps, the recovery's
    e = m = n / 4  # each expert's recovery on its own domain, then the steps on the mix
    compression = t * ft + r * fc
    p.update({"compress/teacher": (t, ft), "compress/dense 8": (t + r, fb), "compress/dense 3": (t + r, fs),
              "compress/recovered": (r, fc), "compress/recovered, KD": (r, fc + f(cfg["teacher"], training=False)),
              "compress/dense 8, pipeline FLOPs": (compression / fb, fb),
              "compress/dense 3, pipeline FLOPs": (compression / fs, fs)})
    single = (e * fc + m * fm) / fc  # a single expert's steps on the mix at the MoEE pipeline's FLOPs
    p.update({"moee/expert korean": (e, fc), "moee/expert code": (e, fc), "moee/MoEE": (m, fm),
              "moee/single korean": (m, fc), "moee/single code": (m, fc), "moee/soup": (m, fc),
              "moee/MoEE + MTP": (m, f(cfg["mtp"])), "moee/single korean, pipeline FLOPs": (single, fc),
              "moee/single code, pipeline FLOPs": (single, fc),
              "moee/dense 8, pipeline FLOPs": ((t * ft + 2 * e * fc + m * fm) / fb, fb)})
    p.update({f"code/{name}": (n, sgt(a)) for name, a in sgt_specs().items() if name in ("full", "uniform", "default")})
    return p


class Run:
    """What the phases share: device, autocast, data, held-out windows, plan, deadline, the log (gpu.jsonl), the
    models kept for later phases, and every arm's results: {arm: {"curve": [eval rows], "windows": {set: losses}}}."""

    def __init__(self, args, s):
        self.s, self.args, self.t0 = s, args, time.time()
        self.deadline = self.t0 + 60 * args.minutes - RESERVE_S
        flags = SimpleNamespace(device="cpu" if args.smoke else "auto", dtype="auto", compile=False)
        self.device, self.kind, dtype, self.ctx = guards.setup_device(flags)
        self.peak = guards.peak_flops(self.device, dtype)  # None on a CPU or an unknown GPU
        self.data = load(args.data, s, self.device)
        self.vocab = (self.data["code"][0]["vocab_size"] + 63) // 64 * 64
        self.held = {d: windows(self.data[d][2], s["windows"], s["block"]) for d in DOMAINS}
        self.held["shuffled"] = windows(self.data["korean"][2], s["windows"], s["block"], shuffle=True)
        self.cfg, self.tokens_per_step = configs(s, self.vocab), s["batch"] * s["block"]
        self.results, self.models, self.skipped, self.phase_s = {}, {}, [], {}
        self.done = [0.0, 0.0]  # FLOPs and seconds of the arms trained so far: their rate replaces the calibrated one
        os.makedirs(args.out_dir, exist_ok=True)
        self.log = open(os.path.join(args.out_dir, "gpu.jsonl"), "w", buffering=1)

    def meta(self, domains):
        """The unigram counts of these domains' training splits together, as a meta.json has them."""
        counts = {}
        for d in domains:
            for t, c in self.data[d][0]["unigram_counts"].items():
                counts[t] = counts.get(t, 0) + c
        return {"vocab_size": self.vocab, "unigram_counts": counts}

    def unigram_loss(self, held, domain):
        surprisal = cherry.surprisal_table(self.meta([domain])["unigram_counts"], self.vocab)
        return surprisal[self.held[held][1].cpu()].mean().item()

    def new(self, cfg):
        """A fresh model on the device, from the seed: every arm of a shape starts from the same weights."""
        torch.manual_seed(self.args.seed)
        with torch.device(self.device):
            return cherry.GPT(cfg)

    def generator(self):
        return torch.Generator(self.device).manual_seed(self.args.seed)

    def selector(self, spec, domain):
        """train.py's Selector for these flags, its surprisal table on the device (None: full supervision)."""
        if spec is None:
            return None
        selector = train.Selector(SimpleNamespace(sgt=FRACTION, sgt_ref=None, seed=self.args.seed, **spec),
                                  self.meta([domain]), self.device)
        selector.surprisal = selector.surprisal.to(self.device)
        return selector

    def batch(self, domains, generator, shuffle=False):
        """A training batch, its windows shared equally by the domains."""
        parts = [windows(self.data[d][1], self.s["batch"] // len(domains), self.s["block"], generator, shuffle)
                 for d in domains]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def calibrate(self):
        """FLOP/s of a few steps of dense 8, after two warm-up steps: what the plan assumes for every arm."""
        model, g = self.new(self.cfg["base"]), self.generator()
        opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), self.kind)
        for i in range(2 + self.s["calibrate"]):
            if i == 2:
                sync(self.device)
                t = time.time()
            step(self, model, opt, *self.batch(DOMAINS, g))
        sync(self.device)
        return self.s["calibrate"] * self.tokens_per_step * cherry.flops_per_token(self.cfg["base"]) / (time.time() - t)

    def skip(self, arm, why):
        print(f"skipped {arm}: {why}", flush=True)
        self.skipped.append(f"{arm} ({why})")

    def evaluate(self, arm, model, held, it, flops, seconds):
        """The held-out loss of every window of each set in held, and a line of gpu.jsonl."""
        with self.ctx:
            losses = {h: common.window_losses(model, *self.held[h], self.device, self.s["batch"]) for h in held}
        model.train()
        row = {"arm": arm, "step": it, "tokens": it * self.tokens_per_step, "flops": flops, "seconds": seconds,
               **{f"loss_{h}": v.mean().item() for h, v in losses.items()}}
        row["loss"] = sum(v.mean().item() for v in losses.values()) / len(losses)
        self.log.write(json.dumps(row) + "\n")
        return row, losses


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(run, model, opt, x, y, selector=None, teacher=None):
    """One optimizer step: cross-entropy (on SGT's picks with a selector), or distillation from a teacher."""
    with run.ctx:
        if teacher is not None:
            logits = model.lm_head(model.hidden(x))
            with torch.no_grad():
                target = teacher.lm_head(teacher.hidden(x))
            loss = DISTILL(logits, target)
        else:
            picks = {}  # full supervision
            if selector is not None:  # drawn on the CPU, or picked inside the forward (gradient)
                picks = selector.draw(y) or {"choose": selector.chooser(x, y, selector.generator)}
            _, loss = model(x, y, **picks)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def fit(run, arm, model, lr, domains, held, selector=None, teacher=None, shuffle=False):
    """Train model for the plan's steps of arm on windows of domains (warm-up, cosine decay: train.lr_at), evaluated
    on the held-out sets at evals + 1 points. Returns the model; None if skipped (past the deadline, or no model)."""
    steps, fpt = run.plan[arm]
    steps = max(1, round(steps))
    seconds = steps * run.tokens_per_step * fpt / run.rate
    if model is None:
        return run.skip(arm, "a model it starts from was skipped")
    if time.time() + seconds > run.deadline:
        return run.skip(arm, f"~{seconds:.0f} s would pass the deadline")
    opt = model.train().configure_optimizer(0.1, lr, (0.9, 0.95), run.kind)
    schedule = SimpleNamespace(lr=lr, min_lr=lr / 10, warmup_iters=max(1, min(50, steps // 10)), max_iters=steps,
                               lr_decay_iters=None)
    marks = {round(steps * i / run.s["evals"]) for i in range(run.s["evals"] + 1)}
    generator, curve, t0, train_s = run.generator(), [], time.time(), 0.0  # every arm: the same windows, in order
    for it in range(steps + 1):
        if it in marks:
            sync(run.device)
            train_s += time.time() - t0
            row, losses = run.evaluate(arm, model, held, it, it * run.tokens_per_step * fpt, train_s)
            curve.append(row)
            t0 = time.time()
        if it == steps:
            break
        for group in opt.param_groups:
            group["lr"] = train.lr_at(it, schedule)
        step(run, model, opt, *run.batch(domains, generator, shuffle), selector, teacher)
    run.done = [run.done[0] + steps * run.tokens_per_step * fpt, run.done[1] + train_s]
    run.rate = run.done[0] / run.done[1]  # what the next arms' estimates assume
    emb = model.wte.weight.numel()
    run.results[arm] = {"curve": curve, "windows": losses, "params": cherry.count_params(model) - emb,
                        "active": cherry.count_params(model, active=True) - emb}
    print(f"{arm}: {steps} steps in {train_s:.1f} s (~{seconds:.1f} s planned), held-out {curve[0]['loss']:.3f} -> "
          f"{curve[-1]['loss']:.3f}", flush=True)
    return model


# ----------------------------------------------------------------------------
# the phases (an arm is skipped if it would pass the deadline, or if a model it starts from was)


def sgt_phase(run, domain, names, shuffled=()):
    """SGT arms on one domain from one initialisation; shuffled: the same selectors on window-shuffled text."""
    for held, arms in ((domain, names), ("shuffled", shuffled)):
        for name in arms:
            spec, arm = sgt_specs()[name], f"{held}/{name}"
            model = fit(run, arm, run.new(run.cfg["base"]), run.s["lr"], [domain], [held], run.selector(spec, domain),
                        shuffle=held == "shuffled")
            if model is not None:
                run.results[arm]["detilted"] = detilted_loss(run, model, held, log_pick_rates(run, spec, domain))


@torch.no_grad()
def log_pick_rates(run, spec, domain, batches=32, prior=10):
    """log pi_hat(y): each token type's pick rate under the arm's draw on training windows, shrunk towards FRACTION
    by `prior` pseudo-occurrences (rare types are not noise). None where nothing needs undoing: full supervision, a
    uniform draw, inverse weights (unbiased by construction) and gradient's draw (weighted; it depends on the model)."""
    if spec is None or spec["sgt_weights"] == "inverse" or spec["sgt_beta"] == 0 or spec["sgt_select"] != "surprisal":
        return None
    selector, g = run.selector(spec, domain), run.generator()
    picked = seen = torch.zeros(run.vocab, device=run.device)
    for _ in range(batches):
        _, y = run.batch([domain], g)
        positions = selector.draw(y)["positions"]
        picked = picked + torch.bincount(y.gather(1, positions).flatten(), minlength=run.vocab)
        seen = seen + torch.bincount(y.flatten(), minlength=run.vocab)
    return ((picked + FRACTION * prior) / (seen + prior)).log()


@torch.no_grad()
def detilted_loss(run, model, held, log_pi):
    """Held-out cross-entropy of logits - log pi_hat(y). Why: a draw that picks type y with probability pi(y) and
    averages its picks trains towards q(y|c) ~ p(y|c) pi(y) (DESIGN.md: SGT's bias), so part of its loss is the tilt,
    not missing context. Subtracting log pi_hat from the logits (the softmax renormalises) undoes the part of the tilt
    that depends on the type: R_ctx from this loss compares what the selectors learned from context on equal terms."""
    if log_pi is None:
        return None
    model.eval()
    with run.ctx:
        losses = common.detilted_window_losses(model, *run.held[held], [log_pi], run.s["batch"])[0]
    model.train()
    return sum(losses) / len(losses)


def compressed(run, teacher):
    """The teacher's 12 layers averaged into 3, run (4, 4, 4), LoRA from the residue: cherry.compress, on the GPU."""
    if teacher is None:
        return None
    with torch.device(run.device):
        return cherry.compress(teacher, run.s["small"], run.cfg["compressed"].schedule, lora_rank=run.s["lora"])


def compression_phase(run):
    """A 12-layer teacher on both domains, compressed to 3 layers run (4, 4, 4) with step embeddings and LoRA,
    recovered by cross-entropy and by distillation; dense 3 and 8 from scratch at the pipeline's tokens and FLOPs."""
    lr, both = run.s["lr"], list(DOMAINS)
    scratch = lambda arm, shape: fit(run, arm, run.new(run.cfg[shape]), lr, both, both)
    run.models["teacher"] = teacher = scratch("compress/teacher", "teacher")
    scratch("compress/dense 8", "base")
    scratch("compress/dense 3", "small")
    fit(run, "compress/recovered", compressed(run, teacher), lr / 2, both, both)
    if DISTILL is None:
        run.skip("compress/recovered, KD", "cherry has no distill_loss: distillation is not built yet")
    else:
        fit(run, "compress/recovered, KD", compressed(run, teacher), lr / 2, both, both, teacher=teacher)
    scratch("compress/dense 8, pipeline FLOPs", "base")
    scratch("compress/dense 3, pipeline FLOPs", "small")


def moee_phase(run):
    """Korean and code experts recovered from the compressed teacher, fused (cherry.fuse, top-1); against each single
    expert at equal steps and at equal pipeline FLOPs, the soup, MoEE + MTP and dense 8 with the pipeline's FLOPs."""
    lr, both = run.s["lr"] / 2, list(DOMAINS)
    experts = [fit(run, f"moee/expert {d}", compressed(run, run.models.get("teacher")), lr, [d], both)
               for d in DOMAINS]
    ready = all(e is not None for e in experts)
    copies = lambda: [copy.deepcopy(e) if e is not None else None for e in experts]

    def fused(mtp):  # routers (and MTP modules) start from the seed: MoEE and MoEE + MTP start alike
        torch.manual_seed(run.args.seed)
        with torch.device(run.device):
            return cherry.fuse(experts, mtp=mtp) if ready else None
    fit(run, "moee/MoEE", fused(0), lr, both, both)
    for d, model in zip(DOMAINS, copies()):
        fit(run, f"moee/single {d}", model, lr, both, both)
    with torch.device(run.device):
        souped = cherry.soup(experts) if ready else None
    fit(run, "moee/soup", souped, lr, both, both)
    fit(run, "moee/MoEE + MTP", fused(1), lr, both, both)
    for d, model in zip(DOMAINS, copies()):
        fit(run, f"moee/single {d}, pipeline FLOPs", model, lr, both, both)
    fit(run, "moee/dense 8, pipeline FLOPs", run.new(run.cfg["base"]), run.s["lr"], both, both)


# ----------------------------------------------------------------------------
# the report: gates, tables, verdicts (one seed: point estimates; the ± is the window-level SE, a diagnostic)


def ratio(a, b):
    return a / b if b else math.nan


def num(v, digits=3):
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def diff(run, a, b, held=None):
    """a - b on the same held-out windows: held's, or both domains'."""
    losses = lambda arm: torch.cat([run.results[arm]["windows"][h] for h in ([held] if held else DOMAINS)])
    return common.seed_diff(losses(a), losses(b))


def versus(run, pairs):
    """"what +d" for each (what, a, b) whose arms both ran, d = a - b on both domains' windows."""
    return "; ".join(f"{what} {diff(run, a, b).mean:+.3f}" for what, a, b in pairs if {a, b} <= set(run.results))


def measures(run, arm, full, uni):
    """R and R_ctx (best against best), de-tilted R_ctx (final against final), and full supervision's loss at the
    FLOPs the arm spent (interpolated on its curve, mid-schedule there)."""
    curve, ref = run.results[arm]["curve"], run.results[full]["curve"]
    best, ref_best, init, end = min(c["loss"] for c in curve), min(c["loss"] for c in ref), ref[0]["loss"], curve[-1]
    detilted = run.results[arm].get("detilted") or end["loss"]
    return dict(final=end["loss"], R=ratio(init - best, init - ref_best), R_ctx=ratio(uni - best, uni - ref_best),
                R_det=ratio(uni - detilted, uni - ref[-1]["loss"]), pflops=end["flops"] / 1e15,
                at_flops=float(np.interp(end["flops"], [c["flops"] for c in ref], [c["loss"] for c in ref])))


def sgt_report(run, domain, names, shuffled=()):
    r, uni, full = run.results, run.unigram_loss(domain, domain), f"{domain}/full"
    default = guards.describe(SimpleNamespace(sgt=FRACTION, **sgt_specs()["default"]))
    lines = [f"## SGT on {domain}", "", f"The default is train.py's: {default}. R = (L(init) - L_SGT) / (L(init) - "
             f"L_full); R_ctx: the same beyond the unigram model (held-out {uni:.3f}); both best against best. "
             "De-tilted R_ctx: final against final, the logits minus log pi_hat(y), pi_hat each type's pick rate under "
             "the arm's draw (unbiased draws: nothing to undo). Last column: full supervision's loss at the arm's "
             "FLOPs.",
             "", *common.table("selector", "final", "R", "R_ctx", "R_ctx de-tilted", "final - unigram",
                               "training PFLOPs", "full at equal FLOPs")]
    ran = [n for n in names if f"{domain}/{n}" in r and full in r]
    lines += [common.row(n, "not run", *[""] * 6) for n in names if n not in ran]
    for n in ran:
        m = measures(run, f"{domain}/{n}", full, uni)
        lines.append(common.row(n, num(m["final"]), *[num(m[k], 2) for k in ("R", "R_ctx", "R_det")],
                                f"{m['final'] - uni:+.3f}", num(m["pflops"], 2), num(m["at_flops"])))
    if "default" in ran:
        m = measures(run, f"{domain}/default", full, uni)
        learned = [n for n in ran if n != "full" and measures(run, f"{domain}/{n}", full, uni)["R_det"] > 0]
        lines += ["", f"**Verdicts** (one seed, point estimates): the default reaches R {m['R']:.2f} (paper: 0.67), "
                  f"de-tilted R_ctx {m['R_det']:.2f}; learned from context (de-tilted R_ctx > 0): "
                  f"{', '.join(learned) or 'none'}. At equal FLOPs the default ends {m['final'] - m['at_flops']:+.3f} "
                  "nats from full supervision."]
    if shuffled and all(f"{h}/full" in r for h in (domain, "shuffled")):
        gap = {h: uni - min(c["loss"] for c in r[f"{h}/full"]["curve"]) for h in (domain, "shuffled")}
        ok, gate = common.gate("the collapse on shuffled text", [
            (f"text: full supervision beats the unigram model by {gap[domain]:.2f} nats (>= 0.5 needed)",
             gap[domain] >= 0.5),
            (f"shuffled text: by {gap['shuffled']:.2f} nats (< 0.1 needed: no context left)", gap["shuffled"] < 0.1)])
        lines += ["", "Shuffled-text control (each window's tokens permuted), its gate:", "", *gate, ""]
        if ok and all(f"{h}/default" in r for h in (domain, "shuffled")):
            fall = (measures(run, "shuffled/default", "shuffled/full", uni)["R"] -
                    measures(run, f"{domain}/default", full, uni)["R"])
            lines.append(f"**Verdict on the collapse**: the default's R on shuffled minus on text: {fall:+.2f}: " +
                         ("a collapse (a fall of 0.1 or more)." if fall <= -0.1 else "no collapse (a fall under 0.1)."))
        elif not ok:
            lines.append(f"**Verdict on the collapse**: {common.NOT_TESTABLE}")
    return lines + [""]


def model_table(run, arms, reference):
    """A row per arm: parameters, FLOPs, tokens, held-out loss per domain and on both, minus the reference arm."""
    lines = common.table("model", "non-embedding params (active)", "training MFLOPs/token", "tokens", "PFLOPs",
                         *DOMAINS, "both", f"minus {reference.split('/')[1]}")
    for arm in arms:
        name, res = arm.split("/")[1], run.results.get(arm)
        if res is None:
            lines.append(common.row(name, "not run", *[""] * 7))
            continue
        end, both = res["curve"][-1], torch.cat([res["windows"][d] for d in DOMAINS]).mean().item()
        d = common.pm(diff(run, arm, reference), 3) if reference in run.results and arm != reference else ""
        lines.append(common.row(name, f"{res['params']:,} ({res['active']:,})", f"{run.plan[arm][1] / 1e6:.0f}",
                                f"{end['tokens'] / 1e6:.1f}M", num(end["flops"] / 1e15, 2),
                                *[num(res["windows"][h].mean().item()) for h in DOMAINS], num(both), d))
    return lines


def compression_report(run):
    r, big, small, teacher = run.results, "compress/dense 8", "compress/dense 3", "compress/teacher"
    lines, ok = ["## Depth compression: 12 layers -> 3, run (4, 4, 4), LoRA", ""], False
    if all(a in r for a in (big, small, teacher)):
        g1, g2 = diff(run, small, big), diff(run, teacher, big)
        ok, gate = common.gate("depth compression", [
            (f"G1: dense 3 minus dense 8 at equal tokens: {g1.mean:+.3f} (>= 0.05 needed)", g1.mean >= 0.05),
            (f"G2: the teacher minus dense 8 given the pipeline's total tokens: {g2.mean:+.3f} (<= -0.02 needed: else "
             "not even a perfect student reaches dense 8)", g2.mean <= -0.02)])
        lines += [*gate, ""]
    lines += model_table(run, [teacher, "compress/recovered", "compress/recovered, KD", small, big,
                               "compress/dense 3, pipeline FLOPs", "compress/dense 8, pipeline FLOPs"], big)
    rec, kd = "compress/recovered", "compress/recovered, KD"
    if rec in r:
        lines += ["", f"Compressed, before recovery: held-out {r[rec]['curve'][0]['loss']:.3f}."]
    if ok and rec in r:
        d = diff(run, rec, big).mean
        lines += ["", f"**Verdict** (one seed, point estimates): recovered minus dense 8 at equal tokens {d:+.3f}: " +
                  ("within 0.02 nats or better, the claim holds here" if d <= 0.02 else
                   "more than 0.02 nats behind, the claim does not hold at this scale") + ". Also: " + versus(run, [
                      ("recovered by distillation minus dense 8", kd, big), ("recovered minus dense 3", rec, small),
                      *[(f"dense {n} with the pipeline's FLOPs minus recovered", f"compress/dense {n}, pipeline FLOPs",
                         rec) for n in (3, 8)]]) + "."]
    elif not ok:
        lines += ["", f"**Verdict**: {common.NOT_TESTABLE}"]
    return lines + [""]


def moee_report(run):
    r, ok, lines = run.results, False, ["## MoEE: Korean and code experts from the compression pipeline, fused", ""]
    if all(f"moee/expert {d}" in r for d in DOMAINS):
        own = {d: diff(run, f"moee/expert {d}", f"moee/expert {o}", d).mean for d, o in (DOMAINS, DOMAINS[::-1])}
        ok, gate = common.gate("MoEE", [(f"on {d}: its own expert minus the other: {v:+.3f} (<= -0.05 needed)",
                                         v <= -0.05) for d, v in own.items()])
        lines += [*gate, ""]
    singles = [f"moee/single {d}" for d in DOMAINS if f"moee/single {d}" in r]
    best = min(singles, key=lambda a: diff(run, a, singles[0]).mean) if singles else "moee/single code"
    lines += model_table(run, [*[f"moee/{a}" for a in ("expert korean", "expert code", "MoEE", "MoEE + MTP",
                                                         "single korean", "single code", "soup")],
                               *[f"moee/single {d}, pipeline FLOPs" for d in DOMAINS], "moee/dense 8, pipeline FLOPs"],
                         best)
    if ok and "moee/MoEE" in r and singles:
        d = diff(run, "moee/MoEE", best).mean
        others = [("the soup", "moee/soup"), ("MoEE + MTP", "moee/MoEE + MTP"),
                  ("dense 8 with the pipeline's FLOPs", "moee/dense 8, pipeline FLOPs"),
                  *[(f"single {s} with the pipeline's FLOPs", f"moee/single {s}, pipeline FLOPs") for s in DOMAINS]]
        lines += ["", f"**Verdict** (one seed, point estimates): MoEE minus the best single expert ({best.split()[-1]})"
                  f" at equal steps {d:+.3f}: " + ("better, the claim holds here" if d < 0 else
                                                  "not better, the claim does not hold here") + ". Also: " +
                  versus(run, [(f"{what} minus MoEE", arm, "moee/MoEE") for what, arm in others]) + "."]
    elif not ok:
        lines += ["", f"**Verdict**: {common.NOT_TESTABLE}"]
    return lines + [""]


# ----------------------------------------------------------------------------
# the command


def size_plan(run):
    """The plan's n (an SGT arm's steps): 80% of the time to the deadline (the rest: evaluations, building models)
    filled at the FLOP/s just measured; --smoke: a fixed toy n. Printed, and returned as lines for the report."""
    run.rate = run.calibrate()
    unit = sum(steps * run.tokens_per_step * fpt for steps, fpt in plan(1.0, run.cfg).values()) / run.rate
    n = run.s.get("steps") or 0.8 * (run.deadline - time.time()) / unit
    run.plan = plan(n, run.cfg)
    lines = [f"Plan: {run.rate / 1e12:.1f} TFLOP/s measured on dense {run.s['layers']} x {run.s['width']} "
             f"({run.tokens_per_step:,} tokens per step); an SGT arm {round(n)} steps, the others sized from it; "
             f"{unit * n:.0f} s of training estimated, {run.deadline - time.time():.0f} s left.", "",
             *common.table("arm", "steps", "tokens", "PFLOPs", "estimated s")]
    for arm, (steps, fpt) in run.plan.items():
        steps = max(1, round(steps))
        flops = steps * run.tokens_per_step * fpt
        lines.append(common.row(arm, steps, f"{steps * run.tokens_per_step / 1e6:.1f}M", num(flops / 1e15, 2),
                                f"{flops / run.rate:.1f}"))
    print("\n".join(lines), flush=True)
    return lines


def write_report(run, sections, plan_lines):
    """gpu_results.md in --out_dir (and in studies/ for a real run), rewritten after every phase."""
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run.phase_s.items())
    mfu = f" ({run.rate / run.peak:.0%} of the bf16 peak)" if run.peak else ""
    head = ["# The three claims on one GPU", "",
            f"`{run.args.command}`: {(time.time() - run.t0) / 60:.1f} min on {common.machine()}. Wall time per phase: "
            f"{phases}. Training ran at {run.rate / 1e12:.1f} TFLOP/s{mfu}.", "",
            f"Scale: {run.s}. One seed is what fits: every difference is a point estimate without an interval (a ± "
            "beside it is the window-level standard error within the seed: the evaluation's noise, not the seed's).",
            "", "Skipped: " + ("; ".join(run.skipped) or "none") + ".", ""]
    text = "\n".join(head + sections + ["<details><summary>The plan</summary>", "", *plan_lines, "", "</details>", ""])
    paths = [os.path.join(run.args.out_dir, "gpu_results.md")]
    paths += [] if run.args.smoke else [os.path.join(common.HERE, "gpu_results.md")]
    for path in paths:
        data_prep.atomic_write(path, lambda f: f.write(text.encode()))
    print(f"wrote {', '.join(paths)}", flush=True)


def main(argv=None):
    p = common.parser(__doc__, "gpu")
    p.add_argument("--prepare", action="store_true", help="write the token files (where the corpus packages are)")
    p.add_argument("--smoke", action="store_true", help="every phase at toy size on the CPU, in seconds")
    p.add_argument("--data", default=os.path.join(common.DATA, "gpu"), help="the prepared folder (default data/gpu)")
    p.add_argument("--minutes", type=float, help="the deadline, from the start (default 7.5)")
    p.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.command = " ".join(["python -m studies.gpu", *argv])
    if args.prepare:
        return prepare(args.data)
    if not args.smoke and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here: the study needs one (--smoke runs it at toy size on the CPU)")
    s = SMOKE if args.smoke else GPU
    args.minutes = args.minutes or s["minutes"]
    if args.smoke and args.out_dir == p.get_default("out_dir"):
        args.out_dir += "-smoke"
    run = Run(args, s)
    plan_lines, sections, names = size_plan(run), [], list(sgt_specs())
    code = [n for n in ("full", "uniform", "default") if n in names]
    phases = {"SGT on Korean": (lambda: sgt_phase(run, "korean", names, ("full", "default")),
                                lambda: sgt_report(run, "korean", names, ("full", "default"))),
              "compression": (lambda: compression_phase(run), lambda: compression_report(run)),
              "MoEE": (lambda: moee_phase(run), lambda: moee_report(run)),
              "SGT on code": (lambda: sgt_phase(run, "code", code), lambda: sgt_report(run, "code", code))}
    for name, (work, report) in phases.items():
        t = time.time()
        work()
        run.phase_s[name] = time.time() - t
        sections += report()
        write_report(run, sections, plan_lines)
    print(f"done in {(time.time() - run.t0) / 60:.1f} min; {len(run.skipped)} arm(s) skipped", flush=True)
    return run


if __name__ == "__main__":
    guards.cli(main, "studies.gpu")
