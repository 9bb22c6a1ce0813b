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


def published_sup_ap(scores: torch.Tensor, target: torch.Tensor, tau=0.01, rho=100.0, delta=0.05, start=0.5,
                     offset=None):
    """Mean SupAP over the rows of a square (B, B) `scores` with 0/1 `target` (diagonal = 1).
    `offset` None: sigma_tau(delta) + start (ROADMAP's default); the yaml configs set it (1.44)."""
    b = scores.shape[0]
    tgt = target.bool()
    mask = 1.0 - torch.eye(b, dtype=scores.dtype)
    diff = scores.unsqueeze(1) - scores.unsqueeze(1).permute(0, 2, 1)  # [i, j, k] = s_ik - s_ij
    comp_pos = tgt.unsqueeze(1).expand_as(diff)  # competitor k is a positive of query i
    if offset is None:
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


def published_patel_recall(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 2, 4, 8, 16), anneal=0.01, temp=1.0):
    """Mean Recall@k surrogate of Patel et al. (CVPR 2022) over a square (B, B) in-batch `scores`:
    every item is ranked by sigmoid rank sums over all other items, the query itself included as a
    competitor; the positives are the other items of the query's class (the query is not one of
    them); per k the soft count of positives within rank k is clamped at k and divided by
    min(k, |P|). Queries without positives are dropped. Returns recall (not 1 - recall)."""
    b = scores.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    diff = scores.unsqueeze(1) - scores.unsqueeze(2)  # [i, j, k] = s_ik - s_ij
    ranks = 1 + (_sig(diff, anneal) * (~eye).to(scores.dtype)).sum(-1)  # k != j
    pos = (labels.view(-1, 1) == labels.view(1, -1)) & ~eye
    n_pos = pos.sum(1).to(scores.dtype)
    total = torch.zeros(b, dtype=scores.dtype)
    for k in ks:
        hit = (torch.sigmoid((k - ranks) / temp) * pos.to(scores.dtype)).sum(1).clamp(max=k)
        total = total + hit / n_pos.clamp(max=k).clamp(min=1)
    keep = n_pos > 0
    return (total / len(ks))[keep].mean()


def published_allrank_approx_ndcg(y_pred, y_true, eps=1e-10, padded_value_indicator=-1, alpha=1.0):
    """Mean approximate NDCG of allRank's `approxNDCGLoss` (allegro/allRank, from Qin et al. 2010),
    returned as NDCG (allRank returns its negative), step for step as that function computes it
    (checked against its source, allrank/models/losses/approxNDCG.py): padded items (y_true ==
    padded_value_indicator) are set to -inf, the slate is sorted by prediction, pairs holding a
    padded item are masked, labels clamped at 0; gains 2^y - 1 over max(ideal DCG, eps), the
    ideal DCG from the sorted labels at log2(1 + position); approx position = 1 + sum over the
    other unpadded items of sigmoid(-alpha (s_j - s_k)) floored at eps; the mean over every slate
    of sum(G / log2(1 + approx position))."""
    y_pred = y_pred.clone()
    y_true = y_true.clone().to(y_pred.dtype)
    pad = y_true == padded_value_indicator
    y_pred[pad] = float("-inf")
    y_true[pad] = float("-inf")
    pred_sorted, order = y_pred.sort(descending=True, dim=-1)
    true_sorted, _ = y_true.sort(descending=True, dim=-1)
    true_by_pred = torch.gather(y_true, 1, order)
    true_diffs = true_by_pred[:, :, None] - true_by_pred[:, None, :]
    pair_mask = torch.isfinite(true_diffs)
    pair_mask.diagonal(dim1=-2, dim2=-1).zero_()
    true_by_pred = true_by_pred.clamp(min=0.0)
    true_sorted = true_sorted.clamp(min=0.0)
    positions = torch.arange(1, y_pred.shape[1] + 1, dtype=y_pred.dtype)
    disc = torch.log2(1.0 + positions)[None, :]
    max_dcg = ((torch.pow(2, true_sorted) - 1) / disc).sum(-1).clamp(min=eps)
    gains = (torch.pow(2, true_by_pred) - 1) / max_dcg[:, None]
    diffs = pred_sorted[:, :, None] - pred_sorted[:, None, :]
    diffs[~pair_mask] = 0.0
    approx_pos = 1.0 + (pair_mask.to(y_pred.dtype) * torch.sigmoid(-alpha * diffs).clamp(min=eps)).sum(-1)
    ndcg = (gains / torch.log2(1.0 + approx_pos)).sum(-1)
    return ndcg.mean()


def _tfr_valid(labels, logits):
    """TF-Ranking's handling of invalid entries (label < 0): label 0, logit 1000 below the list's minimum."""
    valid = labels >= 0
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    logits = torch.where(valid, logits, logits.amin(-1, keepdim=True) - 1e3)
    nonzero = labels.sum(1) > 0
    labels = torch.where(nonzero[:, None], labels, torch.full_like(labels, 1e-10))
    return labels, logits, nonzero


def _tfr_approx_ranks(logits, alpha):
    """TF-Ranking's utils.approx_ranks: sum_k sigmoid(alpha (s_k - s_j)) over every k, itself
    included (sigmoid(0) = 1/2), plus 1/2."""
    x = logits.unsqueeze(2)  # [b, j, .]
    y = logits.unsqueeze(1)  # [b, ., k]
    return torch.sigmoid(alpha * (y - x)).sum(-1) + 0.5


def published_tfr_approx_ndcg(labels, logits, alpha=10.0):
    """Per-list (NDCG, weight) of TF-Ranking's ApproxNDCGLoss (losses_impl; the loss is -NDCG, the
    weight 0 for a list without a relevant label): gains 2^y - 1, discounts 1/ln(1 + rank) over the
    ideal DCG with the same discount (the log base cancels)."""
    labels, logits, nonzero = _tfr_valid(labels, logits)
    ranks = _tfr_approx_ranks(logits, alpha)
    dcg = ((torch.pow(2.0, labels) - 1) / torch.log1p(ranks)).sum(-1)
    ideal = labels.sort(dim=-1, descending=True).values
    pos = torch.arange(1, labels.shape[1] + 1, dtype=labels.dtype)
    max_dcg = ((torch.pow(2.0, ideal) - 1) / torch.log1p(pos)).sum(-1)
    inv = torch.where(max_dcg > 0, 1.0 / max_dcg, torch.zeros_like(max_dcg))
    return dcg * inv, nonzero.to(labels.dtype)


def published_tfr_approx_mrr(labels, logits, alpha=10.0):
    """Per-list (MRR, weight) of TF-Ranking's ApproxMRRLoss: sum_j y_j / rank_j over sum_j y_j
    (the loss is -MRR, the weight 0 for a list without a relevant label)."""
    labels, logits, nonzero = _tfr_valid(labels, logits)
    rr = 1.0 / _tfr_approx_ranks(logits, alpha)
    return (rr * labels).sum(-1) / labels.sum(-1), nonzero.to(labels.dtype)


# --------------------------------------------------------------------------- HAPPIER (Ramzi et al., ECCV 2022)
#
# Its H-AP surrogate (the `quick_forward` of SmoothRankHAP): `target` holds the hierarchy level
# each item shares with the query and decides which step a pair gets; `relevances` only weigh.
# Per query i, ranked item j, competitor k != j, d = s_ik - s_ij:
#   rank  = 1 + sum_k [t_k < t_j ? step_rank(d) : H(d)]
#   hrank = rel_j + sum_k min(rel_j, rel_k) [t_k > t_j and with_hrank ? step_hrank(d) : H(d)]
#   H-AP  = sum_j hrank / rank / sum_j rel_j   (over every item j, as the code sums)
# Written from the paper and the structure of that code, not copied from it.


def published_happier_hap(scores, target, relevances, tau=0.01, rho=100.0, offset=1.44, delta=0.05, start=0.5,
                          with_hrank=False, beta=None, leak=None, gamma=None):
    """(B,) H-AP of square (B, B) `scores` (the batch against itself), integer levels `target`
    and float `relevances` (HAPPIER's HAPLoss with return_type "HAP")."""
    b = scores.shape[0]
    off_diag = 1.0 - torch.eye(b, dtype=scores.dtype)
    diff = scores.unsqueeze(1) - scores.unsqueeze(2)  # [i, j, k] = s_ik - s_ij
    t_j, t_k = target.unsqueeze(2), target.unsqueeze(1)
    if offset is None:
        offset = _sig(torch.tensor(delta, dtype=scores.dtype), tau) + start
    heav = (diff >= 0).to(scores.dtype)
    smooth = torch.where(
        diff > 0,
        torch.where(diff > delta, rho * (diff - delta) + offset, start + _sig(diff, tau)),
        _sig(diff, tau),
    )
    rank = 1 + (torch.where(t_j > t_k, smooth, heav) * off_diag).sum(-1)
    if with_hrank:
        up = torch.ones_like(diff) if gamma > 1.0 else torch.clamp(beta * diff + gamma, max=1.0)
        plus = torch.where(diff > 0, up, diff * leak)
        hstep = torch.where(t_k > t_j, plus, heav)
    else:
        hstep = heav
    min_rel = torch.minimum(relevances.unsqueeze(2), relevances.unsqueeze(1))
    hrank = relevances + (hstep * min_rel * off_diag).sum(-1)
    return (hrank / rank).sum(-1) / relevances.sum(-1)


def published_happier_relevance_pop(target, levels, alpha=1.0):
    """HAPPIER's "pop" relevance of integer levels `target` (B, N) in {0, ..., levels}: the weight
    (t / (levels - 1))^alpha of level t shared by the row's items at that level."""
    out = torch.zeros(target.shape, dtype=torch.float64)
    for i in range(target.shape[0]):
        for t in range(levels + 1):
            at = target[i] == t
            if at.any():
                out[i][at] = (t / (levels - 1)) ** alpha / at.sum().item()
    return out


def published_happier_relevance_map(target, weights):
    """HAPPIER's "map" relevance: level t gets sum_{m=1..t} weights[m-1] / #(row items at level >= m)."""
    out = torch.zeros(target.shape, dtype=torch.float64)
    for i in range(target.shape[0]):
        for j in range(target.shape[1]):
            t = int(target[i, j])
            out[i, j] = sum(weights[m - 1] / (target[i] >= m).sum().item() for m in range(1, t + 1))
    return out
