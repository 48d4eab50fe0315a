"""Several members on one base model: one frozen copy of the weights, and per member its own
adapter tensors, optimizer, scheduler, attributes, data stream and random generator.

One member is live in the agent at a time. Making another live swaps tensors, not data: each
trainable parameter is pointed at that member's tensors and the agent takes that member's
optimizer and scheduler (whose state is keyed by the same parameter objects). So every member
behaves exactly as it would on an agent of its own, and a swap copies nothing.

Training steps the members together where the model allows it (`step_together`): each optimizer
step sends every member's micro-batches through one forward and backward of the base model, then
each member in turn takes its own optimizer step. Otherwise they train one after another.
"""
import math
import time
import warnings

import torch

from evo_sft.sft import SFT, lora
from evo_sft.data import SFTGym
from evo_sft.fitness import Evaluation, Fitness
from evo_sft.population import step_together
from evo_sft.population.member import MemberHost, train_result
from evo_sft.population.protocol import TrainResult


class SharedBase:
    """The members of `founders` ({slot: hyperparameters}) on `agent`'s base model."""

    def __init__(self, agent: SFT, gym: SFTGym, seed: int, founders: dict[int, dict], together: bool = True,
                 fitness: Fitness | None = None):
        self.agent, self.live, self.parked = agent, None, {}
        self.together_blocker = step_together.blocker(agent) if together else "population.step_together is off"
        if together and self.together_blocker and len(founders) > 1:
            warnings.warn(f"the {len(founders)} members on one base model train one after another: "
                          f"{self.together_blocker}")
        # the same parameter and layer objects for every member (walking the model costs ms)
        self.params = agent.trainable_parameters()
        self.fast_layers = step_together.lora_layers(agent)
        initial = {name: p.detach().clone() for name, p in self.params.items()}
        initial_attributes = agent.inspect_attributes()
        for slot, hyperparameters in founders.items():
            # what SFT(index=slot, lr=..., batch_size=...) on this base would start as
            for name, p in self.params.items():
                p.data = initial[name].clone()
            agent.reinit_optimizers()
            agent.set_attributes({**initial_attributes, "index": slot})
            agent.set_hyperparameters(**hyperparameters)
            self.parked[slot] = self._live_member()
        self.members = {slot: SharedMember(self, MemberHost(slot, agent, gym, seed, fitness)) for slot in founders}

    def _live_member(self) -> dict:
        """What makes the agent's live member itself, by reference: its tensors, optimizer,
        scheduler and attributes."""
        agent = self.agent
        return {"weights": {name: p.data for name, p in self.params.items()},
                "optimizer": agent.optimizer, "scheduler": agent.lr_scheduler,
                "attributes": agent.inspect_attributes()}

    def park(self) -> None:
        if self.live is not None:
            self.parked[self.live] = self._live_member()
            self.live = None

    def make_live(self, slot: int) -> None:
        if self.live == slot:
            return
        self.park()
        member = self.parked.pop(slot)
        for name, p in self.params.items():
            p.data = member["weights"][name]
            p.grad = None
        self.agent.optimizer, self.agent.lr_scheduler = member["optimizer"], member["scheduler"]
        self.agent.set_attributes(member["attributes"])
        self.live = slot

    def train(self, steps: int, max_tokens: dict[int, int] | None = None) -> dict[int, dict]:
        """`steps` optimizer steps of every member: {slot: result}. With `max_tokens` ({slot:
        tokens}) a member stops once it has trained on that many supervised tokens."""
        self.park()
        limits = {slot: (max_tokens or {}).get(slot) for slot in self.members}
        for member in self.members.values():
            member.host.advance(0, 0)
        epochs = {member["attributes"]["update_epochs"] for member in self.parked.values()}
        if self.together_blocker or len(self.members) == 1 or len(epochs) > 1:
            return {slot: member.train(steps, limits[slot]) for slot, member in self.members.items()}
        return self._train_together(steps, epochs.pop(), limits)

    def _train_together(self, steps: int, epochs: int, limits: dict[int, int | None]) -> dict[int, dict]:
        agent, everyone = self.agent, list(self.members)
        start = time.perf_counter()
        step_sums, step_numbers = [], []  # per optimizer step: loss sums on the device, {slot: (step, tokens)}
        tokens = dict.fromkeys(everyone, 0)
        agent.set_training_mode(True)
        slots = everyone
        batches = self._next_batches(slots)
        for step in range(steps):
            micro_sizes = [self.parked[slot]["attributes"]["micro_batch_size_per_gpu"] or len(batch["input_ids"])
                           for slot, batch in zip(slots, batches)]
            scalings = [self._scaling(slot) for slot in slots]
            for epoch in range(epochs):
                weights = [self.parked[slot]["weights"] for slot in slots]
                grads, sums, step_tokens = step_together.forward_backward(agent, self.fast_layers, weights, batches,
                                                                          micro_sizes, scalings)
                finite = step_together.all_finite(grads, sums)
                going_on = [slot for slot, t in zip(slots, step_tokens)
                            if limits[slot] is None or tokens[slot] + t < limits[slot]]
                last = epoch == epochs - 1
                upcoming = self._next_batches(going_on) if last and step + 1 < steps else batches
                if not bool(finite):  # the one sync of a step, after the host has prepared the next one
                    alone = [step_together.forward_backward(agent, self.fast_layers, [w], [b], [m], [s])
                             for w, b, m, s in zip(weights, batches, micro_sizes, scalings)]
                    grads, sums = [g[0] for g, _, _ in alone], torch.cat([sums for _, sums, _ in alone])
                step_sums.append(sums)
                numbers = {}
                for i, slot in enumerate(slots):
                    tokens[slot] += step_tokens[i]
                    self.make_live(slot)
                    if grads[i] is None:
                        warnings.warn(f"member {slot}: an optimizer step had no supervised tokens and was skipped")
                    else:
                        for name, p in self.params.items():
                            p.grad = grads[i][name]
                        agent.apply_gradients()
                    numbers[slot] = (agent.optimizer_steps, step_tokens[i])
                    self.members[slot].host.advance(step + 1, tokens[slot])
                step_numbers.append(numbers)
                self.park()
            slots, batches = going_on, upcoming
            if not slots:
                break
        seconds = time.perf_counter() - start
        flat = iter(torch.cat(step_sums).tolist())  # the one sync for the losses, at the end
        steps_of = {slot: [] for slot in everyone}
        for numbers in step_numbers:
            for slot, (number, count) in numbers.items():
                steps_of[slot].append((number, next(flat) / count if count else math.nan, count))
        return {slot: train_result(slot, steps_of[slot], seconds, self.parked[slot]["attributes"]["optimizer_steps"])
                for slot in everyone}

    def _scaling(self, slot: int) -> float:
        """The LoRA scaling of a parked member (members may differ in rank and alpha)."""
        attributes = self.parked[slot]["attributes"]
        return lora.scaling(attributes["lora_r"], attributes["lora_alpha"], self.agent.lora_config.use_rslora)

    def _next_batches(self, slots: list[int]) -> list[dict]:
        """Each member's next optimizer step of `batch_size` rows from its own stream."""
        return [self.members[slot].host.gym.batch(self.members[slot].host.stream,
                                                  self.parked[slot]["attributes"]["batch_size"]) for slot in slots]


class SharedMember:
    """A `MemberHost` on a shared base: every call first makes its member the live one."""

    def __init__(self, base: SharedBase, host: MemberHost):
        self.base, self.host = base, host
        self.slot, self.gym = host.slot, host.gym

    @property
    def agent(self) -> SFT:
        return self._live().agent

    @property
    def stream(self):
        return self.host.stream

    @property
    def progress(self) -> tuple[int, int]:
        return self.host.progress

    @property
    def on_step(self):
        return self.host.on_step

    @on_step.setter
    def on_step(self, callback) -> None:
        self.host.on_step = callback

    def _live(self) -> MemberHost:
        self.base.make_live(self.slot)
        return self.host

    def train_group(self, steps: int, max_tokens: dict[int, int] | None = None) -> dict[int, TrainResult]:
        return self.base.train(steps, max_tokens)

    def train(self, steps: int, max_tokens: int | None = None) -> TrainResult:
        return self._live().train(steps, max_tokens)

    def evaluate(self, full: bool = False) -> Evaluation:
        return self._live().evaluate(full)

    def hyperparameters(self) -> dict:
        return self._live().hyperparameters()

    def set_hyperparameters(self, hyperparameters: dict) -> None:
        self._live().set_hyperparameters(hyperparameters)

    def export_state(self, on_device: bool = False):
        return self._live().export_state(on_device)

    def import_state(self, state) -> None:
        self._live().import_state(state)

    def snapshot(self):
        return self._live().snapshot()

    def load(self, directory) -> None:
        self._live().load(directory)

    def export_adapter(self, directory) -> str:
        return self._live().export_adapter(directory)
