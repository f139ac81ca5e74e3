"""The pretraining loader of a run: torch's ``DataLoader`` or DALI's pipeline over the same stream and sampler.
Above ``pretrain_loader`` and ``dali_loader`` (the DALI module is imported only for ``kind="dali"``)."""

import torch

from .pretrain_loader import PretrainStream, StepBatchSampler, collate


def build_pretrain_loader(stream: PretrainStream, global_batch: int, micro_batch: int, rank: int, world: int,
                          start_step: int, total_steps: int, num_workers: int, kind: str = "torch", device=None):
    """This rank's micro-batches for steps [start_step, total_steps), from DALI (``kind="dali"``) or torch."""
    sampler = StepBatchSampler(global_batch, micro_batch, rank, world, start_step, total_steps)
    if kind == "dali":
        from .dali_loader import DaliPretrainLoader

        # the Python source (read, header check, box) runs in (num_workers + 1) // 2 DALI worker processes, not in
        # the training thread; one keeps up with ~5k images/s (measured); num_workers=0 keeps it in this thread
        return DaliPretrainLoader(stream, sampler, device or torch.device("cpu"), num_threads=max(1, num_workers),
                                  py_workers=(num_workers + 1) // 2)
    return torch.utils.data.DataLoader(stream, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                       prefetch_factor=4 if num_workers > 0 else None)
