"""One member trained by several processes of a torch.distributed group (one per GPU with nccl, or
CPU processes with gloo). The frozen base model is sharded over the processes with FSDP2
(`shard_base`); the adapter and its optimizer state are whole on every process. Each process
takes every `world`-th micro-batch of each optimizer step; the processes sum their gradients and
step losses before each takes the same optimizer step. Every process sees the whole batch and
divides by its supervised tokens, so the step equals the one-process step."""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from evo_sft.data import IGNORE_INDEX
from evo_sft.sft.step import decoder_and_head


@dataclass(frozen=True)
class Replicas:
    """This process's place among the `world` processes of the default process group."""

    rank: int
    world: int

    def share(self, micro_batches) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of a step: every `world`-th, from its rank, made up with
        a row without supervised tokens (it adds nothing) so that every process runs as many
        forward and backward passes: the sharded base gathers its weights in each, on all of them."""
        micros = list(micro_batches)
        own = micros[self.rank::self.world]
        filler = {k: v[:1] for k, v in micros[0].items()}
        filler["labels"] = torch.full_like(filler["labels"], IGNORE_INDEX)
        return own + [filler] * (-(-len(micros) // self.world) - len(own))

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


def shard_base(agent, replicas: Replicas) -> None:
    """Shard the agent's frozen decoder over the processes (FSDP2's `fully_shard`, layer by layer,
    then the embedding and final norm): each process keeps 1/world of those weights and gathers a
    layer's whole for its forward and backward. The output head (which the step reads as a
    weight, not through a forward; with tied embeddings the embedding too) and the trainable
    parameters (the adapter) stay whole on every process, so clones, checkpoints and rank changes
    see plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(agent.device.type, (replicas.world,))
    decoder, head = decoder_and_head(agent)
    whole = set(agent.trainable_parameters().values()) | set(head.parameters())
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, ignored_params=whole & set(layer.parameters()))
    # Resharded after every forward, the root too: a state_dict() (a checkpoint or an export, on
    # rank 0 only) reshards whatever is gathered, and a later forward would then gather on rank 0 only.
    fully_shard(decoder, mesh=mesh, reshard_after_forward=True, ignored_params=whole & set(decoder.parameters()))


def join(rank: int, world: int, init_method: str, use_gpu: bool) -> Replicas:
    """Join the member's process group: nccl on a GPU, gloo on the CPU."""
    dist.init_process_group("nccl" if use_gpu else "gloo", init_method=init_method, rank=rank, world_size=world)
    return Replicas(rank, world)
