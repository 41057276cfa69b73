"""Head scoring: ``headsparse.score_heads(model, data, method=...)`` -> :class:`HeadScores`.

Methods (docs/scoring.md has the papers, what is implemented as published and
what is reconstructed):

- ``"gradient"``: Michel et al. 2019 gate gradient E_x |sum_t <O_h, dO_h>|,
  gathered by the headsparse attention backward; per-layer L2 normalisation.
- ``"apt"``: APT's (sum|X|)(sum|G|) salience at the o_proj input + kurtosis
  outlier term, EMA (beta 0.85) across batches.
- ``"hifi"``: HiFi's head graph (reconstructed): singular-value richness,
  Gram-based correlation, personalised PageRank per layer.
- ``"alps"``: ALPS: W1 distance between base and proxy-tuned head weight distributions (GQA-correct).
- ``"random"``: seeded uniform baseline.
"""
from __future__ import annotations

from typing import Optional

from ..data import vocab_size_of
from ._model import iter_batches, model_info, scoring_loss
from .methods import DEFAULTS, resolve_options
from .scores import HeadScores, spearman
from ..._checks import check_int

METHODS = tuple(DEFAULTS)


def score_heads(model, data, method: str = "gradient", *, tokenizer=None, batch_size: int = 8,
                max_length: int = 256, max_samples: Optional[int] = None, seed: int = 0, progress: bool = False,
                loss_fn=None, **options) -> HeadScores:
    """Score every query head of ``model`` on ``data``.

    Args:
        model: an unpatched Hugging Face model of a family ``headsparse.patch`` supports
            (Llama/Mistral/Qwen2/Qwen3/SmolLM2, GPT-2, BERT/RoBERTa/MiniLM, with or without task heads).
        data: an iterable of tokenized batches (dicts with ``input_ids`` (B, S), ``attention_mask``,
            optional ``labels`` / ``token_type_ids``), or a list of texts with ``tokenizer=``.
        method: one of :data:`METHODS`.
        tokenizer, batch_size, max_length: used when ``data`` is a list of texts.
        max_samples: use at most this many samples.
        seed: for ``random`` and the ``alps`` proxy run.
        progress: show a tqdm progress bar over batches.
        loss_fn: optional ``loss_fn(model, batch) -> (B,)`` per-sample losses; default
            :func:`headsparse.recipes.scoring.scoring_loss` (padding excluded).
        **options: method options (see ``headsparse.recipes.scoring.DEFAULTS``); unknown ones raise ValueError.

    Returns:
        :class:`HeadScores` with a (num_layers, num_q_heads) score tensor (higher = more important).
    """
    from . import methods as M

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_int("seed", seed)
    opts = resolve_options(method, options)
    check_int("batch_size", batch_size, 1)
    info = model_info(model)
    device = next(model.parameters()).device
    total = None
    if isinstance(data, (list, tuple)):
        texts = bool(data) and all(isinstance(t, str) for t in data)
        n = min(len(data), max_samples) if texts and max_samples else len(data)
        total = -(-n // batch_size) if texts else len(data)
    counter = M._Counter(iter_batches(data, tokenizer, batch_size, max_length, device, max_samples,
                                      vocab_size_of(model)), progress,
                         desc=f"scoring heads ({method})", total=total)
    extra = {}
    if method == "gradient":
        scores, extra = M.score_gradient(model, info, counter, loss_fn, opts)
    elif method == "apt":
        scores, extra = M.score_apt(model, info, counter, loss_fn, opts)
    elif method == "hifi":
        scores, extra = M.score_hifi(model, info, counter, loss_fn, opts)
    elif method == "alps":
        scores, extra = M.score_alps(model, info, counter, loss_fn, opts, seed=seed)
    else:
        scores = M.score_random(info, seed)
        for _ in counter:  # data size is still recorded
            pass
    recorded = dict(opts)
    if method in ("random", "alps"):
        recorded["seed"] = seed
    return HeadScores(scores, method, recorded, counter.samples, counter.tokens, info.num_kv_heads,
                      info.family.name, extra)


__all__ = ["score_heads", "HeadScores", "METHODS", "DEFAULTS", "spearman", "scoring_loss", "iter_batches",
           "model_info"]
