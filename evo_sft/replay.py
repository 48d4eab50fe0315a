"""`evo-sft replay RUN_DIR`: retrain the winning line's schedule (`schedule.json`) as one member,
like Ray Tune's `PopulationBasedTrainingReplay`, and compare its fitness with the run's in
every generation.

The member starts as the line's founder started (the founder's slot and hyperparameters, the
agent built with the run's seed). Each generation it trains with the line's hyperparameters of
that generation (set, as in the run, where a clone was born or they changed) on the data the line
saw: the stream of the slot the line's member lived in, from where that slot's stream stood when
the generation began. What it cannot reproduce is the torch generator of a slot that a line moved
into: LoRA dropout masks and the rows a grown LoRA rank draws come from it, so a line with
either is retrained close to, not exactly as, the run (`exact` in the result says which)."""
import math
from dataclasses import dataclass
from pathlib import Path

from evo_sft import build
from evo_sft.console import quiet_libraries
from evo_sft.data import DataStream
from evo_sft.data.sources import load_tokenizer
from evo_sft.io.storage import load_json
from evo_sft.population.hosting import build_hosts
from evo_sft.population.member import stream_seed
from evo_sft.run_folder import config_of

TOLERANCE = 1e-6


@dataclass
class Replayed:
    generation: int
    member_id: int
    run_fitness: float | None
    fitness: float

    @property
    def difference(self) -> float:
        return abs(self.fitness - self.run_fitness) if self.run_fitness is not None else math.nan


def replay(run_dir: Path, schedule_file: Path) -> tuple[list[Replayed], bool]:
    """Retrain the schedule `schedule_file` of the run in `run_dir`; print each
    generation's fitness beside the run's. Returns those and whether the replay is expected to be
    exact (no LoRA dropout, no rank grown along the line)."""
    quiet_libraries()
    run_dir = Path(run_dir).resolve()
    schedule = load_json(schedule_file)
    config = config_of(run_dir)
    entries = schedule["generations"]
    if any(entry["slot"] is None for entry in entries):
        raise ValueError(f"{schedule_file} names no slots (a run from before slots "
                         "were kept): its data order cannot be replayed")
    model_path = build.resolve_model_path(config, run_dir)
    tokenizer = load_tokenizer(config.tokenizer or model_path, config.model.trust_remote_code)
    founder = entries[0]
    host = build_hosts(build.member_recipe(config, model_path), build.prepare_data(config, tokenizer),
                       {founder["slot"]: founder["hyperparameters"]})[founder["slot"]]
    print(f"replaying member {schedule['member_id']}'s line from {run_dir}: {len(entries)} generations")
    print(f"  {'generation':>10} {'member':>6} {'run fitness':>12} {'replayed':>12} {'difference':>10}")
    results, exact, before = [], True, None
    for entry in entries:
        hyperparameters = entry["hyperparameters"]
        if before is not None and (entry["member_id"] != before["member_id"] or hyperparameters != before["hyperparameters"]):
            host.set_hyperparameters(hyperparameters)
        exact &= not hyperparameters.get("lora_dropout") and (
            before is None or hyperparameters.get("lora_r", 0) <= before["hyperparameters"].get("lora_r", 0))
        host.stream = DataStream(len(host.gym.train), stream_seed(config.seed, entry["slot"]))
        host.stream.take(entry["rows_before"])
        host.train(entry.get("batches") or schedule["steps_per_generation"])  # schedules before token intervals have none
        result = Replayed(entry["generation"], entry["member_id"], entry["fitness"], host.evaluate().fitness)
        results.append(result)
        run = f"{result.run_fitness:12.6f}" if result.run_fitness is not None else f"{'-inf':>12}"
        print(f"  {result.generation:>10} {result.member_id:>6} {run} {result.fitness:12.6f} {result.difference:10.2e}")
        before = entry
    return results, exact
