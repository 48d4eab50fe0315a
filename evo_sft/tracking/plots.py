"""The pictures of an evolution, drawn with matplotlib into PNG files. Each marks one line of
members (the winning line: the winner and its ancestors, each in the generations it trained)."""
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

LINE_COLOR, OTHER_COLOR = "#d62728", "#8c8c8c"
SLOT_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9")  # none of them red, the winning line's colour
DPI = 110
MUTATION_ZORDER = 6  # a kept member's mutation marker, above the winning line (3) and edge labels (4)


def fitness_label(metric: str) -> str:
    return "fitness (-test loss)" if metric == "test_loss" else f"fitness ({metric})"


def plot_fitness_curves(lineage, fitness: dict, line: list[int], metric: str, path: Path) -> None:
    """Fitness per member over generations (from 1), faded, and the winning line over them. A
    clone's curve starts at its parent's point of the generation before it was born."""
    figure = Figure(figsize=(10, 6))
    axes = figure.subplots()
    others = 0
    for member in lineage.members.values():
        history = fitness.get(member.id, [])
        first = 0 if member.parent_id is None else member.generation_born - 2
        if first >= len(history):
            continue
        generations = list(range(first + 1, len(history) + 1))
        axes.plot(generations, [_finite(v) for v in history[first:]], "-", color=OTHER_COLOR, alpha=0.35,
                  linewidth=1, marker="o", markersize=2.5, label="other members" if not others else None)
        others += 1
    if line:
        winner = line[-1]
        history = [_finite(v) for v in fitness.get(winner, [])]
        generations = list(range(1, len(history) + 1))
        members = list(dict.fromkeys(line))
        chain = " → ".join(str(m) for m in members)
        axes.plot(generations, history, "-o", color=LINE_COLOR, linewidth=2.5, markersize=5, zorder=3,
                  label=f"winning line: member{'s' if len(members) > 1 else ''} {chain}")
        for generation, (member, before) in enumerate(zip(line, [None, *line]), start=1):
            if member != before and generation <= len(history) and math.isfinite(history[generation - 1]):
                axes.annotate(str(member), (generation, history[generation - 1]), textcoords="offset points",
                              xytext=(0, 8), ha="center", color=LINE_COLOR, fontsize=9, fontweight="bold")
    axes.set(xlabel="generation", ylabel=fitness_label(metric),
             title=f"fitness per member ({len(lineage.members)} members; labels: where the winning line "
                   f"passes to a new member)")
    axes.title.set_fontsize(10)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=9)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")


def plot_family_tree(lineage, fitness: dict, member_slots: dict, line: list[int], path: Path) -> None:
    family_tree_figure(lineage, fitness, member_slots, line).savefig(path, dpi=DPI, bbox_inches="tight")


def family_tree_figure(lineage, fitness: dict, member_slots: dict, line: list[int]) -> Figure:
    """x = generation (from 1), y = slot: a member's life is a horizontal bar labelled with its id;
    an edge joins a parent to each clone it had, whose mutation is written under its first point;
    a diamond, over any line, marks a kept member's mutation. The winning line is drawn in red."""
    generations = max((len(h) for h in fitness.values()), default=1)
    slots = max(member_slots.values(), default=0) + 1
    figure = Figure(figsize=(min(30, max(9, 1.6 * generations + 3)), min(30, max(4.5, 0.6 * slots + 2))))
    axes = figure.subplots()
    on_line = {member: [g for g, m in enumerate(line, start=1) if m == member] for member in set(line)}
    for member in lineage.members.values():
        slot = member_slots.get(member.id)
        if slot is None:
            continue
        start = member.generation_born
        end = max(start, len(fitness.get(member.id, [])))
        ours = member.id in on_line
        color = SLOT_COLORS[slot % len(SLOT_COLORS)]
        axes.plot([start, end], [slot, slot], "o-", color=color, linewidth=1.2, markersize=4, alpha=0.7)
        if ours:  # the generations it trained in as the winning line
            axes.plot([min(on_line[member.id]), max(on_line[member.id])], [slot, slot], "o-", color=LINE_COLOR,
                      linewidth=3, markersize=5, zorder=3)
        axes.annotate(str(member.id), (start, slot), textcoords="offset points", xytext=(-4, 5), ha="right",
                      fontsize=8, color=LINE_COLOR if ours else color, fontweight="bold" if ours else "normal")
        parent_slot = member_slots.get(member.parent_id)
        if parent_slot is not None:
            edge_on_line = ours and member.parent_id in on_line
            axes.plot([start - 1, start], [parent_slot, slot], "-", color=LINE_COLOR if edge_on_line else "gray",
                      linewidth=2.5 if edge_on_line else 0.8, alpha=1.0 if edge_on_line else 0.5,
                      zorder=3 if edge_on_line else 1)
            if member.mutation != "none":  # under the clone's first point, clear of its edge and of other slots
                axes.annotate(member.mutation, (start, slot), textcoords="offset points", xytext=(3, -9), ha="left",
                              va="top",
                              fontsize=8 if edge_on_line else 6.5, color=LINE_COLOR if edge_on_line else "dimgray",
                              fontweight="bold" if edge_on_line else "normal", zorder=4 if edge_on_line else 2,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    for event in lineage.events:
        slot = member_slots.get(event.get("member_id"))
        if event["kind"] == "mutate" and slot is not None:
            axes.plot([event["generation"]], [slot], "D", color="black", markeredgecolor="white", markersize=7,
                      zorder=MUTATION_ZORDER)
            axes.annotate(event["mutation"], (event["generation"], slot), textcoords="offset points", xytext=(0, -9),
                          ha="center", va="top", fontsize=7, color="black", zorder=MUTATION_ZORDER)
    axes.set(xlabel="generation", ylabel="slot")
    axes.set_title("family tree: member ids at birth; edges: parent → clone, its mutated hyperparameter "
                   "under its first point; ◆ a kept member mutated; red: the winning line", fontsize=10, pad=10)
    axes.set_yticks(range(slots))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(slots - 0.5, -0.8)  # slot 0 on top, room for its labels
    axes.set_xlim(0.6, generations + 0.4)
    return figure


def plot_schedule(schedule: dict, path: Path) -> None:
    """The winning line's fitness and hyperparameters per generation: lr and batch size, and every
    other one that changed along the line (the ones that never did are listed in the title)."""
    entries = schedule["generations"]
    generations = [entry["generation"] for entry in entries]
    names = list(entries[0]["hyperparameters"]) if entries else []
    changing = [name for name in names if name in ("lr", "batch_size")
                or len({repr(entry["hyperparameters"][name]) for entry in entries}) > 1]
    fixed = ", ".join(f"{name}={entries[0]['hyperparameters'][name]}" for name in names if name not in changing)
    figure = Figure(figsize=(10, 2.0 * (len(changing) + 1) + 0.8))
    panels = figure.subplots(len(changing) + 1, 1, sharex=True, squeeze=False)[:, 0]
    panels[0].plot(generations, [math.nan if e["fitness"] is None else e["fitness"] for e in entries], "-o",
                   color=LINE_COLOR)
    panels[0].set_ylabel("fitness")
    for generation, entry, before in zip(generations, entries, [None, *entries]):
        if before is None or entry["member_id"] != before["member_id"]:
            panels[0].annotate(f"member {entry['member_id']}", (generation, panels[0].get_ylim()[1]),
                               textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    for axes, name in zip(panels[1:], changing):
        values = [entry["hyperparameters"][name] for entry in entries]
        if all(isinstance(v, str) for v in values):
            choices = sorted(set(values))
            axes.step(generations, [choices.index(v) for v in values], "-o", where="mid", color="C0")
            axes.set_yticks(range(len(choices)), choices)
        else:
            axes.step(generations, values, "-o", where="mid", color="C0")
            if name == "lr" and max(values) > 3 * min(values) > 0:
                axes.set_yscale("log")
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
            axes.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
            if all(isinstance(v, int) for v in values):
                axes.yaxis.set_major_locator(MaxNLocator(integer=True))
            for generation, value in zip(generations, values):
                axes.annotate(f"{value:.3g}", (generation, value), textcoords="offset points", xytext=(0, 5),
                              ha="center", fontsize=7)
        axes.set_ylabel(name)
        axes.margins(y=0.25)
    for axes in panels:
        axes.grid(alpha=0.3)
    panels[-1].set_xlabel("generation")
    panels[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"the winning line's schedule (member {schedule['member_id']})"
                    + (f"\nunchanged: {fixed}" if fixed else ""), fontsize=10)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan
