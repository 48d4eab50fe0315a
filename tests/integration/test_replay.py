"""`evo-sft replay`: the winning line's schedule, retrained as one member in a new process, reaches
the run's fitness in every generation to 1e-6 (here exactly: the same operations on the same data
on the CPU). A schedule whose data order is shifted by one optimizer step does not, so the check
sees the data order the line trained on."""
import json
import re

from evo_sft.run import SCHEDULE_FILE
from tests.helpers.paths import DEMO
from tests.integration.test_cli import evo

SETTINGS = ["seed=42", "population.backend=local", "data.num_rows=300", "evolution.generations=4",
            "evolution.steps_per_generation=15", "evolution.fitness=test_loss", "evolution.fitness_options={}"]


def replayed_differences(output: str) -> list[float]:
    return [float(d) for d in re.findall(r"^ +\d+ +\d+ +\S+ +\S+ +(\S+)$", output, re.M)]


def test_replay_retrains_the_winning_line_to_the_same_fitness(tmp_path):
    run_dir = tmp_path / "run"
    sets = [x for s in SETTINGS for x in ("--set", s)]
    result = evo(["run", DEMO, "--run-dir", run_dir, *sets], cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    schedule = json.loads((run_dir / SCHEDULE_FILE).read_text())
    entries = schedule["generations"]
    assert len({entry["slot"] for entry in entries}) > 1, "the line should move between slots (data streams)"
    assert len({entry["member_id"] for entry in entries}) > 1

    replayed = evo(["replay", run_dir], cwd=tmp_path, timeout=300)
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-3000:]
    differences = replayed_differences(replayed.stdout)
    assert len(differences) == len(entries) and max(differences) <= 1e-6, replayed.stdout

    shifted = tmp_path / "shifted.json"
    entries[-1]["rows_before"] += entries[-1]["hyperparameters"]["batch_size"]
    shifted.write_text(json.dumps(schedule))
    wrong = evo(["replay", run_dir, "--schedule", shifted], cwd=tmp_path, timeout=300)
    assert wrong.returncode == 1, wrong.stdout[-3000:] + wrong.stderr[-3000:]
    assert replayed_differences(wrong.stdout)[-1] > 1e-6


def test_replay_of_a_folder_without_a_schedule_is_one_line(tmp_path):
    result = evo(["replay", tmp_path], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == \
        f"error: no schedule at {tmp_path / SCHEDULE_FILE}: a run writes it when it finishes"
