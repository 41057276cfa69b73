"""SLAP-style batch-aware selection (a reconstruction; only the paper's abstract is public).

SLAP (arXiv 2605.23969, "Stratified Loss-based Pruning for On-Policy
Data-Efficient Instruction Tuning") scores whole batch compositions: stratified
sampling to cover the distribution, intra-batch diversity by "relative distance
optimisation", and dynamic batch choice from Hessian-approximated gradient
information, re-selected on-policy. Our reconstruction, every choice a parameter:

1. Probe the pool with the *current* model (one batched forward + backward per
   batch, :func:`headsparse.recipes.mining.features.probe`): per-sample loss, a
   mean-pooled last-hidden-state embedding, and a Kronecker sketch of each
   sample's gradient on the trainable head slices.
2. Strata: ``n_strata`` loss quantiles ("loss-based"); the budget is split
   across strata in proportion to their size (largest remainder), so the
   selection covers the loss distribution.
3. Relative distance: cosine distance of the embeddings divided by the
   pool's median pairwise distance (scale-free). A candidate batch is grown
   greedily from a random seed: each step adds, from the stratum with the most
   remaining quota relative to its allocation, the sample with the largest
   minimum relative distance to the batch (farthest-point), so batches
   are diverse and stratified.
4. Curvature score: diagonal empirical Fisher F = mean_i g_i^2 of the sketched
   per-sample gradients (a Gauss-Newton diagonal in sketch space); a batch B
   with mean gradient g_B scores 0.5 * g_B^T (F + lambda * mean(F))^-1 g_B,
   the loss decrease a damped diagonal Gauss-Newton step predicts. Of
   ``n_candidates`` diverse candidate batches the best-scoring is kept and its
   samples leave the pool; repeat until the budget is used.
5. On-policy: :meth:`SlapSelector.select` re-probes with the model as it is
   now; :func:`headsparse.tune` calls it at the start of every epoch after the
   first when given a selector.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ...plan import HeadPlan
from ..data import as_examples, pad_id_of
from .features import patched_for, probe
from ..._checks import check_int


def relative_distances(emb: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """(N, N) cosine distances divided by ``scale`` (default: the median off-diagonal distance)."""
    e = F.normalize(emb.double(), dim=1)
    d = (1 - e @ e.t()).clamp_min(0)
    if scale is None:
        n = d.shape[0]
        off = d[~torch.eye(n, dtype=torch.bool)]
        scale = float(off.median()) if off.numel() else 1.0
    return d / (scale if scale > 0 else 1.0)


def mean_intra_batch_distance(dist: torch.Tensor, batches: Sequence[Sequence[int]]) -> float:
    """Mean pairwise distance inside batches (pairs of distinct members), averaged over all pairs."""
    tot, cnt = 0.0, 0
    for b in batches:
        b = list(b)
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                tot += float(dist[b[i], b[j]])
                cnt += 1
    return tot / cnt if cnt else 0.0


def loss_strata(loss: torch.Tensor, n_strata: int) -> torch.Tensor:
    """Stratum id (0 = lowest loss) of each sample by loss quantiles."""
    n = loss.numel()
    order = torch.argsort(loss, stable=True)
    strata = torch.empty(n, dtype=torch.long)
    strata[order] = torch.arange(n) * n_strata // max(n, 1)
    return strata


def _allocate(sizes: List[int], budget: int) -> List[int]:
    total = sum(sizes)
    raw = [budget * s / total for s in sizes]
    alloc = [min(int(math.floor(r)), s) for r, s in zip(raw, sizes)]
    rest = sorted(range(len(sizes)), key=lambda i: -(raw[i] - math.floor(raw[i])))
    for i in rest:
        if sum(alloc) >= budget:
            break
        if alloc[i] < sizes[i]:
            alloc[i] += 1
    return alloc


def compose_batches(dist: torch.Tensor, strata: torch.Tensor, grads: Optional[torch.Tensor], budget: int,
                    batch_size: int, n_candidates: int = 4, damping: float = 0.1,
                    generator: Optional[torch.Generator] = None):
    """Greedy stratified, diverse, curvature-scored batches (steps 2-4 of the module docstring).

    Returns (batches, batch_scores, sample_scores): a list of index lists, the
    curvature score of each chosen batch, and per-sample scores (the score of
    the batch a sample was chosen in; -inf for unchosen samples).
    """
    n = dist.shape[0]
    gen = generator or torch.Generator().manual_seed(0)
    n_strata = int(strata.max()) + 1 if n else 0
    sizes = [int((strata == s).sum()) for s in range(n_strata)]
    quota = _allocate(sizes, budget)
    taken = [0] * n_strata
    available = torch.ones(n, dtype=torch.bool)
    if grads is not None and grads.numel():
        g = grads.double()
        fisher = (g * g).mean(0)
        inv = 1.0 / (fisher + damping * fisher.mean().clamp_min(1e-30))
    batches: List[List[int]] = []
    batch_scores: List[float] = []
    sample_scores = torch.full((n,), -math.inf, dtype=torch.float64)
    remaining = budget
    while remaining > 0:
        size = min(batch_size, remaining)
        best, best_score = None, -math.inf
        for _ in range(max(1, n_candidates)):
            cand = _grow(dist, strata, quota, taken, available, size, gen)
            if not cand:
                break
            score = 0.0
            if grads is not None and grads.numel():
                gb = g[cand].mean(0)
                score = float(0.5 * (gb * gb * inv).sum())
            if score > best_score or best is None:
                best, best_score = cand, score
        if not best:
            break
        for i in best:
            available[i] = False
            taken[int(strata[i])] += 1
            sample_scores[i] = best_score
        batches.append(best)
        batch_scores.append(best_score)
        remaining -= len(best)
    return batches, batch_scores, sample_scores


def _grow(dist, strata, quota, taken, available, size, gen) -> List[int]:
    avail = available.clone()
    local_taken = list(taken)
    batch: List[int] = []
    mind = None
    for step in range(size):
        # stratum with the most remaining quota relative to its allocation (ties: lower stratum)
        open_strata = [s for s in range(len(quota)) if quota[s] - local_taken[s] > 0 and bool((avail & (strata == s)).any())]
        if not open_strata:
            open_strata = [s for s in range(len(quota)) if bool((avail & (strata == s)).any())]
            if not open_strata:
                break
        s = max(open_strata, key=lambda t: ((quota[t] - local_taken[t]) / max(quota[t], 1), -t))
        cands = torch.nonzero(avail & (strata == s)).flatten()
        if step == 0:
            pick = int(cands[torch.randint(len(cands), (1,), generator=gen)])
        else:
            pick = int(cands[torch.argmax(mind[cands])])
        batch.append(pick)
        avail[pick] = False
        local_taken[s] += 1
        mind = dist[pick].clone() if mind is None else torch.minimum(mind, dist[pick])
    return batch


class SlapSelector:
    """On-policy SLAP selection over a fixed pool; call :meth:`select` with the current model."""

    def __init__(self, pool, plan: HeadPlan, fraction: float = 0.1, *, batch_size: int = 8, n_strata: int = 4,
                 n_candidates: int = 4, sketch_k: int = 8, damping: float = 0.1, probe_batch_size: int = 8,
                 pad_id: Optional[int] = None, seed: int = 0, progress: bool = False) -> None:
        self.examples = as_examples(pool)
        if not isinstance(plan, HeadPlan):
            raise ValueError(f"plan must be a headsparse.HeadPlan, got {type(plan).__name__}")
        for name, v in (("batch_size", batch_size), ("n_strata", n_strata), ("n_candidates", n_candidates),
                        ("sketch_k", sketch_k), ("probe_batch_size", probe_batch_size)):
            check_int(name, v, 1)
        self.plan, self.fraction = plan, fraction
        self.budget = max(1, int(round(fraction * len(self.examples))))
        self.batch_size, self.n_strata, self.n_candidates = batch_size, n_strata, n_candidates
        self.sketch_k, self.damping, self.probe_batch_size = sketch_k, damping, probe_batch_size
        self.pad_id, self.seed, self.progress = pad_id, seed, progress
        self.rounds = 0
        self.last: Dict = {}

    def select(self, model) -> List[List[int]]:
        """Probe the pool with ``model`` (patched or not) and compose this round's batches (indices into the pool)."""
        pad = pad_id_of(model, self.pad_id)
        with patched_for(model, self.plan) as m:
            f = probe(m, self.examples, batch_size=self.probe_batch_size, pad_id=pad, sketch_k=self.sketch_k,
                      hidden=True, seed=self.seed, progress=self.progress, desc=f"slap probe (round {self.rounds})")
        dist = relative_distances(f["hidden"])
        strata = loss_strata(f["loss"], self.n_strata)
        gen = torch.Generator().manual_seed(self.seed + 7919 * self.rounds)
        batches, bscores, sscores = compose_batches(dist, strata, f["sketch"], self.budget, self.batch_size,
                                                    self.n_candidates, self.damping, gen)
        self.rounds += 1
        self.last = {"features": f, "dist": dist, "strata": strata, "batches": batches, "batch_scores": bscores,
                     "sample_scores": sscores}
        return batches
