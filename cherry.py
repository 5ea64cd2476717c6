"""
CHERRY in one file: a GPT (nanoGPT-style) plus the paper's three techniques.

Sections:
  1. Config
  2. Transformer: attention (with KV cache), MLP, block, GPT (optionally a recurrent unroll of its layers);
     loading weights (GPT.from_pretrained: this project's, nanoGPT's, Hugging Face GPT-2), safely
  3. SGT: selective ground-truth token training (the token selector, the coupling measure)
  4. FLOPs and parameter counts
  5. Depth compression: averaging adjacent layers, the unroll schedules, LoRA from the SVD of the residue
  6. MoEE: a router over several experts' MLPs, fusing compressed models, multi-token prediction

The model computes its loss either over every position (full supervision) or over
a selected subset only (SGT). In the SGT case the hidden states of the selected
positions are gathered first, so the LM head and the softmax run on ~15% of the
positions: that is where the compute saving comes from.
"""

import copy
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------
# 1. Config


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in linears and LayerNorms; False is a bit better and faster
    # recurrent unroll (depth compression, section 5); the defaults are a plain dense GPT
    schedule: tuple = None  # which layer each application runs, in order, e.g. (0, 1, 1, 1, 2); None: each once
    step_embed: bool = False  # a learned vector per application, added to the residual stream before it
    lora_rank: int = 0  # > 0: each application also has its own LoRA on the matrices (+ offsets on the vectors)
    # MoEE (section 6); the defaults are a plain MLP and next-token prediction only
    n_expert: int = 0  # > 0: every block's MLP is a mixture of this many experts behind a router
    top_k: int = 1  # experts per token
    aux_weight: float = 0.01  # Switch load-balancing loss, alpha
    z_weight: float = 0.0  # router z-loss (ST-MoE uses 1e-3)
    mtp: int = 0  # multi-token prediction: modules predicting tokens t+2 .. t+1+mtp (training only)
    mtp_weight: float = 0.3  # lambda: loss = L + lambda * mean(L_k)
    gelu_approximate: str = "none"  # "tanh": GPT-2's own GELU (set when its weights are loaded); "none": the exact one

    def to_dict(self):
        return asdict(self)

    def applications(self):
        """The layer index of every application in order: the schedule, or each layer once."""
        return tuple(self.schedule) if self.schedule is not None else tuple(range(self.n_layer))


# Model shapes by name. The paper's figures (abstract): 1B dense with 48 layers, its 6-layer compression
# at 227M, a 566M dense model. They fit ~18.7M parameters per layer (12 d^2, d = 1248) plus ~117M of
# embeddings, which implies a vocabulary near 93k (the paper's Korean tokenizer is not public).
GPT2 = dict(block_size=1024, vocab_size=50304, bias=True)
PAPER = dict(n_embd=1248, n_head=13, vocab_size=93440, block_size=2048)
UNROLL_34 = (0,) + (1,) * 8 + (2,) * 8 + (3,) * 8 + (4,) * 8 + (5,)  # layer per application: 1,8,8,8,8,1
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, **GPT2),         # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **GPT2),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **GPT2),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **GPT2),      # 1558M
    "cherry-1b": dict(n_layer=48, **PAPER),      # the dense model the paper compresses
    "cherry-566m": dict(n_layer=24, **PAPER),    # the dense model with ~2.5x the compressed parameters
    "cherry-227m": dict(n_layer=6, **PAPER),     # the 6-layer compression, before unrolling
    # unrolled 1,8,8,8,8,1 (34 applications, with step embeddings), and MoEE of it: 2 or 8 experts, top-1. Experts
    # share embeddings, attention and norms (section 6), so 8 experts are ~0.75B in all, not 8 x 227M = 1.8B.
    "cherry-227m-x34": dict(n_layer=6, schedule=UNROLL_34, step_embed=True, **PAPER),
    "cherry-moee-2": dict(n_layer=6, schedule=UNROLL_34, step_embed=True, n_expert=2, **PAPER),
    "cherry-moee-8": dict(n_layer=6, schedule=UNROLL_34, step_embed=True, n_expert=8, **PAPER),
}


# ----------------------------------------------------------------------------
# 2. Transformer


class KVCache:
    """Keys and values of past positions, one entry per layer application."""

    def __init__(self):
        self.k, self.v = {}, {}

    def __len__(self):
        return next(iter(self.k.values())).size(2) if self.k else 0

    def update(self, i, k, v):
        if i in self.k:
            k = torch.cat([self.k[i], k], dim=2)
            v = torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, cache_slot=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.k[cache_slot].size(2) if cache_slot in cache.k else 0
            k, v = cache.update(cache_slot, k, v)
        if past == 0:  # plain causal attention (flash attention where available)
            mask, causal = None, True
        else:  # new queries see every cached position plus the causal part of their own
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MoE(config) if config.n_expert else MLP(config)  # MoE: section 6

    def forward(self, x, cache=None, cache_slot=0):
        x = x + self.attn(self.ln_1(x), cache, cache_slot)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grad_checkpoint = False  # activation checkpointing, for the big presets
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        # recurrent unroll (section 5): the blocks run in this order, a block may run several times
        self.schedule = config.applications()
        assert self.schedule and all(0 <= i < config.n_layer for i in self.schedule), f"bad schedule {self.schedule}"
        self.step_embed = nn.Parameter(torch.zeros(len(self.schedule), config.n_embd)) if config.step_embed else None
        self.adapters = nn.ModuleList(Adapter(self.blocks[i], config.lora_rank) for i in self.schedule) if config.lora_rank else None
        # MoEE (section 6): the mixture layers (their routers' losses are collected per call), and the MTP modules
        self.moe_layers = [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]
        self.mtp_modules = nn.ModuleList(MTPModule(config) for _ in range(config.mtp))
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled down by the depth of the residual stream (applications, not layers)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * len(self.schedule)))

    @classmethod
    def from_checkpoint(cls, ckpt, dropout=None, source="the checkpoint"):
        """Rebuild a model from a checkpoint dict: this project's (config + model) or nanoGPT's (model_args + model)."""
        if isinstance(ckpt, dict) and "config" in ckpt and "model" in ckpt:  # this project's
            return build_model(ckpt["config"], ckpt["model"], source, dropout)
        if isinstance(ckpt, dict) and "model_args" in ckpt and isinstance(ckpt.get("model"), dict):  # nanoGPT's
            a = ckpt["model_args"] if isinstance(ckpt["model_args"], dict) else {}
            missing = [k for k in NANOGPT_ARGS if k not in a]
            if missing:
                raise ValueError(f"{source} is a nanoGPT checkpoint without {', '.join(missing)} in its model_args")
            config = {k: a[k] for k in NANOGPT_ARGS}
            return build_model(config, gpt2_state_to_cherry(ckpt["model"], conv1d=False), source, dropout)
        raise ValueError(f"{source} is neither this project's checkpoint nor nanoGPT's nor a Hugging Face GPT-2 folder")

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=None):
        """
        A model from any of: this project's ckpt.pt or nanoGPT's (the file or its folder), a Hugging Face GPT-2
        folder (what save_pretrained writes: config.json + model.safetensors or pytorch_model.bin), or a GPT-2
        size by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; through the transformers package, online or cached).
        GPT-2's weights come with its tanh GELU, so the logits equal Hugging Face's. dropout: None keeps the
        checkpoint's (0 for GPT-2). Problems raise ValueError / FileNotFoundError with a one-line message.
        """
        path = name_or_path
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            return load_hf_gpt2_folder(path, dropout)
        if os.path.isdir(path):
            path = os.path.join(path, "ckpt.pt")
        if not os.path.exists(path) and name_or_path in GPT2_NAMES:
            return load_hf_gpt2_by_name(name_or_path, dropout)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path} (train one with train.py, or give a GPT-2 name: {', '.join(GPT2_NAMES)})")
        return cls.from_checkpoint(load_checkpoint(path), dropout, source=path)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx, cache=None, residual=False):
        """Final (normed) hidden states, (B, T, C); the residual stream before the final norm if residual.
        With a cache, idx continues the cached positions."""
        B, T = idx.shape
        start = len(cache) if cache is not None else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for moe in self.moe_layers:
            moe.calls.clear()  # each call of a mixture layer in this pass records its router loss and load
        for a in range(len(self.schedule)):  # dense: application a runs block a, each once
            if self.step_embed is not None:
                x = x + self.step_embed[a]  # tells a shared block which application this is
            if self.grad_checkpoint and self.training and cache is None:  # recompute activations in backward: less memory
                x = torch.utils.checkpoint.checkpoint(self.apply_layer, a, x, use_reentrant=False)
            else:
                x = self.apply_layer(a, x, cache)
        return x if residual else self.ln_f(x)

    def apply_layer(self, a, x, cache=None):
        """Application a of the schedule: its block, with this application's own LoRA difference if any."""
        block = self.blocks[self.schedule[a]]
        if self.adapters is None:
            return block(x, cache, cache_slot=a)  # each application keeps its own keys and values
        return torch.func.functional_call(block, self.adapters[a].weights(block), (x, cache, a))

    def forward(self, idx, targets=None, select=None):
        """
        targets None:   logits of the last position only (inference), loss None.
        select None:    full supervision, loss = mean cross-entropy over all B*T positions.
        select (B, k):  SGT, loss = mean cross-entropy over the k selected positions per sequence;
                        the head runs on the gathered hidden states only.
        """
        x = self.hidden(idx, residual=True)
        h = self.ln_f(x)
        if targets is None:
            return self.lm_head(h[:, [-1], :]), None
        extra = 0.0  # MoEE (section 6): the routers' losses and the multi-token prediction losses
        if self.moe_layers:
            extra = extra + router_loss(self.moe_layers)
        if self.mtp_modules:
            extra = extra + self.config.mtp_weight * self.mtp_loss(x, targets)
        if select is not None:
            h = h.gather(1, select.unsqueeze(-1).expand(-1, -1, h.size(-1)))
            targets = targets.gather(1, select)
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss + extra

    def mtp_loss(self, x, targets):
        """
        Multi-token prediction (DeepSeek-V3): module k combines the previous depth's hidden state at position i
        with the embedding of token t(i+k) and predicts t(i+k+1) through the shared ln_f and head. The mean of
        the D losses. targets[:, i] is t(i+1), so module k reads targets shifted by k-1 and predicts targets
        shifted by k; the last k positions have nothing to predict and are masked.
        """
        losses = []
        for k, module in enumerate(self.mtp_modules, start=1):
            x = module(x, self.wte(shift_left(targets, k - 1, fill=0)))
            logits = self.lm_head(self.ln_f(x)).float()
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), shift_left(targets, k, fill=-1).reshape(-1),
                                          ignore_index=-1))
        return torch.stack(losses).mean()

    def token_losses(self, idx, targets):
        """Per-position cross-entropy, (B, T): what evaluation splits into selected and unselected."""
        logits = self.lm_head(self.hidden(idx)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        # decay matrices (dim >= 2); leave biases, norms and the step embeddings alone
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = {n for n, p in params.items() if p.dim() >= 2 and n != "step_embed"}
        groups = [{"params": [p for n, p in params.items() if n in decay], "weight_decay": weight_decay},
                  {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T). The KV cache makes each new token O(T), not O(T^2)."""
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and len(cache) < self.config.block_size:
                h = self.hidden(idx[:, -1:], cache)  # only the newest token; the past is cached
            else:  # (re)start from the last block_size tokens, exactly what the model was trained on
                cache = KVCache() if use_cache else None
                h = self.hidden(idx[:, -self.config.block_size:], cache)
            logits = self.lm_head(h[:, -1, :]).float() / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# Loading weights: this project's checkpoints, nanoGPT's, Hugging Face GPT-2. Everything goes through
# GPT.from_pretrained (above), and every file through load_checkpoint: plain data only, never pickled code.

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
NANOGPT_ARGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")


def load_checkpoint(path):
    """
    torch.load(weights_only=True): tensors, numbers, strings, lists, dicts. A file whose loading would have to
    run pickled code (any other object) is refused, never executed; a corrupt or truncated one is a ValueError too.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # a damaged file makes torch warn before it fails: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))  # the function or class the file would have had run
        if unsafe:
            raise ValueError(f"{path} holds a pickled Python object ({unsafe.group(1)}) that loading would have to run; "
                             f"refused, nothing was executed (save plain tensors and dicts instead)") from None
        raise ValueError(f"{path} is corrupt, truncated or not a torch checkpoint; it was not loaded "
                         f"(write it again, or use another checkpoint)") from None


def build_model(config, state, source, dropout=None):
    """A GPT of this config (a dict) with these weights; a state that does not fit the config is a ValueError."""
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ValueError(f"{source} holds no config and weights of this model")
    unknown = sorted(set(config) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ValueError(f"{source} is a checkpoint of another architecture (config fields unknown here: {', '.join(unknown)})")
    if dropout is not None:
        config = {**config, "dropout": dropout}
    try:
        model = GPT(GPTConfig(**config))
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{source} has a config this model cannot build ({e})") from None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's prefix
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} is {tuple(getattr(state[k], 'shape', ()))}, the config needs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and getattr(state[k], "shape", None) != v.shape]
    if problems:
        raise ValueError(f"{source} does not fit its own config, a checkpoint of another architecture? "
                         f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}")
    model.load_state_dict(state)
    return model


def gpt2_state_to_cherry(state, conv1d):
    """GPT-2 parameter names (nanoGPT's and Hugging Face's) -> this project's. Hugging Face's Conv1D stores weights transposed."""
    out = {}
    for name, t in state.items():
        name = name.removeprefix("_orig_mod.").removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not parameters
        if name.startswith("h."):
            name = "blocks." + name[2:]
        if conv1d and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        out[name] = t
    if "wte.weight" in out:
        out.setdefault("lm_head.weight", out["wte.weight"])  # tied; some files leave it out
    return out


def hf_gpt2_config(c, source):
    """Hugging Face's GPT2Config (as a dict) -> ours. GPT-2's "gelu_new" is the tanh GELU."""
    gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(c.get("activation_function", "gelu_new"))
    shape = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
    if c.get("model_type", "gpt2") != "gpt2" or gelu is None or any(k not in c for k in shape) \
            or c.get("n_inner") not in (None, 4 * c["n_embd"]) or c.get("scale_attn_by_inverse_layer_idx") \
            or c.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ValueError(f"{source} is not a GPT-2 this model can run (model_type {c.get('model_type')!r}, "
                         f"activation {c.get('activation_function')!r})")
    return dict(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                n_embd=c["n_embd"], bias=True, dropout=0.0, gelu_approximate=gelu)


def load_hf_gpt2_folder(path, dropout=None):
    """A folder written by Hugging Face's save_pretrained: config.json + model.safetensors or pytorch_model.bin."""
    try:
        config = json.load(open(os.path.join(path, "config.json")))
    except ValueError:
        raise ValueError(f"{path}/config.json is not valid JSON") from None
    config = hf_gpt2_config(config, path)
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        try:
            from safetensors.torch import load_file  # comes with transformers
        except ImportError:
            raise ValueError(f"{weights} needs the safetensors package (pip install transformers)") from None
        try:
            state = load_file(weights)
        except Exception:
            raise ValueError(f"{weights} is corrupt or truncated; it was not loaded (save it again)") from None
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        weights = os.path.join(path, "pytorch_model.bin")
        state = load_checkpoint(weights)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    return build_model(config, gpt2_state_to_cherry(state, conv1d=True), weights, dropout)


def load_hf_gpt2_by_name(name, dropout=None):
    """gpt2 ... gpt2-xl through transformers (downloaded once, then from its cache), as nanoGPT does."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise ValueError(f"{name} needs the transformers package (pip install transformers)") from None
    try:
        hf = GPT2LMHeadModel.from_pretrained(name)
    except Exception as e:  # offline and not cached, or no such model
        raise ValueError(f"could not load {name} from Hugging Face: {str(e).strip().splitlines()[0]}") from None
    return build_model(hf_gpt2_config(hf.config.to_dict(), name), gpt2_state_to_cherry(hf.state_dict(), conv1d=True), name, dropout)


# ----------------------------------------------------------------------------
# 3. SGT: selective ground-truth token training


def surprisal_table(unigram_counts, vocab_size):
    """-log p(token) with add-one smoothing, p counted on the training split."""
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for token, count in unigram_counts.items():
        counts[int(token)] += count
    return (-(counts / counts.sum()).log()).float()


def select_tokens(targets, fraction, method="surprisal", surprisal=None, generator=None):
    """
    Indices (B, k) of the k = ceil(fraction * T) target positions to supervise in each sequence.
    surprisal: highest unigram surprisal first (rare tokens carry the "semantic payload");
    random:    a uniformly random subset, the control every SGT result needs.
    """
    B, T = targets.shape
    k = math.ceil(fraction * T)
    if method == "surprisal":
        scores = surprisal.to(targets.device)[targets]
    elif method == "random":
        scores = torch.rand(B, T, generator=generator, device="cpu").to(targets.device)
    else:
        raise ValueError(f"unknown SGT selector {method!r}: use 'surprisal' or 'random'")
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def selection_mask(select, T):
    """Boolean (B, T) mask from selected indices (B, k)."""
    mask = torch.zeros(select.size(0), T, dtype=torch.bool, device=select.device)
    return mask.scatter_(1, select, True)


def gradient_coupling(model, x, y, select):
    """
    gamma = cos(g_S, g_U): g_S the gradient of the selected-token loss, g_U of the unselected one,
    over all parameters. gamma > 0 means a step on the selected tokens also lowers the loss of the
    others to first order (the paper's Theorem 1). Returns (gamma, |g_S|, |g_U|). Leaves .grad unset.
    """
    losses = model.token_losses(x, y)
    mask = selection_mask(select, y.size(1))
    params = [p for p in model.parameters() if p.requires_grad]
    g_s = torch.autograd.grad(losses[mask].mean(), params, retain_graph=True, allow_unused=True)
    g_u = torch.autograd.grad(losses[~mask].mean(), params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(gs, params)])
    g_s, g_u = flat(g_s), flat(g_u)
    return F.cosine_similarity(g_s, g_u, dim=0).item(), g_s.norm().item(), g_u.norm().item()


def theorem1_check(model, x, y, select, lr):
    """
    First-order check of Theorem 1 on one batch: a plain SGD step of size lr along -g_S (the gradient of
    the selected tokens' loss) changes the unselected tokens' loss L_U by about
    -lr * g_S . g_U = -lr * |g_S| * |g_U| * gamma. Takes the step on a copy (model is left as it was).
    Returns (predicted, measured) change of L_U; they agree as lr -> 0 and part as curvature takes over.
    """
    model = copy.deepcopy(model)
    mask = selection_mask(select, y.size(1))
    params = [p for p in model.parameters() if p.requires_grad]
    losses = model.token_losses(x, y)
    loss_u = losses[~mask].mean()
    g_s = torch.autograd.grad(losses[mask].mean(), params, retain_graph=True)
    g_u = torch.autograd.grad(loss_u, params)
    predicted = -lr * sum((a * b).sum() for a, b in zip(g_s, g_u)).item()
    with torch.no_grad():
        for p, g in zip(params, g_s):
            p -= lr * g
        measured = model.token_losses(x, y)[~mask].mean().item() - loss_u.item()
    return predicted, measured


# ----------------------------------------------------------------------------
# 4. FLOPs and parameter counts


def count_params(model, non_embedding=True, active=False):
    """
    Parameters, each stored tensor once: a block that runs several times counts once, its step embeddings and
    LoRA adapters count in full. By convention without the position embeddings (the token ones are tied to the head).
    active: what one token uses at inference: top_k of the n_expert experts' MLPs (and their LoRA), no MTP modules.
    """
    n = 0
    for name, p in model.named_parameters():
        if active and name.startswith("mtp_modules."):
            continue
        if active and re.search(r"mlp[._]experts[._]", name):
            n += p.numel() * model.config.top_k / model.config.n_expert
        else:
            n += p.numel()
    n = int(n)
    return n - model.wpe.weight.numel() if non_embedding else n


def flops_per_token(config, sgt_fraction=1.0, training=True):
    """
    Matmul FLOPs per token, counted from the shapes (2 FLOPs per multiply-add). Attention scores use the
    full block length, as in the PaLM appendix. Training = forward + backward = 3x forward. With SGT the
    head runs on a fraction of the positions only. An unrolled model pays for every application: unrolling
    saves parameters, not compute. (LoRA adapters are merged into the weights once per forward pass,
    a cost per batch, not per token, and left out.) A mixture layer pays for its router and top_k experts;
    in training each MTP module pays for its projection, its block and the head.
    """
    C, T, V = config.n_embd, config.block_size, config.vocab_size
    attention = 2 * (3 * C * C + C * C) + 2 * 2 * T * C  # qkv, proj; QK^T and AV
    mlp = 2 * 8 * C * C
    moe = config.top_k * mlp + 2 * C * config.n_expert if config.n_expert else mlp
    forward = len(config.applications()) * (attention + moe) + 2 * C * V * sgt_fraction
    if not training:
        return forward
    return 3 * (forward + config.mtp * (2 * 2 * C * C + attention + mlp + 2 * C * V))


# ----------------------------------------------------------------------------
# 5. Depth compression: average adjacent layers, then unroll the few that are left


class Adapter(nn.Module):
    """
    What makes one application of a shared block its own (Relaxed Recursive Transformers): a LoRA B @ A on each
    matrix of the block, and a full offset on each vector (norm gains, biases: a few numbers, so no rank needed).
    A fresh adapter is zero (B = 0, A small and random, the usual LoRA start); compress() sets it from the SVD of
    (original layer - averaged layer).
    """

    def __init__(self, block, rank):
        super().__init__()
        self.A, self.B, self.offset = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for name, p in block.named_parameters():
            key = name.replace(".", "_")  # a ParameterDict key may not contain dots
            if p.dim() == 2:
                r = min(rank, *p.shape)
                self.A[key] = nn.Parameter(torch.randn(r, p.size(1)) * 0.02)
                self.B[key] = nn.Parameter(torch.zeros(p.size(0), r))
            else:
                self.offset[key] = nn.Parameter(torch.zeros_like(p))

    def weights(self, block):
        """This application's parameters: the shared block's plus this application's difference."""
        out = {}
        for name, p in block.named_parameters():
            key = name.replace(".", "_")
            out[name] = p + (self.B[key] @ self.A[key] if p.dim() == 2 else self.offset[key])
        return out

    @torch.no_grad()
    def init_from_residue(self, original, shared):
        """Set the difference to the best rank-r approximation of (original - shared): exact at full rank."""
        for name, p in shared.named_parameters():
            key = name.replace(".", "_")
            residue = original.get_parameter(name).float() - p.float()
            if p.dim() == 2:
                U, S, Vh = torch.linalg.svd(residue, full_matrices=False)
                r = self.A[key].size(0)
                # A: orthonormal rows (never all zero, so B still gets a gradient when the residue is zero)
                self.A[key].copy_(Vh[:r])
                self.B[key].copy_(U[:, :r] * S[:r])
            else:
                self.offset[key].copy_(residue)


def layer_groups(n_layer, k):
    """k contiguous groups of n_layer / k adjacent layers: layer_groups(6, 3) = [[0, 1], [2, 3], [4, 5]]."""
    if k < 1 or n_layer % k:
        raise ValueError(f"{n_layer} layers do not split into {k} equal groups of adjacent layers")
    g = n_layer // k
    return [list(range(j * g, (j + 1) * g)) for j in range(k)]


def repeat_schedule(repeats):
    """Layer j runs repeats[j] times in a row: repeat_schedule((1, 3, 1)) = (0, 1, 1, 1, 2)."""
    return tuple(j for j, n in enumerate(repeats) for _ in range(n))


def loop_schedule(prelude, core, coda, loops):
    """Huginn's shape: the first `prelude` layers once, the next `core` layers as a loop run `loops` times, then `coda` layers once."""
    return (tuple(range(prelude)) + tuple(range(prelude, prelude + core)) * loops
            + tuple(range(prelude + core, prelude + core + coda)))


def default_repeats(k, group_size):
    """The paper's (1, 8, 8, 8, 8, 1) for 48 -> 6 layers, at any size: the two ends once, the middle layers group-size times."""
    if k <= 2:  # no middle: every layer runs group-size times
        return (group_size,) * k
    return (1,) + (group_size,) * (k - 2) + (1,)


@torch.no_grad()
def compress(model, k, schedule=None, step_embed=True, lora_rank=0):
    """
    Depth compression of a dense GPT: its n_layer layers -> k, layer j the exact mean of the j-th group of
    adjacent layers (every tensor, norms included; not LaCo's sum of differences). The k layers then run in
    `schedule` (default: default_repeats). Step embeddings start at zero, so at first the unroll is plain
    repeated application. With lora_rank > 0, application t of the n_j applications of layer j gets a LoRA
    set from the SVD of (original - mean), the original being the layer of group j at the same relative
    depth, group[t * len(group) // n_j]: with n_j = group size and full rank, the original model comes back.
    Returns a new GPT; the model passed in is left as it was.
    """
    cfg = model.config
    if cfg.schedule is not None or cfg.lora_rank or cfg.step_embed:
        raise ValueError("compress takes a dense model (no schedule, step embeddings or LoRA)")
    groups = layer_groups(cfg.n_layer, k)
    schedule = tuple(schedule) if schedule is not None else repeat_schedule(default_repeats(k, len(groups[0])))
    if sorted(set(schedule)) != list(range(k)):
        raise ValueError(f"the schedule {schedule} must run each of the {k} layers at least once")
    small = GPT(GPTConfig(**{**cfg.to_dict(), "n_layer": k, "schedule": schedule, "step_embed": step_embed,
                             "lora_rank": lora_rank}))
    for name in ("wte", "wpe", "ln_f"):  # everything outside the blocks is kept as it is (lm_head is tied to wte)
        getattr(small, name).load_state_dict(getattr(model, name).state_dict())
    for j, group in enumerate(groups):
        for name, p in small.blocks[j].named_parameters():
            p.copy_(torch.stack([model.blocks[i].get_parameter(name) for i in group]).mean(dim=0))
    if lora_rank:
        runs = [schedule.count(j) for j in range(k)]
        done = [0] * k
        for a, j in enumerate(schedule):
            original = model.blocks[groups[j][done[j] * len(groups[j]) // runs[j]]]
            small.adapters[a].init_from_residue(original, small.blocks[j])
            done[j] += 1
    return small


# ----------------------------------------------------------------------------
# 6. MoEE: Mixture of Efficient Experts, and multi-token prediction


class MoE(nn.Module):
    """
    The MLPs of several experts behind a token-level router (Switch / Branch-Train-MiX). Each token goes to
    its top_k experts; no capacity limit, so no token is ever dropped. Every call records its router loss
    and how many tokens each expert got (self.calls), which GPT.forward adds up per call: the experts of
    different layers, or of different applications of an unrolled layer, are never pooled.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k, self.aux_weight, self.z_weight = config.top_k, config.aux_weight, config.z_weight
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))
        self.calls = []  # [(router loss, tokens per expert)] of the current forward pass

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)
        with torch.autocast(x.device.type, enabled=False):  # router in fp32: small logit errors flip the choice
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        top_p, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        # gates: the top-k probabilities scaled to sum to one (identical experts then give exactly one expert's
        # output, top-1 included); the scale is detached, so the router still learns from the LM loss as in Switch
        # (the gradient is Switch's divided by the detached sum)
        gates = top_p / top_p.sum(dim=-1, keepdim=True).detach()
        out = self.dispatch(x, chosen, gates)
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts))
        loss = self.aux_weight * switch_loss(probs, counts)
        if self.z_weight:
            loss = loss + self.z_weight * logits.logsumexp(dim=-1).square().mean()
        self.calls.append((loss, counts))
        return out.view(B, T, C)

    @torch.compiler.disable  # token counts per expert change every step: torch.compile would recompile, so run eagerly
    def dispatch(self, x, chosen, gates):
        """Each expert on its own tokens, outputs weighted by their gates and summed back in place."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # every expert runs, even on no tokens (DDP needs its grads)
            y = expert(x[token]) * gates[token, slot].unsqueeze(-1)
            out.index_add_(0, token, y.to(out.dtype))
        return out


def switch_loss(probs, counts):
    """
    Switch Transformer's load-balancing loss, E * sum_i f_i * P_i: f_i the share of routed tokens expert i got
    (not differentiable), P_i its mean router probability over the full softmax (differentiable). 1 when the
    routing is uniform, E when one expert takes everything.
    """
    f = counts.float() / counts.sum()
    return len(counts) * (f * probs.mean(dim=0)).sum()


def router_loss(moe_layers):
    """The mean over every mixture-layer call of the last forward pass of its router loss."""
    return torch.stack([loss for moe in moe_layers for loss, _ in moe.calls]).mean()


def expert_counts(model):
    """Tokens each expert got in the last forward pass, per mixture layer (all of its calls): (layers, n_expert)."""
    return torch.stack([torch.stack([counts for _, counts in moe.calls]).sum(dim=0) for moe in model.moe_layers])


def shift_left(t, k, fill):
    """t[:, i + k] at position i; the last k positions get fill."""
    return torch.cat([t[:, k:], t.new_full((t.size(0), k), fill)], dim=1) if k else t


class MTPModule(nn.Module):
    """One multi-token prediction depth: norm both inputs, project their concatenation back to C, one dense block."""

    def __init__(self, config):
        super().__init__()
        self.norm_h = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.norm_e = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.block = Block(GPTConfig(**{**config.to_dict(), "n_expert": 0}))

    def forward(self, h, emb):
        return self.block(self.proj(torch.cat([self.norm_h(h), self.norm_e(emb)], dim=-1)))


@torch.no_grad()
def fuse(experts, top_k=1, mtp=0, **moe_config):
    """
    Fuse N models of one shape (compressed or dense) into one MoEE model: every shared tensor (embeddings,
    attention, norms, step embeddings, their LoRA) is the mean over the experts; each expert keeps its own MLPs
    (and their LoRA) as expert i of each mixture layer. The routers and MTP modules start fresh.
    Returns a new GPT; the experts are left as they were.
    """
    cfg = experts[0].config
    for i, m in enumerate(experts[1:], start=1):
        if m.config != cfg:
            diff = [k for k, v in cfg.to_dict().items() if m.config.to_dict()[k] != v]
            raise ValueError(f"expert {i} differs from expert 0 in {', '.join(diff)}: experts must have one shape")
    if cfg.n_expert or cfg.mtp:
        raise ValueError("fuse takes models without experts or MTP modules")
    fused = GPT(GPTConfig(**{**cfg.to_dict(), "n_expert": len(experts), "top_k": top_k, "mtp": mtp, **moe_config}))
    states = [m.state_dict() for m in experts]
    for name, p in fused.state_dict().items():
        # blocks.0.mlp.experts.1.c_fc.weight <- blocks.0.mlp.c_fc.weight of expert 1 (adapters: mlp_experts_1_c_fc)
        match = re.search(r"mlp([._])experts[._](\d+)[._]", name)
        if match:
            p.copy_(states[int(match.group(2))][name.replace(match.group(0), "mlp" + match.group(1))])
        elif name in states[0]:
            p.copy_(torch.stack([state[name].float() for state in states]).mean(dim=0))
    return fused
