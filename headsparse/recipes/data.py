"""Examples, pools and batches: the one data module of the package (scoring, mining, tuning, recipes, pipeline).

An *example* is a dict with ``input_ids`` (a sequence of token ids) and
optionally ``labels`` (same length; -100 marks positions without loss; absent
= language-model loss on every token). A *pool* is a sequence of examples, or
a (N, S) LongTensor of token ids (every token counts). Batches are padded on
the right; padding never contributes to the loss.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from .._checks import check_int

IGNORE = -100


def vocab_size_of(model) -> Optional[int]:
    """Rows of the model's input embedding (the ids it can take), or None if it has none."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else getattr(getattr(model, "config", None), "vocab_size", None)


def check_token_ids(ids, vocab_size: Optional[int], where: str, field: str = "input_ids",
                    ignore: Optional[int] = None) -> None:
    """ValueError naming ``where`` and ``field`` if an id is outside [0, vocab_size) (``ignore`` is allowed too).

    ``ids`` is a sequence of ints or an integer tensor of any shape.
    """
    if vocab_size is None:
        return
    t = ids if torch.is_tensor(ids) else torch.as_tensor(list(ids), dtype=torch.long)
    if ignore is not None:
        t = t[t != ignore]
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: {field} holds token id {bad}, outside the model's vocabulary of {vocab_size}")


def as_examples(pool, name: str = "pool", vocab_size: Optional[int] = None) -> List[Dict]:
    """Normalise a pool to a list of example dicts, checking it (ValueError naming ``name``, the index, the field).

    With ``vocab_size``, token ids (and labels other than -100) must lie in [0, vocab_size): an out-of-range id
    would otherwise fail deep inside the embedding with an IndexError naming no example.
    """
    if torch.is_tensor(pool):
        if pool.dim() != 2 or pool.dtype not in (torch.int64, torch.int32) or pool.shape[0] == 0 or pool.shape[1] < 2:
            raise ValueError(f"{name}: a tensor pool must be (N, S) integer token ids with N >= 1 and S >= 2, "
                             f"got {tuple(pool.shape)} {pool.dtype}")
        pool = [{"input_ids": row.tolist()} for row in pool]
    if isinstance(pool, (str, bytes, dict)) or not hasattr(pool, "__len__") or not hasattr(pool, "__getitem__"):
        raise ValueError(f"{name} must be a list of examples (dicts with 'input_ids') or an (N, S) tensor, "
                         f"got {type(pool).__name__}")
    if len(pool) == 0:
        raise ValueError(f"{name} is empty")
    out = []
    for i, ex in enumerate(pool):
        if not isinstance(ex, dict) or "input_ids" not in ex:
            raise ValueError(f"{name}[{i}] must be a dict with 'input_ids', got {type(ex).__name__}")
        ids = ex["input_ids"]
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if len(ids) < 2:
            raise ValueError(f"{name}[{i}]: input_ids needs at least 2 tokens, got {len(ids)}")
        labels = ex.get("labels")
        if labels is not None:
            labels = labels.tolist() if torch.is_tensor(labels) else list(labels)
            if len(labels) != len(ids):
                raise ValueError(f"{name}[{i}]: labels has {len(labels)} entries but input_ids has {len(ids)}")
            if all(l == IGNORE for l in labels[1:]):
                raise ValueError(f"{name}[{i}]: labels mark no position (after the first) for the loss")
        check_token_ids(ids, vocab_size, f"{name}[{i}]")
        if labels is not None:
            check_token_ids(labels, vocab_size, f"{name}[{i}]", "labels", ignore=IGNORE)
        d = dict(ex)
        d["input_ids"] = ids
        if labels is not None:
            d["labels"] = labels
        out.append(d)
    return out


def collate(examples: Sequence[Dict], pad_id: int = 0, device=None) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, S) tensors."""
    s = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    ids = torch.full((b, s), int(pad_id), dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    labels = torch.full((b, s), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        lab = e.get("labels")
        labels[i, :n] = torch.tensor(lab if lab is not None else e["input_ids"], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sample over its labelled positions (float32)."""
    lg = logits[:, :-1].float()
    tg = labels[:, 1:]
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=IGNORE, reduction="none")
    tok = tok.view(tg.shape)
    valid = (tg != IGNORE).float()
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def batches(n: int, batch_size: int, order: Optional[Sequence[int]] = None) -> List[List[int]]:
    idx = list(range(n)) if order is None else list(order)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def pad_id_of(model, pad_id: Optional[int]) -> int:
    if pad_id is not None:
        return check_int("pad_id", pad_id, 0)
    cfg = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and v >= 0:
            return v
    return 0
