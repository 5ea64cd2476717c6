"""
MoEE: fuse several compressed models of one shape into a Mixture of Efficient Experts, then train it (router
and all) with train.py's loop, optionally with multi-token prediction.

  python compress.py --init_from out-dense/ckpt.pt --data data/text --out_dir out-text    # expert A
  python compress.py --init_from out-dense/ckpt.pt --data data/code --out_dir out-code    # expert B
  python fuse.py --experts out-text/ckpt.pt out-code/ckpt.pt --data data/mix               # top-1, no MTP
  python fuse.py --experts out-text/ckpt.pt out-code/ckpt.pt --data data/mix --mtp 1 --out_dir out-fuse-mtp

Shared tensors (embeddings, attention, norms, step embeddings) are averaged over the experts; each expert's MLPs
become one expert of each mixture layer (cherry.fuse). The shape comes from the experts; every training flag is
train.py's. Writes what train.py writes into --out_dir (default out-fuse); summary.json adds total and active
parameters, each expert's held-out loss, the fused model's before training, and the share of held-out tokens
each expert gets in each layer. The held-out `loss` is next-token loss only (no MTP or router terms): the number
to compare with a single expert's.
"""

import os
import sys

import torch

import cherry
import train


def fuse_args():
    p = train.training_args()
    p.description = __doc__
    a = p.add_argument
    a("--experts", nargs="+", help="two or more models of one shape: anything --init_from of train.py takes")
    a("--init_from", default=None, help="instead of fusing: a fused model (fuse.py's ckpt.pt) to train on")
    a("--top_k", type=int, default=1, help="experts per token (1: active parameters ~ one expert)")
    a("--mtp", type=int, default=0, help="multi-token prediction depth D: extra modules predict tokens t+2 .. t+1+D")
    a("--mtp_weight", type=float, default=0.3, help="lambda in loss = L + lambda * mean(L_k)")
    a("--aux_weight", type=float, default=0.01, help="Switch load-balancing loss weight, per mixture-layer call")
    a("--z_weight", type=float, default=0.0, help="router z-loss weight (1e-3 is usual; 0: off)")
    p.set_defaults(out_dir="out-fuse", block_size=None, **{name: None for name in train.SHAPE_FLAGS})
    return p


@torch.no_grad()
def held_out_expert_load(model, x, batch_size):
    """Share of the tokens of x each expert gets, per layer (every application of an unrolled layer counted)."""
    model.eval()
    total = 0
    for i in range(0, len(x), batch_size):
        model.hidden(x[i:i + batch_size])  # the routers record their counts
        total = total + cherry.expert_counts(model)
    return (total / total.sum(dim=1, keepdim=True)).tolist()


def fuse_experts(p, args):
    """Load and fuse --experts; returns the fused model and what summary.json says of the fusion."""
    experts = [train.load_model(path, "fuse").eval() for path in args.experts]
    train.shape_flags_from_model(p, args, experts[0].config, "fuse")
    try:
        model = cherry.fuse(experts, args.top_k, args.mtp, mtp_weight=args.mtp_weight, aux_weight=args.aux_weight,
                            z_weight=args.z_weight)
    except ValueError as e:
        raise SystemExit(f"fuse: {e}")
    info = {"experts": args.experts, "params_expert": cherry.count_params(experts[0]),
            "loss_experts": [train.held_out_loss(args, m)["loss"] for m in experts]}
    for path, loss in zip(args.experts, info["loss_experts"]):
        print(f"held-out loss, expert {path}: {loss:.4f}")
    return model, info


def main(argv=None):
    p = fuse_args()
    args = p.parse_args(argv)
    if args.init_from is None and len(args.experts or []) < 2:
        raise SystemExit("fuse: give at least two --experts (or --init_from a fused model to train on)")
    if args.init_from is None and not 1 <= args.top_k <= len(args.experts):
        raise SystemExit(f"fuse: --top_k {args.top_k} must be between 1 and the {len(args.experts)} experts")
    if args.mtp < 0:
        raise SystemExit("fuse: --mtp must be at least 0")
    train.refuse_shape_flags(args, "fuse", "the experts")
    train.check_out_dir(args, "fuse")  # before loading anything; also refuses an --out_dir that holds an expert
    if args.init_from:  # a fused model trained on: its experts, top_k and MTP are its own
        model, info = train.load_model(args.init_from, "fuse"), {"init_from": args.init_from}
        if not model.config.n_expert:
            raise SystemExit(f"fuse: {args.init_from} is not a fused model; give --experts to fuse models")
        train.shape_flags_from_model(p, args, model.config, "fuse")
    else:
        model, info = fuse_experts(p, args)
    cfg = model.config
    info.update(n_expert=cfg.n_expert, top_k=cfg.top_k, mtp=cfg.mtp, params_total=cherry.count_params(model),
                params_active=cherry.count_params(model, active=True),
                training_flops_per_token=cherry.flops_per_token(cfg),
                forward_flops_per_token=cherry.flops_per_token(cfg, training=False),
                loss_start=train.held_out_loss(args, model)["loss"])
    print(f"MoEE of {cfg.n_expert} experts: {info['params_total']:,} parameters in all, {info['params_active']:,} active per "
          f"token (top-{cfg.top_k}{', MTP modules excluded' if cfg.mtp else ''}); held-out loss before training {info['loss_start']:.4f}")

    summary = train.train(args, model, summary_extra={"fuse": info})
    if int(os.environ.get("RANK", 0)) == 0:  # the trained model, as saved (with --resume train() built its own)
        trained = train.load_model(args.out_dir, "fuse").to(summary["device"])
        x, _ = train.Data(args.data, args.block_size).eval_batch(args.eval_iters * args.batch_size)
        summary["fuse"]["expert_load"] = held_out_expert_load(trained, x.to(summary["device"]), args.batch_size)
        print("held-out tokens per expert, by layer: " + "; ".join(" ".join(f"{f:.2f}" for f in layer)
                                                                  for layer in summary["fuse"]["expert_load"]))
        train.write_json(summary, os.path.join(args.out_dir, "summary.json"))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
