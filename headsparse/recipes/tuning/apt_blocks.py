"""APT's block machinery beyond heads: FFN-neuron salience, selection by salience density under a parameter
budget, the published retained-ratio schedule, soft masks, and physical removal of pruned neurons.

APT (Zhao et al., ICML 2024) scores every prunable block (attention heads, FFN neurons, hidden dimensions) by
salience, (sum over batch and tokens of |X|) x (sum of |dL/dX|) per input channel of the block's output
projection, summed over the block's channels; divides it by the block's parameter count (salience density);
sorts all blocks together and keeps the longest prefix that fits the parameter budget. Kept and dropped blocks
are masked softly (each mask moves by a fixed step per update toward 1 or 0) until the last pruning step, where
the masks become exact and the pruned weights are removed.

Here: FFN neurons of gated MLPs (``mlp.gate_proj`` / ``up_proj`` / ``down_proj``: Llama, Mistral, Qwen2/3),
jointly with attention heads in :func:`headsparse.recipes.tuning.tune_apt` (``ffn=True``). Hidden-dimension pruning is
not implemented.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional

import torch
from torch import nn


def apt_retained(step: int, r_start: float, r_final: float, t_warm: int, t_end: int) -> float:
    """APT's retained ratio: ``r_start`` until the sparsity warm-up ends at ``t_warm``, then the cubic decay
    min(r_start, r_final + (r_start - r_final) * ((t_end - step) / (t_end - t_warm))^3), and ``r_final`` from
    ``t_end`` on."""
    if not t_warm < t_end:
        raise ValueError(f"need t_warm < t_end, got {t_warm}, {t_end}")
    if step <= t_warm:
        return r_start
    if step >= t_end:
        return r_final
    return min(r_start, r_final + (r_start - r_final) * ((t_end - step) / (t_end - t_warm)) ** 3)


def density_keep(salience: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Bool mask of the blocks to keep: all blocks sorted by salience density (salience / cost, highest first),
    the longest prefix whose total cost is at most ``budget`` (found by binary search on the cumulative cost)."""
    salience, cost = salience.double().flatten(), cost.double().flatten()
    if salience.shape != cost.shape:
        raise ValueError(f"salience and cost must have the same number of blocks, got {salience.numel()} and "
                         f"{cost.numel()}")
    if (cost <= 0).any() or torch.isnan(salience).any():
        raise ValueError("every block needs a positive cost and a known (not NaN) salience")
    order = torch.argsort(salience / cost, descending=True, stable=True)
    cum = torch.cumsum(cost[order], 0)
    n_keep = int(torch.searchsorted(cum, torch.tensor([float(budget)], dtype=cum.dtype), right=True))
    keep = torch.zeros(salience.numel(), dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def track_abs(x: torch.Tensor, key, abs_x: Dict, abs_g: Dict, dtype: torch.dtype) -> bool:
    """APT's salience parts for one input of a projection: adds sum|X| now and, once the backward reaches X,
    sum|dL/dX| (over every dimension but the channels) under ``key``. False (nothing tracked) without a gradient."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return False
    dims = tuple(range(x.dim() - 1))
    sx = x.detach().abs().to(dtype).sum(dim=dims)

    def bwd(g):
        abs_x[key] = abs_x.get(key, 0) + sx
        abs_g[key] = abs_g.get(key, 0) + g.detach().abs().to(dtype).sum(dim=dims)

    x.register_hook(bwd)
    return True


def snapshot(model, neurons: Optional["FFNNeurons"] = None,
             fold: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """A frozen copy of ``model`` for self-distillation, without the APT hooks (masks, salience) of the original;
    the current FFN soft masks of ``neurons`` are folded into the copy's down_proj columns, so the copy computes
    what the masked model computes. ``fold(copy)``, if given, folds other masks into the copy (under no_grad)."""
    teacher = copy.deepcopy(model).eval()
    for m in teacher.modules():
        for k in [k for k, h in m._forward_pre_hooks.items() if getattr(h, "_hs_apt", False)]:
            del m._forward_pre_hooks[k]
    if neurons is not None and neurons.handles:
        with torch.no_grad():
            for mlp, mask in zip(gated_mlps(teacher), neurons.masks):
                mlp.down_proj.weight.mul_(mask.to(mlp.down_proj.weight.dtype))
    if fold is not None:
        with torch.no_grad():
            fold(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def gated_mlps(model) -> List[nn.Module]:
    """The gated MLP of every decoder layer (gate_proj, up_proj, down_proj), or a clear error."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    mlps = [getattr(layer, "mlp", None) for layer in (layers or [])]
    if not mlps or not all(m is not None and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
                           for m in mlps):
        raise ValueError("FFN-neuron pruning needs gated MLPs (mlp.gate_proj/up_proj/down_proj: Llama, Mistral, "
                         f"Qwen2/3); {type(model).__name__} has none")
    return mlps


def neuron_cost(mlp: nn.Module) -> int:
    """Parameters one FFN neuron owns: a row of gate_proj and up_proj (with biases) and a column of down_proj."""
    hidden = mlp.down_proj.weight.shape[0]
    biases = sum(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj"))
    return 3 * hidden + biases


def move_masks(masks: List[torch.Tensor], targets: List[torch.Tensor], step: float) -> None:
    """APT's soft masks: every mask moves in place by ``step`` toward its target (1 kept, 0 dropped), within [0, 1]."""
    for m, t in zip(masks, targets):
        m.copy_(torch.where(t > m, torch.clamp(m + step, max=1.0), torch.clamp(m - step, min=0.0)))


class FFNNeurons:
    """Soft masks and salience of every FFN neuron, through a forward pre-hook on each ``down_proj``: its input
    (the neuron activations) is multiplied by the layer's mask, and (sum |X|)(sum |dL/dX|) per neuron is
    accumulated over the batches, X being the unmasked activations (APT reads the salience before the mask)."""

    def __init__(self, model) -> None:
        self.mlps = gated_mlps(model)
        p = next(model.parameters())
        self.masks = [torch.ones(m.down_proj.weight.shape[1], dtype=p.dtype, device=p.device) for m in self.mlps]
        self.targets = [torch.ones_like(m) for m in self.masks]
        self.abs_x: Dict[int, torch.Tensor] = {}
        self.abs_g: Dict[int, torch.Tensor] = {}
        self.handles = [m.down_proj.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.mlps)]

    def _hook(self, i: int):
        def pre(mod, args):
            x = args[0]
            track_abs(x, i, self.abs_x, self.abs_g, torch.float64)
            mask = self.masks[i]
            if bool((mask == 1).all()):
                return None
            return (x * mask,) + tuple(args[1:])
        pre._hs_apt = True
        return pre

    def take(self) -> List[Optional[torch.Tensor]]:
        """Per layer, the salience of each neuron accumulated since the last call (None where no gradient ran)."""
        out = [(self.abs_x[i] * self.abs_g[i]) if i in self.abs_x else None for i in range(len(self.mlps))]
        self.abs_x.clear()
        self.abs_g.clear()
        return out

    def set_targets(self, keep: List[torch.Tensor]) -> None:
        self.targets = [k.to(self.masks[i].dtype).to(self.masks[i].device) for i, k in enumerate(keep)]

    def move(self, step: float = 0.01) -> None:
        """Every mask one step (``step``) toward its target (1 kept, 0 dropped)."""
        move_masks(self.masks, self.targets, step)

    def finalize(self) -> None:
        """Masks become exactly their targets (APT's last pruning step)."""
        for m, t in zip(self.masks, self.targets):
            m.copy_(t)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def sliced_linear(lin: nn.Linear, idx: torch.Tensor, dim: str) -> nn.Linear:
    """A new Linear holding output rows (``dim="out"``) or input columns (``"in"``) ``idx`` of ``lin``, with the
    same bias handling (sliced with the rows, kept whole with the columns) and the same requires_grad flags."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach()
    new_w = w[idx] if dim == "out" else w[:, idx]
    new = nn.Linear(new_w.shape[1], new_w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(new_w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach()[idx] if dim == "out" else lin.bias.detach())
    new.weight.requires_grad_(lin.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def compact_ffn(model, keep: List[torch.Tensor]) -> int:
    """Physically remove the FFN neurons not in ``keep`` (one bool vector per layer): gate_proj and up_proj lose
    the rows, down_proj the columns. Returns the number of parameters removed. Layers may end with different
    widths (the config's ``intermediate_size`` is left as is, like pruned heads)."""
    mlps = gated_mlps(model)
    if len(keep) != len(mlps):
        raise ValueError(f"keep needs one mask per layer ({len(mlps)}), got {len(keep)}")
    removed = 0
    for mlp, k in zip(mlps, keep):
        k = k.to(torch.bool).to(mlp.down_proj.weight.device)
        if k.numel() != mlp.down_proj.weight.shape[1]:
            raise ValueError(f"a keep mask has {k.numel()} entries for {mlp.down_proj.weight.shape[1]} neurons")
        if not bool(k.any()):
            raise ValueError("a layer would keep no FFN neuron")
        idx = torch.nonzero(k).flatten()
        before = sum(p.numel() for p in mlp.parameters())
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, sliced_linear(getattr(mlp, name), idx, "out"))
        mlp.down_proj = sliced_linear(mlp.down_proj, idx, "in")
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = idx.numel()
        removed += before - sum(p.numel() for p in mlp.parameters())
    return removed
