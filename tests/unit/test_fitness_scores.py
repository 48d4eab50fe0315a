"""The fitness choices of issue 23 as pure logic: normalised exact match, accuracy against a label,
user functions loaded by name and what happens when they misbehave. No torch: the scores are
computed from text."""
import pytest

from evo_sft.fitness import (
    FITNESSES, Accuracy, ExactMatch, FitnessFunctionError, NegativeTestLoss, UserFunction, answers, load_function,
    make_fitness, normalise,
)
from tests.helpers import fitness_functions

MODULE = "tests.helpers.fitness_functions"


def test_the_known_fitnesses_and_how_they_are_shown():
    assert list(FITNESSES) == ["test_loss", "exact_match", "accuracy"]
    loss, exact = NegativeTestLoss(), ExactMatch()
    assert (loss.metric, loss.higher_is_better, loss.generates, loss.shown(-1.5)) == ("test_loss", False, False, 1.5)
    assert (exact.metric, exact.higher_is_better, exact.generates, exact.shown(0.75)) == ("exact_match", True, True, 0.75)
    assert loss.score(1.25, [], [], []) == -1.25


@pytest.mark.parametrize("a, b, same", [
    ("cba", "cba", True), (" cba\n", "cba", True), ("CBA", "cba", True), ("a  b\tc", "a b c", True),
    ("ﬁ", "fi", True),  # NFKC: the ligature is two letters
    ("cba.", "cba", False), ("cb a", "cba", False), ("", "cba", False), ("3.14", "314", False),
])
def test_normalisation(a, b, same):
    assert (normalise(a) == normalise(b)) is same


def test_exact_match_is_the_share_of_equal_normalised_responses():
    generations, references = ["cba", " ED\n", "gf", "x"], ["cba", "ed", "fg", "x."]
    assert ExactMatch().score(9.0, ["p"] * 4, generations, references) == 0.5


@pytest.mark.parametrize("generation, label, correct", [
    ("B", "B", True), ("B) Paris", "B", True), ("b.", "B", True), (" positive, clearly", "Positive", True),
    ("Blue", "B", False), ("A", "B", False), ("", "B", False), ("(a) yes", "(a)", True), ("(a)x", "(a)", True),
    ("3", "3", True), ("35", "3", False), ("new yorker", "new york", False), ("new york, ny", "new york", True),
])
def test_accuracy_answers_with_the_label_not_a_longer_word(generation, label, correct):
    assert answers(generation, label) is correct


def test_accuracy_is_the_share_of_rows_answered_with_their_label():
    assert Accuracy().score(0.0, ["p"] * 4, ["B) Paris", "Blue", "1", "no"], ["B", "B", "1", "yes"]) == 0.5


def test_scored_rows_are_the_first_eval_rows_or_all():
    assert ExactMatch(eval_rows=8).scored_rows(100, full=False) == 8
    assert ExactMatch(eval_rows=8).scored_rows(100, full=True) == 100
    assert ExactMatch(eval_rows=800).scored_rows(100, full=False) == 100
    assert ExactMatch().scored_rows(100, full=False) == 100
    assert NegativeTestLoss().scored_rows(100, full=False) == 100


# ----------------------------------------------------------------------- user functions
def test_a_user_function_is_loaded_by_name_and_called_with_the_texts():
    fitness = make_fitness(f"{MODULE}:share_equal", eval_rows=4, max_new_tokens=7)
    assert isinstance(fitness, UserFunction)
    assert (fitness.name, fitness.metric, fitness.higher_is_better, fitness.generates) == \
        (f"{MODULE}:share_equal", "share_equal", True, True)
    assert (fitness.eval_rows, fitness.max_new_tokens) == (4, 7)
    assert fitness.score(1.0, ["p", "q"], ["a", "b"], ["a", "c"]) == 0.5
    fitness_functions.CALLS.clear()
    assert make_fitness(f"{MODULE}:recorded").score(1.0, ["p"], ["g"], ["r"]) == 0.5
    assert fitness_functions.CALLS == [(["p"], ["g"], ["r"])]


@pytest.mark.parametrize("name, fragment", [
    ("raises", "raised RuntimeError: the grader is down"),
    ("returns_nan", "returned nan, not a finite number"),
    ("returns_text", "returned str '0.9', not a number"),
    ("returns_none", "returned NoneType None, not a number"),
])
def test_a_misbehaving_user_function_is_an_error_naming_it(name, fragment):
    with pytest.raises(FitnessFunctionError) as info:
        make_fitness(f"{MODULE}:{name}").score(1.0, ["p"], ["g"], ["r"])
    assert f"fitness function {MODULE}:{name} {fragment}" in str(info.value)


@pytest.mark.parametrize("reference, fragment", [
    ("exactmatch", "unknown fitness 'exactmatch' (did you mean 'exact_match'?); known: test_loss, exact_match, "
                   "accuracy, or a function as module:function"),
    ("no_such_module_here:score", "cannot load fitness function 'no_such_module_here:score': importing "
                                  "no_such_module_here raised ModuleNotFoundError"),
    (f"{MODULE}:missing", f"module {MODULE} has no function 'missing'"),
    (f"{MODULE}:NOT_A_FUNCTION", f"module {MODULE} has no function 'NOT_A_FUNCTION'"),
    (f"{MODULE}:takes_one", "must take (prompts, generations, references)"),
    (f"{MODULE}:", "unknown fitness"),
])
def test_an_unloadable_function_is_a_value_error_naming_it(reference, fragment):
    with pytest.raises(ValueError) as info:
        load_function(reference)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_load_function_returns_the_function():
    assert load_function(f"{MODULE}:share_equal") is fitness_functions.share_equal
