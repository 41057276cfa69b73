"""Run by ``accelerate launch`` (2 CPU processes, gloo) from test_patch_fsdp_launch.py; not a test module itself.

    python -m accelerate.commands.launch --config_file CFG tests/_hs_launch_fsdp.py MODE OUT

MODE "accelerate": an accelerate loop on FSDP2 (from the config file): 2 steps, ``save_state``, 2 more steps; then a
fresh patched model and optimizer, ``load_state`` and the same 2 steps; both end states are saved for the test.
MODE "trainer": ``transformers.Trainer`` with its own FSDP2 options: 4 steps with a checkpoint at step 2, then a
fresh Trainer resumed from that checkpoint. MODE "deepspeed" / "deepspeed3" (under torchrun): the same with DeepSpeed ZeRO-2 / ZeRO-3. All end with ``headsparse.save_final`` (standard checkpoint and
delta, rank 0 only) and a per-rank JSON of what the test checks.
"""
import json
import os
import sys

import torch

import headsparse as hs
from headsparse.patch import gather_trainable, save_final
from _hs_dist import rank_bytes
from _hs_models import batch, tiny_model

MODES = [["f"] * 4, ["f", "t", "f", "p"], ["t", "f", "f", "t"]]
LR = 1e-2


def make():
    torch.manual_seed(0)
    return hs.patch(tiny_model("llama", dtype=torch.float32), hs.HeadPlan(MODES, num_kv_heads=2, model_family="llama"))


def data():
    ids = batch(tiny_model("llama", dtype=torch.float32), b=8, s=10)
    return [{"input_ids": x, "labels": x} for x in ids]


def fsdp_on_cpu(acc, plugin=None):
    """accelerate 1.15 turns its FSDP plugin off on the CPU (DistributedType MULTI_CPU; FSDP is set only for GPU-like
    devices), although torch's FSDP2 runs on the CPU with gloo. Switch the shared state to FSDP, as a GPU machine
    would have it, so that accelerate's own FSDP2 code (fully_shard per layer, DCP save/load) runs here."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = acc.state
    if state.distributed_type != DistributedType.FSDP:
        plugin = plugin or getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() copies it on each construction
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    assert acc.is_fsdp2 and acc.num_processes == 2, (acc.distributed_type, acc.num_processes)


def run_accelerate(out):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    acc = Accelerator(cpu=True)
    fsdp_on_cpu(acc, FullyShardedDataParallelPlugin())  # the plugin reads the launch config (FSDP_* variables)
    rows = torch.stack([d["input_ids"] for d in data()])
    mine = rows[acc.process_index * 2:(acc.process_index + 1) * 2]  # global batch 4 per step: rows 0-3
    steps = [mine, rows[4 + acc.process_index * 2:4 + (acc.process_index + 1) * 2]]

    def fresh():
        model = make()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        return acc.prepare(model, opt)

    def step(model, opt, ids):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step()
        return acc.reduce(loss.detach(), reduction="mean").item()

    model, opt = fresh()
    losses = [step(model, opt, steps[0]), step(model, opt, steps[1])]
    acc.save_state(os.path.join(out, "state"))
    losses += [step(model, opt, steps[0]), step(model, opt, steps[1])]
    counts = rank_bytes(model, opt)
    straight = gather_trainable(model)
    acc.free_memory()  # forget the first model and optimizer (save/load_state go over every prepared one)
    model2, opt2 = fresh()
    acc.load_state(os.path.join(out, "state"))
    resumed_losses = [step(model2, opt2, steps[0]), step(model2, opt2, steps[1])]
    resumed = gather_trainable(model2)
    save_final(model, os.path.join(out, f"final-rank{acc.process_index}"),
               delta=os.path.join(out, f"delta-rank{acc.process_index}.safetensors"))
    return {"losses": losses, "resumed_losses": resumed_losses, "counts": counts}, straight, resumed


def run_trainer(out):
    from transformers import Trainer, TrainingArguments

    def args(steps):
        return TrainingArguments(
            output_dir=os.path.join(out, "run"), max_steps=steps, per_device_train_batch_size=2, learning_rate=LR,
            lr_scheduler_type="constant", report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
            dataloader_num_workers=0, seed=0, data_seed=0, logging_steps=1, disable_tqdm=True,
            fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                            "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})

    class FSDPOnCPUTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            from accelerate.utils import FullyShardedDataParallelPlugin

            super().create_accelerator_and_postprocess()
            fsdp_on_cpu(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
            self.is_fsdp_enabled = True

    model = make()
    trainer = FSDPOnCPUTrainer(model=model, args=args(4), train_dataset=data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    counts = rank_bytes(trainer.model, trainer.optimizer)
    straight = gather_trainable(trainer.model)
    model2 = make()
    trainer2 = FSDPOnCPUTrainer(model=model2, args=args(4), train_dataset=data())
    trainer2.train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))
    resumed_losses = [h["loss"] for h in trainer2.state.log_history if "loss" in h]
    resumed = gather_trainable(trainer2.model)
    rank = torch.distributed.get_rank()
    save_final(trainer.model, os.path.join(out, f"final-rank{rank}"),
               delta=os.path.join(out, f"delta-rank{rank}.safetensors"))
    return {"losses": losses, "resumed_losses": resumed_losses, "counts": counts}, straight, resumed


def run_deepspeed(out, stage=2):
    """Trainer with DeepSpeed ZeRO-``stage`` (CPU accelerator, gloo): checkpoint at step 2, resume, final outputs."""
    from transformers import Trainer, TrainingArguments

    ds = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    if stage == 3:  # Trainer then also writes model.safetensors, from DeepSpeed's consolidated state dict
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True

    def args(steps):
        return TrainingArguments(
            output_dir=os.path.join(out, "run"), max_steps=steps, per_device_train_batch_size=2, learning_rate=LR,
            lr_scheduler_type="constant", report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
            dataloader_num_workers=0, seed=0, data_seed=0, logging_steps=1, disable_tqdm=True, deepspeed=ds)

    trainer = Trainer(model=make(), args=args(4), train_dataset=data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    straight = gather_trainable(trainer.model)
    trainer2 = Trainer(model=make(), args=args(4), train_dataset=data())
    trainer2.train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))
    resumed_losses = [h["loss"] for h in trainer2.state.log_history if "loss" in h and h["step"] > 2]
    resumed = gather_trainable(trainer2.model)
    rank = torch.distributed.get_rank()
    save_final(trainer.model, os.path.join(out, f"final-rank{rank}"),
               delta=os.path.join(out, f"delta-rank{rank}.safetensors"))
    return {"losses": losses, "resumed_losses": resumed_losses}, straight, resumed


def main():
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    report, straight, resumed = {"accelerate": run_accelerate, "trainer": run_trainer,
                                 "deepspeed": run_deepspeed, "deepspeed3": lambda o: run_deepspeed(o, 3)}[mode](out)
    rank = torch.distributed.get_rank()
    torch.save({"straight": straight, "resumed": resumed}, os.path.join(out, f"params-rank{rank}.pt"))
    with open(os.path.join(out, f"report-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown of the gloo group (see test_patch_ddp.py)


if __name__ == "__main__":
    main()
