"""Several members on one base model: one frozen copy of the weights, and per member an adapter,
optimizer, scheduler, attributes, data stream and random generator.

Only one member is live in the agent at a time; the others are parked as exported state on the
same device. A call for a parked member first swaps it in (a device-to-device copy of its
adapter and optimizer state, once per call, not per step), so every member behaves exactly as it
would on an agent of its own.
"""
from evo_sft.agent import SFT
from evo_sft.data import SFTGym
from evo_sft.population.member import MemberHost


class SharedBase:
    """The members of `founders` ({slot: hyperparameters}) on `agent`'s base model."""

    def __init__(self, agent: SFT, gym: SFTGym, seed: int, founders: dict[int, dict]):
        self.agent, self.live, self.parked = agent, None, {}
        for slot, hyperparameters in founders.items():
            # what SFT(index=slot, lr=..., batch_size=...) on this base would start as
            agent.index, agent.lr, agent.batch_size = slot, hyperparameters["lr"], hyperparameters["batch_size"]
            agent.reinit_optimizers()
            self.parked[slot] = agent.export_state(device=str(agent.device))
        self.members = {slot: SharedMember(self, MemberHost(slot, agent, gym, seed)) for slot in founders}

    def make_live(self, slot: int) -> None:
        if self.live == slot:
            return
        if self.live is not None:
            self.parked[self.live] = self.agent.export_state(device=str(self.agent.device))
        self.agent.import_state(*self.parked.pop(slot))
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
