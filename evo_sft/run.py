"""Start, resume and summarise an evolution described by an experiment config."""
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from evo_sft import build
from evo_sft.console import quiet_libraries
from evo_sft.data.sources import load_tokenizer
from evo_sft.fitness import Evaluation, Fitness
from evo_sft.hyperparameters import shown
from evo_sft.io.checkpoint import EvolutionCheckpointer, checkpoint_dirs, latest_intact
from evo_sft.config import ConfigError, ExperimentConfig, flatten_config, load_config
from evo_sft.controller import Controller, GenerationRecord
from evo_sft.evolution import elite
from evo_sft.population.local import LocalPopulation
from evo_sft.progress import progress_line
from evo_sft.time_budget import Deadline
from evo_sft.io.storage import CheckpointError, replace_directory, save_json
from evo_sft.model_card import card_for, write_card
from evo_sft.run_folder import CONFIG_FILE, EVALUATION_FILE, SCHEDULE_FILE, run_folder, saved_tracking_uri

# What a run writes into its folder besides the config and the tracking store and queue
# (checkpoints/ holds only an unfinished write when there is no checkpoint yet).
ATTEMPT_OUTPUTS = ("base_model", "checkpoints", "elites")


class TimeBudgetSpent(ConfigError):
    """`evolution.time_budget_s` ran out before the first generation: nothing was trained."""

    def __init__(self, seconds: float):
        super().__init__(f"evolution.time_budget_s: its {seconds:g} s went to loading the model and starting the "
                         f"members, before the first generation; nothing was trained")


@dataclass
class RunResult:
    run_dir: Path
    best_member: int
    best_fitness: float
    best_adapter: Path
    interrupted: bool = False
    # the best member's evaluation the summary shows: on the whole test set with
    # evolution.fitness_options.full_test_at_end, else the last generation's (None where it has none)
    evaluation: Evaluation | None = None
    scored_rows: int | None = None  # the test rows its fitness was scored on
    registered_as: str | None = None  # the registered model it became a version of (tracking.register_model)


def start(config: ExperimentConfig) -> RunResult:
    """Start the run in its folder. A folder whose run stopped before its first checkpoint is
    taken over: what that attempt wrote is removed (its MLflow runs are deleted by the tracker)."""
    run_dir = config.resolved_run_dir().resolve()
    if checkpoint_dirs(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run; continue it with `evo-sft resume {run_dir}`")
    if (run_dir / "best_adapter").exists():
        raise FileExistsError(f"{run_dir} holds a finished run that kept no checkpoint; choose another --run-dir")
    if (run_dir / CONFIG_FILE).exists():
        print(f"{run_dir} holds a run that stopped before its first checkpoint: starting it again")
        for leftover in ATTEMPT_OUTPUTS:
            shutil.rmtree(run_dir / leftover, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.run_dir = str(run_dir)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return _run(config, run_dir, checkpoint=None)


def resume(run_dir: Path, generations: int | None = None, overrides: list[str] = ()) -> RunResult | None:
    """Continue the run in `run_dir` until `generations` (default: its config's) are complete;
    `overrides` (KEY=VALUE) change its saved config for this session only, e.g. where its Ray
    cluster or MLflow server now is. None, having said so and started nothing, when the run
    already has that many generations."""
    run_dir = run_folder(run_dir)
    overrides = list(overrides) + ([f"evolution.generations={generations}"] if generations is not None else [])
    config = load_config(run_dir / CONFIG_FILE, overrides)
    config.run_dir = str(run_dir)  # the folder given, wherever the run was before
    if not checkpoint_dirs(run_dir):
        every = config.checkpoint.every
        if (run_dir / "best_adapter").exists():
            raise CheckpointError(f"{run_dir} holds a finished run that kept no checkpoint (checkpoint.every "
                                  f"{every} is more than its generations), so it cannot be resumed")
        raise CheckpointError(
            f"no checkpoint yet in {run_dir}: the run stopped before its first one, written after "
            f"{every} generation{'s' if every > 1 else ''}; start it again with "
            f"`evo-sft run {run_dir / CONFIG_FILE} --run-dir {run_dir}`")
    checkpoint = latest_intact(run_dir)
    done, wanted = checkpoint[1]["controller"]["generation"], config.evolution.generations
    if wanted <= done:
        source = "--generations" if generations is not None else "evolution.generations in its config"
        print(f"nothing to do: {run_dir} is at generation {done}, and {wanted} generations are asked for "
              f"({source}); to go on, ask for more, e.g. `evo-sft resume {run_dir} --generations {done + 1}`")
        return None
    print(f"resuming {run_dir} from {checkpoint[0].name}")
    return _run(config, run_dir, checkpoint=checkpoint)


def _run(config: ExperimentConfig, run_dir: Path, checkpoint) -> RunResult:
    started = time.time()
    budget_s = config.evolution.time_budget_s
    deadline = None if budget_s is None else Deadline(started + budget_s)
    quiet_libraries()
    model_path = build.resolve_model_path(config, run_dir)
    tokenizer = load_tokenizer(config.tokenizer or model_path, config.model.trust_remote_code)
    prepared = build.prepare_data(config, tokenizer)
    founders = build.founder_hyperparameters(config)
    owns_ray = config.population.backend == "ray" and not _ray_initialized()
    population = _population(config, run_dir, model_path, prepared, founders)
    status, tracker = "FINISHED", None
    try:
        if deadline is not None and not population.started(deadline.at - time.time()):
            raise TimeBudgetSpent(budget_s)
        saved = checkpoint[1] if checkpoint else {}
        fitness = build.fitness(config)
        tracker = _tracker(config, run_dir, saved, fitness)
        last = LastRecord()
        controller = build.controller(
            config, population, prepared,
            observers=[table_printer(fitness), tracker, last],
            checkpointer=EvolutionCheckpointer(run_dir, config.checkpoint.every, config.checkpoint.keep,
                                               extra_state=lambda: {"tracking": tracker.state_dict(),
                                                                    "run_dir": str(run_dir)}),
            save_elite=lambda c, slot: c.population.export_adapter(slot, run_dir / "elites" / f"generation_{c.generation:05d}"),
            progress=progress_line,
            deadline=deadline,
        )
        if checkpoint:
            population.load(checkpoint[0] / "members")
            population.checkpoint_committed(checkpoint[0])
            controller.load_state_dict(saved["controller"])
        try:
            controller.run(config.evolution.generations)
        except KeyboardInterrupt:
            status = "KILLED"
            print(f"\ninterrupted: the last checkpoint is intact; continue with `evo-sft resume {run_dir}`")
        if controller.generation == 0 and status != "KILLED":  # only the time budget ends a run before it
            raise TimeBudgetSpent(budget_s)
        full_test = config.evolution.fitness_options.full_test_at_end and status != "KILLED"
        result = _finish(config, controller, run_dir, tokenizer, fitness, len(prepared["test"]["input_ids"]),
                         interrupted=status == "KILLED", last=last.record, full_test=full_test, tracker=tracker)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if tracker is not None:
            tracker.close(status)
        population.close()
        if owns_ray:  # a Ray session the caller started (a notebook, a test) stays up
            _shutdown_ray(config)
    if not result.interrupted:
        print_summary(controller, result, tracker, fitness)
    return result


def _population(config: ExperimentConfig, run_dir: Path, model_path: str, prepared: dict, founders: list[dict]):
    if config.population.backend == "local":
        return LocalPopulation(build.local_hosts(config, model_path, prepared, founders))
    import ray

    from evo_sft.population.ray_backend import RayPopulation
    from evo_sft.population.ray_session import init_ray

    if not ray.is_initialized():
        init_ray(config.ray.address, run_dir / "ray", config.ray.init)
    _check_gang_fits(config)
    return RayPopulation(build.member_recipe(config, model_path), prepared, founders,
                         num_cpus=config.population.num_cpus, num_gpus=config.population.num_gpus,
                         members_per_actor=config.population.members_per_actor,
                         gpus_per_member=config.population.gpus_per_member)


def _check_gang_fits(config: ExperimentConfig) -> None:
    """The processes of a member share one node: refuse a member larger than every node of the cluster."""
    population = config.population
    if population.gpus_per_member == 1:
        return
    from evo_sft.population.gang import largest_node

    largest = largest_node()
    for kind, each in (("GPU", population.num_gpus), ("CPU", population.num_cpus)):
        needed = population.gpus_per_member * each
        if needed > largest[kind]:
            raise ConfigError(f"population.gpus_per_member: {population.gpus_per_member} processes of "
                              f"population.num_{kind.lower()}s {each} need {needed:g} {kind}s on one node; "
                              f"the largest node of the Ray cluster has {largest[kind]:g}")


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _shutdown_ray(config: ExperimentConfig) -> None:
    if config.population.backend == "ray":
        from evo_sft.population.ray_session import shutdown_ray

        shutdown_ray()


def _tracker(config: ExperimentConfig, run_dir: Path, saved: dict, fitness: Fitness):
    """The tracker, resumed from the checkpoint `saved` if any. A sqlite store that moved with the
    run folder since that checkpoint is pointed at the artifacts next to it first."""
    from evo_sft.tracking.store import move_artifact_root
    from evo_sft.tracking.tracker import MLflowTracker

    uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
    state = saved.get("tracking")
    if state and state["tracking_uri"] != uri == saved_tracking_uri(saved, run_dir):
        move_artifact_root(uri, state["tracking_uri"])
    return MLflowTracker(uri, config.tracking.experiment or config.name, flatten_config(config.to_dict()),
                         run_name=run_dir.name, state=state, searched=list(config.evolution.hyperparameters),
                         queue_dir=run_dir / "tracking_queue", fitness=fitness)


class LastRecord:
    """A controller observer that keeps the last generation's record."""

    record: GenerationRecord | None = None

    def __call__(self, controller: Controller, record: GenerationRecord) -> None:
        self.record = record


def _finish(config: ExperimentConfig, controller: Controller, run_dir: Path, tokenizer, fitness: Fitness,
            test_rows: int, interrupted: bool, last: GenerationRecord | None, full_test: bool, tracker) -> RunResult:
    """Export the best member (`_export_best`): the best of the last evaluation, or, with `full_test`
    (multi-fidelity), of every member scored now on the whole test set. Its line's schedule and the
    last population's scores are kept in the run folder."""
    rows = (fitness.scored_rows(test_rows, full_test), test_rows)
    scores = controller.scores()
    evaluations = last.evaluations if last is not None and last.member_ids == controller.slot_ids else None
    if full_test:
        evaluations = controller.population.evaluate(full=True)
        scores = [evaluation.fitness for evaluation in evaluations]
    best = elite(scores)
    best_id = controller.slot_ids[best]
    evaluation = evaluations[best] if evaluations else None
    if full_test:
        tracker.log_final(controller.generation, best_id, evaluation)
    schedule = controller.schedule(best_id)
    save_json(run_dir / SCHEDULE_FILE, schedule)
    tracker.log_schedule(schedule)
    scored = None
    if evaluations:
        scored = evaluation_record(controller, evaluations, best_id, fitness, full_test, rows)
        save_json(run_dir / EVALUATION_FILE, scored)
    target = run_dir / "best_adapter"
    if not interrupted:
        _export_best(config, controller, best, run_dir, tokenizer, scored, tracker)
    return RunResult(run_dir, best_id, scores[best], target, interrupted, evaluation, scored_rows=rows[0],
                     registered_as=None if interrupted else config.tracking.register_model)


def _export_best(config: ExperimentConfig, controller: Controller, best: int, run_dir: Path, tokenizer,
                 scored: dict | None, tracker) -> None:
    """The member in slot `best` as `RUN/best_adapter` (its adapter, or its whole model without
    LoRA) with the tokenizer and its model card; with `tracking.register_model`, registered too."""
    member_id, name = controller.slot_ids[best], config.tracking.register_model
    staging = run_dir / ".best_adapter"
    shutil.rmtree(staging, ignore_errors=True)
    exported = Path(controller.population.export_adapter(best, staging))
    tokenizer.save_pretrained(exported)
    form = "adapter" if config.lora is not None else "whole"
    card = card_for(config, run_dir, controller.lineage, controller.schedule(member_id), controller.generation, form,
                    scored, tracker.state_dict(), bool(tokenizer.chat_template), registered_as=name)
    write_card(exported, card)
    target = replace_directory(exported, run_dir / "best_adapter")
    shutil.rmtree(staging, ignore_errors=True)
    if name is not None:
        tracker.register_model(name, target, build.local_base_model(config, run_dir) if form == "adapter" else None,
                               f"member_{member_id:05d}-generation_{controller.generation:05d}-{form}", card,
                               build.generation_settings(config, tokenizer))


def evaluation_record(controller: Controller, evaluations: list[Evaluation], best_id: int, fitness: Fitness,
                      full_test: bool, rows: tuple[int, int]) -> dict:
    """What `EVALUATION_FILE` holds: the population of this generation as scored; a score that is
    not finite is null."""
    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    members = [{"member_id": member_id, "fitness": finite(e.fitness), "metric_value": finite(fitness.shown(e.fitness)),
                "test_loss": finite(e.test_loss), "samples": list(e.samples)}
               for member_id, e in zip(controller.slot_ids, evaluations)]
    return {"generation": controller.generation, "metric": fitness.metric, "full_test": full_test,
            "scored_rows": rows[0], "test_rows": rows[1], "best_member": best_id, "members": members}


def table_printer(fitness: Fitness):
    """A controller observer that prints each generation's table: the mutable hyperparameters,
    train loss, the fitness metric (and the test loss, where that is not the metric) and
    throughput of every member, and the clones made."""
    losses = fitness.metric != "test_loss"

    def print_table(controller: Controller, record: GenerationRecord) -> None:
        names = controller.hp_config.names()
        if controller.generation_tokens is None:
            print(f"generation {record.generation}  (optimizer step "
                  f"{controller.generation * controller.steps_per_generation} per member)")
        else:
            print(f"generation {record.generation}  ({controller.tokens_trained:,} supervised tokens trained)")
        print(f"  {'member':>6} " + " ".join(f"{name:>{max(10, len(name))}}" for name in names)
              + f" {'train_loss':>10}" + (f" {'test_loss':>10}" if losses else "")
              + f" {fitness.metric:>10} {'tok/s':>8}")
        for slot, member_id in enumerate(record.member_ids):
            hp, train = record.hyperparameters[slot], record.train[slot]
            marker = "*" if slot == record.elite_slot else " "
            print(f" {marker}{member_id:>6} " + " ".join(f"{shown(hp[name]):>{max(10, len(name))}}" for name in names)
                  + f" {train.train_loss:>10.4f}" + (f" {record.evaluations[slot].test_loss:>10.4f}" if losses else "")
                  + f" {fitness.shown(record.fitness[slot]):>10.4f} {train.tokens_per_second:>8.0f}")
        line = clones_line(record.decisions)
        if line:
            print(line)

    return print_table


def clones_line(decisions: list) -> str | None:
    """The clones a generation opened with, each with the hyperparameter its mutation changed."""
    born = [d for d in decisions if d.clone]
    if not born:
        return None
    return "  clones: " + ", ".join(f"slot {d.slot} <- member {d.parent_id} "
                                    f"({'not mutated' if d.mutation == 'none' else d.mutation})" for d in born)


def print_summary(controller: Controller, result: RunResult, tracker, fitness: Fitness) -> None:
    best = result.best_member
    history = controller.fitness[best]
    print("\n=== evo-sft summary ===")
    print(f"run folder:      {result.run_dir}")
    scored_with = {name: float(f"{value:.6g}") if isinstance(value, float) else value  # no binary noise
                   for name, value in controller.lineage.hyperparameters_at(best, controller.generation).items()}
    print(f"best member: {best}  {fitness.metric} {fitness.shown(result.best_fitness):.4f} "
          f"on {result.scored_rows} held-out test rows  hyperparameters {scored_with}")
    print("lineage: " + " <- ".join(str(m) for m in controller.lineage.ancestry(best)))
    print("fitness per generation (best member's line): " + " ".join(f"{f:.4f}" for f in history))
    founders = [m for m, info in controller.lineage.members.items() if info.parent_id is None and controller.fitness[m]]
    print(f"founders' {fitness.metric} after the first generation: "
          + " ".join(f"{fitness.shown(controller.fitness[m][0]):.4f}" for m in founders))
    if result.evaluation is not None and result.evaluation.samples:
        print(f"outputs on the first test prompts (test_loss {result.evaluation.test_loss:.4f}):")
        for sample in result.evaluation.samples:
            print(f"  prompt {sample['prompt']!r}  reference {sample['reference']!r}  output {sample['output']!r}")
    print(f"checkpoints:     {result.run_dir / 'checkpoints'}")
    print(f"best adapter:    {result.best_adapter}  (PeftModel.from_pretrained(base, path))")
    from evo_sft.tracking.tracker import mlflow_models_page, mlflow_page

    experiment, parent = tracker.outbox.experiment_id, tracker.outbox.run_ids.get("parent")
    server = tracker.tracking_uri.rstrip("/") + "/" if tracker.tracking_uri.startswith(("http://", "https://")) else None
    if server is not None:
        print(f"MLflow runs:     {mlflow_page(server, experiment)}")
        print(f"MLflow run:      {mlflow_page(server, experiment, parent)}")
    else:
        print(f"MLflow UI:       {evo_sft_command()} ui {result.run_dir}  (serves this run's store, prints its address)")
    if result.registered_as is not None:
        queued = any(record["kind"] == "register_model" for record in tracker.outbox.pending)
        where = ("queued until MLflow is reachable" if queued else mlflow_models_page(server, result.registered_as)
                 if server is not None else "on the Models page of evo-sft ui")
        print(f"MLflow model:    {result.registered_as!r}, a new version from member {best} ({where})")
    print(f"resume/extend:   {evo_sft_command()} resume {result.run_dir} --generations N")


def evo_sft_command() -> str:
    """`evo-sft` as the user can type it: its name where PATH finds this one, else its path (the
    console script of a venv that is not active, as after `make demo`)."""
    script = Path(sys.executable).parent / "evo-sft"
    return "evo-sft" if not script.is_file() or shutil.which("evo-sft") == str(script) else str(script)
