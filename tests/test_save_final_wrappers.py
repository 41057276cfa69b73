"""save_final / gather_* on a patched model inside a wrapper that forwards unknown attributes to the model
(DeepSpeed's engine, torch.compile's OptimizedModule): the outputs are the inner model's, under its own names."""
import pytest
import torch
from torch import nn

import headsparse as hs
from headsparse.patch import gather_trainable, save_final
from _hs_models import batch, tiny_model

MODES = [["f"] * 4, ["f", "t", "f", "p"], ["t", "f", "f", "t"]]


class EngineLike(nn.Module):
    """The model under ``module``, with DeepSpeedEngine's pass-through ``__getattr__`` (engine.py)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["module"], name)


@pytest.mark.parametrize("wrap", ["engine", "compile"])
def test_save_final_through_a_forwarding_wrapper(wrap, tmp_path):
    model = hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2),
                     train_modules=("lm_head",))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    wrapped = EngineLike(model) if wrap == "engine" else torch.compile(model)
    assert gather_trainable(wrapped).keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    save_final(wrapped, tmp_path / "final", delta=tmp_path / "delta.safetensors")
    ids = batch(model, b=2, s=9, seed=5)
    want = model(input_ids=ids).logits
    stock = type(model).from_pretrained(tmp_path / "final", dtype=torch.float32)
    assert set(stock.state_dict()) == set(model.state_dict())
    torch.testing.assert_close(stock(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    base = tiny_model("llama", dtype=torch.float32)
    hs.load_delta(base, tmp_path / "delta.safetensors")
    torch.testing.assert_close(base(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_save_delta_refuses_zero3_partitioned_parameters(tmp_path):
    """Under ZeRO-3 a parameter's data is an empty placeholder between forwards: save_delta would write empty
    tensors. It refuses and names save_final, as it does for FSDP2 DTensors."""
    from types import SimpleNamespace

    model = hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2))
    for i, p in enumerate(model.parameters()):  # what deepspeed.zero.Init leaves on every parameter it partitions
        p.ds_id, p.ds_status, p.ds_shape = i, SimpleNamespace(name="NOT_AVAILABLE"), p.shape
        p.data = torch.empty(0, dtype=p.dtype)
    with pytest.raises(ValueError, match="save_final"):
        hs.save_delta(model, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []
