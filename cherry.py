"""
CHERRY in one file: a GPT (nanoGPT-style) and the paper's three techniques, in the paper's order.
  1. Config and presets                4. Depth compression: average adjacent layers, unroll, LoRA
  2. Transformer (with a KV cache)     5. MoEE: a router over the experts' MLPs, fusion, MTP
  3. SGT: which targets to supervise   6. Counts: parameters and FLOPs
Loading and saving weights (this project's, nanoGPT's, Hugging Face's) is checkpoint.py's.
"""

import math
import re
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------
# 1. Config and presets

# layers, or applications of an unrolled schedule: far past any model here, short of a typo's 10^8
MAX_DEPTH = 1024


@dataclass
class GPTConfig:
    """A model's shape. The defaults are train.py's default run: 12 x 128 on GPT-2's tokens."""
    block_size: int = 128
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in linears and LayerNorms (GPT-2 has them)
    gelu_approximate: str = "none"  # "tanh": GPT-2's own GELU (set when its weights are loaded)
    vocab_id: str = ""  # which tokens the ids mean (data/prepare.py's vocab_id); "" when unknown
    # depth compression (section 4); the defaults are a plain dense GPT
    # the layer each application runs, in order, e.g. (0, 1, 1, 1, 2); None: each layer once
    schedule: tuple = None
    step_embed: bool = False  # a learned vector per application, added to the residual stream
    lora_rank: int = 0  # > 0: a LoRA per application on the matrices (+ offsets on the vectors)
    # MoEE (section 5); the defaults are a plain MLP and next-token prediction only
    n_expert: int = 0  # > 0: every block's MLP is a mixture of this many experts behind a router
    experts_per_token: int = 1
    capacity_factor: float = 1.25  # in training an expert takes at most this x its fair share
    aux_weight: float = 0.01  # Switch load-balancing loss, alpha
    z_weight: float = 0.0  # router z-loss (ST-MoE uses 1e-3)
    mtp: int = 0  # multi-token prediction: modules predicting tokens t+2 .. t+1+mtp (training only)
    mtp_weight: float = 0.3  # lambda: loss = L + lambda * mean(L_k)

    def __post_init__(self):
        if self.schedule is not None:  # a checkpoint stores it as a list
            self.schedule = tuple(self.schedule)
        if not (self.n_head >= 1 and self.n_embd % self.n_head == 0):
            raise ValueError(f"n_head {self.n_head} must be at least 1 and divide n_embd "
                             f"{self.n_embd}")

    def applications(self):
        """The layer index of every application in order: the schedule, or each layer once."""
        return self.schedule if self.schedule is not None else tuple(range(self.n_layer))


# Model shapes by name. The paper's figures (abstract): 1B dense with 48 layers, its 6-layer
# compression at 227M, a 566M dense model. They fit ~18.7M parameters per layer (12 d^2, d = 1248)
# plus ~117M of embeddings, which implies a vocabulary near 93k (the paper's Korean tokenizer is not
# public).
GPT2 = dict(block_size=1024, vocab_size=50304, bias=True)
PAPER = dict(n_embd=1248, n_head=13, vocab_size=93440, block_size=2048)
UNROLL_34 = (0,) + (1,) * 8 + (2,) * 8 + (3,) * 8 + (4,) * 8 + (5,)  # 1,8,8,8,8,1
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, **GPT2),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **GPT2),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **GPT2),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **GPT2),  # 1558M
    "cherry-1b": dict(n_layer=48, **PAPER),  # the dense model the paper compresses
    "cherry-566m": dict(n_layer=24, **PAPER),  # dense, ~2.5x the compressed parameters
    "cherry-227m": dict(n_layer=6, **PAPER),  # the 6-layer compression, before unrolling
    # unrolled 1,8,8,8,8,1 (34 applications, step embeddings), and MoEE of it with 2 or 8 experts,
    # top-1. The experts share embeddings, attention and norms (section 5): 8 experts are ~0.75B in
    # all, not 8 x 227M = 1.8B.
    "cherry-227m-x34": dict(n_layer=6, schedule=UNROLL_34, step_embed=True, **PAPER),
    "cherry-moee-2": dict(n_layer=6, schedule=UNROLL_34, step_embed=True, n_expert=2, **PAPER),
    "cherry-moee-8": dict(n_layer=6, schedule=UNROLL_34, step_embed=True, n_expert=8, **PAPER),
}

# ----------------------------------------------------------------------------
# 2. Transformer


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, cache_slot=0):
        """cache: None, or the KV cache {application: (keys, values) of the past positions}, updated
        in place under cache_slot."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B,nh,T,hs)
        if cache is not None:
            if cache_slot in cache:  # the earlier positions' keys and values come first
                past_k, past_v = cache[cache_slot]
                k = torch.cat([past_k, k], dim=2)  # (B, nh, past + T, hs)
                v = torch.cat([past_v, v], dim=2)
            cache[cache_slot] = k, v
        past = k.size(2) - T
        # causal attention (flash where available); with a cache, new queries also see every cached
        # position
        mask = None
        if past:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


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
        self.mlp = MoE(config) if config.n_expert else MLP(config)  # MoE: section 5

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
        # the recurrent unroll (section 4): the block each application runs, in order; a step
        # embedding and an adapter (LoRA) per application
        self.applications = A = config.applications()
        n = len(A)
        self.step_embed = nn.Parameter(torch.zeros(n, config.n_embd)) if config.step_embed else None
        r = config.lora_rank
        self.adapters = nn.ModuleList(Adapter(self.blocks[i], r) for i in A) if r else None
        # MoEE (section 5): the mixture layers (they record each call), the MTP modules
        self.moe_layers = [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]
        self.mtp_modules = nn.ModuleList(MTPModule(config) for _ in range(config.mtp))
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled down by the residual stream's depth (applications)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx, cache=None, residual=False, states=None):
        """Final (normed) hidden states (B, T, C); the residual stream before the final norm if
        residual. With a cache, idx continues the cached positions. states: a list that gets the
        residual stream after every application (distillation's hidden-state loss, section 4)."""
        B, T = idx.shape
        start = cached_positions(cache)
        if start + T > self.config.block_size:
            raise ValueError(f"a sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for moe in self.moe_layers:
            moe.calls.clear()  # each call of a mixture layer records (loss, counts, dropped)
        for a in range(len(self.applications)):  # dense: application a runs block a, each once
            if self.step_embed is not None:
                x = x + self.step_embed[a]  # tells a shared block which application this is
            if self.grad_checkpoint and self.training and cache is None:  # less memory: recompute
                x = torch.utils.checkpoint.checkpoint(self.apply_layer, a, x, use_reentrant=False)
            else:
                x = self.apply_layer(a, x, cache)
            if states is not None:
                states.append(x)
        return x if residual else self.ln_f(x)

    def apply_layer(self, a, x, cache=None):
        """Application a: its block, with this application's own LoRA difference if any."""
        block = self.blocks[self.applications[a]]
        if self.adapters is None:
            return block(x, cache, cache_slot=a)  # each application keeps its own keys and values
        return torch.func.functional_call(block, self.adapters[a].weights(block), (x, cache, a))

    def forward(self, idx, targets=None, positions=None, weights=None, choose=None):
        """targets None: the last position's logits (inference). Full supervision: the mean
        cross-entropy of all B*T targets. SGT: positions (B, k), the targets supervised in each
        sequence, the head run on their hidden states only; weights (B, k) each pick's share of its
        sequence's loss (None: the plain mean over the picks); or choose, a function from the
        per-position losses (B, T) of a head pass without gradient to (positions, weights) (Rho-1's
        excess loss, --sgt_select gradient). The routers' and multi-token prediction losses are
        added when the model has them (section 5)."""
        x = self.hidden(idx, residual=True)  # (B, T, C)
        h = self.ln_f(x)
        if targets is None:
            return self.lm_head(h[:, [-1], :]), None
        if choose is not None:  # an extra head forward on every position, without gradient
            with torch.no_grad():
                positions, weights = choose(cross_entropy(self.lm_head(h), targets))
        if positions is None:
            logits = self.lm_head(h)
            loss = cross_entropy(logits, targets).mean()
        else:
            logits = self.lm_head(gather(h, positions))  # (B, k, V)
            losses = cross_entropy(logits, targets.gather(1, positions))  # (B, k)
            loss = losses.mean() if weights is None else (weights * losses).sum(dim=1).mean()
        if self.moe_layers:
            loss = loss + router_loss(self.moe_layers)
        if self.mtp_modules:
            loss = loss + self.config.mtp_weight * mtp_loss(self, x, targets, positions, weights)
        return logits, loss

    def token_losses(self, idx, targets):
        """Per-position cross-entropy (B, T): what evaluation splits into selected and unselected
        targets."""
        return cross_entropy(self.lm_head(self.hidden(idx)), targets)

    def configure_optimizer(self, weight_decay, lr, betas, device_type):
        # decay matrices (dim >= 2); leave biases, norms, the step embeddings and the LoRA adapters
        # alone (decay would pull each application back to the averaged layer)
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        own = lambda n: n == "step_embed" or n.startswith("adapters.")
        decay = {n for n, p in params.items() if p.dim() >= 2 and not own(n)}
        decayed = [p for n, p in params.items() if n in decay]
        kept = [p for n, p in params.items() if n not in decay]
        groups = [{"params": decayed, "weight_decay": weight_decay},
                  {"params": kept, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T). The KV cache makes each new token O(T), not
        O(T^2)."""
        cache = {} if use_cache else None
        for _ in range(max_new_tokens):
            if 0 < cached_positions(cache) < self.config.block_size:
                h = self.hidden(idx[:, -1:], cache)  # only the newest token; the past is cached
            else:  # (re)start from the last block_size tokens: what the model was trained on
                if cache is not None:
                    cache.clear()
                h = self.hidden(idx[:, -self.config.block_size:], cache)
            logits = self.lm_head(h[:, -1, :]).float() / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def cached_positions(cache):
    """How many positions a KV cache holds: 0 for None (no cache) and for {} (not filled yet)."""
    return cache[0][0].size(2) if cache else 0


def cross_entropy(logits, targets):
    """Per-position cross-entropy in fp32, the shape of targets; a target of -1 is ignored (loss
    0)."""
    logits = logits.float().flatten(0, -2)
    losses = F.cross_entropy(logits, targets.flatten(), ignore_index=-1, reduction="none")
    return losses.view(targets.shape)


def gather(h, positions):
    """h (B, T, C) at positions (B, k): (B, k, C)."""
    return h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.size(-1)))


# ----------------------------------------------------------------------------
# 3. SGT: selective ground-truth token training


def surprisal_table(unigram_counts, vocab_size):
    """-log p(token) with add-one smoothing, p counted on the training split: (vocab_size,)."""
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for token, count in unigram_counts.items():
        counts[int(token)] += count
    return (-(counts / counts.sum()).log()).float()


def select_positions(targets, fraction, generator, surprisal=None, beta=0.0, mix=0.0, floor=0.0):
    """SGT's draw on unigram surprisal: the k = ceil(fraction * T) targets of each sequence to
    supervise, scored by their surprisal s(y) (None: every target alike, a uniform draw). Returns
    draw_positions(...)."""
    scores = torch.ones(targets.shape) if surprisal is None else surprisal[targets]
    k = math.ceil(fraction * targets.size(1))
    return draw_positions(scores, k, generator, beta, mix, floor)


def draw_positions(scores, k, generator, beta=0.0, mix=0.0, floor=0.0):
    """k positions per sequence, drawn without replacement with probability ~ w = score^beta (Gumbel
    top-k on log w): beta 0 is a uniform draw, beta inf the k top scores; mix: that share of the k
    drawn uniformly from the rest. floor F mixes uniform weight into each sequence's w, (1 - F) w /
    mean(w) + F: the inverse weights' tail shrinks. Returns (positions (B, k), inclusion (B, k)),
    sorted by position: inclusion is each pick's probability of being picked given the (k+1)-th
    largest key tau, pi = 1 - exp(-w exp(-tau)) (rank conditioning, Cohen and Kaplan's bottom-k
    estimator), so E[1{picked} / pi] = 1 at every position; None where it has no such form (beta
    inf, mix). The tilt's cost without weights: SGT's optimum is q(y|c) ~ p(y|c) pi(y, c), an extra
    loss of log E_p[pi] - E_p[log pi], unbounded where pi is 0 (top-k never supervises frequent
    tokens)."""
    B, T = scores.shape
    k_uniform = round(mix * k)
    gumbel = lambda: -torch.empty(B, T).exponential_(generator=generator).log().to(scores.device)
    if beta == math.inf:
        keys = scores
        log_w = None
    else:
        log_w = beta * scores.log() if beta else torch.zeros_like(scores)
        if floor:
            w = log_w.exp()
            log_w = ((1 - floor) * w / w.mean(dim=1, keepdim=True) + floor).log()
        keys = gumbel() + log_w
    weighted = log_w is not None and not k_uniform
    top = keys.topk(min(k + 1, T) if weighted else k - k_uniform, dim=1)  # the (k+1)-th key is tau
    picked = top.indices[:, :k - k_uniform]
    inclusion = None
    if weighted:
        tau = top.values[:, k:] if k < T else torch.full((B, 1), -math.inf, device=scores.device)
        # 1 - exp(-w e^-tau), exact near 0
        inclusion = -torch.expm1(-(log_w.gather(1, picked) - tau).exp())
    if k_uniform:
        rest = gumbel().scatter(1, picked, -math.inf)  # the tilted picks are out of this draw
        picked = torch.cat([picked, rest.topk(k_uniform, dim=1).indices], dim=1)
    picked, order = picked.sort(dim=1)
    return picked, None if inclusion is None else inclusion.gather(1, order)


def inverse_weights(inclusion, T):
    """Each pick's weight 1 / (T pi): the weighted sum of the picks' losses estimates the mean loss
    of all T targets without bias (Horvitz-Thompson), and its gradient the full gradient, for any
    tilt."""
    return 1 / (T * inclusion)


def gradient_scores(losses):
    """--sgt_select gradient: 1 - p_y, the size of a target's gradient at the logits (where the
    model can still learn), from the per-position losses -log p_y of a head pass without gradient;
    kept above 0 so every target can be drawn."""
    return (-torch.expm1(-losses)).clamp(min=1e-6)


def excess_selector(k, reference_losses):
    """Rho-1: a function of the model's per-position losses (B, T) that picks, in each sequence, the
    k positions where they most exceed the reference's (the unigram model's by default), all
    weighted alike."""
    def choose(losses):
        positions = (losses - reference_losses).topk(k, dim=1).indices
        return positions.sort(dim=1).values, None
    return choose


def selection_mask(selected, T):
    """Boolean (B, T) mask from selected positions (B, k)."""
    mask = torch.zeros(selected.size(0), T, dtype=torch.bool, device=selected.device)
    return mask.scatter_(1, selected, True)


# ----------------------------------------------------------------------------
# 4. Depth compression: average adjacent layers, then unroll the few that are left


class Adapter(nn.Module):
    """What makes one application of a shared block its own (Relaxed Recursive Transformers): a LoRA
    B @ A on each matrix and a full offset on each vector (norm gains, biases). Fresh, it is zero (B
    = 0, the usual LoRA start); compress() sets it from the SVD of (original layer - averaged
    layer)."""

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
        """Set the difference to the best rank-r approximation of (original - shared): exact at full
        rank."""
        for name, p in shared.named_parameters():
            key = name.replace(".", "_")
            residue = original.get_parameter(name).float() - p.float()
            if p.dim() == 2:
                U, S, Vh = torch.linalg.svd(residue, full_matrices=False)
                r = self.A[key].size(0)
                # orthonormal rows: never all zero, so B still learns from a zero residue
                self.A[key].copy_(Vh[:r])
                self.B[key].copy_(U[:, :r] * S[:r])
            else:
                self.offset[key].copy_(residue)


def layer_groups(n_layer, layers):
    """`layers` contiguous groups of n_layer / layers adjacent layers:
    layer_groups(6, 3) = [[0, 1], [2, 3], [4, 5]]."""
    if layers < 1 or n_layer % layers:
        raise ValueError(f"{n_layer} layers do not split into {layers} equal groups")
    g = n_layer // layers
    return [list(range(j * g, (j + 1) * g)) for j in range(layers)]


def repeat_schedule(repeats):
    """Layer j runs repeats[j] times in a row: repeat_schedule((1, 3, 1)) = (0, 1, 1, 1, 2)."""
    return tuple(j for j, n in enumerate(repeats) for _ in range(n))


def loop_schedule(prelude, core, coda, loops):
    """Huginn's shape: the first `prelude` layers once, the next `core` layers looped `loops` times,
    `coda` once."""
    looped = tuple(range(prelude, prelude + core)) * loops
    return tuple(range(prelude)) + looped + tuple(range(prelude + core, prelude + core + coda))


def paper_schedule(n_layer, layers):
    """The paper's 1,8,8,8,8,1 for 48 -> 6, at any size: ends once, the middle group-size times."""
    g = n_layer // layers
    repeats = (g,) * layers if layers <= 2 else (1,) + (g,) * (layers - 2) + (1,)
    return repeat_schedule(repeats)


@torch.no_grad()
def compress(model, layers, schedule, step_embed=True, lora_rank=0, coda_from_end=True):
    """A dense GPT's n_layer layers -> `layers`, layer j the exact mean of the j-th group of g
    adjacent layers (every tensor, norms included; not LaCo's sum of differences), run in `schedule`
    (the layer of each application, e.g. paper_schedule). Step embeddings start at zero: at first
    the unroll is plain repetition. With LoRA, application t of layer j's n starts from the residue
    of its group's layer at the same relative depth, group[t * g // n], or for the last layer (next
    to the head) group[(t + 1) * g // n - 1], so a once-run coda starts from the original's final
    layer (coda_from_end=False: its group's first). With n = g and full rank the original comes
    back. Returns a new GPT."""
    cfg = model.config
    if cfg.schedule is not None or cfg.lora_rank or cfg.step_embed:
        raise ValueError("compress takes a dense model (no schedule, step embeddings or LoRA)")
    groups = layer_groups(cfg.n_layer, layers)
    g = len(groups[0])
    schedule = tuple(schedule)
    if sorted(set(schedule)) != list(range(layers)):
        raise ValueError(f"the schedule {schedule} must run each of the {layers} layers")
    small = GPT(replace(cfg, n_layer=layers, schedule=schedule, step_embed=step_embed,
                        lora_rank=lora_rank))
    for name in ("wte", "wpe", "ln_f"):  # all outside the blocks is kept (lm_head: tied to wte)
        getattr(small, name).load_state_dict(getattr(model, name).state_dict())
    for j, group in enumerate(groups):
        for name, p in small.blocks[j].named_parameters():
            p.copy_(torch.stack([model.blocks[i].get_parameter(name) for i in group]).mean(dim=0))
    if lora_rank:
        for a, j in enumerate(schedule):
            t = schedule[:a].count(j)  # application t of layer j's n
            n = schedule.count(j)
            index = t * g // n
            if j == layers - 1 and coda_from_end:
                index = (t + 1) * g // n - 1
            small.adapters[a].init_from_residue(model.blocks[groups[j][index]], small.blocks[j])
    return small


def distill_loss(logits, teacher_logits, temperature=1.0):
    """KL(teacher || student) of the next-token distributions at temperature T, times T^2 (Hinton:
    the gradient's scale then does not depend on T); the mean over positions, in fp32. Zero, with
    zero gradient, for equal logits."""
    with torch.no_grad():
        q = F.softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
        entropy = torch.special.entr(q).sum() / len(q)
    # KL(q || p) = H(q, p) - H(q): a cross-entropy with soft targets, fewer passes over the
    # vocabulary
    p_logits = logits.float().flatten(0, -2) / temperature
    return (F.cross_entropy(p_logits, q) - entropy) * temperature**2


def hidden_loss(states, teacher_states):
    """The mean over the pairs of ||h - h_teacher||^2 / ||h_teacher||^2 (relative: the same at any
    width or depth)."""
    return torch.stack([(h - t).float().square().sum() / t.float().square().sum()
                        for h, t in zip(states, teacher_states)]).mean()


def teacher_layers(schedule, group_size):
    """For each application of a compressed schedule, the teacher layer whose output its own output
    should match: the end of the share of its group it stands for. Application t of layer j's n
    covers group[t g / n .. (t + 1) g / n), so it matches group[ceil((t + 1) g / n) - 1]: with
    n = g the layer whose residue its LoRA starts from, and the last application of each layer ends
    where its group ends. A loop (1+4x8+1) revisits layers out of depth order: refused."""
    if list(schedule) != sorted(schedule):
        raise ValueError(f"the schedule {tuple(schedule)} is a loop: the hidden-state loss needs "
                         f"each compressed layer's applications in a row (--unroll n_1,...,n_k)")
    return [j * group_size + -(-(schedule[:a].count(j) + 1) * group_size // schedule.count(j)) - 1
            for a, j in enumerate(schedule)]


class Distilled(nn.Module):
    """Recovery by distillation: the student's loss is (1 - weight) x cross-entropy + weight x
    distill_loss to the frozen teacher's next-token distribution + hidden_weight x hidden_loss of
    each application's output against its teacher layer (teacher_layers). Called like a GPT in
    training: (logits, loss). The teacher stays in eval mode, takes no gradient and is no submodule:
    the student's state_dict never holds it."""

    def __init__(self, student, teacher, weight=1.0, temperature=1.0, hidden_weight=0.0):
        super().__init__()
        s, t = student.config, teacher.config
        if s.n_expert or s.mtp or t.n_layer % s.n_layer:
            raise ValueError("distillation takes a compressed student of a dense teacher")
        self.student, self.weight, self.temperature = student, weight, temperature
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule
        self.hidden_weight = hidden_weight
        g = t.n_layer // s.n_layer
        self.layers = teacher_layers(student.applications, g) if hidden_weight else None

    def forward(self, idx, targets, positions=None, weights=None, choose=None):
        if positions is not None or choose is not None:
            raise ValueError("distillation supervises every position, not SGT's picks")
        states, teacher_states = [], []
        h = self.student.hidden(idx, states=states if self.hidden_weight else None)
        logits = self.student.lm_head(h)
        loss = cross_entropy(logits, targets).mean() * (1 - self.weight)
        with torch.no_grad():
            h = self.teacher[0].hidden(idx, states=teacher_states)
            teacher_logits = self.teacher[0].lm_head(h) if self.weight else None
        if self.weight:
            loss = loss + self.weight * distill_loss(logits, teacher_logits, self.temperature)
        if self.hidden_weight:
            matched = [teacher_states[i] for i in self.layers]
            loss = loss + self.hidden_weight * hidden_loss(states, matched)
        return logits, loss


# ----------------------------------------------------------------------------
# 5. MoEE: Mixture of Efficient Experts, and multi-token prediction


class MoE(nn.Module):
    """The MLPs of several experts behind a token-level router (Switch, Branch-Train-MiX): each
    token goes to its experts_per_token best experts. Static shapes (no host sync, one compiled
    graph): the (token, expert) assignments queue by expert into fixed-capacity buffers, each expert
    runs on its buffer, the outputs are added back, gated. In training an expert takes at most
    capacity_factor x its fair share and drops the rest (counted; the token passes on the residual);
    evaluation never drops. self.calls: (loss, counts, dropped) per call of this layer in the
    forward pass."""

    def __init__(self, config):
        super().__init__()
        self.experts_per_token = config.experts_per_token
        self.capacity_factor = config.capacity_factor
        self.aux_weight = config.aux_weight
        self.z_weight = config.z_weight
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))
        self.calls = []

    def forward(self, x):
        B, T, C = x.shape
        K = self.experts_per_token
        E = len(self.experts)
        x = x.reshape(-1, C)  # (N, C): every token of the batch
        N = x.size(0)
        with torch.autocast(x.device.type, enabled=False):  # fp32: small errors flip the choice
            logits = F.linear(x.float(), self.router.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)
        top_p, expert = probs.topk(K, dim=-1)  # (N, K)
        # gates: the top-k probabilities scaled to sum to one (identical experts then give exactly
        # one expert's output); the scale is detached, so the router still learns from the LM loss
        # (Switch)
        gates = (top_p / top_p.sum(dim=-1, keepdim=True).detach()).flatten()  # (N * K,)
        expert = expert.flatten()  # (N * K,) token-major: token i's choices are i*K .. i*K + K-1
        # each assignment's place in its expert's queue (token order); past the capacity it is
        # dropped
        capacity = min(N, math.ceil(self.capacity_factor * N * K / E)) if self.training else N
        one_hot = F.one_hot(expert, E)  # (N * K, E)
        place = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1) - 1  # (N * K,)
        kept = place < capacity
        # a row per (expert, place); every dropped assignment goes to one spare last row
        slot = torch.where(kept, expert * capacity + place, E * capacity)  # (N * K,)
        inputs = x.repeat_interleave(K, dim=0) if K > 1 else x  # (N * K, C)
        buffers = x.new_zeros(E * capacity + 1, C).index_copy(0, slot, inputs)  # (E*capacity+1, C)
        buffers = buffers[:-1]  # (E * capacity, C): expert e's queue is rows e * capacity ..
        outputs = [mlp(part) for mlp, part in zip(self.experts, buffers.split(capacity))]
        y = torch.cat(outputs + [x.new_zeros(1, C)])  # (E * capacity + 1, C): the spare row is zero
        out = (y[slot] * (gates * kept).unsqueeze(-1)).view(N, K, C).sum(dim=1)  # (N, C)
        counts = one_hot.sum(dim=0)  # (E,) assignments per expert
        loss = self.aux_weight * switch_loss(probs, counts)
        if self.z_weight:
            loss = loss + self.z_weight * logits.logsumexp(dim=-1).square().mean()
        self.calls.append((loss, counts, (~kept).sum()))
        return out.view(B, T, C)


def switch_loss(probs, counts):
    """Switch Transformer's load balance, E * sum_i f_i * P_i: f_i the share of assignments expert i
    got, P_i its mean router probability over the full softmax (the differentiable part); 1 when
    uniform, E when one takes all."""
    return len(counts) * (counts.float() / counts.sum() * probs.mean(dim=0)).sum()


def router_loss(moe_layers):
    """The mean of the router losses of every mixture-layer call of the last forward pass."""
    return torch.stack([loss for moe in moe_layers for loss, _, _ in moe.calls]).mean()


def expert_counts(moe_layers):
    """Assignments each expert got in the last forward pass, per mixture layer (all its calls):
    (layers, n_expert)."""
    return torch.stack([sum(counts for _, counts, _ in moe.calls) for moe in moe_layers])


def dropped_share(moe_layers):
    """The share of the last forward pass's assignments that the capacity dropped (a tensor: no host
    sync)."""
    calls = [call for moe in moe_layers for call in moe.calls]
    return sum(dropped for _, _, dropped in calls) / sum(counts.sum() for _, counts, _ in calls)


def shift_left(t, n, fill):
    """t[:, i + n] at position i; the last n positions get fill."""
    if n == 0:
        return t
    return torch.cat([t[:, n:], t.new_full((t.size(0), n), fill)], dim=1)


class MTPModule(nn.Module):
    """One multi-token prediction depth: norm both inputs, project their concatenation back to C,
    one dense block."""

    def __init__(self, config):
        super().__init__()
        self.norm_h = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.norm_e = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.block = Block(replace(config, n_expert=0))

    def forward(self, h, emb):
        return self.block(self.proj(torch.cat([self.norm_h(h), self.norm_e(emb)], dim=-1)))


def mtp_loss(model, x, targets, positions=None, weights=None):
    """Multi-token prediction (DeepSeek-V3): the module at depth d combines the previous depth's
    hidden state at position i with the embedding of t(i+d) and predicts t(i+d+1) through the shared
    ln_f and head; the mean of the D losses. targets[:, i] is t(i+1), so depth d reads targets
    shifted by d-1 and predicts them shifted by d. With SGT only the picked targets supervise, each
    with its weight: target j is predicted at position j - d, depth d's head runs there only, and
    its loss is the weighted mean over the picks that have such a position."""
    losses = []
    for d, module in enumerate(model.mtp_modules, start=1):
        x = module(x, model.wte(shift_left(targets, d - 1, fill=0)))
        h = model.ln_f(x)
        target = shift_left(targets, d, fill=-1)
        share = None
        if positions is not None:
            h = gather(h, (positions - d).clamp(min=0))
            target = torch.where(positions >= d, targets.gather(1, positions), -1)
            share = weights
        loss = cross_entropy(model.lm_head(h), target)
        share = (target >= 0).float() if share is None else share * (target >= 0)
        losses.append((share * loss).sum() / share.sum().clamp(min=1e-12))
    return torch.stack(losses).mean()


@torch.no_grad()
def fuse(experts, experts_per_token=1, mtp=0, **moe_config):
    """N models of one shape (compressed or dense) -> one MoEE model: every shared tensor
    (embeddings, attention, norms, step embeddings, their LoRA) is the experts' mean; expert i's
    MLPs (and their LoRA) become expert i of each mixture layer. Routers and MTP modules start
    fresh. A mixture of one expert is that expert. Returns a new GPT."""
    cfg = experts[0].config
    for i, m in enumerate(experts[1:], start=1):
        if m.config != cfg:
            diff = [k for k, v in asdict(cfg).items() if getattr(m.config, k) != v]
            raise ValueError(f"expert {i} differs from expert 0 in {', '.join(diff)}: experts must "
                             f"have one shape")
    if cfg.n_expert or cfg.mtp:
        raise ValueError("fuse takes models without experts or MTP modules")
    fused_cfg = replace(cfg, n_expert=len(experts), experts_per_token=experts_per_token, mtp=mtp,
                        **moe_config)
    fused = GPT(fused_cfg)
    states = [m.state_dict() for m in experts]
    for name, p in fused.state_dict().items():
        # blocks.0.mlp.experts.1.c_fc.weight <- expert 1's blocks.0.mlp.c_fc.weight (adapters: _)
        match = re.search(r"mlp([._])experts[._](\d+)[._]", name)
        if match:
            expert_state = states[int(match.group(2))]
            p.copy_(expert_state[name.replace(match.group(0), "mlp" + match.group(1))])
        elif name in states[0]:
            p.copy_(torch.stack([state[name].float() for state in states]).mean(dim=0))
    return fused


@torch.no_grad()
def soup(models):
    """fuse's control: N models of one shape averaged tensor by tensor (MLPs too) into one model of
    that shape, no router. Is the mixture's routing needed, or is the average as good? A new GPT."""
    out = GPT(models[0].config)
    states = [m.state_dict() for m in models]
    mean = lambda k: torch.stack([state[k].float() for state in states]).mean(dim=0)
    out.load_state_dict({k: mean(k) for k in states[0]})
    return out


# ----------------------------------------------------------------------------
# 6. Counts: parameters and FLOPs


def count_params(model, active=False, non_embedding=False):
    """Parameters, each stored tensor once (a block run several times counts once; step embeddings
    and adapters in full), as nanoGPT counts them: without the position embeddings, the token
    embeddings counted as the head they are tied to. non_embedding: without either embedding table.
    active: what one token uses at inference (experts_per_token experts' MLPs, no MTP modules)."""
    n = -model.wpe.weight.numel() - (model.wte.weight.numel() if non_embedding else 0)
    for name, p in model.named_parameters():
        if active and name.startswith("mtp_modules."):
            continue
        expert = active and re.search(r"mlp[._]experts[._]", name)
        n += p.numel() * (model.config.experts_per_token / model.config.n_expert if expert else 1)
    return int(n)


def flops_per_token(config, sgt_fraction=1.0, training=True, full_head_forward=False):
    """Matmul FLOPs per token from the shapes (2 per multiply-add; attention over the full block, as
    in PaLM); training is 3x the forward. SGT's head runs on a fraction of the positions;
    full_head_forward adds the no-gradient head on every position that the excess and gradient
    selectors need. Every application of an unrolled layer pays (unrolling saves parameters, not
    compute; LoRA merges once per batch). A mixture layer pays for its router and experts_per_token
    experts at inference (what a token needs); in training for every expert's whole buffer,
    capacity padding included. In training each MTP module pays for its projection, block and
    head (with SGT, the head at the picks only)."""
    C, T, V = config.n_embd, config.block_size, config.vocab_size
    attention = 2 * (3 * C * C + C * C) + 2 * 2 * T * C  # qkv, proj; QK^T and AV
    mlp = 2 * 8 * C * C
    k = config.experts_per_token
    # in training each of the E buffers holds capacity_factor x the fair share k N / E (at most N)
    experts = min(config.n_expert, config.capacity_factor * k) if training else k
    moe = experts * mlp + 2 * C * config.n_expert if config.n_expert else mlp
    forward = len(config.applications()) * (attention + moe) + 2 * C * V * sgt_fraction
    if not training:
        return forward
    # each MTP depth: its projection, block and head
    mtp = config.mtp * (2 * 2 * C * C + attention + mlp + 2 * C * V * sgt_fraction)
    return 3 * (forward + mtp) + 2 * C * V * full_head_forward
