"""The family tree picture as drawn: where its labels land on the canvas and what is drawn over
what, read back from the matplotlib figure (issue 30, item 11: a kept member's mutation marker
was hidden under the winning line's dot, an edge label sat on another slot's bar)."""
import itertools

from matplotlib.backends.backend_agg import FigureCanvasAgg

from evo_sft.evolution import Lineage
from evo_sft.tracking.plots import LINE_COLOR, family_tree_figure


def _tree():
    """Four slots over three generations: member 0 (slot 0) wins throughout and is mutated in
    generation 2; generation 2 brings a clone of 0 into slot 3 (an edge across two other slots)
    and clones of 1 and 2 into each other's slots (crossing edges)."""
    lineage, hp = Lineage(), {"lr": 1e-3}
    founders = [lineage.found(hp, 1, slot) for slot in range(4)]
    lineage.mutate(founders[0], 2, {"lr": 2e-3}, "lr")
    across = lineage.clone(founders[0], 2, hp, "batch_size", 3)
    down = lineage.clone(founders[1], 2, hp, "lr", 2)
    up = lineage.clone(founders[2], 2, hp, "warmup_steps", 1)
    slots = {founders[0]: 0, founders[1]: 1, founders[2]: 2, founders[3]: 3, across: 3, down: 2, up: 1}
    fitness = {member: [0.1, 0.2, 0.3] if member in (founders[0], across, down, up) else [0.1] for member in slots}
    return family_tree_figure(lineage, fitness, slots, [founders[0]] * 3)


def test_labels_sit_apart_and_off_every_bar_and_the_mutation_marker_is_over_the_winning_line():
    figure = _tree()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    axes, renderer = figure.axes[0], canvas.get_renderer()
    boxes = {f"{text.get_text()}@{text.xy}": text.get_window_extent(renderer) for text in axes.texts}
    mutations = [name for name in boxes if name.split("@")[0] in ("batch_size", "lr", "warmup_steps")]
    assert len(mutations) == 4  # three clones and the kept member's mutation
    bars = [axes.transData.transform((1, slot))[1] for slot in range(4)]  # each slot's bar, in pixels
    for name in mutations:
        assert not [slot for slot, y in enumerate(bars) if boxes[name].y0 <= y <= boxes[name].y1], \
            f"the label {name} sits on a slot's bar"
    for a, b in itertools.combinations(boxes, 2):
        assert not boxes[a].overlaps(boxes[b]), f"the labels {a} and {b} overlap"

    (marker,) = [line for line in axes.lines if line.get_marker() == "D"]
    assert (list(marker.get_xdata()), list(marker.get_ydata())) == ([2], [0])  # on the winning line's dot
    winning = [line for line in axes.lines if line.get_color() == LINE_COLOR]
    assert winning and marker.get_zorder() > max(line.get_zorder() for line in winning)
