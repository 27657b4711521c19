"""One rank of nnU-Net's multi-GPU training (``nnUNetv2_train ... -num_gpus N``), on CPU.

What nnU-Net's ``run_ddp`` does, in the same order: join the process group, build the trainer
with ``get_trainer_from_args``, ``run_training()`` (initialize, DDP, the epochs with their
validation and checkpoints), then ``perform_actual_validation``. Changed for CPU only:
- the gloo backend instead of NCCL, with a timeout on every collective (a hang fails fast);
- the device: nnU-Net forces ``cuda:rank`` under DDP, so the trainer is put back on the CPU
  (and its CUDA GradScaler dropped) before it builds anything;
- ``DDP(network, device_ids=[rank])`` is called without ``device_ids`` (a CUDA device list);
- SyncBatchNorm runs on CUDA only, so nnU-Net's conversion to it is skipped: the ``_BN`` rows
  train with per-rank batch statistics here, which leaves SyncBatchNorm itself unproven.

Run by tests/test_ddp.py as ``python tests/ddp_worker.py RANK WORLD_SIZE PORT TRAINER DATASET PLANS OUT MODE
CONFIGURATION``;
MODE ``train`` (``nnUNetv2_train``) writes OUT/rank{RANK}.pt (the network's state_dict after training) and
OUT/rank{RANK}.json (the modalities of every training batch of this rank, as the unpaired
sampler gives them; none for nnU-Net's own loader); MODE ``val``
(``nnUNetv2_train ... --val``) only reruns the final validation of the trained fold.
"""
import datetime
import json
import os
import sys

COLLECTIVE_TIMEOUT_S = int(os.environ.get("NNUNETV2_CSA_DDP_TIMEOUT", "60"))


def main(rank: int, world_size: int, port: int, trainer_name: str, dataset: str, plans: str, out: str,
         mode: str, configuration: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    def ddp_on_cpu(module, device_ids=None, **kwargs):
        return DistributedDataParallel(module, **kwargs)

    nnunet_trainer_module.DDP = ddp_on_cpu
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(lambda cls, module, process_group=None: module)

    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, device=torch.device("cpu"))
    assert trainer.is_ddp and trainer.device.type == "cuda", "nnU-Net no longer forces cuda:rank under DDP"
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None
    if mode == "val":
        maybe_load_checkpoint(trainer, False, True, None)
        trainer.perform_actual_validation(False)
        dist.destroy_process_group()
        return

    batches = []
    train_step = trainer.train_step

    def recorded_train_step(batch):
        # the unpaired sampler's modality vector (nnU-Net's own loader, Joint and Single, has none)
        batches.append([int(m) for m in batch.get("modality", [])])
        return train_step(batch)

    trainer.train_step = recorded_train_step
    trainer.run_training()
    trainer.perform_actual_validation(False)

    from nnunetv2_csa.wrappers import unwrap_network
    torch.save(unwrap_network(trainer.network).state_dict(), os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"batch_size": int(trainer.batch_size), "batch_modalities": batches}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:10])
