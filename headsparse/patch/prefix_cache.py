"""Frozen-prefix cache: the layers below the gradient horizon run once per example, not once per epoch.

A patched model runs every layer below its lowest trainable layer ``h`` (the
gradient horizon) under ``no_grad``: their weights are frozen and their input
is the example, so they compute the same hidden state every epoch. A
:class:`PrefixCache` attached to the model keeps, per example, the hidden
state that enters layer ``h`` (unpadded: one ``(tokens, hidden)`` tensor in the
model's dtype) and, on a later forward whose every row is cached, replaces
layers ``0 .. h-1`` by pass-throughs that hand layer ``h`` the cached states,
re-padded to the batch's layout. Everything else is recomputed by the model
from the batch as usual: embeddings (a lookup), position ids, attention masks,
rotary embeddings. Nothing else needs keeping for the families ``patch``
supports: their layers above ``h`` read only the hidden state, the mask and
the positions.

Validity (enforced, not assumed):

- Key of an entry: the row's tokens (where the attention mask is 1), where
  they sit in the row (first position, or every position when they are not
  contiguous), its ``token_type_ids`` and explicit ``position_ids``. The same
  example padded on the left by a different amount is a different entry (the
  model's default position ids depend on it).
- Key of the whole cache: a hash of every parameter and buffer below the
  horizon (embeddings and layers ``0 .. h-1``), the horizon, the family and
  the config. Every forward checks the tensors' version counters and storage
  (a change through autograd-tracked in-place ops, ``load_state_dict``, an
  optimizer, or a replaced ``.data``); :meth:`PrefixCache.verify` re-hashes the
  contents (``tune`` calls it before every epoch it replays). A changed key
  drops every entry.
- Determinism: while a cache is attached, the modules below the horizon run in
  eval mode on every forward, cached or not (dropout off there; the families'
  other layers are unchanged by eval mode). This is a change of method for
  models with dropout below the horizon (GPT-2, BERT, RoBERTa by default), and
  it applies equally to the run that fills the cache.
- No parameter below the horizon may train: attaching (and every forward)
  refuses one that requires a gradient, naming it (``train_modules`` that
  reach the embeddings, tied embeddings included).
- ``unpatch`` drops the cache; a plan change (which needs an ``unpatch``)
  therefore does too, and a forward with another plan than the one attached
  drops every entry.
- A forward the cache cannot serve exactly runs uncached and stores nothing:
  ``inputs_embeds``, ``past_key_values``, ``output_hidden_states`` or
  ``output_attentions``, or another argument it does not know.

Memory: ``hidden_size * dtype bytes`` per token per cached example (SmolLM2-135M
in float32: 2,304 bytes per token). Past ``max_memory_bytes`` the entries go to
memory-mapped safetensors files in ``spill_dir`` (a temporary folder by
default, removed by :meth:`PrefixCache.clear`).

This module is part of the patch layer: it imports ``torch``, ``safetensors``
and this package's patch core only.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import struct
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .core import _PATCH_ATTR, PREFIX_CACHE_ATTR, layer_states, patch_info
from .linear import is_sharded, is_zero3

_CACHE_ATTR = PREFIX_CACHE_ATTR  # defined in core, which unpatch reads without importing this module

# Modules of each family's base model that run before its first layer (the rest of the prefix is layers[:h]).
_BEFORE = {
    "llama": ("embed_tokens", "rotary_emb"),
    "mistral": ("embed_tokens", "rotary_emb"),
    "qwen2": ("embed_tokens", "rotary_emb"),
    "qwen3": ("embed_tokens", "rotary_emb"),
    "gpt2": ("wte", "wpe", "drop"),
    "bert": ("embeddings",),
    "roberta": ("embeddings",),
}
# Base-model arguments the cache understands; any other one that is not None makes a forward run uncached.
_KEYED = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
_HARMLESS = ("use_cache", "return_dict", "kwargs")
_MUST_BE_NONE = ("inputs_embeds", "past_key_values", "cache_position", "head_mask", "encoder_hidden_states",
                 "encoder_attention_mask")
_MUST_BE_FALSE = ("output_hidden_states", "output_attentions")


def bytes_per_token(model) -> int:
    """Bytes one cached token costs for ``model``: hidden size times the element size of its dtype."""
    p = next(model.parameters())
    return int(model.config.hidden_size) * p.element_size()


def example_key(input_ids: Sequence[int], token_type_ids: Optional[Sequence[int]] = None) -> bytes:
    """The entry key of an example laid out as the recipes batch it (right padding, default position ids)."""
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    tt = None if token_type_ids is None else torch.as_tensor(list(token_type_ids), dtype=torch.long)
    return _row_key(ids, 0, None, None, tt)


def _row_key(ids: torch.Tensor, start: int, where: Optional[torch.Tensor], pos: Optional[torch.Tensor],
             tt: Optional[torch.Tensor]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(b"ids" + ids.to(torch.int64).cpu().numpy().tobytes())
    h.update(b"start" + str(start).encode() if where is None else b"at" + where.to(torch.int64).cpu().numpy().tobytes())
    if pos is not None:
        h.update(b"pos" + pos.to(torch.int64).cpu().numpy().tobytes())
    if tt is not None:
        h.update(b"tt" + tt.to(torch.int64).cpu().numpy().tobytes())
    return h.digest()


class _Skip(nn.Module):
    """Stands in for a layer below the horizon during a cached forward: returns its hidden-state input, or (the
    last one) the cached states."""

    def __init__(self, out: Optional[torch.Tensor] = None, as_tuple: bool = False):
        super().__init__()
        self.out, self.as_tuple = out, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states if self.out is None else self.out
        return (h,) if self.as_tuple else h


def _mmap_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private memory map of it (pages read on first use)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    base = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        s, e = meta["data_offsets"]
        out[name] = base[8 + n + s: 8 + n + e].view(dtypes[meta["dtype"]]).view(meta["shape"])
    return out


class PrefixCache:
    """Per-example hidden states at the input of a patched model's horizon layer (see the module docstring).

    Args:
        max_memory_bytes: keep at most this many bytes of entries in memory; past it, entries are written to
            memory-mapped safetensors files (None: no limit).
        spill_dir: folder for those files (default: a temporary folder, removed by :meth:`clear`).
        storage_device: where in-memory entries live (default: where they were computed).

    Use: ``cache = PrefixCache().attach(model)``; every forward of ``model`` then fills or reads it;
    ``cache.detach()`` stops that (entries are kept and may be attached to another model whose prefix weights,
    horizon and config are the same; otherwise attaching drops them).
    """

    def __init__(self, max_memory_bytes: Optional[int] = None, spill_dir=None, storage_device=None):
        if max_memory_bytes is not None and (isinstance(max_memory_bytes, bool) or not isinstance(max_memory_bytes, int)
                                             or max_memory_bytes < 0):
            raise ValueError(f"max_memory_bytes must be a non-negative int or None, got {max_memory_bytes!r}")
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self._own_dir: Optional[str] = None
        self._files: List[str] = []
        self._mem: Dict[bytes, torch.Tensor] = {}
        self._disk: Dict[bytes, torch.Tensor] = {}
        self._mem_bytes = 0
        self.key: Optional[str] = None  # hash of the prefix weights, horizon, family and config
        self.hits = 0  # forwards served from the cache
        self.misses = 0  # forwards that ran the prefix (and stored what was missing)
        self.bypassed = 0  # forwards the cache could not serve (see the module docstring)
        self.fill_s = 0.0  # seconds spent storing entries
        self._model = None
        self._handles: List = []
        self._ctx: Optional[Dict] = None

    # ------------------------------------------------------------- binding
    def attach(self, model) -> "PrefixCache":
        """Attach to a patched ``model``: check the conditions (refusing with the reason), key the prefix, install
        the hooks. Entries whose key differs from this model's are dropped. Returns ``self``."""
        if self._model is not None:
            if self._model is model:
                return self
            raise ValueError("this PrefixCache is attached to another model; detach it first")
        if getattr(model, _CACHE_ATTR, None) is not None:
            raise ValueError("model already has a PrefixCache attached; detach it first")
        if getattr(model, _PATCH_ATTR, None) is None:
            raise ValueError("the prefix cache needs a model patched by headsparse.patch (it caches below the "
                             "plan's gradient horizon)")
        self._bind(model)
        base = model.base_model
        self._handles = [
            base.register_forward_pre_hook(self._pre, with_kwargs=True),
            base.register_forward_hook(self._post, always_call=True),
            self._layers[self._h].register_forward_pre_hook(self._fill, with_kwargs=True),
            self._layers[self._h - 1].register_forward_hook(self._layer_output_kind),
        ]
        self._model = model
        model.__dict__[_CACHE_ATTR] = self
        return self

    def _bind(self, model) -> None:
        info = patch_info(model)
        family = info.family
        if family.name not in _BEFORE:
            raise ValueError(f"the prefix cache cannot serve family {family.name!r}: it does not know which of its "
                             "modules run before the first layer")
        base = model.base_model
        layers = family.layers(base)
        before = [getattr(base, n) for n in _BEFORE[family.name] if getattr(base, n, None) is not None]
        h = next((i for i, st in enumerate(layer_states(model)) if not st.no_grad), None)
        prefix = before + (list(layers[:h]) if h is not None else list(layers))
        self._check_frozen(model, prefix)
        if h is None:
            raise ValueError("the prefix cache needs a trainable layer: the plan has no TRAIN head and no train_modules "
                             "inside the layers, so there is no gradient horizon to cache below")
        if h == 0:
            raise ValueError("the plan's lowest trainable layer is 0: nothing below the gradient horizon to cache")
        self._info, self._family, self._layers, self._h = info, family, layers, h
        self._plan = info.plan
        self._prefix = prefix
        self._prefix_params = [p for m in prefix for p in m.parameters()]
        self._prefix_tensors = self._prefix_params + [t for m in prefix for t in m.buffers()]
        self._submodules = [s for m in prefix for s in m.modules()]
        self._versions = self._version_state()
        key = self._content_key(model)
        if key != self.key:
            self.clear()
        self.key = key
        sig = inspect.signature(type(base).forward)
        self._sig = sig
        self._dtype = next(model.parameters()).dtype

    def _check_frozen(self, model, prefix) -> None:
        names: Dict[int, List[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        for m in prefix:
            for p in m.parameters():
                if p.requires_grad:
                    alias = names.get(id(p), ["?"])
                    also = f" (also {', '.join(alias[1:])})" if len(alias) > 1 else ""
                    raise ValueError(f"the prefix cache refuses: parameter {alias[0]!r}{also} is trainable but lies "
                                     "below the gradient horizon, so the cached states would go stale as it trains; "
                                     "leave it frozen or train without the cache")

    def _version_state(self) -> Tuple:
        return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in self._prefix_tensors)

    def _content_key(self, model) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self._family.name}|h={self._h}|{type(model.base_model).__name__}".encode())
        cfg = getattr(model, "config", None)
        h.update((cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)).encode())
        for t in self._prefix_tensors:
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def detach(self, clear: bool = False) -> None:
        """Remove the hooks from the attached model (entries are kept unless ``clear``)."""
        for hd in self._handles:
            hd.remove()
        self._handles = []
        if self._model is not None:
            self._model.__dict__.pop(_CACHE_ATTR, None)
        self._model = None
        self._ctx = None
        if clear:
            self.clear()

    @property
    def attached(self):
        """The model this cache is attached to, or None."""
        return self._model

    def verify(self) -> bool:
        """Re-hash the attached model's prefix weights; on a change, drop every entry. Returns True if kept."""
        if self._model is None:
            return True
        key = self._content_key(self._model)
        self._versions = self._version_state()
        if key != self.key:
            self.clear()
            self.key = key
            return False
        return True

    def _check_model(self) -> None:
        model = self._model
        info = getattr(model, _PATCH_ATTR, None)
        if info is None:
            self.detach(clear=True)
            raise ValueError("the model was unpatched while a prefix cache was attached; the cache is dropped")
        if info.plan is not self._plan or info is not self._info:
            self.detach(clear=True)  # a new plan: new horizon, new key, no entries
            self.attach(model)
            return
        if any(p.requires_grad for p in self._prefix_params):
            self._check_frozen(model, self._prefix)
        state = self._version_state()
        if state != self._versions:
            self.verify()

    # ------------------------------------------------------------- storage
    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def __contains__(self, key: bytes) -> bool:
        return key in self._mem or key in self._disk

    def _get(self, key: bytes) -> Optional[torch.Tensor]:
        t = self._mem.get(key)
        return t if t is not None else self._disk.get(key)

    def _put_many(self, items: Sequence[Tuple[bytes, torch.Tensor]]) -> None:
        for key, t in items:
            if key in self:
                continue
            self._mem[key] = t
            self._mem_bytes += t.numel() * t.element_size()
        if self.max_memory_bytes is not None and self._mem_bytes > self.max_memory_bytes:
            self._spill()

    def _spill(self) -> None:
        from safetensors.torch import save_file

        if self._own_dir is None and self.spill_dir is None:
            self._own_dir = tempfile.mkdtemp(prefix="headsparse-prefix-")
        folder = self.spill_dir or self._own_dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"prefix-{self.key}-{len(self._files):05d}.safetensors")
        tmp = path + ".tmp"
        save_file({k.hex(): t.detach().cpu().contiguous() for k, t in self._mem.items()}, tmp)
        os.replace(tmp, path)
        self._files.append(path)
        for name, t in _mmap_safetensors(path).items():
            self._disk[bytes.fromhex(name)] = t
        self._mem.clear()
        self._mem_bytes = 0

    def clear(self) -> None:
        """Drop every entry and remove the spill files this cache wrote."""
        self._mem.clear()
        self._disk.clear()
        self._mem_bytes = 0
        for f in self._files:
            try:
                os.unlink(f)
            except OSError:
                pass
        self._files = []
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def retain(self, examples: Iterable[Dict]) -> None:
        """Keep only the entries of ``examples`` (dicts with ``input_ids``, as the recipes batch them: right
        padding, default position ids), e.g. the selected part of a mined pool. Spilled bytes stay on disk until
        :meth:`clear`."""
        keep = {example_key(e["input_ids"], e.get("token_type_ids")) for e in examples}
        for store in (self._mem, self._disk):
            for k in [k for k in store if k not in keep]:
                t = store.pop(k)
                if store is self._mem:
                    self._mem_bytes -= t.numel() * t.element_size()

    def has_example(self, example: Dict) -> bool:
        return example_key(example["input_ids"], example.get("token_type_ids")) in self

    def stats(self) -> Dict:
        """Entries, tokens and bytes (in memory, on disk), forwards served / run / bypassed, fill seconds."""
        disk_bytes = sum(t.numel() * t.element_size() for t in self._disk.values())
        tokens = sum(t.shape[0] for t in self._mem.values()) + sum(t.shape[0] for t in self._disk.values())
        return {"entries": len(self), "tokens": tokens, "memory_bytes": self._mem_bytes, "disk_bytes": disk_bytes,
                "bytes": self._mem_bytes + disk_bytes, "hits": self.hits, "misses": self.misses,
                "bypassed": self.bypassed, "fill_s": self.fill_s, "horizon": getattr(self, "_h", None),
                "spill_files": len(self._files)}

    # ------------------------------------------------------------- hooks
    def _bypass_reason(self, bound: Dict) -> Optional[str]:
        cfg = self._model.config
        for name, v in bound.items():
            if name in _KEYED or name in _HARMLESS:
                continue
            if name in _MUST_BE_FALSE:
                if v:
                    return name
                continue
            if v is not None:
                return name
        for name in _MUST_BE_FALSE:
            if bound.get(name) is None and getattr(cfg, name, False):
                return f"config.{name}"
        if bound.get("input_ids") is None:
            return "no input_ids"
        extra = bound.get("kwargs") or {}
        for name, v in extra.items():
            if name in _MUST_BE_FALSE:
                if v:
                    return name
            elif v is not None and name not in _HARMLESS:
                return name
        return None

    def _rows(self, bound: Dict) -> List[Tuple[bytes, slice, Optional[torch.Tensor]]]:
        ids = bound["input_ids"]
        b, s = ids.shape
        mask = bound.get("attention_mask")
        pos = bound.get("position_ids")
        tt = bound.get("token_type_ids")
        ids_c = ids.detach().cpu()
        mask_c = None if mask is None else mask.detach().cpu()
        pos_c = None if pos is None else pos.detach().cpu().expand(b, s)
        tt_c = None if tt is None else tt.detach().cpu().expand(b, s)
        rows = []
        for r in range(b):
            if mask_c is None:
                where = torch.arange(s)
            else:
                where = torch.nonzero(mask_c[r] != 0).flatten()
            n = where.numel()
            contiguous = n == 0 or int(where[-1]) - int(where[0]) + 1 == n
            start = int(where[0]) if n else 0
            key = _row_key(ids_c[r, where], start, None if contiguous else where,
                           None if pos_c is None else pos_c[r, where], None if tt_c is None else tt_c[r, where])
            rows.append((key, slice(start, start + n) if contiguous else None, None if contiguous else where))
        return rows

    def _pre(self, module, args, kwargs):
        self._check_model()
        self._refuse_sharded_prefix()
        ctx = {"mode": "off", "training": []}
        self._ctx = ctx
        if module.training:  # determinism below the horizon: eval mode there, cached or not
            ctx["training"] = [(m, m.training) for m in self._submodules]
            for m in self._submodules:
                m.training = False
        try:
            bound = dict(self._sig.bind(module, *args, **kwargs).arguments)
        except TypeError:
            self.bypassed += 1
            return None
        bound.pop("self", None)
        if self._bypass_reason(bound) is not None:
            self.bypassed += 1
            return None
        ids = bound["input_ids"]
        if ids.dim() != 2:
            self.bypassed += 1
            return None
        rows = self._rows(bound)
        got = [self._get(k) for k, _, _ in rows]
        if all(g is not None for g in got):
            self.hits += 1
            ctx["mode"] = "replay"
            dev = ids.device
            hidden = got[0].shape[-1]
            out = torch.zeros(ids.shape[0], ids.shape[1], hidden, dtype=got[0].dtype, device=dev)
            for r, ((_, span, where), t) in enumerate(zip(rows, got)):
                t = t.to(dev, non_blocking=True)
                if span is not None:
                    out[r, span] = t
                else:
                    out[r, where.to(dev)] = t
            as_tuple = getattr(self, "_as_tuple", False)
            saved = []
            for i in range(self._h):
                saved.append(self._layers[i])
                self._layers[i] = _Skip(out if i == self._h - 1 else None, as_tuple and i == self._h - 1)
            ctx["saved"] = saved
        else:
            self.misses += 1
            ctx["mode"] = "fill"
            ctx["rows"] = [(k, span, where) for (k, span, where), g in zip(rows, got) if g is None]
            ctx["row_index"] = [r for r, g in enumerate(got) if g is None]
        return None

    def _refuse_sharded_prefix(self) -> None:
        """FSDP2 and ZeRO-3 gather each layer's weights with a collective in its forward: a rank that replays would
        skip the collectives its peers (filling, or with other examples) wait in, and the job would hang."""
        for i in range(self._h):
            for name, p in self._layers[i].named_parameters():
                if is_sharded(p) or is_zero3(p):
                    raise ValueError(
                        f"the prefix cache cannot serve a model whose layers below the gradient horizon are sharded "
                        f"(layer {i}: {name} is an FSDP2/ZeRO-3 parameter): replaying would skip the all-gathers "
                        "the other ranks wait in. Use DDP (each rank caches its own examples) or train without "
                        "the cache (tune(prefix_cache=False))")

    def _layer_output_kind(self, module, args, output):
        # older transformers layers return tuples (hidden_states, ...): the stand-in must return the same kind
        self._as_tuple = isinstance(output, tuple)
        return None

    def _fill(self, module, args, kwargs):
        ctx = self._ctx
        if ctx is None or ctx["mode"] != "fill":
            return None
        t0 = time.perf_counter()
        hs = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hs, tuple):
            hs = hs[0]
        dev = self.storage_device
        items = []
        for r, (key, span, where) in zip(ctx["row_index"], ctx["rows"]):
            t = hs[r, span] if span is not None else hs[r, where.to(hs.device)]
            t = t.detach()
            t = t.to(dev).clone() if dev is not None else t.clone()
            items.append((key, t))
        self._put_many(items)
        ctx["mode"] = "filled"
        self.fill_s += time.perf_counter() - t0
        return None

    def _post(self, module, args, output):
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return None
        for i, layer in enumerate(ctx.get("saved", ())):
            self._layers[i] = layer
        for m, flag in ctx["training"]:
            m.training = flag
        return None

    def __del__(self):  # best effort: remove a temporary spill folder
        try:
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)
        except Exception:
            pass


def prefix_cache_of(model) -> Optional[PrefixCache]:
    """The :class:`PrefixCache` attached to ``model``, or None."""
    return getattr(model, _CACHE_ATTR, None)


def drop_prefix_cache(model) -> None:
    """Detach and clear the cache attached to ``model`` (what ``unpatch`` does), if any."""
    cache = getattr(model, _CACHE_ATTR, None)
    if cache is not None:
        cache.detach(clear=True)
