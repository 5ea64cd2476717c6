"""
Sample text from a model: any checkpoint train.py, compress.py or fuse.py wrote, nanoGPT's, or GPT-2's weights.
Generation runs through the KV cache; the text goes through the tokenizer of the data the model was trained on.

  python -m tools.sample                                           # out/ckpt.pt, with its data's tokenizer
  python -m tools.sample --init_from out-korean --prompt "대한민국" --max_new_tokens 100
  python -m tools.sample --init_from gpt2 --prompt "The meaning of life is"     # needs transformers

The tokenizer: --data, else the data folder the checkpoint was trained on, else GPT-2's (for GPT-2's weights).
A model is refused with data whose ids mean other tokens (a compact vocabulary, another tokenizer).
"""

import argparse
import os

import torch

import cherry
import guards
from data import prepare as data_prep


def main(argv=None):
    p = guards.Parser(prog="sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init_from", default=os.path.join("out", "ckpt.pt"), help="anything train.py --init_from takes")
    a("--data", help="the data folder whose tokenizer to use (default: the checkpoint's)")
    a("--prompt", default="", help="text to continue (empty: a new document); FILE:path reads it from a file")
    a("--num_samples", type=guards.number(int, "[1, 1000]"), default=2, help="how many samples")
    a("--max_new_tokens", type=guards.number(int, "[0, 100000]"), default=200, help="tokens generated per sample")
    a("--temperature", type=guards.number(float, "[0, 100]"), default=0.8, help="< 1 sharper; 0 always the most likely")
    a("--top_k", type=guards.NATURAL, default=200, help="sample among the k most likely tokens only (0: all)")
    a("--seed", type=guards.number(int, f"[0, {2**63 - 1}]"), default=1337, help="random seed")
    a("--device", default="auto", help="cpu, cuda, cuda:N, mps (auto: cuda if there is one)")
    a("--no_cache", action="store_true", help="recompute the whole context for every token (slower; for checking)")
    p.set_defaults(dtype="float32", compile=False)  # what guards.setup_device reads; no flags for them
    args = guards.parse_args(p, argv)
    device = guards.setup_device(args)[0]
    model = cherry.load_model(args.init_from, dropout=0.0).eval().to(device)
    data = args.data
    if data is None and model.config.vocab_id != "gpt2":  # our checkpoint records the folder it was trained on
        path = os.path.join(args.init_from, "ckpt.pt") if os.path.isdir(args.init_from) else args.init_from
        data = cherry.load_checkpoint(path).get("args", {}).get("data") if os.path.isfile(path) else None
        if data is None or not os.path.isfile(os.path.join(data, "meta.json")):
            raise ValueError(f"{args.init_from} needs the data folder it was trained on ({data or 'not recorded'}) for "
                             f"its tokenizer; give --data")
    meta = data_prep.load(data)[0] if data else {"tokenizer": "gpt2", "vocab_size": 50257}
    guards.check_vocab(model, meta, args.init_from)
    codec = data_prep.Codec(meta, data)
    prompt = open(args.prompt[5:], encoding="utf-8").read() if args.prompt.startswith("FILE:") else args.prompt
    ids = codec.encode(prompt)
    torch.manual_seed(args.seed)
    out = model.generate(torch.tensor([ids] * args.num_samples, device=device), args.max_new_tokens, args.temperature,
                         args.top_k or None, use_cache=not args.no_cache)
    texts = [codec.decode(row.tolist()[0 if prompt else 1:]) for row in out]  # not the end token an empty prompt is
    for text in texts:
        print(text + "\n---------------")
    return texts


if __name__ == "__main__":
    guards.cli(main, "sample")
