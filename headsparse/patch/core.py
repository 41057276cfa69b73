"""Shared logic of ``headsparse.patch`` / ``headsparse.unpatch``.

What ``patch(model, plan)`` does, per layer ``i`` of the plan:

1. Head layout. Query heads are reordered "TRAIN heads first, then the
   others" (keeping their relative order), KV heads "trainable first"; PRUNED
   query heads are removed, and a KV head is removed when its whole group is
   pruned. Attention is equivariant to a consistent permutation of heads, so
   the Q/K/V rows, the O columns and the query-to-KV map (``kv_head_index`` of
   :func:`headsparse.attention`) are permuted together and the layer computes
   the same function. (A layer whose heads are all pruned keeps one head,
   passed to the op as pruned: output 0.)
2. Projections are replaced as modules by :class:`HeadSlicedProjection` /
   :class:`HeadSlicedOutput`: only the trainable slice is a parameter with
   ``requires_grad``; every other parameter of the model is frozen (except
   the modules named in ``train_modules``).
3. Attention goes through :func:`headsparse.attention` (registered with
   transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` as
   "headsparse"), with the layer's grad heads:
   - ``grad="exact"``: every unpruned head above the lowest trainable layer
     (the gradient of a layer's input sums over all heads); in the lowest
     trainable layer only the TRAIN heads and the query heads reading a
     trainable KV head;
   - ``grad="sparse"``: that smaller set in every layer (frozen heads are
     constants: an approximation of the gradient below the top layer).
4. Gradient horizon: layers below the lowest trainable layer run under
   ``torch.no_grad()``: no graph, no saved activations.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import attention as hs_attention
from ..plan import HeadMode, HeadPlan, register_model_shape
from .families import Family, find_family
from .linear import HeadSlicedOutput, HeadSlicedProjection, is_sharded, is_zero3, is_zero3_partitioned

ATTN_NAME = "headsparse"
GRAD_MODES = ("exact", "sparse")
_STATE_ATTR = "_headsparse_layer"
_PATCH_ATTR = "_headsparse_patch"
PREFIX_CACHE_ATTR = "_headsparse_prefix_cache"  # where patch.prefix_cache attaches its cache to a model
PLAN_FILE = "headsparse_plan.json"  # written beside a patched model's save_pretrained checkpoint
_NO_GRAD_FLAG = "_headsparse_no_grad"


# ---------------------------------------------------------------- model shape
def attention_dims(family: Family, config) -> Tuple[int, int, int, int]:
    """(query heads, KV heads, head dim, hidden size) per layer, read from a model's config."""
    nq = int(config.num_attention_heads)
    nkv = getattr(config, "num_key_value_heads", None) if not family.fused_qkv else None
    nkv = int(nkv) if nkv else nq
    hidden = int(config.hidden_size)
    head_dim = getattr(config, "head_dim", None) or hidden // nq
    return nq, nkv, int(head_dim), hidden


def model_shape(model) -> Tuple[str, int, int, int]:
    """(family, num layers, query heads per layer, KV heads per layer) of a supported model."""
    info = getattr(model, _PATCH_ATTR, None)
    if info is not None:
        return info.family.name, info.num_layers, info.num_q_heads, info.num_kv_heads
    family, base = find_family(model)
    nq, nkv, _, _ = attention_dims(family, model.config)
    return family.name, len(family.layers(base)), nq, nkv


register_model_shape(model_shape)  # HeadPlan.for_model / check_model read shapes through it (no plan -> patch import)


# ------------------------------------------------------------- per-layer state
@dataclass
class LayerState:
    """What the attention function needs for one layer (attached to its attention module)."""

    layer: int
    q_order: List[int]  # original query head of each patched position
    kv_order: List[int]  # original KV head of each patched position
    kv_head_index: List[int]  # patched query position -> patched KV position
    n_train_q: int  # the first n_train_q patched query heads are TRAIN
    n_train_kv: int  # the first n_train_kv patched KV heads are trainable
    pruned_kept: List[bool]  # patched heads kept only to avoid an empty layer (op: pruned)
    grad_heads: Optional[List[bool]]  # None = all
    no_grad: bool  # below the gradient horizon
    sparse: bool = False  # grad="sparse" at or above the horizon: frozen slices are constants
    _cache: Dict = field(default_factory=dict, repr=False)

    def flags(self) -> Tuple[Optional[List[bool]], Optional[List[bool]], Optional[List[int]]]:
        """:meth:`tensors` as Python lists (what the op takes while torch.compile traces it)."""
        nq, nkv = len(self.q_order), len(self.kv_order)
        grad = None if self.grad_heads is None or all(self.grad_heads) else list(self.grad_heads)
        pruned = list(self.pruned_kept) if any(self.pruned_kept) else None
        standard = nq % nkv == 0 and self.kv_head_index == [p // (nq // nkv) for p in range(nq)]
        return grad, pruned, (None if standard else list(self.kv_head_index))

    def tensors(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        # Kept on the CPU whatever the model's device: the op reads head masks on the host (a GPU tensor
        # would cost a device synchronisation per call) and caches the index tensors it derives per device.
        hit = self._cache.get("cpu")
        if hit is None:
            grad, pruned, kvi = self.flags()
            hit = self._cache["cpu"] = (None if grad is None else torch.tensor(grad),
                                        None if pruned is None else torch.tensor(pruned),
                                        None if kvi is None else torch.tensor(kvi, dtype=torch.long))
        return hit


@dataclass
class PatchInfo:
    plan: HeadPlan
    grad: str
    family: Family
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    attn_impl_before: Optional[str]
    requires_grad_before: Dict[str, bool]
    train_modules: Tuple[str, ...]
    originals: Dict[str, Dict] = field(default_factory=dict)  # per slot path: class and attrs of the replaced module
    restore_attrs: List[Tuple[nn.Module, str, object]] = field(default_factory=list)


# ----------------------------------------------------------- attention hook
_warned_dropout = False
_warned_attentions = False


def headsparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function: (B, Hq, S, D) inputs -> ((B, S, Hq, D) output, None)."""
    global _warned_dropout, _warned_attentions
    state: Optional[LayerState] = getattr(module, _STATE_ATTR, None)
    if kwargs.get("output_attentions") and not _warned_attentions:
        warnings.warn("headsparse attention does not return attention probabilities (it never forms them): "
                      "output_attentions=True gives no attention weights; unpatch the model to get them",
                      stacklevel=2)
        _warned_attentions = True
    if state is None:
        grad, pruned, kvi = None, None, None
    else:
        grad, pruned, kvi = state.flags() if torch.compiler.is_compiling() else state.tensors()
    if dropout and module.training and not _warned_dropout:
        warnings.warn("headsparse attention does not apply attention-probability dropout "
                      f"(module asked for p={dropout}); it runs without it", stacklevel=2)
        _warned_dropout = True
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", False))
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 4 and mask.shape[-1] > key.shape[-2]:
            mask = mask[..., : key.shape[-2]]
        causal = False  # a mask from transformers already holds the causal part
    else:
        causal = bool(is_causal)
    out = hs_attention(query, key, value, grad_heads=grad, pruned_heads=pruned, causal=causal, attention_mask=mask,
                       scale=scaling, kv_head_index=kvi, out_layout="bshd",
                       stats_key=getattr(module, "layer_idx", None))
    return out.transpose(1, 2), None


def register() -> None:
    """Register "headsparse" with transformers' attention and mask interfaces (idempotent)."""
    register_attention(ATTN_NAME, headsparse_attention_forward)


def register_attention(name: str, fn) -> None:
    """Register attention function ``fn`` under ``name`` with transformers' ``AttentionInterface``, with SDPA's mask
    builder under the same name (idempotent)."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - very old transformers
        from transformers.modeling_utils import AttentionInterface
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:  # pragma: no cover - depends on the installed version
        raise RuntimeError(
            "headsparse.patch needs transformers.masking_utils.AttentionMaskInterface and sdpa_mask "
            "(transformers >= 4.53); without them padding masks would be dropped silently"
        ) from exc
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def _set_attn_impl(model: nn.Module, name: Optional[str]) -> None:
    if name is None:
        return
    if hasattr(model, "set_attn_implementation"):
        type(model).set_attn_implementation(model, name)  # the class's: a patched model refuses other names
    else:  # pragma: no cover - older transformers
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = name


# ------------------------------------------------- no silent attention switch
# A patched layer's heads are reordered (TRAIN first), sliced and partly removed; only the headsparse attention
# function reads its query-to-KV map and plan. Stock attention ("eager", "sdpa", ...) would run without error and
# compute another model, so a patched model refuses to switch and checks its config before every forward.
def _impl_names(impl) -> List[object]:
    """Every implementation name in a ``set_attn_implementation`` argument (a str or a nested dict of them)."""
    if isinstance(impl, dict):
        return [n for v in impl.values() for n in _impl_names(v)]
    return [impl]


def _set_attn_impl_patched(model, attn_implementation, *args, **kwargs):
    """``set_attn_implementation`` of a patched model: "headsparse" only."""
    other = [n for n in _impl_names(attn_implementation) if n != ATTN_NAME]
    if other:
        raise ValueError(
            f"set_attn_implementation({attn_implementation!r}): this model is patched by headsparse.patch, and its "
            f"layers (heads reordered TRAIN first, sliced, pruned heads removed) compute the right model only with "
            f"the {ATTN_NAME!r} attention; {other[0]!r} would silently compute a different one. Call "
            f"headsparse.unpatch(model) first (it merges the tuned weights into the stock layout), then switch")
    return type(model).set_attn_implementation(model, attn_implementation, *args, **kwargs)


def _check_attn_impl_hook(module, args, kwargs=None):
    """Forward pre-hook of a patched model and of its attention modules: refuse to run when the config no longer
    selects headsparse attention. One attribute read and a string comparison (a constant under torch.compile)."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", ATTN_NAME)
    if impl != ATTN_NAME:
        raise RuntimeError(
            f"headsparse: this model is patched by headsparse.patch, but {type(module).__name__}'s config now selects "
            f"attention implementation {impl!r} instead of {ATTN_NAME!r}; the patched layers (heads reordered, "
            f"sliced, pruned heads removed) would silently compute a different model. Set it back "
            f"(model.config._attn_implementation = {ATTN_NAME!r}), or call headsparse.unpatch(model) first to get "
            f"the stock model, then switch")
    return None


def _remove_hook(module: nn.Module, fn) -> None:
    for key in [k for k, h in module._forward_pre_hooks.items() if h is fn]:
        del module._forward_pre_hooks[key]
        getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)


# ------------------------------------------------------------- weights access
def _get(slot) -> nn.Module:
    parent, name = slot
    return getattr(parent, name)


def _linear_weights(module: nn.Module, conv1d: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight (out, in), bias) of a Linear or Conv1D, detached."""
    w = module.weight.detach()
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return (w.t() if conv1d else w), b


def _rows(head_list: Sequence[int], head_dim: int, offset: int, device) -> torch.Tensor:
    idx = [offset + h * head_dim + d for h in head_list for d in range(head_dim)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _take(w: torch.Tensor, b: Optional[torch.Tensor], rows: torch.Tensor):
    return w.index_select(0, rows), (b.index_select(0, rows) if b is not None else None)


def _empty_like_rows(w: torch.Tensor, b: Optional[torch.Tensor]):
    return w.new_empty((0, w.shape[1])), (b.new_empty((0,)) if b is not None else None)


# -------------------------------------------------------------- layer layout
def _layer_state(plan: HeadPlan, i: int, grad: str, lowest: Optional[int], full: bool = False) -> LayerState:
    """Layout and backward set of layer ``i``. ``lowest``: the lowest layer with anything trainable (-1 when
    something below the layers, such as the embeddings, trains); ``full``: a module of this layer other than
    the head slices trains, so every head's backward may be needed."""
    modes = plan.modes[i]
    g = plan.group_size
    kv_train = plan.kv_trainable(i)
    kept = [h for h in range(plan.num_q_heads) if modes[h] != HeadMode.PRUNED]
    pruned_kept_heads = set()
    if not kept:  # keep one head so the layer's shapes stay valid; the op treats it as pruned
        kept = [0]
        pruned_kept_heads = {0}
    # TRAIN heads first, then frozen heads reading a trainable KV head, then the other frozen heads.
    is_train = [modes[h] == HeadMode.TRAIN for h in range(plan.num_q_heads)]
    q_order = ([h for h in kept if is_train[h]] + [h for h in kept if not is_train[h] and kv_train[h // g]]
               + [h for h in kept if not is_train[h] and not kv_train[h // g]])
    n_train_q = sum(is_train[h] for h in q_order)
    kv_needed = sorted({h // g for h in kept})
    kv_order = [k for k in kv_needed if kv_train[k]] + [k for k in kv_needed if not kv_train[k]]
    n_train_kv = sum(kv_train[k] for k in kv_order)
    pos = {k: p for p, k in enumerate(kv_order)}
    kv_head_index = [pos[h // g] for h in q_order]
    # Heads whose backward runs when only the trainable part needs it: TRAIN heads and readers of trainable KV.
    narrow = [is_train[h] or kv_train[h // g] for h in q_order]  # a prefix of q_order
    below = lowest is None or i < lowest
    if below:
        grad_heads = [False] * len(q_order)
    elif (grad == "sparse" or i == lowest) and not full:
        grad_heads = narrow
    else:
        grad_heads = None
    return LayerState(i, q_order, kv_order, kv_head_index, n_train_q, n_train_kv,
                      [h in pruned_kept_heads for h in q_order], grad_heads, below,
                      sparse=grad == "sparse" and not below)


def _build_projections(family: Family, slots, st: LayerState, nq: int, nkv: int, head_dim: int):
    """New modules for the layer's slots, per the layout in ``st``."""
    d = head_dim
    tq, fq = st.q_order[: st.n_train_q], st.q_order[st.n_train_q:]
    tkv, fkv = st.kv_order[: st.n_train_kv], st.kv_order[st.n_train_kv:]
    new = {}
    if family.fused_qkv:
        w, b = _linear_weights(_get(slots["qkv"]), family.conv1d)
        dev = w.device
        blocks_t, blocks_f, segs = [], [], []
        rt = rf = 0
        for part, (th, fh) in enumerate(((tq, fq), (tkv, fkv), (tkv, fkv))):
            off = part * nq * d
            for heads, blocks, kind in ((th, blocks_t, "t"), (fh, blocks_f, "f")):
                if not heads:
                    continue
                blocks.append(_take(w, b, _rows(heads, d, off, dev)))
                n = len(heads) * d
                if kind == "t":
                    segs.append(("t", rt, rt + n)); rt += n
                else:
                    segs.append(("f", rf, rf + n)); rf += n

        def cat(blocks):
            if not blocks:
                return _empty_like_rows(w, b)
            ws = torch.cat([x[0] for x in blocks]); bs = torch.cat([x[1] for x in blocks]) if b is not None else None
            return ws, bs

        new["qkv"] = HeadSlicedProjection(*cat(blocks_t), *cat(blocks_f), segs)
    else:
        for name, th, fh in (("q", tq, fq), ("k", tkv, fkv), ("v", tkv, fkv)):
            w, b = _linear_weights(_get(slots[name]), family.conv1d)
            dev = w.device
            wt, bt = _take(w, b, _rows(th, d, 0, dev)) if th else _empty_like_rows(w, b)
            wf, bf = _take(w, b, _rows(fh, d, 0, dev)) if fh else _empty_like_rows(w, b)
            segs = [("t", 0, len(th) * d), ("f", 0, len(fh) * d)]
            new[name] = HeadSlicedProjection(wt, bt, wf, bf, segs)
    w, b = _linear_weights(_get(slots["o"]), family.conv1d)
    dev = w.device
    wt = w.index_select(1, _rows(tq, d, 0, dev))
    wf = w.index_select(1, _rows(fq, d, 0, dev))
    new["o"] = HeadSlicedOutput(wt, wf, b)
    if st.sparse:
        # frozen heads are constants: no gradient through the frozen Q/K/V rows, nor into the frozen heads
        # outside the backward set (the grad heads are a prefix of the layout)
        for key, m in new.items():
            if key == "o":
                m.detach_from = sum(st.grad_heads) * d
            else:
                m.detach_frozen = True
    return new


# ------------------------------------------------------------------- horizon
# Forward hooks rather than a wrapped ``forward``: they survive ``copy.deepcopy``
# and ``torch.save`` of a patched model (no closure over the original module).
def _horizon_pre_hook(module, args):
    stack = module.__dict__.setdefault(_NO_GRAD_FLAG, [])
    stack.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _horizon_post_hook(module, args, output):
    stack = module.__dict__.get(_NO_GRAD_FLAG)
    torch.set_grad_enabled(stack.pop() if stack else True)


def _wrap_no_grad(layer: nn.Module) -> None:
    layer.__dict__[_NO_GRAD_FLAG] = []
    layer.register_forward_pre_hook(_horizon_pre_hook)
    try:
        layer.register_forward_hook(_horizon_post_hook, always_call=True)
    except TypeError:  # pragma: no cover - torch without always_call
        layer.register_forward_hook(_horizon_post_hook)


def _unwrap_no_grad(layer: nn.Module) -> None:
    for hooks, fn in ((layer._forward_pre_hooks, _horizon_pre_hook), (layer._forward_hooks, _horizon_post_hook)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            getattr(layer, "_forward_hooks_always_called", {}).pop(key, None)
    layer.__dict__.pop(_NO_GRAD_FLAG, None)


# --------------------------------------------------------------------- patch
def is_patched(model) -> bool:
    return getattr(model, _PATCH_ATTR, None) is not None


def patch_info(model) -> PatchInfo:
    info = getattr(model, _PATCH_ATTR, None)
    if info is None:
        raise ValueError("model is not patched by headsparse.patch")
    return info


def layer_states(model) -> List[LayerState]:
    """Per layer of a patched model, its :class:`LayerState`: head order, trainable counts, KV map, horizon."""
    info = patch_info(model)
    return [getattr(info.family.attention(layer), _STATE_ATTR) for layer in info.family.layers(model.base_model)]


def head_layout(model) -> List[List[int]]:
    """Per layer, the original query-head index of each patched head position.

    A patched layer lays its heads out TRAIN first, without pruned heads, so
    per-head outputs of the patched model (for example the statistics of
    :func:`headsparse.record_gate_grads`, keyed by layer index) are in this
    order: ``stats[layer][:, p]`` belongs to original head ``head_layout(model)[layer][p]``.
    """
    return [list(state.q_order) for state in layer_states(model)]


def _slot_path(names: Dict[int, str], module: nn.Module, attr: str) -> str:
    name = names[id(module)]
    return f"{name}.{attr}" if name else attr


def _effective_horizon(model, plan: HeadPlan, layers, train_mods):
    """(lowest trainable layer, layers holding a trainable module) given the plan and ``train_modules``.

    A trainable module inside layer i lowers the horizon to i (and that layer runs every head's backward); one
    that shares a parameter with the input embeddings puts the horizon below every layer (-1).
    """
    lowest = plan.lowest_trainable_layer
    full = set()
    if not train_mods:
        return lowest, full
    layer_params = [{id(p) for p in layer.parameters()} for layer in layers]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_params = {id(p) for p in emb.parameters()} if emb is not None else set()
    for mod in train_mods:
        ids = {id(p) for p in mod.parameters()}
        if ids & emb_params:
            return -1, full
        for i, lp in enumerate(layer_params):
            if ids & lp:
                full.add(i)
                lowest = i if lowest is None else min(lowest, i)
    return lowest, full


def patch(model: nn.Module, plan: HeadPlan, grad: str = "exact", train_modules: Sequence[str] = ()) -> nn.Module:
    """Patch a Hugging Face model in place for head-sparse training; returns the model.

    Args:
        model: a supported transformers model (see ``families.SUPPORTED``).
        plan: a :class:`HeadPlan` that fits the model (layers, query and KV heads, family).
        grad: "exact" (default; true gradient of the trainable slices) or "sparse"
            (frozen heads are constants at every layer: less backward work, approximate).
        train_modules: names of modules (as in ``model.named_modules()``, e.g.
            "classifier" or "score") whose parameters stay trainable, for task
            heads that must be trained; everything else outside the head slices is frozen.
    """
    if not isinstance(plan, HeadPlan):
        raise ValueError(f"plan must be a headsparse.HeadPlan, got {type(plan).__name__}")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    if isinstance(train_modules, str):
        train_modules = (train_modules,)
    family, base = find_family(model)
    if is_patched(model):
        raise ValueError("model is already patched by headsparse; call headsparse.unpatch(model) first")
    plan.check_model(model)
    if plan.model_family is None:
        raise ValueError(
            "plan has no model_family, so patch cannot check that it was made for this kind of model: build it with "
            "HeadPlan.from_scores(score_heads(model, ...), ...) or HeadPlan.for_model(model), which take the family "
            "from the model, or pass model_family=model.config.model_type"
            + f" (here {family.name!r})"
            + " to HeadPlan(...), HeadPlan.uniform or HeadPlan.from_scores")
    modules = dict(model.named_modules())
    for name in train_modules:
        if name not in modules:
            raise ValueError(f"train_modules: model has no module named {name!r}")
    wrapped = [n for n, p in model.named_parameters() if is_sharded(p) or is_zero3(p)]
    if wrapped:  # patching splits and reorders whole weights: a sharding wrapper must come after it
        raise ValueError(f"patch needs the model's whole weights, but {len(wrapped)} parameters are already sharded "
                         f"(first: {wrapped[0]!r}, by FSDP2 or DeepSpeed ZeRO-3): patch the model first, then wrap "
                         f"it; under transformers' Trainer with ZeRO-3, load and patch the model before creating "
                         f"the TrainingArguments")
    register()
    nq, nkv, head_dim, _ = attention_dims(family, model.config)
    layers = family.layers(base)
    lowest, full_layers = _effective_horizon(model, plan, layers, [modules[n] for n in train_modules])
    info = PatchInfo(plan, grad, family, len(layers), nq, nkv, head_dim,
                     getattr(model.config, "_attn_implementation", None),
                     {n: p.requires_grad for n, p in model.named_parameters()}, tuple(train_modules))

    for p in model.parameters():
        p.requires_grad_(False)
    for name in train_modules:
        for p in modules[name].parameters():
            p.requires_grad_(True)

    names = {id(m): n for n, m in modules.items()}
    for i, layer in enumerate(layers):
        st = _layer_state(plan, i, grad, lowest, full=i in full_layers)
        slots = family.slots(layer)
        new = _build_projections(family, slots, st, nq, nkv, head_dim)
        for key, module in new.items():
            parent, attr = slots[key]
            old = getattr(parent, attr)
            initialised = _hf_initialized(old)
            info.originals[_slot_path(names, parent, attr)] = {
                "cls": type(old), "bias": getattr(old, "bias", None) is not None,
                "in": old.weight.shape[0] if family.conv1d else old.weight.shape[1],
                "out": old.weight.shape[1] if family.conv1d else old.weight.shape[0],
                "hf_initialized": initialised,
            }
            if initialised:  # post_init()/init_weights() skip it, as they skipped the module it replaces
                module._is_hf_initialized = True
            setattr(parent, attr, module)
        attn = family.attention(layer)
        setattr(attn, _STATE_ATTR, st)
        attn.register_forward_pre_hook(_check_attn_impl_hook)
        if family.fused_qkv:
            info.restore_attrs.append((attn, "split_size", attn.split_size))
            attn.split_size = len(st.q_order) * head_dim
        if st.no_grad:
            _wrap_no_grad(layer)
        layer._register_state_dict_hook(_MergedStateHook(info))
        layer.register_load_state_dict_pre_hook(_StandardToPatchedHook(info))
    if hasattr(model, "save_pretrained"):
        model.save_pretrained = _BoundOverride(_save_pretrained_with_plan, model)
    for m in _pretrained_models(model):  # init_weights() reaches _init_weights through the base model too
        m._init_weights = _BoundOverride(_init_weights_patched, m)
        if callable(getattr(type(m), "set_attn_implementation", None)):
            m.set_attn_implementation = _BoundOverride(_set_attn_impl_patched, m)
        m.register_forward_pre_hook(_check_attn_impl_hook)  # before the embeddings, when called from the top
    setattr(model, _PATCH_ATTR, info)
    _set_attn_impl(model, ATTN_NAME)
    return model


# ------------------------------------------------------------- state dict
# A patched model's state_dict holds the standard keys with the merged weights (pruned heads zeroed), exactly what
# unpatch would give, so save_pretrained, Trainer checkpoints and torch.save write a checkpoint that plain
# from_pretrained loads; load_state_dict takes such a checkpoint back into the patched slices.
def _slot_keys(layer: nn.Module, prefix: str, slots) -> Dict[str, str]:
    rel = {id(m): n for n, m in layer.named_modules()}
    return {key: prefix + (rel[id(parent)] + "." if rel[id(parent)] else "") + attr
            for key, (parent, attr) in slots.items()}


def _remove_state_hooks(layer: nn.Module) -> None:
    """Drop this package's state-dict hooks by marker (handles would point at the original after a deepcopy)."""
    for hooks in (layer._state_dict_hooks, layer._load_state_dict_pre_hooks):
        for k in [k for k, h in hooks.items() if getattr(getattr(h, "hook", h), "_headsparse", False)]:
            del hooks[k]


class _MergedStateHook:
    """state_dict hook of a patched layer (a class, not a closure, so a patched model pickles)."""

    _headsparse = True

    def __init__(self, info: PatchInfo):
        self.info = info

    def __call__(self, layer, state_dict, prefix, local_metadata):
        info = self.info
        st = getattr(info.family.attention(layer), _STATE_ATTR)
        slots = info.family.slots(layer)
        keys = _slot_keys(layer, prefix, slots)
        standard = {}
        if _zero3_hidden(slots):
            # DeepSpeed ZeRO-3, parameters partitioned (its save_checkpoint): like every other ZeRO-3 parameter in
            # this state dict, the stock entries are empty placeholders; the values are in the ZeRO partitions
            for key, slot in slots.items():
                ref = next(p for p in _get(slot).parameters())
                empty = ref.new_empty((0,))
                standard[keys[key]] = [(keys[key] + ".weight", empty)]
                standard[keys[key]] += [(keys[key] + ".bias", empty)] if _has_bias(_get(slot)) else []
        for key, (w, b) in (merged_layer_weights(info, layer, st).items() if not standard else ()):
            standard[keys[key]] = [(keys[key] + ".weight", w.t().contiguous() if info.family.conv1d else w)]
            standard[keys[key]] += [(keys[key] + ".bias", b)] if b is not None else []
        # this layer's entries are the last ones so far: rebuild them in order, with the stock entries
        items = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
        state_dict.update(_with_stock_entries(items, standard))


def _with_stock_entries(entries, standard: Dict[str, List]):
    """``entries`` ((key, tensor) pairs, in order) with each sliced module's patched entries replaced by its stock
    ones (``standard``: module key -> its stock (key, tensor) pairs), placed where the first of them stood."""
    placed = set()
    for k, v in entries:
        base = k.rpartition(".")[0]
        if base not in standard:
            yield k, v
        elif base not in placed:
            placed.add(base)
            yield from standard[base]


def _zero3_hidden(slots) -> bool:
    """True when the sliced modules' parameters are ZeRO-3 partitioned (not gathered) on this rank."""
    return any(is_zero3_partitioned(p) for slot in slots.values() for p in _get(slot).parameters())


def _has_bias(module: nn.Module) -> bool:
    if isinstance(module, HeadSlicedOutput):
        return module.bias is not None
    return module.bias_train is not None or module.bias_frozen is not None


def _split_rows(proj: HeadSlicedProjection, w: torch.Tensor, b: Optional[torch.Tensor], out: Dict, base: str):
    """Inverse of _full_rows: rows in patched order -> the projection's trainable and frozen blocks."""
    blocks = {"t": [], "f": []}
    cursor = 0
    for kind, s, e in proj.segments:  # in output order
        blocks[kind].append((s, cursor, e - s))
        cursor += e - s
    for kind, name in (("t", "train"), ("f", "frozen")):
        ref = getattr(proj, f"weight_{name}")
        if ref is None:
            continue
        wk = w.new_empty(ref.shape)
        bk = b.new_empty((ref.shape[0],)) if b is not None else None
        for s, c, n in blocks[kind]:
            wk[s:s + n] = w[c:c + n]
            if bk is not None:
                bk[s:s + n] = b[c:c + n]
        out[f"{base}.weight_{name}"] = wk
        if bk is not None and getattr(proj, f"bias_{name}") is not None:
            out[f"{base}.bias_{name}"] = bk


class _StandardToPatchedHook:
    """load_state_dict pre-hook of a patched layer (a class, not a closure, so a patched model pickles)."""

    _headsparse = True

    def __init__(self, info: PatchInfo):
        self.info = info

    def __call__(self, layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        info = self.info
        family, d = info.family, info.head_dim
        st = getattr(family.attention(layer), _STATE_ATTR)
        slots = family.slots(layer)
        keys = _slot_keys(layer, prefix, slots)
        present = {k for k in slots if keys[k] + ".weight" in state_dict}  # each slot on its own: a sharded
        # checkpoint may hold one layer's projections in different shards, loaded one after the other
        if present and _zero3_hidden(slots):
            state_dict.update(_zero3_placeholders(layer, prefix, slots, keys, present, state_dict))
            return

        def take(key):
            w = state_dict.pop(keys[key] + ".weight")
            b = state_dict.pop(keys[key] + ".bias", None)
            return (w.t() if family.conv1d else w), b

        def rows(w, b, order, offset=0):
            r = _rows(order, d, offset, w.device)
            return w.index_select(0, r), (b.index_select(0, r) if b is not None else None)

        out: Dict[str, torch.Tensor] = {}
        if "qkv" in present:
            w, b = take("qkv")
            nqd, nkvd = info.num_q_heads * d, info.num_kv_heads * d
            parts = [rows(w, b, st.q_order), rows(w, b, st.kv_order, nqd), rows(w, b, st.kv_order, nqd + nkvd)]
            _split_rows(_get(slots["qkv"]), torch.cat([p[0] for p in parts]),
                        torch.cat([p[1] for p in parts]) if b is not None else None, out, keys["qkv"])
        for key, order in (("q", st.q_order), ("k", st.kv_order), ("v", st.kv_order)):
            if key in present:
                _split_rows(_get(slots[key]), *rows(*take(key), order), out, keys[key])
        if "o" in present:
            o = _get(slots["o"])
            w, b = take("o")
            wp = w.index_select(1, _rows(st.q_order, d, 0, w.device))
            if o.weight_train is not None:
                out[keys["o"] + ".weight_train"] = wp[:, :o.cols_train]
            if o.weight_frozen is not None:
                out[keys["o"] + ".weight_frozen"] = wp[:, o.cols_train:]
            if b is not None:
                out[keys["o"] + ".bias"] = b
        state_dict.update(_sharded_like(layer, prefix, out))


def _zero3_placeholders(layer, prefix, slots, keys, present, state_dict) -> Dict[str, torch.Tensor]:
    """DeepSpeed ZeRO-3 with partitioned parameters: the checkpoint's module entries are empty placeholders (what
    the state-dict hook writes there; DeepSpeed restores the values from its ZeRO partitions), so each patched
    parameter gets an empty placeholder of its own. Whole weights cannot be copied into a partition here."""
    rel = {id(m): n for n, m in layer.named_modules()}
    out: Dict[str, torch.Tensor] = {}
    for key in present:
        w = state_dict.pop(keys[key] + ".weight")
        state_dict.pop(keys[key] + ".bias", None)
        if w.numel():
            raise RuntimeError(
                f"headsparse: {keys[key]}.weight holds whole weights but the layer's parameters are DeepSpeed ZeRO-3 "
                "partitioned; load them inside deepspeed.zero.GatheredParameters(model.parameters(), "
                "modifier_rank=0) (as transformers does for ZeRO-3), or use the DeepSpeed checkpoint")
        module = _get(slots[key])
        mod_prefix = prefix + (rel[id(module)] + "." if rel[id(module)] else "")
        for name, p in module.named_parameters(recurse=False):
            # a partitioned parameter gets an empty placeholder; one ZeRO-3 keeps whole ("persistent": small)
            # keeps its own values (the save hook wrote no values for it either)
            out[mod_prefix + name] = (p.detach().new_empty(p.shape) if is_zero3_partitioned(p)
                                      else p.detach().clone())
    return out


def _sharded_like(layer: nn.Module, prefix: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Whole tensors for parameters that are sharded (FSDP2 ``fully_shard``: DTensors) become DTensors laid out like
    them: each rank keeps its own shard of the whole tensor, which every rank holds (no communication)."""
    params = dict(layer.named_parameters())
    out = {}
    for key, t in tensors.items():
        p = params.get(key[len(prefix):])
        if is_sharded(p) and not is_sharded(t):
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t.to(device=p.device), p.device_mesh, p.placements, src_data_rank=None)
        out[key] = t
    return out


class _BoundOverride:
    """A per-instance method override: ``fn(obj, ...)``. Unlike types.MethodType, it pickles (fn by reference,
    obj through pickle's memo), so torch.save / copy.deepcopy of a whole patched model work."""

    def __init__(self, fn, obj):
        self.fn, self.obj = fn, obj

    def __call__(self, *args, **kwargs):
        return self.fn(self.obj, *args, **kwargs)


def _save_pretrained_with_plan(model, save_directory, *args, **kwargs):
    """The model class's save_pretrained (standard keys, merged weights: see the state-dict hooks), plus the plan
    as headsparse_plan.json beside it, so the folder loads with plain from_pretrained and can be re-patched."""
    if kwargs.get("is_main_process", True):  # written first, so that a push_to_hub upload includes it
        os.makedirs(str(save_directory), exist_ok=True)
        patch_info(model).plan.save(os.path.join(str(save_directory), PLAN_FILE))
    given = kwargs.get("state_dict")
    if given and any(k.endswith((".weight_train", ".weight_frozen")) for k in given):
        kwargs["state_dict"] = _standard_from_patched(model, given)
    type(model).save_pretrained(model, save_directory, *args, **kwargs)


_SLICED_PARAMS = ("weight_train", "bias_train", "weight_frozen", "bias_frozen", "bias")


def _standard_from_patched(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A whole state dict under the patched parameter names (``...q_proj.weight_train`` etc.) as the stock one
    (merged weights, pruned heads zeroed). Such dicts come from code that reads the parameters directly instead of
    calling ``state_dict()``, such as DeepSpeed's consolidated ZeRO-3 state dict, which Trainer passes to
    ``save_pretrained`` when ``stage3_gather_16bit_weights_on_model_save`` is on."""
    info = patch_info(model)
    family = info.family
    names = {id(m): n for n, m in model.named_modules()}
    standard: Dict[str, List] = {}
    for layer in family.layers(model.base_model):
        slots = family.slots(layer)
        keys = _slot_keys(layer, names[id(layer)] + "." if names[id(layer)] else "", slots)
        if not any(keys[k] + suffix in state_dict for k in slots for suffix in (".weight_train", ".weight_frozen")):
            continue
        stand_ins = {}
        for key, slot in slots.items():
            module, held = _get(slot), {"segments": getattr(_get(slot), "segments", None)}
            for name in _SLICED_PARAMS:
                held[name] = None
                if module._parameters.get(name) is not None:
                    if keys[key] + "." + name not in state_dict:
                        raise ValueError(f"headsparse: save_pretrained got a state dict with patched names but "
                                         f"without {keys[key]}.{name} (frozen parameters excluded?); it cannot be "
                                         "merged into a stock checkpoint: use headsparse.save_final")
                    held[name] = state_dict[keys[key] + "." + name]
            stand_ins[key] = SimpleNamespace(**held)
        holder = SimpleNamespace(**stand_ins)
        merged = merged_layer_weights(info, layer, getattr(family.attention(layer), _STATE_ATTR),
                                      slots={k: (holder, k) for k in slots})
        for key, (w, b) in merged.items():
            standard[keys[key]] = [(keys[key] + ".weight", w.t().contiguous() if family.conv1d else w)]
            standard[keys[key]] += [(keys[key] + ".bias", b)] if b is not None else []
    return dict(_with_stock_entries(state_dict.items(), standard))


def _pretrained_models(model: nn.Module) -> List[nn.Module]:
    """The model and every submodule with its own _init_weights (the base model of a task model)."""
    return [m for m in model.modules() if callable(getattr(type(m), "_init_weights", None))]


def _hf_initialized(module: nn.Module) -> bool:
    """Hugging Face's "already initialised" mark: on the module, or on every one of its own parameters."""
    if getattr(module, "_is_hf_initialized", False):
        return True
    params = list(module.parameters(recurse=False))
    return bool(params) and all(getattr(p, "_is_hf_initialized", False) for p in params)


def _init_weights_patched(model, module):
    """The model class's _init_weights, except on a head-sliced projection, which it cannot initialise."""
    if isinstance(module, (HeadSlicedProjection, HeadSlicedOutput)):
        raise RuntimeError("headsparse: a patched projection cannot be re-initialised in place (its weight is split "
                           "into trainable and frozen head slices); call headsparse.unpatch(model), initialise the "
                           "model, then patch it again")
    return type(model)._init_weights(model, module)


# ------------------------------------------------------------------- unpatch
def _new_module(orig: Dict, w: torch.Tensor, b: Optional[torch.Tensor], conv1d: bool) -> nn.Module:
    cls = orig["cls"]
    if conv1d:
        m = cls(orig["out"], orig["in"])
        m.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w.t())
            if b is not None:
                m.bias.copy_(b)
        return m
    m = nn.Linear(orig["in"], orig["out"], bias=orig["bias"], device=w.device, dtype=w.dtype)
    if cls is not nn.Linear:
        m.__class__ = cls  # pragma: no cover - subclasses of Linear keep their type
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m


def _unsharded(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` detached; a sharded parameter (FSDP2's DTensor) is gathered whole first: a collective, so every rank
    must make the same call (as every rank does in ``state_dict()`` under FSDP2)."""
    if t is None:
        return None
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


def _full_rows(proj: HeadSlicedProjection):
    """(weight, bias) of a sliced projection in its patched row order (segments concatenated)."""
    ws, bs = [], []
    blocks = {kind: (_unsharded(getattr(proj, f"weight_{name}")), _unsharded(getattr(proj, f"bias_{name}")))
              for kind, name in (("t", "train"), ("f", "frozen"))}  # each gathered once when sharded
    for kind, s, e in proj.segments:
        w, b = blocks[kind]
        ws.append(w[s:e])
        bs.append(b[s:e] if b is not None else None)
    return torch.cat(ws), (torch.cat(bs) if bs[0] is not None else None)


def merged_layer_weights(info: PatchInfo, layer: nn.Module, st: LayerState, slots=None):
    """Full-size (out, in) weights of q/k/v (or qkv) and o, with pruned heads zeroed.

    ``slots`` (default: the layer's) may map each slot to stand-ins holding other tensors under the same names."""
    family, d, nq, nkv = info.family, info.head_dim, info.num_q_heads, info.num_kv_heads
    slots = family.slots(layer) if slots is None else slots
    modes = info.plan.modes[st.layer]
    pruned_q = [h for h in range(nq) if modes[h] == HeadMode.PRUNED]
    out = {}

    def scatter(w_patched, b_patched, order, n_heads):
        w = w_patched.new_zeros((n_heads * d, w_patched.shape[1]))
        b = w_patched.new_zeros((n_heads * d,)) if b_patched is not None else None
        rows = _rows(order, d, 0, w.device)
        w.index_copy_(0, rows, w_patched)
        if b is not None:
            b.index_copy_(0, rows, b_patched)
        return w, b

    def zero_heads(w, b, heads, n_heads_dim_axis=0):
        if heads:
            rows = _rows(heads, d, 0, w.device)
            w.index_fill_(n_heads_dim_axis, rows, 0)
            if b is not None and n_heads_dim_axis == 0:
                b.index_fill_(0, rows, 0)

    if family.fused_qkv:
        w, b = _full_rows(_get(slots["qkv"]))
        nqp, nkvp = len(st.q_order) * d, len(st.kv_order) * d
        parts = [(w[:nqp], b[:nqp] if b is not None else None, st.q_order, nq),
                 (w[nqp:nqp + nkvp], b[nqp:nqp + nkvp] if b is not None else None, st.kv_order, nkv),
                 (w[nqp + nkvp:], b[nqp + nkvp:] if b is not None else None, st.kv_order, nkv)]
        full = [scatter(*p) for p in parts]
        zero_heads(*full[0], pruned_q)
        out["qkv"] = (torch.cat([f[0] for f in full]), torch.cat([f[1] for f in full]) if b is not None else None)
    else:
        for name, order, n in (("q", st.q_order, nq), ("k", st.kv_order, nkv), ("v", st.kv_order, nkv)):
            w, b = _full_rows(_get(slots[name]))
            out[name] = scatter(w, b, order, n)
        zero_heads(*out["q"], pruned_q)
    o = _get(slots["o"])
    parts = [_unsharded(x) for x in (o.weight_train, o.weight_frozen) if x is not None]
    wo_p = torch.cat(parts, dim=1)
    wo = wo_p.new_zeros((wo_p.shape[0], nq * d))
    wo.index_copy_(1, _rows(st.q_order, d, 0, wo.device), wo_p)
    if pruned_q:
        wo.index_fill_(1, _rows(pruned_q, d, 0, wo.device), 0)
    out["o"] = (wo, _unsharded(o.bias))
    return out


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` in place: standard projections with the tuned weights merged; returns the model.

    The architecture is the original one. Pruned heads stay in it, zeroed:
    their Q rows and O columns are 0 (and the K/V rows of KV heads whose whole
    group was pruned), so the standard model computes the same logits, and
    ``save_pretrained`` / ``from_pretrained`` reproduce them.
    """
    info = patch_info(model)
    cache = getattr(model, PREFIX_CACHE_ATTR, None)  # a prefix cache holds the patched prefix's states: drop it
    if cache is not None:  # (what prefix_cache.drop_prefix_cache does; read here so core does not import it)
        cache.detach(clear=True)
    family = info.family
    base = model.base_model
    names = {id(m): n for n, m in model.named_modules()}
    for layer in family.layers(base):
        attn = family.attention(layer)
        st: LayerState = getattr(attn, _STATE_ATTR)
        merged = merged_layer_weights(info, layer, st)
        slots = family.slots(layer)
        for key, (w, b) in merged.items():
            parent, attr = slots[key]
            orig = info.originals[_slot_path(names, parent, attr)]
            restored = _new_module(orig, w, b, family.conv1d)
            if orig.get("hf_initialized") or _hf_initialized(_get(slots[key])):
                restored._is_hf_initialized = True  # holds the tuned weights: init_weights() must not touch them
            setattr(parent, attr, restored)
        delattr(attn, _STATE_ATTR)
        _remove_hook(attn, _check_attn_impl_hook)
        _unwrap_no_grad(layer)
        _remove_state_hooks(layer)
    for obj, attr, val in info.restore_attrs:
        setattr(obj, attr, val)
    model.__dict__.pop("save_pretrained", None)
    for m in _pretrained_models(model):
        m.__dict__.pop("_init_weights", None)
        m.__dict__.pop("set_attn_implementation", None)
        _remove_hook(m, _check_attn_impl_hook)
    for n, p in model.named_parameters():
        p.requires_grad_(info.requires_grad_before.get(n, True))
    delattr(model, _PATCH_ATTR)
    _set_attn_impl(model, info.attn_impl_before)
    return model
