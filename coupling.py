"""
Gradient coupling, the mechanism of SGT's claim: a step on the supervised targets' loss lowers the
unsupervised targets' loss to first order when their expected gradients point the same way,
E[g_S] . E[g_U] > 0. gamma is that coupling as a cosine, measured without batch noise (a product of
two independent batches' gradients estimates the product of the expected gradients without bias),
and with a jackknife error bar. train.py reads it at each SGT evaluation; studies/sgt.py with more
batches. A measurement, not part of the model: cherry.py holds what trains.
"""

import math

import torch


def split_gradients(model, x, y, mask):
    """g_S and g_U: the gradients of the mean loss of the selected targets (mask) and of the others.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    losses = model.token_losses(x, y)
    grads = [torch.autograd.grad(losses[part].mean(), params, retain_graph=keep, allow_unused=True)
             for part, keep in ((mask, True), (~mask, False))]
    # a parameter one part's loss does not reach gets a zero gradient, not None
    return [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in grads]


def gradient_coupling(model, batches):
    """gamma, the coupling of g_S with g_U without batch noise, from independent batches [(x, y,
    mask)]: mean_{i != j} g_S^i . g_U^j / sqrt(mean_{i != j} g_S^i . g_S^j x mean_{i != j} g_U^i .
    g_U^j), since two independent batches' product estimates the expected gradients' product without
    bias (one batch's cosine is pulled to 0 by its noise). gamma > 0: a step on the selected targets
    lowers the others' loss to first order. For the whole model, the trunk (the blocks) and
    embedding + head (the rest), nan where noise leaves it undefined; naive: batch 0's cosine."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trunk = [n.startswith(("blocks.", "adapters.", "step_embed")) for n in names]
    parts = {"trunk": trunk, "embedding+head": [not t for t in trunk]}
    sums = {part: dict(s=0, u=0, ss=0, uu=0, su=0) for part in parts}  # sums over the batches
    for i, (x, y, mask) in enumerate(batches):
        g_s, g_u = split_gradients(model, x, y, mask)
        for part, keep in parts.items():
            flat = lambda grads: torch.cat([g.flatten().double() for g, k in zip(grads, keep) if k])
            s, u = flat(g_s), flat(g_u)
            for key, value in dict(s=s, u=u, ss=s @ s, uu=u @ u, su=s @ u).items():
                sums[part][key] = sums[part][key] + value
        if i == 0:
            naive = [sum(sums[part][key] for part in parts) for key in ("ss", "uu", "su")]
    # over the pairs i != j: sum a^i . b^j = (sum_i a^i) . (sum_j b^j) - sum_i a^i . b^i
    pairs = {part: (a["s"] @ a["s"] - a["ss"], a["u"] @ a["u"] - a["uu"], a["s"] @ a["u"] - a["su"])
             for part, a in sums.items()}
    pairs.update(all=[sum(pairs[part][i] for part in parts) for i in range(3)], naive=naive)
    return {part: (su / (ss * uu).sqrt()).item() if ss > 0 and uu > 0 else math.nan
            for part, (ss, uu, su) in pairs.items()}


def batch_gradients(model, batches):
    """g_S and g_U of each batch [(x, y, mask)], flattened over the model: two (n, P) tensors."""
    grads = [split_gradients(model, x, y, mask) for x, y, mask in batches]
    flat = lambda i: torch.stack([torch.cat([g.flatten() for g in pair[i]]) for pair in grads])
    return flat(0).double(), flat(1).double()


def coupling_with_error(g_s, g_u):
    """The coupling with an error bar, from the gradients (n, P) of n >= 3 independent batches
    (batch_gradients): the numerator E[g_S] . E[g_U] (the sign Theorem 1 needs), the mean over
    pairs i != j of g_S^i . g_U^j, and gamma, the ratio of the pooled pair sums (as in
    gradient_coupling), each with a jackknife standard error over the batches. gamma is undefined
    where noise makes a pooled like-pair sum non-positive; undefined counts the n + 1 estimates
    (all batches, then each left out) where it is, and gamma_se is nan if any is."""
    n = len(g_s)
    grams = [g_s @ g_s.T, g_u @ g_u.T, g_s @ g_u.T]

    def estimate(keep):  # sum over pairs i != j of the kept batches: the block less its diagonal
        ss, uu, su = (g[keep][:, keep].sum() - g.diagonal()[keep].sum() for g in grams)
        gamma = (su / (ss * uu).sqrt()).item() if ss > 0 and uu > 0 else math.nan
        return (su / (len(keep) * (len(keep) - 1))).item(), gamma

    numerator, gamma = estimate(list(range(n)))
    left_out = [estimate([j for j in range(n) if j != i]) for i in range(n)]

    def jackknife(values):  # sqrt((n - 1) / n * sum (theta_i - mean)^2)
        mean = sum(values) / n
        return math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in values))
    undefined = sum(math.isnan(g) for _, g in left_out) + math.isnan(gamma)
    return {"numerator": numerator, "numerator_se": jackknife([v for v, _ in left_out]),
            "gamma": gamma, "gamma_se": jackknife([g for _, g in left_out]), "undefined": undefined,
            "batches": n}
