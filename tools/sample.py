"""
Sample text from a model: any checkpoint train.py, compress.py or fuse.py wrote, nanoGPT's, or GPT-2's weights.
Generation runs through the KV cache; the text is decoded with the tokenizer of the data the model was trained on.

  python tools/sample.py --init_from out/ckpt.pt --prompt "ROMEO:" --num_samples 2 --max_new_tokens 200 \
      --temperature 0.8 --top_k 200 --seed 1337
  python tools/sample.py --init_from gpt2 --prompt "The meaning of life is"     # needs transformers
  python tools/sample.py --init_from out-compress --data data/shakespeare        # say which data's tokenizer

The tokenizer: --data, else the data folder named in the checkpoint's flags, else GPT-2's own. A data folder
prepared with --compact_vocab numbers its tokens compactly; meta.json maps them back to the tokenizer's ids.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from data import prepare as data_prep  # noqa: E402


class Codec:
    """Text <-> the model's token ids: the data's tokenizer, through its compact vocabulary if it has one."""

    def __init__(self, meta):
        name = meta.get("tokenizer", "gpt2")
        try:
            self.enc = data_prep.get_tokenizer(name)
        except Exception:  # a name tiktoken does not know, or one it would have to fetch while offline
            raise SystemExit(f"sample: cannot load the tokenizer {name!r}; give --data with the folder the model was trained on") from None
        self.token_ids = meta.get("token_ids")  # compact id -> tokenizer id, or None
        self.compact = {t: i for i, t in enumerate(self.token_ids)} if self.token_ids else None

    def encode(self, text):
        ids = self.enc.encode(text, allowed_special={"<|endoftext|>"})
        if self.compact is None:
            return ids
        unknown = [self.enc.decode([t]) for t in ids if t not in self.compact]
        if unknown:
            raise SystemExit(f"sample: the prompt has tokens the model's vocabulary lacks ({unknown[0]!r}); reword it")
        return [self.compact[t] for t in ids]

    def decode(self, ids):
        if self.compact is not None:  # ids past the data's vocabulary (the head's padding) were never trained: dropped
            ids = [self.token_ids[i] for i in ids if i < len(self.token_ids)]
        return self.enc.decode([i for i in ids if i < self.enc.n_vocab])


def data_meta(init_from, data):
    """meta.json of --data, or of the data folder recorded in our checkpoint; GPT-2's tokenizer otherwise."""
    if data is None:
        path = os.path.join(init_from, "ckpt.pt") if os.path.isdir(init_from) else init_from
        if os.path.isfile(path):
            ckpt = train.load_checkpoint(path, "sample")
            data = (ckpt.get("args") or {}).get("data") if isinstance(ckpt, dict) else None
            if data and not os.path.isfile(os.path.join(data, "meta.json")):
                raise SystemExit(f"sample: the model was trained on {data}, which is gone; give --data with the same tokenizer")
    if data is None:
        return {"tokenizer": "gpt2"}
    path = os.path.join(data, "meta.json")
    if not os.path.isfile(path):
        raise SystemExit(f"sample: no meta.json in {data}; give the --data folder the model was trained on")
    return json.load(open(path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default=os.path.join("out", "ckpt.pt"), help="a ckpt.pt (ours or nanoGPT's; file or folder), a Hugging Face GPT-2 folder, or a GPT-2 name")
    p.add_argument("--data", default=None, help="the data folder whose tokenizer to use (default: the checkpoint's)")
    p.add_argument("--prompt", default="\n", help="text to continue; FILE:path reads it from a file")
    p.add_argument("--num_samples", type=int, default=2, help="how many samples")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="< 1 sharper, > 1 more random; 0 always takes the most likely token")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens only (0: all)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole context for every token (slower; for checking)")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.num_samples < 1 or args.max_new_tokens < 0:
        raise SystemExit("sample: --temperature and --top_k must be at least 0, --num_samples at least 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    codec = Codec(data_meta(args.init_from, args.data))
    model = train.load_model(args.init_from, "sample", dropout=0.0).eval().to(device)
    prompt = open(args.prompt[5:], encoding="utf-8").read() if args.prompt.startswith("FILE:") else args.prompt
    ids = codec.encode(prompt or "<|endoftext|>")  # an empty prompt starts a new document
    if max(ids) >= model.config.vocab_size:
        raise SystemExit(f"sample: the prompt's token {max(ids)} is outside the model's vocabulary ({model.config.vocab_size}); "
                         f"is --data the model's?")
    torch.manual_seed(args.seed)
    x = torch.tensor([ids] * args.num_samples, device=device)
    out = model.generate(x, args.max_new_tokens, args.temperature, args.top_k or None, use_cache=not args.no_cache)
    texts = [codec.decode(row.tolist()) for row in out]
    for text in texts:
        print(text + "\n---------------")
    return texts


if __name__ == "__main__":
    main()
