"""Argument checking and the normalised description of one attention call.

Every backend receives an :class:`AttentionProblem`: the inputs in a known
layout plus the head bookkeeping (which query heads run, which need a
backward, which KV head each reads). Checking happens once, here, so that the
kernels can assume well-formed input.

Names, here and in every module of the op: ``grad_heads`` / ``pruned_heads`` are bool masks over the query heads
(one entry per head, as :func:`headsparse.attention` takes them); a name ending in ``_idx`` holds absolute head
indices (``grad_idx``: the query heads in the backward); a name ending in ``_pos`` holds positions in a compact
tensor (``kv_pos``: where a grad head's KV head sits among the KV heads kept for the backward).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._checks import check_number

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OUT_LAYOUTS = ("bhsd", "bshd")


@dataclass(frozen=True)
class HeadIndex:
    """Index tensors that describe which heads run and which take part in the backward.

    Built on the host from the head masks and cached, so a model that calls
    the op with the same plan every step pays for it once and never makes the
    device synchronise (no ``nonzero``/``unique`` on device tensors per call).
    """

    kv_head_index: torch.Tensor  # (Hq,) KV head read by each query head
    active_idx: torch.Tensor  # query heads that are computed (not pruned)
    pruned_idx: torch.Tensor  # query heads that are not computed
    grad_idx: torch.Tensor  # query heads in the backward (subset of active_idx)
    kv_needed: torch.Tensor  # KV heads read by some grad head, sorted (absolute indices)
    kv_pos: torch.Tensor  # for each grad head, the position of its KV head in kv_needed
    lse_pos: torch.Tensor  # for each grad head, its position among the active heads
    all_q: bool  # every query head is in the backward
    all_kv: bool  # every KV head is in the backward


def head_index_lists(grad_heads: Sequence[bool], active_heads: Sequence[bool],
                     kv_map: Sequence[int]) -> Dict[str, List[int]]:
    """The head indices of :class:`HeadIndex` as Python lists (also what the torch.library op saves by), from the
    bool masks of the grad and the active (unpruned) heads and the KV head of each query head."""
    grad_heads = tuple(g and a for g, a in zip(grad_heads, active_heads))  # a pruned head has nothing to differentiate
    active_idx = [h for h, a in enumerate(active_heads) if a]
    grad_idx = [h for h, g in enumerate(grad_heads) if g]
    kv_needed = sorted({kv_map[h] for h in grad_idx})
    kv_rank = {kv: i for i, kv in enumerate(kv_needed)}
    active_rank = {h: i for i, h in enumerate(active_idx)}
    return {"active_idx": active_idx, "pruned_idx": [h for h, a in enumerate(active_heads) if not a],
            "grad_idx": grad_idx, "kv_needed": kv_needed, "kv_pos": [kv_rank[kv_map[h]] for h in grad_idx],
            "lse_pos": [active_rank[h] for h in grad_idx]}


@functools.lru_cache(maxsize=512)
def _head_index(grad_heads: Tuple[bool, ...], active_heads: Tuple[bool, ...], kv_map: Tuple[int, ...], hkv: int,
                device: torch.device) -> HeadIndex:
    lists = head_index_lists(grad_heads, active_heads, kv_map)

    def idx(values):
        return torch.tensor(values, dtype=torch.int64).to(device)

    return HeadIndex(
        kv_head_index=idx(list(kv_map)), **{k: idx(v) for k, v in lists.items()},
        all_q=len(lists["grad_idx"]) == len(grad_heads), all_kv=len(lists["kv_needed"]) == hkv,
    )


@dataclass
class AttentionProblem:
    """A validated attention call.

    Shapes: q (B, Hq, Sq, D); k, v (B, Hkv, Skv, D). ``mask`` is either None,
    a bool tensor (True = attend) or an additive float tensor, expanded (as a
    view, no copy) to (B, Hq, Sq, Skv).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: HeadIndex
    mask: Optional[torch.Tensor]
    causal: bool
    scale: float
    out_layout: str

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]


def _head_mask(arg: Optional[torch.Tensor], name: str, num_heads: int, default: bool) -> Tuple[bool, ...]:
    if arg is None:
        return (default,) * num_heads
    if isinstance(arg, (list, tuple)):  # Python bools: what torch.compile can keep static
        if len(arg) != num_heads or not all(isinstance(x, bool) for x in arg):
            raise ValueError(f"{name} as a list must hold {num_heads} bools (one per query head), got {arg!r}")
        return tuple(arg)
    if not isinstance(arg, torch.Tensor):
        raise ValueError(f"{name} must be a bool tensor of shape ({num_heads},), a list of bools or None, got "
                         f"{type(arg).__name__}")
    if arg.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool, got {arg.dtype}")
    if arg.shape != (num_heads,):
        raise ValueError(f"{name} must have shape ({num_heads},) (one entry per query head), got {tuple(arg.shape)}")
    if arg.device.type == "meta":
        raise ValueError(f"{name} must hold values (a CPU tensor is best), got a tensor on the meta device")
    return tuple(arg.tolist())  # a CPU tensor costs no device synchronisation here


def _check_mask(mask, b, hq, sq, skv, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise ValueError(f"attention_mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"attention_mask is on {mask.device} but q is on {device}")
    target = (b, hq, sq, skv)
    if mask.dim() > 4:
        raise ValueError(f"attention_mask must have at most 4 dims broadcastable to {target}, got {tuple(mask.shape)}")
    try:
        return mask.expand(target) if mask.shape != target else mask
    except RuntimeError:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} is not broadcastable to (B, Hq, Sq, Skv) = {target}"
        ) from None


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_heads: Optional[torch.Tensor] = None,
    pruned_heads: Optional[torch.Tensor] = None,
    causal: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    kv_head_index: Optional[torch.Tensor] = None,
    out_layout: str = "bhsd",
) -> AttentionProblem:
    """Check the arguments of :func:`headsparse.attention` and normalise them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    b, hq, sq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {b}")
    if k.shape[3] != d:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has head_dim {d}")
    hkv, skv = k.shape[1], k.shape[2]
    if min(b, hq, hkv, d) == 0:
        raise ValueError(f"q and k must have non-empty batch, heads and head_dim, got q={tuple(q.shape)}, k={tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    if out_layout not in OUT_LAYOUTS:
        raise ValueError(f"out_layout must be one of {OUT_LAYOUTS}, got {out_layout!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:  # like SDPA, any finite scale: 0 gives uniform attention, a negative one inverts the scores
        scale = check_number("scale", scale, hint="or None for 1/sqrt(head_dim)")
    device = q.device

    if kv_head_index is None:
        if hq % hkv != 0:
            raise ValueError(
                f"q has {hq} heads, not a multiple of k's {hkv}; pass kv_head_index (one KV head per query head) "
                "for ragged groups"
            )
        kv_map = tuple(h // (hq // hkv) for h in range(hq))
    else:
        if isinstance(kv_head_index, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in kv_head_index):
            kv_head_index = torch.tensor(kv_head_index, dtype=torch.long)  # Python ints, as under torch.compile
        if not isinstance(kv_head_index, torch.Tensor):
            raise ValueError(f"kv_head_index must be an integer tensor of shape ({hq},), got {type(kv_head_index).__name__}")
        if kv_head_index.dtype.is_floating_point or kv_head_index.dtype == torch.bool or kv_head_index.is_complex():
            raise ValueError(f"kv_head_index must have an integer dtype, got {kv_head_index.dtype}")
        if kv_head_index.shape != (hq,):
            raise ValueError(f"kv_head_index must have shape ({hq},) (one KV head per query head), got {tuple(kv_head_index.shape)}")
        kv_map = tuple(kv_head_index.tolist())
        if min(kv_map) < 0 or max(kv_map) >= hkv:
            raise ValueError(f"kv_head_index entries must lie in [0, {hkv}), got range [{min(kv_map)}, {max(kv_map)}]")

    grad = _head_mask(grad_heads, "grad_heads", hq, True)
    active = tuple(not x for x in _head_mask(pruned_heads, "pruned_heads", hq, False))
    mask = _check_mask(attention_mask, b, hq, sq, skv, device)
    return AttentionProblem(
        q=q, k=k, v=v, heads=_head_index(grad, active, kv_map, hkv, device),
        mask=mask, causal=causal, scale=float(scale), out_layout=out_layout,
    )
