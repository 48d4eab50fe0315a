"""Pure evolution logic: hyperparameters, selection, mutation, lineage and the generation plan."""

from evo_sft.evolution.hyperparameters import HyperparameterConfig, RLChoice, RLParameter
from evo_sft.evolution.lineage import Lineage, MemberInfo
from evo_sft.evolution.mutation import Explore, Mutations
from evo_sft.evolution.plan import MemberState, SlotDecision, apply_plan_to_lineage, plan_generation
from evo_sft.evolution.selection import TournamentSelection, TruncationSelection, elite, score

__all__ = [
    "Explore",
    "HyperparameterConfig",
    "Lineage",
    "MemberInfo",
    "MemberState",
    "Mutations",
    "RLChoice",
    "RLParameter",
    "SlotDecision",
    "TournamentSelection",
    "TruncationSelection",
    "apply_plan_to_lineage",
    "elite",
    "score",
    "plan_generation",
]
