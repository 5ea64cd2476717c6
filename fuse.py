"""
MoEE: fuse several compressed models of one shape into a Mixture of Efficient Experts, then train
it (routers and all) with train.py's loop, optionally with multi-token prediction.

  python compress.py --layers 6 --data data/code --out_dir out-compress-code   # a second expert
  python fuse.py --experts out-compress out-compress-code --data data/shakespeare+code
  python fuse.py --experts out-compress out-compress-code --data data/shakespeare+code --mtp 1 \\
      --out_dir out-fuse-mtp
  python fuse.py --init_from out-fuse --data data/shakespeare+code --out_dir out-fuse-more  # more

Shared tensors (embeddings, attention, norms, step embeddings) are averaged over the experts; each
expert's MLPs become one expert of each mixture layer (cherry.fuse). The shape comes from the
experts; every training flag is train.py's. Writes what train.py writes into --out_dir;
summary.json adds total and active parameters, each expert's held-out loss, the fused model's
before training and, after it, the share of the held-out tokens each expert gets in each layer.
The held-out `loss` is the next-token loss only (no MTP or router terms): the number to compare
with a single expert's.
"""

import checkpoint
import cherry
import train
import guards

MOE_FLAGS = ("experts_per_token", "mtp", "capacity_factor", "mtp_weight", "aux_weight", "z_weight")


def main(argv=None):
    p = guards.training_args("fuse", __doc__)
    a = p.add_argument
    a("--experts", nargs="+",
      help="models of one shape (anything train.py --init_from takes); a mixture of one expert is "
           "that expert, with a router of one output")
    a("--init_from",
      help="instead of fusing: a fused model (fuse.py's ckpt.pt) to train on, with its own "
           "settings")
    d = cherry.GPTConfig  # the mixture's settings: None is GPTConfig's default, or a fused model's
    a("--experts_per_token", type=guards.COUNT,
      help=f"experts each token goes to (default {d.experts_per_token}: active ~ one expert)")
    a("--capacity_factor", type=guards.POSITIVE,
      help=f"in training an expert takes at most this x its fair share of the tokens; the rest "
           f"pass through (default {d.capacity_factor})")
    a("--mtp", type=guards.number(int, "[0, 16]"),
      help=f"multi-token prediction depth D: t+2 .. t+1+D (default {d.mtp})")
    a("--mtp_weight", type=guards.NON_NEGATIVE,
      help=f"lambda in loss = L + lambda * mean(L_k) (default {d.mtp_weight})")
    a("--aux_weight", type=guards.NON_NEGATIVE,
      help=f"Switch load-balancing loss, per mixture-layer call (default {d.aux_weight})")
    a("--z_weight", type=guards.NON_NEGATIVE,
      help=f"router z-loss (1e-3 is usual; default {d.z_weight}: off)")
    p.set_defaults(out_dir="out-fuse")
    args = guards.parse_args(p, argv)
    moe = {k: getattr(args, k) for k in MOE_FLAGS if getattr(args, k) is not None}
    if bool(args.init_from) == bool(args.experts):
        raise ValueError("give --experts to fuse, or --init_from a fused model to train on, "
                         "not both")
    if args.experts and moe.get("experts_per_token", 1) > len(args.experts):
        raise ValueError(f"--experts_per_token {moe['experts_per_token']} is more than the "
                         f"{len(args.experts)} experts")
    guards.check_run_folder(args)  # before loading anything
    if args.init_from:
        experts, model = [], checkpoint.load_model(args.init_from, dropout=args.dropout)
        if not model.config.n_expert:
            raise ValueError(f"{args.init_from} is not a fused model; give --experts to fuse "
                             f"models")
        differ = [f"--{k}" for k, v in moe.items() if v != getattr(model.config, k)]
        if differ:
            raise ValueError(f"{args.init_from} has its own mixture settings; leave out "
                             f"{' '.join(differ)}")
    else:
        experts = [checkpoint.load_model(path, dropout=args.dropout).eval()
                   for path in args.experts]
        model = cherry.fuse(experts, **moe)
    cfg = guards.model_config(args, model.config, "the experts")
    info = {"experts": args.experts, "init_from": args.init_from, "n_expert": cfg.n_expert,
            "mtp": cfg.mtp, "experts_per_token": cfg.experts_per_token,
            "params_total": cherry.count_params(model),
            "params_active": cherry.count_params(model, active=True),
            "flops_per_token": cherry.flops_per_token(cfg),
            "loss_experts": [train.held_out_loss(args, m)["loss"] for m in experts],
            "loss_start": train.held_out_loss(args, model)["loss"]}
    for path, loss in zip(args.experts or [], info["loss_experts"]):
        print(f"held-out loss, expert {path}: {loss:.4f}")
    print(f"MoEE of {cfg.n_expert} experts: {info['params_total']:,} parameters in all, "
          f"{info['params_active']:,} active per token (top-{cfg.experts_per_token}); held-out "
          f"loss before training {info['loss_start']:.4f}")
    del experts
    return train.train(args, model, summary_extra={"fuse": info})


if __name__ == "__main__":
    guards.cli(main, "fuse")
