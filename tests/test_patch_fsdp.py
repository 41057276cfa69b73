"""FSDP2 (``fully_shard`` per decoder layer, two gloo processes on the CPU) on a patched model: same losses and
trained slices as one process on the whole batch, frozen blocks outside the optimizer, per-rank gradient and
optimizer bytes = the trainable slices' share; state_dict / load_state_dict and the rank-0 final outputs."""
import os

import pytest
import torch

import headsparse as hs
import headsparse.patch.linear as hs_linear
from headsparse.patch import gather_standard_state_dict, gather_trainable, save_final
from _hs_dist import (check_final_outputs, init_gloo, local_bytes, rank_bytes, run_rank_workers, save_rank_record,
                      train_steps, worker_exit)
from _hs_models import batch, tiny_model

# The single-process reference runs on one thread, as each worker does (init_gloo), so that the reductions inside
# the kernels add in one order whatever else the machine runs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# layer 0 frozen; layer 1 one TRAIN head and one pruned head; layer 2 two TRAIN heads (uneven shards: 1 and 3 rows
# of heads do not split evenly over 2 ranks for every block)
MODES = [["f"] * 4, ["f", "t", "f", "p"], ["t", "f", "f", "t"]]
STEPS = 3


def _make():
    model = tiny_model("llama", dtype=torch.float32)
    plan = hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama")
    return hs.patch(model, plan), plan


def _single_run():
    model, _ = _make()
    ids = batch(model, b=4, s=10)
    opt, losses = train_steps(model, [ids] * STEPS, 1e-2)
    return model, [x.item() for x in losses], rank_bytes(model, opt)


def _worker(rank, world, port, out_dir):
    def body():
        dist = init_gloo(rank, world, port)
        from torch.distributed.fsdp import fully_shard

        model, _ = _make()
        ids = batch(model, b=4, s=10)[rank * 2:(rank + 1) * 2]
        for layer in model.model.layers:  # patch first, then shard: per decoder layer, then the root
            fully_shard(layer)
        fully_shard(model)
        opt, local = train_steps(model, [ids] * STEPS, 1e-2)
        losses = []
        for mean in local:
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        counts = rank_bytes(model, opt)
        sd = gather_standard_state_dict(model)  # every rank: collectives
        trained = gather_trainable(model)
        # a stock (full) state dict into a sharded patched model, through torch.distributed.checkpoint's API
        fresh, _ = _make()
        for layer in fresh.model.layers:
            fully_shard(layer)
        fully_shard(fresh)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(fresh, dict(sd), options=StateDictOptions(full_state_dict=True))  # it edits the dict
        reloaded = gather_trainable(fresh)
        # rank-0-only final outputs: each rank names its own folder; only rank 0's may appear
        save_final(model, os.path.join(out_dir, f"final-rank{rank}"),
                      delta=os.path.join(out_dir, f"delta-rank{rank}.safetensors"))
        from headsparse.ops.torch_backend import fused_path

        save_rank_record(out_dir, rank, {"losses": losses, "counts": counts, "state_dict": sd, "trained": trained,
                                         "reloaded": reloaded, "path": fused_path("cpu")})

    worker_exit(body)


# "sdpa": the workers' torch backend on its path over PyTorch's public SDPA, which CUDA takes by default
@pytest.fixture(scope="module", params=["auto", "sdpa"])
def fsdp_run(tmp_path_factory, request):
    from headsparse.ops.torch_backend import PATH_ENV

    before = os.environ.get(PATH_ENV)
    os.environ[PATH_ENV] = request.param  # the spawned workers inherit it
    try:
        return run_rank_workers(_worker, tmp_path_factory, "fsdp", "FSDP2 workers")
    finally:
        if before is None:
            os.environ.pop(PATH_ENV, None)
        else:
            os.environ[PATH_ENV] = before


def test_fsdp2_matches_single_process(fsdp_run, request):
    _, ranks = fsdp_run
    expect = {"auto": "cpu-flash", "sdpa": "sdpa"}[request.node.callspec.params["fsdp_run"]]
    assert [r["path"] for r in ranks] == [expect] * 2
    single, losses, _ = _single_run()
    torch.testing.assert_close(ranks[0]["losses"], losses, rtol=1e-5, atol=1e-5)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    trained = {n: p.detach() for n, p in single.named_parameters() if p.requires_grad}
    start, _ = _make()
    start = dict(start.named_parameters())
    for r in ranks:
        assert r["trained"].keys() == trained.keys() and len(trained) == 8
        for n, p in trained.items():
            assert not torch.equal(p, start[n])  # it trained
            torch.testing.assert_close(r["trained"][n], p, rtol=1e-5, atol=1e-5, msg=n)
    # the merged standard state dict (stock keys, stock order) equals the single-process model's
    ref = single.state_dict()
    assert list(ranks[0]["state_dict"]) == list(ref)
    for k, v in ref.items():
        torch.testing.assert_close(ranks[0]["state_dict"][k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_fsdp2_memory_is_the_trainable_share(fsdp_run):
    _, ranks = fsdp_run
    _, _, one = _single_run()
    for r in ranks:
        c = r["counts"]
        assert c["frozen_in_optimizer"] == 0 and c["frozen_with_grad"] == 0
        assert c["grad"] == c["trainable"]  # gradients only for the trainable slices' local shards
        assert c["optimizer"] == 2 * c["trainable"]  # AdamW: exp_avg + exp_avg_sq (the step counters are scalars)
        assert 0 < c["trainable"] < one["trainable"]
    # the two ranks' shards make up exactly the trainable slices of one process (no padding counted)
    assert sum(r["counts"]["trainable"] for r in ranks) == one["trainable"]
    assert sum(r["counts"]["grad"] for r in ranks) == one["grad"]
    assert sum(r["counts"]["optimizer"] for r in ranks) == one["optimizer"]
    assert one["grad"] * 10 < one["frozen"]  # and that is a small part of the model
    # each rank holds FSDP2's dim-0 chunk of every trainable slice (torch.chunk: rank 0 takes the larger half)
    single, _, _ = _single_run()
    want = [0, 0]
    for p in single.parameters():
        if p.requires_grad:
            rows, row_bytes = p.shape[0], p[0].numel() * p.element_size()
            first = min(rows, -(-rows // 2))
            want[0] += first * row_bytes
            want[1] += (rows - first) * row_bytes
    assert [r["counts"]["trainable"] for r in ranks] == want


def test_fsdp2_load_state_dict_of_a_stock_checkpoint(fsdp_run):
    _, ranks = fsdp_run
    for r in ranks:
        for n, p in r["trained"].items():
            torch.testing.assert_close(r["reloaded"][n], p, rtol=0, atol=0, msg=n)


def test_fsdp2_final_outputs_rank0_only(fsdp_run):
    out, _ = fsdp_run
    single, _, _ = _single_run()
    check_final_outputs(out, single)


def test_save_delta_refuses_sharded_parameters(monkeypatch):
    """save_delta on one rank would need a collective: it says to call save_final on every rank instead."""
    model, _ = _make()
    monkeypatch.setattr(hs_linear, "is_sharded", lambda t: t is not None)
    with pytest.raises(ValueError, match="save_final"):
        hs.save_delta(model, "/nonexistent/never-written.safetensors")


def test_save_final_is_atomic_on_failure(tmp_path, monkeypatch):
    """A failing write leaves the previous outputs as they were (checkpoint and delta, as a consistent pair) and no
    temporary file or folder behind."""
    model, _ = _make()
    final = tmp_path / "final"
    save_final(model, final, delta=tmp_path / "d.safetensors")
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    delta_before = (tmp_path / "d.safetensors").read_bytes()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)

    def broken(self, path, *a, **k):
        (pathlib_path := __import__("pathlib").Path(path)).mkdir(exist_ok=True)
        (pathlib_path / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    model.__dict__.pop("save_pretrained", None)
    with pytest.raises(OSError, match="disk full"):  # the checkpoint fails: the (changed) delta is not written
        save_final(model, final, delta=tmp_path / "d.safetensors")
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert (tmp_path / "d.safetensors").read_bytes() == delta_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "final"]


def test_weight_properties_read_like_stock_projections():
    """The sliced projections expose read-only ``weight`` / ``bias`` as a stock projection of the patched
    layout would hold them (checkpoint tools resolve state-dict keys to attributes)."""
    model, _ = _make()
    for layer in model.model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj):
            x = torch.randn(2, 5, m.in_features)
            torch.testing.assert_close(torch.nn.functional.linear(x, m.weight, m.bias), m(x), rtol=1e-6, atol=1e-6)
    ref = tiny_model("llama", dtype=torch.float32)
    sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert sd[k].shape == v.shape


@pytest.mark.parametrize("wrapper", ["fsdp2", "zero3"])
def test_patch_refuses_an_already_sharded_model(wrapper, monkeypatch):
    """Wrapping before patching is the mistake the docs warn about: patch says so instead of slicing shards."""
    import headsparse.patch.core as core

    model = tiny_model("llama", dtype=torch.float32)
    target = model.model.layers[1].self_attn.q_proj.weight
    if wrapper == "fsdp2":
        monkeypatch.setattr(core, "is_sharded", lambda t: t is target)
    else:
        target.ds_id = 7  # what DeepSpeed ZeRO-3 puts on every parameter it manages
    plan = hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama")
    with pytest.raises(ValueError, match="patch the model first, then wrap"):
        hs.patch(model, plan)
    assert not hs.patch.core.is_patched(model)  # nothing was changed
    assert all(p.requires_grad for p in model.parameters())
