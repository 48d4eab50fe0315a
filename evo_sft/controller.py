"""The generation loop, written once for every population backend:
(select -> clone -> mutate, from the previous generation's scores) -> train -> evaluate -> record
-> checkpoint.

Generations are numbered from 1. Selection opens a generation rather than closing one, so the
population a run ends with, and every checkpoint, holds exactly the members that were scored,
with the hyperparameters they were scored with."""
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from evo_sft.evolution import (
    HyperparameterConfig, Lineage, MemberState, Mutations, TournamentSelection, TruncationSelection,
    apply_plan_to_lineage, elite, plan_generation, score,
)
from evo_sft.evolution.schedule import line_schedule
from evo_sft.population.protocol import Population, TrainResult


@dataclass
class GenerationRecord:
    """What one generation did; observers (tracking, progress) read it."""

    generation: int
    member_ids: list[int]
    train: list[TrainResult]
    fitness: list[float]
    hyperparameters: list[dict]
    elite_slot: int
    elite_id: int
    elite_adapter: str | None = None
    decisions: list = field(default_factory=list)  # the clones and mutations this generation opened with
    retired_ids: list[int] = field(default_factory=list)  # members whose slots those clones took
    evaluations: list = field(default_factory=list)  # each slot's evo_sft.fitness.Evaluation


class Controller:
    """Owns the evolution's state: generation, random generator, lineage and fitness histories.

    `selection`/`mutations` None means no evolution: members only train and are scored.
    `save_elite(controller, slot)` runs after scoring; it may return the saved path.
    `generation` counts the generations completed; `tokens[g - 1]` is the supervised tokens the
    population has trained on by the end of generation g, as its members measured them.
    With `token_budget`, the run ends once the population has trained on that many tokens: in
    each generation a member trains until it has had its share of what is left (its last step
    may pass it, by less than one batch), so batch-size mutation cannot exceed the budget.
    With `generation_tokens`, every member trains that many supervised tokens a generation (its
    last step may pass them), however many steps its batch size takes, so that members are
    compared after equal tokens; without, `steps_per_generation` optimizer steps each.
    `progress(generation, total, unit)`, if given, is a context manager around each generation's
    training that yields the `report` the population's `train` is given (see `evo_sft.progress`);
    `total` counts units ("step" or "token") of all members.
    """

    def __init__(self, population: Population, hp_config: HyperparameterConfig, steps_per_generation: int, seed: int,
                 selection: TournamentSelection | TruncationSelection | None = None, mutations: Mutations | None = None,
                 micro_batch_size: int | None = None, observers=(), checkpointer=None, save_elite=None,
                 token_budget: int | None = None, progress=None, generation_tokens: int | None = None):
        self.population = population
        self.hp_config, self.steps_per_generation = hp_config, steps_per_generation
        self.selection, self.mutations = selection, mutations
        self.multiple_of = {"batch_size": micro_batch_size} if micro_batch_size else None
        self.observers, self.checkpointer, self.save_elite = list(observers), checkpointer, save_elite
        self.progress = progress
        self.rng = np.random.default_rng(seed)
        self.token_budget, self.generation_tokens = token_budget, generation_tokens
        self.generation = 0
        self.tokens: list[int] = []
        self.batches: list[list[int]] = []  # per generation, the batches each slot's member trained on
        self.lineage = Lineage()
        self.slot_ids = [self.lineage.found(hp, generation=1, slot=slot)
                         for slot, hp in enumerate(population.hyperparameters())]
        self.fitness = {member_id: [] for member_id in self.slot_ids}
        population.on_failure = self._record_failure

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "generation": self.generation,
            "rng": self.rng.bit_generator.state,
            "lineage": self.lineage.to_dict(),
            "slot_ids": self.slot_ids,
            "fitness": [[member_id, history] for member_id, history in self.fitness.items()],
            "tokens": self.tokens,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generation = state["generation"]
        self.rng.bit_generator.state = state["rng"]
        self.lineage = Lineage.from_dict(state["lineage"])
        self.slot_ids = list(state["slot_ids"])
        self.fitness = {member_id: list(history) for member_id, history in state["fitness"]}
        self.tokens = list(state.get("tokens", []))  # checkpoints before token counting have none
        # checkpoints before token intervals: every member took steps_per_generation batches
        self.batches = [list(row) for row in state.get(
            "batches", [[self.steps_per_generation] * self.population.size] * self.generation)]

    def scores(self) -> list[float]:
        """Each slot's score: its recent fitness (`selection.eval_loop` evaluations), -inf if none."""
        eval_loop = self.selection.eval_loop if self.selection else 1
        return [score(self.fitness[member_id], eval_loop) for member_id in self.slot_ids]

    def best_slot(self) -> int:
        return elite(self.scores())

    def schedule(self, member_id: int) -> dict:
        """The schedule of `member_id`'s line (evo_sft.evolution.schedule), what `evo-sft replay` retrains."""
        return line_schedule(self.lineage, member_id, self.fitness[member_id], self.batches, self.steps_per_generation)

    @property
    def tokens_trained(self) -> int:
        return self.tokens[-1] if self.tokens else 0

    def budget_spent(self) -> bool:
        return self.token_budget is not None and self.tokens_trained >= self.token_budget

    def _training_plan(self) -> tuple[int, list[int] | None]:
        """(steps, each member's token limit or None) of the next generation: its interval's steps
        or tokens, within each member's share of the token budget that is left. A step trains at
        least one token, so a token interval needs no more steps than it has tokens."""
        limits = [] if self.generation_tokens is None else [self.generation_tokens]
        if self.token_budget is not None:
            limits.append(-(-(self.token_budget - self.tokens_trained) // self.population.size))
        steps = self.steps_per_generation if self.generation_tokens is None else self.generation_tokens
        return steps, [min(limits)] * self.population.size if limits else None

    def _record_failure(self, kind: str, slot: int, error: str) -> None:
        """A lineage event for a member whose worker died: "restart" (rebuilt as it was) or
        "lost" (it scores -inf this generation and a clone of the elite takes its slot)."""
        message = str(error).strip()
        self.lineage.record(kind, self.generation + 1, slot=slot, member_id=self.slot_ids[slot],
                            error=message.splitlines()[0][:500] if message else "")

    # ----------------------------------------------------------------- the loop
    def run(self, generations: int) -> None:
        """Run until `generations` generations are complete in total, or the token budget is
        spent; the last checkpoint is committed before this returns (or raises)."""
        try:
            while self.generation < generations and not self.budget_spent():
                self.run_generation()
        finally:
            if self.checkpointer is not None:
                self.checkpointer.settle(self)

    def run_generation(self) -> GenerationRecord:
        generation = self.generation + 1
        decisions, retired = [], []
        if generation > 1 and self.selection is not None and self.mutations is not None:
            decisions, retired = self._evolve(generation)
        steps, limits = self._training_plan()
        if self.progress is None:
            train = self.population.train(steps, limits)
        elif self.generation_tokens is None:
            with self.progress(generation, self.population.size * steps, "step") as report:
                train = self.population.train(steps, limits, report)
        else:
            with self.progress(generation, sum(limits), "token") as report:
                train = self.population.train(steps, limits, report)
        self.tokens.append(self.tokens_trained + sum(result.tokens for result in train))
        self.batches.append([len(result.step_losses) for result in train])
        if self.checkpointer is not None:
            self.checkpointer.settle(self)
        evaluations = self.population.evaluate()
        fitness = [evaluation.fitness for evaluation in evaluations]
        for slot, result in enumerate(train):
            if not (result.finite and math.isfinite(fitness[slot])):
                warnings.warn(f"member {self.slot_ids[slot]} (slot {slot}) has a non-finite loss or fitness; "
                              "its fitness is -inf and it will be replaced")
                fitness[slot] = -math.inf
                self.lineage.record("nonfinite", generation, member_id=self.slot_ids[slot], slot=slot)
            self.fitness[self.slot_ids[slot]].append(fitness[slot])
        self.generation = generation
        elite_slot = self.best_slot()
        record = GenerationRecord(generation, list(self.slot_ids), train, fitness, self.population.hyperparameters(),
                                  elite_slot, self.slot_ids[elite_slot], decisions=decisions, retired_ids=retired,
                                  evaluations=evaluations)
        if self.save_elite is not None:
            record.elite_adapter = self.save_elite(self, elite_slot)
        self._notify(record)
        if self.checkpointer is not None:
            self.checkpointer.maybe_save(self)
        return record

    def _evolve(self, generation: int) -> tuple[list, list[int]]:
        """Select, clone and mutate from the scores so far: (the plan's decisions, the ids of the
        members whose slots clones took)."""
        scores = self.scores()
        members = [MemberState(member_id, hyperparameters, scores[slot]) for slot, (member_id, hyperparameters)
                   in enumerate(zip(self.slot_ids, self.population.hyperparameters()))]
        guide = self.mutations.guide
        propose = guide.proposer(self.hp_config, self.lineage, self.fitness, generation) if guide else None
        decisions = plan_generation(members, self.selection, self.mutations, self.hp_config, self.rng,
                                    self.multiple_of, propose)
        slot_of = {member_id: slot for slot, member_id in enumerate(self.slot_ids)}
        self.population.clone([(d.slot, slot_of[d.parent_id]) for d in decisions if d.clone])
        self.population.set_hyperparameters(
            {d.slot: d.hyperparameters for d in decisions if d.clone or d.hyperparameters != members[d.slot].hyperparameters})
        before = self.slot_ids
        self.slot_ids = apply_plan_to_lineage(self.lineage, decisions, members, generation)
        for d, member_id in zip(decisions, self.slot_ids):
            if d.clone:
                self.fitness[member_id] = list(self.fitness[d.parent_id])
        return decisions, sorted(set(before) - set(self.slot_ids))

    def _notify(self, record: GenerationRecord) -> None:
        """Observers never stop training: a failing observer costs a warning."""
        for observer in self.observers:
            try:
                observer(self, record)
            except Exception as error:  # noqa: BLE001
                warnings.warn(f"observer {observer!r} failed at generation {record.generation}: {error}")
