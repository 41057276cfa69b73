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
    model = hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"),
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

    model = hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"))
    for i, p in enumerate(model.parameters()):  # what deepspeed.zero.Init leaves on every parameter it partitions
        p.ds_id, p.ds_status, p.ds_shape = i, SimpleNamespace(name="NOT_AVAILABLE"), p.shape
        p.data = torch.empty(0, dtype=p.dtype)
    with pytest.raises(ValueError, match="save_final"):
        hs.save_delta(model, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_zero3_placeholder_load_keeps_the_whole_persistent_parameters():
    """ZeRO-3 keeps small parameters whole ("persistent", ds_status AVAILABLE) while the others are partitioned. A
    placeholder state dict loaded then must not write uninitialised memory into the whole ones."""
    from types import SimpleNamespace

    model = hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"))
    attn = model.model.layers[1].self_attn
    loaded_layer = []
    for i, (n, p) in enumerate(model.named_parameters()):
        p.ds_id, p.ds_shape = i, p.shape
        if p is attn.q_proj.weight_frozen:  # the one partitioned parameter of the layer's projections
            p.ds_status = SimpleNamespace(name="NOT_AVAILABLE")
            p.data = torch.empty(0, dtype=p.dtype)
        else:
            p.ds_status = SimpleNamespace(name="AVAILABLE")
            loaded_layer += [p] if ".layers.1.self_attn." in n else []
    sd = model.state_dict()
    assert sd["model.layers.1.self_attn.q_proj.weight"].numel() == 0  # placeholders under the stock keys
    with torch.no_grad():
        for p in loaded_layer:
            p.fill_(0.5)
    model.load_state_dict(sd)
    for p in loaded_layer:  # the whole ones keep their values (before: uninitialised memory was copied in)
        assert (p == 0.5).all()


def _failing_writer_worker(rank, port, out_dir):
    import os

    from _hs_dist import worker_exit

    def body():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        model = hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"))
        blocker = os.path.join(out_dir, "a-file")  # rank 0 cannot make a folder under a file: its write fails
        try:
            save_final(model, os.path.join(blocker, "final"))
            seen = "returned"
        except Exception as exc:  # noqa: BLE001 - the test reads which error each rank got
            seen = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(seen)

    worker_exit(body)


def test_save_final_failure_on_the_writer_reaches_every_rank(tmp_path):
    """The writing rank fails: it raises its own error, the other ranks raise RuntimeError naming it, none hangs."""
    from _hs_dist import free_port, need_gloo, spawn_with_deadline

    need_gloo()
    (tmp_path / "a-file").write_text("not a folder")
    spawn_with_deadline(_failing_writer_worker, (free_port(), str(tmp_path)), deadline_s=120, what="workers")
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert rank0.startswith(("NotADirectoryError", "FileExistsError")), rank0
    assert rank1.startswith("RuntimeError: headsparse.save_final: rank 0 failed"), rank1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "rank0.txt", "rank1.txt"]


def test_zero3_state_dict_on_a_non_writing_rank_keeps_no_layer_copies(monkeypatch):
    """gather_standard_state_dict(keep=False) under ZeRO-3 (every rank takes part, one writes): the non-writing ranks
    must not hold a CPU copy of every decoder layer until the end (a whole model per rank)."""
    import contextlib
    from types import SimpleNamespace

    import headsparse.patch.distributed as hs_dist
    from headsparse.patch import gather_standard_state_dict

    model = hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"))
    for i, p in enumerate(model.parameters()):  # ZeRO-3 parameters, gathered (the gather itself is faked below)
        p.ds_id, p.ds_status = i, SimpleNamespace(name="AVAILABLE")
    monkeypatch.setattr(hs_dist, "_gathered_parameters", lambda params: contextlib.nullcontext())
    built = []
    state_dict = type(model).state_dict
    monkeypatch.setattr(type(model), "state_dict", lambda self, *a, **k: built.append(state_dict(self, *a, **k))
                        or built[-1])
    full = gather_standard_state_dict(model)
    assert set(full) == set(model.state_dict()) and any(".layers." in k for k in full)
    built.clear()
    assert gather_standard_state_dict(model, keep=False) == {}
    assert [k for k in built[0] if ".layers." in k] == []
