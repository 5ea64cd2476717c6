"""
Benchmark one training step of each model variant at one config (train.py's own optimizer_step):
tokens/s, MFU where the device's peak is known, peak memory, and the FLOPs per token each figure
assumes; then the speed targets.

  python -m tools.bench                        # CPU: 6 x 384, 6 heads, block 256, batch 8, fp32
  python -m tools.bench --dtype bfloat16       # CPU autocast
  python -m tools.bench --nanogpt ../nanoGPT   # also nanoGPT's model.py (a checkout) at this config
  python -m tools.bench --preset gpt2 --batch_size 16 --block_size 1024 --compile   # GPU

Variants: dense; SGT 0.15 drawn on the CPU (the gathered head); SGT 0.15 as train.py's default draws
it (gradient: a head pass without gradient on every position first); compressed (a third of the
layers, each run 3 times, LoRA 8); MoEE of 2 experts, top-1, at the dense model's shape (equal
active parameters, plus the routers).
"""

import argparse
import importlib.util
import os
import resource
import time
from dataclasses import replace

import torch

import cherry
import guards
import train

# bench's own, under a preset and the flags
SHAPE = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
# (figure, device, at least)
TARGETS = [("MoEE / dense", "cpu", 0.9), ("MoEE / dense", "cuda", 0.8),
           ("SGT 0.15 / dense", "cuda", 1.25), ("dense MFU", "cuda", 0.45)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(dtype, device, n=20):
    """The device's speed on one MLP-sized matmul (2048 x 384 x 1536):
    what autocast can hope for."""
    a, b = (torch.randn(2048, 384, dtype=dtype, device=device),
            torch.randn(384, 1536, dtype=dtype, device=device))
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * 2048 * 384 * 1536 * n / (time.perf_counter() - t) / 1e9


def bench(model, sgt, args, device, dtype, ctx, select="uniform"):
    """Tokens/s over args.steps optimizer steps after args.warmup untimed ones, and the peak memory
    in MB. The windows are the model's block_size long. select "default": SGT's picks as train.py's
    default selector makes them (gradient: inside the forward), else a uniform draw
    before the step."""
    T = model.config.block_size
    model.to(device)
    if args.compile:
        # forget the previous variant: its shapes would make this one compile for dynamic shapes
        torch._dynamo.reset()
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 50257, (args.batch_size, T), generator=gen) for _ in range(2))
    sgt_args = {"positions": cherry.select_positions(y, sgt, gen)[0].to(device)} if sgt < 1 else {}
    if sgt < 1 and select == "default":  # train.py's own selector, with its default flags
        flags = guards.parse_args(guards.training_args("bench", ""),
                                  ["--sgt", str(sgt), "--device", device])
        meta = {"unigram_counts": {}, "vocab_size": model.config.vocab_size}
        selector = train.Selector(flags, meta, device)
        sgt_args = selector.draw(y) or {"choose": selector.chooser(x.to(device), y.to(device), gen)}
    batch = [(x.to(device), y.to(device), sgt_args)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train.optimizer_step(model, optimizer, scaler, batch, ctx, 1.0)
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        train.optimizer_step(model, optimizer, scaler, batch, ctx, 1.0)
    sync(device)
    tok_s = args.steps * args.batch_size * T / (time.perf_counter() - t)
    # on the CPU only the process's peak so far can be read (Linux: KiB)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return tok_s, peak


def main(argv=None):
    p = guards.Parser(prog="bench", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(cherry.PRESETS), help="a named shape; the shape flags override it")
    a("--n_layer", type=guards.number(int, f"[1, {cherry.MAX_DEPTH}]"),
      help=f"layers (default {SHAPE['n_layer']})")
    a("--n_head", type=guards.COUNT, help=f"attention heads (default {SHAPE['n_head']})")
    a("--n_embd", type=guards.COUNT, help=f"residual width (default {SHAPE['n_embd']})")
    a("--block_size", type=guards.COUNT,
      help=f"tokens per sequence (default {SHAPE['block_size']})")
    a("--vocab_size", type=guards.COUNT,
      help=f"model vocabulary (default {cherry.GPTConfig.vocab_size})")
    a("--bias", action="store_true", default=None, help="biases in linears and LayerNorms")
    a("--batch_size", type=guards.COUNT, default=8, help="sequences per step")
    a("--device", default="auto", help="cpu, cuda, cuda:N, mps (auto: cuda if there is one)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="autocast precision (auto: bfloat16 on a GPU that has it, else float32)")
    a("--compile", action="store_true", help="torch.compile each variant (needs a C++ compiler)")
    a("--steps", type=guards.COUNT, default=5, help="timed steps per variant")
    a("--warmup", type=guards.NATURAL, default=2,
      help="untimed steps first (compilation, allocator)")
    a("--nanogpt", help="path to a nanoGPT checkout: also time its model.py at this config")
    args = guards.parse_args(p, argv)
    device, kind, dtype, ctx = guards.setup_device(args)
    cfg = guards.model_config(args, **SHAPE)  # flags, then the preset, then bench's own shape
    where = (torch.cuda.get_device_name(device) if kind == "cuda" else
             f"{os.cpu_count()} CPU threads")
    print(f"{where}, {dtype}, torch {torch.__version__}, {cfg.n_layer} x {cfg.n_embd}, "
          f"{cfg.n_head} heads, block {cfg.block_size}, batch {args.batch_size}; "
          f"matmul 2048x384x1536: fp32 {matmul_gflops(torch.float32, device):,.0f} GFLOP/s, "
          f"bf16 {matmul_gflops(torch.bfloat16, device):,.0f} GFLOP/s")
    # a preset may hold them
    dense = replace(cfg, schedule=None, step_embed=False, lora_rank=0, n_expert=0)
    layers = max(1, cfg.n_layer // 3)
    unrolled = replace(dense, n_layer=layers, schedule=cherry.repeat_schedule([3] * layers),
                       step_embed=True, lora_rank=8)
    variants = {"dense": (dense, 1.0, None), "SGT 0.15": (dense, 0.15, "uniform"),
                f"SGT 0.15, {guards.DEFAULT_SELECT} (the default)": (dense, 0.15, "default"),
                f"compressed {layers} layers x 3, LoRA 8": (unrolled, 1.0, None),
                "MoEE": (replace(dense, n_expert=2), 1.0, None)}
    print("| step | tokens/s | MFU | peak memory (MB) | MFLOPs/token |\n"
          "| --- | --- | --- | --- | --- |")
    speed, mfu = {}, {}
    for name, (vcfg, sgt, select) in variants.items():
        torch.manual_seed(0)
        # a head pass on every position
        in_forward = select == "default" and guards.DEFAULT_SELECT != "surprisal"
        flops = cherry.flops_per_token(vcfg, sgt, full_head_forward=in_forward)
        speed[name], memory = bench(cherry.GPT(vcfg), sgt, args, device, dtype, ctx, select)
        peak = guards.peak_flops(device, dtype)
        mfu[name] = speed[name] * flops / peak if peak else None
        label = "MoEE: 2 experts, top-1, the dense shape" if name == "MoEE" else name
        print(f"| {label} | {speed[name]:,.0f} | {f'{mfu[name]:.1%}' if peak else '-'} | "
              f"{memory:,.0f} | {flops / 1e6:,.1f} |", flush=True)
    if args.nanogpt:
        spec = importlib.util.spec_from_file_location("nanogpt",
                                                      os.path.join(args.nanogpt, "model.py"))
        nanogpt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nanogpt)
        ng = nanogpt.GPT(nanogpt.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                                           n_layer=cfg.n_layer, n_head=cfg.n_head,
                                           n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias))
        tok_s, memory = bench(ng, 1.0, args, device, dtype, ctx)
        print(f"| nanoGPT dense | {tok_s:,.0f} | - | {memory:,.0f} | "
              f"{cherry.flops_per_token(dense) / 1e6:,.1f} |")
    ratios = {"MoEE / dense": speed["MoEE"] / speed["dense"],
              "SGT 0.15 / dense": speed["SGT 0.15"] / speed["dense"], "dense MFU": mfu["dense"]}
    for name, where, target in TARGETS:
        if where == kind and ratios[name] is not None:
            print(f"target on {where}: {name} >= {target:g}: {ratios[name]:.2f}, "
                  f"{'met' if ratios[name] >= target else 'MISSED'}")
    bound = cherry.flops_per_token(dense) / cherry.flops_per_token(dense, 0.15)
    print(f"matmul-FLOP ratio dense / SGT 0.15 at this config: {bound:.2f}x "
          f"(the softmax's memory traffic on top)")


if __name__ == "__main__":
    guards.cli(main, "bench", interrupted="")
