"""FSDP2 with a bf16 mixed-precision policy on a patched model (two gloo processes on the CPU): the all-gathered
sliced and frozen blocks compute in bf16, gradients are reduced in fp32 into fp32 trainable shards, frozen blocks get
none, and the result equals one process that runs each rank's half batch with bf16 copies of the parameters and
averages the fp32-cast gradients (the same arithmetic, done by hand)."""
import copy

import pytest
import torch

import headsparse as hs
from headsparse.patch import gather_trainable
from _hs_dist import init_gloo, run_rank_workers, save_rank_record, worker_exit
from _hs_models import batch, tiny_model

MODES = [["f"] * 4, ["f", "t", "f", "p"], ["t", "f", "f", "t"]]
STEPS, LR = 3, 5.0


def _make():
    model = tiny_model("llama", dtype=torch.float32)
    return hs.patch(model, hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"))


def _halves(model):
    ids = batch(model, b=4, s=10)
    return ids[:2], ids[2:]


def _by_hand():
    """fp32 master weights; each step: per half batch, a bf16 copy of the parameters (buffers stay fp32, as FSDP2's
    param_dtype casts parameters only) runs forward and backward; the fp32-cast gradients are averaged; SGD."""
    master = _make()
    halves = _halves(master)
    trainable = [n for n, p in master.named_parameters() if p.requires_grad]
    losses = []
    for _ in range(STEPS):
        grads, step_loss = {n: torch.zeros_like(p) for n, p in master.named_parameters() if p.requires_grad}, 0.0
        for ids in halves:
            work = copy.deepcopy(master)
            for p in work.parameters():
                p.data = p.data.to(torch.bfloat16)
            loss = work(input_ids=ids, labels=ids).loss
            loss.backward()
            for n, p in work.named_parameters():
                if p.requires_grad:
                    grads[n] += p.grad.float() / len(halves)
            step_loss += loss.float().item() / len(halves)
        with torch.no_grad():
            for n, p in master.named_parameters():
                if n in grads:
                    p -= LR * grads[n]
        losses.append(step_loss)
    return {n: p.detach() for n, p in master.named_parameters() if n in trainable}, losses


def _worker(rank, world, port, out_dir):
    def body():
        dist = init_gloo(rank, world, port)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = _make()
        ids = _halves(model)[rank]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        losses, compute_dtypes = [], set()
        seen = lambda mod, args: compute_dtypes.add(args[0].dtype)  # noqa: E731  (the o_proj input's dtype)
        model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(seen)
        for _ in range(STEPS):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        frozen_grads = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
        grad_dtypes = {p.grad.dtype for p in model.parameters() if p.grad is not None}
        shard_dtypes = {p.dtype for p in model.parameters()}
        trained = gather_trainable(model)
        save_rank_record(out_dir, rank, {"losses": losses, "trained": trained, "frozen_grads": frozen_grads,
                                         "grad_dtypes": grad_dtypes, "shard_dtypes": shard_dtypes,
                                         "compute_dtypes": compute_dtypes})

    worker_exit(body)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    return run_rank_workers(_worker, tmp_path_factory, "fsdp-bf16", "FSDP2 bf16 workers")[1]


def test_fsdp2_bf16_policy_computes_in_bf16_and_keeps_fp32_shards(mixed_run):
    for r in mixed_run:
        assert r["compute_dtypes"] == {torch.bfloat16}
        assert r["shard_dtypes"] == {torch.float32} and r["grad_dtypes"] == {torch.float32}
        assert r["frozen_grads"] == 0


def test_fsdp2_bf16_policy_equals_the_same_arithmetic_by_hand(mixed_run):
    trained, losses = _by_hand()
    start = {n: p.detach() for n, p in _make().named_parameters() if p.requires_grad}
    torch.testing.assert_close(mixed_run[0]["losses"], losses, rtol=1e-5, atol=1e-5)
    for r in mixed_run:
        assert r["trained"].keys() == trained.keys() and len(trained) == 8
        for n, p in trained.items():
            assert (p - start[n]).abs().max() > 1e-3  # it trained, by more than the tolerance below
            torch.testing.assert_close(r["trained"][n], p, rtol=1e-5, atol=1e-5, msg=n)
