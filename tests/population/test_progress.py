"""The progress line of a generation's training, drawn by tqdm on a terminal, from what the
members report step by step (in this process), and each step's loss in the train results."""
import io
import sys
from contextlib import contextmanager

from evo_sft.evolution.plan import SlotDecision
from evo_sft.progress import progress_line
from evo_sft.run import clones_line
from tests.helpers.console import on_a_terminal
from tests.helpers.tracking import make_controller


class Terminal(io.StringIO):
    """Where the line is drawn: text kept, and a terminal as far as tqdm can tell."""

    def isatty(self) -> bool:
        return True


def test_the_progress_line_counts_every_member_step_and_is_silent_off_a_terminal(tmp_path):
    screen, reports = Terminal(), []

    @contextmanager
    def progress(generation, total, unit):
        assert total == 3 * 3  # three members of three steps
        with progress_line(generation, total, unit, screen) as report:
            yield lambda done: (reports.append(done), report(done))

    controller = make_controller(tmp_path, [])
    controller.progress = progress
    record = controller.run_generation()
    drawn = screen.getvalue()
    assert "generation 1: 9/9 steps" in drawn and "tok/s" in drawn and "left" in drawn
    assert drawn.endswith("\r")  # the line is removed before the generation's table
    steps = [sum(s for s, _ in report.values()) for report in reports]
    assert steps == sorted(steps) and set(steps) == set(range(10))  # every step of every member, in order
    assert reports[-1] == {r.slot: (3, r.tokens) for r in record.train}
    for result in record.train:
        assert [step for step, _ in result.step_losses] == [1, 2, 3] == list(range(1, result.optimizer_step + 1))
        assert min(loss for _, loss in result.step_losses) <= result.train_loss <= max(l for _, l in result.step_losses)

    quiet = io.StringIO()
    with progress_line(2, 9, "step", quiet) as report:
        assert report is None
    assert quiet.getvalue() == ""



def test_a_terminal_that_reports_no_size_gets_the_line_80_columns_wide():
    """Issue 30, item 7: under `script` and some CI consoles the terminal says 0x0; tqdm then
    counted -1 rows and drew nothing. Each frame below is the line as the user sees it."""
    import re

    code = "from evo_sft.progress import progress_line\nwith progress_line(1, 3) as report:\n    report({0: (3, 300)})\n"
    frames = on_a_terminal([sys.executable, "-c", code], rows=0, columns=0).decode().split("\r")
    assert frames[0] == "" and frames[-1] == ""
    first, last, cleared = frames[1:-1]
    assert re.fullmatch(r"generation 1: 0/3 steps \| {32}\| \d\d:\d\d elapsed, \? left", first), first
    assert re.fullmatch(r"generation 1: 3/3 steps \|█{10}\| \d\d:\d\d elapsed, \d\d:\d\d left, [\d,]+ tok/s", last), last
    assert len(last) <= 80 and cleared == " " * 80  # the line is removed before the table


def test_the_clones_line_says_which_hyperparameter_each_clone_changed_or_that_it_changed_none():
    """Issue 30, item 11: a clone that was not mutated read `(none)`."""
    decisions = [SlotDecision(0, 4, False, {"lr": 1e-3}, "none"), SlotDecision(1, 4, True, {"lr": 1e-3}, "none"),
                 SlotDecision(3, 2, True, {"lr": 2e-3}, "lr")]
    assert clones_line(decisions) == "  clones: slot 1 <- member 4 (not mutated), slot 3 <- member 2 (lr)"
    assert clones_line(decisions[:1]) is None
