"""
Benchmark one training step of each model variant at one config: tokens/s, MFU where the device's peak is
known, peak memory, and the FLOPs per token each figure assumes. The step is train.py's own optimizer_step.

  python tools/bench.py                                  # CPU: 6 x 384, 6 heads, block 256, batch 8, fp32
  python tools/bench.py --dtype bfloat16                 # CPU autocast
  python tools/bench.py --nanogpt ../nanoGPT             # also time nanoGPT's model.py (a checkout) at this config
  python tools/bench.py --preset gpt2 --batch_size 16 --block_size 1024 --compile   # GPU
"""

import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cherry  # noqa: E402
import train  # noqa: E402


def matmul_gflops(dtype, device, n=20):
    """The device's speed on one MLP-sized matmul (2048 x 384 x 1536): what autocast can hope for."""
    a = torch.randn(2048, 384, dtype=dtype, device=device)
    b = torch.randn(384, 1536, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * 2048 * 384 * 1536 * n / (time.perf_counter() - t) / 1e9


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # the process's peak so far (Linux: KiB)


def bench(name, model, sgt, args, device, dtype, ctx, flops):
    """Time args.steps optimizer steps after warm-up; returns a printable row."""
    model.to(device)
    if args.compile:
        torch._dynamo.reset()  # forget the previous variant: its shapes would make this one compile for dynamic shapes
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (args.batch_size, args.block_size), generator=gen)
    y = torch.randint(0, 50257, (args.batch_size, args.block_size), generator=gen)
    select = cherry.select_tokens(y, sgt, "random", generator=gen) if sgt < 1 else None
    batch = [tuple(t.to(device) if t is not None else None for t in (x, y, select))]
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
    peak = train.peak_flops(device, dtype)
    mfu = f"{tok_s * flops / peak:.1%}" if peak else "-"
    return f"| {name} | {tok_s:,.0f} | {mfu} | {peak_memory_mb(device):,.0f} | {flops / 1e6:,.1f} |"


def main():
    p = train.training_args()
    p.set_defaults(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--nanogpt", help="path to a nanoGPT checkout: also time its model.py at this config")
    args = train.parse_args(p)
    _, _, device, device_type, dtype, ctx = train.setup_device(args)
    cfg = cherry.GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size or 50304, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, bias=args.bias)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device_type == 'cuda' else os.cpu_count()} "
          f"{'' if device_type == 'cuda' else 'CPU threads'}), {dtype}, torch {torch.__version__}, "
          f"{args.n_layer} x {args.n_embd}, {args.n_head} heads, block {args.block_size}, batch {args.batch_size}")
    print(f"matmul 2048x384x1536: fp32 {matmul_gflops(torch.float32, device):,.0f} GFLOP/s, "
          f"bf16 {matmul_gflops(torch.bfloat16, device):,.0f} GFLOP/s")
    print("| step | tokens/s | MFU | peak memory (MB) | MFLOPs/token |\n| --- | --- | --- | --- | --- |")
    # compressed-unrolled: a third of the layers, each run 3 times (the dense model's depth), step embeddings, LoRA 8
    k = max(1, args.n_layer // 3)
    unrolled = cherry.GPTConfig(**{**cfg.to_dict(), "n_layer": k, "schedule": cherry.repeat_schedule([3] * k),
                                   "step_embed": True, "lora_rank": 8})
    # MoEE: two such experts, top-1, without LoRA (torch.compile falls back to eager for a whole application
    # when the experts' eager dispatch sits inside LoRA's functional_call)
    moee = cherry.GPTConfig(**{**unrolled.to_dict(), "n_expert": 2, "top_k": 1, "lora_rank": 0})
    variants = [("dense", cfg, 1.0), ("SGT 0.15", cfg, 0.15), (f"unrolled {k} layers x 3, LoRA 8", unrolled, 1.0),
                (f"MoEE 2 x ({k} layers x 3), top-1", moee, 1.0)]
    for name, vcfg, sgt in variants:
        torch.manual_seed(0)
        print(bench(name, cherry.GPT(vcfg), sgt, args, device, dtype, ctx, cherry.flops_per_token(vcfg, sgt)), flush=True)
    if args.nanogpt:
        sys.path.insert(0, args.nanogpt)
        import model as nanogpt
        ng = nanogpt.GPT(nanogpt.GPTConfig(block_size=args.block_size, vocab_size=cfg.vocab_size, n_layer=args.n_layer,
                                           n_head=args.n_head, n_embd=args.n_embd, dropout=0.0, bias=args.bias))
        print(bench("nanoGPT dense", ng, 1.0, args, device, dtype, ctx, cherry.flops_per_token(cfg)))
    dense, sgt = cherry.flops_per_token(cfg), cherry.flops_per_token(cfg, 0.15)
    print(f"matmul-FLOP ratio dense / SGT 0.15 at this config: {dense / sgt:.2f}x (the softmax and its memory traffic come on top)")


if __name__ == "__main__":
    main()
