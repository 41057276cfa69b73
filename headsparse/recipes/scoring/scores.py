"""``HeadScores``: per-(layer, head) importance scores, their provenance, JSON I/O and plans."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional

import torch

from ..._atomic import atomic_write_text

_FORMAT = "headsparse.HeadScores"
_VERSION = 1


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return repr(v)


class HeadScores:
    """Importance of every query head: ``scores`` is a (num_layers, num_q_heads) float tensor, higher = more important.

    Attributes:
        scores: (L, H) float64 tensor.
        method: the scoring method ("gradient", "apt", "hifi", "alps", "random").
        options: the method's options as used (JSON-serialisable).
        num_samples, num_tokens: size of the data the scores were computed on
            (non-padding tokens).
        num_kv_heads, model_family: shape information passed on to plans.
        info: method-specific extras (for example PageRank iterations).
    """

    def __init__(self, scores, method: str, options: Optional[Dict] = None, num_samples: int = 0,
                 num_tokens: int = 0, num_kv_heads: Optional[int] = None, model_family: Optional[str] = None,
                 info: Optional[Dict] = None) -> None:
        s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
        if s.dim() != 2 or s.shape[0] == 0 or s.shape[1] == 0:
            raise ValueError(f"scores must have shape (num_layers, num_q_heads), got {tuple(s.shape)}")
        if not isinstance(method, str):
            raise ValueError(f"method must be a string, got {type(method).__name__}")
        self.scores = s
        self.method = method
        self.options = dict(options or {})
        self.num_samples = int(num_samples)
        self.num_tokens = int(num_tokens)
        self.num_kv_heads = num_kv_heads
        self.model_family = model_family
        self.info = dict(info or {})

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_q_heads(self) -> int:
        return self.scores.shape[1]

    def ranking(self):
        """(layer, head) pairs from most to least important (ties: lower index first)."""
        flat = self.scores.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
        return [divmod(i, self.num_q_heads) for i in order]

    def rank_of(self, layer: int, head: int) -> int:
        """0-based global rank of a head (0 = most important)."""
        return self.ranking().index((layer, head))

    def spearman(self, other: "HeadScores") -> float:
        """Spearman rank correlation with another score table of the same shape (average ranks for ties)."""
        if not isinstance(other, HeadScores) or other.scores.shape != self.scores.shape:
            raise ValueError("spearman: other must be a HeadScores of the same shape")
        return spearman(self.scores.flatten(), other.scores.flatten())

    # ------------------------------------------------------------------ plans
    def to_plan(self, fraction: Optional[float] = None, per_layer_k: Optional[int] = None, *,
                prune_fraction: Optional[float] = None, prune_threshold: Optional[float] = None,
                layers=None, kv_policy: str = "any", **deprecated):
        """``HeadPlan.from_scores(self, ...)``: TRAIN the top ``fraction`` of heads or the top ``per_layer_k`` heads of
        every layer (exactly one), only in ``layers`` if given (placement: for example the top half), optionally PRUNE
        the lowest-scoring ones; the rest FROZEN. The plan takes its family and KV heads from these scores."""
        from ...plan import HeadPlan

        if not torch.isfinite(self.scores).all():
            raise ValueError("to_plan: scores hold NaN or inf")
        return HeadPlan.from_scores(self, fraction=fraction, per_layer_k=per_layer_k, prune_fraction=prune_fraction,
                                    prune_threshold=prune_threshold, layers=layers, kv_policy=kv_policy, **deprecated)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> Dict:
        return {
            "format": _FORMAT, "version": _VERSION, "method": self.method, "options": _jsonable(self.options),
            "num_samples": self.num_samples, "num_tokens": self.num_tokens, "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads, "num_kv_heads": self.num_kv_heads, "model_family": self.model_family,
            "info": _jsonable(self.info), "scores": self.scores.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Dict) -> "HeadScores":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a headsparse HeadScores file (missing format={_FORMAT!r})")
        if d.get("version") != _VERSION:
            raise ValueError(f"unsupported HeadScores version {d.get('version')!r}; this headsparse reads {_VERSION}")
        return cls(d["scores"], d["method"], d.get("options"), d.get("num_samples", 0), d.get("num_tokens", 0),
                   d.get("num_kv_heads"), d.get("model_family"), d.get("info"))

    def save(self, path) -> None:
        """Write JSON (to a temporary file in the same folder, then renamed)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path) -> "HeadScores":
        with open(os.fspath(path)) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"HeadScores JSON does not parse: {exc}") from None
        return cls.from_dict(d)

    # ---------------------------------------------------------------- display
    def summary(self, plan=None) -> str:
        """A per-layer table: mean, max, best head, and (with a plan) the heads it trains."""
        s = self.scores
        lines = [f"HeadScores method={self.method} layers={self.num_layers} q_heads={self.num_q_heads} "
                 f"samples={self.num_samples} tokens={self.num_tokens}",
                 f"{'layer':>5}  {'mean':>10}  {'max':>10}  {'best':>4}" + ("  train" if plan is not None else "")]
        for i in range(self.num_layers):
            row = s[i]
            line = f"{i:>5}  {row.mean().item():>10.4g}  {row.max().item():>10.4g}  {int(row.argmax()):>4}"
            if plan is not None:
                line += "  " + (",".join(str(h) for h in plan.heads(i, "train")) or "-")
            lines.append(line)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"HeadScores(method={self.method!r}, layers={self.num_layers}, q_heads={self.num_q_heads}, "
                f"samples={self.num_samples}, tokens={self.num_tokens})")


def _avg_ranks(x: torch.Tensor) -> torch.Tensor:
    vals = x.tolist()
    order = sorted(range(len(vals)), key=lambda i: vals[i])
    ranks = [0.0] * len(vals)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and vals[order[j + 1]] == vals[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return torch.tensor(ranks, dtype=torch.float64)


def spearman(a, b) -> float:
    """Spearman's rho of two 1-d sequences (Pearson correlation of average ranks)."""
    ra, rb = _avg_ranks(torch.as_tensor(a).flatten()), _avg_ranks(torch.as_tensor(b).flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")
