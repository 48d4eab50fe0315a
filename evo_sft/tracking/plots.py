"""The pictures of an evolution, drawn with matplotlib into PNG files."""
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_family_tree(lineage, fitness: dict, member_slots: dict, path: Path) -> None:
    """x = generation (from 1), y = slot: a member's life is a horizontal line labelled with its id
    at its start; a thin line joins a parent to each clone it had."""
    generations = max((len(h) for h in fitness.values()), default=1)
    slots = max(member_slots.values(), default=0) + 1
    figure = Figure(figsize=(min(40, 2 + 0.5 * generations), min(40, 1.5 + 0.5 * slots)))
    axes = figure.subplots()
    for member in lineage.members.values():
        slot = member_slots.get(member.id)
        if slot is None:
            continue
        start = member.generation_born
        end = max(start, len(fitness.get(member.id, [])))
        axes.plot([start, end], [slot, slot], "o-", color=f"C{slot % 10}", markersize=4)
        axes.annotate(str(member.id), (start, slot), textcoords="offset points", xytext=(0, 6), ha="center")
        parent_slot = member_slots.get(member.parent_id)
        if parent_slot is not None:
            axes.plot([start - 1, start], [parent_slot, slot], "-", color="gray", linewidth=0.8)
    axes.set(xlabel="generation", ylabel="slot")
    axes.set_title("family tree (labels: member ids)", pad=12)
    axes.set_yticks(range(slots))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.margins(0.1, 0.15)
    axes.invert_yaxis()
    figure.savefig(path, dpi=100, bbox_inches="tight")


def plot_fitness_curves(lineage, fitness: dict, path: Path) -> None:
    """Fitness per member over generations (from 1); each curve ends with the member's id. A clone's
    history starts as a copy of its parent's, so its curve starts at the parent's point of the
    generation before it was born."""
    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    for member in lineage.members.values():
        history = fitness.get(member.id, [])
        points = range(0 if member.parent_id is None else member.generation_born - 2, len(history))
        if not points:
            continue
        generations = [index + 1 for index in points]
        values = [history[index] if math.isfinite(history[index]) else math.nan for index in points]
        axes.plot(generations, values, "o-", markersize=3)
        if math.isfinite(values[-1]):
            axes.annotate(str(member.id), (generations[-1], values[-1]), textcoords="offset points",
                          xytext=(4, 0))
    axes.set(xlabel="generation", ylabel="fitness (-test loss)", title="fitness per member")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path, dpi=100, bbox_inches="tight")
