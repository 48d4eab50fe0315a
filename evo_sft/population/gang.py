"""A member on several processes: k Ray actors in one placement group (STRICT_PACK: one node),
each a rank of the member's torch.distributed group (`evo_sft.sft.data_parallel`). To the Ray
backend a gang is one actor: each call goes to every rank, in order, and rank 0 answers."""
import tempfile
import uuid
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@ray.remote(num_cpus=0)
def rendezvous() -> str:
    """Where the group's processes meet: a file of their own on this node (a port picked here
    could be picked by another gang too before either binds it)."""
    return f"file://{Path(tempfile.gettempdir()) / f'evo-sft-gang-{uuid.uuid4().hex}'}"


@ray.remote(num_cpus=0)
def forget(address: str) -> None:
    """Remove the file of a group whose processes are gone (killed, they do not remove it)."""
    Path(address.removeprefix("file://")).unlink(missing_ok=True)


def largest_node() -> dict[str, float]:
    """The most CPUs and GPUs any one live node of the cluster has."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return {kind: max((resources.get(kind, 0.0) for resources in nodes), default=0.0) for kind in ("CPU", "GPU")}


class EveryRank:
    """`remote(*args)` calls the method on every rank in turn and returns rank 0's object reference."""

    def __init__(self, methods):
        self.methods = methods

    def remote(self, *args):
        return [method.remote(*args) for method in self.methods][0]


class Gang:
    """`size` actors of `actor_class` on one node, built with `args` and each with its rank."""

    def __init__(self, actor_class, size: int, num_cpus: float, num_gpus: float, *args):
        bundle = {kind: amount for kind, amount in (("CPU", num_cpus), ("GPU", num_gpus)) if amount > 0}
        self.group = placement_group([bundle] * size, strategy="STRICT_PACK")
        ray.get(self.group.ready())
        self.address = ray.get(rendezvous.options(scheduling_strategy=self.place(0)).remote())
        self.actors = [actor_class.options(scheduling_strategy=self.place(rank)).remote(
            *args, (rank, size, self.address)) for rank in range(size)]
        self.call = EveryRank([actor.call for actor in self.actors])
        self.wait_saved, self.location, self.progress = (self.actors[0].wait_saved, self.actors[0].location,
                                                         self.actors[0].progress)

    def place(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, rank)

    def kill(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        removed = forget.options(scheduling_strategy=self.place(0)).remote(self.address)
        ray.wait([removed], timeout=10)  # not forever: the node may be lost
        remove_placement_group(self.group)
