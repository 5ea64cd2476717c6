"""
Train a GPT with full supervision or with SGT (selective ground-truth token training).

  python train.py                      # full supervision, the small default (CPU, minutes)
  python train.py --sgt 0.15           # supervise the 15% most surprising tokens only
  python train.py --sgt 0.15 --sgt_select random
  torchrun --standalone --nproc_per_node=8 train.py --sgt 0.15 --n_layer 12 --n_embd 768 --n_head 12

  python train.py --init_from gpt2 --data data/mine --lr 3e-5   # fine-tune: GPT-2, nanoGPT's or our ckpt.pt

Writes <out_dir>/ckpt.pt (model, optimizer, RNG and data-order state, atomically at every evaluation),
<out_dir>/metrics.jsonl (one line per eval) and <out_dir>/summary.json. A run killed at any moment continues
with --resume and ends bit for bit as if never stopped (on the CPU). An --out_dir that holds a run is never
overwritten: --resume it or choose a new folder.
compress.py and fuse.py build their models and then call train() from here: one training loop.
"""

import argparse
import json
import math
import os
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


def parse_args(p, argv=None, script="train"):
    """Parse with the preset's shape as defaults, so explicit flags still win."""
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**cherry.PRESETS[args.preset])
        args = p.parse_args(argv)
    check_args(p, args, script)
    return args


# compress.py and fuse.py start from trained models: the shape comes from them, never from these flags
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "bias", "dropout")


def refuse_shape_flags(args, script, source):
    """Giving a shape flag to a script whose model comes from checkpoints is a mistake: say so before loading."""
    given = [f"--{name}" for name in SHAPE_FLAGS if getattr(args, name) is not None]
    if given:
        raise SystemExit(f"{script}: the model's shape comes from {source}; leave out {' '.join(given)}")


def shape_flags_from_model(p, args, cfg, script):
    """Fill the shape flags (and block_size, unless given) from a loaded model's config."""
    for name in SHAPE_FLAGS:
        setattr(args, name, getattr(cfg, name))
    args.block_size = args.block_size or cfg.block_size
    check_args(p, args, script)


def check_args(p, args, script="train"):
    """Flag values that cannot work: one line each, before anything runs."""
    if not 0 < args.sgt <= 1:
        raise SystemExit(f"{script}: --sgt must be in (0, 1], got {args.sgt}; use e.g. --sgt 0.15, or 1 for full supervision")
    for name in ("max_iters", "batch_size", "grad_accum", "block_size", "eval_interval", "eval_iters", "n_layer", "n_head", "n_embd"):
        if getattr(args, name) < 1:
            raise SystemExit(f"{script}: --{name} must be at least 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise SystemExit(f"{script}: --n_embd {args.n_embd} is not divisible by --n_head {args.n_head}; pick sizes that divide")


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "summary.json")  # what marks a folder as holding a run


def check_out_dir(args, script="train"):
    """Never overwrite another run: an --out_dir that holds one needs --resume, or a new folder."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out_dir, name))]
    if found and not args.resume:
        raise SystemExit(f"{script}: --out_dir {args.out_dir} already holds a run ({found[0]}); "
                         f"add --resume to continue it, or choose a new --out_dir")


def load_model(init_from, script="train", dropout=None):
    """
    cherry.GPT.from_pretrained for the scripts: our ckpt.pt, nanoGPT's, a Hugging Face GPT-2 folder or a GPT-2 name.
    A problem (missing, corrupt, unsafe, another architecture) ends the script with one line, not a traceback.
    """
    try:
        return cherry.GPT.from_pretrained(init_from, dropout=dropout)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{script}: {e}")


def load_checkpoint(path, script="train"):
    """cherry.load_checkpoint (plain data only, never pickled code), a problem in one line."""
    try:
        return cherry.load_checkpoint(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{script}: {e}")


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
        missing = [f for f in ("train.bin", "val.bin", "meta.json") if not os.path.exists(os.path.join(path, f))]
        if missing:
            if os.path.abspath(path) != os.path.abspath(data_prep.DEFAULT_DIR):
                what = "no such folder" if not os.path.isdir(path) else f"no {missing[0]} in it"
                raise SystemExit(f"train: --data {path}: {what}; make it with: python data/prepare.py --input YOUR_TEXT --out_dir {path}")
            print("preparing the default data set (Shakespeare) ...")
            data_prep.main([])
        self.meta = json.load(open(os.path.join(path, "meta.json")))
        self.train = np.memmap(os.path.join(path, "train.bin"), dtype=self.meta["dtype"], mode="r")
        self.val = np.memmap(os.path.join(path, "val.bin"), dtype=self.meta["dtype"], mode="r")
        self.block_size = block_size
        self.shuffle = shuffle
        for split, arr in (("train", self.train), ("val", self.val)):
            if len(arr) <= block_size + 1:
                raise SystemExit(f"train: the {split} split of {path} has {len(arr)} tokens, too few for --block_size {block_size}; "
                                 f"use a smaller --block_size or more text")

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
    """One optimizer step, accumulating gradients over micro-batches [(x, y, select or None), ...]. Returns their mean loss."""
    total = 0.0
    for i, (x, y, select) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # under DDP, all-reduce the gradients only once, on the last micro-batch
        with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()), ctx:
            _, loss = model(x, y, select) if select is not None else model(x, y)
        scaler.scale(loss / len(micro_batches)).backward()
        total = total + loss.detach() / len(micro_batches)
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


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
    """Write a temporary file, then rename it: a kill during the save leaves the previous file whole."""
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def write_metrics(rows, path):
    """metrics.jsonl, rewritten whole and atomically (a few hundred rows at most): never a half-written line."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


RESUME_KEYS = ("model", "optimizer", "scaler", "config", "iter", "best", "metrics", "data_rng", "select_rng", "torch_rng")
NO_STEP = 2**62  # "no step yet" for the first-bad-step tracker


def train(args, model=None, summary_extra=None):
    """
    The training loop. model: a prebuilt cherry.GPT (compress.py, fuse.py, train.py --init_from); None builds one
    from the flags. With --resume and <out_dir>/ckpt.pt, model, optimizer, RNGs and data position all come from the
    checkpoint and the run goes on exactly as if it had never stopped. Returns the summary dict (also summary.json).
    """
    check_out_dir(args)
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

    start_iter, best, rows, ckpt = 0, None, [], None
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        missing = [k for k in RESUME_KEYS if k not in (ckpt if isinstance(ckpt, dict) else {})]
        if missing:
            raise SystemExit(f"train: {ckpt_path} has no {missing[0]}, so it cannot be resumed exactly; "
                             f"start a new --out_dir (with --init_from {ckpt_path} to keep its weights)")
        try:
            model = cherry.GPT.from_checkpoint(ckpt, source=ckpt_path)
        except ValueError as e:
            raise SystemExit(f"train: {e}")
        start_iter, best, rows = ckpt["iter"], ckpt["best"], ckpt["metrics"]
        data_gen.set_state(ckpt["data_rng"])
        select.generator.set_state(ckpt["select_rng"])
    elif args.resume and master:  # killed before its first checkpoint: nothing to continue, so start
        print(f"--resume: no checkpoint in {args.out_dir} yet, starting from the beginning")
    if model is None:
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
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])  # dropout draws from the global generators
        if device_type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
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
        print(f"model: {n_params / 1e6:.2f}M parameters (non-embedding {(n_params - cfg.vocab_size * cfg.n_embd) / 1e6:.2f}M), "
              f"{flops / 1e6:.1f} MFLOPs/token for training | device {device}, {dtype}, {world} process(es)")
        print(f"{tokens_per_iter:,} tokens per step | supervising {'all' if not sgt else f'{args.sgt:.0%} ({args.sgt_select})'} of the targets"
              f" | unigram held-out loss {unigram_loss:.4f}")
        if ckpt is not None:  # the evaluations the checkpoint had seen, and no later ones
            write_metrics(rows, metrics_path)

    def save(it):
        """Everything the rest of the run depends on, so that --resume continues bit for bit."""
        os.makedirs(args.out_dir, exist_ok=True)
        atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "config": cfg.to_dict(), "iter": it, "best": best, "metrics": rows, "args": vars(args),
                     "data_rng": data_gen.get_state(), "select_rng": select.generator.get_state(),
                     "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}, ckpt_path)

    # the first step whose loss was NaN or inf, kept on the device: no sync per step; read at each progress line
    # and before each checkpoint, so a bad state is never saved
    first_bad = torch.full((), NO_STEP, dtype=torch.long, device=device)

    def stop_if_not_finite():
        bad = first_bad.clone()
        if world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        step = bad.item()
        if step != NO_STEP:
            kept = f"{ckpt_path} still holds step {rows[-1]['iter']}, the last good state" if rows else "no checkpoint was written"
            raise SystemExit(f"train: the loss became NaN or inf at step {step}; stopped, {kept}. "
                             f"Lower --lr (or raise --warmup_iters), then continue with --resume")

    t0 = t_eval = time.time()
    tokens_since_eval = 0
    for it in range(start_iter, args.max_iters + 1):
        if (it % args.eval_interval == 0 or it == args.max_iters) and not (ckpt is not None and it == start_iter):
            stop_if_not_finite()
            row = {"iter": it, **evaluate(raw_model, eval_x, eval_y, eval_select, args, ctx, device, rank, world)}
            if not math.isfinite(row["loss"]):
                first_bad.fill_(it)
                stop_if_not_finite()
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
            rows.append(row)
            if master:  # the checkpoint first: it holds the rows, so a kill between the two loses nothing
                save(it)
                write_metrics(rows, metrics_path)
                g = f" | gamma {row['gamma']:.3f}" if "gamma" in row else ""
                print(f"eval {it}: loss {row['loss']:.4f} | loss_sup {row['loss_sup']:.4f} | loss_unsup {row['loss_unsup']:.4f}{g}")
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
        first_bad = torch.where((first_bad == NO_STEP) & ~torch.isfinite(loss), it + 1, first_bad)
        tokens_since_eval += tokens_per_iter

        if (it + 1) % args.log_interval == 0:
            stop_if_not_finite()
            if master:
                elapsed, done = time.time() - t0, it + 1 - start_iter
                tok_s = tokens_since_eval / (time.time() - t_eval)
                mfu = f" | MFU {tok_s * flops / (peak * world):.1%}" if peak else ""
                print(f"iter {it + 1}/{args.max_iters} | train loss {loss.item():.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s{mfu} | "
                      f"{elapsed:.0f}s elapsed, ~{elapsed / done * (args.max_iters - it - 1):.0f}s left")

    summary = {"final": rows[-1] if rows else None, "best": best, "params": n_params, "flops_per_token": flops,
               "tokens_per_step": tokens_per_iter, "unigram_loss": unigram_loss, "wall_s": time.time() - t0, "device": device, "dtype": dtype,
               "processes": world, "config": cfg.to_dict(), "args": vars(args), **(summary_extra or {})}
    if master:
        write_json(summary, os.path.join(args.out_dir, "summary.json"))
        print(f"done: best held-out loss {best['loss']:.4f} at iter {best['iter']} -> {args.out_dir}")
    if world > 1:
        dist.destroy_process_group()
    return summary


INIT_SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "bias", "vocab_size")  # fixed by --init_from (dropout may change)


def take_shape(p, args, config, script="train"):
    """With --init_from the model's shape is the checkpoint's: a shape flag that says otherwise is an error."""
    defaults = p.parse_args([])
    given = [f"--{n}" for n in INIT_SHAPE_FLAGS if getattr(args, n) not in (getattr(defaults, n), getattr(config, n))]
    if args.preset:
        given.insert(0, "--preset")
    if given:
        raise SystemExit(f"{script}: the model's shape comes from --init_from; leave out {' '.join(given)}")
    for n in INIT_SHAPE_FLAGS:
        setattr(args, n, getattr(config, n))


def main(argv=None):
    p = training_args()
    p.add_argument("--init_from", default=None, help="start from these weights, not from scratch: a ckpt.pt (ours or nanoGPT's; "
                   "file or folder), a Hugging Face GPT-2 folder, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl (transformers)")
    args = parse_args(p, argv)
    model = None
    if args.init_from and not (args.resume and os.path.exists(os.path.join(args.out_dir, "ckpt.pt"))):
        check_out_dir(args)  # before loading what may be a large model
        model = load_model(args.init_from, "train", dropout=args.dropout)
        take_shape(p, args, model.config)
    return train(args, model)


if __name__ == "__main__":
    main()
