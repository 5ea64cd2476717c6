"""
Train a GPT with full supervision or with SGT (selective ground-truth token training).

  python train.py                      # full supervision, the small default (CPU, minutes)
  python train.py --sgt 0.15           # supervise the 15% most surprising tokens only
  python train.py --sgt 0.15 --sgt_select random
  torchrun --standalone --nproc_per_node=8 train.py --sgt 0.15 --n_layer 12 --n_embd 768 --n_head 12

Writes <out_dir>/ckpt.pt (model, optimizer, data-order state: --resume continues exactly),
<out_dir>/metrics.jsonl (one line per eval) and <out_dir>/summary.json.
compress.py and fuse.py build their models and then call train() from here: one training loop.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cherry
from data import prepare as data_prep

# ----------------------------------------------------------------------------
# flags, shared by train.py, compress.py and fuse.py


def training_args(parser=None):
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=data_prep.DEFAULT_DIR, help="folder with train.bin, val.bin, meta.json (made by data/prepare.py; the default is prepared on first use)")
    a("--out_dir", default="out", help="where ckpt.pt, metrics.jsonl, summary.json go")
    a("--resume", action="store_true", help="continue exactly from <out_dir>/ckpt.pt")
    # model
    a("--preset", choices=sorted(cherry.PRESETS), help="a named model shape (GPT-2 sizes, the paper's); other model flags override it")
    a("--n_layer", type=int, default=4, help="transformer layers")
    a("--n_head", type=int, default=4, help="attention heads")
    a("--n_embd", type=int, default=256, help="residual width")
    a("--block_size", type=int, default=128, help="context length in tokens")
    a("--vocab_size", type=int, default=None, help="model vocabulary (default: the data's, padded to a multiple of 64)")
    a("--dropout", type=float, default=0.0, help="dropout probability")
    a("--bias", action="store_true", help="biases in linears and LayerNorms (GPT-2 has them)")
    # optimisation
    a("--max_iters", type=int, default=600, help="optimizer steps")
    a("--batch_size", type=int, default=16, help="sequences per micro-batch, per process")
    a("--grad_accum", type=int, default=1, help="micro-batches per step, over all processes (divisible by their number)")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--min_lr", type=float, default=None, help="final learning rate of the cosine decay (default: lr / 10)")
    a("--warmup_iters", type=int, default=50, help="linear warm-up steps")
    a("--lr_decay_iters", type=int, default=None, help="steps of the cosine decay (default: max_iters)")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    a("--beta2", type=float, default=0.99, help="AdamW beta2 (beta1 is 0.9)")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    # SGT
    a("--sgt", type=float, default=1.0, help="fraction of target tokens supervised per sequence (1.0: full supervision)")
    a("--sgt_select", default="surprisal", choices=["surprisal", "random"], help="which tokens SGT supervises")
    a("--shuffle_tokens", action="store_true", help="control: permute the tokens within every training and held-out window (same tokens, no order)")
    # evaluation and logging
    a("--eval_interval", type=int, default=100, help="evaluate (and checkpoint) every this many steps")
    a("--eval_iters", type=int, default=10, help="held-out batches per evaluation (fixed windows of val)")
    a("--log_interval", type=int, default=10, help="print a progress line every this many steps")
    # system
    a("--seed", type=int, default=1337, help="random seed (initialisation, data order, random selection)")
    a("--device", default="auto", help="cpu, cuda, cuda:1, mps (auto: cuda if available)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="autocast precision (auto: bfloat16 on a GPU that has it, else float32)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad_checkpoint", action="store_true", help="activation checkpointing: recompute in backward, for big models")
    return p


def parse_args(p, argv=None):
    """Parse with the preset's shape as defaults, so explicit flags still win."""
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**cherry.PRESETS[args.preset])
        args = p.parse_args(argv)
    check_args(p, args)
    return args


# compress.py and fuse.py start from trained models: the shape comes from them, never from these flags
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "bias", "dropout")


def shape_flags_from_model(p, args, cfg, script, source):
    """Fill the shape flags (and block_size, unless given) from a loaded model's config; giving them is a mistake."""
    given = [f"--{name}" for name in SHAPE_FLAGS if getattr(args, name) is not None]
    if given:
        raise SystemExit(f"{script}: the model's shape comes from {source}; leave out {' '.join(given)}")
    for name in SHAPE_FLAGS:
        setattr(args, name, getattr(cfg, name))
    args.block_size = args.block_size or cfg.block_size
    check_args(p, args)


def check_args(p, args):
    if not 0 < args.sgt <= 1:
        p.error(f"--sgt must be in (0, 1], got {args.sgt}")
    for name in ("max_iters", "batch_size", "grad_accum", "block_size", "eval_interval", "eval_iters", "n_layer", "n_head", "n_embd"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.n_embd % args.n_head:
        p.error(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")


# ----------------------------------------------------------------------------
# data


class Data:
    """
    train.bin / val.bin as memory maps; random training windows, fixed evaluation windows.
    shuffle: permute the block_size + 1 tokens of every window (inputs and targets alike) by a permutation
    seeded with the window's start, so a window is always shuffled the same way: the token multiset, and
    so every unigram statistic, stays; the order, and so all context, goes.
    """

    def __init__(self, path, block_size, shuffle=False):
        if not os.path.exists(os.path.join(path, "train.bin")):
            if os.path.abspath(path) != os.path.abspath(data_prep.DEFAULT_DIR):
                raise SystemExit(f"train: no train.bin in {path}; make it with: python data/prepare.py --input ... --out_dir {path}")
            print("preparing the default data set (Shakespeare) ...")
            data_prep.main([])
        self.meta = json.load(open(os.path.join(path, "meta.json")))
        self.train = np.memmap(os.path.join(path, "train.bin"), dtype=self.meta["dtype"], mode="r")
        self.val = np.memmap(os.path.join(path, "val.bin"), dtype=self.meta["dtype"], mode="r")
        self.block_size = block_size
        self.shuffle = shuffle
        for split, arr in (("train", self.train), ("val", self.val)):
            if len(arr) <= block_size + 1:
                raise SystemExit(f"train: {split} split of {path} has {len(arr)} tokens, too few for --block_size {block_size}")

    def _windows(self, arr, starts):
        chunks = torch.from_numpy(np.stack([arr[i:i + self.block_size + 1].astype(np.int64) for i in starts]))
        if self.shuffle:
            chunks = torch.stack([c[torch.randperm(len(c), generator=torch.Generator().manual_seed(int(i)))]
                                  for c, i in zip(chunks, starts)])
        return chunks[:, :-1], chunks[:, 1:]

    def train_batch(self, n, generator):
        return self._windows(self.train, torch.randint(len(self.train) - self.block_size - 1, (n,), generator=generator).tolist())

    def eval_batch(self, n):
        """n windows spread evenly over val: the same tokens at every evaluation and in every run."""
        return self._windows(self.val, np.linspace(0, len(self.val) - self.block_size - 1, n).astype(np.int64))


class Selector:
    """Chooses which targets SGT supervises; the evaluation uses the same rule to split loss_sup / loss_unsup."""

    def __init__(self, args, meta):
        self.fraction = args.sgt if args.sgt < 1 else 0.15  # full supervision is still reported split at 15%
        self.method = args.sgt_select
        self.surprisal = cherry.surprisal_table(meta["unigram_counts"], meta["vocab_size"])
        self.generator = torch.Generator().manual_seed(args.seed + 1)

    def __call__(self, targets, generator=None):
        with torch.no_grad():
            return cherry.select_tokens(targets, self.fraction, self.method, self.surprisal, generator or self.generator)


# ----------------------------------------------------------------------------
# training


# Dense tensor-core peak FLOP/s by GPU name: (bf16/fp16, tf32). More specific names first.
PEAK_FLOPS = [("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 494e12), ("H200", 989e12, 494e12),
              ("GH200", 989e12, 494e12), ("B200", 2250e12, 1100e12), ("A100", 312e12, 156e12),
              ("L40S", 362e12, 183e12), ("L4", 121e12, 60e12), ("A10", 125e12, 62e12),
              ("RTX 4090", 165e12, 83e12), ("RTX 3090", 71e12, 36e12), ("V100", 125e12, 15.7e12), ("T4", 65e12, 8e12)]


def peak_flops(device, dtype):
    """The device's peak FLOP/s for this precision, or None where unknown (CPUs)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_FLOPS:
        if key in name:
            return tf32 if dtype == "float32" else half
    return None


def setup_device(args):
    """Process group (under torchrun), device, autocast context."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if backend == "nccl" else "cpu"
    else:
        rank, world = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)  # "cuda" alone means device 0
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return (rank, world, device, *autocast_for(device, args.dtype))


def autocast_for(device, dtype):
    """Device type, precision and autocast context for --dtype on this device."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    return device_type, dtype, ctx


def lr_at(it, args):
    """Linear warm-up, then cosine decay to min_lr."""
    decay_iters = args.lr_decay_iters or args.max_iters
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - min_lr)


@torch.no_grad()
def evaluate(model, x, y, select, args, ctx, device, rank, world):
    """Held-out loss on all tokens, on the selected ones and on the rest (summed over processes)."""
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    for i in range(rank * args.batch_size, len(x), world * args.batch_size):
        xb, yb = x[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device)
        with ctx:
            losses = model.token_losses(xb, yb).double().cpu()
        mask = cherry.selection_mask(select[i:i + args.batch_size], yb.size(1))
        sums += torch.stack([losses.sum(), torch.tensor(losses.numel()), losses[mask].sum(), mask.sum(),
                             losses[~mask].sum(), (~mask).sum()]).double()
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    return {"loss": (sums[0] / sums[1]).item(), "loss_sup": (sums[2] / sums[3]).item(), "loss_unsup": (sums[4] / sums[5]).item()}


def optimizer_step(model, optimizer, scaler, micro_batches, ctx, grad_clip):
    """One optimizer step, accumulating gradients over micro-batches [(x, y, select or None), ...]."""
    for i, (x, y, select) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # under DDP, all-reduce the gradients only once, on the last micro-batch
        with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()), ctx:
            _, loss = model(x, y, select) if select is not None else model(x, y)
        scaler.scale(loss / len(micro_batches)).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def eval_windows(args, data, select):
    """The fixed held-out windows of every evaluation, and the positions the selector picks in them."""
    x, y = data.eval_batch(args.eval_iters * args.batch_size)
    return x, y, select(y, torch.Generator().manual_seed(args.seed + 2))


def check_model_fits(model, data, args):
    if model.config.block_size < args.block_size:
        raise SystemExit(f"train: --block_size {args.block_size} is longer than the model's {model.config.block_size}")
    if model.config.vocab_size < data.meta["vocab_size"]:
        raise SystemExit(f"train: the model's vocabulary ({model.config.vocab_size}) is smaller than the data's ({data.meta['vocab_size']})")


def held_out_loss(args, model):
    """The evaluation train() makes at step 0 (same windows, same split), for a model that is not trained here."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    _, _, ctx = autocast_for(device, args.dtype)
    data = Data(args.data, args.block_size)
    check_model_fits(model, data, args)
    x, y, select = eval_windows(args, data, Selector(args, data.meta))
    return evaluate(model.to(device), x, y, select, args, ctx, device, rank=0, world=1)


def atomic_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def train(args, model=None, summary_extra=None):
    """
    The training loop. model: a prebuilt cherry.GPT (compress.py, fuse.py); None builds one from the flags.
    Returns the summary dict (also written to summary.json).
    """
    rank, world, device, device_type, dtype, ctx = setup_device(args)
    master = rank == 0
    if args.grad_accum % world:
        raise SystemExit(f"train: --grad_accum {args.grad_accum} must be divisible by the {world} processes")
    accum = args.grad_accum // world
    torch.manual_seed(args.seed)
    data = Data(args.data, args.block_size, args.shuffle_tokens)
    select = Selector(args, data.meta)
    data_gen = torch.Generator().manual_seed(args.seed)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")

    start_iter, best, ckpt = 0, None, None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"train: --resume but no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model = cherry.GPT.from_checkpoint(ckpt)
        start_iter, best = ckpt["iter"], ckpt["best"]
        data_gen.set_state(ckpt["data_rng"])
        select.generator.set_state(ckpt["select_rng"])
    elif model is None:
        vocab = args.vocab_size or (data.meta["vocab_size"] + 63) // 64 * 64  # a multiple of 64: faster matmuls
        if vocab < data.meta["vocab_size"]:
            raise SystemExit(f"train: --vocab_size {vocab} is smaller than the data's {data.meta['vocab_size']}")
        shape = dict(block_size=args.block_size, vocab_size=vocab, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)
        preset = cherry.PRESETS.get(args.preset, {})  # adds what has no flag: the unroll, the experts
        model = cherry.GPT(cherry.GPTConfig(**{**preset, **shape}))
    check_model_fits(model, data, args)
    model.grad_checkpoint = args.grad_checkpoint
    model.to(device)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, args.beta2), device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    eval_x, eval_y, eval_select = eval_windows(args, data, select)
    # the held-out loss of the training split's unigram distribution: what a model without context can reach
    unigram_loss = select.surprisal[eval_y].mean().item()
    sgt = args.sgt < 1
    cfg = raw_model.config
    n_params = cherry.count_params(raw_model)
    tokens_per_iter = args.batch_size * args.grad_accum * args.block_size
    flops = cherry.flops_per_token(cfg, args.sgt)
    peak = peak_flops(device, dtype)
    pinned = device_type == "cuda"  # page-locked host memory lets the copy overlap with compute
    to_device = lambda t: (t.pin_memory() if pinned else t).to(device, non_blocking=True)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"model: {n_params / 1e6:.2f}M parameters (non-embedding {(n_params - cfg.vocab_size * cfg.n_embd) / 1e6:.2f}M), "
              f"{flops / 1e6:.1f} MFLOPs/token for training | device {device}, {dtype}, {world} process(es)")
        print(f"{tokens_per_iter:,} tokens per step | supervising {'all' if not sgt else f'{args.sgt:.0%} ({args.sgt_select})'} of the targets"
              f" | unigram held-out loss {unigram_loss:.4f}")
        if args.resume:  # keep only the evaluations the checkpoint had seen
            rows = [r for r in map(json.loads, open(metrics_path)) if r["iter"] <= start_iter] if os.path.exists(metrics_path) else []
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            open(metrics_path, "w").close()

    def save(it):
        atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg.to_dict(),
                     "iter": it, "best": best, "args": vars(args), "data_rng": data_gen.get_state(),
                     "select_rng": select.generator.get_state()}, ckpt_path)

    t0 = t_eval = time.time()
    tokens_since_eval, last = 0, None
    for it in range(start_iter, args.max_iters + 1):
        if (it % args.eval_interval == 0 or it == args.max_iters) and not (args.resume and it == start_iter):
            row = {"iter": it, **evaluate(raw_model, eval_x, eval_y, eval_select, args, ctx, device, rank, world)}
            row["tokens_per_s"] = tokens_since_eval / (time.time() - t_eval) if tokens_since_eval else None
            if peak and row["tokens_per_s"]:
                row["mfu"] = row["tokens_per_s"] * flops / (peak * world)
            if sgt:  # gradient coupling on one training batch, drawn from its own stream (data order untouched)
                gx, gy = data.train_batch(args.batch_size, torch.Generator().manual_seed(args.seed + 3 + it))
                with ctx:
                    row["gamma"], row["grad_sup_norm"], row["grad_unsup_norm"] = cherry.gradient_coupling(
                        raw_model, gx.to(device), gy.to(device), select(gy).to(device))
            row["lr"] = lr_at(it, args)
            if best is None or row["loss"] < best["loss"]:
                best = dict(row)
            if master:
                save(it)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                g = f" | gamma {row['gamma']:.3f}" if "gamma" in row else ""
                print(f"eval {it}: loss {row['loss']:.4f} | loss_sup {row['loss_sup']:.4f} | loss_unsup {row['loss_unsup']:.4f}{g}")
            last = row
            tokens_since_eval, t_eval = 0, time.time()
        if it == args.max_iters:
            break

        # one optimizer step over the global batch; this process takes its slices of it
        lr = lr_at(it, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.train_batch(args.batch_size * args.grad_accum, data_gen)
        sel = select(y) if sgt else None
        parts = [slice((rank * accum + m) * args.batch_size, (rank * accum + m + 1) * args.batch_size) for m in range(accum)]
        micro_batches = [tuple(to_device(t[part]) if t is not None else None for t in (x, y, sel)) for part in parts]
        loss = optimizer_step(model, optimizer, scaler, micro_batches, ctx, args.grad_clip)
        tokens_since_eval += tokens_per_iter

        if master and (it + 1) % args.log_interval == 0:
            elapsed, done = time.time() - t0, it + 1 - start_iter
            tok_s = tokens_since_eval / (time.time() - t_eval)
            mfu = f" | MFU {tok_s * flops / (peak * world):.1%}" if peak else ""
            print(f"iter {it + 1}/{args.max_iters} | train loss {loss.item():.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s{mfu} | "
                  f"{elapsed:.0f}s elapsed, ~{elapsed / done * (args.max_iters - it - 1):.0f}s left")

    summary = {"final": last, "best": best, "params": n_params, "flops_per_token": flops,
               "tokens_per_step": tokens_per_iter, "unigram_loss": unigram_loss, "wall_s": time.time() - t0, "device": device, "dtype": dtype,
               "processes": world, "config": cfg.to_dict(), "args": vars(args), **(summary_extra or {})}
    if master:
        write_json(summary, os.path.join(args.out_dir, "summary.json"))
        print(f"done: best held-out loss {best['loss']:.4f} at iter {best['iter']} -> {args.out_dir}")
    if world > 1:
        dist.destroy_process_group()
    return summary


def main(argv=None):
    train(parse_args(training_args(), argv))


if __name__ == "__main__":
    main()
