import json

import pytest

from evo_sft.evolution import Lineage, MemberInfo


def json_round_trip(lineage):
    return Lineage.from_dict(json.loads(json.dumps(lineage.to_dict())))


def make_family():
    lineage = Lineage()
    a = lineage.found({"lr": 1e-3})
    b = lineage.found({"lr": 2e-3})
    child = lineage.clone(a, 1, {"lr": 1.2e-3}, "lr")
    grandchild = lineage.clone(child, 2, {"lr": 1.2e-3}, "none")
    return lineage, a, b, child, grandchild


def test_ids_are_unique_and_parents_recorded():
    lineage, a, b, child, grandchild = make_family()
    assert len({a, b, child, grandchild}) == 4
    assert lineage.members[child] == MemberInfo(child, a, 1, "lr", {"lr": 1.2e-3})
    assert lineage.members[b].parent_id is None
    assert lineage.ancestry(grandchild) == [grandchild, child, a]
    assert lineage.ancestry(b) == [b]


def test_every_change_appends_an_event():
    lineage, a, b, child, _ = make_family()
    lineage.mutate(b, 3, {"lr": 1.6e-3}, "lr")
    lineage.record("nonfinite", 3, member_id=a, fitness=float("-inf"))
    assert [e["kind"] for e in lineage.events] == ["found", "found", "clone", "clone", "mutate", "nonfinite"]
    assert lineage.events[2] == {
        "kind": "clone",
        "generation": 1,
        "member_id": child,
        "parent_id": a,
        "hyperparameters": {"lr": 1.2e-3},
        "mutation": "lr",
    }
    assert lineage.events[4]["member_id"] == b and lineage.events[4]["mutation"] == "lr"
    assert lineage.members[b].hyperparameters == {"lr": 1.6e-3}
    assert lineage.events[5]["fitness"] == float("-inf")


def test_lineage_keeps_its_own_copy_of_hyperparameters():
    lineage = Lineage()
    hp = {"lr": 1e-3, "layers": [1, 2]}
    member = lineage.found(hp)
    hp["lr"] = 5.0
    hp["layers"].append(3)
    assert lineage.members[member].hyperparameters == {"lr": 1e-3, "layers": [1, 2]}
    assert lineage.events[0]["hyperparameters"] == {"lr": 1e-3, "layers": [1, 2]}


def test_json_round_trip_is_exact():
    lineage, a, b, _, _ = make_family()
    lineage.mutate(a, 3, {"lr": 9e-4}, "lr")
    lineage.record("restart", 4, slot=1, reason="actor died")
    d = lineage.to_dict()
    restored = json_round_trip(lineage)
    assert restored.to_dict() == d
    assert restored.members == lineage.members
    assert restored.ancestry(3) == lineage.ancestry(3)


def test_ids_are_never_reused_after_a_round_trip():
    lineage, *ids = make_family()
    restored = json_round_trip(lineage)
    new_ids = [restored.found({"lr": 1e-4}), restored.clone(ids[0], 5, {"lr": 1e-4}, "none")]
    assert not set(new_ids) & set(ids)
    assert len(set(new_ids)) == 2


def test_from_dict_rejects_a_counter_that_would_reuse_ids():
    d = make_family()[0].to_dict()
    d["next_id"] = 2
    with pytest.raises(ValueError, match="reuse"):
        Lineage.from_dict(d)


def test_unknown_ids_raise():
    lineage = Lineage()
    with pytest.raises(KeyError, match="unknown parent id 7"):
        lineage.clone(7, 1, {}, "none")
    with pytest.raises(KeyError, match="unknown member id 7"):
        lineage.mutate(7, 1, {}, "lr")


def test_non_serialisable_event_fails_early():
    with pytest.raises(TypeError):
        Lineage().record("replace", 1, member=object())


def test_hyperparameters_at_a_generation_are_those_trained_with_not_the_latest():
    """Generations count from 1; a mutation or clone recorded at generation g opens g (it is
    made from the scores of g - 1) and is what the member trains and is scored with in g."""
    lineage = Lineage()
    a = lineage.found({"lr": 1e-3})
    assert lineage.members[a].generation_born == 1
    lineage.mutate(a, 2, {"lr": 2e-3}, "lr")  # opens generation 2
    lineage.mutate(a, 4, {"lr": 4e-3}, "lr")  # opens generation 4
    child = lineage.clone(a, 4, {"lr": 8e-3}, "lr")
    assert lineage.hyperparameters_at(a, 1) == {"lr": 1e-3}
    assert lineage.hyperparameters_at(a, 2) == {"lr": 2e-3}
    assert lineage.hyperparameters_at(a, 3) == {"lr": 2e-3}
    assert lineage.hyperparameters_at(a, 4) == {"lr": 4e-3}
    assert lineage.members[a].hyperparameters == {"lr": 4e-3}
    assert lineage.hyperparameters_at(child, 3) == {"lr": 2e-3}, "before its birth a clone answers for its parent"
    assert lineage.hyperparameters_at(child, 4) == {"lr": 8e-3}


def slotted_family():
    """Two slots over four generations: founders 0 (slot 0, batch 8) and 1 (slot 1, batch 16);
    generation 2 opens with 2 = clone of 0 into slot 1 (batch 24); generation 4 opens with 3 =
    clone of 2 into slot 0 (batch 32), and 2 mutates to batch 16 in generation 3."""
    lineage = Lineage()
    first = lineage.found({"batch_size": 8}, slot=0)
    second = lineage.found({"batch_size": 16}, slot=1)
    child = lineage.clone(first, 2, {"batch_size": 24}, "batch_size", slot=1)
    lineage.mutate(child, 3, {"batch_size": 16}, "batch_size")
    grandchild = lineage.clone(child, 4, {"batch_size": 32}, "batch_size", slot=0)
    return lineage, (first, second, child, grandchild)


def test_a_line_names_the_ancestor_that_trained_in_each_generation():
    lineage, (first, second, child, grandchild) = slotted_family()
    assert lineage.line(grandchild, 5) == [first, child, child, grandchild, grandchild]
    assert lineage.line(second, 2) == [second, second]
    assert [lineage.occupant(1, g) for g in (1, 2, 3)] == [second, child, child]
    assert [lineage.occupant(0, g) for g in (1, 3, 4)] == [first, first, grandchild]
    assert json_round_trip(lineage).members[grandchild].slot == 0


def test_a_line_schedule_counts_the_rows_each_slot_gave_out_before_a_generation():
    from evo_sft.evolution.schedule import line_schedule

    lineage, (first, _, child, grandchild) = slotted_family()
    batches = [[10, 10], [10, 12], [7, 12], [5, 5]]  # per generation, per slot (token intervals make them differ)
    schedule = line_schedule(lineage, grandchild, [-3.0, -2.0, float("-inf"), -1.0], batches, steps_per_generation=10)
    entries = schedule["generations"]
    assert [(e["member_id"], e["slot"]) for e in entries] == [(first, 0), (child, 1), (child, 1), (grandchild, 0)]
    assert [e["hyperparameters"]["batch_size"] for e in entries] == [8, 24, 16, 32]
    assert [e["fitness"] for e in entries] == [-3.0, -2.0, None, -1.0]
    assert [e["batches"] for e in entries] == [10, 12, 12, 5]
    # slot 1 gave 10 x 16 rows to founder 1 before generation 2, then 12 x 24 to its clone in generation 2;
    # slot 0 gave (10 + 10 + 7) x 8 rows to founder 0 before generation 4
    assert [e["rows_before"] for e in entries] == [0, 160, 160 + 12 * 24, 27 * 8]
