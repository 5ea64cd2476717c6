"""
Train a GPT with full supervision or with SGT (selective ground-truth token training).

  python train.py --sgt 0.15                        # SGT, 12 x 128 on Shakespeare (minutes on 2 CPU cores)
  python train.py                                   # full supervision, for comparison
  python train.py --sgt 0.15 --sgt_beta 0           # the control: a uniformly random 15%
  python train.py --sgt 0.15 --sgt_select excess    # Rho-1: where the loss most exceeds the unigram model's
  python train.py --init_from gpt2 --data data/mine --lr 3e-5   # fine-tune GPT-2, nanoGPT's or our ckpt.pt
  torchrun --standalone --nproc_per_node=8 train.py --preset gpt2 --sgt 0.15 --grad_accum 8

Writes <out_dir>/ckpt.pt (everything --resume needs, atomically at every evaluation after the first), metrics.jsonl
(a line per evaluation) and summary.json. A run killed at any moment continues with the same flags plus --resume and
ends bit for bit as if never stopped (on the CPU). compress.py and fuse.py build a model, then call train() from here.
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

import cherry
from data import prepare as data_prep
from tools import guards
from tools.guards import COUNT, NATURAL, NON_NEGATIVE, POSITIVE, number

# ----------------------------------------------------------------------------
# flags, shared by train.py, compress.py and fuse.py

SHAPE = dict(n_layer=12, n_head=4, n_embd=128, block_size=128, dropout=0.0, bias=False)  # the default model
DEFAULT_BETA, DEFAULT_MIX = 2.0, 0.0  # chosen by the rule in studies/sgt.py (studies/sgt_defaults.md)


def training_args(prog, doc=__doc__):
    p = guards.Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=data_prep.DEFAULT_DIR, help="folder made by data/prepare.py (the default is made on first use)")
    a("--out_dir", default="out", help="where ckpt.pt, metrics.jsonl and summary.json go")
    a("--resume", action="store_true", help="continue <out_dir>/ckpt.pt exactly (with the flags it was started with)")
    # the model; a model that comes from weights (--init_from, compress.py, fuse.py) has its own shape
    a("--preset", choices=sorted(cherry.PRESETS), help="a named shape (GPT-2's, the paper's); model flags override it")
    a("--n_layer", type=number(int, f"[1, {cherry.MAX_DEPTH}]"), help=f"layers (default {SHAPE['n_layer']})")
    a("--n_head", type=COUNT, help=f"attention heads (default {SHAPE['n_head']})")
    a("--n_embd", type=COUNT, help=f"residual width (default {SHAPE['n_embd']})")
    a("--block_size", type=COUNT, help=f"context length in tokens (default {SHAPE['block_size']}, or the model's)")
    a("--vocab_size", type=COUNT, help="model vocabulary (default: the data's, padded to a multiple of 64)")
    a("--dropout", type=number(float, "[0, 1)"), help="dropout probability (default 0, or the model's)")
    a("--bias", action="store_true", default=None, help="biases in linears and LayerNorms (GPT-2 has them)")
    # optimisation: AdamW, linear warm-up, cosine decay
    a("--max_iters", type=COUNT, default=600, help="optimizer steps")
    a("--batch_size", type=COUNT, default=16, help="sequences per micro-batch, per process")
    a("--grad_accum", type=COUNT, default=1, help="micro-batches per step over all processes (divisible by them)")
    a("--lr", type=POSITIVE, default=1e-3, help="peak learning rate")
    a("--min_lr", type=NON_NEGATIVE, help="final learning rate (default lr / 10)")
    a("--warmup_iters", type=NATURAL, default=50, help="linear warm-up steps")
    a("--lr_decay_iters", type=COUNT, help="steps of the cosine decay (default max_iters)")
    a("--weight_decay", type=NON_NEGATIVE, default=0.1, help="AdamW weight decay, on matrices only")
    a("--beta2", type=number(float, "[0, 1)"), default=0.99, help="AdamW beta2 (beta1 is 0.9)")
    a("--grad_clip", type=NON_NEGATIVE, default=1.0, help="clip the gradient norm to this (0: off)")
    # SGT
    a("--sgt", type=number(float, "(0, 1]"), default=1.0, help="fraction of the targets supervised (1: all)")
    a("--sgt_select", default="surprisal", choices=["surprisal", "excess"],
      help="surprisal: a draw tilted towards rare targets (--sgt_beta, --sgt_mix); excess: Rho-1's excess loss")
    a("--sgt_beta", type=number(float, "[0, inf]"), default=DEFAULT_BETA,
      help=f"the tilt: P(pick) ~ surprisal^beta; 0 uniform, inf the most surprising (default {DEFAULT_BETA})")
    a("--sgt_mix", type=number(float, "[0, 1]"), default=DEFAULT_MIX,
      help=f"the share of the picks drawn uniformly instead (default {DEFAULT_MIX:.2f})")
    a("--sgt_ref", help="excess: a reference model (any --init_from) instead of the unigram model")
    a("--shuffle_tokens", action="store_true", help="control: permute the tokens within every window (no order)")
    # evaluation, logging, system
    a("--eval_interval", type=COUNT, default=100, help="evaluate and checkpoint every this many steps")
    a("--eval_iters", type=COUNT, default=10, help="held-out batches per evaluation (the same windows every time)")
    a("--log_interval", type=COUNT, default=10, help="print a progress line every this many steps")
    a("--seed", type=number(int, f"[0, {2**63 - 1}]"), default=1337, help="initialisation, data order, selection")
    a("--device", default="auto", help="cpu, cuda, cuda:N, mps (auto: cuda if there is one)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast precision (auto: bfloat16 on a GPU that has it, else float32)")
    a("--compile", action="store_true", help="torch.compile the model (needs a C++ compiler)")
    a("--grad_checkpoint", action="store_true", help="activation checkpointing: recompute in backward, for big models")
    return p


def fill_shape(args):
    """A fresh model's shape: each flag not given comes from the preset, else from SHAPE."""
    for k in (*SHAPE, "vocab_size"):
        if getattr(args, k) is None:
            setattr(args, k, cherry.PRESETS.get(args.preset, {}).get(k, SHAPE.get(k)))


def model_from_flags(args, meta):
    """A fresh GPT of the flags' shape, plus what a preset has no flag for (the unroll, the experts)."""
    args.vocab_size = args.vocab_size or (meta["vocab_size"] + 63) // 64 * 64  # a multiple of 64: faster matmuls
    fields = {k: getattr(args, k) for k in (*SHAPE, "vocab_size")} | {"vocab": data_prep.vocab_id(meta)}
    return cherry.GPT(cherry.GPTConfig(**{**cherry.PRESETS.get(args.preset, {}), **fields}))


# ----------------------------------------------------------------------------
# data and the SGT selector


class Data:
    """
    train.bin / val.bin as memory maps, checked against meta.json; random training windows, fixed held-out ones.
    shuffle: permute the block_size + 1 tokens of every window by a permutation seeded with the window's start, so a
    window is always shuffled the same way: its tokens, and every unigram statistic, stay; the order goes.
    """

    def __init__(self, path, block_size, shuffle=False):
        self.meta, self.train, self.val = data_prep.load(path)
        self.block_size, self.shuffle = block_size, shuffle
        for split, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) <= block_size + 1:
                raise ValueError(f"the {split} split of {path} has {len(tokens)} tokens, too few for --block_size "
                                 f"{block_size}; use a smaller --block_size or more text")

    def _windows(self, tokens, starts):
        chunks = torch.stack([torch.from_numpy(tokens[i:i + self.block_size + 1].astype("int64")) for i in starts])
        if self.shuffle:
            chunks = torch.stack([c[torch.randperm(len(c), generator=torch.Generator().manual_seed(int(i)))]
                                  for c, i in zip(chunks, starts)])
        return chunks[:, :-1], chunks[:, 1:]

    def train_batch(self, n, generator):
        starts = torch.randint(len(self.train) - self.block_size - 1, (n,), generator=generator)
        return self._windows(self.train, starts)

    def eval_batch(self, n):
        """n windows spread evenly over val: the same tokens at every evaluation and in every run."""
        return self._windows(self.val, torch.linspace(0, len(self.val) - self.block_size - 1, n).long())


class Selector:
    """Which targets SGT supervises; evaluation splits the held-out loss by the same rule (full supervision at 15%)."""

    def __init__(self, args, meta, device):
        self.args, self.fraction = args, args.sgt if args.sgt < 1 else 0.15
        self.surprisal = cherry.surprisal_table(meta["unigram_counts"], meta["vocab_size"])
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.reference = None  # Rho-1's reference model (frozen), else the unigram model
        if args.sgt_ref:
            self.reference = guards.check_vocab(cherry.load_model(args.sgt_ref), meta, "--sgt_ref").to(device).eval()

    def draw(self, targets, generator=None):
        """(B, k) positions for a batch on the CPU; None for excess, which picks inside the model's forward."""
        a = self.args
        return None if a.sgt_select == "excess" else cherry.select_positions(
            targets, self.fraction, generator or self.generator, self.surprisal, a.sgt_beta, a.sgt_mix)

    @torch.no_grad()
    def excess(self, x, y):
        """Rho-1 for a batch on the device: the positions where the model's loss most exceeds the reference's."""
        ref = self.reference.token_losses(x, y) if self.reference else self.surprisal.to(y.device)[y]
        return cherry.excess_selector(math.ceil(self.fraction * y.size(1)), ref)


# ----------------------------------------------------------------------------
# steps and evaluation


def lr_at(it, args):
    """Linear warm-up, then cosine decay to min_lr."""
    decay_iters, min_lr = args.lr_decay_iters or args.max_iters, args.lr / 10 if args.min_lr is None else args.min_lr
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    ratio = min(1.0, (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - min_lr)


def micro_batches(x, y, selected, selector, args, rank, world, device):
    """This process's micro-batches of a global batch: [(x, y, selected positions, or excess's picking function)]."""
    out = []
    for m in range(rank * (args.grad_accum // world), (rank + 1) * (args.grad_accum // world)):
        part = slice(m * args.batch_size, (m + 1) * args.batch_size)
        xb, yb = (t[part].to(device, non_blocking=True) for t in (x, y))
        pick = None if args.sgt == 1 else selector.excess(xb, yb) if selected is None else selected[part].to(device)
        out.append((xb, yb, pick))
    return out


def optimizer_step(model, optimizer, scaler, micro, ctx, grad_clip):
    """One optimizer step over micro-batches [(x, y, selected)]; returns their mean loss (on the device: no sync)."""
    total = 0.0
    for i, (x, y, selected) in enumerate(micro):
        # under DDP, all-reduce the gradients only once, on the last micro-batch
        with (model.no_sync() if isinstance(model, DDP) and i < len(micro) - 1 else contextlib.nullcontext()), ctx:
            _, loss = model(x, y, selected)
        scaler.scale(loss / len(micro)).backward()
        total = total + loss.detach() / len(micro)
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


class HeldOut:
    """The held-out windows of every evaluation, in batches, with the positions the selector picks in them (from a
    generator of their own, so they never depend on training); excess picks by the model's losses of the moment."""
    GAMMA_BATCHES = 4  # gamma's cost: a forward and two backward passes through the full head per batch

    def __init__(self, args, data, selector, device):
        x, y = data.eval_batch(args.eval_iters * args.batch_size)
        selected = selector.draw(y, torch.Generator().manual_seed(args.seed + 2))
        self.batches = [(x[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device),
                         None if selected is None else selected[i:i + args.batch_size].to(device))
                        for i in range(0, len(x), args.batch_size)]
        self.selector, self.unigram_loss = selector, selector.surprisal[y].mean().item()

    @torch.no_grad()
    def masks(self, model, ctx, rank=0, world=1):
        """[(x, y, mask (B, T) on the selected targets, per-position losses)] of this process's batches."""
        model.eval()
        out = []
        for x, y, selected in self.batches[rank::world]:
            with ctx:
                losses = model.token_losses(x, y).double()
            selected = self.selector.excess(x, y)(losses) if selected is None else selected
            out.append((x, y, cherry.selection_mask(selected, y.size(1)), losses))
        model.train()
        return out

    def evaluate(self, model, ctx, rank=0, world=1):
        """Held-out loss on all targets, on the selected ones and on the rest (summed over processes)."""
        sums = torch.zeros(3, 2, dtype=torch.float64, device=self.batches[0][0].device)
        for x, y, mask, losses in self.masks(model, ctx, rank, world):
            for i, part in enumerate((torch.ones_like(mask), mask, ~mask)):
                sums[i] += torch.stack([losses[part].sum(), part.sum().double()])
        if world > 1:
            dist.all_reduce(sums)
        return dict(zip(("loss", "loss_sup", "loss_unsup"), (sums[:, 0] / sums[:, 1]).tolist()))

    def coupling(self, model, ctx):
        """gamma without batch noise (cherry.gradient_coupling) on held-out batches, and the naive one-batch cosine."""
        batches = [(x, y, mask) for x, y, mask, _ in self.masks(model, ctx)[:self.GAMMA_BATCHES]]
        with ctx:
            gamma = cherry.gradient_coupling(model.eval(), batches)  # no dropout: gradients of the model itself
        model.train()
        return {"gamma": gamma["all"], "gamma_trunk": gamma["trunk"], "gamma_embedding_head": gamma["embedding+head"],
                "gamma_naive": gamma["naive"], "gamma_batch": len(batches[0][0])}

    @torch.no_grad()
    def expert_load(self, model, ctx):
        """The share of the held-out tokens each expert gets, per layer (every application of an unrolled layer)."""
        total = 0
        for x, _, _ in self.batches:
            with ctx:
                model.eval().hidden(x)  # the routers record their counts
            total = total + cherry.expert_counts(model)
        model.train()
        return (total / total.sum(dim=1, keepdim=True)).tolist()


def held_out_loss(args, model):
    """The evaluation train() makes at step 0 (same windows, same split), for a model trained elsewhere or not yet."""
    device, _, _, ctx = guards.setup_device(args)
    data = Data(args.data, args.block_size)
    guards.check_vocab(model, data.meta, "the model")
    return HeldOut(args, data, Selector(args, data.meta, device), device).evaluate(model.to(device), ctx)


# ----------------------------------------------------------------------------
# training


def train(args, model=None, summary_extra=None, teacher=None):
    """The training loop. model: a prebuilt cherry.GPT (compress.py, fuse.py, train.py --init_from), or None for a fresh
    one from the flags. With --resume the model, optimizer, RNGs and data position come from <out_dir>/ckpt.pt and the
    run goes on exactly as if it had never stopped. Returns the summary (also in summary.json).
    teacher: distil from it (compress.py's --distill, --distill_temp, --distill_hidden in args):
    frozen, its forward counted in the FLOPs, never saved."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    master, ckpt_path = rank == 0, os.path.join(args.out_dir, "ckpt.pt")
    if args.grad_accum % world:
        raise ValueError(f"--grad_accum {args.grad_accum} must be divisible by the {world} processes")
    ckpt = guards.check_run_folder(args)  # every check comes before anything is written
    if ckpt is None and model is None:
        fill_shape(args)
    device, kind, dtype, ctx = guards.setup_device(args, distributed=world > 1)
    data = Data(args.data, args.block_size, args.shuffle_tokens)
    torch.manual_seed(args.seed)
    if ckpt is not None:
        model = cherry.build_model(ckpt["config"], ckpt["model"], ckpt_path)
    model = guards.check_vocab(model or model_from_flags(args, data.meta), data.meta, args.init_from or "it")
    selector, data_gen, cfg = Selector(args, data.meta, device), torch.Generator().manual_seed(args.seed), model.config
    raw_model = model.to(device)
    raw_model.grad_checkpoint = args.grad_checkpoint
    optimizer = raw_model.configure_optimizer(args.weight_decay, args.lr, (0.9, args.beta2), kind)
    scaler = torch.amp.GradScaler(kind, enabled=dtype == "float16")
    state = guards.run_state(ckpt, optimizer, scaler, (data_gen, selector.generator), device) or {}
    start, best, rows = state.get("iter", 0), state.get("best"), state.get("metrics", [])
    if world > 1:
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if teacher is not None:  # distillation: the loss is the wrapper's, the weights raw_model's
        model = cherry.Distilled(raw_model, teacher.to(device), args.distill, args.distill_temp,
                                 args.distill_hidden)
    else:
        model = raw_model
    model = torch.compile(model) if args.compile else model
    model = DDP(model, device_ids=[torch.device(device).index] if kind == "cuda" else None) if world > 1 else model
    held_out, sgt, nan = HeldOut(args, data, selector, device), args.sgt < 1, guards.NanWatch(device, world, ckpt_path)
    flops = cherry.flops_per_token(cfg, args.sgt, full_head_forward=args.sgt_select == "excess") + (
        cherry.flops_per_token(selector.reference.config, training=False) if selector.reference else 0)
    if teacher is not None:  # the teacher's forward; its head only for the KL on the logits
        flops += cherry.flops_per_token(teacher.config, float(args.distill > 0), training=False)
    tokens_per_step, peak = args.batch_size * args.grad_accum * args.block_size, guards.peak_flops(device, dtype)
    if master:
        print(f"model: {cherry.count_params(raw_model) / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOPs/token for "
              f"training | {device}, {dtype}, {world} process(es) | {tokens_per_step:,} tokens per step | supervising "
              f"{describe(args)} | unigram held-out loss {held_out.unigram_loss:.4f}")
    with guards.locked(args.out_dir) if master else contextlib.nullcontext():
        t0 = t_steps = time.time()
        tokens, dropped = 0, 0.0
        for it in range(start, args.max_iters + 1):
            if (it % args.eval_interval == 0 or it == args.max_iters) and not (ckpt is not None and it == start):
                nan.check(rows)  # a sync: the clock below sees every training step done
                train_s, t_eval = time.time() - t_steps, time.time()
                row = {"iter": it, **held_out.evaluate(raw_model, ctx, rank, world)}
                nan.record(torch.tensor(row["loss"], device=device), it)  # a held-out loss of NaN stops it too
                nan.check(rows)
                if sgt and master:
                    row.update(held_out.coupling(raw_model, ctx))
                row.update(tokens_per_s=tokens / train_s if tokens else None, eval_s=time.time() - t_eval,
                           lr=lr_at(it, args), train_flops=it * tokens_per_step * flops)
                if peak and tokens:
                    row["mfu"] = row["tokens_per_s"] * flops / peak / world
                if cfg.n_expert and tokens:  # the share of expert assignments the capacity dropped
                    row["dropped"] = dropped.item() * tokens_per_step / tokens
                best = dict(row) if best is None or row["loss"] < best["loss"] else best
                rows.append(row)
                if master and (it > start or ckpt is not None):  # step 0: the flags' own start, nothing to resume
                    save = guards.run_state(None, optimizer, scaler, (data_gen, selector.generator), device, iter=it,
                                            best=best, metrics=rows, model=raw_model.state_dict(),
                                            config=asdict(cfg), args=vars(args))
                    data_prep.atomic_write(ckpt_path, lambda f: torch.save(save, f))  # first: it holds the rows
                    guards.save_json(rows, os.path.join(args.out_dir, "metrics.jsonl"), lines=True)
                if master:
                    print(f"eval {it}: loss {row['loss']:.4f} | loss_sup {row['loss_sup']:.4f} | loss_unsup "
                          f"{row['loss_unsup']:.4f}" + (f" | gamma {row['gamma']:.3f}" if "gamma" in row else ""))
                tokens, dropped, t_steps = 0, 0.0, time.time()
            if it == args.max_iters:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, args)
            x, y = data.train_batch(args.batch_size * args.grad_accum, data_gen)  # the global batch, on every process
            micro = micro_batches(x, y, selector.draw(y) if sgt else None, selector, args, rank, world, device)
            loss = optimizer_step(model, optimizer, scaler, micro, ctx, args.grad_clip)
            nan.record(loss, it + 1)
            tokens += tokens_per_step
            dropped = dropped + cherry.dropped_share(raw_model).detach() if cfg.n_expert else dropped
            if (it + 1) % args.log_interval == 0:
                nan.check(rows)
                if master:
                    tok_s, elapsed = tokens / (time.time() - t_steps), time.time() - t0
                    print(f"iter {it + 1}/{args.max_iters} | train loss {loss.item():.4f} | lr {lr_at(it, args):.2e} | "
                          f"{tok_s:,.0f} tok/s" + (f" | MFU {tok_s * flops / peak / world:.1%}" if peak else "") +
                          f" | {elapsed:.0f}s, ~{elapsed / (it + 1 - start) * (args.max_iters - it - 1):.0f}s left")
        summary = {"final": rows[-1], "best": best, "params": cherry.count_params(raw_model), "flops_per_token": flops,
                   "tokens_per_step": tokens_per_step, "unigram_loss": held_out.unigram_loss, "device": device,
                   "dtype": dtype, "processes": world, "wall_s": time.time() - t0, "config": asdict(cfg),
                   "args": vars(args), **(summary_extra or {})}
        if cfg.n_expert:
            summary["expert_load"] = held_out.expert_load(raw_model, ctx)
        if master:
            guards.save_json(summary, os.path.join(args.out_dir, "summary.json"))
            print(verdict(summary, rows))
    if world > 1:
        dist.barrier()  # every rank leaves together: none waits on a group the others tore down
        dist.destroy_process_group()
    return summary


def describe(args):
    mix = f", {args.sgt_mix:.0%} of them uniformly" if args.sgt_mix else ""
    return "all targets" if args.sgt == 1 else f"{args.sgt:.0%}: " + (
        f"Rho-1's excess loss over {args.sgt_ref or 'the unigram model'}" if args.sgt_select == "excess"
        else f"drawn ~ surprisal^{args.sgt_beta:g}{mix}")


def verdict(summary, rows):
    """The last line: where the run ended, against the unigram model (a table of token frequencies)."""
    final, best, uni = summary["final"], summary["best"], summary["unigram_loss"]
    return (f"done: held-out loss {final['loss']:.4f} ({abs(final['loss'] - uni):.3f} "
            f"{'below' if final['loss'] < uni else 'ABOVE'} the unigram model's {uni:.4f}); best {best['loss']:.4f} at "
            f"step {best['iter']}; unsupervised targets {rows[0]['loss_unsup']:.3f} -> {final['loss_unsup']:.3f} -> "
            f"{summary['args']['out_dir']}")


def main(argv=None):
    p = training_args("train")
    p.add_argument("--init_from", help="start from these weights: a ckpt.pt (ours or nanoGPT's; file or folder), "
                                       "a Hugging Face GPT-2 folder, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl")
    args = guards.parse_args(p, argv)
    model = None
    if args.init_from and not (args.resume and os.path.exists(os.path.join(args.out_dir, "ckpt.pt"))):
        guards.check_run_folder(args)  # before loading what may be a large model
        model = cherry.load_model(args.init_from, dropout=args.dropout)
        guards.take_shape(args, model.config, "--init_from")
    return train(args, model)


if __name__ == "__main__":
    guards.cli(main, "train")
