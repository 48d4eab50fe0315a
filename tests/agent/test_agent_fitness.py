"""Fitness on what the model says (issue 23), for one agent: exact match, accuracy and user
functions score greedy responses to the first `eval_rows` test rows, the test loss comes along
whatever the fitness, and a misbehaving user function costs the member (-inf and a warning
naming it), not the run. Checked against a bigram model whose outputs and loss are known by
construction (tests/helpers/bigram.py) and against transformers' own `generate`."""
import math
import warnings

import pytest
import torch

from evo_sft.fitness import EVAL_BATCH_SIZE, make_fitness
from tests.helpers import fitness_functions
from tests.helpers.bigram import bigram_agent
from tests.helpers.reference import hf_greedy

MODULE = "tests.helpers.fitness_functions"
SAYS_AB = {"\n": {"a": 4.0}, "a": {"b": 4.0}, "b": {"<|im_end|>": 4.0}, "<|im_end|>": {"\n": 4.0}}


@pytest.fixture
def rows(dataset):
    """Six test rows; the bigram model answers "ab" to every prompt, right for four of them."""
    prompts = [f"row {i}" for i in range(6)]
    responses = ["ab", "ab", "ba", "AB ", "abc", "ab"]
    return dataset(prompts, responses).add_column("label", ["a", "ab", "AB", "b", "Ab", "x"])


@pytest.fixture
def says_ab(tokenizer):
    return bigram_agent(tokenizer, SAYS_AB)


def test_exact_match_scores_the_first_eval_rows_and_brings_the_test_loss(says_ab, make_gym, rows, tokenizer,
                                                                          reference):
    gym = make_gym(rows)
    outputs = [tokenizer.decode(hf_greedy(says_ab.actor, prompt, 3)[:2]) for prompt in gym.test_prompts(6)]
    assert outputs == ["ab"] * 6  # the model as constructed
    with torch.no_grad():
        loss = float(reference.token_mean_loss(says_ab.actor, tokenizer, rows["prompt"], rows["response"]))
    for options, expected in (({}, 4 / 6), ({"eval_rows": 2}, 1.0), ({"eval_rows": 3}, 2 / 3),
                              ({"eval_rows": 100}, 4 / 6)):
        evaluation = make_fitness("exact_match", **options).evaluate(says_ab, gym)
        assert evaluation.fitness == pytest.approx(expected)
        assert evaluation.test_loss == pytest.approx(loss, rel=1e-6)  # the whole test set, whatever eval_rows
        assert says_ab.fitness[-1] == evaluation.fitness
    assert make_fitness("exact_match", eval_rows=2).evaluate(says_ab, gym, full=True).fitness == pytest.approx(4 / 6)


def test_samples_are_the_first_rows_beside_their_references(says_ab, make_gym, rows):
    evaluation = make_fitness("exact_match", eval_rows=2, samples=3).evaluate(says_ab, make_gym(rows))
    assert evaluation.samples == tuple({"prompt": f"row {i}", "reference": rows["response"][i], "output": "ab"}
                                       for i in range(3))
    assert make_fitness("exact_match", samples=0).evaluate(says_ab, make_gym(rows)).samples == ()
    assert len(make_fitness("test_loss", samples=50).evaluate(says_ab, make_gym(rows)).samples) == 6


def test_the_test_loss_fitness_is_unchanged_and_generates_only_its_samples(says_ab, make_gym, rows):
    gym = make_gym(rows)
    evaluation = make_fitness("test_loss", samples=1).evaluate(says_ab, gym)
    assert evaluation.fitness == -evaluation.test_loss == says_ab.test(gym, batch_size=EVAL_BATCH_SIZE)
    assert evaluation.samples == ({"prompt": "row 0", "reference": "ab", "output": "ab"},)


def test_accuracy_compares_with_the_reference_column(says_ab, make_gym, rows):
    """Labels a, ab, AB, b, Ab, x against the answer "ab": ab, AB and Ab are answered."""
    gym = make_gym(rows, reference_column="label")
    assert gym.test_text["references"] == ["a", "ab", "AB", "b", "Ab", "x"]
    assert make_fitness("accuracy").evaluate(says_ab, gym).fitness == pytest.approx(3 / 6)
    assert make_fitness("exact_match").evaluate(says_ab, gym).fitness == pytest.approx(3 / 6)


def test_a_user_function_gets_the_prompts_generations_and_references_of_the_scored_rows(says_ab, make_gym, rows):
    fitness_functions.CALLS.clear()
    evaluation = make_fitness(f"{MODULE}:recorded", eval_rows=4).evaluate(says_ab, make_gym(rows))
    assert evaluation.fitness == 0.5
    assert fitness_functions.CALLS == [([f"row {i}" for i in range(4)], ["ab"] * 4, ["ab", "ab", "ba", "AB "])]
    assert make_fitness(f"{MODULE}:share_equal").evaluate(says_ab, make_gym(rows)).fitness == pytest.approx(3 / 6)


@pytest.mark.parametrize("name, fragment", [
    ("raises", "raised RuntimeError: the grader is down"), ("returns_nan", "returned nan"),
    ("returns_text", "returned str '0.9', not a number"), ("returns_none", "returned NoneType None"),
])
def test_a_misbehaving_user_function_scores_minus_inf_with_a_warning_naming_it(name, fragment, says_ab, make_gym,
                                                                             rows):
    says_ab.index = 3
    with pytest.warns(UserWarning) as caught:
        evaluation = make_fitness(f"{MODULE}:{name}", samples=1).evaluate(says_ab, make_gym(rows))
    assert evaluation.fitness == -math.inf and says_ab.fitness[-1] == -math.inf
    assert math.isfinite(evaluation.test_loss) and evaluation.samples
    (message,) = [str(w.message) for w in caught if "fitness function" in str(w.message)]
    assert message.startswith(f"member in slot 3: fitness function {MODULE}:{name} {fragment}")
    assert message.endswith("; it scores -inf")


def test_a_member_with_a_non_finite_test_loss_scores_minus_inf(says_ab, make_gym, rows):
    with torch.no_grad():
        next(p for p in says_ab.trainable_parameters().values()).fill_(math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: a diverged member, not a broken function
        evaluation = make_fitness("exact_match").evaluate(says_ab, make_gym(rows))
    assert evaluation.fitness == -math.inf and math.isnan(evaluation.test_loss)
