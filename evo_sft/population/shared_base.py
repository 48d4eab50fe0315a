"""Several members on one base model: one frozen copy of the weights, and per member its own
adapter tensors, optimizer, scheduler, attributes, data stream and random generator.

One member is live in the agent at a time. Making another live swaps tensors, not data: each
trainable parameter is pointed at that member's tensors and the agent takes that member's
optimizer and scheduler (whose state is keyed by the same parameter objects). So every member
behaves exactly as it would on an agent of its own, and a swap copies nothing.
"""
from evo_sft.agent import SFT
from evo_sft.data import SFTGym
from evo_sft.population.member import MemberHost


class SharedBase:
    """The members of `founders` ({slot: hyperparameters}) on `agent`'s base model."""

    def __init__(self, agent: SFT, gym: SFTGym, seed: int, founders: dict[int, dict]):
        self.agent, self.live, self.parked = agent, None, {}
        params = agent.trainable_parameters()
        initial = {name: p.detach().clone() for name, p in params.items()}
        for slot, hyperparameters in founders.items():
            # what SFT(index=slot, lr=..., batch_size=...) on this base would start as
            for name, p in params.items():
                p.data = initial[name].clone()
            agent.index, agent.lr, agent.batch_size = slot, hyperparameters["lr"], hyperparameters["batch_size"]
            agent.reinit_optimizers()
            self.parked[slot] = self._live_member()
        self.members = {slot: SharedMember(self, MemberHost(slot, agent, gym, seed)) for slot in founders}

    def _live_member(self) -> dict:
        """What makes the agent's live member itself, by reference: its tensors, optimizer,
        scheduler and attributes."""
        agent = self.agent
        return {"weights": {name: p.data for name, p in agent.trainable_parameters().items()},
                "optimizer": agent.optimizer, "scheduler": agent.lr_scheduler,
                "attributes": agent.inspect_attributes()}

    def make_live(self, slot: int) -> None:
        if self.live == slot:
            return
        if self.live is not None:
            self.parked[self.live] = self._live_member()
        member = self.parked.pop(slot)
        for name, p in self.agent.trainable_parameters().items():
            p.data = member["weights"][name]
            p.grad = None
        self.agent.optimizer, self.agent.lr_scheduler = member["optimizer"], member["scheduler"]
        self.agent._set_attributes(member["attributes"])
        for module in self.agent.actor.modules():  # compute-dtype copies of the previous member's LoRA weights
            module.__dict__.pop("_step_weights", None)
        self.live = slot


class SharedMember:
    """A `MemberHost` whose every call first makes its member the live one on the shared base."""

    def __init__(self, base: SharedBase, host: MemberHost):
        self.base, self.host = base, host

    def __getattr__(self, name: str):
        method = getattr(self.host, name)
        if not callable(method):
            return method

        def on_live_member(*args, **kwargs):
            self.base.make_live(self.host.slot)
            return method(*args, **kwargs)

        return on_live_member
