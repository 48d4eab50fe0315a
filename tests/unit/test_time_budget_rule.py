"""The wall-clock budget's stop rule (`evo_sft.time_budget.Deadline`), against counting the steps
that fit one by one."""
from evo_sft.time_budget import Deadline

AT = 100.0


def fit_one_by_one(left: float, step_s: float, other_s: float, steps: int) -> int:
    """The most steps n <= steps with n steps and then the rest of the iteration done in `left` seconds."""
    n = 0
    while n < steps and (n + 1) * step_s + other_s <= left:
        n += 1
    return n


def test_before_any_measurement_a_whole_iteration_fits_while_time_is_left():
    deadline = Deadline(AT)
    assert deadline.steps_that_fit(6, now=AT - 0.1) == 6
    assert deadline.steps_that_fit(6, now=AT) == 0
    assert deadline.steps_that_fit(6, now=AT + 50) == 0


def test_after_a_measurement_only_the_steps_that_fit_with_the_rest_of_the_iteration():
    deadline = Deadline(AT)
    deadline.measured(10, train_s=5.0, other_s=2.0)  # 0.5 s a step
    lefts = [k * 0.25 for k in range(-4, 40)]
    assert [deadline.steps_that_fit(10, now=AT - left) for left in lefts] == \
        [fit_one_by_one(left, 0.5, 2.0, 10) for left in lefts]
    assert deadline.steps_that_fit(10, now=AT - 3.0) == 2
    assert deadline.steps_that_fit(10, now=AT - 2.25) == 0  # time is left, but not for one step and the rest
    assert deadline.steps_that_fit(10, now=AT - 1000) == 10


def test_an_iteration_without_steps_keeps_the_step_time_and_takes_its_other_time():
    deadline = Deadline(AT)
    deadline.measured(10, train_s=5.0, other_s=2.0)
    deadline.measured(0, train_s=0.0, other_s=3.0)
    assert deadline.steps_that_fit(10, now=AT - 4.5) == fit_one_by_one(4.5, 0.5, 3.0, 10) == 3


def test_the_forecast_goes_on_in_another_process_from_its_state():
    measured = Deadline(AT)
    measured.measured(4, train_s=3.0, other_s=1.5)
    carried = Deadline(AT, **measured.state_dict())
    lefts = [k * 0.25 for k in range(-4, 40)]
    assert [carried.steps_that_fit(4, now=AT - left) for left in lefts] == \
        [fit_one_by_one(left, 0.75, 1.5, 4) for left in lefts]
