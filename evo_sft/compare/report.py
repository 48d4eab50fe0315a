"""What a comparison reports: each (strategy, seed) run's measured figures, the table, the summary
over seeds with a paired comparison against the evolution, and the plot of the best fitness
against the training tokens consumed."""
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class StrategyRun:
    strategy: str
    seed: int
    curve: list  # [(tokens consumed by all members or trials, fitness of a model evaluated then)], in order
    final: list  # the last fitness of every model the strategy ends with (trials stopped early included)
    tokens: int  # supervised training tokens consumed, as measured
    wall_s: float
    evaluations: int
    eval_tokens: int  # test tokens read by those evaluations (forward only), reported apart from training
    run_id: str | None = None  # its MLflow run
    notes: dict = field(default_factory=dict)
    seconds: list = field(default_factory=list)  # wall-clock seconds since the run started, at each point of `curve`

    @property
    def best_final(self) -> float:
        return max(self.final, default=-math.inf)

    def best_so_far(self) -> list[tuple[int, float]]:
        """(tokens, the best fitness evaluated up to then), one point per evaluation."""
        best, points = -math.inf, []
        for tokens, fitness in self.curve:
            best = max(best, fitness)
            points.append((tokens, best))
        return points

    def tokens_to(self, target: float | None) -> int | None:
        """The tokens consumed when a model first reached `target` (None: never, or no target)."""
        if target is None:
            return None
        return next((tokens for tokens, best in self.best_so_far() if best >= target), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "best_final": self.best_final}


def grid_targets(runs: list[StrategyRun]) -> dict[int, float]:
    """Per seed, the best lr-grid point's final fitness: the target others are timed to."""
    return {run.seed: run.best_final for run in runs if run.strategy == "grid"}


def table(runs: list[StrategyRun], fitness, targets: dict[int, float]) -> str:
    """One line per (strategy, seed)."""
    metric = fitness.metric
    lines = [f"| strategy | seed | best final {metric} | tokens trained | tokens to target | wall s "
             f"| evaluations | eval tokens |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        reached = run.tokens_to(targets.get(run.seed))
        lines.append(f"| {run.strategy} | {run.seed} | {fitness.shown(run.best_final):.4f} | {run.tokens:,} | "
                     f"{'-' if reached is None else f'{reached:,}'} | {run.wall_s:.0f} | {run.evaluations} | "
                     f"{run.eval_tokens:,} |")
    return "\n".join(lines)


def summary(runs: list[StrategyRun], fitness, targets: dict[int, float]) -> list[dict]:
    """Per strategy over seeds: mean and std of the best final metric, tokens and wall time, the
    share of seeds that reached the grid's target; and, paired by seed, the strategy's best
    final fitness minus the evolution's (positive: the strategy did better) and its wins."""
    evolution = {run.seed: run.best_final for run in runs if run.strategy == "evolution"}
    rows = []
    for strategy in dict.fromkeys(run.strategy for run in runs):
        mine = [run for run in runs if run.strategy == strategy]
        shown = [fitness.shown(run.best_final) for run in mine]
        paired = [run.best_final - evolution[run.seed] for run in mine if run.seed in evolution]
        reached = [run.tokens_to(targets[run.seed]) for run in mine if run.seed in targets]
        rows.append({
            "strategy": strategy, "seeds": len(mine),
            "mean": float(np.mean(shown)), "std": float(np.std(shown, ddof=1)) if len(shown) > 1 else 0.0,
            "tokens": float(np.mean([run.tokens for run in mine])),
            "wall_s": float(np.mean([run.wall_s for run in mine])),
            "reached_target": f"{sum(r is not None for r in reached)}/{len(reached)}" if reached else "-",
            "tokens_to_target": float(np.mean([r for r in reached if r is not None])) if any(
                r is not None for r in reached) else None,
            "minus_evolution": float(np.mean(paired)) if paired and strategy != "evolution" else None,
            "minus_evolution_std": float(np.std(paired, ddof=1)) if len(paired) > 1 and strategy != "evolution"
            else None,
            "beats_evolution": f"{sum(d > 0 for d in paired)}/{len(paired)}" if paired and strategy != "evolution"
            else "-",
        })
    return rows


def summary_table(rows: list[dict], fitness) -> str:
    better = "higher" if fitness.higher_is_better else "lower"
    lines = [f"| strategy | seeds | best final {fitness.metric} ({better} is better), mean ± std | tokens trained "
             f"| wall s | reached grid's best | tokens to it | fitness − evolution's, paired | beats evolution |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        paired = "-" if row["minus_evolution"] is None else \
            f"{row['minus_evolution']:+.4f} ± {row['minus_evolution_std'] or 0:.4f}"
        to_target = "-" if row["tokens_to_target"] is None else f"{row['tokens_to_target']:,.0f}"
        lines.append(f"| {row['strategy']} | {row['seeds']} | {row['mean']:.4f} ± {row['std']:.4f} | "
                     f"{row['tokens']:,.0f} | {row['wall_s']:.0f} | {row['reached_target']} | {to_target} | "
                     f"{paired} | {row['beats_evolution']} |")
    return "\n".join(lines)


def plot(runs: list[StrategyRun], fitness, path, title: str = "") -> None:
    """Best fitness so far against the training tokens consumed: per strategy the mean over seeds
    (a step function sampled on a common grid of tokens) and a band from the lowest to the highest seed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    grid = np.linspace(0, max(run.tokens for run in runs), 200)
    for index, strategy in enumerate(dict.fromkeys(run.strategy for run in runs)):
        curves = []
        for run in (run for run in runs if run.strategy == strategy):
            points = run.best_so_far()
            if not points:  # a budget spent before its first evaluation
                curves.append(np.full(len(grid), np.nan))
                continue
            tokens = np.array([t for t, _ in points], dtype=float)
            values = np.array([fitness.shown(b) if math.isfinite(b) else np.nan for _, b in points])
            positions = np.searchsorted(tokens, grid, side="right") - 1
            curves.append(np.where(positions >= 0, values[np.clip(positions, 0, None)], np.nan))
        curves = np.array(curves)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # before a seed's first evaluation: no value
            mean, low, high = (np.nanmean(curves, axis=0), np.nanmin(curves, axis=0), np.nanmax(curves, axis=0))
        color = f"C{index}"
        axes.plot(grid, mean, color=color, label=f"{strategy} ({len(curves)} seeds)")
        if len(curves) > 1:
            axes.fill_between(grid, low, high, color=color, alpha=0.2)
    axes.set(xlabel="supervised training tokens consumed (all members or trials)",
             ylabel=f"best {fitness.metric} so far", title=title or "best fitness against training tokens")
    axes.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
