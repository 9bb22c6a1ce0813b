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
