"""
Depth compression with recurrent recovery: average groups of adjacent layers of a dense GPT, then train the
compressed model, its few layers unrolled, to recover the loss.

  python train.py --n_layer 12 --out_dir out-dense                  # a dense model to compress
  python compress.py --init_from out-dense/ckpt.pt --layers 6       # 12 -> 6 layers, unrolled 1,2,2,2,2,1
  python compress.py --init_from out-dense/ckpt.pt --layers 3 --unroll 1+1x4+1 --lora_rank 8
  python compress.py --init_from gpt2-xl --layers 6 --unroll 1,8,8,8,8,1   # the paper's 48 -> 6 (needs transformers)

--init_from: a ckpt.pt of this project or of nanoGPT, a Hugging Face GPT-2 folder, or gpt2 / gpt2-medium / gpt2-large /
             gpt2-xl (through transformers); see cherry.GPT.from_pretrained.
--unroll:    "1,8,8,8,8,1" runs compressed layer j n_j times in a row; "1+4x8+1" runs a prelude of 1 layer,
             a core of 4 layers looped 8 times, a coda of 1 layer (Huginn); "none" runs each layer once.
             Default: the two ends once, the middle layers group-size times (1,8,8,8,8,1 for 48 -> 6).
The model's shape comes from the checkpoint; every training flag is train.py's. Writes what train.py writes
into --out_dir (default out-compress); summary.json adds the original and compressed models' parameters,
effective layers and FLOPs per token, and the held-out loss right after averaging.
"""

import os
import re
import sys

import cherry
import train


def compress_args():
    p = train.training_args()
    p.description = __doc__
    a = p.add_argument
    a("--init_from", default=os.path.join("out", "ckpt.pt"), help="the dense model: a ckpt.pt (this project's or nanoGPT's), a Hugging Face GPT-2 folder, or a GPT-2 name")
    a("--layers", type=int, default=6, help="layers after compression; must divide the original number")
    a("--unroll", default=None, help="schedule of the compressed layers: n_1,...,n_k | P+CxL+D | none (see above)")
    a("--lora_rank", type=int, default=0, help="rank of each application's LoRA, set from the SVD of (original - mean); 0: none")
    a("--no_step_embed", action="store_true", help="no per-application step embedding")
    # the model's shape comes from the checkpoint; block_size defaults to the checkpoint's
    p.set_defaults(out_dir="out-compress", block_size=None, **{name: None for name in train.SHAPE_FLAGS})
    return p


# ----------------------------------------------------------------------------
# the unroll schedule


def parse_unroll(text, k):
    """--unroll -> the schedule (layer index per application); None keeps cherry.compress's default."""
    if text is None:
        return None
    if text == "none":
        return tuple(range(k))
    loop = re.fullmatch(r"(\d+)\+(\d+)x(\d+)\+(\d+)", text)
    if loop:
        prelude, core, loops, coda = map(int, loop.groups())
        if prelude + core + coda != k or core < 1 or loops < 1:
            raise SystemExit(f"compress: --unroll {text}: prelude + core + coda must be the {k} layers, core and loops at least 1")
        return cherry.loop_schedule(prelude, core, coda, loops)
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise SystemExit(f"compress: --unroll {text!r}: give n_1,...,n_k (e.g. 1,8,8,8,8,1), P+CxL+D (e.g. 1+4x8+1) or none")
    repeats = [int(n) for n in text.split(",")]
    if len(repeats) != k or min(repeats) < 1:
        raise SystemExit(f"compress: --unroll {text}: need {k} counts (one per compressed layer), each at least 1")
    return cherry.repeat_schedule(repeats)


# ----------------------------------------------------------------------------


def main(argv=None):
    p = compress_args()
    args = p.parse_args(argv)
    train.refuse_shape_flags(args, "compress", "--init_from")
    source = os.path.join(args.init_from, "ckpt.pt") if os.path.isdir(args.init_from) else args.init_from
    if os.path.abspath(os.path.join(args.out_dir, "ckpt.pt")) == os.path.abspath(source):
        raise SystemExit(f"compress: --out_dir {args.out_dir} would overwrite the model it compresses; choose another --out_dir")
    train.check_out_dir(args, "compress")  # before loading what may be a large model
    teacher = train.load_model(args.init_from, "compress").eval()
    cfg = teacher.config
    if cfg.schedule is not None or cfg.lora_rank or cfg.step_embed:
        raise SystemExit(f"compress: {args.init_from} is already compressed; give a dense model")
    train.shape_flags_from_model(p, args, cfg, "compress")
    if not 1 <= args.layers <= cfg.n_layer or cfg.n_layer % args.layers:
        divisors = [k for k in range(1, cfg.n_layer + 1) if cfg.n_layer % k == 0]
        raise SystemExit(f"compress: --layers {args.layers} does not divide the model's {cfg.n_layer} layers into equal groups; "
                         f"use one of {', '.join(map(str, divisors))}")
    if args.lora_rank < 0:
        raise SystemExit("compress: --lora_rank must be at least 0")
    schedule = parse_unroll(args.unroll, args.layers)

    model = cherry.compress(teacher, args.layers, schedule, step_embed=not args.no_step_embed, lora_rank=args.lora_rank)
    schedule = model.schedule
    averaged = cherry.compress(teacher, args.layers, tuple(range(args.layers)), step_embed=False)  # no unroll
    unrolled = cherry.compress(teacher, args.layers, schedule, step_embed=False)  # unroll, nothing learned yet
    count = lambda m: {"params": cherry.count_params(m), "forward_flops_per_token": cherry.flops_per_token(m.config, training=False),
                       "training_flops_per_token": cherry.flops_per_token(m.config)}
    info = {"init_from": args.init_from, "layers_before": cfg.n_layer, "layers": args.layers, "schedule": list(schedule),
            "effective_layers": len(schedule), "step_embed": model.step_embed is not None, "lora_rank": args.lora_rank,
            "before": count(teacher), "after": count(model)}
    print(f"compressing {args.init_from}: {cfg.n_layer} -> {args.layers} layers, schedule {schedule} "
          f"({len(schedule)} effective layers), step embeddings {'on' if info['step_embed'] else 'off'}, LoRA rank {args.lora_rank}")
    print(f"parameters {info['before']['params']:,} -> {info['after']['params']:,}; forward FLOPs per token "
          f"{info['before']['forward_flops_per_token'] / 1e6:.1f}M -> {info['after']['forward_flops_per_token'] / 1e6:.1f}M "
          f"(unrolling saves parameters, not compute)")
    # held-out loss on the windows every evaluation of train() uses. Without an unroll the unrolled model is the
    # averaged one; without LoRA the model to train is the unrolled one (its step embeddings start at zero).
    held_out = lambda m: train.held_out_loss(args, m)["loss"]
    info["loss_original"], info["loss_averaged"] = held_out(teacher), held_out(averaged)
    info["loss_unrolled"] = info["loss_averaged"] if schedule == tuple(range(args.layers)) else held_out(unrolled)
    info["loss_start"] = held_out(model) if args.lora_rank else info["loss_unrolled"]
    for name in ("original", "averaged", "unrolled", "start"):
        print(f"held-out loss, {name:8s}: {info[f'loss_{name}']:.4f}")
    del teacher, averaged, unrolled
    return train.train(args, model, summary_extra={"compress": info})


if __name__ == "__main__":
    main(sys.argv[1:])
