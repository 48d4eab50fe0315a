"""The schedule of a member's line, as Ray Tune's PBT replay has it: for each generation, the
member of the line that trained in it, its slot, the hyperparameters it trained with, its
fitness, the batches it trained on, and how many rows its slot's data stream had given out
before that generation. It is
what the parent run's `lineage_*` metrics and `schedule.png` show, and what `evo-sft replay`
retrains as one member."""
import math


def rows_before(lineage, slot: int, generation: int, batches: list[list[int]]) -> int:
    """The training rows `slot`'s stream gave its members in the generations before `generation`
    (`batches[g - 1][slot]` batches of `batch_size` rows in generation g)."""
    total = 0
    for earlier in range(1, generation):
        member = lineage.occupant(slot, earlier)
        total += batches[earlier - 1][slot] * lineage.hyperparameters_at(member, earlier)["batch_size"]
    return total


def line_schedule(lineage, member_id: int, fitness: list[float], batches: list[list[int]],
                  steps_per_generation: int) -> dict:
    """The schedule of `member_id`'s line over the generations of `fitness` (its line's fitness
    per generation, as the controller keeps it), with the batches each generation's member trained
    on (`batches[g - 1][slot]`, as the controller keeps them)."""
    generations = []
    for generation, member in enumerate(lineage.line(member_id, len(fitness)), start=1):
        slot = lineage.members[member].slot
        generations.append({
            "generation": generation, "member_id": member, "slot": slot,
            "hyperparameters": lineage.hyperparameters_at(member, generation),
            "fitness": fitness[generation - 1] if math.isfinite(fitness[generation - 1]) else None,
            "batches": None if slot is None else batches[generation - 1][slot],
            "rows_before": None if slot is None else rows_before(lineage, slot, generation, batches),
        })
    return {"member_id": member_id, "steps_per_generation": steps_per_generation, "generations": generations}
