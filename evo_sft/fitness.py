"""What a member's fitness is: the one seam where it is defined.

A `Fitness` scores a member (higher is better; a broken member scores -inf) and says how the
score is shown to users: the metric it is logged as and the value of that metric. The evolution
only ever compares fitness values (`evo_sft.evolution.elite`).
"""
import math

EVAL_BATCH_SIZE = 16


class Fitness:
    name: str    # as `evolution.fitness` names it
    metric: str  # what tables, MLflow and summaries show
    higher_is_better: bool  # of the metric

    def score(self, agent, gym) -> float:
        raise NotImplementedError

    def shown(self, fitness: float) -> float:
        """The metric's value for a fitness value."""
        raise NotImplementedError


class NegativeTestLoss(Fitness):
    """-(sum of response-token cross-entropy over the whole fixed test set) / (response tokens):
    the same rows for every member, weighted by tokens, independent of batch size."""

    name, metric, higher_is_better = "test_loss", "test_loss", False

    def score(self, agent, gym) -> float:
        fitness = agent.test(gym, batch_size=EVAL_BATCH_SIZE)
        return fitness if math.isfinite(fitness) else -math.inf

    def shown(self, fitness: float) -> float:
        return -fitness


FITNESSES = {cls.name: cls for cls in (NegativeTestLoss,)}
