"""Independent transcriptions of the published losses' formulas, used only to show that
`fastrank`'s numbers equal theirs (query counted in its own gallery).

Smooth-AP (Brown et al., ECCV 2020, official code): the batch is `num_id` classes of
equal size, stored contiguously; the positive-set ranking is computed per class block
and AP is averaged over the whole batch. ROADMAP (Ramzi et al., NeurIPS 2021): the
`quick_forward` of its SmoothRankAP with the `step_rank` approximation. Written from the
papers' definitions in the structure of that code, not copied from it.
"""
import torch


def _sig(x, temp):
    return 1.0 / (1.0 + torch.exp((-x / temp).clamp(-50, 50)))


def published_smooth_ap(emb: torch.Tensor, num_id: int, anneal: float = 0.01) -> torch.Tensor:
    """Mean Smooth-AP of a batch made of `num_id` contiguous classes of equal size (returns AP, not 1 - AP)."""
    b = emb.shape[0]
    group = b // num_id
    off_diag = 1.0 - torch.eye(b, dtype=emb.dtype)
    sim = emb @ emb.T
    diff = sim.unsqueeze(1) - sim.unsqueeze(2)  # [i, j, k] = s_ik - s_ij
    rank_all = (_sig(diff, anneal) * off_diag).sum(-1) + 1
    blocks = emb.view(num_id, group, -1)
    sim_pos = blocks @ blocks.transpose(1, 2)  # (num_id, group, group)
    diff_pos = sim_pos.unsqueeze(2) - sim_pos.unsqueeze(3)
    pos_off_diag = 1.0 - torch.eye(group, dtype=emb.dtype)
    rank_pos = (_sig(diff_pos, anneal) * pos_off_diag).sum(-1) + 1  # (num_id, group, group)
    ap = emb.new_zeros(())
    for c in range(num_id):
        sl = slice(c * group, (c + 1) * group)
        ap = ap + (rank_pos[c] / rank_all[sl, sl]).sum() / group / b
    return ap


def published_sup_ap(scores: torch.Tensor, target: torch.Tensor, tau=0.01, rho=100.0, delta=0.05, start=0.5):
    """Mean SupAP over the rows of a square (B, B) `scores` with 0/1 `target` (diagonal = 1)."""
    b = scores.shape[0]
    tgt = target.bool()
    mask = 1.0 - torch.eye(b, dtype=scores.dtype)
    diff = scores.unsqueeze(1) - scores.unsqueeze(1).permute(0, 2, 1)  # [i, j, k] = s_ik - s_ij
    comp_pos = tgt.unsqueeze(1).expand_as(diff)  # competitor k is a positive of query i
    offset = _sig(torch.tensor(delta, dtype=scores.dtype), tau) + start
    heav = (diff >= 0).to(scores.dtype)
    neg = torch.where(
        diff > 0,
        torch.where(diff > delta, rho * (diff - delta) + offset, start + _sig(diff, tau)),
        _sig(diff, tau),
    )
    step = torch.where(comp_pos, heav, neg)
    rank_all = (step * mask).sum(-1) + 1
    rank_pos = (step * tgt.unsqueeze(1).to(scores.dtype) * mask).sum(-1) + 1
    ap = ((rank_pos / rank_all) * tgt).sum(1) / tgt.sum(-1)
    return ap.mean()


def published_fastap(emb: torch.Tensor, labels: torch.Tensor, num_bins: int = 10) -> torch.Tensor:
    """Mean FastAP of a batch (Cakir et al.'s formulation as in its reference code): squared
    distances binned with a loop over bin centres, self pairs excluded, queries without a
    positive dropped. Returns AP (not 1 - AP)."""
    n = labels.shape[0]
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(n, dtype=torch.bool)
    i_pos = (same & ~eye).to(emb.dtype)
    i_neg = (~same).to(emb.dtype)
    n_pos = i_pos.sum(1)
    dist = 2 - 2 * emb @ emb.T
    delta = 4.0 / num_bins
    z = torch.linspace(0, 4, steps=num_bins + 1, dtype=emb.dtype)
    h_pos = torch.zeros(n, num_bins + 1, dtype=emb.dtype)
    h_neg = torch.zeros(n, num_bins + 1, dtype=emb.dtype)
    for l in range(num_bins + 1):
        pulse = torch.relu(1 - (dist - z[l]).abs() / delta)
        h_pos[:, l] = (pulse * i_pos).sum(1)
        h_neg[:, l] = (pulse * i_neg).sum(1)
    big_h_pos = torch.cumsum(h_pos, 1)
    big_h = torch.cumsum(h_pos + h_neg, 1)
    ap = h_pos * big_h_pos / big_h
    ap = torch.where(torch.isnan(ap) | torch.isinf(ap), torch.zeros_like(ap), ap)
    ap = ap.sum(1) / n_pos
    return ap[~torch.isnan(ap)].mean()


def published_softbin_ap(scores: torch.Tensor, target: torch.Tensor, nq: int = 25, lo: float = 0.0, hi: float = 1.0):
    """Per-query listwise AP (Revaud et al.'s quantizer as a 1x1 convolution of 2*nq lines):
    bin b centred at hi - b * (hi - lo) / (nq - 1), first and last bins open."""
    gap = hi - lo
    a = (nq - 1) / gap
    w = torch.empty(2 * nq, dtype=scores.dtype)
    b = torch.empty(2 * nq, dtype=scores.dtype)
    w[:nq] = -a
    b[:nq] = a * lo + torch.arange(nq, 0, -1, dtype=scores.dtype)  # rising edges
    w[nq:] = a
    b[nq:] = torch.arange(2 - nq, 2, dtype=scores.dtype) - a * lo  # falling edges
    w[0] = w[-1] = 0  # the end bins are flat: open
    b[0] = b[-1] = 1
    x = scores.unsqueeze(1)  # (N, 1, M)
    q = w.view(1, -1, 1) * x + b.view(1, -1, 1)
    q = torch.min(q[:, :nq], q[:, nq:]).clamp(min=0)  # (N, nq, M)
    nbs = q.sum(-1)
    rec = (q * target.unsqueeze(1).to(scores.dtype)).sum(-1)
    prec = rec.cumsum(-1) / (1e-16 + nbs.cumsum(-1))
    rec = rec / rec.sum(-1, keepdim=True)
    return (prec * rec).sum(-1)


def published_pnp(scores: torch.Tensor, positive: torch.Tensor, valid=None, variant: str = "O", b: float = 2.0,
                  alpha: float = 1.0, anneal: float = 0.01) -> torch.Tensor:
    """Per-query PNP loss (Li et al., AAAI 2022) on a (Q, N) `scores` with a (Q, N) bool
    `positive` and optional (Q, N) bool `valid` (False = left out): for each positive j,
    R(j, S_N) = sum over the query's negatives k of sigma((s_k - s_j) / anneal), the smoothed
    number of negatives ranked before it, and the loss is the mean over the positives of
    PNP-O: R, PNP-Ds: log(1 + R), PNP-Dq: 1 - 1 / (1 + R)^alpha, PNP-Iu: (1 + R) log(1 + R),
    PNP-Ib: (b R - log(1 + b R)) / b^2. Built on the Q x N x N cube of differences, as the
    published code is; 0 for a query without positives."""
    if valid is None:
        valid = torch.ones_like(positive)
    pos = positive & valid
    neg = (~positive & valid).to(scores.dtype)
    diff = scores.unsqueeze(1) - scores.unsqueeze(2)  # [i, j, k] = s_ik - s_ij
    r = (_sig(diff, anneal) * neg.unsqueeze(1)).sum(-1)  # negatives before j, (Q, N)
    if variant == "O":
        f = r
    elif variant == "Ds":
        f = torch.log(1 + r)
    elif variant == "Dq":
        f = 1 - 1 / (1 + r) ** alpha
    elif variant == "Iu":
        f = (1 + r) * torch.log(1 + r)
    elif variant == "Ib":
        f = 1 / b ** 2 * (b * r - torch.log(1 + b * r))
    else:
        raise ValueError(variant)
    n_pos = pos.sum(1)
    return (f * pos).sum(1) / n_pos.clamp(min=1)
