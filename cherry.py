"""
CHERRY in one file: a GPT (nanoGPT-style) plus the paper's three techniques.

Sections:
  1. Config
  2. Transformer: attention (with KV cache), MLP, block, GPT
  3. SGT: selective ground-truth token training (the token selector, the coupling measure)
  4. FLOPs and parameter counts

The model computes its loss either over every position (full supervision) or over
a selected subset only (SGT). In the SGT case the hidden states of the selected
positions are gathered first, so the LM head and the softmax run on ~15% of the
positions: that is where the compute saving comes from.
"""

import copy
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def to_dict(self):
        return asdict(self)


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

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, cache_slot=0):
        x = x + self.attn(self.ln_1(x), cache, cache_slot)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled down by the depth of the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_checkpoint(cls, ckpt):
        """Rebuild a model from a checkpoint dict of this project (config + state dict)."""
        model = cls(GPTConfig(**ckpt["config"]))
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}  # torch.compile's prefix
        model.load_state_dict(state)
        return model

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx, cache=None):
        """Final (normed) hidden states, (B, T, C). With a cache, idx continues the cached positions."""
        B, T = idx.shape
        start = len(cache) if cache is not None else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, cache_slot=i)
        return self.ln_f(x)

    def forward(self, idx, targets=None, select=None):
        """
        targets None:   logits of the last position only (inference), loss None.
        select None:    full supervision, loss = mean cross-entropy over all B*T positions.
        select (B, k):  SGT, loss = mean cross-entropy over the k selected positions per sequence;
                        the head runs on the gathered hidden states only.
        """
        h = self.hidden(idx)
        if targets is None:
            return self.lm_head(h[:, [-1], :]), None
        if select is not None:
            h = h.gather(1, select.unsqueeze(-1).expand(-1, -1, h.size(-1)))
            targets = targets.gather(1, select)
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def token_losses(self, idx, targets):
        """Per-position cross-entropy, (B, T): what evaluation splits into selected and unselected."""
        logits = self.lm_head(self.hidden(idx)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view(targets.shape)

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        # decay matrices (dim >= 2); leave biases, norms and the step embeddings alone
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
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


def count_params(model, non_embedding=True):
    """Parameters; by convention without the position embeddings (the token ones are tied to the head)."""
    n = sum(p.numel() for p in model.parameters())
    return n - model.wpe.weight.numel() if non_embedding else n


def flops_per_token(config, sgt_fraction=1.0, training=True):
    """
    Matmul FLOPs per token, counted from the shapes (2 FLOPs per multiply-add). Attention scores use the
    full block length, as in the PaLM appendix. Training = forward + backward = 3x forward. With SGT the
    head runs on a fraction of the positions only.
    """
    C, T, V = config.n_embd, config.block_size, config.vocab_size
    per_layer = 2 * (3 * C * C + C * C + 8 * C * C) + 2 * 2 * T * C  # qkv, proj, mlp; QK^T and AV
    forward = config.n_layer * per_layer + 2 * C * V * sgt_fraction
    return 3 * forward if training else forward
