"""Compute counted in supervised training tokens (the response tokens a step trains on): what a
budget is, what one generation costs, and the bank that Tune trials draw their tokens from."""
import time

from evo_sft import build
from evo_sft.build import tokens_per_row


def generation_tokens(config, prepared: dict) -> int:
    """What one generation of the config's population trains on at the founders' batch size."""
    return config.population.size * build.generation_tokens(config, prepared)


def default_budget(config, prepared: dict) -> int:
    """What the config's evolution trains on if no batch size changes: its generations' tokens."""
    return config.evolution.generations * generation_tokens(config, prepared)


def test_tokens(prepared: dict) -> int:
    """The supervised tokens one evaluation of the test loss reads (forward only)."""
    return round(tokens_per_row(prepared["test"]) * len(prepared["test"]["input_ids"]))


class TokenBank:
    """The token budget of one strategy's trials (a Ray actor). A trial draws tokens before it
    trains and settles what it used after: no trial gets more than `per_trial`, and the trials
    together no more than `budget` (each draw's last step may pass it by less than one batch;
    `math.inf`: no token budget).
    With `iterations`, the trials are a fixed population (PBT, PB2, random, grid): every trial
    gets `iterations` draws of at least one token while the budget lasts, however far it overshot
    its own share, so that trials stepped in sync (PBT's synchronous mode) all report as often
    until the budget is spent (then `BudgetSpent` stops them all); without, trials share what is
    left (ASHA starts new trials with it).
    It also keeps every evaluation as (tokens consumed by all trials then, trial, fitness, when:
    `time.time()`), and every exploit (a trial that continued from another trial's checkpoint)."""

    def __init__(self, budget: float, per_trial: float, iterations: int | None = None):
        self.budget, self.per_trial, self.iterations = budget, per_trial, iterations
        self.consumed, self.reserved = 0, 0
        self.by_trial: dict[str, int] = {}
        self.reserved_by_trial: dict[str, int] = {}
        self.draws: dict[str, int] = {}
        self.evaluations: list[tuple[int, str, float, float]] = []
        self.exploits: list[tuple[str, str]] = []  # (trial, the trial whose checkpoint it continued from)

    def draw(self, trial: str, wanted: int) -> int:
        mine = self.by_trial.get(trial, 0) + self.reserved_by_trial.get(trial, 0)
        left = self.budget - self.consumed - self.reserved
        if self.iterations is None:
            grant = max(0, min(wanted, self.per_trial - mine, left))
        else:
            grant = 0 if self.trial_done(trial) or left <= 0 else max(1, min(wanted, self.per_trial - mine, left))
        self.draws[trial] = self.draws.get(trial, 0) + (grant > 0)
        self.reserved += grant
        self.reserved_by_trial[trial] = self.reserved_by_trial.get(trial, 0) + grant
        return grant

    def settle(self, trial: str, grant: int, used: int) -> int:
        """Return the grant and count what was used; the tokens consumed by all trials so far."""
        self.reserved -= grant
        self.reserved_by_trial[trial] -= grant
        self.consumed += used
        self.by_trial[trial] = self.by_trial.get(trial, 0) + used
        return self.consumed

    def trial_done(self, trial: str) -> bool:
        if self.iterations is not None:
            return self.draws.get(trial, 0) >= self.iterations
        return self.by_trial.get(trial, 0) >= self.per_trial

    def exhausted(self) -> bool:
        return self.consumed >= self.budget

    def spent(self) -> int:
        return self.consumed

    def evaluated(self, trial: str, tokens: int, fitness: float) -> None:
        self.evaluations.append((tokens, trial, fitness, time.time()))

    def ledger(self) -> list[tuple[int, str, float, float]]:
        return self.evaluations

    def exploited(self, trial: str, donor: str) -> None:
        self.exploits.append((trial, donor))

    def exploit_log(self) -> list[tuple[str, str]]:
        return self.exploits
