"""What a member's fitness is: the one seam where it is defined.

A `Fitness` evaluates a member: its fitness (higher is better; a broken member scores -inf), its
test loss (always, so that loss curves stay comparable whatever the fitness) and its outputs on
the first few test prompts; and it says how the fitness is shown to users: the metric it is
logged as and the value of that metric. The evolution only ever compares fitness values
(`evo_sft.evolution.elite`).

`evolution.fitness` names one of `FITNESSES` or a user function `module:function`, called as
`function(prompts, generations, references) -> float` (higher is better). Fitnesses that
generate score the member's greedy responses to the first `eval_rows` rows of the fixed test
set: the same rows for every member and every generation.
"""
import difflib
import importlib
import inspect
import math
import numbers
import os
import sys
import unicodedata
import warnings
from dataclasses import dataclass

EVAL_BATCH_SIZE = 16


@dataclass(frozen=True)
class Evaluation:
    """What a member reports for one evaluation."""

    fitness: float     # higher is better; -inf for a broken member
    test_loss: float   # response-token cross-entropy over the whole test set, whatever the fitness
    samples: tuple = ()  # ({"prompt", "reference", "output"}, ...) for the first test rows


class FitnessFunctionError(ValueError):
    """A user fitness function raised or returned something other than a finite number."""


class Fitness:
    name: str    # as `evolution.fitness` names it
    metric: str  # what tables, MLflow and summaries show
    higher_is_better: bool  # of the metric
    generates: bool  # whether it scores generated responses

    def __init__(self, eval_rows: int | None = None, max_new_tokens: int = 32, batch_size: int = 16,
                 samples: int = 0):
        self.eval_rows, self.max_new_tokens = eval_rows, max_new_tokens
        self.batch_size, self.samples = batch_size, samples

    def evaluate(self, agent, gym, full: bool = False) -> Evaluation:
        """Score `agent` on `gym`'s test set (`full`: every test row, whatever `eval_rows` says)
        and append the fitness to `agent.fitness`. A non-finite test loss scores -inf."""
        test_loss = agent.test_loss(gym, EVAL_BATCH_SIZE)
        rows = len(gym.test)
        scored = self.scored_rows(rows, full) if self.generates else 0
        shown = min(self.samples, rows)
        prompts = gym.test_prompts(max(scored, shown))
        outputs = [gym.decode(ids) for ids in agent.generate(prompts, self.max_new_tokens, gym.stop_token_ids,
                                                              self.batch_size)] if prompts else []
        text = gym.test_text
        try:
            fitness = self.score(test_loss, text["prompts"][:scored], outputs[:scored], text["references"][:scored])
        except FitnessFunctionError as error:
            warnings.warn(f"member in slot {agent.index}: {error}; it scores -inf")
            fitness = -math.inf
        if not (math.isfinite(test_loss) and math.isfinite(fitness)):
            fitness = -math.inf
        agent.fitness.append(fitness)
        samples = tuple({"prompt": text["prompts"][row], "reference": text["references"][row], "output": outputs[row]}
                        for row in range(shown))
        return Evaluation(fitness, test_loss, samples)

    def scored_rows(self, test_rows: int, full: bool) -> int:
        """How many test rows (the first ones) the fitness is scored on."""
        return test_rows if full or not self.generates or self.eval_rows is None else min(self.eval_rows, test_rows)

    def score(self, test_loss: float, prompts: list[str], generations: list[str], references: list[str]) -> float:
        raise NotImplementedError

    def shown(self, fitness: float) -> float:
        """The metric's value for a fitness value."""
        return fitness


class NegativeTestLoss(Fitness):
    """-(sum of response-token cross-entropy over the whole fixed test set) / (response tokens):
    the same rows for every member, weighted by tokens, independent of batch size."""

    name, metric, higher_is_better, generates = "test_loss", "test_loss", False, False

    def score(self, test_loss, prompts, generations, references) -> float:
        return -test_loss

    def shown(self, fitness: float) -> float:
        return -fitness


class ExactMatch(Fitness):
    """The share of scored rows whose generated response equals the reference once both are
    normalised (`normalise`)."""

    name, metric, higher_is_better, generates = "exact_match", "exact_match", True, True

    def score(self, test_loss, prompts, generations, references) -> float:
        return sum(normalise(g) == normalise(r) for g, r in zip(generations, references)) / len(references)


class Accuracy(Fitness):
    """The share of scored rows whose generated response answers with the row's label (the
    reference column): it starts with the label, normalised, and does not go on to make it a
    longer word ('B' is answered by 'B) Paris' and 'b.', not by 'Blue')."""

    name, metric, higher_is_better, generates = "accuracy", "accuracy", True, True

    def score(self, test_loss, prompts, generations, references) -> float:
        return sum(answers(g, r) for g, r in zip(generations, references)) / len(references)


class UserFunction(Fitness):
    """`function(prompts, generations, references) -> float`, higher is better, named
    `module:function`. Where it raises or returns anything but a finite number, the member
    scores -inf with a warning and the run goes on."""

    higher_is_better, generates = True, True

    def __init__(self, reference: str, **options):
        super().__init__(**options)
        self.name, self.function = reference, load_function(reference)
        self.metric = self.function.__name__

    def score(self, test_loss, prompts, generations, references) -> float:
        try:
            value = self.function(prompts, generations, references)
        except Exception as error:  # noqa: BLE001 - a user function's failure costs one member, not the run
            raise FitnessFunctionError(f"fitness function {self.name} raised {type(error).__name__}: {error}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise FitnessFunctionError(f"fitness function {self.name} returned {type(value).__name__} "
                                       f"{_shown(value)}, not a number")
        if not math.isfinite(value):
            raise FitnessFunctionError(f"fitness function {self.name} returned {value}, not a finite number")
        return float(value)


FITNESSES = {cls.name: cls for cls in (NegativeTestLoss, ExactMatch, Accuracy)}


def make_fitness(name: str, **options) -> Fitness:
    """The fitness `evolution.fitness` names, with `evolution.fitness_options`' settings."""
    if name in FITNESSES:
        return FITNESSES[name](**options)
    return UserFunction(name, **options)


def load_function(reference: str):
    """The function `module:function` names. The module is imported as Ray's workers would:
    from the Python path, the working directory included. A ValueError names what failed."""
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute:
        close = difflib.get_close_matches(reference, list(FITNESSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown fitness {reference!r}{hint}; known: {', '.join(FITNESSES)}, or a function "
                         f"as module:function")
    if os.getcwd() not in sys.path:  # Ray's workers put the driver's working directory on their path too
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - whatever the module raises, the config names it
        raise ValueError(f"cannot load fitness function {reference!r}: importing {module_name} raised "
                         f"{type(error).__name__}: {error}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"cannot load fitness function {reference!r}: module {module_name} has no function "
                         f"{attribute!r}")
    try:
        inspect.signature(function).bind([], [], [])
    except TypeError:
        raise ValueError(f"fitness function {reference!r} must take (prompts, generations, references)") from None
    except ValueError:
        pass  # no signature to check (a builtin)
    return function


def normalise(text: str) -> str:
    """NFKC, case-folded, every run of whitespace one space, none at either end."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def answers(generation: str, label: str) -> bool:
    """Whether `generation` answers with `label` (see `Accuracy`)."""
    generation, label = normalise(generation), normalise(label)
    if not label or not generation.startswith(label):
        return False
    rest = generation[len(label):]
    return not rest or not (rest[0].isalnum() and label[-1].isalnum())


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
