"""torch.compile traces the op: headsparse::attention is a torch.library custom op with fake kernels and a
registered autograd; a bare call and a patched Llama's forward + backward compile with fullgraph=True and match
eager."""
import copy
import shutil

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from headsparse.ops.library import attention_op
from _hs_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
            for shape in ((2, 4, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8))]


def test_opcheck_of_the_custom_op():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    for grad, pruned, kvi, m, causal in (([1, 1, 1, 1], [0, 0, 0, 0], [], None, False),
                                         ([1, 0, 1, 0], [0, 0, 0, 1], [], mask, True),
                                         ([0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], None, True)):
        torch.library.opcheck(attention_op, (q, k, v, m, grad, pruned, kvi, causal, 0.35, "torch"))


@pytest.mark.parametrize("case", ["all heads", "plan + mask + causal", "ragged kv index"])
def test_compiled_bare_call_matches_eager(case):
    q, k, v = _qkv(seed=2)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    kw = {"all heads": {},
          "plan + mask + causal": dict(grad_heads=[True, False, True, False], pruned_heads=[False, False, False, True],
                                       attention_mask=mask, causal=True),
          "ragged kv index": dict(pruned_heads=[True, False, False, False], kv_head_index=[1, 1, 0, 0])}[case]

    def f(q, k, v):
        return hs.attention(q, k, v, backend="torch", **kw)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c, out_e = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    cot = torch.randn(out_e.shape, dtype=out_e.dtype, generator=torch.Generator().manual_seed(4))
    for gc, ge in zip(torch.autograd.grad(out_c, (q, k, v), cot), torch.autograd.grad(out_e, (q, k, v), cot)):
        torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-12)


def test_opcheck_on_the_sdpa_path(monkeypatch):
    """The custom op's checks (fake kernel, autograd registration, AOT dispatch) with the torch backend on its sdpa
    path, the one a CUDA device takes by default."""
    monkeypatch.setenv("HEADSPARSE_TORCH_PATH", "sdpa")
    q, k, v = _qkv(torch.float32)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    for grad, pruned, m, causal in (([1, 1, 1, 1], [0, 0, 0, 0], None, False), ([1, 0, 1, 0], [0, 0, 0, 1], mask, True)):
        torch.library.opcheck(attention_op, (q, k, v, m, grad, pruned, [], causal, 0.35, "torch"))


# "sdpa": the torch backend's path on PyTorch's public SDPA, which CUDA takes by default (forced here on CPU)
@pytest.mark.parametrize("path", ["auto", "sdpa"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_patched_llama_forward_and_backward_match_eager(backend, path, monkeypatch):
    if backend == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler on CPU")
    monkeypatch.setenv("HEADSPARSE_TORCH_PATH", path)
    ref = tiny_model("llama", dtype=torch.float32)
    plan = HeadPlan([["t", "f", "f", "p"], ["f", "t", "f", "f"], ["f", "f", "t", "t"]], num_kv_heads=2, model_family="llama")
    eager, comp = hs.patch(copy.deepcopy(ref), plan), hs.patch(copy.deepcopy(ref), plan)
    ids = batch(ref)
    torch._dynamo.reset()
    compiled = torch.compile(comp, fullgraph=True, backend=backend)
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_e = eager(input_ids=ids, labels=ids).loss
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    grads = [(a.grad, b.grad) for a, b in zip(comp.parameters(), eager.parameters()) if b.grad is not None]
    assert len(grads) == sum(p.requires_grad for p in eager.parameters()) > 0
    for gc, ge in grads:
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


def test_gate_recorder_is_refused_under_compile():
    q, k, v = _qkv()
    f = torch.compile(lambda q, k, v: hs.attention(q, k, v), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with hs.record_gate_grads():
        with pytest.raises(Exception, match="not supported inside torch.compile"):
            f(q, k, v)


def test_head_masks_as_python_lists_in_eager_mode():
    q, k, v = _qkv(seed=5)
    as_list = hs.attention(q, k, v, grad_heads=[True, False, True, True], pruned_heads=[False, True, False, False])
    as_tensor = hs.attention(q, k, v, grad_heads=torch.tensor([True, False, True, True]),
                             pruned_heads=torch.tensor([False, True, False, False]))
    assert torch.equal(as_list, as_tensor)
    with pytest.raises(ValueError, match="4 bools"):
        hs.attention(q, k, v, grad_heads=[True, False])
