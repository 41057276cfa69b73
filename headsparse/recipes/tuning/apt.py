"""APT-style adaptive pruning during head-sparse tuning (head granularity; a reduced reconstruction).

:func:`tune_apt_heads` (also reachable as ``tune(..., mode="apt")`` and, by its old name, ``tune_apt``) trains
the plan's head slices and prunes FROZEN heads; it is not APT as published, which is
:func:`headsparse.recipes.apt.finetune_apt_published` (LoRA adapters, rank growth, FFN and head salience with
kurtosis, hidden-state distillation).

APT (Zhao et al., ICML 2024, ROIM1998/APT) prunes heads, FFN neurons and
hidden dimensions during LoRA tuning, grows adapter ranks and self-distils.
What this mode keeps from its code, at head granularity only:

- salience of head h: (sum_{b,t} |X|) * (sum_{b,t} |G|) per channel of the
  o_proj input X (G = dL/dX), summed over the head's channels, accumulated
  over the steps between pruning steps and smoothed by an EMA (beta 0.85);
- schedule: ``n_prunings`` pruning steps evenly spaced in [start, end] (fractions
  of the run); the retained head fraction follows APT's cubic decay
  r(step) = min(1, r_T + (1 - r_T) * ((t_end - step) / (t_end - t_start))^3);
- pruning: the lowest-salience FROZEN heads become PRUNED (never restored;
  the plan's TRAIN heads are never pruned, so something always trains);
  the model is unpatched (tuned slices merged) and re-patched with the new
  plan, so pruned heads are physically removed from every projection and the
  attention call; the optimizer restarts on the new slices;
- self-distillation from a frozen snapshot of the starting model:
  loss = mu * T^2 KL(student/T || teacher/T) + (1 - mu) * task loss, mu rising
  linearly from 0 to ``distill_max`` over the pruning window.

With ``ffn=True``, FFN neurons are pruned jointly with the FROZEN heads by
salience density under a parameter budget, with soft neuron masks that become
exact (and the neurons removed) at the last pruning step
(:mod:`headsparse.recipes.tuning.apt_blocks`). Not kept: hidden-dimension pruning,
kurtosis term, LoRA rank growth, hidden-state distillation, soft masks for
heads. ``dev_fn`` refreshes the teacher when the dev metric improves.
Heads below the gradient horizon (lowest trainable layer) get no gradient and
hence no salience: they are never pruned.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..data import IGNORE, as_examples, batches as make_batches, collate, model_device, pad_id_of
from ..data import per_sample_loss
from ...patch import HeadSlicedOutput, is_patched, patch, patch_info, unpatch
from ...patch.core import layer_states
from ...plan import HeadMode, HeadPlan
from .apt_blocks import (FFNNeurons, apt_retained, compact_ffn, density_keep, neuron_cost, snapshot,
                         track_abs)
from .result import TuneResult
from ..._checks import check_int, check_number


def cubic_retained(step: int, keep_final: float, t_start: int, t_end: int) -> float:
    """APT's cubic schedule of the retained fraction (1 before ``t_start``, ``keep_final`` from ``t_end``)."""
    if step <= t_start:
        return 1.0
    if step >= t_end:
        return keep_final
    return min(1.0, keep_final + (1.0 - keep_final) * ((t_end - step) / (t_end - t_start)) ** 3)


class _Salience:
    """(sum|X|)(sum|G|) per head at every patched layer's o_proj input, in original head order."""

    def __init__(self, model) -> None:
        info = patch_info(model)
        self.d = info.head_dim
        self.plan = info.plan
        self.abs_x: Dict[int, torch.Tensor] = {}
        self.abs_g: Dict[int, torch.Tensor] = {}
        self.handles = []
        states = layer_states(model)
        for i, layer in enumerate(info.family.layers(model.base_model)):
            o = getattr(*info.family.slots(layer)["o"])
            st = states[i]
            if isinstance(o, HeadSlicedOutput) and not st.no_grad:
                self.handles.append(o.register_forward_pre_hook(self._hook(i, st.q_order)))

    def _hook(self, i, q_order):
        def pre(mod, args):
            if not track_abs(args[0], i, self.abs_x, self.abs_g, torch.float32):
                return
            self._orders = getattr(self, "_orders", {})
            self._orders[i] = q_order
        pre._hs_apt = True
        return pre

    def take(self, num_layers: int, num_heads: int) -> torch.Tensor:
        """(L, H) salience accumulated since the last call; NaN where unknown (no gradient or pruned)."""
        out = torch.full((num_layers, num_heads), float("nan"), dtype=torch.float64)
        for i, sx in self.abs_x.items():
            per = (sx * self.abs_g[i]).view(-1, self.d).sum(1).double()
            for p, h in enumerate(self._orders[i]):
                if self.plan.modes[i][h] != HeadMode.PRUNED:
                    out[i, h] = per[p]
        self.abs_x.clear()
        self.abs_g.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def tune_apt_heads(model, plan: HeadPlan, data, *, keep_final: float = 0.6, n_prunings: int = 4,
             prune_start: float = 0.1, prune_end: float = 0.6, beta: float = 0.85, distill_max: float = 0.5,
             temperature: float = 2.0, epochs: int = 1, batch_size: int = 8, lr: float = 1e-4,
             weight_decay: float = 0.0, grad: str = "exact", pad_id: Optional[int] = None, seed: int = 0,
             max_grad_norm: Optional[float] = 1.0, progress: bool = True, ffn: bool = False,
             mask_step: float = 0.01, dev_fn: Optional[Callable[[torch.nn.Module], float]] = None) -> TuneResult:
    """Head-sparse tuning with APT-style adaptive head pruning (module docstring). The model ends patched,
    with the final plan (``result.info["plan"]``) in which the pruned heads are physically removed.

    ``ffn=True`` (gated MLPs only) prunes FFN neurons jointly with the FROZEN heads, as APT does: at every pruning
    step all candidate blocks are ranked by salience density (salience / parameters) and the longest prefix that
    fits ``retained ratio x prunable parameters`` is kept (:mod:`headsparse.recipes.tuning.apt_blocks`); the prunable
    parameters are those of the FROZEN heads and FFN neurons at or above the gradient horizon (TRAIN heads are
    never pruned), and ``keep_final`` is the share of them kept at the end. Neuron masks move by ``mask_step`` per optimizer step
    toward kept/dropped, become exact at the last pruning step, and the dropped neurons are then removed from
    the weights. Heads are pruned at once (hard), not through a soft mask.

    ``dev_fn(model) -> float`` (higher is better), if given, is evaluated after every pruning step, and the
    distillation teacher is refreshed to a snapshot of the current model whenever it improves on the best value
    so far (APT's teacher refresh; the first teacher is the starting model). mu per step is in
    ``result.info["mu"]``."""
    if not isinstance(plan, HeadPlan):
        raise ValueError(f"plan must be a headsparse.HeadPlan, got {type(plan).__name__}")
    check_number("keep_final", keep_final, 0, 1, lo_open=True)
    check_int("n_prunings", n_prunings, 1)
    if not 0 <= prune_start < prune_end <= 1:
        raise ValueError(f"need 0 <= prune_start < prune_end <= 1, got {prune_start!r}, {prune_end!r}")
    if not 0 <= distill_max <= 1:
        raise ValueError(f"distill_max must be in [0, 1], got {distill_max!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        check_int(name, v, 1)
    check_number("mask_step", mask_step, 0, 1, lo_open=True)
    examples = as_examples(data, "data")
    if is_patched(model):
        raise ValueError("tune_apt_heads patches the model itself; pass an unpatched model")
    plan.check_model(model)
    neurons = FFNNeurons(model) if ffn else None  # hooks on the MLPs, which patching leaves alone
    pad = pad_id_of(model, pad_id)
    dev = model_device(model)
    teacher = snapshot(model) if distill_max > 0 else None
    best_dev = -math.inf
    if dev_fn is not None:  # the starting model (the first teacher) sets the bar a refresh must beat
        with torch.no_grad():
            best_dev = float(dev_fn(model.eval()))
    mus: List[float] = []
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * epochs
    t_start, t_end = int(prune_start * total), max(int(prune_end * total), int(prune_start * total) + 1)
    prune_at = sorted({t_start + round((k + 1) * (t_end - t_start) / n_prunings) for k in range(n_prunings)})
    n_heads = plan.num_layers * plan.num_q_heads
    cur = HeadPlan([list(r) for r in plan.modes], plan.num_kv_heads, plan.kv_policy, plan.model_family)
    patch(model, cur, grad=grad)
    sal = _Salience(model)
    ema = torch.full((plan.num_layers, plan.num_q_heads), float("nan"), dtype=torch.float64)
    if neurons is not None:
        info = patch_info(model)
        hidden = neurons.mlps[0].down_proj.weight.shape[0]
        group = info.num_q_heads // info.num_kv_heads
        head_cost = 2 * info.head_dim * hidden + 2 * info.head_dim * hidden / group  # q rows, o cols, kv share
        n_costs = [neuron_cost(m) for m in neurons.mlps]
        n_ema: List[Optional[torch.Tensor]] = [None] * len(neurons.mlps)
        n_keep = [torch.ones(m.numel(), dtype=torch.bool) for m in neurons.masks]

    def new_opt():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)

    opt = new_opt()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="tune (apt)", unit="step", disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    gen = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    history: List[Dict] = []
    step = 0
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for idx in make_batches(len(examples), batch_size, torch.randperm(len(examples), generator=gen).tolist()):
            b = collate([examples[i] for i in idx], pad, dev)
            for g in opt.param_groups:
                g["lr"] = lr * max(0.0, (total - step) / total)
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            task = per_sample_loss(out.logits, b["labels"]).mean()
            mu = distill_max * min(1.0, max(0.0, (step - t_start) / max(1, t_end - t_start)))
            mus.append(mu)
            loss = task
            if teacher is not None and mu > 0:
                with torch.no_grad():
                    tl = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                valid = (b["labels"][:, 1:] != IGNORE)
                s_log = F.log_softmax(out.logits[:, :-1].float() / temperature, -1)[valid]
                t_prob = F.softmax(tl[:, :-1].float() / temperature, -1)[valid]
                kd = F.kl_div(s_log, t_prob, reduction="batchmean") * temperature ** 2
                loss = mu * kd + (1 - mu) * task
            loss.backward()
            params = [p for p in model.parameters() if p.requires_grad]
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(task.detach()))
            s = sal.take(cur.num_layers, cur.num_q_heads)
            known = ~torch.isnan(s)
            ema = torch.where(known & torch.isnan(ema), s, ema)
            ema = torch.where(known & ~torch.isnan(ema), beta * ema + (1 - beta) * s, ema)
            if neurons is not None and neurons.handles:
                for i, sn in enumerate(neurons.take()):
                    if sn is not None:
                        n_ema[i] = sn if n_ema[i] is None else beta * n_ema[i] + (1 - beta) * sn
                neurons.move(mask_step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", pruned=cur.count("pruned"))
            if step in prune_at and neurons is not None:
                cur, ema, sal, opt, rec = _prune_blocks(
                    model, cur, ema, sal, neurons, n_ema, n_keep, head_cost, n_costs,
                    apt_retained(step, 1.0, keep_final, t_start, t_end), last=step == prune_at[-1], grad=grad,
                    new_opt=new_opt, opt=opt)
                history.append({"step": step, **rec})
            elif step in prune_at:
                keep = max(1, math.ceil(cubic_retained(step, keep_final, t_start, t_end) * n_heads - 1e-9))
                n_prune = n_heads - keep - cur.count("pruned")
                cand = [(float(ema[i, h]), i, h) for i in range(cur.num_layers) for h in range(cur.num_q_heads)
                        if cur.modes[i][h] == HeadMode.FROZEN and not math.isnan(float(ema[i, h]))]
                cand.sort()
                chosen = cand[:max(0, n_prune)]
                if chosen:
                    cur, sal, opt = _prune_heads(model, cur, ema, sal, [(i, h) for _, i, h in chosen], grad,
                                                 new_opt)
                history.append({"step": step, "retained_target": keep / n_heads, "pruned": cur.count("pruned")})
            if step in prune_at and dev_fn is not None:
                model.eval()
                with torch.no_grad():
                    score = float(dev_fn(model))
                model.train()
                refreshed = score > best_dev
                if refreshed:
                    best_dev = score
                    if teacher is not None:
                        teacher = snapshot(model, neurons)
                history[-1].update(dev=score, teacher_refreshed=refreshed and teacher is not None)
    elapsed = time.perf_counter() - t0
    sal.close()
    if neurons is not None:
        neurons.close()
    if bar is not None:
        bar.close()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info_out = {"plan": cur, "prune_history": history, "salience_ema": ema, "mu": mus}
    if neurons is not None:
        info_out["ffn_neurons_kept"] = [int(k.sum()) for k in n_keep]
    return TuneResult(model, step, epochs, losses, elapsed, n_params, 0.0, info_out)


def _prune_heads(model, cur: HeadPlan, ema: torch.Tensor, sal: "_Salience", heads, grad: str, new_opt):
    """Mark ``heads`` (layer, head) PRUNED and re-patch, so they are physically removed; their salience is
    forgotten, the salience hooks and the optimizer start again on the new slices. Returns (plan, sal, opt)."""
    modes = [list(r) for r in cur.modes]
    for i, h in heads:
        modes[i][h] = HeadMode.PRUNED
        ema[i, h] = float("nan")
    sal.close()
    unpatch(model)
    cur = HeadPlan(modes, cur.num_kv_heads, cur.kv_policy, cur.model_family)
    patch(model, cur, grad=grad)
    model.train()
    return cur, _Salience(model), new_opt()


def _prune_blocks(model, cur, ema, sal, neurons, n_ema, n_keep, head_cost, n_costs, ratio, *, last, grad, new_opt,
                  opt):
    """One joint pruning step over FROZEN heads and FFN neurons by salience density. The budget is ``ratio`` of
    the prunable parameters: the candidates (FROZEN heads and neurons with a salience, i.e. at or above the
    gradient horizon) plus the heads already pruned. TRAIN heads and blocks without a salience are outside it and
    always kept. At the ``last`` step the neuron masks become exact and the dropped neurons are removed."""
    heads = [(i, h) for i in range(cur.num_layers) for h in range(cur.num_q_heads)
             if cur.modes[i][h] == HeadMode.FROZEN and not math.isnan(float(ema[i, h]))]
    sal_parts = [torch.tensor([float(ema[i, h]) for i, h in heads], dtype=torch.float64)]
    cost_parts = [torch.full((len(heads),), float(head_cost), dtype=torch.float64)]
    layers = []
    for i, e in enumerate(n_ema):
        if e is None:
            continue
        layers.append(i)
        sal_parts.append(e)
        cost_parts.append(torch.full((neurons.masks[i].numel(),), float(n_costs[i]), dtype=torch.float64))
    costs = torch.cat(cost_parts)
    universe = float(costs.sum()) + cur.count("pruned") * head_cost
    keep = density_keep(torch.cat(sal_parts), costs, ratio * universe)
    keep_heads, pos = keep[:len(heads)], len(heads)
    for i in layers:
        n = neurons.masks[i].numel()
        k = keep[pos:pos + n].clone()
        if not bool(k.any()):  # a layer keeps at least its densest neuron
            k[int(torch.argmax(n_ema[i] / n_costs[i]))] = True
        n_keep[i] = k
        pos += n
    neurons.set_targets(n_keep)
    dropped = [hh for hh, kk in zip(heads, keep_heads.tolist()) if not kk]
    if dropped:
        cur, sal, opt = _prune_heads(model, cur, ema, sal, dropped, grad, new_opt)
    if last and neurons.handles:
        neurons.finalize()
        neurons.close()
        compact_ffn(model, n_keep)
    kept_params = float(costs[keep].sum())
    rec = {"retained_target": ratio, "retained_params": kept_params / universe if universe else 1.0,
           "pruned": cur.count("pruned"),
           "ffn_neurons_kept": [int(k.sum()) for k in n_keep], "ffn_removed": bool(last)}
    return cur, ema, sal, opt, rec


tune_apt = tune_apt_heads  # the old name, kept: heads-only APT-style tuning (not the published recipe)
