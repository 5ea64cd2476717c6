"""
Where the scripts meet their user, kept out of train.py's loop: the flags train.py, compress.py and
fuse.py share (each value checked on the way in, the model's shape decided once), a device this
machine really has, a run folder that is never lost, mixed or shared (the checks, the lock,
whole-file writes), the NaN watch, what a run says first and last, and the one line a mistake ends a
script with. The scripts and the tools use it.
"""

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import threading

import torch
import torch.distributed as dist

import checkpoint
import cherry
from data import prepare as data_prep

# ----------------------------------------------------------------------------
# flags: one line for a mistake, numbers in their range


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other mistake; --help has the rest
        self.exit(2, f"{self.prog}: {message}\n")


def number(kind, interval):
    """An argparse type: a number of this kind in an interval written as "[0, 1)" or "(0, inf)";
    never NaN."""
    low, high = (float(end) for end in interval[1:-1].split(","))

    def parse(text):
        value = kind(text)
        low_ok = low < value if interval[0] == "(" else low <= value
        # NaN fails both
        if not (low_ok and (value < high if interval[-1] == ")" else value <= high)):
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return value
    parse.__name__ = kind.__name__  # argparse says "invalid int value: '1.5'"
    return parse


COUNT, NATURAL = number(int, "[1, inf)"), number(int, "[0, inf)")
POSITIVE, NON_NEGATIVE = number(float, "(0, inf)"), number(float, "[0, inf)")


def parse_args(parser, argv=None):
    """The flags, with what no single flag's type can see refused in one line, and SGT's default
    weights and floor given where they apply."""
    args = parser.parse_args(argv)
    if getattr(args, "min_lr", None) is not None and args.min_lr > args.lr:
        parser.error(f"argument --min_lr: {args.min_lr} is above --lr {args.lr}")
    for flag in ("init_from", "sgt_ref", "data"):
        if getattr(args, flag, None) == "":  # an unset shell variable: never "start from nothing"
            parser.error(f"argument --{flag}: an empty path")
    if getattr(args, "sgt_ref", None) and args.sgt_select != "excess":
        parser.error("argument --sgt_ref: only --sgt_select excess uses a reference model")
    drawn = getattr(args, "sgt_select", None) != "excess"
    if hasattr(args, "sgt_weights") and args.sgt_weights is None:  # the default, where it applies
        tilted = drawn and 0 < args.sgt_beta < float("inf") and not args.sgt_mix
        args.sgt_weights = DEFAULT_WEIGHTS if tilted else "none"
    if hasattr(args, "sgt_floor") and args.sgt_floor is None:
        args.sgt_floor = DEFAULT_FLOOR if args.sgt_weights == "inverse" else 0.0
    sgt_weights, sgt_mix, sgt_floor = (getattr(args, k, None)
                                       for k in ("sgt_weights", "sgt_mix", "sgt_floor"))
    if sgt_weights == "inverse" and not (drawn and args.sgt_beta < float("inf") and not sgt_mix):
        parser.error("argument --sgt_weights: inverse needs a draw whose inclusion probabilities "
                     "are known: --sgt_select surprisal or gradient, a finite --sgt_beta and no "
                     "--sgt_mix (use --sgt_floor)")
    if sgt_floor and not (drawn and args.sgt_beta < float("inf")):
        parser.error("argument --sgt_floor: a floor needs a draw with a finite --sgt_beta "
                     "(not excess, not inf)")
    return args


# ----------------------------------------------------------------------------
# the flags train.py, compress.py and fuse.py share, and the model shape they decide

# SGT's default, the winner of the rule in studies/sgt_compute.py (studies/sgt_defaults.md): a draw
# ~ (1 - p_y), each pick weighted 1/pi, a tenth of the draw weight uniform. The weights and the
# floor apply where the draw is tilted and its inclusion probabilities known (parse_args)
DEFAULT_SELECT = "gradient"
DEFAULT_BETA = 1.0
DEFAULT_MIX = 0.0
DEFAULT_WEIGHTS = "inverse"
DEFAULT_FLOOR = 0.1
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias")


def training_args(prog, doc):
    # conflict_handler: a script may say what its own --init_from means
    p = Parser(prog=prog, description=doc, conflict_handler="resolve",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default=data_prep.DEFAULT_DIR, help="a folder data/prepare.py made")
    a("--out_dir", default="out", help="where ckpt.pt, metrics.jsonl and summary.json go")
    a("--resume", action="store_true", help="continue <out_dir>/ckpt.pt exactly (same flags)")
    a("--init_from", help="start from these weights: a ckpt.pt (ours or nanoGPT's, or its folder), "
                          "a Hugging Face GPT-2 folder, or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    # the model (defaults: cherry.GPTConfig's); a model that comes from weights has its own shape
    d = cherry.GPTConfig
    a("--preset", choices=sorted(cherry.PRESETS), help="a named shape; model flags override it")
    a("--n_layer", type=number(int, f"[1, {cherry.MAX_DEPTH}]"), help=f"layers ({d.n_layer})")
    a("--n_head", type=COUNT, help=f"attention heads (default {d.n_head})")
    a("--n_embd", type=COUNT, help=f"residual width (default {d.n_embd})")
    a("--block_size", type=COUNT, help=f"context in tokens ({d.block_size}, or the model's)")
    a("--vocab_size", type=COUNT, help="model vocabulary (default: the data's, padded to 64)")
    a("--dropout", type=number(float, "[0, 1)"), help="dropout (0, or the model's)")
    a("--bias", action="store_true", default=None, help="biases in linears and norms (GPT-2's)")
    # optimisation: AdamW, linear warm-up, cosine decay
    a("--max_iters", type=COUNT, default=600, help="optimizer steps")
    a("--batch_size", type=number(int, "[1, 65536]"), default=16,
      help="sequences per micro-batch, per process")
    a("--grad_accum", type=number(int, "[1, 65536]"), default=1,
      help="micro-batches per step over all processes")
    a("--lr", type=POSITIVE, default=1e-3, help="peak learning rate")
    a("--min_lr", type=NON_NEGATIVE, help="final learning rate (default lr / 10)")
    a("--warmup_iters", type=NATURAL, default=50, help="linear warm-up steps")
    a("--lr_decay_iters", type=COUNT, help="steps of the cosine decay (default max_iters)")
    a("--weight_decay", type=NON_NEGATIVE, default=0.1, help="AdamW weight decay, on matrices only")
    a("--beta2", type=number(float, "[0, 1)"), default=0.99, help="AdamW beta2 (beta1 is 0.9)")
    a("--grad_clip", type=NON_NEGATIVE, default=1.0, help="clip the gradient norm to this (0: off)")
    # SGT
    a("--sgt", type=number(float, "(0, 1]"), default=1.0, help="share of the targets supervised")
    a("--sgt_select", default=DEFAULT_SELECT, choices=["surprisal", "gradient", "excess"],
      help="surprisal: a draw tilted towards rare targets (score: unigram surprisal); gradient: "
           "towards the targets the model still gets wrong (score: 1 - p_y, from a head pass on "
           f"every position); excess: Rho-1's excess loss (default {DEFAULT_SELECT})")
    a("--sgt_beta", type=number(float, "[0, inf]"), default=DEFAULT_BETA,
      help=f"the tilt: P(pick) ~ score^beta; 0 uniform, inf a top-k (default {DEFAULT_BETA})")
    a("--sgt_mix", type=number(float, "[0, 1]"), default=DEFAULT_MIX,
      help=f"unweighted only: the share of the picks drawn uniformly (default {DEFAULT_MIX:.2f})")
    a("--sgt_weights", choices=["none", "inverse"],
      help="inverse: each pick's loss weighted by 1/pi, its inclusion probability: an unbiased "
           "estimate of the full loss for any tilt; none: the picks' plain mean (default "
           f"{DEFAULT_WEIGHTS} for a tilted draw, 0 < beta < inf and no mix; else none)")
    a("--sgt_floor", type=number(float, "[0, 1]"),
      help="mix this share of uniform weight into each sequence's draw weights: tames the inverse "
           f"weights (default {DEFAULT_FLOOR:g} with inverse weights, else 0)")
    a("--sgt_ref", help="excess: a reference model (any --init_from) instead of the unigram model")
    a("--shuffle_tokens", action="store_true", help="control: permute each window's tokens")
    # evaluation, logging, system
    a("--eval_interval", type=COUNT, default=100, help="evaluate and checkpoint every N steps")
    a("--eval_iters", type=number(int, "[1, 10000]"), default=10,
      help="held-out batches per evaluation")
    a("--log_interval", type=COUNT, default=10, help="print a progress line every this many steps")
    a("--seed", type=number(int, f"[0, {2**63 - 1}]"), default=1337, help="init, data, selection")
    a("--device", default="auto", help="cpu, cuda, cuda:N, mps (auto: cuda if there is one)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast precision (auto: bfloat16 on a GPU that has it, else float32)")
    a("--compile", action="store_true", help="torch.compile the model (needs a C++ compiler)")
    a("--grad_checkpoint", action="store_true", help="recompute activations: less memory")
    return p


def model_config(args, weights=None, source=None, **base):
    """The model's shape, decided here and nowhere else. A model from weights (their GPTConfig, from
    source) keeps its shape: a flag that says otherwise is refused; --dropout goes to its loader and
    --block_size may be shorter (training's windows). A fresh model takes each field from its flag,
    else from --preset, else from base (the data's vocabulary, a tool's shape), else GPTConfig's."""
    given = {k: getattr(args, k, None) for k in SHAPE_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if weights is None:
        return cherry.GPTConfig(**{**base, **cherry.PRESETS.get(args.preset, {}), **given})
    fixed = [k for k in given if k not in ("dropout", "block_size")]
    differ = [f"--{k}" for k in fixed if given[k] != getattr(weights, k)]
    if args.preset and not args.resume:  # a resumed run's --preset was compared with its own
        differ.append("--preset")
    if differ:
        raise ValueError(f"the model's shape comes from {source}; leave out {' '.join(differ)}")
    if given.get("block_size", 0) > weights.block_size:
        raise ValueError(f"--block_size {args.block_size} is longer than the model's "
                         f"{weights.block_size}")
    return weights


def data_vocabulary(meta):
    """A fresh model's vocabulary: the data's, its size padded to a multiple of 64 (faster)."""
    return dict(vocab_size=(meta["vocab_size"] + 63) // 64 * 64, vocab_id=data_prep.vocab_id(meta))


def describe(args):
    """What the run supervises, in words (the first line it prints)."""
    if args.sgt == 1:
        return "all targets"
    if args.sgt_select == "excess":
        return f"{args.sgt:.0%}: Rho-1's excess loss over {args.sgt_ref or 'the unigram model'}"
    score = "surprisal" if args.sgt_select == "surprisal" else "(1 - p_y)"
    text = f"{args.sgt:.0%}: drawn ~ {score}^{args.sgt_beta:g}"
    if args.sgt_beta == 0:
        text = f"{args.sgt:.0%}: drawn uniformly"
    if args.sgt_floor:
        text += f", floor {args.sgt_floor:g}"
    if args.sgt_mix:
        text += f", {args.sgt_mix:.0%} of them uniformly"
    weighting = "weighted by 1/pi (unbiased)" if args.sgt_weights == "inverse" else "plain mean"
    return f"{text}, {weighting}"


# ----------------------------------------------------------------------------
# devices

# (bf16, tf32)
PEAK_FLOPS = {"H100 PCIe": (756e12, 378e12), "H100": (989e12, 494e12), "H200": (989e12, 494e12),
              "B200": (2250e12, 1100e12), "A100": (312e12, 156e12), "L4": (121e12, 60e12),
              "RTX 4090": (165e12, 83e12)}


def peak_flops(device, dtype):
    """The GPU's dense tensor-core peak FLOP/s at this precision, or None where unknown (CPUs)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((peaks[dtype == "float32"] for key, peaks in PEAK_FLOPS.items()
                 if name and key in name), None)


def setup_device(args, distributed=False):
    """Device, autocast precision and context; a device, precision or compiler this machine lacks is
    refused."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if distributed and device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        kind, index = torch.device(device).type, torch.device(device).index or 0
    except RuntimeError:
        raise ValueError(f"unknown --device {args.device!r}; "
                         f"use cpu, cuda, cuda:N or mps") from None
    # meta holds no numbers; xpu, hpu, ...: devices this project never ran on
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {args.device}: this project runs on cpu, cuda, cuda:N or mps")
    if kind == "cuda" and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         f"CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: no Apple GPU (MPS) here")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and kind != "cuda":
        raise ValueError(f"--dtype float16 needs a CUDA GPU; on {kind} use float32 or bfloat16")
    if args.compile and not any(shutil.which(c)
                                for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        raise ValueError("--compile needs a C++ compiler (g++ or clang++) for torch.compile; "
                         "install one, or leave --compile out")
    if kind == "cuda":
        torch.cuda.set_device(index)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = contextlib.nullcontext()
    if dtype != "float32":
        ctx = torch.autocast(kind, dtype=getattr(torch, dtype))
    return device, kind, dtype, ctx


def available_memory(device):
    """Bytes free for this process: on a GPU what the driver reports free, on the CPU the kernel's
    MemAvailable; None where unknown (Apple's GPU, a system without /proc)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    return data_prep.available_ram() if device == "cpu" else None


def step_memory(config, args, dtype):
    """An estimate of a training run's peak memory in bytes, by part. Per parameter (counted from
    the shape, nothing built): fp32 weights, gradients and AdamW's two moments (16 bytes),
    autocast's low-precision copy (2), and under SGT the evaluation's gradient coupling (two
    gradients and their float64 sums, 40). Per token of a micro-batch and layer application: 20 fp32
    values of width C kept for backward (Korthikanti et al. 2022 count 17 with flash attention, no
    T x T scores; 20 measured on the CPU, where autocast keeps most in fp32 too), with
    --grad_checkpoint 2 plus 40 for the layer recomputed (measured); a mixture layer's MLP part
    (9 values) scaled by its capacity. Logits, their log-softmax, its gradient and a temporary in
    fp32 (16 bytes per token and vocabulary entry) over every position (evaluation and gamma run the
    full head even under SGT), again per MTP module. Token ids (int64 inputs and targets, built
    through a copy) of the global batch and of the held-out windows."""
    B, T, C, V = args.batch_size, args.block_size, config.n_embd, config.vocab_size
    L, E = len(config.applications()), max(1, config.n_expert)
    # the matrices (vectors are a rounding error): embeddings, attention 4C^2 and each expert's MLP
    # 8C^2 per layer, each application's LoRA, each MTP module's projection and block
    n_params = (V + config.block_size) * C + config.n_layer * (4 + 8 * E) * C * C + \
        config.mtp * 14 * C * C + L * config.lora_rank * (6 + 10 * E) * C
    per_layer = 20 + (9 * (config.capacity_factor * config.experts_per_token - 1)
                      if config.n_expert else 0)
    kept = (2 * L + 2 * per_layer) if args.grad_checkpoint else L * per_layer
    merged = L * 12 * C * C * 4 if config.lora_rank else 0  # each application's merged LoRA weights
    return {"weights and optimizer state": n_params * (16 + (2 if dtype != "float32" else 0) +
                                                       40 * (args.sgt < 1)),
            "activations": B * T * C * (kept + 20 * config.mtp) * 4 + merged,
            "logits": 16 * B * T * V * (1 + config.mtp),
            "training batches": 32 * B * args.grad_accum * (T + 1),
            "held-out windows": 32 * B * args.eval_iters * (T + 1)}


FEWER = {"weights and optimizer state": "use a smaller model (--preset, --n_layer, --n_embd)",
         "activations": "lower --batch_size (raising --grad_accum keeps the batch) or add "
                        "--grad_checkpoint",
         "logits": "lower --batch_size (raising --grad_accum keeps the batch) or --block_size",
         "training batches": "lower --grad_accum", "held-out windows": "lower --eval_iters"}


def check_memory(config, args, device, dtype):
    """Refuse in one line, before anything is allocated, a run whose estimated peak (step_memory)
    passes the memory this device has free, with the flag to change; returns the estimate."""
    free, parts = available_memory(device), step_memory(config, args, dtype)
    need = sum(parts.values()) * (int(os.environ.get("LOCAL_WORLD_SIZE", 1))
                                  if device == "cpu" else 1)
    largest = max(parts, key=parts.get)
    if free is not None and need > free:
        raise ValueError(f"this run needs about {need / 1e9:.1f} GB at its peak ({largest}: "
                         f"{parts[largest] / 1e9:.1f} GB), more than the {free / 1e9:.1f} GB "
                         f"free on {device}; {FEWER[largest]}")
    return need


# ----------------------------------------------------------------------------
# the run folder (never lost, never mixed, never shared) and the weights a run starts from

# what --resume may change: how long, how fast and where it runs; every other flag must be the
# run's own
FREE_ON_RESUME = ("resume", "out_dir", "max_iters", "lr", "min_lr", "warmup_iters",
                  "lr_decay_iters", "weight_decay", "beta2", "grad_clip", "eval_interval",
                  "log_interval", "device", "dtype", "compile", "grad_checkpoint")
# None: the model's
FROM_THE_MODEL = ("n_layer", "n_head", "n_embd", "vocab_size", "dropout", "bias")


def check_run_folder(args):
    """Before anything is written: a folder that holds a run (ckpt.pt, metrics.jsonl, summary.json)
    is continued only with --resume and the flags it was started with (a shape flag left out is the
    model's; --data is checked by its content, in train.py). Returns the checkpoint to resume, or
    None."""
    out = args.out_dir
    ckpt_path = os.path.join(out, "ckpt.pt")
    if not out or os.path.isfile(out):
        raise ValueError(f"--out_dir {out!r} is not a folder")
    found = [f for f in ("ckpt.pt", "metrics.jsonl", "summary.json")
             if os.path.exists(os.path.join(out, f))]
    if found and not args.resume:
        raise ValueError(f"--out_dir {out} already holds a run ({found[0]}); add --resume to "
                         f"continue it, or choose a new --out_dir")
    if not found:
        return None
    if "ckpt.pt" not in found:
        raise ValueError(f"--out_dir {out} has {found[0]} but no ckpt.pt to resume from; "
                         f"choose a new --out_dir")
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    keys = ("model", "config", "optimizer", "rng")
    if not isinstance(saved, dict) or any(k not in ckpt for k in keys):
        raise ValueError(f"{ckpt_path} cannot be resumed exactly; start a new --out_dir with "
                         f"--init_from {ckpt_path}")
    checkpoint.check_resume_fields(ckpt, ckpt_path)
    for k, now in vars(args).items():
        if k in FREE_ON_RESUME or k == "data" or k not in saved:
            continue
        was = saved[k]
        if k in FROM_THE_MODEL:
            was = ckpt["config"].get(k)
        if k == "block_size":
            was = was or ckpt["config"].get("block_size")
        if now is None and k in (*FROM_THE_MODEL, "block_size", "preset"):
            continue
        if now != was:
            raise ValueError(f"--resume: {ckpt_path} was started with --{k} {was}, not {now}; "
                             f"give the flags it was started with")
    return ckpt


@contextlib.contextmanager
def locked(out_dir):
    """Hold <out_dir>/.lock while training: a second training on the same folder is refused instead
    of racing."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        try:
            # the kernel releases it when the process ends
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out_dir {out_dir} is in use by another training; wait for it, "
                             f"or choose another") from None
        yield


class Interrupt:
    """SIGINT (Ctrl-C) or SIGTERM while training: the loop finishes its step, checkpoints it and
    stops. A second signal stops at once. Under torchrun the ranks could stop at different steps:
    not caught."""

    def __init__(self, enabled):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal = None

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM) if self.enabled else ()
        self.previous = {s: signal.signal(s, self.handle) for s in signals}
        return self

    def handle(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def save_json(obj, path, lines=False):
    """summary.json, or metrics.jsonl (lines=True, rewritten whole: never a half-written line)."""
    text = "".join(json.dumps(r) + "\n" for r in obj) if lines else json.dumps(obj, indent=2)
    data_prep.atomic_write(path, lambda f: f.write(text.encode()))


class NanWatch:
    """The first step whose loss was NaN or inf, kept on the device (no sync per step); checked
    before each progress line and each checkpoint, so a bad state is never saved."""

    def __init__(self, device, world, ckpt_path):
        self.first = torch.full((), 2**62, device=device)  # 2**62: no bad step yet
        self.world, self.ckpt_path = world, ckpt_path

    def record(self, loss, step):
        self.first = torch.where((self.first == 2**62) & ~torch.isfinite(loss), step, self.first)

    def check(self, saved):
        """saved: the step ckpt.pt holds, or None."""
        first = self.first.clone()
        if self.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() != 2**62:
            kept = "no checkpoint was written"
            if saved is not None:
                kept = f"{self.ckpt_path} still holds step {saved}, the last good state"
            raise ValueError(f"the loss became NaN or inf at step {int(first.item())}; "
                             f"stopped, {kept}. Lower --lr (or raise --warmup_iters), then "
                             f"continue with --resume")


def check_vocab(model, meta, source):
    """Weights whose ids mean other tokens than the data's are refused (an unknown vocabulary is let
    through)."""
    data_vocab = data_prep.vocab_id(meta)
    if model.config.vocab_id and model.config.vocab_id != data_vocab:
        raise ValueError(f"{source} was trained on the vocabulary {model.config.vocab_id!r}, "
                         f"the data's is {data_vocab!r}: its ids mean other tokens; prepare the "
                         f"data with the model's tokenizer")
    if model.config.vocab_size < meta["vocab_size"]:
        raise ValueError(f"{source} has {model.config.vocab_size} token ids, fewer than the data's "
                         f"{meta['vocab_size']}")
    return model


# ----------------------------------------------------------------------------
# where a script meets its user


def verdict(summary, rows):
    """The last line: where the run ended, against the unigram model (token frequencies alone)."""
    final, best, uni = summary["final"], summary["best"], summary["unigram_loss"]
    side = "below" if final["loss"] < uni else "ABOVE"
    return (f"done: held-out loss {final['loss']:.4f} ({abs(final['loss'] - uni):.3f} {side} the "
            f"unigram model's {uni:.4f}); best {best['loss']:.4f} at step {best['iter']}; "
            f"unsupervised targets {rows[0]['loss_unsup']:.3f} -> {final['loss_unsup']:.3f} -> "
            f"{summary['args']['out_dir']}")


def cli(main, prog, argv=None, interrupted=""):
    """Where a script meets its user: a mistake ends it with one line '<prog>: <what>' on stderr and
    exit status 1; so do running out of memory and Ctrl-C (then interrupted says what is left)."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:  # ours say what to do; OSError: a missing file, a full disk
        raise SystemExit(f"{prog}: "
                         f"{(str(e).strip() or type(e).__name__).splitlines()[0]}") from None
    except ImportError as e:
        raise SystemExit(f"{prog}: this needs the {e.name} package: pip install {e.name}") from None
    # torch's CPU allocator says it in a plain RuntimeError
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(s in str(e) for s in ("can't allocate memory",
                                                                         "out of memory")):
            raise  # a bug: its traceback is the report
        raise SystemExit(f"{prog}: out of memory; lower --batch_size or --block_size, or use a "
                         f"smaller model") from None
    except KeyboardInterrupt as e:  # train.py's says which step its checkpoint holds
        said = str(e) or "interrupted"
        raise SystemExit(f"{prog}: {said}" + (f"; {interrupted}" if interrupted else "")) from None
