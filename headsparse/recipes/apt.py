"""APT as published (Zhao, Hajishirzi, Cao; ICML 2024): adaptive pruning and tuning in one training loop.

What one call of :func:`finetune_apt` does, for BERT-family encoders (``*ForSequenceClassification``) and
Llama-family decoders (Llama, Mistral, Qwen2/3, SmolLM2; gated MLPs):

- **Adapters**: LoRA (rank 8, alpha 16) on APT's targets (encoders: query, value and the FFN input; decoders:
  q_proj and v_proj); everything else frozen except a classification head.
- **Blocks and salience**: attention heads (a head owns its Q, K, V rows and O columns; a GQA KV head is
  charged to its query heads in equal shares) and FFN neurons. Per channel of the O-projection input (heads)
  and of the FFN output-projection input (neurons), ``(sum_{b,t} |X|) * (sum_{b,t} |dL/dX|)``, summed per block,
  plus, with ``kurtosis=True``, ``sqrt(max(kurtosis, 0))`` of (mean activation x output-projection columns) per
  block (:func:`kurtosis_term`), smoothed by an EMA (0.85), from the ordinary training batches after every backward.
- **Selection**: all blocks sorted together by salience density (salience / parameters); the longest prefix that
  fits ``ratio(t) x prunable parameters`` is kept (binary search, :func:`headsparse.recipes.tuning.apt_blocks.density_keep`).
  ``ratio`` follows APT's cubic decay after a sparsity warm-up
  (:func:`headsparse.recipes.tuning.apt_blocks.apt_retained`). Masks move by ``mask_step`` per optimizer step toward
  kept/dropped, become exact 0/1 at the last pruning step, and the dropped blocks are then physically removed
  (rows and columns of every projection, adapters included).
- **Adaptive tuning**: the number of tuning parameters grows linearly over the pruning window to ``expand`` x
  the start; at every pruning step the top half of the adapters by smoothed importance
  (mean over rank rows of |sum_j A_ij dL/dA_ij|) grow by one common factor, capped at ``max_rank``
  (:func:`headsparse.recipes.tuning.adaptive_lora.grow_to_budget`); growth leaves the function unchanged.
- **Self-distillation**: the teacher is a snapshot of the model itself (soft masks folded in), refreshed whenever
  the dev metric improves during pruning; loss = mu * L_distill + (1 - mu) * L_task, mu rising linearly from 0 to 1
  over the pruning window, after which distillation ends and the task loss alone trains (as in APT's trainer);
  L_distill = T^2 KL(student/T || teacher/T) + 0.9 * sum of MSEs between the RMS-normalised hidden states of four
  sampled layers (one from each quarter of the stack) and the teacher's same layers through a learned linear map
  (identity at the start).
- **Accounting**: dev metric every ``eval_every`` steps against the training time spent so far (evaluation
  excluded), so :func:`time_to_fraction` gives APT's time to 97% of the final dev metric; peak training memory
  (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, meaningful when the run has a process to itself);
  parameters of the final model.

Deviations from APT's released code are listed, with reasons, in the docs (``docs/apt.md``). The main ones: no
hidden-dimension pruning, one layer mapping shared by the sampled pairs, same-index layer pairs instead of
dynamic matching, the optimizer state of grown or compacted tensors restarts.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_number
from .data import IGNORE, collate, model_device, pad_id_of, per_sample_loss
from ..patch.core import register_attention
from .tuning.adaptive_lora import GrowingLoRA, grow_to_budget
from .tuning.core import scheduled_lr
from .tuning.apt_blocks import apt_retained, density_keep, move_masks, sliced_linear, track_abs
from .tuning.apt_blocks import snapshot as apt_snapshot

ATTN_NAME = "headsparse_apt"


# ------------------------------------------------------------------ blocks of a model
@dataclass
class LayerBlocks:
    """Where one layer's prunable blocks live: (parent module, attribute) slots of its projections."""

    attn: nn.Module
    q: Tuple[nn.Module, str]
    k: Tuple[nn.Module, str]
    v: Tuple[nn.Module, str]
    o: Tuple[nn.Module, str]
    ffn_in: List[Tuple[nn.Module, str]]
    ffn_out: Tuple[nn.Module, str]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: str  # "bert" or "llama"


def _get(slot) -> nn.Module:
    return getattr(*slot)


def apt_blocks(model: nn.Module) -> List[LayerBlocks]:
    """The prunable blocks of every layer of a BERT-family encoder or a Llama-family decoder, or a clear error."""
    cfg = getattr(model, "config", None)
    base = getattr(model, "base_model", model)
    enc = getattr(base, "encoder", None)
    if enc is not None and hasattr(enc, "layer"):
        out = []
        for layer in enc.layer:
            sa = layer.attention.self
            out.append(LayerBlocks(sa, (sa, "query"), (sa, "key"), (sa, "value"),
                                   (layer.attention.output, "dense"), [(layer.intermediate, "dense")],
                                   (layer.output, "dense"), sa.num_attention_heads, sa.num_attention_heads,
                                   sa.attention_head_size, "bert"))
        return out
    layers = getattr(base, "layers", None)
    if layers is not None and cfg is not None and all(
            hasattr(l, "self_attn") and all(hasattr(l.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            for l in layers):
        h = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or h
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        return [LayerBlocks(l.self_attn, (l.self_attn, "q_proj"), (l.self_attn, "k_proj"), (l.self_attn, "v_proj"),
                            (l.self_attn, "o_proj"), [(l.mlp, "gate_proj"), (l.mlp, "up_proj")],
                            (l.mlp, "down_proj"), h, kv, d, "llama") for l in layers]
    raise ValueError(f"finetune_apt supports BERT-family encoders and Llama-family decoders with gated MLPs; "
                     f"cannot find attention heads and FFN blocks in {type(model).__name__}")


def _weight(m: nn.Module) -> torch.Tensor:
    """The effective (out, in) weight of a Linear or a GrowingLoRA (adapter merged)."""
    if isinstance(m, GrowingLoRA):
        return m.base.weight + m.scaling * (m.lora_B @ m.lora_A)
    return m.weight


def _in_out(m: nn.Module) -> Tuple[int, int]:
    w = m.base.weight if isinstance(m, GrowingLoRA) else m.weight
    return w.shape[1], w.shape[0]


def _has_bias(m: nn.Module) -> bool:
    lin = m.base if isinstance(m, GrowingLoRA) else m
    return lin.bias is not None


def _costs(blocks: List[LayerBlocks]) -> Tuple[List[float], List[float]]:
    """Parameters per head and per FFN neuron of each layer (APT's block costs)."""
    head, neuron = [], []
    for b in blocks:
        hidden = _in_out(_get(b.q))[0]
        group = b.num_heads // b.num_kv_heads
        qo = 2 * b.head_dim * hidden + b.head_dim * _has_bias(_get(b.q))
        kv = (2 * b.head_dim * hidden + b.head_dim * (_has_bias(_get(b.k)) + _has_bias(_get(b.v)))) / group
        head.append(float(qo + kv))
        neuron.append(float(sum(hidden + _has_bias(_get(s)) for s in b.ffn_in) + _in_out(_get(b.ffn_out))[1]))
    return head, neuron


def kurtosis_term(mean_x: torch.Tensor, weight: torch.Tensor, group: int) -> torch.Tensor:
    """APT's outlier term per block: sqrt(max(kurtosis, 0)) of ``weight * mean_x`` (the output projection's columns
    scaled by the mean input activation), blocks being runs of ``group`` input channels; Fisher kurtosis without
    bias correction (m4 / m2^2 - 3)."""
    vals = (weight.detach().double() * mean_x.double()[None, :])  # (out, in)
    n = vals.shape[1] // group
    v = vals.view(vals.shape[0], n, group).transpose(0, 1).reshape(n, -1)
    c = v - v.mean(1, keepdim=True)
    m2, m4 = (c ** 2).mean(1), (c ** 4).mean(1)
    kurt = torch.where(m2 > 0, m4 / m2.clamp_min(1e-300) ** 2 - 3.0, torch.zeros_like(m2))
    return kurt.clamp_min(0).sqrt()


class _Masks:
    """Soft masks and salience of every head and FFN neuron, through forward pre-hooks on the O projection and the
    FFN output projection: the input (the heads' outputs / the neuron activations) is multiplied by the mask, and
    sum|X|, sum|dL/dX| and sum X per channel are accumulated over the steps (before the mask, as APT reads them)."""

    def __init__(self, blocks: List[LayerBlocks], dtype, device) -> None:
        self.blocks = blocks
        self.head = [torch.ones(b.num_heads, dtype=dtype, device=device) for b in blocks]
        self.ffn = [torch.ones(_in_out(_get(b.ffn_out))[0], dtype=dtype, device=device) for b in blocks]
        self.head_target = [torch.ones_like(m) for m in self.head]
        self.ffn_target = [torch.ones_like(m) for m in self.ffn]
        self.abs_x: Dict = {}
        self.abs_g: Dict = {}
        self.sum_x: Dict = {}
        self.count: Dict = {}
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles.append(_get(b.o).register_forward_pre_hook(self._hook(("h", i), self.head, i, b.head_dim)))
            self.handles.append(_get(b.ffn_out).register_forward_pre_hook(self._hook(("f", i), self.ffn, i, 1)))

    def _hook(self, key, masks, i, rep):
        def pre(mod, args):
            x = args[0]
            if track_abs(x, key, self.abs_x, self.abs_g, torch.float64):
                dims = tuple(range(x.dim() - 1))
                self.sum_x[key] = self.sum_x.get(key, 0) + x.detach().double().sum(dims)
                self.count[key] = self.count.get(key, 0) + x[..., 0].numel()
            m = masks[i]
            if bool((m == 1).all()):
                return None
            return (x * (m.repeat_interleave(rep) if rep > 1 else m).to(x.dtype),) + tuple(args[1:])
        pre._hs_apt = True
        return pre

    def take(self, kurtosis: bool) -> Tuple[List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]:
        """Salience per head and per neuron of every layer since the last call (None where no gradient ran)."""
        heads, neurons = [], []
        for i, b in enumerate(self.blocks):
            for kind, out, group, proj in (("h", heads, b.head_dim, b.o), ("f", neurons, 1, b.ffn_out)):
                key = (kind, i)
                if key not in self.abs_g:
                    out.append(None)
                    continue
                s = (self.abs_x[key] * self.abs_g[key]).view(-1, group).sum(1)
                if kurtosis:
                    s = s + kurtosis_term(self.sum_x[key] / self.count[key], _weight(_get(proj)), group)
                out.append(s)
        for d in (self.abs_x, self.abs_g, self.sum_x, self.count):
            d.clear()
        return heads, neurons

    def move(self, step: float) -> None:
        move_masks(self.head + self.ffn, self.head_target + self.ffn_target, step)

    def finalize(self) -> None:
        for m, t in zip(self.head + self.ffn, self.head_target + self.ffn_target):
            m.copy_(t)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------ physical compaction
def _select(slot, idx: torch.Tensor, dim: str) -> None:
    """Keep output rows (``dim="out"``) or input columns (``"in"``) ``idx`` of a Linear or GrowingLoRA in place."""
    m = _get(slot)
    new = sliced_linear(m.base if isinstance(m, GrowingLoRA) else m, idx, dim)
    idx = idx.to(new.weight.device)
    if isinstance(m, GrowingLoRA):
        m.base = new
        if dim == "out":
            m.lora_B = nn.Parameter(m.lora_B.detach()[idx].clone())
            m.out_features = idx.numel()
        else:
            m.lora_A = nn.Parameter(m.lora_A.detach()[:, idx].clone())
            m.in_features = idx.numel()
    else:
        setattr(*slot, new)


def _compact(blocks: List[LayerBlocks], head_keep: List[torch.Tensor], ffn_keep: List[torch.Tensor]) -> None:
    """Remove the dropped heads and neurons from every projection; decoder layers whose query heads no longer
    form equal GQA groups read their KV heads through an index (``_apt_kv_index``)."""
    for b, hk, fk in zip(blocks, head_keep, ffn_keep):
        heads = torch.nonzero(hk.bool().cpu()).flatten()
        d = b.head_dim
        rows = (heads[:, None] * d + torch.arange(d)[None, :]).flatten()
        group = b.num_heads // b.num_kv_heads
        kv = sorted({int(h) // group for h in heads})
        kv_rows = (torch.tensor(kv)[:, None] * d + torch.arange(d)[None, :]).flatten()
        _select(b.q, rows, "out")
        _select(b.k, kv_rows, "out")
        _select(b.v, kv_rows, "out")
        _select(b.o, rows, "in")
        if b.family == "bert":
            b.attn.num_attention_heads = heads.numel()
            b.attn.all_head_size = heads.numel() * d
        else:
            dev = _get(b.q).weight.device if not isinstance(_get(b.q), GrowingLoRA) else _get(b.q).lora_A.device
            b.attn._apt_kv_index = torch.tensor([kv.index(int(h) // group) for h in heads], device=dev)
            b.attn.num_key_value_groups = 1  # the attention function expands K/V through the index itself
        b.num_heads, b.num_kv_heads = heads.numel(), len(kv)
        neurons = torch.nonzero(fk.bool().cpu()).flatten()
        for s in b.ffn_in:
            _select(s, neurons, "out")
        _select(b.ffn_out, neurons, "in")
        parent = b.ffn_out[0]
        if hasattr(parent, "intermediate_size"):
            parent.intermediate_size = neurons.numel()


def _indexed_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function for compacted decoder layers: each remaining query head reads its own KV
    head through ``module._apt_kv_index`` (ragged GQA groups), then PyTorch's SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    idx = getattr(module, "_apt_kv_index", None)
    if idx is not None:
        key, value = key.index_select(1, idx), value.index_select(1, idx)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention(model) -> None:
    register_attention(ATTN_NAME, _indexed_kv_attention)
    model.set_attn_implementation(ATTN_NAME)


def merge_adapters(model: nn.Module) -> int:
    """Replace every :class:`GrowingLoRA` by a plain Linear holding base + scaling * B A (the deployable model).
    Returns the number of adapters merged."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, GrowingLoRA):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            lin = m.base
            with torch.no_grad():
                lin.weight.copy_(_weight(m))
            lin.weight.requires_grad_(False)
            setattr(parent, name.rsplit(".", 1)[-1], lin)
            n += 1
    return n


# ------------------------------------------------------------------ results
@dataclass
class APTResult:
    """Outcome of :func:`finetune_apt`.

    ``dev_curve``: (step, training seconds so far, dev metric) at every evaluation; ``history``: one entry per
    pruning step (retained ratio, kept heads/neurons, tuning parameters, mu, dev, teacher refresh);
    ``params_before`` / ``params_after``: parameters of the model before training and of the final (merged,
    compacted) model; ``tuning_params``: adapter parameters at the end (all trained parameters with
    ``adapters=False``); ``peak_memory_bytes``: CUDA peak allocation, or the process's peak RSS on CPU.
    """

    model: nn.Module
    steps: int
    losses: List[float]
    train_s: float
    eval_s: float
    dev_curve: List[Tuple[int, float, float]]
    history: List[Dict]
    mu: List[float]
    params_before: int
    params_after: int
    tuning_params: int
    trained_params: int
    peak_memory_bytes: int
    heads_kept: List[int]
    neurons_kept: List[int]
    info: Dict = field(default_factory=dict)


def time_to_fraction(curve: Sequence[Tuple[int, float, float]], fraction: float = 0.97) -> float:
    """APT's time to accuracy: the training seconds at the first evaluation whose dev metric reaches ``fraction``
    of the final one (the last point of ``curve``)."""
    if not curve:
        raise ValueError("empty dev curve")
    final = curve[-1][2]
    for _, t, v in curve:
        if v >= fraction * final:
            return t
    return curve[-1][1]  # pragma: no cover - the last point always qualifies


# ------------------------------------------------------------------ the loop
def _cls_batch(exs: List[Dict], pad: int, dev) -> Dict[str, torch.Tensor]:
    n = max(len(e["input_ids"]) for e in exs)
    ids = torch.full((len(exs), n), pad, dtype=torch.long)
    att = torch.zeros((len(exs), n), dtype=torch.long)
    for r, e in enumerate(exs):
        ids[r, :len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        att[r, :len(e["input_ids"])] = 1
    return {"input_ids": ids.to(dev), "attention_mask": att.to(dev),
            "label": torch.tensor([int(e["label"]) for e in exs], device=dev)}


def _check_examples(data) -> Tuple[List[Dict], bool]:
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError("data must be a non-empty list of examples (dicts with 'input_ids' and 'label' or "
                         "'labels')")
    cls = all(isinstance(e, dict) and "label" in e for e in data)
    lm = all(isinstance(e, dict) and "input_ids" in e and "label" not in e for e in data)
    if not (cls or lm) or not all(len(e["input_ids"]) > 0 for e in data):
        raise ValueError("every example needs non-empty 'input_ids', and either all have an int 'label' "
                         "(sequence classification) or none (language modelling on 'labels' / 'input_ids')")
    return list(data), cls


def _rms_normed(h: torch.Tensor) -> torch.Tensor:
    """Hidden states divided by their root mean square over the hidden dimension (APT de-variances both sides before
    the layer MSE, so pre-norm residual streams with large norms do not swamp the loss)."""
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def _peak_memory(dev) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def finetune_apt(model: nn.Module, data, *, keep: float = 0.4, adapters: bool = True, grow: bool = True,
                 distill: bool = True, kurtosis: bool = False, epochs: int = 10, batch_size: int = 32,
                 lr: float = 2e-4, weight_decay: float = 0.1, warmup_ratio: float = 0.06, rank: int = 8,
                 alpha: float = 16.0, targets: Optional[Sequence[str]] = None, n_prunings: int = 10,
                 prune_start: float = 0.05, sparsity_warmup: float = 0.1, prune_end: float = 0.3,
                 beta: float = 0.85, mask_step: float = 0.01, expand: float = 4.0, max_rank: int = 64,
                 temperature: float = 2.0, hidden_weight: float = 0.9,
                 dev_fn: Optional[Callable[[nn.Module], float]] = None, eval_every: Optional[int] = None,
                 train_modules: Sequence[str] = ("classifier", "score"), pad_id: Optional[int] = None,
                 seed: int = 0, max_grad_norm: Optional[float] = 1.0, progress: bool = True,
                 merge: bool = True) -> APTResult:
    """Train ``model`` with APT (module docstring) and return an :class:`APTResult`; the model is changed in place
    (adapters merged and pruned blocks removed at the end when ``merge``).

    Args:
        data: examples, all with ``input_ids`` and an int ``label`` (sequence classification, e.g. a
            ``BertForSequenceClassification``), or all without (causal LM loss on ``labels``, default the
            ``input_ids``).
        keep: share of the prunable parameters (all heads and FFN neurons) kept at the end; 1 = no pruning.
        adapters: LoRA adapters on ``targets`` (block roles "q", "v", "ffn_in"; default APT's: encoders q, v,
            ffn_in; decoders q, v); False trains every parameter (full fine-tuning).
        grow: adaptive tuning (rank growth to ``expand`` x the starting tuning parameters over the pruning window).
        distill: self-distillation; False trains on the task loss only (mu stays 0).
        kurtosis: add APT's outlier term to the salience (off by default: sqrt(kurtosis) does not grow with the
            tokens in a batch while the salience does, so on small batches it outweighs the salience; see the docs).
        prune_start, sparsity_warmup, prune_end: fractions of the total steps: pruning steps are evenly spaced in
            (prune_start, prune_end]; the retained ratio stays 1 until ``prune_start + sparsity_warmup`` and then
            decays cubically to ``keep`` at ``prune_end``.
        dev_fn: ``dev_fn(model) -> float`` (higher is better), evaluated every ``eval_every`` steps (default:
            about 20 times per run), at every pruning step and at the end; drives the teacher refresh and the
            dev curve.
        train_modules: modules (by name component) trained in full beside the adapters (a classification head).
    """
    check_number("keep", keep, 0, 1, lo_open=True)
    for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("rank", rank, 1),
                        ("n_prunings", n_prunings, 1), ("max_rank", max_rank, 1)):
        check_int(name, v, lo)
    check_number("lr", lr, 0, None, lo_open=True)
    check_number("mask_step", mask_step, 0, 1, lo_open=True)
    check_number("beta", beta, 0, 1)
    check_number("expand", expand, 1, None)
    if not 0 <= prune_start < prune_start + sparsity_warmup < prune_end <= 1:
        raise ValueError("need 0 <= prune_start < prune_start + sparsity_warmup < prune_end <= 1, got "
                         f"{prune_start!r}, {sparsity_warmup!r}, {prune_end!r}")
    if not adapters and grow:
        grow = False  # nothing to grow without adapters
    if grow and max_rank < rank:
        raise ValueError(f"max_rank ({max_rank}) must be at least rank ({rank}) when the adapters grow")
    examples, is_cls = _check_examples(data)
    blocks = apt_blocks(model)
    if any(isinstance(m, GrowingLoRA) for m in model.modules()):
        raise ValueError("model already holds adapters; pass a model without them")
    dev = model_device(model)
    pad = pad_id_of(model, pad_id)
    params_before = sum(p.numel() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(seed)

    # adapters (or everything) trainable
    roles = tuple(targets) if targets is not None else (
        ("q", "v", "ffn_in") if blocks[0].family == "bert" else ("q", "v"))
    bad = [r for r in roles if r not in ("q", "k", "v", "o", "ffn_in", "ffn_out")]
    if bad:
        raise ValueError(f"targets must be block roles among q, k, v, o, ffn_in, ffn_out; got {bad}")
    lora: List[GrowingLoRA] = []
    if adapters:
        for p in model.parameters():
            p.requires_grad_(False)
        for b in blocks:
            for r in roles:
                for slot in (b.ffn_in if r == "ffn_in" else [getattr(b, r)]):
                    ad = GrowingLoRA(_get(slot), rank=rank, alpha=alpha)
                    setattr(*slot, ad)
                    lora.append(ad)
        for name, m in model.named_modules():
            if name and name.split(".")[-1] in train_modules:
                for p in m.parameters():
                    p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    init_tuning = sum(a.tuning_params() for a in lora)

    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * epochs
    prune = keep < 1.0
    t_start = int(prune_start * total)
    t_warm = int((prune_start + sparsity_warmup) * total)
    t_end = max(int(prune_end * total), t_warm + 1)
    prune_at = sorted({t_start + max(1, round((k + 1) * (t_end - t_start) / n_prunings)) for k in range(n_prunings)})
    if eval_every is None:
        eval_every = max(1, total // 20)
    p0 = next(model.parameters())
    masks = _Masks(blocks, p0.dtype, p0.device) if prune else None
    head_cost, neuron_cost = _costs(blocks)
    n_neurons = [_in_out(_get(b.ffn_out))[0] for b in blocks]
    costs = torch.cat([torch.full((b.num_heads,), head_cost[i], dtype=torch.float64) for i, b in enumerate(blocks)]
                      + [torch.full((n,), neuron_cost[i], dtype=torch.float64) for i, n in enumerate(n_neurons)])
    prunable = float(costs.sum())
    head_ema: List[Optional[torch.Tensor]] = [None] * len(blocks)
    ffn_ema: List[Optional[torch.Tensor]] = [None] * len(blocks)
    lora_ema: List[torch.Tensor] = [torch.zeros((), dtype=torch.float64)] * len(lora)
    hidden_size = _in_out(_get(blocks[0].q))[0]
    layer_map = nn.Linear(hidden_size, hidden_size, bias=False, device=p0.device, dtype=p0.dtype) if distill else None
    if layer_map is not None:
        with torch.no_grad():
            layer_map.weight.copy_(torch.eye(hidden_size, dtype=p0.dtype))
    teacher = None
    best_dev = -math.inf

    def trainable():
        return [p for p in model.parameters() if p.requires_grad] + (
            list(layer_map.parameters()) if layer_map is not None else [])

    def new_opt(old=None):
        opt = torch.optim.AdamW(trainable(), lr=lr, weight_decay=weight_decay)
        if old is not None:
            for p in trainable():
                if p in old.state:
                    opt.state[p] = old.state[p]
        return opt


    def fold_masks(t):  # the soft masks into the copy's output projections
        merge_adapters(t)  # adapters on an output projection would bypass the fold: merge them first
        for b, hm, fm in zip(apt_blocks(t), masks.head, masks.ffn):
            o, f = _get(b.o), _get(b.ffn_out)
            o.weight.mul_(hm.repeat_interleave(b.head_dim).to(o.weight.dtype))
            f.weight.mul_(fm.to(f.weight.dtype))

    def snapshot():
        return apt_snapshot(model, fold=fold_masks if masks is not None else None)

    def evaluate_dev():
        model.eval()
        with torch.no_grad():
            score = float(dev_fn(model))
        model.train()
        return score

    opt = new_opt()
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="finetune (apt)", unit="step", disable=not progress, leave=False)
    gen = torch.Generator().manual_seed(seed)
    pair_gen = torch.Generator().manual_seed(seed + 1)
    losses: List[float] = []
    mus: List[float] = []
    history: List[Dict] = []
    curve: List[Tuple[int, float, float]] = []
    train_s = eval_s = 0.0
    step = 0
    n_layers = len(blocks)
    if dev_fn is not None:
        e0 = time.perf_counter()
        best_dev = evaluate_dev()
        eval_s += time.perf_counter() - e0
        curve.append((0, 0.0, best_dev))
    if distill:
        teacher = snapshot()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for s0 in range(0, len(order), batch_size):
            t0 = time.perf_counter()
            exs = [examples[i] for i in order[s0:s0 + batch_size]]
            b = _cls_batch(exs, pad, dev) if is_cls else collate(exs, pad, dev)
            for g in opt.param_groups:
                g["lr"] = scheduled_lr(lr, step, total, int(warmup_ratio * total))
            mu = 0.0  # APT distils only while it prunes; afterwards the task loss alone trains the pruned model
            if distill and t_start <= step < t_end:
                mu = (step - t_start) / (t_end - t_start)
            mus.append(mu)
            want_hidden = distill and mu > 0 and hidden_weight > 0
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        output_hidden_states=want_hidden)
            if is_cls:
                task = F.cross_entropy(out.logits.float(), b["label"])
            else:
                task = per_sample_loss(out.logits, b["labels"]).mean()
            loss = task
            if teacher is not None and mu > 0:
                with torch.no_grad():
                    tout = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   output_hidden_states=want_hidden)
                if is_cls:
                    s_log, t_prob = (F.log_softmax(out.logits.float() / temperature, -1),
                                     F.softmax(tout.logits.float() / temperature, -1))
                else:
                    valid = b["labels"][:, 1:] != IGNORE
                    s_log = F.log_softmax(out.logits[:, :-1].float() / temperature, -1)[valid]
                    t_prob = F.softmax(tout.logits[:, :-1].float() / temperature, -1)[valid]
                kd = F.kl_div(s_log, t_prob, reduction="batchmean") * temperature ** 2
                if want_hidden:
                    tok = b["attention_mask"].bool()
                    quarters = torch.linspace(1, n_layers + 1, 5).long().tolist()
                    for a, z in zip(quarters[:-1], quarters[1:]):
                        if z <= a:
                            continue
                        li = int(torch.randint(a, z, (1,), generator=pair_gen))
                        kd = kd + hidden_weight * F.mse_loss(_rms_normed(layer_map(out.hidden_states[li])[tok]),
                                                             _rms_normed(tout.hidden_states[li][tok]))
                loss = mu * kd + (1 - mu) * task
            loss.backward()
            if lora:
                for j, a in enumerate(lora):
                    imp = a.importance().mean()  # a tensor: no device sync per adapter and step
                    lora_ema[j] = imp if step == 0 else beta * lora_ema[j] + (1 - beta) * imp
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable(), max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(task.detach()))
            if masks is not None:
                hsal, fsal = masks.take(kurtosis)
                for i in range(n_layers):
                    for ema, s in ((head_ema, hsal[i]), (ffn_ema, fsal[i])):
                        if s is not None:
                            ema[i] = s if ema[i] is None else beta * ema[i] + (1 - beta) * s
                masks.move(mask_step)
            rec = None
            if step in prune_at:
                rec = {"step": step, "mu": mu}
                if masks is not None:
                    ratio = apt_retained(step, 1.0, keep, t_warm, t_end)
                    known = all(e is not None for e in head_ema + ffn_ema)
                    if known:
                        sal = torch.cat([torch.cat(head_ema), torch.cat(ffn_ema)]).double().cpu()
                        # every layer keeps at least its most salient head and neuron: reserved inside the budget,
                        # the rest filled by density (the same selection whenever the reserved ones fit anyway)
                        must = torch.zeros(sal.numel(), dtype=torch.bool)
                        off = 0
                        for e in head_ema + ffn_ema:
                            must[off + int(torch.argmax(e))] = True
                            off += e.numel()
                        kept = must.clone()
                        kept[~must] = density_keep(sal[~must], costs[~must],
                                                   ratio * prunable - float(costs[must].sum()))
                        nh = [b.num_heads for b in blocks]
                        hk = list(torch.split(kept[:sum(nh)], nh))
                        fk = list(torch.split(kept[sum(nh):], [m.numel() for m in masks.ffn]))
                        masks.head_target = [k.to(masks.head[0]) for k in hk]
                        masks.ffn_target = [k.to(masks.ffn[0]) for k in fk]
                    targets_now = torch.cat(masks.head_target + masks.ffn_target).cpu().double()
                    rec.update(retained_target=ratio, salience_known=known,
                               retained_params=float((targets_now * costs).sum()) / prunable)
                if grow and lora:
                    frac = (step - t_start) / max(1, t_end - t_start)
                    target = int(init_tuning * (1 + (expand - 1) * min(1.0, frac)))
                    before = [a.rank for a in lora]
                    grow_to_budget(lora, lora_ema, target, max_rank=max_rank)
                    if [a.rank for a in lora] != before:
                        opt = new_opt(opt)
                    rec["tuning_params"] = sum(a.tuning_params() for a in lora)
                if masks is not None and step == prune_at[-1]:
                    masks.finalize()
                    rec["masks_exact"] = all(bool(((m == 0) | (m == 1)).all()) for m in masks.head + masks.ffn)
                    hk = [m.clone() for m in masks.head]
                    fk = [m.clone() for m in masks.ffn]
                    masks.close()
                    _compact(blocks, hk, fk)
                    if blocks[0].family == "llama":
                        _register_attention(model)
                    masks = None
                    opt = new_opt(opt)
                    rec["params_after_compaction"] = sum(p.numel() for p in model.parameters())
                    rec["heads_kept"] = [int(k.sum()) for k in hk]
                    rec["neurons_kept"] = [int(k.sum()) for k in fk]
                history.append(rec)
            train_s += time.perf_counter() - t0
            due = dev_fn is not None and (step % eval_every == 0 or step == total or rec is not None)
            if due:
                e0 = time.perf_counter()
                score = evaluate_dev()
                eval_s += time.perf_counter() - e0
                curve.append((step, train_s, score))
                if rec is not None:
                    refreshed = score > best_dev and step < t_end and distill
                    if score > best_dev:
                        best_dev = score
                    if refreshed:  # the teacher copy is part of training's cost
                        r0 = time.perf_counter()
                        teacher = snapshot()
                        dt = time.perf_counter() - r0
                        train_s += dt
                    rec.update(dev=score, teacher_refreshed=refreshed)
                elif score > best_dev:
                    best_dev = score
            if teacher is not None and step >= t_end:
                teacher = None  # distillation is over: free the copy
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", mu=f"{mu:.2f}")
    bar.close()
    if masks is not None:
        masks.close()
    model.eval()
    tuning = sum(a.tuning_params() for a in lora) if lora else sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = _peak_memory(dev)
    if merge and lora:
        merge_adapters(model)
    heads_kept = [b.num_heads for b in blocks]
    neurons_kept = [_in_out(_get(b.ffn_out))[0] for b in blocks]
    return APTResult(model, step, losses, train_s, eval_s, curve, history, mus, params_before,
                     sum(p.numel() for p in model.parameters()), tuning, trained, peak, heads_kept, neurons_kept,
                     {"ranks": [a.rank for a in lora], "prune_at": prune_at, "t_warm": t_warm, "t_end": t_end,
                      "total_steps": total, "roles": list(roles) if adapters else []})


finetune_apt_published = finetune_apt  # the name that says how it differs from tuning.tune_apt_heads (heads only)
