"""The ``torch`` backend: head-sparse attention and head statistics in plain PyTorch, any device.

:data:`BACKEND` follows the kernel contract of :mod:`headsparse.ops.backend`: the forward runs only the listed
query heads; the backward receives compact tensors that hold only the heads that need a gradient and returns
compact gradients. It is also the implementation of the head statistics that ``auto`` uses everywhere.

A call takes one of three paths (:func:`fused_path` says which one is tried; ``HEADSPARSE_TORCH_PATH`` forces one):

* ``cpu-flash`` (CPU default): PyTorch's fused CPU flash-attention kernels (the ``aten`` ops behind
  ``scaled_dot_product_attention`` on CPU, which also return the log-sum-exp) on the gathered heads; the backward
  calls their backward op on the compact tensors. They accumulate in float32 but round the probabilities to the
  input dtype before the P @ V product, so float16/bfloat16 results differ from the float32 path by about one
  rounding of the input dtype.
* ``sdpa`` (default on CUDA and every other device): the public ``torch.nn.functional.scaled_dot_product_attention``
  (PyTorch's FlashAttention-2 / memory-efficient / cuDNN kernels, whichever PyTorch picks) under ``no_grad`` on the
  computed heads. The forward keeps no log-sum-exp (the public API returns none), so the backward runs the same
  public call once more under autograd on the compact grad-head tensors and differentiates it: an extra forward
  of the grad heads only, in exchange for staying on an API that every supported torch release keeps stable.
  Under ``torch.compile`` that backward runs inside the custom op's kernel, where the dispatcher has switched
  autograd off for the thread, so it is done on a worker thread (same CUDA device and stream, the caller waits). K/V
  are gathered per query head (a copy the size of the computed heads' q) rather than passed with ``enable_gqa``,
  which with a mask sends some releases to the math kernel (a materialised score matrix).
* ``plain``: materialised scores, chunked over heads, arithmetic in float32 (float64 for float64 inputs). It
  runs what the fused paths cannot take: float64, an empty query or key sequence, an additive mask whose dtype
  would lose precision in the input dtype, a dtype the installed CPU kernels do not take (probed once), and
  non-finite inputs (NaN/inf), whose propagation the fused kernels do not follow as the specification
  (:func:`headsparse.attention_reference`) defines it.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .autograd import _batched
from .backend import Backend, StatsProblem
from .problem import AttentionProblem

# Bound on one chunk's score matrix, so that long sequences do not allocate
# B * H * Sq * Skv floats at once.
_MAX_SCORE_ELEMENTS = 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_scores(q, k, mask, causal: bool, scale: float):
    """Scaled scores q k^T with the padding and causal masks applied (-inf = masked)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:  # -inf masks the key even where the score is NaN, as in the reference
            s = (s + mask.to(s.dtype)).masked_fill(torch.isneginf(mask), float("-inf"))
    if causal:
        s = _mask_causal(s)
    return s


def _mask_causal(s: torch.Tensor) -> torch.Tensor:
    """-inf above the bottom-right aligned diagonal of the last two dims: query i sees keys j <= i + Skv - Sq."""
    sq, skv = s.shape[-2], s.shape[-1]
    rows = torch.arange(sq, device=s.device)[:, None]
    cols = torch.arange(skv, device=s.device)[None, :]
    return s.masked_fill(cols > rows + (skv - sq), float("-inf"))


def _flash_cpu_ops():
    """PyTorch's fused CPU flash-attention forward and backward, or None where this torch has none."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    except (AttributeError, RuntimeError):
        return None


_FLASH_CPU = _flash_cpu_ops()


_FLASH_DTYPE_OK: dict = {}


def _flash_supports(dtype: torch.dtype) -> bool:
    """Whether this torch's fused CPU kernels take ``dtype`` with an additive mask (older releases lack some
    dtypes or the mask argument); probed once per dtype on a tiny call."""
    if dtype not in _FLASH_DTYPE_OK:
        fwd, bwd = _FLASH_CPU
        x = torch.ones((1, 1, 2, 8), dtype=dtype)
        mask = torch.zeros((1, 1, 2, 2), dtype=dtype)
        try:
            o, lse = fwd(x, x, x, 0.0, False, attn_mask=mask, scale=0.5)
            bwd(x, x, x, x, o, lse, 0.0, False, attn_mask=mask, scale=0.5)
            _FLASH_DTYPE_OK[dtype] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _FLASH_DTYPE_OK[dtype] = False
    return _FLASH_DTYPE_OK[dtype]


PATH_ENV = "HEADSPARSE_TORCH_PATH"
PATH_CHOICES = ("auto", "cpu-flash", "sdpa", "plain")


def fused_path(device_type: str) -> str:
    """The fused path the torch backend tries for tensors on ``device_type``: ``"cpu-flash"``, ``"sdpa"`` or
    ``"plain"``. ``HEADSPARSE_TORCH_PATH`` (one of :data:`PATH_CHOICES`) overrides ``auto``; a call the chosen
    path cannot take runs on the plain path."""
    choice = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if choice not in PATH_CHOICES:
        raise ValueError(f"{PATH_ENV} must be one of {PATH_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    if device_type == "cpu":
        return "cpu-flash" if _FLASH_CPU is not None else "plain"
    return "sdpa"


def _path_for(q: torch.Tensor, skv: int, mask: Optional[torch.Tensor]) -> str:
    """The path that runs this call: the fused path of q's device if it can take the call, else ``"plain"``."""
    path = fused_path(q.device.type)
    if path == "plain" or skv == 0 or q.shape[2] == 0:  # the CPU kernel crashes (SIGFPE) on an empty sequence
        return "plain"
    if path == "sdpa" and _under_transform(q):
        return "plain"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "plain"
    # The kernels add the mask in q's dtype; the specification adds it in float32.
    if not (mask is None or mask.dtype == torch.bool or mask.dtype == q.dtype or q.dtype == torch.float32):
        return "plain"
    if path == "cpu-flash" and (_FLASH_CPU is None or q.device.type != "cpu" or not _flash_supports(q.dtype)):
        return "plain"
    return path


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels assume unit stride in the last dimension (a transposed view would give wrong gradients)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_for_heads(mask: Optional[torch.Tensor], mask_idx: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask rows of these heads; a mask broadcast over heads (stride 0) stays one head wide."""
    if mask is None:
        return None
    if mask.stride(0) == 0:  # collapse broadcast dims first, so no copy is made B (or H) times
        mask = mask[:1]
    return mask[:, :1] if mask.stride(1) == 0 else mask.index_select(1, mask_idx)


def _flash_mask(mask: Optional[torch.Tensor], causal: bool, sq: int, skv: int, dtype: torch.dtype):
    """(additive mask in ``dtype`` or None, is_causal for the kernel, rows with nothing to attend or None)."""
    if mask is None and (not causal or sq == skv):  # every row sees at least one key
        return None, causal, None
    if mask is None:
        add = torch.zeros((1, 1, sq, skv), dtype=dtype)
    elif mask.dtype == torch.bool:
        add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        add = mask.to(dtype)
    if causal:  # the kernel's own causal mask is aligned top-left; the specification's bottom-right
        add = _mask_causal(add.expand(*add.shape[:-2], sq, skv))
    empty = torch.isneginf(add).all(dim=-1)
    return add, False, (empty if bool(empty.any()) else None)


def _flash_forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
    fwd, _ = _FLASH_CPU
    sq, skv = q.shape[2], k.shape[2]
    add, is_causal, empty = _flash_mask(_mask_for_heads(mask, mask_idx), causal, sq, skv, q.dtype)
    o, lse = fwd(q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx), 0.0,
                 is_causal, attn_mask=add, scale=scale)
    # Non-finite inputs: the kernel's running max skips NaN, so a row whose scores are all NaN (NaN in q, say)
    # comes back as output 0 with lse exactly 0 instead of NaN; and it adds the mask to the scores, so NaN at a
    # masked key still poisons the row (lse NaN), where the specification masks it. lse == 0 is otherwise rare (one visible key with score 0),
    # so testing for it (after the masked-out rows got lse = +inf) costs one pass over the (B, H, Sq) lse and nothing over the inputs; the plain path
    # recomputes the call exactly (and slower) when it fires, which finite inputs almost never do.
    if empty is not None:  # the specification: output 0 and lse = +inf where nothing is attended
        o = o.masked_fill(empty[..., None], 0)
        lse = lse.masked_fill(empty, float("inf"))
    if bool(((lse == 0) | torch.isnan(lse)).any()):
        return None
    out.index_copy_(1, q_idx, o)
    return lse.float()


def _flash_backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats):
    _, bwd = _FLASH_CPU
    b, g, sq, d = q.shape
    r, skv = k.shape[1], k.shape[2]
    add, is_causal, _ = _flash_mask(_mask_for_heads(mask, mask_idx), causal, sq, skv, q.dtype)
    if stats is not None:
        stats += (o.float() * do.float()).sum(dim=(-1, -2))
    dq, dk_h, dv_h = bwd(_unit_last(do), _unit_last(q), k.index_select(1, kv_pos), v.index_select(1, kv_pos),
                         _unit_last(o), lse, 0.0, is_causal, attn_mask=add, scale=scale)
    if g == r and bool((kv_pos == torch.arange(r)).all()):
        return dq, dk_h, dv_h
    return dq, *_sum_over_groups(dk_h, dv_h, kv_pos, r)


def _sum_over_groups(dk_h, dv_h, kv_pos, r: int):
    """dK, dV of the R KV heads from those of each query head (``kv_pos[g]``: the KV head of head g), summed in
    float32 as the kernels accumulate. Out of place: under batched gradients (vmap) dk_h is batched and a fresh
    buffer is not."""
    b, _, skv, d = dk_h.shape
    acc = dict(dtype=torch.float32, device=dk_h.device)
    dk = torch.zeros((b, r, skv, d), **acc).index_add(1, kv_pos, dk_h.float())
    dv = torch.zeros((b, r, skv, d), **acc).index_add(1, kv_pos, dv_h.float())
    return dk.to(dk_h.dtype), dv.to(dv_h.dtype)


# ---------------------------------------------------------------- the sdpa path (public API; CUDA's default)


def _sdpa_mask(mask: Optional[torch.Tensor], causal: bool, sq: int, skv: int, dtype: torch.dtype,
               device: torch.device):
    """(attn_mask for SDPA or None, is_causal for SDPA, rows with nothing to attend or None).

    SDPA's own causal mask is aligned top-left, the specification's bottom-right, so it is used only when
    Sq == Skv. A row with nothing to attend would come back NaN from the kernels; it is given every key instead
    (finite), and the callers zero its output and its incoming gradient, which is what the specification asks.
    """
    if mask is None and (not causal or sq == skv):  # every row sees at least one key
        return None, causal, None
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    if causal:
        rows = torch.arange(sq, device=device)[:, None]
        keep = torch.arange(skv, device=device)[None, :] <= rows + (skv - sq)
        if mask is None:
            mask = keep[None, None]
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    if mask.dtype == torch.bool:
        empty = ~mask.any(dim=-1)
        return mask | empty[..., None], False, empty
    empty = torch.isneginf(mask).all(dim=-1)
    return mask.masked_fill(empty[..., None], 0.0), False, empty


def _sdpa_forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> Optional[torch.Tensor]:
    """The forward on PyTorch's public SDPA, or None (nothing written) when an input is not finite: the plain path
    then follows the specification's NaN/inf rules. The returned "log-sum-exp" marks rows for this path's own
    backward only: -inf everywhere (which no real log-sum-exp is), +inf where nothing is attended."""
    sq, skv = q.shape[2], k.shape[2]
    attn_mask, is_causal, empty = _sdpa_mask(_mask_for_heads(mask, mask_idx), causal, sq, skv, q.dtype, q.device)
    qa = q if q_idx.numel() == q.shape[1] else q.index_select(1, q_idx)  # active heads are sorted: all = identity
    ka, va = k.index_select(1, kv_idx), v.index_select(1, kv_idx)
    o = F.scaled_dot_product_attention(qa, ka, va, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    checks = [torch.isfinite(t).all() for t in (qa, ka, va)] + [~torch.isnan(o).any()]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        checks.append(~torch.isnan(attn_mask).any())
    if not bool(torch.stack(checks).all()):  # one device synchronisation per call
        return None
    b, p = qa.shape[:2]
    lse = torch.full((b, p, sq), float("-inf"), dtype=torch.float32, device=q.device)
    if empty is not None:
        o = o.masked_fill(empty[..., None], 0)
        lse = lse.masked_fill(empty.expand(b, p, sq), float("inf"))
    out.index_copy_(1, q_idx, o)
    return lse


def _is_sdpa_lse(lse: torch.Tensor) -> bool:
    """Whether ``lse`` is the sdpa path's marker (looked at through any functorch wrapper, e.g. vmap's)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(lse) or f.is_batchedtensor(lse):
        lse = f.get_unwrapped(lse)
    return bool(torch.isneginf(lse).any())


def _under_transform(*tensors: torch.Tensor) -> bool:
    """A torch.func transform (vmap, grad, jacrev) is active or wraps an input: the plain path, whose ops are all
    out of place and without data-dependent branches, runs it."""
    level = getattr(torch._C._functorch, "maybe_current_level", lambda: None)()
    return level is not None or any(_batched(t) for t in tensors)


def _real_lse(q, k, v, kv_pos, mask_idx, mask, causal, scale) -> torch.Tensor:
    """The log-sum-exp of the compact heads (+inf where nothing is attended), out of place, materialised: for the
    rare backward of an sdpa forward under a functorch transform."""
    m_sel = None if mask is None else mask.index_select(1, mask_idx)
    s = _masked_scores(q.to(_compute_dtype(q.dtype)), k.index_select(1, kv_pos).to(_compute_dtype(q.dtype)), m_sel,
                       causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def _sdpa_backward(do, q, k, v, o, kv_pos, mask_idx, mask, causal, scale, stats):
    """Differentiates the public SDPA call again on the compact grad-head tensors (the forward saved no
    log-sum-exp): one more forward of the grad heads, then PyTorch's matching backward kernel."""
    b, g, sq, d = q.shape
    r, skv = k.shape[1], k.shape[2]
    attn_mask, is_causal, empty = _sdpa_mask(_mask_for_heads(mask, mask_idx), causal, sq, skv, q.dtype, q.device)
    if stats is not None:
        stats += (o.float() * do.float()).sum(dim=(-1, -2))
    if empty is not None:  # rows that attend nothing were computed over every key: their gradient must not flow
        do = do.masked_fill(empty[..., None], 0)
    args = (q, k.index_select(1, kv_pos), v.index_select(1, kv_pos), do, attn_mask, is_causal, scale)
    dq, dk_h, dv_h = _sdpa_vjp(*args) if _autograd_records() else _in_autograd_thread(_sdpa_vjp, q.device, *args)
    return dq, *_sum_over_groups(dk_h, dv_h, kv_pos, r)


def _sdpa_vjp(q, k, v, do, attn_mask, is_causal, scale):
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(*leaves, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return torch.autograd.grad(o, leaves, do)


def _autograd_records() -> bool:
    """Whether autograd records here. Inside a custom op's kernel (the op torch.compile runs) the dispatcher has
    switched it off for this thread, whatever grad mode says."""
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).requires_grad


_AUTOGRAD_WORKER = None


def _in_autograd_thread(fn, device: torch.device, *args):
    """``fn(*args)`` on a worker thread, whose dispatcher state is fresh (autograd on), on the caller's CUDA device and
    stream so that the work stays ordered with the caller's; the caller waits for it."""
    global _AUTOGRAD_WORKER
    if _AUTOGRAD_WORKER is None:
        from concurrent.futures import ThreadPoolExecutor

        _AUTOGRAD_WORKER = ThreadPoolExecutor(1, thread_name_prefix="headsparse-autograd")
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def call():
        if stream is None:
            return fn(*args)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            return fn(*args)

    return _AUTOGRAD_WORKER.submit(call).result()


def _head_range(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    # a slice over every head is an alias, which the batched-gradient vmap cannot batch
    return t if (lo, hi) == (0, t.shape[1]) else t[:, lo:hi]


def _chunks(num_heads: int, batch: int, sq: int, skv: int):
    per_head = max(1, batch * sq * skv)
    step = max(1, _MAX_SCORE_ELEMENTS // per_head)
    for start in range(0, num_heads, step):
        yield start, min(num_heads, start + step)


def _forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
    """Attention for query heads ``q_idx`` (program p reads KV head ``kv_idx[p]``).

    Writes ``out[:, q_idx[p]]`` and returns the log-sum-exp, shape (B, P, Sq),
    float32/64; rows with nothing to attend get output 0 and lse = +inf.
    """
    path = _path_for(q, k.shape[2], mask)
    if path != "plain":
        fused = _flash_forward if path == "cpu-flash" else _sdpa_forward
        lse = fused(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out)
        if lse is not None:
            return lse
    return _plain_forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out)


def _plain_forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
    cdt = _compute_dtype(q.dtype)
    b, _, sq, _ = q.shape
    skv = k.shape[2]
    lse = torch.empty((b, q_idx.numel(), sq), dtype=cdt, device=q.device)
    for lo, hi in _chunks(q_idx.numel(), b, sq, skv):
        h = q_idx[lo:hi]
        qa = q.index_select(1, h).to(cdt)
        ka = k.index_select(1, kv_idx[lo:hi]).to(cdt)
        va = v.index_select(1, kv_idx[lo:hi]).to(cdt)
        m_sel = None if mask is None else mask.index_select(1, mask_idx[lo:hi])
        s = _masked_scores(qa, ka, m_sel, causal, scale)
        if skv == 0:  # nothing to attend anywhere: amax over an empty dimension is undefined
            s = s.new_full(s.shape[:-1] + (1,), float("-inf"))
            va = va.new_zeros(va.shape[:-2] + (1, va.shape[-1]))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        p = torch.exp(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        empty = denom == 0
        o = torch.matmul(p, va) / torch.where(empty, torch.ones_like(denom), denom)
        o = o.masked_fill(empty, 0.0)  # 0 * NaN/inf in v must not reach a row with nothing to attend
        lse[:, lo:hi] = torch.where(empty, torch.full_like(denom, float("inf")), row_max + torch.log(denom)).squeeze(-1)
        out.index_copy_(1, h, o.to(out.dtype))
    return lse


def _backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats: Optional[torch.Tensor]):
    """Compact backward: q, o, do (B, G, Sq, D); k, v (B, R, Skv, D); lse (B, G, Sq).

    ``kv_pos[g]`` is the position in k/v of head g's KV head and ``mask_idx[g]``
    its index into the mask's head dimension. Returns dq (B, G, Sq, D) and
    dk, dv (B, R, Skv, D) in the input dtype. If ``stats`` (B, G) is given, the
    per-(batch, head) sum over tokens of <o, do> is added to it.
    """
    # The lse says which forward ran (one pass over (B, G, Sq)): the sdpa path's marker, or a real one. A NaN lse
    # (non-finite inputs; see _flash_forward) came from the plain forward: differentiate it with the plain backward.
    if _is_sdpa_lse(lse):
        if not _under_transform(do, q):
            return _sdpa_backward(do, q, k, v, o, kv_pos, mask_idx, mask, causal, scale, stats)
        # A torch.func transform or batched gradients: autograd cannot run inside them, so the plain backward
        # (out-of-place torch ops) runs, on the real log-sum-exp, recomputed here.
        lse = _real_lse(q, k, v, kv_pos, mask_idx, mask, causal, scale)
    elif _path_for(q, k.shape[2], mask) == "cpu-flash" and not bool(torch.isnan(lse).any()):
        return _flash_backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats)
    cdt = _compute_dtype(q.dtype)
    b, g, sq, d = q.shape
    r, skv = k.shape[1], k.shape[2]
    # every result is built out of place (cat, index_add): under batched gradients (vmap) the incoming gradient
    # is batched, and an in-place write into a fresh unbatched buffer has no batching rule
    dq_parts = []
    dk = torch.zeros((b, r, skv, d), dtype=cdt, device=q.device)
    dv = torch.zeros_like(dk)
    for lo, hi in _chunks(g, b, sq, skv):
        idx = kv_pos[lo:hi]
        qg, dog, og = (_head_range(t, lo, hi).to(cdt) for t in (q, do, o))
        kg = k.index_select(1, idx).to(cdt)
        vg = v.index_select(1, idx).to(cdt)
        m_sel = None if mask is None else mask.index_select(1, mask_idx[lo:hi])
        s = _masked_scores(qg, kg, m_sel, causal, scale)
        p = torch.exp(s - lse[:, lo:hi, :, None].to(cdt))
        delta = (og * dog).sum(dim=-1)  # (B, G, Sq): FlashAttention's preprocessing
        if stats is not None:
            stats[:, lo:hi] += delta.sum(dim=-1).to(stats.dtype)
        dv = dv.index_add(1, idx, torch.matmul(p.transpose(-1, -2), dog))
        ds = p * (torch.matmul(dog, vg.transpose(-1, -2)) - delta[..., None])
        dq_parts.append((torch.matmul(ds, kg) * scale).to(q.dtype))
        dk = dk.index_add(1, idx, torch.matmul(ds.transpose(-1, -2), qg) * scale)
    dq = torch.cat(dq_parts, dim=1) if dq_parts else torch.empty_like(q)
    return dq, dk.to(q.dtype), dv.to(q.dtype)


# ---------------------------------------------------------------- head statistics


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_tokens(t: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    t = t.to(_acc_dtype(t.dtype))
    if token_mask is None:
        return t
    return torch.where(token_mask[..., None], t, torch.zeros((), dtype=t.dtype, device=t.device))


def _head_stats(x, g, num_heads: int, token_mask=None):
    """(xg, x_sq, g_sq, abs_x, abs_g) of :func:`headsparse.head_stats`; the g parts are None without g."""
    b, s, c = x.shape
    xf = _masked_tokens(x, token_mask)
    xh = xf.view(b, s, num_heads, c // num_heads)
    x_sq, abs_x = (xh * xh).sum(dim=(1, 3)), xf.abs().sum(dim=(0, 1))
    if g is None:
        return None, x_sq, None, abs_x, None
    gf = _masked_tokens(g, token_mask)
    gh = gf.view(b, s, num_heads, c // num_heads)
    return (xh * gh).sum(dim=(1, 3)), x_sq, (gh * gh).sum(dim=(1, 3)), abs_x, gf.abs().sum(dim=(0, 1))


def _gram(x, token_mask=None) -> torch.Tensor:
    c = x.shape[2]
    rows = x.reshape(-1, c)
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1)]
    rows = rows.to(_acc_dtype(x.dtype))
    return rows.transpose(0, 1) @ rows


class TorchBackend(Backend):
    name = "torch"
    ops = ("attention", "head_stats")
    batched_grads = True  # the backward is built from torch ops out of place, so vmap can batch it

    def devices(self) -> Tuple[str, ...]:
        return ("cpu", "cuda", "mps")

    def probe(self) -> Tuple[bool, str]:
        return True, ("plain PyTorch, any device: PyTorch's fused CPU flash kernels on CPU, its own "
                      "scaled_dot_product_attention kernels (flash / memory-efficient) on CUDA, on the needed heads")

    def supports(self, problem) -> List[str]:
        if isinstance(problem, StatsProblem):
            return []  # plain tensor ops: any device, any floating dtype
        return super().supports(problem)

    def limits(self, problem) -> List[str]:
        if isinstance(problem, AttentionProblem) and problem.head_dim > 256:
            return [f"head_dim must be <= 256, got {problem.head_dim}"]
        return []

    def forward(self, q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
        return _forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out)

    def backward(self, do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats):
        return _backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats)

    def head_stats(self, x, g, num_heads, token_mask):
        return _head_stats(x, g, num_heads, token_mask)

    def gram(self, x, token_mask):
        return _gram(x, token_mask)


BACKEND = TorchBackend()
