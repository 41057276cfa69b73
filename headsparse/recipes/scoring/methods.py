"""The head-scoring methods. See docs/scoring.md for what is published and what is reconstructed.

Notation: X is the input of a layer's attention output projection (o_proj,
BERT's attention.output.dense), (B, S, Hq*D): the concatenated per-head outputs
O_h; G = dL/dX. A head's slice is channels [h*D, (h+1)*D). Padding tokens are
masked out of every reduction (the token mask is the batch's attention_mask).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch

from ...ops.head_stats import cross_head_inner, gram, head_gram_blocks, head_stats
from ...ops.gate_grads import record_gate_grads
from ._model import ModelInfo, activation_grads_only, compute_loss, eval_mode, model_info
from ..._checks import check_int

# -------------------------------------------------------------------- options
DEFAULTS: Dict[str, Dict] = {
    "gradient": {"normalize": "layer_l2", "global_minmax": False},
    "apt": {"beta": 0.85, "kurtosis": True},
    "hifi": {"richness": "nuclear", "correlation": "cka", "center": False, "node_weight": "both",
             "damping": 0.85, "tol": 1e-6, "max_iter": 100},
    "alps": {"lr": 1e-4, "steps": None, "proxy_samples": 100, "weight_decay": 0.1, "temperature": 1.0,
             "matrix": "paper"},
    "random": {},
}
_CHOICES = {
    ("gradient", "normalize"): ("layer_l2", "none"),
    ("hifi", "richness"): ("nuclear", "effective_rank"),
    ("hifi", "correlation"): ("cka", "cosine"),
    ("hifi", "node_weight"): ("both", "teleport", "edge"),
    ("alps", "matrix"): ("paper", "qkv"),
}


def resolve_options(method: str, options: Dict) -> Dict:
    if method not in DEFAULTS:
        raise ValueError(f"method must be one of {sorted(DEFAULTS)}, got {method!r}")
    unknown = sorted(set(options) - set(DEFAULTS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid: {sorted(DEFAULTS[method])}")
    opts = {**DEFAULTS[method], **options}
    for (m, k), choices in _CHOICES.items():
        if m == method and opts[k] not in choices:
            raise ValueError(f"option {k!r} of method {method!r} must be one of {choices}, got {opts[k]!r}")
    for k in ("beta", "damping"):
        if k in opts and not (isinstance(opts[k], (int, float)) and 0 <= opts[k] < 1):
            raise ValueError(f"option {k!r} must be a number in [0, 1), got {opts[k]!r}")
    for k in ("max_iter", "proxy_samples"):
        if k in opts:
            check_int(f"option {k!r}", opts[k], 1)
    if method == "alps":
        if opts["steps"] is not None and (not isinstance(opts["steps"], int) or opts["steps"] <= 0):
            raise ValueError(f"option 'steps' must be a positive int or None, got {opts['steps']!r}")
        for k in ("lr", "temperature"):
            if not (isinstance(opts[k], (int, float)) and opts[k] > 0):
                raise ValueError(f"option {k!r} must be a positive number, got {opts[k]!r}")
    return opts


class _Counter:
    """Wraps a batch iterator: counts samples and non-padding tokens."""

    def __init__(self, batches, progress: bool = False, desc: str = "scoring", total: Optional[int] = None):
        self.samples = 0
        self.tokens = 0
        self._it = batches
        if progress:
            from tqdm.auto import tqdm

            self._it = tqdm(batches, desc=desc, unit="batch", total=total)

    def __iter__(self):
        for b in self._it:
            self.samples += int(b["input_ids"].shape[0])
            self.tokens += int(b["attention_mask"].sum())
            yield b


def _o_input_hooks(info: ModelInfo, fn) -> List:
    """Forward pre-hooks on every layer's output projection: fn(layer, X)."""
    handles = []
    for i in range(info.num_layers):
        handles.append(info.o_module(i).register_forward_pre_hook(lambda m, args, i=i: fn(i, args[0])))
    return handles


# ------------------------------------------------------------------ gradient
def score_gradient(model, info: ModelInfo, batches, loss_fn, opts) -> Tuple[torch.Tensor, Dict]:
    """Michel et al. (2019): I_h = E_x |sum_t <O_h, dO_h>|, from the attention backward's statistics.

    Attention is routed through :func:`headsparse.attention` (transformers'
    AttentionInterface, name "headsparse"; the model is restored afterwards);
    the op's backward records sum_t <O_h, dO_h> per (sample, head) inside
    :func:`headsparse.record_gate_grads` while it computes FlashAttention's
    ``delta`` anyway: no extra pass and no per-head loop. Each sample's loss is
    its own mean token loss and the batch loss is their sum, so a sample's
    statistic is exactly what a batch-size-1 run (Michel's script) gives.
    No weight gradient is computed (parameters are frozen during scoring; the
    input embeddings' output carries the graph).
    """
    from ...patch.core import ATTN_NAME, register

    register()
    before = getattr(model.config, "_attn_implementation", None)
    total = torch.zeros(info.num_layers, info.num_q_heads, dtype=torch.float64)
    n = 0
    model.set_attn_implementation(ATTN_NAME)
    try:
        with activation_grads_only(model), eval_mode(model):
            for batch in batches:
                with record_gate_grads() as rec:
                    per = compute_loss(model, info, batch, loss_fn)
                    per.sum().backward()
                got = rec.by_key()
                missing = [i for i in range(info.num_layers) if i not in got]
                if missing:
                    raise RuntimeError(f"gradient scoring: no gate statistics recorded for layers {missing}")
                g = torch.stack([got[i] for i in range(info.num_layers)], dim=1)  # (B, L, H)
                if torch.isnan(g).any():
                    raise RuntimeError("gradient scoring: the attention backward skipped heads")
                total += g.abs().sum(dim=0).double().cpu()
                n += g.shape[0]
    finally:
        if before is not None:
            model.set_attn_implementation(before)
    if n == 0:
        raise ValueError("data holds no samples")
    s = total / n
    raw = s.clone()
    if opts["normalize"] == "layer_l2":
        s = s / (s.pow(2).sum(dim=-1, keepdim=True).sqrt() + 1e-20)
    if opts["global_minmax"]:
        s = (s - s.min()) / (s.max() - s.min() + 1e-20)
    return s, {"unnormalized": raw}


# ----------------------------------------------------------------------- apt
def fisher_kurtosis(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Fisher (excess) kurtosis without bias correction: m4 / m2^2 - 3; 0 where the variance is 0."""
    c = v - v.mean(dim=dim, keepdim=True)
    m2 = c.pow(2).mean(dim=dim)
    m4 = c.pow(4).mean(dim=dim)
    k = m4 / m2.pow(2) - 3
    return torch.where(m2 > 0, k, torch.zeros_like(k))


def score_apt(model, info: ModelInfo, batches, loss_fn, opts) -> Tuple[torch.Tensor, Dict]:
    """APT (Zhao et al. 2024) head salience with the outlier (kurtosis) term, EMA-smoothed across batches.

    Per batch and layer: s_h = sum over the head's channels c of
    (sum_{b,t} |X_c|) * (sum_{b,t} |G_c|) (masked tokens; ``head_stats``), plus
    sqrt(max(kurt_h, 0)) where kurt_h is the Fisher kurtosis of the entries of
    mean_{b,t}(X)[c] * W_o[:, c] over the head's columns c in [h*D, (h+1)*D)
    (contiguous head slices, see docs). Then S <- beta * S + (1 - beta) * s
    starting from S = 0 (APT's ``RunningSalienceScorer``). The loss is the mean
    over samples of each sample's mean token loss.
    """
    L, H, D = info.num_layers, info.num_q_heads, info.head_dim
    w_o = [info.qkvo(i)["o"].double() for i in range(L)]  # (d, H*D)
    beta = float(opts["beta"])
    ema = torch.zeros(L, H, dtype=torch.float64)
    cur: Dict[int, torch.Tensor] = {}
    state: Dict[str, torch.Tensor] = {}

    def on_x(i, x):
        if not x.requires_grad:
            return
        mask = state["mask"]

        def on_g(g, i=i, x=x.detach()):
            st = head_stats(x, g.detach(), num_heads=H, token_mask=mask)
            sal = st.apt_salience().double().cpu()
            if opts["kurtosis"]:
                ntok = mask.sum().clamp(min=1)
                mean_x = ((x.double() * mask[..., None]).sum(dim=(0, 1)) / ntok).cpu()
                vals = (w_o[i] * mean_x[None, :]).view(w_o[i].shape[0], H, D).permute(1, 0, 2).reshape(H, -1)
                sal = sal + fisher_kurtosis(vals).clamp(min=0).sqrt()
            cur[i] = sal

        x.register_hook(on_g)

    handles = _o_input_hooks(info, on_x)
    batches_seen = 0
    try:
        with activation_grads_only(model), eval_mode(model):
            for batch in batches:
                state["mask"] = batch["attention_mask"].bool()
                cur.clear()
                per = compute_loss(model, info, batch, loss_fn)
                per.mean().backward()
                if len(cur) != L:
                    raise RuntimeError("apt scoring: the o_proj input gradient did not reach every layer")
                s = torch.stack([cur[i] for i in range(L)])
                ema = beta * ema + (1 - beta) * s
                batches_seen += 1
    finally:
        for h in handles:
            h.remove()
    if batches_seen == 0:
        raise ValueError("data holds no samples")
    return ema, {"batches": batches_seen}


# ---------------------------------------------------------------------- hifi
def richness_from_gram_blocks(blocks: torch.Tensor, num_tokens: int, kind: str) -> torch.Tensor:
    """Per-head information richness from the (..., D, D) blocks X_h^T X_h: singular values of O_h are
    sqrt(eigenvalues). "nuclear": sum of singular values / sqrt(num_tokens) (RMS-scaled nuclear norm);
    "effective_rank": exp(entropy of the normalised singular values)."""
    ev = torch.linalg.eigvalsh(blocks.double()).clamp(min=0)
    sv = ev.sqrt()
    if kind == "nuclear":
        return sv.sum(dim=-1) / math.sqrt(max(num_tokens, 1))
    p = sv / sv.sum(dim=-1, keepdim=True).clamp(min=1e-300)
    ent = -(p * torch.log(p.clamp(min=1e-300))).sum(dim=-1)
    return torch.exp(ent)


def correlation_from_gram(gram_matrix: torch.Tensor, num_heads: int, kind: str) -> torch.Tensor:
    """H x H head correlation in [0, 1] from a layer's Gram matrix X^T X.

    "cka": ||X_i^T X_j||_F^2 / (||X_i^T X_i||_F ||X_j^T X_j||_F) (linear CKA of the token representations;
    invariant to each head's basis); "cosine": |sum_t <X_i, X_j>| / sqrt(sum_t ||X_i||^2 sum_t ||X_j||^2).
    """
    g = gram_matrix.double()
    if kind == "cka":
        d = g.shape[0] // num_heads
        f = g.view(num_heads, d, num_heads, d).pow(2).sum(dim=(1, 3))
    else:
        f = cross_head_inner(g, num_heads).abs()
    diag = torch.diagonal(f).clamp(min=1e-300)
    return f / torch.sqrt(diag[:, None] * diag[None, :])


def pagerank(weights: torch.Tensor, richness: torch.Tensor, node_weight: str = "both", damping: float = 0.85,
             tol: float = 1e-6, max_iter: int = 100) -> Tuple[torch.Tensor, int]:
    """Personalised PageRank on a batch of head graphs.

    Args:
        weights: (L, H, H) non-negative edge weights (the diagonal is ignored).
        richness: (L, H) positive node values.
        node_weight: where richness enters: "teleport" (the teleport vector is
            richness / its sum), "edge" (a walk from i moves to j with probability
            proportional to w_ij * r_j) or "both".
    Returns:
        (L, H) stationary distributions (each row sums to 1) and the iterations used
        (stop when the largest L1 change of a row is below tol, or at max_iter).
    """
    L, H, _ = weights.shape
    w = weights.double() * (1 - torch.eye(H, dtype=torch.float64))
    r = richness.double().clamp(min=1e-300)
    a = w * r[:, None, :] if node_weight in ("edge", "both") else w
    rows = a.sum(dim=-1, keepdim=True)
    p_mat = torch.where(rows > 0, a / rows.clamp(min=1e-300), torch.full_like(a, 1.0 / H))
    v = r / r.sum(dim=-1, keepdim=True) if node_weight in ("teleport", "both") else torch.full_like(r, 1.0 / H)
    p = torch.full_like(r, 1.0 / H)
    it = 0
    for it in range(1, max_iter + 1):
        new = (1 - damping) * v + damping * torch.einsum("lij,li->lj", p_mat, p)
        delta = (new - p).abs().sum(dim=-1).max().item()
        p = new
        if delta < tol:
            break
    return p, it


def score_hifi(model, info: ModelInfo, batches, loss_fn, opts) -> Tuple[torch.Tensor, Dict]:
    """HiFi (Gui and Xiao, ACL 2023), reconstructed: one forward pass over the data accumulates the Gram
    X^T X of every layer's o_proj input (masked tokens); per head, information richness from the
    singular values of O_h (sqrt of the eigenvalues of the diagonal block); between heads, a correlation
    from the blocks; per layer, a personalised PageRank; score = PageRank * H (layer mean 1)."""
    L, H, C = info.num_layers, info.num_q_heads, info.num_q_heads * info.head_dim
    grams = [torch.zeros(C, C, dtype=torch.float64) for _ in range(L)]
    sums = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    state: Dict[str, torch.Tensor] = {}
    ntok = 0

    def on_x(i, x):
        mask = state["mask"]
        grams[i] += gram(x.detach(), token_mask=mask).double().cpu()
        if opts["center"]:
            sums[i] += (x.detach().double() * mask[..., None]).sum(dim=(0, 1)).cpu()

    handles = _o_input_hooks(info, on_x)
    try:
        with torch.no_grad(), eval_mode(model):
            for batch in batches:
                state["mask"] = batch["attention_mask"].bool()
                model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
                ntok += int(state["mask"].sum())
    finally:
        for h in handles:
            h.remove()
    if ntok == 0:
        raise ValueError("data holds no (non-padding) tokens")
    g = torch.stack(grams)  # (L, C, C)
    if opts["center"]:
        mu = torch.stack(sums) / ntok
        g = g - ntok * mu[:, :, None] * mu[:, None, :]
    blocks = torch.stack([head_gram_blocks(g[i], H) for i in range(L)])  # (L, H, D, D)
    rich = richness_from_gram_blocks(blocks, ntok, opts["richness"])  # (L, H)
    corr = torch.stack([correlation_from_gram(g[i], H, opts["correlation"]) for i in range(L)])
    pr, iters = pagerank(corr, rich, opts["node_weight"], float(opts["damping"]), float(opts["tol"]),
                         int(opts["max_iter"]))
    return pr * H, {"pagerank_iterations": iters, "richness": rich, "correlation": corr}


# ---------------------------------------------------------------------- alps
def alps_head_matrices(w: Dict[str, torch.Tensor], nq: int, nkv: int, d: int, matrix: str) -> torch.Tensor:
    """(Hq, n) per-head weight vectors, GQA-aware: query head h reads KV head h // (Hq // Hkv).

    "paper": W^h = W_q^h (W_k^g)^T W_v^g in the column convention (W_q^h: d_model x D), a
    d_model x D matrix, flattened; "qkv": the released code's concatenation of the head's flattened
    Q, K and V row slices, with K/V taken from the head's KV group (not the query index).
    """
    dm = w["q"].shape[1]
    q = w["q"].double().view(nq, d, dm)
    k = w["k"].double().view(nkv, d, dm)
    v = w["v"].double().view(nkv, d, dm)
    group = torch.arange(nq) // (nq // nkv)
    kg, vg = k[group], v[group]  # (Hq, D, dm)
    if matrix == "paper":
        kv = kg @ vg.transpose(1, 2)  # (Hq, D, D) = W_k^T-side product in the (out, in) layout
        return (q.transpose(1, 2) @ kv).reshape(nq, -1)  # (Hq, dm * D)
    return torch.cat([q.reshape(nq, -1), kg.reshape(nq, -1), vg.reshape(nq, -1)], dim=1)


def wasserstein1_softmax(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Row-wise W1 between softmax(a / tau) and softmax(b / tau) on the support linspace(0, 1, n):
    sum_i |CDF_p(i) - CDF_q(i)| / (n - 1)."""
    p = torch.softmax(a.double() / temperature, dim=-1)
    q = torch.softmax(b.double() / temperature, dim=-1)
    n = a.shape[-1]
    return (p.cumsum(-1) - q.cumsum(-1)).abs().sum(dim=-1) / max(n - 1, 1)


def alps_distances(base: List[Dict[str, torch.Tensor]], tuned: List[Dict[str, torch.Tensor]], info: ModelInfo,
                   temperature: float, matrix: str) -> torch.Tensor:
    out = []
    for wb, wt in zip(base, tuned):
        mb = alps_head_matrices(wb, info.num_q_heads, info.num_kv_heads, info.head_dim, matrix)
        mt = alps_head_matrices(wt, info.num_q_heads, info.num_kv_heads, info.head_dim, matrix)
        out.append(wasserstein1_softmax(mb, mt, temperature))
    return torch.stack(out)


def proxy_finetune(model, info: ModelInfo, batches: List[Dict], loss_fn, opts, seed: int):
    """A copy of ``model`` after a short AdamW run on the attention projections only (q/k/v/o weights and
    biases; betas (0.9, 0.999), ALPS's weight decay 0.1), eval mode (no dropout); ``model`` is untouched."""
    tuned = copy.deepcopy(model)
    tinfo = model_info(tuned)
    for p in tuned.parameters():
        p.requires_grad_(False)
    params = []
    for i in range(tinfo.num_layers):
        for m in tinfo.attn_modules(i):
            for p in m.parameters():
                p.requires_grad_(True)
                params.append(p)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=float(opts["lr"]), betas=(0.9, 0.999), weight_decay=float(opts["weight_decay"]))
    steps = opts["steps"] or len(batches)
    tuned.eval()
    losses = []
    for s in range(steps):
        batch = batches[s % len(batches)]
        loss = compute_loss(tuned, tinfo, batch, loss_fn).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return tuned, tinfo, losses


def score_alps(model, info: ModelInfo, batches, loss_fn, opts, seed: int = 0) -> Tuple[torch.Tensor, Dict]:
    """ALPS (ACL 2025) head scores: W1 distance between softmax distributions of base and proxy-tuned head
    weights (see :func:`alps_head_matrices`). The proxy run uses the first ``proxy_samples`` samples."""
    proxy: List[Dict] = []
    have = 0
    for b in batches:
        left = opts["proxy_samples"] - have
        if b["input_ids"].shape[0] > left:
            b = {k: (v[:left] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v) for k, v in b.items()}
        proxy.append(b)
        have += b["input_ids"].shape[0]
        if have >= opts["proxy_samples"]:
            break
    if not proxy:
        raise ValueError("data holds no samples")
    base = [info.qkvo(i) for i in range(info.num_layers)]
    tuned, tinfo, losses = proxy_finetune(model, info, proxy, loss_fn, opts, seed)
    tw = [tinfo.qkvo(i) for i in range(tinfo.num_layers)]
    scores = alps_distances(base, tw, info, float(opts["temperature"]), opts["matrix"])
    del tuned
    return scores, {"proxy_losses": losses, "proxy_samples": have}


def score_random(info: ModelInfo, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(info.num_layers, info.num_q_heads, generator=g, dtype=torch.float64)
