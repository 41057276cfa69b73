"""Frozen-prefix cache under DDP (2 gloo processes, CPU): each rank caches its own examples, and the losses and
trained slices equal those of the same DDP run without the cache."""
import torch

from _hs_dist import init_gloo, run_rank_workers, save_rank_record, worker_exit

MODES = [["f"] * 4, ["f", "p", "f", "f"], ["t", "f", "f", "f"], ["f", "t", "f", "f"]]


def _run(rank, cached):
    import headsparse as hs
    from torch.nn.parallel import DistributedDataParallel as DDP

    from _hs_models import tiny_model

    model = hs.patch(tiny_model("llama", layers=4), hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"))
    cache = hs.PrefixCache().attach(model) if cached else None
    ddp = DDP(model)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own examples
    ids = torch.randint(3, 1000, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in one example
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for epoch in range(3):
        for s in (0, 2):
            opt.zero_grad()
            loss = ddp(input_ids=ids[s:s + 2], attention_mask=mask[s:s + 2], labels=labels[s:s + 2]).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
    slices = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), slices, (None if cache is None else cache.stats())


def _worker(rank, world, port, out):
    def body():
        init_gloo(rank, world, port)
        plain = _run(rank, False)
        cached = _run(rank, True)
        save_rank_record(out, rank, {"plain": plain, "cached": cached})

    worker_exit(body)


def test_ddp_two_ranks_cached_equals_uncached(tmp_path_factory):
    _, records = run_rank_workers(_worker, tmp_path_factory, "prefix_ddp", "prefix-cache DDP workers",
                                  deadline_s=240)
    for rec in records:
        (l0, s0, _), (l1, s1, st) = rec["plain"], rec["cached"]
        torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
        for n in s0:
            torch.testing.assert_close(s1[n], s0[n], rtol=1e-10, atol=1e-10)
        assert st["misses"] == 2 and st["hits"] == 4 and st["entries"] == 4  # its own 4 examples only
    assert not torch.equal(records[0]["plain"][0], records[1]["plain"][0])  # the ranks saw different data
