"""
Train a GPT with full supervision or with SGT (selective ground-truth token training).

  python train.py --sgt 0.15                        # SGT: 15% drawn ~ (1 - p_y), weighted 1/pi
  python train.py                                   # full supervision, for comparison
  python train.py --sgt 0.15 --sgt_select surprisal --sgt_beta 2   # rare targets, weighted 1/pi
  python train.py --sgt 0.15 --sgt_select surprisal --sgt_beta 0   # a uniform 15%, plain mean
  python train.py --sgt 0.15 --sgt_select excess    # Rho-1: the loss most above the unigram's
  python train.py --init_from gpt2 --data data/mine --lr 3e-5   # fine-tune GPT-2, nanoGPT's or ours
  torchrun --standalone --nproc_per_node=8 train.py --preset gpt2 --sgt 0.15 --grad_accum 8

Writes <out_dir>/ckpt.pt (everything --resume needs, whole, at every evaluation after the first and
on Ctrl-C or SIGTERM), metrics.jsonl (a line per evaluation) and summary.json. A run killed at any
moment continues with the same flags plus --resume and ends bit for bit as if never stopped (on the
CPU). compress.py and fuse.py build a model, then call train() from here.
"""

import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import cherry
import coupling
import guards
from data import prepare as data_prep

# ----------------------------------------------------------------------------
# the SGT selector


class Selector:
    """Which targets SGT supervises and with what weight; evaluation splits the held-out loss by the
    same rule (full supervision at 15%). surprisal draws on the CPU before the step; gradient and
    excess pick inside the model's forward, from its own per-position losses."""

    def __init__(self, args, meta, device):
        self.args = args
        self.fraction = args.sgt if args.sgt < 1 else 0.15
        self.surprisal = cherry.surprisal_table(meta["unigram_counts"], meta["vocab_size"])
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.reference = None  # Rho-1's reference model (frozen), else the unigram model
        if args.sgt_ref:
            reference = checkpoint.load_model(args.sgt_ref)
            self.reference = guards.check_vocab(reference, meta, "--sgt_ref").to(device).eval()
        self.largest = None  # the largest weight since the last evaluation, x the plain mean's

    def weights(self, inclusion, T, track=True):
        """Each pick's weight 1 / (T pi) with --sgt_weights inverse; None: the picks' plain mean."""
        if self.args.sgt_weights == "none":
            return None
        weights = cherry.inverse_weights(inclusion, T)
        if track:  # training's picks, for metrics.jsonl
            largest = weights.max() * weights.size(1)
            self.largest = largest if self.largest is None else torch.maximum(self.largest, largest)
        return weights

    def draw(self, targets, generator=None):
        """GPT.forward's SGT arguments for a batch drawn on the CPU: {positions, weights}; None for
        the selectors that pick inside the forward (see chooser)."""
        a = self.args
        if a.sgt_select != "surprisal":
            return None
        draws = generator or self.generator
        positions, inclusion = cherry.select_positions(
            targets, self.fraction, draws, self.surprisal, a.sgt_beta, a.sgt_mix, a.sgt_floor)
        return {"positions": positions, "weights": self.weights(inclusion, targets.size(1))}

    def chooser(self, x, y, generator, track=True):
        """gradient and excess, for a batch on the device: a function from the model's per-position
        losses (B, T) to (positions, weights), gradient's draws from generator. track: the weights
        count in metrics.jsonl's max_weight (training's, not the held-out picks')."""
        a = self.args
        k = math.ceil(self.fraction * y.size(1))
        if a.sgt_select == "excess":  # where the model's loss most exceeds the reference's
            with torch.no_grad():
                if self.reference:
                    reference = self.reference.token_losses(x, y)
                else:
                    reference = self.surprisal.to(y.device)[y]
            return cherry.excess_selector(k, reference)

        def choose(losses):  # drawn ~ (1 - p_y)^beta
            scores = cherry.gradient_scores(losses)
            positions, inclusion = cherry.draw_positions(
                scores, k, generator, a.sgt_beta, a.sgt_mix, a.sgt_floor)
            return positions, self.weights(inclusion, y.size(1), track)
        return choose

    def step_generators(self, n):
        """A generator for each of a step's n micro-batches (selectors that pick in the forward),
        seeded from the selector's own: the same picks in any number of processes."""
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return [torch.Generator().manual_seed(seed + m) for m in range(n)]

    def pop_largest(self):
        """The largest weight since the last call (None without weights), then forget it."""
        largest, self.largest = self.largest, None
        return None if largest is None else largest.item()


# ----------------------------------------------------------------------------
# steps and evaluation


def lr_at(it, args):
    """Linear warm-up, then cosine decay to min_lr."""
    decay_iters = args.lr_decay_iters or args.max_iters
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    ratio = min(1.0, (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - min_lr)


def micro_batches(x, y, picks, selector, args, rank, world, device):
    """This process's micro-batches of a global batch: [(x, y, sgt)], sgt GPT.forward's SGT
    arguments: {} for full supervision, {positions, weights} from picks (the global batch's draw),
    or {choose} for gradient and excess."""
    out = []
    in_forward = args.sgt < 1 and picks is None
    generators = selector.step_generators(args.grad_accum) if in_forward else None
    for m in range(rank * (args.grad_accum // world), (rank + 1) * (args.grad_accum // world)):
        part = slice(m * args.batch_size, (m + 1) * args.batch_size)
        xb, yb = (t[part].to(device, non_blocking=True) for t in (x, y))
        if args.sgt == 1:
            sgt = {}
        elif picks is None:
            sgt = {"choose": selector.chooser(xb, yb, generators[m])}
        else:
            sgt = {k: v if v is None else v[part].to(device) for k, v in picks.items()}
        out.append((xb, yb, sgt))
    return out


def optimizer_step(model, optimizer, scaler, micro, ctx, grad_clip):
    """One optimizer step over micro-batches [(x, y, sgt)]. Returns their mean loss and whether the
    gradient was clipped (tensors on the device: no sync)."""
    total = 0.0
    for i, (x, y, sgt) in enumerate(micro):
        # under DDP, all-reduce the gradients only once, on the last micro-batch
        last = i == len(micro) - 1
        defer = isinstance(model, DDP) and not last
        no_sync = model.no_sync() if defer else contextlib.nullcontext()
        with no_sync, ctx:
            _, loss = model(x, y, **sgt)
        scaler.scale(loss / len(micro)).backward()
        total = total + loss.detach() / len(micro)
    clipped = torch.zeros((), device=total.device)
    if grad_clip:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        clipped = (norm > grad_clip).float()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, clipped


class HeldOut:
    """The held-out windows of every evaluation, in batches, with the positions the selector picks
    in them (from a generator of their own, so they never depend on training); excess picks by the
    model's losses of the moment."""
    GAMMA_BATCHES = 4  # gamma's cost: a forward and two backward passes through the full head each

    def __init__(self, args, data, selector, device):
        x, y = data.eval_batch(args.eval_iters * args.batch_size)
        picks = selector.draw(y, torch.Generator().manual_seed(args.seed + 2))
        self.batches = []
        for i in range(0, len(x), args.batch_size):
            part = slice(i, i + args.batch_size)
            positions = None if picks is None else picks["positions"][part].to(device)
            self.batches.append((x[part].to(device), y[part].to(device), positions))
        self.selector = selector
        self.unigram_loss = selector.surprisal[y].mean().item()
        self.seed = args.seed + 2

    @torch.no_grad()
    def masks(self, model, ctx, rank=0, world=1):
        """[(x, y, mask (B, T) of the picked targets, per-position losses)] of this process's."""
        model.eval()
        out = []
        for i in range(rank, len(self.batches), world):
            x, y, positions = self.batches[i]
            with ctx:
                losses = model.token_losses(x, y).double()
            if positions is None:  # gradient and excess pick by the model's losses of the moment
                generator = torch.Generator().manual_seed(self.seed + i)  # batch i's, in any world
                positions, _ = self.selector.chooser(x, y, generator, track=False)(losses.float())
            out.append((x, y, cherry.selection_mask(positions, y.size(1)), losses))
        model.train()
        return out

    def evaluate(self, model, ctx, rank=0, world=1):
        """Held-out loss on all targets, on the selected ones and on the rest (summed over
        processes)."""
        sums = torch.zeros(3, 2, dtype=torch.float64, device=self.batches[0][0].device)
        for x, y, mask, losses in self.masks(model, ctx, rank, world):
            for i, part in enumerate((torch.ones_like(mask), mask, ~mask)):
                sums[i] += torch.stack([losses[part].sum(), part.sum().double()])
        if world > 1:
            dist.all_reduce(sums)
        return dict(zip(("loss", "loss_sup", "loss_unsup"), (sums[:, 0] / sums[:, 1]).tolist()))

    def coupling(self, model, ctx):
        """gamma without batch noise (coupling.gradient_coupling) on held-out batches, and the naive
        one-batch cosine."""
        batches = [(x, y, mask) for x, y, mask, _ in self.masks(model, ctx)[:self.GAMMA_BATCHES]]
        with ctx:
            gamma = coupling.gradient_coupling(model.eval(), batches)  # eval: no dropout
        model.train()
        return {"gamma": gamma["all"], "gamma_trunk": gamma["trunk"],
                "gamma_embedding_head": gamma["embedding+head"],
                "gamma_naive": gamma["naive"], "gamma_batch": len(batches[0][0])}

    @torch.no_grad()
    def expert_load(self, model, ctx):
        """The share of the held-out tokens each expert gets, per layer (and per application)."""
        total = 0
        for x, _, _ in self.batches:
            with ctx:
                model.eval().hidden(x)  # the routers record their counts
            total = total + cherry.expert_counts(model.moe_layers)
        model.train()
        return (total / total.sum(dim=1, keepdim=True)).tolist()


def held_out_loss(args, model):
    """The evaluation train() makes at step 0 (same windows, same split), for any model."""
    device, _, _, ctx = guards.setup_device(args)
    data = data_prep.Data(args.data, args.block_size or model.config.block_size)
    guards.check_vocab(model, data.meta, "the model")
    selector = Selector(args, data.meta, device)
    return HeldOut(args, data, selector, device).evaluate(model.to(device), ctx)


# ----------------------------------------------------------------------------
# training


def train(args, model=None, summary_extra=None, teacher=None):
    """The training loop. model: a prebuilt cherry.GPT (compress.py, fuse.py, --init_from), or None
    for a fresh one from the flags. With --resume the model, optimizer, RNGs and data position come
    from <out_dir>/ckpt.pt and the run goes on exactly as if it had never stopped. Returns the
    summary (also written to summary.json). teacher: distil from it (compress.py's --distill,
    --distill_temp, --distill_hidden in args): frozen, its forward counted in the FLOPs, never
    saved."""
    # the processes, the run folder, the device: every check before anything is written
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    master = rank == 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.grad_accum % world:
        raise ValueError(f"--grad_accum {args.grad_accum} must be divisible by {world} processes")
    ckpt = guards.check_run_folder(args)
    device, kind, dtype, ctx = guards.setup_device(args, distributed=world > 1)
    torch.manual_seed(args.seed)
    # the model's shape: the checkpoint's, the one given, or a fresh one of the flags' shape
    source = f"--init_from {args.init_from}" if args.init_from else "the model given"
    if ckpt is not None:
        model = checkpoint.build_model(ckpt["config"], ckpt["model"], ckpt_path)
        source = ckpt_path
    if model is None:
        cfg = guards.model_config(args, **guards.data_vocabulary(data_prep.load(args.data)[0]))
    else:
        cfg = guards.model_config(args, model.config, source)
    # the data (the run's own content), then a fresh model, once its memory is known to fit
    data = data_prep.Data(args.data, args.block_size or cfg.block_size, args.shuffle_tokens)
    if model is None:
        step = argparse.Namespace(**{**vars(args), "block_size": data.block_size})
        guards.check_memory(cfg, step, device, dtype)  # before the weights and a step take memory
        model = cherry.GPT(cfg)
    # the selector, the optimizer, and where the run stands
    if ckpt is not None and ckpt.get("data_fingerprint", data.fingerprint) != data.fingerprint:
        raise ValueError(f"--resume: --data {args.data} does not hold the data {ckpt_path} was "
                         f"trained on (prepared again?); give the folder it was started with")
    guards.check_vocab(model, data.meta, source)
    selector = Selector(args, data.meta, device)
    data_gen = torch.Generator().manual_seed(args.seed)
    generators = (data_gen, selector.generator)
    raw_model = model.to(device)
    raw_model.grad_checkpoint = args.grad_checkpoint
    optimizer = raw_model.configure_optimizer(args.weight_decay, args.lr, (0.9, args.beta2), kind)
    scaler = torch.amp.GradScaler(kind, enabled=dtype == "float16")
    start, best, rows = 0, None, []
    if ckpt:
        start, best, rows = checkpoint.restore(ckpt, optimizer, scaler, generators, device)
    saved = start if ckpt else None  # the step ckpt.pt holds
    if world > 1:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    model = raw_model
    if teacher is not None:  # distillation: the loss is the wrapper's, the weights raw_model's
        model = cherry.Distilled(raw_model, teacher.to(device), args.distill, args.distill_temp,
                                 args.distill_hidden)
    model = torch.compile(model) if args.compile else model
    if world > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if kind == "cuda" else None)
    held_out = HeldOut(args, data, selector, device)
    nan = guards.NanWatch(device, world, ckpt_path)
    # what a step costs
    sgt = args.sgt < 1
    full_head = sgt and args.sgt_select in ("excess", "gradient")  # a head pass on every position
    flops = cherry.flops_per_token(cfg, args.sgt, full_head_forward=full_head)
    if selector.reference:
        flops += cherry.flops_per_token(selector.reference.config, training=False)
    if teacher is not None:  # the teacher's forward; its head only for the KL on the logits
        flops += cherry.flops_per_token(teacher.config, float(args.distill > 0), training=False)
    tokens_per_step = args.batch_size * args.grad_accum * data.block_size
    peak = guards.peak_flops(device, dtype)
    if master and args.resume and not ckpt:
        print(f"--resume: {args.out_dir} holds no checkpoint yet; starting at step 0")
    if master:
        print(f"model: {cherry.count_params(raw_model) / 1e6:.2f}M parameters, {flops / 1e6:.1f} "
              f"MFLOPs/token for training | {device}, {dtype}, {world} process(es) | "
              f"{tokens_per_step:,} tokens per step | supervising {guards.describe(args)} | "
              f"unigram held-out loss {held_out.unigram_loss:.4f}")
        if args.warmup_iters >= args.max_iters:
            print(f"note: --warmup_iters {args.warmup_iters} is not shorter than --max_iters: the "
                  f"learning rate ends at {lr_at(args.max_iters - 1, args):.2e}, never at --lr")

    def save(it):
        checkpoint.save(ckpt_path, raw_model, optimizer, scaler, generators, device, args, data, it,
                        best, rows)  # first: it holds the rows
        guards.save_json(rows, os.path.join(args.out_dir, "metrics.jsonl"), lines=True)

    lock = guards.locked(args.out_dir) if master else contextlib.nullcontext()
    with lock, guards.Interrupt(world == 1) as interrupt:
        t0 = t_steps = time.time()
        train_s = 0.0  # time in training steps so far, and each evaluation's: for the time left
        eval_times = []
        tokens = 0
        dropped = 0.0
        clipped = 0.0
        for it in range(start, args.max_iters + 1):
            # evaluate and checkpoint (a resumed run has evaluated its first step already)
            due = it % args.eval_interval == 0 or it == args.max_iters
            if due and not (ckpt and it == start):
                if kind == "cuda":
                    torch.cuda.synchronize()  # the clock sees every training step done
                interval_s = time.time() - t_steps
                train_s += interval_s
                t_eval = time.time()
                if master:
                    print(f"step {it}: evaluating ({args.eval_iters} held-out batches)", flush=True)
                row = {"iter": it, **held_out.evaluate(raw_model, ctx, rank, world)}
                nan.record(torch.tensor(row["loss"], device=device), it)  # a NaN held-out loss too
                nan.check(saved)  # the steps' and this evaluation's losses: never save a bad state
                if sgt and master:
                    row.update(held_out.coupling(raw_model, ctx))
                row["tokens_per_s"] = tokens / interval_s if tokens else None
                row["eval_s"] = time.time() - t_eval
                row["lr"] = lr_at(it, args)
                row["train_flops"] = it * tokens_per_step * flops
                if peak and tokens:
                    row["mfu"] = row["tokens_per_s"] * flops / peak / world
                if cfg.n_expert and tokens:  # the share of expert assignments the capacity dropped
                    row["dropped"] = dropped.item() * tokens_per_step / tokens
                if tokens:  # the share of steps whose gradient was clipped; SGT's largest weight
                    row["clipped"] = float(clipped) * tokens_per_step / tokens
                    row["max_weight"] = selector.pop_largest()
                if best is None or row["loss"] < best["loss"]:
                    best = dict(row)
                rows.append(row)
                if master and (it > start or ckpt):  # step 0: nothing to resume yet
                    save(it)
                    saved = it
                if master:
                    gamma = f" | gamma {row['gamma']:.3f}" if "gamma" in row else ""
                    print(f"eval {it}: loss {row['loss']:.4f} | loss_sup {row['loss_sup']:.4f} | "
                          f"loss_unsup {row['loss_unsup']:.4f}{gamma}")
                eval_times.append(time.time() - t_eval)
                tokens = 0
                dropped = 0.0
                clipped = 0.0
                t_steps = time.time()
            # a signal: checkpoint the step reached, and stop
            if interrupt.signal:
                nan.check(saved)
                if master:
                    save(it)
                raise KeyboardInterrupt(f"{interrupt.signal} at step {it}: {ckpt_path} holds it; "
                                        f"the same flags plus --resume continue from there")
            if it == args.max_iters:
                break
            # one optimizer step on a global batch (every process draws it; each takes its share)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, args)
            x, y = data.train_batch(args.batch_size * args.grad_accum, data_gen)
            picks = selector.draw(y) if sgt else None
            micro = micro_batches(x, y, picks, selector, args, rank, world, device)
            loss, was_clipped = optimizer_step(model, optimizer, scaler, micro, ctx, args.grad_clip)
            nan.record(loss, it + 1)
            clipped = clipped + was_clipped
            tokens += tokens_per_step
            if cfg.n_expert:
                dropped = dropped + cherry.dropped_share(raw_model.moe_layers).detach()
            # progress
            if (it + 1) % args.log_interval == 0:
                nan.check(saved)  # a sync: the clock below sees the step done
                if master:
                    steps_s = time.time() - t_steps
                    per_step = (train_s + steps_s) / (it + 1 - start)
                    per_eval = sum(eval_times) / max(1, len(eval_times))
                    left = per_step * (args.max_iters - it - 1) + per_eval * evals_ahead(it, args)
                    mfu = f" | MFU {tokens / steps_s * flops / peak / world:.1%}" if peak else ""
                    print(f"iter {it + 1}/{args.max_iters} | train loss {loss.item():.4f} | lr "
                          f"{lr_at(it, args):.2e} | {tokens / steps_s:,.0f} tok/s{mfu} | "
                          f"{time.time() - t0:.0f}s, ~{left:.0f}s left")
        # the summary
        summary = {"final": rows[-1], "best": best, "params": cherry.count_params(raw_model),
                   "flops_per_token": flops, "tokens_per_step": tokens_per_step,
                   "unigram_loss": held_out.unigram_loss, "device": device, "dtype": dtype,
                   "processes": world, "wall_s": time.time() - t0, "config": asdict(cfg),
                   "args": vars(args), **(summary_extra or {})}
        if cfg.n_expert:
            summary["expert_load"] = held_out.expert_load(raw_model, ctx)
        if master:
            guards.save_json(summary, os.path.join(args.out_dir, "summary.json"))
            print(guards.verdict(summary, rows))
    if world > 1:
        dist.barrier()  # every rank leaves together: none waits on a group the others tore down
        dist.destroy_process_group()
    return summary


def evals_ahead(it, args):
    """How many evaluations the steps after step `it` still hold."""
    every = args.eval_interval
    return args.max_iters // every - it // every + (args.max_iters % every > 0)


def main(argv=None):
    args = guards.parse_args(guards.training_args("train", __doc__), argv)
    model = None
    resuming = args.resume and os.path.exists(os.path.join(args.out_dir, "ckpt.pt"))
    if args.init_from and not resuming:
        guards.check_run_folder(args)  # before loading what may be a large model
        model = checkpoint.load_model(args.init_from, dropout=args.dropout)
    return train(args, model)


if __name__ == "__main__":
    guards.cli(main, "train")
