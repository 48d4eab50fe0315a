"""One member trained by several processes of a torch.distributed group (one per GPU with nccl, or
CPU processes with gloo). Every process holds the whole model and adapter and takes every
`world`-th micro-batch of each optimizer step; the processes sum their gradients and step losses
before each takes the same optimizer step. Every process sees the whole batch and divides by its
supervised tokens, so the step equals the one-process step. Nothing is sharded: the base model,
adapter and optimizer state are replicated on every process."""
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Replicas:
    """This process's place among the `world` processes of the default process group."""

    rank: int
    world: int

    def share(self, micro_batches):
        """This process's micro-batches of a step: every `world`-th, from its rank."""
        return itertools.islice(micro_batches, self.rank, None, self.world)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every parameter's gradient by its sum over the processes (one all-reduce); a
        process that had no micro-batch contributes zeros."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        for param, summed in zip(params, flat.split([g.numel() for g in grads])):
            param.grad = summed.view_as(param).to(param.dtype)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value, dtype=torch.float32)
        dist.all_reduce(value)
        return value

    def broadcast(self, tensors) -> None:
        """Give every process rank 0's values of `tensors` (in place)."""
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def join(rank: int, world: int, init_method: str, use_gpu: bool) -> Replicas:
    """Join the member's process group: nccl on a GPU, gloo on the CPU."""
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=init_method, rank=rank, world_size=world)
    return Replicas(rank, world)
