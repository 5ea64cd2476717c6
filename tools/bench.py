"""
Benchmark one training step of each model variant at one config (train.py's own optimizer_step): tokens/s, MFU where
the device's peak is known, peak memory, and the FLOPs per token each figure assumes; then the speed targets.

  python tools/bench.py                                  # CPU: 6 x 384, 6 heads, block 256, batch 8, fp32
  python tools/bench.py --dtype bfloat16                 # CPU autocast
  python tools/bench.py --nanogpt ../nanoGPT             # also nanoGPT's model.py (a checkout) at this config
  python tools/bench.py --preset gpt2 --batch_size 16 --block_size 1024 --compile   # GPU

Variants: dense; SGT 0.15 (the gathered head); compressed (a third of the layers, each run 3 times, LoRA 8); MoEE of
2 experts, top-1, at the dense model's shape (equal active parameters, plus the routers).
"""

import os
import resource
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cherry  # noqa: E402
import train  # noqa: E402
from tools import guards  # noqa: E402

TARGETS = [("MoEE / dense", "cpu", 0.9), ("MoEE / dense", "cuda", 0.8), ("SGT 0.15 / dense", "cuda", 1.25),
           ("dense MFU", "cuda", 0.45)]  # (figure, device, at least)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(dtype, device, n=20):
    """The device's speed on one MLP-sized matmul (2048 x 384 x 1536): what autocast can hope for."""
    a, b = torch.randn(2048, 384, dtype=dtype, device=device), torch.randn(384, 1536, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * 2048 * 384 * 1536 * n / (time.perf_counter() - t) / 1e9


def bench(model, sgt, args, device, dtype, ctx):
    """Tokens/s over args.steps optimizer steps after args.warmup untimed ones, and the peak memory in MB."""
    model.to(device)
    if args.compile:
        torch._dynamo.reset()  # forget the previous variant: its shapes would make this one compile for dynamic shapes
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 50257, (args.batch_size, args.block_size), generator=gen) for _ in range(2))
    selected = cherry.select_positions(y, sgt, gen) if sgt < 1 else None
    batch = [tuple(t.to(device) if t is not None else None for t in (x, y, selected))]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train.optimizer_step(model, optimizer, scaler, batch, ctx, 1.0)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        train.optimizer_step(model, optimizer, scaler, batch, ctx, 1.0)
    sync(device)
    tok_s = args.steps * args.batch_size * args.block_size / (time.perf_counter() - t)
    # on the CPU only the process's peak so far can be read (Linux: KiB)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return tok_s, peak


def main(argv=None):
    p = train.training_args("bench", __doc__)
    p.set_defaults(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8)
    p.add_argument("--steps", type=guards.COUNT, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=guards.NATURAL, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--nanogpt", help="path to a nanoGPT checkout: also time its model.py at this config")
    args = guards.parse_args(p, argv)
    train.fill_shape(args)
    device, kind, dtype, ctx = guards.setup_device(args)
    cfg = cherry.GPTConfig(**{k: getattr(args, k) for k in ("block_size", "n_layer", "n_head", "n_embd", "bias")},
                           vocab_size=args.vocab_size or 50304)
    where = torch.cuda.get_device_name(device) if kind == "cuda" else f"{os.cpu_count()} CPU threads"
    print(f"{where}, {dtype}, torch {torch.__version__}, {args.n_layer} x {args.n_embd}, {args.n_head} heads, block "
          f"{args.block_size}, batch {args.batch_size}; matmul 2048x384x1536: fp32 "
          f"{matmul_gflops(torch.float32, device):,.0f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16, device):,.0f} "
          f"GFLOP/s")
    k = max(1, args.n_layer // 3)
    unrolled = replace(cfg, n_layer=k, schedule=cherry.repeat_schedule([3] * k), step_embed=True, lora_rank=8)
    variants = {"dense": (cfg, 1.0), "SGT 0.15": (cfg, 0.15), f"compressed {k} layers x 3, LoRA 8": (unrolled, 1.0),
                "MoEE": (replace(cfg, n_expert=2), 1.0)}
    print("| step | tokens/s | MFU | peak memory (MB) | MFLOPs/token |\n| --- | --- | --- | --- | --- |")
    speed, mfu = {}, {}
    for name, (vcfg, sgt) in variants.items():
        torch.manual_seed(0)
        flops = cherry.flops_per_token(vcfg, sgt)
        speed[name], memory = bench(cherry.GPT(vcfg), sgt, args, device, dtype, ctx)
        peak = guards.peak_flops(device, dtype)
        mfu[name] = speed[name] * flops / peak if peak else None
        label = "MoEE: 2 experts, top-1, the dense shape" if name == "MoEE" else name
        print(f"| {label} | {speed[name]:,.0f} | {f'{mfu[name]:.1%}' if peak else '-'} | {memory:,.0f} | "
              f"{flops / 1e6:,.1f} |", flush=True)
    if args.nanogpt:
        sys.path.insert(0, args.nanogpt)
        import model as nanogpt
        ng = nanogpt.GPT(nanogpt.GPTConfig(block_size=args.block_size, vocab_size=cfg.vocab_size, n_layer=args.n_layer,
                                           n_head=args.n_head, n_embd=args.n_embd, dropout=0.0, bias=args.bias))
        tok_s, memory = bench(ng, 1.0, args, device, dtype, ctx)
        print(f"| nanoGPT dense | {tok_s:,.0f} | - | {memory:,.0f} | {cherry.flops_per_token(cfg) / 1e6:,.1f} |")
    ratios = {"MoEE / dense": speed["MoEE"] / speed["dense"], "SGT 0.15 / dense": speed["SGT 0.15"] / speed["dense"],
              "dense MFU": mfu["dense"]}
    for name, where, target in TARGETS:
        if where == kind and ratios[name] is not None:
            print(f"target on {where}: {name} >= {target:g}: {ratios[name]:.2f}, "
                  f"{'met' if ratios[name] >= target else 'MISSED'}")
    bound = cherry.flops_per_token(cfg) / cherry.flops_per_token(cfg, 0.15)
    print(f"matmul-FLOP ratio dense / SGT 0.15 at this config: {bound:.2f}x (the softmax's memory traffic on top)")


if __name__ == "__main__":
    guards.cli(main, "bench", interrupted="")
