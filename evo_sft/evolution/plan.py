"""One generation's plan: which slot copies which member, with what hyperparameters."""

import copy
import math
from dataclasses import dataclass

import numpy as np

from evo_sft.evolution.hyperparameters import HyperparameterConfig
from evo_sft.evolution.lineage import Lineage
from evo_sft.evolution.mutation import Mutations
from evo_sft.evolution.selection import TournamentSelection, TruncationSelection


@dataclass(frozen=True)
class MemberState:
    id: int
    hyperparameters: dict
    fitness: float


@dataclass(frozen=True)
class SlotDecision:
    slot: int
    parent_id: int
    clone: bool
    hyperparameters: dict
    mutation: str


def plan_generation(
    members: list[MemberState],
    selection: TournamentSelection | TruncationSelection,
    mutations: Mutations,
    hp_config: HyperparameterConfig,
    rng: np.random.Generator,
    multiple_of: dict[str, int] | None = None,
    propose=None,
) -> list[SlotDecision]:
    """Select a parent for every slot and mutate its hyperparameters (a selection that keeps its
    survivors as they are mutates only the clones, each surely; `propose`, the guide's proposal
    for this generation, is passed to every mutation). A member with a non-finite fitness (a NaN
    loss, a lost worker) is replaced by a clone of the elite."""
    elite_slot, parents = selection.select([m.fitness for m in members], rng)
    if math.isfinite(members[elite_slot].fitness):
        parents = [elite_slot if not math.isfinite(members[slot].fitness) else parent
                   for slot, parent in enumerate(parents)]
    decisions = []
    for slot, parent_slot in enumerate(parents):
        parent = members[parent_slot]
        clone = parent.id != members[slot].id
        kept = (selection.elitism and slot == elite_slot and not mutations.mutate_elite) or \
            (not clone and not selection.mutates_survivors)
        if kept:
            hyperparameters, mutation = copy.deepcopy(parent.hyperparameters), "none"
        else:
            hyperparameters, mutation = mutations.mutate(parent.hyperparameters, hp_config, rng, multiple_of,
                                                         surely=not selection.mutates_survivors, propose=propose)
        decisions.append(SlotDecision(slot, parent.id, clone, hyperparameters, mutation))
    return decisions


def apply_plan_to_lineage(
    lineage: Lineage, decisions: list[SlotDecision], members: list[MemberState], generation: int
) -> list[int]:
    """Record the plan in the lineage; return the member id of each slot afterwards."""
    if len(decisions) != len(members):
        raise ValueError(f"apply_plan_to_lineage: {len(decisions)} decisions for {len(members)} members")
    ids = []
    for decision in decisions:
        current = members[decision.slot]
        if decision.clone:
            ids.append(lineage.clone(decision.parent_id, generation, decision.hyperparameters, decision.mutation,
                                     decision.slot))
            continue
        if decision.hyperparameters != current.hyperparameters:
            lineage.mutate(current.id, generation, decision.hyperparameters, decision.mutation)
        ids.append(current.id)
    return ids
