"""Model access, data batching and the scoring loss, shared by the scoring methods.

Padding: every batch carries a (B, S) token mask (``attention_mask``); the loss
ignores padding positions and every per-token reduction of the methods is
masked with it, so padding never enters a score.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE, check_token_ids, per_sample_loss as next_token_loss
from ...patch.core import attention_dims
from ...patch.families import Family, find_family
from ..._checks import check_int

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@dataclass
class ModelInfo:
    family: Family
    base: nn.Module
    layers: Sequence[nn.Module]
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int

    @property
    def is_decoder(self) -> bool:
        return self.family.name in DECODER_FAMILIES

    def o_module(self, i: int) -> nn.Module:
        parent, name = self.family.slots(self.layers[i])["o"]
        return getattr(parent, name)

    def attn_modules(self, i: int) -> List[nn.Module]:
        """The modules holding the layer's Q/K/V/O weights (``qkv`` and ``o`` for fused families)."""
        return [getattr(p, n) for p, n in self.family.slots(self.layers[i]).values()]

    def qkvo(self, i: int) -> Dict[str, torch.Tensor]:
        """Weights of layer ``i`` in the (out, in) layout: q (Hq*D, d), k, v (Hkv*D, d), o (d, Hq*D). Detached."""
        fam = self.family
        slots = fam.slots(self.layers[i])

        def w(key):
            m = getattr(*slots[key])
            return m.weight.detach().t() if fam.conv1d else m.weight.detach()

        nq, nkv, d = self.num_q_heads, self.num_kv_heads, self.head_dim
        if fam.fused_qkv:
            full = w("qkv")
            q, k, v = full[: nq * d], full[nq * d: nq * d + nkv * d], full[nq * d + nkv * d:]
        else:
            q, k, v = w("q"), w("k"), w("v")
        return {"q": q, "k": k, "v": v, "o": w("o")}


def model_info(model) -> ModelInfo:
    if getattr(model, "_headsparse_patch", None) is not None:
        raise ValueError("model is patched by headsparse.patch; score the unpatched model (headsparse.unpatch(model))")
    family, base = find_family(model)
    nq, nkv, head_dim, hidden = attention_dims(family, model.config)
    layers = family.layers(base)
    return ModelInfo(family, base, layers, len(layers), nq, nkv, head_dim, hidden)


# ---------------------------------------------------------------------- data
def _as_batch(item, device, vocab_size: Optional[int] = None, index: int = 0) -> Dict[str, torch.Tensor]:
    if not isinstance(item, dict) or "input_ids" not in item:
        raise ValueError("data: every batch must be a dict with 'input_ids' (and usually 'attention_mask', 'labels')")
    out = {}
    for k, v in item.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        elif k in ("input_ids", "attention_mask", "labels", "token_type_ids"):
            out[k] = torch.as_tensor(v).to(device)
    ids = out["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"data: input_ids must be (batch, seq), got shape {tuple(ids.shape)}")
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(ids)
    if tuple(out["attention_mask"].shape) != tuple(ids.shape):
        raise ValueError("data: attention_mask must have the shape of input_ids")
    # an out-of-range id would fail deep in the embedding, naming no batch
    check_token_ids(ids, vocab_size, f"data: batch {index}")
    if "labels" in out:
        check_token_ids(out["labels"], vocab_size, f"data: batch {index}", "labels", ignore=-100)
    return out


def iter_batches(data, tokenizer=None, batch_size: int = 8, max_length: int = 256, device=None,
                 max_samples: Optional[int] = None, vocab_size: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Tokenized batches from ``data``: an iterable of batch dicts, or a list of texts with ``tokenizer``."""
    if isinstance(data, (str, bytes)):
        raise ValueError("data must be an iterable of batches or a list of texts, not a single string")
    check_int("batch_size", batch_size, 1)
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    seen = 0
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise ValueError("data is a list of texts: pass tokenizer=")
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token  # needed to pad a batch; labels mask padding anyway
        texts = list(data)[:max_samples] if max_samples else list(data)
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            yield _as_batch(dict(enc), device, vocab_size, i // batch_size)
        return
    for index, item in enumerate(data):
        b = _as_batch(item, device, vocab_size, index)
        if max_samples is not None:
            left = max_samples - seen
            if left <= 0:
                return
            if b["input_ids"].shape[0] > left:
                b = {k: (v[:left] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v) for k, v in b.items()}
        seen += b["input_ids"].shape[0]
        yield b


def model_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# ---------------------------------------------------------------------- loss
def scoring_loss(model, info: ModelInfo, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The default scoring loss, one value per sample: the mean token loss of that sample, padding excluded.

    * causal LMs (decoder families): next-token cross-entropy; targets are
      ``labels`` if given (-100 ignored) else ``input_ids`` at non-padding positions;
    * models with a (B, num_labels) output and ``labels`` (sequence classification):
      cross-entropy (mean-squared error when num_labels == 1);
    * bare encoders (BertModel, ...): a self-supervised proxy, predicting the
      next token from each position's last hidden state through the tied input
      embedding matrix (both positions non-padding) [reconstruction: the
      papers use task losses; a bare encoder has no head].
    """
    out = model(**model_inputs(batch))
    mask = batch["attention_mask"].bool()
    logits = getattr(out, "logits", None)
    if logits is not None and logits.dim() == 2:
        if "labels" not in batch:
            raise ValueError("a classification model needs 'labels' in every batch")
        y = batch["labels"]
        if logits.shape[-1] == 1:
            return (logits.squeeze(-1).float() - y.float()) ** 2
        return F.cross_entropy(logits.float(), y.long(), reduction="none")
    if logits is not None and info.is_decoder:
        tgt = batch.get("labels")
        tgt = (batch["input_ids"] if tgt is None else tgt).masked_fill(~mask, IGNORE)
    else:
        if logits is None:
            hidden = out.last_hidden_state
            emb = model.get_input_embeddings().weight
            logits = hidden @ emb.t()
        tgt = batch["input_ids"].masked_fill(~mask, IGNORE)
    # a target counts only if the position predicting it is a real token too (left padding)
    tgt = torch.cat([tgt[:, :1], tgt[:, 1:].masked_fill(~mask[:, :-1], IGNORE)], dim=1)
    return next_token_loss(logits, tgt)


LossFn = Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]


def compute_loss(model, info: ModelInfo, batch, loss_fn: Optional[LossFn]) -> torch.Tensor:
    per = loss_fn(model, batch) if loss_fn is not None else scoring_loss(model, info, batch)
    if not isinstance(per, torch.Tensor) or per.dim() != 1 or per.shape[0] != batch["input_ids"].shape[0]:
        raise ValueError("loss_fn must return a 1-d tensor with one loss per sample")
    return per


@contextlib.contextmanager
def activation_grads_only(model):
    """Freeze every parameter (no weight gradients) and make the input embeddings' output require grad,
    so a backward computes activation gradients only; restores everything afterwards."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(False)

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and not output.requires_grad and torch.is_grad_enabled():
            return output.detach().requires_grad_(True)
        return output

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for p, rg in before:
            p.requires_grad_(rg)


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
