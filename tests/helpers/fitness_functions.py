"""User fitness functions for the tests, named as `evolution.fitness` names them
(`tests.helpers.fitness_functions:<name>`). Light: nothing beyond the standard library."""
import math

CALLS = []  # the arguments of every call of `recorded`, in order


def share_equal(prompts, generations, references):
    """The share of generations equal to their reference, as given (no normalisation)."""
    return sum(g == r for g, r in zip(generations, references)) / len(references)


def recorded(prompts, generations, references):
    CALLS.append((list(prompts), list(generations), list(references)))
    return 0.5


def raises(prompts, generations, references):
    raise RuntimeError("the grader is down")


def returns_nan(prompts, generations, references):
    return math.nan


def returns_text(prompts, generations, references):
    return "0.9"


def returns_none(prompts, generations, references):
    return None


def takes_one(generations):
    return 1.0


NOT_A_FUNCTION = 3
