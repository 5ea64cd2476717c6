"""
What keeps a training run safe, kept out of train.py's loop: flag values checked on the way in, a device this machine
really has, a run folder that is never lost, mixed or shared (the checks, the lock, the state --resume needs, whole-file
writes), the NaN watch, and the one line a mistake ends a script with. train.py, compress.py and fuse.py use it.
"""

import argparse
import contextlib
import fcntl
import json
import os
import shutil

import torch
import torch.distributed as dist

import cherry
from data import prepare as data_prep

# ----------------------------------------------------------------------------
# flags: one line for a mistake, numbers in their range


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other mistake; --help has the rest
        self.exit(2, f"{self.prog}: {message}\n")


def number(kind, interval):
    """An argparse type: a number of this kind in an interval written as "[0, 1)" or "(0, inf)"; never NaN."""
    low, high = (float(end) for end in interval[1:-1].split(","))

    def parse(text):
        value = kind(text)
        low_ok = low < value if interval[0] == "(" else low <= value
        if not (low_ok and (value < high if interval[-1] == ")" else value <= high)):  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return value
    parse.__name__ = kind.__name__  # argparse says "invalid int value: '1.5'"
    return parse


COUNT, NATURAL = number(int, "[1, inf)"), number(int, "[0, inf)")
POSITIVE, NON_NEGATIVE = number(float, "(0, inf)"), number(float, "[0, inf)")


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.min_lr is not None and args.min_lr > args.lr:
        parser.error(f"argument --min_lr: {args.min_lr} is above --lr {args.lr}")
    return args


# ----------------------------------------------------------------------------
# devices

PEAK_FLOPS = {"H100 PCIe": (756e12, 378e12), "H100": (989e12, 494e12), "H200": (989e12, 494e12),  # (bf16, tf32)
              "B200": (2250e12, 1100e12), "A100": (312e12, 156e12), "L4": (121e12, 60e12), "RTX 4090": (165e12, 83e12)}


def peak_flops(device, dtype):
    """The GPU's dense tensor-core peak FLOP/s at this precision, or None where unknown (CPUs)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((peaks[dtype == "float32"] for key, peaks in PEAK_FLOPS.items() if name and key in name), None)


def setup_device(args, distributed=False):
    """Device, autocast precision and context; a device, precision or compiler this machine lacks is refused."""
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if distributed and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        kind, index = torch.device(device).type, torch.device(device).index or 0
    except RuntimeError:
        raise ValueError(f"unknown --device {args.device!r}; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: no Apple GPU (MPS) here")
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() \
        else "float32"
    if dtype == "float16" and kind != "cuda":
        raise ValueError(f"--dtype float16 needs a CUDA GPU; on {kind} use float32 or bfloat16")
    if args.compile and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        raise ValueError("--compile needs a C++ compiler (g++ or clang++) for torch.compile; install one, or leave "
                         "--compile out")
    if kind == "cuda":
        torch.cuda.set_device(index)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = contextlib.nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=getattr(torch, dtype))
    return device, kind, dtype, ctx


# ----------------------------------------------------------------------------
# the run folder (never lost, never mixed, never shared) and the weights a run starts from

SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")  # fixed by the weights a script starts from
RUN_FLAGS = ("data", *SHAPE_FLAGS, "block_size", "batch_size", "grad_accum", "sgt", "sgt_select", "sgt_beta", "sgt_mix",
             "sgt_ref", "shuffle_tokens", "eval_iters", "seed", "distill", "distill_temp",
             "distill_hidden")  # what --resume must be given unchanged (a script's own flags where it has them)


def check_run_folder(args):
    """Before anything is written: a folder that holds a run (ckpt.pt, metrics.jsonl, summary.json) is continued only
    with --resume and the flags it was started with (shape flags left out come from it). Returns the checkpoint to
    resume from, or None."""
    out, ckpt_path = args.out_dir, os.path.join(args.out_dir, "ckpt.pt")
    if not out or os.path.isfile(out):
        raise ValueError(f"--out_dir {out!r} is not a folder")
    found = [f for f in ("ckpt.pt", "metrics.jsonl", "summary.json") if os.path.exists(os.path.join(out, f))]
    if found and not args.resume:
        raise ValueError(f"--out_dir {out} already holds a run ({found[0]}); add --resume to continue it, "
                         f"or choose a new --out_dir")
    if found and "ckpt.pt" not in found:
        raise ValueError(f"--out_dir {out} has {found[0]} but no ckpt.pt to resume from; choose a new --out_dir")
    ckpt = cherry.load_checkpoint(ckpt_path) if found else None
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if found and (not isinstance(saved, dict) or any(k not in ckpt for k in ("model", "config", "optimizer", "rng"))):
        raise ValueError(f"{ckpt_path} cannot be resumed exactly; start a new --out_dir with --init_from {ckpt_path}")
    for k in RUN_FLAGS if found else ():
        if getattr(args, k, None) is None and k in (*SHAPE_FLAGS, "block_size"):
            setattr(args, k, saved.get(k))
        if k in saved and hasattr(args, k) and saved[k] != getattr(args, k):
            raise ValueError(f"--resume: {ckpt_path} was started with --{k} {saved[k]}, not {getattr(args, k)}; "
                             f"give the flags it was started with")
    return ckpt


@contextlib.contextmanager
def locked(out_dir):
    """Hold <out_dir>/.lock while training: a second training on the same folder is refused instead of racing."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel releases it when the process ends
        except BlockingIOError:
            raise ValueError(f"--out_dir {out_dir} is in use by another training; wait for it, or choose another") \
                from None
        yield


def run_state(ckpt, optimizer, scaler, generators, device, **now):
    """Everything --resume needs. Given a checkpoint: restore the optimizer, the scaler and every random generator in
    use (data order, SGT's draws, torch's own for dropout) and return it. Given now=...: the state to save."""
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        for generator, state in zip(generators, ckpt["rng"]):
            generator.set_state(state)
        torch.set_rng_state(ckpt["torch_rng"])
        if device.startswith("cuda") and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        return ckpt
    return {**now, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": [g.get_state() for g in generators], "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def save_json(obj, path, lines=False):
    """summary.json, or metrics.jsonl (lines=True, rewritten whole: never a half-written line)."""
    text = "".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj, indent=2)
    data_prep.atomic_write(path, lambda f: f.write(text.encode()))


class NanWatch:
    """The first step whose loss was NaN or inf, kept on the device (no sync per step); checked before each progress
    line and each checkpoint, so a bad state is never saved."""

    def __init__(self, device, world, ckpt_path):
        self.first, self.world, self.ckpt_path = torch.full((), 2**62, device=device), world, ckpt_path

    def record(self, loss, step):
        self.first = torch.where((self.first == 2**62) & ~torch.isfinite(loss), step, self.first)

    def check(self, rows):
        first = self.first.clone()
        if self.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() != 2**62:
            kept = f"{self.ckpt_path} still holds step {rows[-1]['iter']}, the last good state" \
                if os.path.exists(self.ckpt_path) else "no checkpoint was written"
            raise ValueError(f"the loss became NaN or inf at step {int(first.item())}; stopped, {kept}. Lower --lr (or "
                             f"raise --warmup_iters), then continue with --resume")


def take_shape(args, config, source):
    """A model that comes from weights keeps its shape: a shape flag that says otherwise is a mistake. Training may use
    a shorter context than the model's."""
    given = [f"--{k}" for k in SHAPE_FLAGS if getattr(args, k) not in (None, getattr(config, k))]
    if given or args.preset:
        raise ValueError(f"the model's shape comes from {source}; leave out {' '.join(given or ['--preset'])}")
    if (args.block_size or 0) > config.block_size:
        raise ValueError(f"--block_size {args.block_size} is longer than the model's {config.block_size}")
    for k in SHAPE_FLAGS:
        setattr(args, k, getattr(config, k))
    args.block_size, args.dropout = args.block_size or config.block_size, config.dropout


def check_vocab(model, meta, source):
    """Weights whose ids mean other tokens than the data's are refused (an unknown vocabulary is let through)."""
    data_vocab = data_prep.vocab_id(meta)
    if model.config.vocab and model.config.vocab != data_vocab:
        raise ValueError(f"{source} was trained on the vocabulary {model.config.vocab!r}, the data's is "
                         f"{data_vocab!r}: its ids mean other tokens; prepare the data with the model's tokenizer")
    if model.config.vocab_size < meta["vocab_size"]:
        raise ValueError(f"{source} has {model.config.vocab_size} token ids, fewer than the data's "
                         f"{meta['vocab_size']}")
    return model


# ----------------------------------------------------------------------------
# where a script meets its user


def cli(main, prog, argv=None):
    """Where a script meets its user: a mistake ends it with one line '<prog>: <what>' on stderr and exit status 1."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:  # ours say what to do; OSError: a missing file, a full disk
        raise SystemExit(f"{prog}: {(str(e).strip() or type(e).__name__).splitlines()[0]}") from None
    except ImportError as e:
        raise SystemExit(f"{prog}: this needs the {e.name} package: pip install {e.name}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"{prog}: interrupted; --resume continues from the last checkpoint") from None
