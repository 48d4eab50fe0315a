"""A wall-clock budget: how many optimizer steps still fit before a deadline. The evolution's
controller and the trials of the Ray Tune baselines stop by this one rule."""
import math
import time


class Deadline:
    """Training and the work after it should be done by `at` (a `time.time()`). Each `measured`
    iteration (a generation, or a trial's iteration) is the forecast for the next: its seconds a
    step, and its seconds outside training (evaluation, selection, checkpoint, report). Before
    anything is measured, a whole iteration fits as long as any time is left."""

    def __init__(self, at: float, step_s: float | None = None, other_s: float = 0.0):
        self.at, self.step_s, self.other_s = at, step_s, other_s

    def measured(self, steps: int, train_s: float, other_s: float) -> None:
        """An iteration of `steps` optimizer steps took `train_s` seconds of training and
        `other_s` seconds besides."""
        if steps > 0:
            self.step_s = train_s / steps
        self.other_s = other_s

    def steps_that_fit(self, steps: int, now: float | None = None) -> int:
        """How many of an iteration's `steps` can be trained, with the rest of the iteration
        after them, by the deadline: 0 once it has passed or not one step fits."""
        left = self.at - (time.time() if now is None else now)
        if left <= 0:
            return 0
        if self.step_s is None:
            return steps
        return max(0, min(steps, math.floor((left - self.other_s) / self.step_s)))

    def state_dict(self) -> dict:
        """The measured forecast (not the deadline), for a process that goes on where this one stopped."""
        return {"step_s": self.step_s, "other_s": self.other_s}
