"""
Sample text from a model: any checkpoint train.py, compress.py or fuse.py wrote, nanoGPT's, or
GPT-2's weights. Generation runs through the KV cache; the text goes through the tokenizer of the
data the model was trained on.

  python -m tools.sample                                    # out/ckpt.pt, with its data's tokenizer
  python -m tools.sample --init_from out-korean --prompt "대한민국" --max_new_tokens 100
  python -m tools.sample --init_from gpt2 --prompt "The meaning of life is"     # needs transformers

The tokenizer: --data, else the data folder the checkpoint was trained on, else GPT-2's (for GPT-2's
weights). A model is refused with data whose ids mean other tokens (a compact vocabulary, another
tokenizer).
"""

import argparse
import os

import torch

import checkpoint
import guards
from data import prepare as data_prep


MAX_TOKENS = 2**20  # generated in all: minutes for the default model on a CPU, not hours
MAX_PROMPT = 2**24  # bytes of a FILE: prompt; the model reads only its last block_size tokens


def read_prompt(path):
    """A FILE: prompt: a regular file (/dev/zero or a FIFO would be read for ever) of at most
    MAX_PROMPT bytes."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"--prompt FILE:{path} is not a regular file")
    if os.path.getsize(path) > MAX_PROMPT:
        raise ValueError(f"--prompt FILE:{path} is {os.path.getsize(path):,} bytes, past "
                         f"{MAX_PROMPT:,}; the model reads only its last block_size tokens: "
                         f"give the end of it")
    return open(path, encoding="utf-8").read()


def check_size(model, prompt_tokens, args, device):
    """Refuse in one line a KV cache (keys and values of every application, fp32), token ids (held
    twice while they grow) and logits larger than this device has free."""
    n, cfg = args.num_samples, model.config
    need = n * (2 * len(cfg.applications()) * cfg.block_size * cfg.n_embd * 4 +
                16 * (prompt_tokens + args.max_new_tokens) + 8 * cfg.vocab_size)
    free = guards.available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"--num_samples {n} needs about {need / 1e9:.1f} GB (the KV cache and the "
                         f"prompt of every sample), more than the {free / 1e9:.1f} GB free on "
                         f"{device}; lower --num_samples or shorten the prompt")


def main(argv=None):
    p = guards.Parser(prog="sample", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init_from", default=os.path.join("out", "ckpt.pt"),
      help="anything train.py --init_from takes")
    a("--data", help="the data folder whose tokenizer to use (default: the checkpoint's)")
    a("--prompt", default="",
      help="text to continue (empty: a new document); FILE:path reads it from a file")
    a("--num_samples", type=guards.number(int, "[1, 1000]"), default=2, help="how many samples")
    a("--max_new_tokens", type=guards.number(int, "[0, 100000]"), default=200,
      help="tokens generated per sample")
    a("--temperature", type=guards.number(float, "[0, 100]"), default=0.8,
      help="< 1 sharper; 0 always the most likely")
    a("--top_k", type=guards.NATURAL, default=200,
      help="sample among the k most likely tokens only (0: all)")
    a("--seed", type=guards.number(int, f"[0, {2**63 - 1}]"), default=1337, help="random seed")
    a("--device", default="auto", help="cpu, cuda, cuda:N, mps (auto: cuda if there is one)")
    a("--no_cache", action="store_true",
      help="recompute the whole context for every token (slower; for checking)")
    # what guards.setup_device reads; no flags for them
    p.set_defaults(dtype="float32", compile=False)
    args = guards.parse_args(p, argv)
    if args.num_samples * args.max_new_tokens > MAX_TOKENS:  # hours, not minutes
        p.error(f"--num_samples {args.num_samples} x --max_new_tokens {args.max_new_tokens} asks "
                f"for {args.num_samples * args.max_new_tokens:,} tokens; "
                f"at most {MAX_TOKENS:,} in one run")
    device = guards.setup_device(args)[0]
    model = checkpoint.load_model(args.init_from, dropout=0.0).eval().to(device)
    data = args.data
    # our checkpoint records the folder it was trained on
    if data is None and model.config.vocab_id != "gpt2":
        path = checkpoint.ckpt_path(args.init_from)
        saved = checkpoint.load_checkpoint(path).get("args") if os.path.isfile(path) else None
        data = (saved.get("data") if isinstance(saved, dict) and
                isinstance(saved.get("data"), str) else None)
        if data is None or not os.path.isfile(os.path.join(data, "meta.json")):
            raise ValueError(f"{args.init_from} needs the data folder it was trained on "
                             f"({data or 'not recorded'}) for its tokenizer; give --data")
    meta = data_prep.load(data)[0] if data else {"tokenizer": "gpt2", "vocab_size": 50257}
    guards.check_vocab(model, meta, args.init_from)
    codec = data_prep.Codec(meta, data)
    prompt = read_prompt(args.prompt[5:]) if args.prompt.startswith("FILE:") else args.prompt
    ids = codec.encode(prompt)
    check_size(model, len(ids), args, device)
    torch.manual_seed(args.seed)
    out = model.generate(torch.tensor([ids] * args.num_samples, device=device), args.max_new_tokens,
                         args.temperature, args.top_k or None, use_cache=not args.no_cache)
    # not the end token an empty prompt is
    texts = [codec.decode(row.tolist()[0 if prompt else 1:]) for row in out]
    for text in texts:
        print(text + "\n---------------")
    return texts


if __name__ == "__main__":
    guards.cli(main, "sample", interrupted="")
