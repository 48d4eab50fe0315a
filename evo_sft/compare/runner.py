"""Run one experiment under each search strategy and seed at one budget (of supervised training
tokens, of wall-clock seconds, or both: whichever ends first), record each run in MLflow (one
experiment), and write the table, the summary and the plot into the output folder."""
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evo_sft import build
from evo_sft.compare import budget as budgets, report, strategies
from evo_sft.compare.report import StrategyRun
from evo_sft.config import ExperimentConfig, config_from_dict
from evo_sft.console import output_to_log, quiet_libraries
from evo_sft.data.sources import load_tokenizer
from evo_sft.fitness import Fitness
from evo_sft.io.checkpoint import latest_intact
from evo_sft.population.ray_session import init_ray, shutdown_ray

RESULTS = "results.jsonl"
UNBOUNDED_GENERATIONS = 1_000_000  # an evolution with a time budget only: the time ends it
LOG = "compare.log"  # all that the runs and the libraries print; the screen gets a line per strategy and seed
# Ray Tune's legacy output engine, which at `verbose=0` prints nothing (the new one still prints
# the experiment's table, the results folder and a TensorBoard hint)
TUNE_ENVIRONMENT = {"RAY_AIR_NEW_OUTPUT": "0",
                    # a trial started when the budget is all drawn ends without a result; that is no error
                    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}


@dataclass
class Comparison:
    config: ExperimentConfig
    strategies: list[str]
    seeds: list[int]
    budget: int | None  # supervised training tokens each (strategy, seed) may consume; None: no token budget
    out: Path
    generation_tokens: int  # what one generation of the population trains on at the founders' batch size
    evolution: ExperimentConfig | None = None  # the evolution's own config where it differs (a benchmark's variant)
    budget_seconds: float | None = None  # wall-clock seconds each (strategy, seed) may take, start-up included

    def described(self) -> str:
        """The budget in words."""
        parts = ([f"{self.budget:,} supervised training tokens"] if self.budget is not None else []) + (
            [f"{self.budget_seconds:g} s of wall-clock time (start-up included)"] if self.budget_seconds is not None
            else [])
        return " or ".join(parts) + (", whichever ends first" if len(parts) > 1 else "")


def plan(config: ExperimentConfig, strategy_names: str, seeds: int, budget: int | None, out: Path,
         evolution: ExperimentConfig | None = None, budget_seconds: float | None = None) -> Comparison:
    """Check what was asked before anything runs; a ValueError says what is wrong. `evolution`, if
    given, is the config the evolution runs with (the same task, data and budget). Without a token
    `budget`, the default one, unless `budget_seconds` is the only budget."""
    quiet_libraries()  # preparing the data writes the demo model
    names = strategies.parse(strategy_names)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if budget_seconds is not None and not (math.isfinite(budget_seconds) and budget_seconds > 0):
        raise ValueError(f"--budget-seconds must be a number of seconds > 0, got {budget_seconds}")
    for name in names:
        strategies.check(name, config)
    out = Path(out).resolve()
    if (out / RESULTS).exists():
        raise ValueError(f"{out} holds a comparison already; choose another --out")
    created = not out.exists()
    first = seeded(config, config.seed)
    prepared = prepare(first, out)[1]
    generation = budgets.generation_tokens(first, prepared)
    if budget is None and budget_seconds is None:
        budget = budgets.default_budget(first, prepared)
    if budget is not None and budget < generation:
        if created:  # the base model written to count the data's tokens
            shutil.rmtree(out)
        raise ValueError(f"--budget {budget:,} tokens is less than one generation: {config.population.size} members "
                         f"x {config.evolution.steps_per_generation} steps x {config.agent.batch_size} rows "
                         f"x {budgets.tokens_per_row(prepared['train']):.1f} supervised tokens a row = {generation:,}")
    return Comparison(config, names, [config.seed + i for i in range(seeds)], budget, out, generation, evolution,
                      budget_seconds)


def seeded(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    return config_from_dict({**config.to_dict(), "seed": seed})


def prepare(config: ExperimentConfig, out: Path) -> tuple[str, dict]:
    """The seed's base model (the demo's is written under `out`) and its tokenised data."""
    model_path = build.resolve_model_path(config, out / f"seed-{config.seed}")
    return model_path, build.prepare_data(config, load_tokenizer(config.tokenizer or model_path,
                                                                 config.model.trust_remote_code))


def run(comparison: Comparison) -> list[StrategyRun]:
    """Each strategy and seed in turn, a line on the screen for each, then the table; all else
    that is printed goes to `out/compare.log`."""
    comparison.out.mkdir(parents=True, exist_ok=True)
    with output_to_log(comparison.out / LOG) as screen:
        return _run(comparison, screen)


def _run(comparison: Comparison, screen) -> list[StrategyRun]:
    import ray
    from mlflow import MlflowClient

    from evo_sft.tracking.outbox import experiment_id
    from evo_sft.tracking.store import artifact_root

    quiet_libraries()
    out, config = comparison.out, comparison.config
    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    experiment = config.tracking.experiment or f"{config.name}-compare"
    client = MlflowClient(uri)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        init_ray(config.ray.address, out / "ray", config.ray.init)
    fitness = build.fitness(config)
    runs = []
    try:
        for seed in comparison.seeds:
            seed_config = seeded(config, seed)
            model_path, prepared = prepare(seed_config, out)
            for strategy in comparison.strategies:
                screen.write(f"{strategy}, seed {seed}: ")
                screen.flush()
                try:
                    if strategy == "evolution":
                        result = run_evolution(seeded(comparison.evolution or config, seed), comparison, uri,
                                               experiment, prepared)
                    else:
                        result = run_tune(strategy, seed_config, comparison, model_path, prepared)
                except BaseException:
                    screen.write(f"stopped (what it printed: {out / LOG})\n")
                    raise
                spent = f"{result.tokens:,}" + (f" of {comparison.budget:,}" if comparison.budget else "")
                best = f"best {fitness.metric} {fitness.shown(result.best_final):.4f}" if result.final else "no result"
                screen.write(f"{spent} tokens in {result.wall_s:.0f} s, {best}\n")
                result.run_id = record(client, experiment_id(client, experiment, artifact_root(uri)), result,
                                       fitness, comparison)
                runs.append(result)
                with open(out / RESULTS, "a") as results:
                    results.write(json.dumps(result.to_dict()) + "\n")
    finally:
        if owns_ray:
            shutdown_ray()
    write_report(runs, fitness, comparison, client, experiment_id(client, experiment, artifact_root(uri)), screen)
    return runs


def run_evolution(config: ExperimentConfig, comparison: Comparison, uri: str, experiment: str,
                  prepared: dict) -> StrategyRun:
    """`evo-sft run` of the config with the token and time budgets; enough generations that a
    budget, not their number, ends it (a schedule keeps the length the config gives it)."""
    from evo_sft.run import TimeBudgetSpent, start

    d = config.to_dict()
    evolution, agent = d["evolution"], d["agent"]
    smallest_step = min(config.evolution.hyperparameters["batch_size"].min, config.agent.batch_size) \
        if "batch_size" in config.evolution.hyperparameters else config.agent.batch_size
    per_generation = (config.population.size * config.evolution.steps_per_generation * smallest_step
                      * budgets.tokens_per_row(prepared["train"]))
    agent["schedule_steps"] = agent["schedule_steps"] or evolution["generations"] * evolution["steps_per_generation"]
    evolution.update(token_budget=comparison.budget, time_budget_s=comparison.budget_seconds,
                     generations=UNBOUNDED_GENERATIONS if comparison.budget is None
                     else 2 * math.ceil(comparison.budget / per_generation) + 1)
    evolution["fitness_options"]["full_test_at_end"] = False
    d.update(run_dir=str(comparison.out / f"evolution-seed{config.seed}"), checkpoint={"every": 1, "keep": 1},
             tracking={"uri": uri, "experiment": experiment})
    started = time.time()
    try:
        start(config_from_dict(d))
    except TimeBudgetSpent:  # before its first generation: no result
        return StrategyRun("evolution", config.seed, [], [], 0, time.time() - started, 0, 0)
    wall = time.time() - started
    saved = latest_intact(Path(d["run_dir"]))[1]
    state = saved["controller"]
    history = dict((member_id, fitness) for member_id, fitness in state["fitness"])
    curve = [(tokens, max(h[g] for h in history.values() if len(h) > g)) for g, tokens in enumerate(state["tokens"])]
    evaluations = state["generation"] * config.population.size
    return StrategyRun("evolution", config.seed, curve, [history[m][-1] for m in state["slot_ids"]],
                       state["tokens"][-1], wall, evaluations, evaluations * budgets.test_tokens(prepared),
                       run_id=saved["tracking"]["parent_run_id"], seconds=[at - started for at in state["finished_at"]])


def run_tune(strategy: str, config: ExperimentConfig, comparison: Comparison, model_path: str,
             prepared: dict) -> StrategyRun:
    """A Ray Tune baseline: its trials on the population's resources, as many at once as the
    population has members, each allowed a member's share of the token budget; with a time
    budget, all of them stop by its deadline (see `trial.BudgetSpent`)."""
    import ray
    from ray import tune

    from evo_sft.compare.trial import BudgetSpent, TrialPlan, train_trial

    started = time.time()
    deadline = None if comparison.budget_seconds is None else started + comparison.budget_seconds
    size, iteration, budget = config.population.size, build.generation_tokens(config, prepared), comparison.budget
    if budget is None:  # a time budget only: each trial trains until the deadline
        budget, per_trial, iterations = math.inf, math.inf, None
    else:
        per_trial = -(-budget // size)
        iterations = None if strategy == "asha" else -(-per_trial // iteration)  # ASHA's trials share the budget
    bank = ray.remote(budgets.TokenBank).options(num_cpus=0).remote(budget, per_trial, iterations)
    plan = TrialPlan(iteration, checkpoints=strategy in strategies.EXPLOITING, deadline=deadline)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, recipe=build.member_recipe(config, model_path), prepared=prepared,
                             plan=plan, bank=bank),
        {"cpu": config.population.num_cpus, "gpu": config.population.num_gpus})
    tuner = tune.Tuner(
        trainable,
        param_space={"hyperparameters": tune.grid_search(strategies.configurations(strategy, config, config.seed))},
        tune_config=tune.TuneConfig(metric="fitness", mode="max", scheduler=strategies.scheduler(strategy, config),
                                    max_concurrent_trials=size, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{strategy}-seed{config.seed}", storage_path=str(comparison.out / "tune"),
                                  stop=BudgetSpent(bank, deadline), verbose=0))
    os.environ.update(TUNE_ENVIRONMENT)
    random.seed(config.seed)  # PBT's and PB2's exploit and explore draw from Python's generator
    np.random.seed(config.seed)  # PB2's acquisition
    grid = tuner.fit()
    wall = time.time() - started
    if grid.errors:
        raise RuntimeError(f"{strategy}: {len(grid.errors)} trials failed; the first: {grid.errors[0]}")
    tokens, ledger, exploits = ray.get([bank.spent.remote(), bank.ledger.remote(), bank.exploit_log.remote()])
    ray.kill(bank)
    ledger.sort(key=lambda evaluation: evaluation[0])
    last = {trial: fitness for _, trial, fitness, _ in ledger}
    notes = {"trials": len(last), **({"exploits": len(exploits)} if strategy in strategies.EXPLOITING else {})}
    return StrategyRun(strategy, config.seed, [(tokens, fitness) for tokens, _, fitness, _ in ledger],
                       list(last.values()), tokens, wall, len(ledger), len(ledger) * budgets.test_tokens(prepared),
                       notes=notes, seconds=[at - started for *_, at in ledger])


def record(client, experiment_id: str, run: StrategyRun, fitness: Fitness, comparison: Comparison) -> str:
    """The run's MLflow run (the evolution's own parent run, else a new one): its best fitness so
    far against tokens consumed, its figures and what it was."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    run_id = run.run_id or client.create_run(experiment_id, run_name=f"{run.strategy}-seed{run.seed}").info.run_id
    name = f"compare.best_{fitness.metric}"
    metrics = [Metric(name, fitness.shown(best), now, tokens) for tokens, best in run.best_so_far() if math.isfinite(best)]
    figures = {"best_final": fitness.shown(run.best_final), "tokens": run.tokens, "wall_s": run.wall_s,
               "evaluations": run.evaluations, "eval_tokens": run.eval_tokens}
    metrics += [Metric(f"compare.{key}", float(value), now, 0) for key, value in figures.items()
                if math.isfinite(value)]
    limits = {name: str(value) for name, value in (("budget", comparison.budget),
                                                     ("budget_seconds", comparison.budget_seconds)) if value is not None}
    client.log_batch(run_id, metrics=metrics, synchronous=True,
                     params=[Param(f"compare.{name}", value) for name, value in limits.items()] if run.run_id is None
                     else [],
                     tags=[RunTag("evo_sft.strategy", run.strategy), RunTag("evo_sft.seed", str(run.seed)),
                           *(RunTag(f"evo_sft.compare_{name}", value) for name, value in limits.items())])
    if run.run_id is None:
        client.set_terminated(run_id)
    return run_id


def write_report(runs: list[StrategyRun], fitness: Fitness, comparison: Comparison, client, experiment_id: str,
                 screen) -> None:
    """Print (on `screen`) and write the table, the summary and the plot, and log them as one MLflow run."""
    out = comparison.out
    targets = report.grid_targets(runs)
    rows = report.summary(runs, fitness, targets)
    text = (f"budget: {comparison.described()}, per strategy and seed\n\n"
            + report.table(runs, fitness, targets) + "\n\n" + report.summary_table(rows, fitness) + "\n")
    screen.write("\n" + text + "\n")
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    report.plot(runs, fitness, out / "best_fitness_vs_tokens.png", title=f"{comparison.config.name}: "
                f"{len(comparison.seeds)} seeds, {comparison.described()}")
    comparison_run = client.create_run(experiment_id, run_name="comparison", tags={"evo_sft.role": "comparison"})
    for name in ("table.md", "summary.json", "best_fitness_vs_tokens.png", RESULTS):
        client.log_artifact(comparison_run.info.run_id, str(out / name))
    client.set_terminated(comparison_run.info.run_id)
    screen.write(f"written: {out / 'table.md'}, {out / 'summary.json'}, {out / 'best_fitness_vs_tokens.png'}, "
                 f"{out / RESULTS}, {out / LOG}\n")
