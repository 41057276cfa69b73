"""A patched model through the launchers users run: ``accelerate launch`` with an FSDP2 config file, and
``transformers.Trainer`` with its FSDP2 options under torchrun, and Trainer with DeepSpeed ZeRO-2 and ZeRO-3 (skipped
without deepspeed); 2 CPU processes (gloo), each with a hard deadline.

Both save a checkpoint (DCP, sharded), resume from it, and end with ``save_final`` (standard checkpoint + delta from
rank 0 only). The worker script is tests/_hs_launch_fsdp.py. accelerate 1.15 turns FSDP off on the CPU, so the
script switches its state to FSDP as a GPU machine would have it (see ``fsdp_on_cpu`` there).
"""
import json
import os
import sys

import pytest
import torch

from _hs_dist import ROOT, check_final_outputs, free_port, need_gloo, run_with_deadline, train_steps
from _hs_models import batch, tiny_model
from headsparse.patch.core import PLAN_FILE

# The single-process references run on one thread, as each launched worker does (OMP_NUM_THREADS=1), so that the
# reductions inside the kernels add in one order whatever else the machine runs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = os.path.join(ROOT, "tests", "_hs_launch_fsdp.py")
ACCELERATE_FSDP2 = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
rdzv_backend: static
same_network: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""


def _launch(mode, out):
    need_gloo()
    pytest.importorskip("accelerate")
    if mode == "accelerate":
        cfg = out / "fsdp2.yaml"
        cfg.write_text(ACCELERATE_FSDP2)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
               "--main_process_port", str(free_port()), SCRIPT, mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), SCRIPT, mode, str(out)]
    run_with_deadline(cmd, deadline_s=300)
    reports = [json.loads((out / f"report-rank{r}.json").read_text()) for r in range(2)]
    params = [torch.load(out / f"params-rank{r}.pt") for r in range(2)]
    return out, reports, params


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    return _launch("accelerate", tmp_path_factory.mktemp("acc"))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    return _launch("trainer", tmp_path_factory.mktemp("trainer"))


def _need_deepspeed():
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed; it runs on the CPU "
                                            "with its CPU accelerator and gloo)")


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    _need_deepspeed()
    return _launch("deepspeed", tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def deepspeed3_run(tmp_path_factory):
    _need_deepspeed()
    return _launch("deepspeed3", tmp_path_factory.mktemp("ds3"))


def _make():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _hs_launch_fsdp import make

    return make()


def _single_loop():
    """One process, the same 4 steps on the whole global batch (rows 0-3, 4-7, 0-3, 4-7)."""
    from _hs_launch_fsdp import LR, data

    model = _make()
    rows = torch.stack([d["input_ids"] for d in data()])
    _, losses = train_steps(model, (rows[:4], rows[4:], rows[:4], rows[4:]), LR)
    return model, [x.item() for x in losses]


def _trained(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_accelerate_fsdp2_matches_single_and_resumes(accelerate_run):
    out, reports, params = accelerate_run
    single, losses = _single_loop()
    for rep, par in zip(reports, params):
        torch.testing.assert_close(rep["losses"], losses, rtol=1e-5, atol=1e-5)
        # load_state after step 2, then steps 3-4 again: the same losses and slices as without the interruption
        torch.testing.assert_close(rep["resumed_losses"], rep["losses"][2:], rtol=1e-6, atol=1e-6)
        want = _trained(single)
        assert par["straight"].keys() == want.keys() == par["resumed"].keys()
        for n, p in want.items():
            torch.testing.assert_close(par["straight"][n], p, rtol=1e-5, atol=1e-5, msg=n)
            torch.testing.assert_close(par["resumed"][n], par["straight"][n], rtol=1e-6, atol=1e-6, msg=n)
        c = rep["counts"]
        assert c["frozen_in_optimizer"] == 0 and c["frozen_with_grad"] == 0
        assert c["grad"] == c["trainable"] and c["optimizer"] == 2 * c["trainable"]
    total = sum(p.numel() * p.element_size() for p in _trained(single).values())
    assert sum(r["counts"]["trainable"] for r in reports) == total
    assert (out / "state" / "pytorch_model_fsdp_0" / ".metadata").exists()  # accelerate's sharded (DCP) save
    check_final_outputs(out, single)


def _single_trainer(tmp_path):
    """One process, the same Trainer on the global batch (4 = 2 processes x 2): same samples per step."""
    from transformers import Trainer, TrainingArguments
    from _hs_launch_fsdp import LR, data

    single = _make()
    args = TrainingArguments(output_dir=str(tmp_path / "one"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=LR, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, seed=0, data_seed=0, logging_steps=1,
                             disable_tqdm=True)
    trainer = Trainer(model=single, args=args, train_dataset=data())
    trainer.train()
    return single, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _check_trainer_run(run, tmp_path):
    out, reports, params = run
    single, losses = _single_trainer(tmp_path)
    want = _trained(single)
    for rep, par in zip(reports, params):
        torch.testing.assert_close(rep["losses"], losses, rtol=1e-5, atol=1e-5)
        assert par["straight"].keys() == want.keys() == par["resumed"].keys()
        for n, p in want.items():
            torch.testing.assert_close(par["straight"][n], p, rtol=1e-5, atol=1e-5, msg=n)
            torch.testing.assert_close(par["resumed"][n], par["straight"][n], rtol=1e-6, atol=1e-6, msg=n)
    check_final_outputs(out, single)


def test_trainer_fsdp2_checkpoint_resume_and_final_outputs(trainer_run, tmp_path):
    out, reports, _ = trainer_run
    assert (out / "run" / "checkpoint-2" / "pytorch_model_fsdp_0" / ".metadata").exists()
    for rep in reports:
        c = rep["counts"]
        assert c["frozen_in_optimizer"] == 0 and c["optimizer"] == 2 * c["trainable"]
    _check_trainer_run(trainer_run, tmp_path)


def test_trainer_deepspeed_zero2_checkpoint_resume_and_final_outputs(deepspeed_run, tmp_path):
    """DeepSpeed ZeRO-2 through Trainer: its checkpoint holds a stock model file (the patched state dict) and the
    ZeRO optimizer shards; resuming gives the uninterrupted run; losses and slices equal one process."""
    out = deepspeed_run[0]
    assert (out / "run" / "checkpoint-2" / "model.safetensors").exists()
    assert (out / "run" / "checkpoint-2" / PLAN_FILE).exists()
    assert any((out / "run" / "checkpoint-2").glob("global_step2/*optim_states.pt"))
    _check_trainer_run(deepspeed_run, tmp_path)


def test_trainer_deepspeed_zero3_checkpoint_resume_and_final_outputs(deepspeed3_run, tmp_path):
    """DeepSpeed ZeRO-3 through Trainer: every parameter is partitioned (the module holds empty placeholders). The
    checkpoint is DeepSpeed's (per-rank model states with placeholders under the stock keys, ZeRO partitions of the
    trainable slices in the optimizer states, the frozen blocks' fragments in the model states); resuming from it
    gives the uninterrupted run; losses and slices equal one process; save_final gathers one layer at a time and
    writes the stock checkpoint and the delta from rank 0 only."""
    out, reports, _ = deepspeed3_run
    ckpt = out / "run" / "checkpoint-2"
    assert (ckpt / PLAN_FILE).exists()
    # stage3_gather_16bit_weights_on_model_save: Trainer writes DeepSpeed's consolidated state dict (read from the
    # parameters: patched names), which save_pretrained merges into the stock checkpoint
    stock = type(tiny_model("llama", dtype=torch.float32)).from_pretrained(ckpt, dtype=torch.float32)
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(stock.state_dict()) and "model.layers.1.self_attn.o_proj.weight" in f.keys()
    for rep in reports:  # the resumed Trainer ran steps 3-4 only, as the uninterrupted one did
        torch.testing.assert_close(rep["resumed_losses"], rep["losses"][2:], rtol=1e-6, atol=1e-6)
    for r in range(2):
        assert (ckpt / "global_step2" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").exists()
    states = torch.load(ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    module = states["module"]
    assert "model.layers.1.self_attn.q_proj.weight" in module and module["model.layers.1.self_attn.q_proj.weight"
                                                                        ].numel() == 0
    assert not any(k.endswith(("weight_train", "weight_frozen")) for k in module)
    _check_trainer_run(deepspeed3_run, tmp_path)
