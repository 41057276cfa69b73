"""``headsparse.mine``: choose the training subset of a pool.

Methods (see ``docs/pipeline.md`` for what is published and what is our reconstruction):

- ``"p2d"`` head-guided mining [reconstruction of P2D, arXiv 2605.21558, whose
  mining score is unpublished]: each sample's signature is its gate gradient
  sum_t <O_h, dO_h> on the plan's TRAIN heads, which the head-sparse attention
  backward gathers for free (:func:`headsparse.record_gate_grads`; one batched
  forward + backward per batch). By default the signature is the absolute
  value (Michel et al.'s per-example head importance), standardised per head
  over the pool (``center=True``); each sample is ranked by the cosine between
  its signature and the mean standardised signature of the small ``target`` set.
- ``"slap"`` batch-aware stratified, diverse, curvature-scored selection (see
  :mod:`headsparse.recipes.mining.slap`); the result carries the batches.
- ``"random"``: a seeded random subset.
- ``"loss"``: the highest per-sample loss under the current model (forward only).
- ``"less"`` [LESS-style, simplified]: per-sample gradients of the trainable
  head slices, Kronecker-sketched (random projection), L2-normalised; score =
  cosine to the mean normalised target gradient. Deviations from LESS: plain
  SGD gradients (no warm-up LoRA run, no Adam preconditioning), one checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ...plan import HeadPlan
from ..data import as_examples, pad_id_of, vocab_size_of
from .features import cached_forward_signature, forward_signature, patched_for, probe
from .slap import SlapSelector
from ..._checks import check_int, check_number

METHODS = ("p2d", "slap", "random", "loss", "less")


@dataclass
class MineResult:
    """The selected subset: ``indices`` into the pool (best first), every pool sample's ``scores``."""

    method: str
    indices: List[int]
    scores: torch.Tensor  # (N,) float64, higher = more wanted
    fraction: float
    time_s: float
    batches: Optional[List[List[int]]] = None  # SLAP: the composed batches (indices into the pool)
    selector: Optional[SlapSelector] = None  # SLAP: for on-policy re-selection in tune()
    info: Dict = field(default_factory=dict)
    cpu_s: float = 0.0  # process CPU time of the selection (all threads), beside the wall time_s

    def subset(self, pool) -> List[Dict]:
        ex = as_examples(pool)
        return [ex[i] for i in self.indices]

    def precision_recall(self, is_target) -> Dict[str, float]:
        """Precision and recall of the selection against a boolean "is a target-task example" per pool sample."""
        t = [bool(x) for x in is_target]
        if len(t) != self.scores.numel():
            raise ValueError(f"is_target has {len(t)} entries but the pool has {self.scores.numel()}")
        hit = sum(t[i] for i in self.indices)
        n_t = sum(t)
        return {"precision": hit / len(self.indices) if self.indices else 0.0,
                "recall": hit / n_t if n_t else 0.0, "selected": len(self.indices), "targets": n_t}


def _check(fraction, method, target, pool):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_number("fraction", fraction, 0, 1, lo_open=True)
    if method in ("p2d", "less") and target is None:
        raise ValueError(f"method {method!r} needs target= (a small set of target-task examples)")


def _top(scores: torch.Tensor, k: int) -> List[int]:
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return order[:k]


SIGNATURES = ("gate", "gate-signed", "fwd")


def p2d_scores(pool_sig: torch.Tensor, target_sig: torch.Tensor, center: bool = True,
               signature: str = "gate") -> torch.Tensor:
    """Cosine affinity of each pool signature to the mean target signature.

    ``signature="gate"`` (default) uses |sum_t <O_h, dO_h>| per head, Michel et
    al.'s per-example head importance (how strongly the sample's loss leans on
    the head, whatever the sign, which flips with the label); "gate-signed"
    keeps the sign; "fwd" is the forward-only mean-pooled output of each TRAIN
    head (:func:`headsparse.recipes.mining.features.forward_signature`). With
    ``center`` each head's column is standardised over the pool first, so the
    affinity measures "uses the task heads more than the pool does".
    """
    if signature not in SIGNATURES:
        raise ValueError(f"signature must be one of {SIGNATURES}, got {signature!r}")
    p, t = pool_sig.double(), target_sig.double()
    if signature == "gate":
        p, t = p.abs(), t.abs()
    if center:
        mu, sd = p.mean(0), p.std(0, unbiased=False).clamp_min(1e-12)
        p, t = (p - mu) / sd, (t - mu) / sd
    proto = t.mean(0, keepdim=True)
    return F.cosine_similarity(p, proto.expand_as(p), dim=1, eps=1e-12)


def mine(model, pool, plan: HeadPlan, method: str = "p2d", fraction: float = 0.1, target=None, *,
         batch_size: int = 8, pad_id: Optional[int] = None, seed: int = 0, center: bool = True,
         signature: str = "gate",
         sketch_k: int = 8, slap_options: Optional[Dict] = None, progress: bool = False,
         cache_dir=None, prefix_cache=None) -> MineResult:
    """Select ``fraction`` of ``pool`` for training ``plan``'s heads of ``model`` (see the module docstring).

    Args:
        model: a Hugging Face causal LM supported by :func:`headsparse.patch`, patched
            with ``plan`` or not (then a patched copy is used; ``model`` is untouched).
        pool: list of examples (dicts with ``input_ids``, optional ``labels``) or an (N, S) tensor.
        plan: the :class:`headsparse.HeadPlan` whose TRAIN heads define the signatures / trainable slices.
        method: "p2d", "slap", "random", "loss" or "less".
        fraction: share of the pool to select, in (0, 1] (at least one sample).
        target: a small set of target-task examples (needed by "p2d" and "less").
        signature: P2D's per-(sample, TRAIN head) signature: "gate" (|gate gradient|, a forward and a
            backward per batch), "gate-signed", or "fwd" (forward-only pooled head outputs, no backward, no
            LM head, stopping after the highest TRAIN layer).
        cache_dir: with ``signature="fwd"`` on an unpatched model, keep every head's pool signature there
            (:func:`headsparse.recipes.mining.features.cached_forward_signature`): a later call on the same model and
            pool, with any plan, skips the pool's forward. ``info`` gets "cache" (hit/miss) and
            "signature_s" (seconds spent computing the pool signature, 0 on a hit).
        prefix_cache: with ``signature="fwd"``, a :class:`headsparse.PrefixCache` that the pool's forward fills
            with each example's hidden state at the plan's gradient horizon (on ``model`` if it is patched with
            ``plan``, else on a patched copy, which also gives the signatures: the plan's pruned heads are
            removed there, as in training); only the selected examples' entries are kept. Pass it to
            :func:`headsparse.tune` (``prefix_cache=``) with the selected examples and the model patched with the
            same plan: their first epoch starts from it. Its time is part of this selection's ``time_s``.
    """
    _check(fraction, method, target, pool)
    if prefix_cache is not None:
        from ...patch.prefix_cache import PrefixCache

        if not isinstance(prefix_cache, PrefixCache):
            raise ValueError(f"prefix_cache must be a headsparse.PrefixCache or None, got {type(prefix_cache).__name__}")
        if method != "p2d" or signature != "fwd" or cache_dir is not None:
            raise ValueError("prefix_cache is filled by P2D's forward signature: it needs method='p2d', "
                             "signature='fwd' and no cache_dir")
    if signature not in SIGNATURES:
        raise ValueError(f"signature must be one of {SIGNATURES}, got {signature!r}")
    vocab = vocab_size_of(model)
    examples = as_examples(pool, "pool", vocab)
    tgt = as_examples(target, "target", vocab) if target is not None else None
    if not isinstance(plan, HeadPlan):
        raise ValueError(f"plan must be a headsparse.HeadPlan, got {type(plan).__name__}")
    check_int("batch_size", batch_size, 1)
    check_int("sketch_k", sketch_k, 1)
    if slap_options is not None:
        import inspect

        allowed = set(inspect.signature(SlapSelector.__init__).parameters) - {"self", "examples", "plan", "fraction"}
        if not isinstance(slap_options, dict) or set(slap_options) - allowed:
            raise ValueError(f"slap_options must be a dict with keys among {sorted(allowed)}, got {slap_options!r}")
    k = max(1, int(round(fraction * len(examples))))
    pad = pad_id_of(model, pad_id)
    t0, c0 = time.perf_counter(), time.process_time()
    info: Dict = {}
    batches = selector = None
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(len(examples), generator=g, dtype=torch.float64)
    elif method == "loss":
        with patched_for(model, plan) as m:
            f = probe(m, examples, batch_size=batch_size, pad_id=pad, backward=False, progress=progress,
                      desc="loss probe")
        scores = f["loss"].double()
    elif method == "p2d" and signature == "fwd":
        if cache_dir is not None:
            sp, info["cache"], info["signature_s"] = cached_forward_signature(
                model, examples, plan, cache_dir, batch_size=batch_size, pad_id=pad, progress=progress)
        elif prefix_cache is not None:
            with patched_for(model, plan) as m:
                here = prefix_cache.attached is None
                prefix_cache.attach(m)
                try:
                    sp = forward_signature(m, examples, plan, batch_size=batch_size, pad_id=pad, progress=progress,
                                           desc="p2d pool (fwd, filling the prefix cache)")
                finally:
                    if here:
                        prefix_cache.detach()
                # the target's signature from the same (patched) model as the pool's
                st = forward_signature(m, tgt, plan, batch_size=batch_size, pad_id=pad, desc="p2d target (fwd)")
        else:
            sp = forward_signature(model, examples, plan, batch_size=batch_size, pad_id=pad, progress=progress,
                                   desc="p2d pool (fwd)")
        if prefix_cache is None:
            st = forward_signature(model, tgt, plan, batch_size=batch_size, pad_id=pad, desc="p2d target (fwd)")
        scores = p2d_scores(sp, st, center, signature)
        info["signature_dim"] = int(sp.shape[1])
    elif method == "p2d":
        with patched_for(model, plan) as m:
            fp = probe(m, examples, batch_size=batch_size, pad_id=pad, gate=True, progress=progress, desc="p2d pool")
            ft = probe(m, tgt, batch_size=batch_size, pad_id=pad, gate=True, progress=progress, desc="p2d target")
        scores = p2d_scores(fp["gate"], ft["gate"], center, signature)
        info["signature_dim"] = int(fp["gate"].shape[1])
    elif method == "less":
        with patched_for(model, plan) as m:
            fp = probe(m, examples, batch_size=batch_size, pad_id=pad, sketch_k=sketch_k, seed=seed,
                       progress=progress, desc="less pool")
            ft = probe(m, tgt, batch_size=batch_size, pad_id=pad, sketch_k=sketch_k, seed=seed,
                       progress=progress, desc="less target")
        gp = F.normalize(fp["sketch"].double(), dim=1)
        gt = F.normalize(ft["sketch"].double(), dim=1).mean(0, keepdim=True)
        scores = (gp @ F.normalize(gt, dim=1).t()).flatten()
        info["feature_dim"] = int(fp["sketch"].shape[1])
    else:  # slap
        opts = dict(batch_size=batch_size, sketch_k=sketch_k, probe_batch_size=batch_size, pad_id=pad_id,
                    seed=seed, progress=progress)
        opts.update(slap_options or {})
        selector = SlapSelector(examples, plan, fraction, **opts)
        batches = selector.select(model)
        scores = selector.last["sample_scores"]
        chosen = [i for b in batches for i in b]
        elapsed = time.perf_counter() - t0
        return MineResult(method, chosen, scores, float(fraction), elapsed, batches, selector,
                          {"batch_scores": selector.last["batch_scores"]}, time.process_time() - c0)
    chosen = _top(scores, k)
    if prefix_cache is not None:
        prefix_cache.retain([examples[i] for i in chosen])  # the pool's other entries are not trained on
        info["prefix_cache"] = prefix_cache.stats()
    elapsed = time.perf_counter() - t0
    if method == "p2d":
        info["signature"] = signature
    return MineResult(method, chosen, scores.double(), float(fraction), elapsed, None, None, info,
                      time.process_time() - c0)
