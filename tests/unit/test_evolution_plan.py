import math
import subprocess
import sys

import numpy as np

from evo_sft.evolution import (
    HyperparameterConfig,
    Lineage,
    MemberState,
    Mutations,
    RLParameter,
    TournamentSelection,
    TruncationSelection,
    apply_plan_to_lineage,
    plan_generation,
)
from tests.helpers.paths import REPO

CONFIG = HyperparameterConfig(
    lr=RLParameter(min=1e-5, max=1e-2),
    batch_size=RLParameter(min=1, max=64, dtype=int),
)


def make_members(fitnesses, first_id=0):
    return [
        MemberState(first_id + i, {"lr": 1e-3 * (i + 1), "batch_size": 8}, f) for i, f in enumerate(fitnesses)
    ]


def test_same_seed_gives_the_same_plan():
    members = make_members([-2.0, -1.0, -3.0, -1.5, float("nan"), -2.5])
    args = (TournamentSelection(2, True, 6), Mutations(no_mutation=0.2, rl_hp=0.8), CONFIG)
    plans = [plan_generation(members, *args, np.random.default_rng(11), {"batch_size": 4}) for _ in range(2)]
    assert plans[0] == plans[1]


def test_full_tournament_clones_the_elite_everywhere_else():
    members = make_members([-2.0, -1.0, -3.0], first_id=10)
    selection = TournamentSelection(3, True, 3)
    decisions = plan_generation(members, selection, Mutations(), CONFIG, np.random.default_rng(0))
    assert [d.slot for d in decisions] == [0, 1, 2]
    assert [d.parent_id for d in decisions] == [11, 11, 11]
    assert [d.clone for d in decisions] == [True, False, True]


def test_a_member_with_non_finite_fitness_is_replaced_by_a_clone_of_the_elite():
    """A tournament of one draws a random member, often the failed member itself; never kept."""
    members = make_members([-2.0, float("nan"), -1.0, -math.inf], first_id=20)
    for seed in range(20):
        decisions = plan_generation(members, TournamentSelection(1, True, 4), Mutations(), CONFIG,
                                    np.random.default_rng(seed))
        assert [(d.parent_id, d.clone) for d in decisions[1:]] == [(22, True), (22, False), (22, True)]


def test_elite_is_not_mutated_when_mutate_elite_is_false():
    members = make_members([-2.0, -1.0, -3.0])
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0, mutate_elite=False)
    for seed in range(20):
        decisions = plan_generation(members, TournamentSelection(2, True, 3), mutations, CONFIG,
                                       np.random.default_rng(seed))
        elite = decisions[1]
        assert (elite.parent_id, elite.clone, elite.mutation) == (1, False, "none")
        assert elite.hyperparameters == members[1].hyperparameters
        assert all(d.mutation != "none" for d in decisions if d.slot != 1)


def test_elite_is_mutated_when_mutate_elite_is_true():
    members = make_members([-2.0, -1.0, -3.0])
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0, mutate_elite=True)
    decisions = plan_generation(members, TournamentSelection(2, True, 3), mutations, CONFIG,
                                   np.random.default_rng(0))
    assert decisions[1].mutation != "none" and not decisions[1].clone
    assert decisions[1].hyperparameters != members[1].hyperparameters


def test_mutation_starts_from_the_parent_and_respects_multiple_of():
    members = make_members([-2.0, -1.0, -3.0, -4.0])
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0)
    decisions = plan_generation(members, TournamentSelection(4, True, 4), mutations, CONFIG,
                                   np.random.default_rng(5), {"batch_size": 4})
    for d in decisions:
        parent_hp = members[1].hyperparameters
        if d.mutation == "lr":
            assert d.hyperparameters["batch_size"] == 8
            assert d.hyperparameters["lr"] in (parent_hp["lr"] * 0.8, parent_hp["lr"] * 1.2)
        else:
            assert d.hyperparameters["lr"] == parent_hp["lr"]
            assert d.hyperparameters["batch_size"] in (4, 12)


def test_apply_plan_to_lineage():
    lineage = Lineage()
    members = []
    for i, fitness in enumerate([-2.0, -1.0, -3.0]):
        hp = {"lr": 1e-3 * (i + 1), "batch_size": 8}
        members.append(MemberState(lineage.found(hp), hp, fitness))
    mutations = Mutations(no_mutation=0.0, rl_hp=1.0)
    decisions = plan_generation(members, TournamentSelection(3, True, 3), mutations, CONFIG,
                                   np.random.default_rng(0))
    ids = apply_plan_to_lineage(lineage, decisions, members, generation=1)

    assert ids[1] == members[1].id
    assert lineage.members[ids[1]].hyperparameters == decisions[1].hyperparameters
    for slot in (0, 2):
        assert ids[slot] not in {m.id for m in members}
        assert lineage.ancestry(ids[slot]) == [ids[slot], members[1].id]
        assert lineage.members[ids[slot]].generation_born == 1
    assert [e["kind"] for e in lineage.events[3:]] == ["clone", "mutate", "clone"]


def test_kept_member_without_change_records_nothing():
    lineage = Lineage()
    hp = {"lr": 1e-3, "batch_size": 8}
    members = [MemberState(lineage.found(hp), hp, -1.0)]
    mutations = Mutations(no_mutation=1.0, rl_hp=0.0)
    decisions = plan_generation(members, TournamentSelection(1, True, 1), mutations, CONFIG,
                                   np.random.default_rng(0))
    assert apply_plan_to_lineage(lineage, decisions, members, generation=1) == [members[0].id]
    assert len(lineage.events) == 1


def test_evolution_with_an_untouched_elite_never_loses_its_best():
    def fitness(hp):
        return -abs(math.log10(hp["lr"]) + 3.0) - abs(hp["batch_size"] - 16) / 16

    rng = np.random.default_rng(0)
    lineage = Lineage()
    hps = [{"lr": 1e-5, "batch_size": 2}, {"lr": 1e-2, "batch_size": 60}, {"lr": 5e-5, "batch_size": 4}]
    ids = [lineage.found(hp) for hp in hps]
    selection = TournamentSelection(2, True, 3)
    mutations = Mutations(no_mutation=0.2, rl_hp=0.8, mutate_elite=False)
    best = []
    for generation in range(1, 41):
        members = [MemberState(i, lineage.members[i].hyperparameters, fitness(lineage.members[i].hyperparameters))
                   for i in ids]
        best.append(max(m.fitness for m in members))
        decisions = plan_generation(members, selection, mutations, CONFIG, rng, {"batch_size": 2})
        ids = apply_plan_to_lineage(lineage, decisions, members, generation)
    assert best == sorted(best)
    assert best[-1] > best[0] + 1.0
    assert Lineage.from_dict(lineage.to_dict()).to_dict() == lineage.to_dict()


def test_evolution_package_imports_neither_torch_nor_ray():
    # Load evo_sft.evolution without running evo_sft/__init__.py, which may import torch.
    package_dir = REPO / "evo_sft"
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('evo_sft'); pkg.__path__ = [{str(package_dir)!r}]\n"
        "sys.modules['evo_sft'] = pkg\n"
        "import evo_sft.evolution\n"
        "heavy = sorted({'torch', 'ray', 'mlflow', 'transformers', 'peft'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_truncation_mutates_only_the_clones_and_each_of_them():
    """PBT's exploit and explore: survivors keep their hyperparameters even where no_mutation is
    0; the clone is mutated even where no_mutation is 1 less than certain."""
    members = make_members([-2.0, -1.0, -3.0, -1.5], first_id=30)
    for seed in range(20):
        decisions = plan_generation(members, TruncationSelection(0.25, 4), Mutations(no_mutation=0.9, rl_hp=0.1),
                                    CONFIG, np.random.default_rng(seed))
        kept = [d for d in decisions if d.slot != 2]
        assert all(not d.clone and d.mutation == "none" and d.hyperparameters == members[d.slot].hyperparameters
                   for d in kept)
        clone = decisions[2]
        assert (clone.parent_id, clone.clone) == (31, True)
        assert clone.mutation in ("lr", "batch_size") and clone.hyperparameters != members[1].hyperparameters
