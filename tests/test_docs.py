"""The Python code on the documentation pages runs.

Every ```python block of README.md and docs/*.md is executed here, on tiny models, unless the line directly above
its fence is an HTML comment giving the reason it cannot run (the comment is invisible on the rendered page):

    <!-- not-run: needs a CUDA GPU -->

A not-run block must still compile. A renamed argument in a documented call then fails this test, not a user.

How tiny models stand in (the mechanism docs/hf_integration.md describes):

- ``HEADSPARSE_CACHE`` points at a temporary folder whose ``smollm2/`` holds a tiny random Llama with a word-level
  tokenizer, so ``headsparse.smollm2_dir()`` returns it instead of converting SmolLM2-135M (the same cache lookup a
  real run does);
- a name a snippet uses without defining it (``model``, ``data``, ``pool``, ...) gets a tiny value from its page's
  entry in ``GIVEN`` below;
- the blocks of one page run in order in one namespace, in a temporary working directory.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def code_blocks(path: pathlib.Path):
    """(first line number, language, code, not-run reason or None) of every fenced block of a page."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group("lang"):
            i += 1
            continue
        indent, start = m.group("indent"), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        code = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j])
        marker = NOT_RUN.match(lines[start - 1]) if start else None
        out.append((start + 1, m.group("lang"), code, marker.group("reason") if marker else None))
        i = j + 1
    return out


# ----------------------------------------------------------------------------------------- the stand-ins
def _words() -> list:
    """Every word and punctuation mark on the pages: a word-level vocabulary that knows the snippets' text."""
    from tokenizers.pre_tokenizers import Whitespace

    seen = {}
    for page in PAGES:
        for word, _ in Whitespace().pre_tokenize_str(page.read_text(encoding="utf-8")):
            seen.setdefault(word, None)
    return list(seen)


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory) -> pathlib.Path:
    """A HEADSPARSE_CACHE folder whose smollm2/ is a tiny random Llama with a word-level tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cache = tmp_path_factory.mktemp("hs-cache")
    folder = cache / "smollm2"
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + _words())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                               bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return cache


def _tiny_llama():
    from headsparse.recipes.tasks import tiny_llama

    return tiny_llama(seed=0).eval()


def _batches(n=2, b=2, s=12, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (b, s), generator=g)} for _ in range(n)]


def _readme():
    import headsparse as hs

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 16, 64, generator=g).requires_grad_()
    k = torch.randn(2, 2, 16, 64, generator=g).requires_grad_()
    v = torch.randn(2, 2, 16, 64, generator=g).requires_grad_()
    return dict(hs=hs, torch=torch, q=q, k=k, v=v, target=torch.randn(2, 8, 16, 64, generator=g))


def _scoring():
    return dict(model=_tiny_llama(), data=_batches())


def _pipeline():
    from headsparse.recipes.data import collate
    from headsparse.recipes.tasks import synthetic_task

    task = synthetic_task(n_pool=40, n_targets=8, n_target_set=4, n_eval=4, seed=0)
    return dict(model=_tiny_llama(), pool=task.pool, target_examples=task.target,
                target_batches=[collate(task.target, 0)],
                t_select=1.0, t_train=2.0, t_full=30.0, q=0.8, q_full=0.9, q_base=0.2)


def _apt():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, num_labels=2,
                                  attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(16):
        ids = torch.randint(3, 200, (8,), generator=g).tolist()
        examples.append({"input_ids": ids, "label": ids[0] % 2})

    def dev_accuracy(m):
        m.eval()
        with torch.no_grad():
            ids = torch.tensor([e["input_ids"] for e in examples])
            pred = m(input_ids=ids).logits.argmax(-1)
        return float((pred == torch.tensor([e["label"] for e in examples])).float().mean())

    return dict(model=transformers.BertForSequenceClassification(cfg), train_examples=examples,
                dev_accuracy=dev_accuracy)


def _extension():
    g = torch.Generator().manual_seed(0)
    B, S, H, D = 2, 10, 4, 16
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 7:] = False
    return dict(X=torch.randn(B, S, H * D, generator=g), G=torch.randn(B, S, H * D, generator=g), mask=mask, H=H)


GIVEN = {"README.md": _readme, "scoring.md": _scoring, "pipeline.md": _pipeline, "apt.md": _apt,
         "extension.md": _extension}


# ---------------------------------------------------------------------------------------------- tests
def _python(path):
    return [b for b in code_blocks(path) if b[1] == "python"]


def test_the_pages_have_code_and_every_marker_gives_a_reason():
    blocks = {p.name: _python(p) for p in PAGES}
    assert blocks["hf_integration.md"] and blocks["README.md"]
    assert sum(reason is None for bs in blocks.values() for *_, reason in bs) >= 5  # most of it runs
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines):
            if "not-run" in line and line.lstrip().startswith("<!--"):
                assert NOT_RUN.match(line) and NOT_RUN.match(line).group("reason"), f"{page.name}:{n + 1}: no reason"
                assert n + 1 < len(lines) and FENCE.match(lines[n + 1]), \
                    f"{page.name}:{n + 1}: a not-run marker must stand on the line directly above a code fence"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_code_runs(page, tiny_smollm2, tmp_path, monkeypatch):
    blocks = _python(page)
    if not blocks:
        pytest.skip(f"{page.name} has no python block")
    monkeypatch.setenv("HEADSPARSE_CACHE", str(tiny_smollm2))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for line, _, code, reason in blocks:
        compiled = compile(code, f"{page.name}:{line}", "exec")  # not-run blocks must still be valid Python
        if reason is not None:
            continue
        if not ran:
            ns.update(GIVEN.get(page.name, dict)())
        exec(compiled, ns)  # a failure's traceback names the page and the line of the block
        ran += 1
    if not ran:
        pytest.skip(f"every python block of {page.name} is marked not-run")
