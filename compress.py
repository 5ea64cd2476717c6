"""
Depth compression with recurrent recovery: average groups of adjacent layers of a dense GPT, then
train the compressed model, its few layers unrolled, to recover the loss (train.py's loop).

  python compress.py --layers 6              # out/ckpt.pt, 12 layers -> 6, unrolled 1,2,2,2,2,1
  python compress.py --layers 3 --unroll 1+1x4+1 --lora_rank 8 --out_dir out-compress-3
  python compress.py --init_from gpt2-xl --layers 6 --unroll 1,8,8,8,8,1   # 48 -> 6 (transformers)

--unroll: "1,8,8,8,8,1" runs compressed layer j n_j times in a row; "1+4x8+1" a prelude of 1, a
core of 4 looped 8 times and a coda of 1 (Huginn); "none" each layer once. Default: the ends once,
the middle layers group-size times. The shape comes from --init_from, the training flags are
train.py's; summary.json adds the sizes and FLOPs before and after, and the held-out losses.
"""

import os
import re

import checkpoint
import cherry
import train
import guards


def parse_unroll(text, layers):
    """--unroll -> the schedule (the layer of each application); None when it is not given."""
    if text is None:
        return None
    if text == "none":
        return tuple(range(layers))
    loop = re.fullmatch(r"(\d+)\+(\d+)x(\d+)\+(\d+)", text)
    if loop:
        prelude, core, loops, coda = map(int, loop.groups())
        if prelude + core + coda != layers or core < 1 or not 1 <= loops <= 64:
            raise ValueError(f"--unroll {text}: prelude + core + coda must be the {layers} "
                             f"layers, core at least 1, loops 1 to 64")
        return cherry.loop_schedule(prelude, core, coda, loops)
    repeats = [int(n) for n in text.split(",")] if re.fullmatch(r"\d+(,\d+)*", text) else None
    if repeats is None or len(repeats) != layers or not all(1 <= n <= 64 for n in repeats):
        raise ValueError(f"--unroll {text!r}: give {layers} counts from 1 to 64 (e.g. "
                         f"1,8,8,8,8,1), P+CxL+D (e.g. 1+4x8+1) or none")
    return cherry.repeat_schedule(repeats)


def main(argv=None):
    p = guards.training_args("compress", __doc__)
    a = p.add_argument
    a("--init_from", default=os.path.join("out", "ckpt.pt"), help="the dense model to compress")
    a("--layers", type=guards.COUNT, default=6, help="layers after; must divide the model's")
    a("--unroll", help="the compressed layers' schedule: n_1,...,n_k | P+CxL+D | none (see above)")
    a("--lora_rank", type=guards.NATURAL, default=0, help="LoRA rank per application (from SVD)")
    a("--no_step_embed", action="store_true", help="no step embedding per application")
    a("--coda_from", choices=["last", "first"], default="last",
      help="the last layer's LoRA residue: its group's last (the original's final) or first")
    a("--distill", type=guards.number(float, "[0, 1]"), default=0.0,
      help="weight of the KL to --init_from's next-token distribution (0: cross-entropy only)")
    a("--distill_temp", type=guards.POSITIVE, default=1.0, help="the distillation KL's temperature")
    a("--distill_hidden", type=guards.NON_NEGATIVE, default=0.0,
      help="weight of a loss on each application's output against its teacher layer's")
    p.set_defaults(out_dir="out-compress")
    args = guards.parse_args(p, argv)
    schedule = parse_unroll(args.unroll, args.layers)  # said before anything is loaded
    distill = args.distill > 0 or args.distill_hidden > 0
    if distill and args.sgt < 1:
        raise ValueError("--distill and --distill_hidden supervise every position; leave out --sgt")
    if args.distill_hidden and schedule is not None and list(schedule) != sorted(schedule):
        raise ValueError(f"--distill_hidden needs each layer's applications in a row (--unroll "
                         f"n_1,...,n_k), not a loop ({args.unroll})")
    if os.path.abspath(checkpoint.ckpt_path(args.init_from)) == os.path.abspath(
            os.path.join(args.out_dir, "ckpt.pt")):
        raise ValueError(f"--out_dir {args.out_dir} would overwrite the model it compresses; "
                         f"choose another --out_dir")
    guards.check_run_folder(args)  # before loading what may be a large model
    # the teacher: the model compressed, and the one distilled from
    teacher = checkpoint.load_model(args.init_from, dropout=args.dropout).eval()
    cfg = guards.model_config(args, teacher.config, "--init_from")
    if cfg.schedule is not None or cfg.lora_rank or cfg.step_embed or cfg.n_expert:
        raise ValueError(f"{args.init_from} is already compressed or fused; give a dense model")
    if cfg.n_layer % args.layers:
        divisors = ", ".join(str(k) for k in range(1, cfg.n_layer + 1) if cfg.n_layer % k == 0)
        raise ValueError(f"--layers {args.layers} does not divide the model's {cfg.n_layer} "
                         f"layers into equal groups; use one of {divisors}")
    if schedule is None:  # the paper's form: the ends once, the middle layers group-size times
        schedule = cherry.paper_schedule(cfg.n_layer, args.layers)
    model = cherry.compress(teacher, args.layers, schedule, not args.no_step_embed,
                            args.lora_rank, coda_from_end=args.coda_from == "last")

    counts = lambda m: {"params": cherry.count_params(m),  # noqa: E731
                        "training_flops_per_token": cherry.flops_per_token(m.config),
                        "forward_flops_per_token": cherry.flops_per_token(m.config, training=False)}
    apps, before, after = model.applications, counts(teacher), counts(model)
    info = {"init_from": args.init_from, "layers_before": cfg.n_layer, "layers": args.layers,
            "lora": args.lora_rank, "schedule": apps, "effective_layers": len(apps),
            "before": before, "after": after}
    flops = [c["forward_flops_per_token"] / 1e6 for c in (before, after)]
    print(f"{cfg.n_layer} -> {args.layers} layers, run as {apps}; parameters {before['params']:,} "
          f"-> {after['params']:,}; forward MFLOPs per token {flops[0]:.1f} -> {flops[1]:.1f}")
    # on the held-out windows of every evaluation: each averaged layer run once, unrolled (step
    # embeddings still zero), and the model that recovery starts from (with its LoRA)
    stages = {"original": teacher,
              "averaged": cherry.compress(teacher, args.layers, tuple(range(args.layers)), False),
              "unrolled": cherry.compress(teacher, args.layers, apps, False),
              "start": model}
    for name, m in stages.items():
        info[f"loss_{name}"] = train.held_out_loss(args, m)["loss"]
        print(f"held-out loss, {name:8s}: {info[f'loss_{name}']:.4f}")
    if distill:  # the teacher stays, frozen (on --resume it is loaded again from --init_from)
        teacher_flops = cherry.flops_per_token(cfg, float(args.distill > 0), False)
        info["distill"] = {"weight": args.distill, "temperature": args.distill_temp,
                           "hidden": args.distill_hidden, "teacher_flops_per_token": teacher_flops}
    teacher = teacher if distill else None
    del stages
    return train.train(args, model, summary_extra={"compress": info}, teacher=teacher)


if __name__ == "__main__":
    guards.cli(main, "compress")
