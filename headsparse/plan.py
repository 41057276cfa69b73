"""``HeadPlan``: which attention heads are trained, frozen or pruned.

A plan is kept at query-head granularity: for every layer and every query head
one :class:`HeadMode`. Key/value heads (shared by a group of query heads under
grouped-query attention) follow from a policy:

- ``"any"`` (default): a KV head's K/V rows are trainable if any query head of
  its group is TRAIN;
- ``"all"``: only if every unpruned query head of its group is TRAIN;
- ``"none"``: K/V rows are never trainable (only Q rows and O columns are).

A KV head is physically removed only when every query head of its group is
pruned.
"""
from __future__ import annotations

import json
import os
from enum import Enum
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ._atomic import atomic_write_text
from ._checks import check_int, check_number

KV_POLICIES = ("any", "all", "none")
_FORMAT_VERSION = 1

# How to read (family, layers, query heads, KV heads) from a model. The patch layer, which knows the model
# families, registers its reader when it is imported (``import headsparse`` always imports it), so the plan never
# imports the layer above it.
_model_shape_reader = None


def register_model_shape(reader) -> None:
    """Set the function ``model -> (family, num layers, query heads, KV heads)`` used by
    :meth:`HeadPlan.for_model` and :meth:`HeadPlan.check_model` (the patch layer registers ``model_shape``)."""
    global _model_shape_reader
    _model_shape_reader = reader


def _model_shape(model):
    if _model_shape_reader is None:  # only when headsparse.plan was loaded without the package (never by import)
        raise RuntimeError("no model-shape reader registered: import headsparse (its patch layer registers one)")
    return _model_shape_reader(model)


class HeadMode(str, Enum):
    """The role of one query head."""

    TRAIN = "train"
    FROZEN = "frozen"
    PRUNED = "pruned"

    @classmethod
    def parse(cls, value) -> "HeadMode":
        if isinstance(value, HeadMode):
            return value
        if isinstance(value, str):
            v = value.strip().lower()
            for m in cls:
                if v in (m.value, m.name.lower(), m.value[0]):
                    return m
        raise ValueError(f"head mode must be one of {[m.value for m in cls]} (or T/F/P), got {value!r}")


_SYMBOL = {HeadMode.TRAIN: "T", HeadMode.FROZEN: ".", HeadMode.PRUNED: "x"}


class HeadPlan:
    """Per layer, per query head: TRAIN / FROZEN / PRUNED.

    Args:
        modes: one sequence per layer, one entry per query head (HeadMode or
            its string value "train"/"frozen"/"pruned").
        num_kv_heads: KV heads per layer (default: as many as query heads).
            The query heads must split into equal groups: query head h reads
            KV head ``h // (num_q_heads // num_kv_heads)``.
        kv_policy: "any", "all" or "none" (see the module docstring).
        model_family: the Hugging Face ``model_type`` the plan was made for
            ("llama", "gpt2", ...). None is allowed for a plan under construction, but
            :func:`headsparse.patch` refuses it (it could not check the plan fits the kind of model).
    """

    def __init__(
        self,
        modes: Sequence[Sequence],
        num_kv_heads: Optional[int] = None,
        kv_policy: str = "any",
        model_family: Optional[str] = None,
    ) -> None:
        if isinstance(modes, (str, bytes)) or not isinstance(modes, Iterable):
            raise ValueError(f"modes must be a sequence of per-layer sequences of head modes, got {type(modes).__name__}")
        layers = [[HeadMode.parse(m) for m in layer] for layer in modes]
        if not layers:
            raise ValueError("modes must hold at least one layer")
        nq = len(layers[0])
        if nq == 0:
            raise ValueError("modes: layer 0 has no heads")
        for i, layer in enumerate(layers):
            if len(layer) != nq:
                raise ValueError(f"modes: layer {i} has {len(layer)} heads but layer 0 has {nq}; every layer needs the same count")
        if num_kv_heads is None:
            num_kv_heads = nq
        if nq % check_int("num_kv_heads", num_kv_heads, lo=1, hint=f"a divisor of the {nq} query heads"):
            raise ValueError(f"num_kv_heads must be a positive divisor of the {nq} query heads, got {num_kv_heads!r}")
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
        if model_family is not None and not isinstance(model_family, str):
            raise ValueError(f"model_family must be a string or None, got {type(model_family).__name__}")
        self.modes: List[List[HeadMode]] = layers
        self.num_kv_heads = num_kv_heads
        self.kv_policy = kv_policy
        self.model_family = model_family

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return len(self.modes)

    @property
    def num_q_heads(self) -> int:
        return len(self.modes[0])

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def kv_of(self, head: int) -> int:
        """The KV head read by query head ``head``."""
        return head // self.group_size

    def _layer(self, layer: int) -> List[HeadMode]:
        return self.modes[check_int("layer", layer, 0, self.num_layers - 1)]

    def heads(self, layer: int, mode) -> List[int]:
        """Query heads of ``layer`` in ``mode``."""
        mode = HeadMode.parse(mode)
        return [h for h, m in enumerate(self._layer(layer)) if m == mode]

    def train_mask(self, layer: int) -> torch.Tensor:
        return torch.tensor([m == HeadMode.TRAIN for m in self._layer(layer)], dtype=torch.bool)

    def pruned_mask(self, layer: int) -> torch.Tensor:
        return torch.tensor([m == HeadMode.PRUNED for m in self._layer(layer)], dtype=torch.bool)

    def kv_trainable(self, layer: int) -> List[bool]:
        """For each KV head of ``layer``: are its K/V rows trainable (per the KV policy)?"""
        modes = self._layer(layer)
        out = []
        for g in range(self.num_kv_heads):
            group = [m for m in modes[g * self.group_size:(g + 1) * self.group_size] if m != HeadMode.PRUNED]
            if self.kv_policy == "none" or not group:
                out.append(False)
            elif self.kv_policy == "any":
                out.append(any(m == HeadMode.TRAIN for m in group))
            else:
                out.append(all(m == HeadMode.TRAIN for m in group))
        return out

    def kv_pruned(self, layer: int) -> List[bool]:
        """For each KV head: are all query heads of its group pruned (so it can be removed)?"""
        modes = self._layer(layer)
        return [all(m == HeadMode.PRUNED for m in modes[g * self.group_size:(g + 1) * self.group_size])
                for g in range(self.num_kv_heads)]

    def layer_has_trainable(self, layer: int) -> bool:
        return any(m == HeadMode.TRAIN for m in self._layer(layer)) or any(self.kv_trainable(layer))

    @property
    def lowest_trainable_layer(self) -> Optional[int]:
        """Index of the lowest layer holding anything trainable, or None if nothing trains."""
        for i in range(self.num_layers):
            if self.layer_has_trainable(i):
                return i
        return None

    @property
    def gradient_horizon(self) -> int:
        """How many layers, from the bottom, run without an autograd graph once patched (no graph, no saved
        activations): the lowest trainable layer's index, or every layer when nothing trains. (A module named in
        ``patch``'s ``train_modules`` can lower it.)"""
        lowest = self.lowest_trainable_layer
        return self.num_layers if lowest is None else lowest

    def horizon_text(self) -> str:
        """The gradient horizon in words (a line of :meth:`summary`)."""
        h = self.gradient_horizon
        if h == 0:
            return "gradient horizon: none (layer 0 trains: every layer keeps its autograd graph)"
        if h == self.num_layers:
            return "gradient horizon: every layer (nothing trains)"
        return (f"gradient horizon: layer {h} (layers 0-{h - 1}, {h} of {self.num_layers}, run without an autograd "
                f"graph: no activations saved, no backward)")

    def count(self, mode) -> int:
        mode = HeadMode.parse(mode)
        return sum(m == mode for layer in self.modes for m in layer)

    @property
    def trainable_fraction(self) -> float:
        """Fraction of all query heads that are TRAIN."""
        return self.count(HeadMode.TRAIN) / (self.num_layers * self.num_q_heads)

    @property
    def pruned_fraction(self) -> float:
        return self.count(HeadMode.PRUNED) / (self.num_layers * self.num_q_heads)

    # ----------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, num_layers: int, num_q_heads: int, num_kv_heads: Optional[int] = None, mode="train",
                kv_policy: str = "any", model_family: Optional[str] = None) -> "HeadPlan":
        """Every head of every layer in one mode."""
        for name, v in (("num_layers", num_layers), ("num_q_heads", num_q_heads)):
            check_int(name, v, 1)
        m = HeadMode.parse(mode)
        return cls([[m] * num_q_heads for _ in range(num_layers)], num_kv_heads, kv_policy, model_family)

    @classmethod
    def for_model(cls, model, mode="train", kv_policy: str = "any") -> "HeadPlan":
        """A uniform plan shaped for a Hugging Face ``model``."""
        family, nl, nq, nkv = _model_shape(model)  # the patch layer's reader (register_model_shape)
        return cls.uniform(nl, nq, nkv, mode, kv_policy, family)

    @classmethod
    def from_scores(
        cls,
        scores,
        *,
        fraction: Optional[float] = None,
        per_layer_k: Optional[int] = None,
        prune_fraction: Optional[float] = None,
        prune_threshold: Optional[float] = None,
        layers: Optional[Iterable[int]] = None,
        num_kv_heads: Optional[int] = None,
        kv_policy: str = "any",
        model_family: Optional[str] = None,
        **deprecated,
    ) -> "HeadPlan":
        """Build a plan from per-head importance scores (higher = more important).

        Args:
            scores: the :class:`headsparse.HeadScores` that :func:`headsparse.score_heads` returns (its
                ``num_kv_heads`` and ``model_family`` are taken from it), or a (num_layers, num_q_heads)
                array-like of finite numbers (then pass ``num_kv_heads`` and ``model_family`` yourself).
            fraction: TRAIN the highest-scoring heads, as many as this fraction of all the model's heads
                (at least one when > 0), or
            per_layer_k: TRAIN the k highest-scoring heads of every (allowed) layer.
                Exactly one of the two must be given.
            layers: placement: the layers that may hold TRAIN heads (default: all), for example
                ``range(num_layers // 2, num_layers)`` for the top half. The lowest of them is the lowest layer
                that can train, so everything below it runs without an autograd graph (the gradient horizon).
                With ``fraction`` the same number of heads is chosen, among these layers only.
            prune_fraction: PRUNE the globally lowest-scoring fraction of heads
                (never a TRAIN head), and/or
            prune_threshold: PRUNE every non-TRAIN head scoring below it.
            Everything else is FROZEN. Ties break towards the lower layer/head index.

        ``top_fraction`` and ``top_k_per_layer`` are deprecated names of ``fraction`` and ``per_layer_k``.
        """
        fraction, per_layer_k = _renamed(deprecated, fraction, per_layer_k)
        if _is_head_scores(scores):
            for name, given, own in (("num_kv_heads", num_kv_heads, scores.num_kv_heads),
                                     ("model_family", model_family, scores.model_family)):
                if given is not None and own is not None and given != own:
                    raise ValueError(f"{name}={given!r} disagrees with the HeadScores, which were computed on a "
                                     f"model with {name}={own!r}; leave {name} out to take it from the scores")
            num_kv_heads = scores.num_kv_heads if num_kv_heads is None else num_kv_heads
            model_family = scores.model_family if model_family is None else model_family
            scores = scores.scores
        try:
            s = torch.as_tensor(scores, dtype=torch.float64)
        except Exception as exc:
            raise ValueError(f"scores must be the HeadScores that headsparse.score_heads returns, or a "
                             f"(num_layers, num_q_heads) array of numbers: {exc}") from None
        if s.dim() != 2 or s.shape[0] == 0 or s.shape[1] == 0:
            raise ValueError(f"scores must have shape (num_layers, num_q_heads), got {tuple(s.shape)}")
        if not torch.isfinite(s).all():
            raise ValueError("scores must be finite (no NaN or inf)")
        if (fraction is None) == (per_layer_k is None):
            raise ValueError("give exactly one of fraction and per_layer_k")
        nl, nq = s.shape
        total = nl * nq
        allowed = _layer_set("layers", layers, nl)
        train = torch.zeros(nl, nq, dtype=torch.bool)
        if fraction is not None:
            check_number("fraction", fraction, 0, 1)
            k = 0 if fraction == 0 else max(1, int(round(fraction * total)))
            room = len(allowed) * nq
            if k > room:
                raise ValueError(f"fraction={fraction} asks for {k} TRAIN heads but layers={_show(layers)} hold only "
                                 f"{room} heads; lower the fraction or allow more layers")
            order = [i for i in _stable_order(s.flatten(), descending=True) if i // nq in allowed]
            train.view(-1)[order[:k]] = True
        else:
            check_int("per_layer_k", per_layer_k, 0, nq)
            for i in sorted(allowed):
                train[i, _stable_order(s[i], descending=True)[:per_layer_k]] = True
        pruned = torch.zeros_like(train)
        if prune_fraction is not None:
            check_number("prune_fraction", prune_fraction, 0, 1)
            k = int(round(prune_fraction * total))
            cand = [int(i) for i in _stable_order(s.flatten(), descending=False) if not train.view(-1)[i]]
            pruned.view(-1)[torch.tensor(cand[:k], dtype=torch.long)] = True
        if prune_threshold is not None:
            check_number("prune_threshold", prune_threshold)
            pruned |= (s < prune_threshold) & ~train
        modes = [[HeadMode.TRAIN if train[i, h] else HeadMode.PRUNED if pruned[i, h] else HeadMode.FROZEN
                  for h in range(nq)] for i in range(nl)]
        return cls(modes, num_kv_heads, kv_policy, model_family)

    # --------------------------------------------------------------- checking
    def check_model(self, model) -> None:
        """Raise ValueError naming the mismatch if this plan does not fit ``model``."""
        family, nl, nq, nkv = _model_shape(model)
        problems = []
        if self.model_family is not None and self.model_family != family:
            problems.append(f"model family: plan is for {self.model_family!r}, model is {family!r}")
        if self.num_layers != nl:
            problems.append(f"num layers: plan has {self.num_layers}, model has {nl}")
        if self.num_q_heads != nq:
            problems.append(f"query heads per layer: plan has {self.num_q_heads}, model has {nq}")
        if self.num_kv_heads != nkv:
            problems.append(f"KV heads per layer: plan has {self.num_kv_heads}, model has {nkv}")
        if problems:
            raise ValueError("plan does not fit the model: " + "; ".join(problems))

    # ----------------------------------------------------------- persistence
    def to_dict(self) -> Dict:
        return {
            "format": "headsparse.HeadPlan",
            "version": _FORMAT_VERSION,
            "model_family": self.model_family,
            "num_layers": self.num_layers,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "kv_policy": self.kv_policy,
            "modes": ["".join(_SYMBOL[m] for m in layer) for layer in self.modes],
        }

    @classmethod
    def from_dict(cls, d: Dict) -> "HeadPlan":
        if not isinstance(d, dict) or d.get("format") != "headsparse.HeadPlan":
            raise ValueError("not a headsparse HeadPlan (missing format='headsparse.HeadPlan')")
        if d.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported HeadPlan version {d.get('version')!r}; this headsparse reads {_FORMAT_VERSION}")
        inverse = {v: k for k, v in _SYMBOL.items()}
        try:
            modes = [[inverse[c] for c in row] for row in d["modes"]]
        except KeyError as exc:
            raise ValueError(f"HeadPlan modes may only hold 'T', '.', 'x', got {exc}") from None
        plan = cls(modes, d.get("num_kv_heads"), d.get("kv_policy", "any"), d.get("model_family"))
        for key, val in (("num_layers", plan.num_layers), ("num_q_heads", plan.num_q_heads)):
            if key in d and d[key] != val:
                raise ValueError(f"HeadPlan file says {key}={d[key]} but its modes have {val}")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "HeadPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"HeadPlan JSON does not parse: {exc}") from None
        return cls.from_dict(d)

    def save(self, path) -> None:
        """Write the plan as JSON (to a temporary file in the same folder, then renamed)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path) -> "HeadPlan":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HeadPlan file {path!r} does not exist (expected JSON written by HeadPlan.save)")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{path!r} is not a HeadPlan file: expected UTF-8 JSON written by HeadPlan.save, "
                             "got binary data (a delta file? read its plan with headsparse.patch.read_delta_plan)") from None
        try:
            return cls.from_json(text)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path!r} is not a valid HeadPlan file (expected JSON written by HeadPlan.save): "
                             f"{exc}") from None

    # ----------------------------------------------------------------- display
    def summary(self) -> str:
        """One line per layer: T = train, . = frozen, x = pruned, then the KV heads' trainability."""
        lines = [
            f"HeadPlan family={self.model_family or 'any'} layers={self.num_layers} q_heads={self.num_q_heads} "
            f"kv_heads={self.num_kv_heads} kv_policy={self.kv_policy}",
            f"train {self.count('train')} ({100 * self.trainable_fraction:.1f}%), "
            f"frozen {self.count('frozen')}, pruned {self.count('pruned')}; "
            f"lowest trainable layer: {self.lowest_trainable_layer}",
            self.horizon_text(),
        ]
        width = len(str(self.num_layers - 1))
        for i, layer in enumerate(self.modes):
            kv = "".join("T" if t else ("x" if p else ".") for t, p in zip(self.kv_trainable(i), self.kv_pruned(i)))
            lines.append(f"layer {i:>{width}}: {''.join(_SYMBOL[m] for m in layer)}  kv {kv}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"HeadPlan(layers={self.num_layers}, q_heads={self.num_q_heads}, kv_heads={self.num_kv_heads}, "
                f"train={self.count('train')}, pruned={self.count('pruned')}, family={self.model_family!r})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, HeadPlan):
            return NotImplemented
        return (self.modes == other.modes and self.num_kv_heads == other.num_kv_heads
                and self.kv_policy == other.kv_policy and self.model_family == other.model_family)

    __hash__ = None


_RENAMED = {"top_fraction": "fraction", "top_k_per_layer": "per_layer_k"}


def _renamed(deprecated: Dict, fraction, per_layer_k):
    """(fraction, per_layer_k) with the deprecated names folded in (a FutureWarning each); any other keyword is an
    error naming the accepted ones."""
    import warnings

    values = {"fraction": fraction, "per_layer_k": per_layer_k}
    for old, value in deprecated.items():
        new = _RENAMED.get(old)
        if new is None:
            raise TypeError(f"HeadPlan.from_scores got an unexpected keyword argument {old!r}; it takes fraction, "
                            "per_layer_k, prune_fraction, prune_threshold, layers, num_kv_heads, kv_policy, model_family")
        if values[new] is not None:
            raise ValueError(f"give {new} only ({old} is its deprecated name), not both")
        warnings.warn(f"HeadPlan.from_scores: {old}= is deprecated, use {new}= (the name HeadScores.to_plan and "
                      f"`headsparse score` use)", FutureWarning, stacklevel=3)
        values[new] = value
    return values["fraction"], values["per_layer_k"]


def _is_head_scores(x) -> bool:
    """A HeadScores (recipes layer; recognised by its fields, so the plan does not import the recipes)."""
    return isinstance(getattr(x, "scores", None), torch.Tensor) and hasattr(x, "model_family") and hasattr(x, "method")


def _show(layers) -> str:
    return f"range({layers.start}, {layers.stop})" if isinstance(layers, range) and layers.step == 1 else repr(layers)


def _layer_set(name: str, layers, num_layers: int) -> set:
    """The layer indices in ``layers`` (None = all) as a set, each checked to be in [0, num_layers)."""
    if layers is None:
        return set(range(num_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"{name} must be an iterable of layer indices such as range({num_layers // 2}, "
                         f"{num_layers}), got {layers!r}")
    out = {check_int(name, i, 0, num_layers - 1) for i in layers}
    if not out:
        raise ValueError(f"{name} must name at least one layer, got {_show(layers)}")
    return out


def _stable_order(x: torch.Tensor, descending: bool) -> List[int]:
    """Indices sorting x, ties broken by index (lower index first)."""
    vals = x.tolist()
    return sorted(range(len(vals)), key=lambda i: (-vals[i] if descending else vals[i], i))
