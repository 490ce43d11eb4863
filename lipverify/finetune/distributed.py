"""Data-parallel fine-tuning on PyTorch's own engine (DistributedDataParallel, launched by torchrun).

    torchrun --nproc_per_node 2 -m lipverify fine-tune model.onnx --target-L 2 --data train.npz

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; ``from_env`` joins the process group
(gloo on CPU; NCCL when training runs on CUDA). How the run stays the run of one process:

- every rank reads the same data and draws the same seeded batch order; global batch b is split
  by position, rank r taking samples r, r + W, r + 2W, ... of it;
- rank r's loss is W * (sum of its per-sample losses) / |b|, so after DDP averages the gradients
  over the W ranks the step sees exactly the full batch's mean gradient (up to the order of the
  float additions);
- the method's penalty depends on the weights only and every rank computes it identically
  (same weights, same seeded sketches), so averaging leaves its gradient unchanged; extra method
  parameters (rslmi's budgets) receive identical gradients on every rank without communication;
- only rank 0 writes checkpoints, exports, certifies the exported file and writes the
  certificate; the other ranks wait for it at a barrier and return None.

A Ctrl-C is agreed on by all ranks (a one-number all-reduce per step) so that they stop after
the same step and nobody waits forever in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lipverify.errors import UserInputError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: str = "cpu"  # this rank's training device ("cuda:<local rank>" under NCCL)
    owns_group: bool = False  # this call initialized the process group, so it destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.rank::self.world] if self.active else idx

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers: the IR has no buffers; every rank starts from the same weights
        ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        if not self.active:
            return flag
        import torch.distributed as tdist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as tdist

            tdist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def is_worker_rank() -> bool:
    """True in a torchrun process other than rank 0 (before or after the group is joined)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def resolve_device(device: str) -> str:
    """cpu / cuda / auto -> the device to train on (auto: cuda when one is available)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def from_env(device: str = "cpu") -> Dist:
    """The process group torchrun describes in the environment (or a single process). On CUDA
    each rank trains on GPU LOCAL_RANK and the group uses NCCL; on the CPU it uses gloo."""
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    import torch.distributed as tdist

    if not tdist.is_available():
        raise UserInputError("this torch build has no torch.distributed; run fine-tune in one process")
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserInputError(f"torchrun rank with LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                                 "CUDA devices; use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    owns = False
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        owns = True
    return Dist(rank=rank, world=world, backend=tdist.get_backend(), device=device, owns_group=owns)
