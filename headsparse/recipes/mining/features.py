"""Per-sample features for mining, from one batched forward (+ backward) per batch.

- ``loss``: per-sample mean next-token loss;
- ``gate``: per-(sample, TRAIN head) gate gradient sum_t <O_h, dO_h>, read from
  the statistics the head-sparse attention backward gathers
  (:func:`headsparse.record_gate_grads`), mapped back to the plan's original
  head order;
- ``sketch``: per-sample gradient of the trainable head slices, randomly
  projected without ever forming a per-sample gradient. For a linear map with
  per-sample input A_b (S x in) and output gradient E_b (S x out), the weight
  gradient is E_b^T A_b; with fixed Gaussian R_out (k x out) and R_in (k x in)
  the Kronecker-structured projection R_out E_b^T A_b R_in^T = (E_b R_out^T)^T
  (A_b R_in^T) costs two thin matmuls (a k x k sketch per module, inner
  products preserved in expectation);
- ``hidden``: mean-pooled last hidden state (padding excluded).

:func:`forward_signature` is the forward-only alternative to ``gate``: per
(sample, TRAIN head), the head's attention output (the o-projection's input)
mean-pooled over the sample's tokens, from a forward that stops after the
highest layer holding a TRAIN head: no loss, no LM head, no backward.

The model must be patched (:func:`headsparse.patch`); :func:`patched_for`
gives a patched copy when it is not.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ...ops import record_gate_grads
from ...patch import HeadSlicedOutput, HeadSlicedProjection, head_layout, is_patched, patch, patch_info
from ...patch.core import layer_states
from ...patch.families import find_family
from ...plan import HeadPlan
from ..data import collate, model_device, per_sample_loss


@contextlib.contextmanager
def patched_for(model, plan: HeadPlan, grad: str = "exact") -> Iterator:
    """Yield ``model`` if it is patched with ``plan``; else a patched deep copy (the caller's model is untouched)."""
    if not isinstance(plan, HeadPlan):
        raise ValueError(f"plan must be a headsparse.HeadPlan, got {type(plan).__name__}")
    if is_patched(model):
        info = patch_info(model)
        if info.plan != plan:
            raise ValueError("model is patched with a different plan than the one given; unpatch it or pass its plan")
        yield model
        return
    plan.check_model(model)
    work = copy.deepcopy(model)
    patch(work, plan, grad=grad)
    try:
        yield work
    finally:
        del work


def _layers_and_states(model):
    return patch_info(model), layer_states(model)


def train_head_index(plan: HeadPlan) -> List[tuple]:
    """(layer, head) of every TRAIN head, in signature order."""
    return [(i, h) for i in range(plan.num_layers) for h in plan.heads(i, "train")]


class _Sketcher:
    """Forward/backward hooks computing the Kronecker sketch of per-sample gradients of trainable slices."""

    def __init__(self, model, k: int, seed: int) -> None:
        self.k = k
        self.handles = []
        self.parts: List[Dict] = []
        gen = torch.Generator().manual_seed(seed)
        dev = model_device(model)
        for name, mod in model.named_modules():
            if isinstance(mod, HeadSlicedProjection) and mod.rows_train:
                cols, pos = [], 0
                for kind, s, e in mod.segments:
                    if kind == "t":
                        cols.extend(range(pos, pos + e - s))
                    pos += e - s
                n_in, n_out, bias = mod.in_features, len(cols), mod.bias_train is not None
                cols_t = torch.tensor(cols, dtype=torch.long, device=dev)
                sl = None
            elif isinstance(mod, HeadSlicedOutput) and mod.cols_train:
                n_in, n_out, bias, cols_t, sl = mod.cols_train, mod.out_features, False, None, mod.cols_train
            else:
                continue
            entry = {
                "name": name, "cols": cols_t, "in_cols": sl, "bias": bias,
                "r_in": (torch.randn(k, n_in, generator=gen) / k ** 0.5).to(dev),
                "r_out": (torch.randn(k, n_out, generator=gen) / k ** 0.5).to(dev),
                "a": None, "e": None,
            }
            self.parts.append(entry)
            self.handles.append(mod.register_forward_hook(self._hook(entry)))

    def _hook(self, entry):
        def fwd(mod, inp, out):
            if not (torch.is_grad_enabled() and out.requires_grad):
                return
            x = inp[0].detach()
            if entry["in_cols"] is not None:
                x = x[..., : entry["in_cols"]]
            entry["a"] = x.float() @ entry["r_in"].t()

            def bwd(g):
                g = g.detach()
                if entry["cols"] is not None:
                    g = g.index_select(-1, entry["cols"])
                entry["e"] = g.float() @ entry["r_out"].t()

            out.register_hook(bwd)
        return fwd

    @property
    def dim(self) -> int:
        return sum(self.k * self.k + (self.k if p["bias"] else 0) for p in self.parts)

    def collect(self, b: int) -> torch.Tensor:
        feats = []
        for p in self.parts:
            a, e = p["a"], p["e"]
            if a is None or e is None:
                raise RuntimeError(f"no gradient reached trainable slice {p['name']!r} (is it above the loss?)")
            feats.append(torch.einsum("bsk,bsj->bkj", e, a).reshape(b, -1))
            if p["bias"]:
                feats.append(e.sum(1))
            p["a"] = p["e"] = None
        return torch.cat(feats, dim=1) if feats else torch.zeros(b, 0)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def probe(model, examples: Sequence[Dict], *, batch_size: int = 8, pad_id: int = 0, gate: bool = False,
          sketch_k: Optional[int] = None, hidden: bool = False, backward: bool = True, seed: int = 0,
          progress: bool = False, desc: str = "probe") -> Dict[str, torch.Tensor]:
    """Features of ``examples`` from a patched ``model`` (see the module docstring), batch by batch.

    One forward (and, if ``backward``, one backward of the summed per-sample
    losses) per batch; parameter gradients it leaves are cleared. Returns a
    dict with "loss" (N,), and as asked "gate" (N, n_train_heads),
    "sketch" (N, F), "hidden" (N, d).
    """
    if (gate or sketch_k) and not backward:
        raise ValueError("gate and sketch features need backward=True")
    if (gate or sketch_k) and not is_patched(model):
        raise ValueError("gate/sketch features need a model patched by headsparse.patch (see patched_for)")
    dev = model_device(model)
    was_training = model.training
    model.eval()
    sketcher = _Sketcher(model, sketch_k, seed) if sketch_k else None
    heads = None
    if gate:
        info, states = _layers_and_states(model)
        heads = [(i, h, states[i].q_order.index(h)) for i, h in train_head_index(info.plan)]
        if not heads:
            raise ValueError("the plan has no TRAIN heads, so there is no head signature to mine with")
    out: Dict[str, List[torch.Tensor]] = {"loss": [], "gate": [], "sketch": [], "hidden": []}
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    starts = range(0, len(examples), batch_size)
    it = tqdm(starts, desc=desc, unit="batch", leave=False) if (progress and tqdm) else starts
    try:
        for s in it:
            chunk = examples[s:s + batch_size]
            b = collate(chunk, pad_id, dev)
            ctx = record_gate_grads() if gate else contextlib.nullcontext()
            with torch.set_grad_enabled(backward), ctx as rec:
                res = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=hidden)
                loss = per_sample_loss(res.logits, b["labels"])
                if backward:
                    if loss.requires_grad:
                        loss.sum().backward()
                    elif gate or sketch_k:
                        raise ValueError("the loss does not depend on any trainable head slice (empty plan?)")
            out["loss"].append(loss.detach().float().cpu())
            if gate:
                by = rec.by_key()
                cols = []
                for i, h, p in heads:
                    if i not in by:
                        raise RuntimeError(f"no gate-gradient statistics recorded for layer {i}")
                    cols.append(by[i][:, p])
                g = torch.stack(cols, dim=1).float().cpu()
                if torch.isnan(g).any():
                    raise RuntimeError("gate-gradient statistics missing for a TRAIN head (its backward was skipped)")
                out["gate"].append(g)
            if sketcher is not None:
                out["sketch"].append(sketcher.collect(len(chunk)).cpu())
            if hidden:
                h = res.hidden_states[-1].detach().float()
                m = b["attention_mask"].unsqueeze(-1).float()
                out["hidden"].append(((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu())
            if backward:
                for p in model.parameters():
                    p.grad = None
    finally:
        if sketcher is not None:
            sketcher.close()
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items() if v}


class _StopForward(Exception):
    """Raised by a hook once the last layer a signature needs has run."""


def forward_signature(model, examples: Sequence[Dict], plan: HeadPlan, *, batch_size: int = 8, pad_id: int = 0,
                      progress: bool = False, desc: str = "fwd signature") -> torch.Tensor:
    """(N, n_train_heads * head_dim): each TRAIN head's output O_h mean-pooled over non-padding tokens, forward only.

    Works on a patched model (heads in its patched order, mapped back) or an
    unpatched one (heads in their original order). Column blocks of head_dim
    follow :func:`train_head_index`. The forward stops at the o-projection of
    the highest layer with a TRAIN head, so the layers above it and the LM head
    never run. (The per-head output *norm* alone, a cheaper signature, found
    planted target examples at twice the random rate on the tests' synthetic
    task; the pooled vector at five times.)
    """
    heads = train_head_index(plan)
    if not heads:
        raise ValueError("the plan has no TRAIN heads, so there is no head signature to mine with")
    plan.check_model(model)
    family, base = find_family(model)
    layers = family.layers(base)
    layout = head_layout(model) if is_patched(model) else [list(range(plan.num_q_heads))] * plan.num_layers
    by_layer: Dict[int, List[int]] = {}
    for i, h in heads:
        by_layer.setdefault(i, []).append(layout[i].index(h))
    top = max(by_layer)
    captured: Dict[int, torch.Tensor] = {}
    dev = model_device(model)

    def hook_for(i):
        def pre(mod, args):
            x = args[0]
            n = len(layout[i])
            captured[i] = x.reshape(*x.shape[:-1], n, x.shape[-1] // n)[..., by_layer[i], :].float()
            if i == top:
                raise _StopForward
        return pre

    handles = [getattr(*family.slots(layers[i])["o"]).register_forward_pre_hook(hook_for(i)) for i in by_layer]
    was_training = model.training
    model.eval()
    out: List[torch.Tensor] = []
    try:
        from tqdm.auto import tqdm

        starts = range(0, len(examples), batch_size)
        for s in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress):
            b = collate(examples[s:s + batch_size], pad_id, dev)
            captured.clear()
            with torch.no_grad():
                try:
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                except _StopForward:
                    pass
            m = b["attention_mask"][..., None, None].float()
            cols = [((captured[i] * m).sum(1) / m.sum(1).clamp_min(1)).flatten(1) for i in sorted(by_layer)]
            out.append(torch.cat(cols, dim=1).cpu())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.cat(out)


def model_fingerprint(model) -> str:
    """A hash of the model's class, config and every parameter and buffer (changes whenever any weight does)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    h.update((cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def examples_fingerprint(examples: Sequence[Dict]) -> str:
    """A hash of the examples' token ids and labels, in order."""
    import hashlib
    import json

    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        h.update(json.dumps([list(e["input_ids"]), list(e["labels"]) if e.get("labels") is not None else None])
                 .encode())
    return h.hexdigest()


def cached_forward_signature(model, examples: Sequence[Dict], plan: HeadPlan, cache_dir, *, batch_size: int = 8,
                             pad_id: int = 0, progress: bool = False) -> tuple:
    """(:func:`forward_signature` of ``plan``'s TRAIN heads, "hit" | "miss", seconds spent computing).

    The signature of *every* head of an unpatched ``model`` on ``examples`` is
    kept in ``cache_dir`` (safetensors, written to a temporary name and renamed),
    keyed by :func:`model_fingerprint` and :func:`examples_fingerprint`, so a
    later run on the same pool with another plan mines without a forward. A
    change of any weight or any example is a new key. The first computation
    runs every layer (no early stop), so a miss costs more than an uncached call.
    """
    import os
    import time

    from safetensors.torch import load_file, save_file

    from ..._atomic import atomic_path

    if is_patched(model):
        raise ValueError("cache_dir: the signature cache needs an unpatched model (all heads present)")
    plan.check_model(model)
    key = f"{model_fingerprint(model)}-{examples_fingerprint(examples)}"
    path = os.path.join(os.fspath(cache_dir), f"fwdsig-{key}.safetensors")
    t0 = time.perf_counter()
    if os.path.isfile(path):
        full, status, spent = load_file(path)["signature"], "hit", 0.0
    else:
        every = HeadPlan.for_model(model, "train")
        full = forward_signature(model, examples, every, batch_size=batch_size, pad_id=pad_id, progress=progress,
                                 desc="fwd signature (all heads, cached)")
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({"signature": full.contiguous()}, tmp)
        status, spent = "miss", time.perf_counter() - t0
    d = full.shape[1] // (plan.num_layers * plan.num_q_heads)
    cols = torch.cat([torch.arange((i * plan.num_q_heads + h) * d, (i * plan.num_q_heads + h + 1) * d)
                      for i, h in train_head_index(plan)])
    return full[:, cols], status, spent
