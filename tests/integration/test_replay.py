"""`evo-sft replay`: the winning line's schedule, retrained as one member in a new process, reaches
the run's fitness in every generation to 1e-6 (here exactly: the same operations on the same data
on the CPU). A schedule whose data order is shifted by one optimizer step does not, so the check
sees the data order the line trained on. The run is the shared 4-generation demo run
(tests/helpers/demo_runs.py), scored by test loss."""
import json
import re
import shutil

from evo_sft.run_folder import SCHEDULE_FILE
from tests.helpers.demo_runs import evo
from tests.helpers.paths import DEMO


def replayed_differences(output: str) -> list[float]:
    return [float(d) for d in re.findall(r"^ +\d+ +\d+ +\S+ +\S+ +(\S+)$", output, re.M)]


def test_replay_retrains_the_winning_line_to_the_same_fitness(tmp_path, demo_runs):
    run_dir = demo_runs.full
    schedule = json.loads((run_dir / SCHEDULE_FILE).read_text())
    entries = schedule["generations"]
    assert len({entry["slot"] for entry in entries}) > 1, "the line should move between slots (data streams)"
    assert len({entry["member_id"] for entry in entries}) > 1

    replayed = evo("replay", run_dir)
    differences = replayed_differences(replayed.stdout)
    assert len(differences) == len(entries) and max(differences) <= 1e-6, replayed.stdout

    shifted = tmp_path / "shifted.json"
    entries[-1]["rows_before"] += entries[-1]["hyperparameters"]["batch_size"]
    shifted.write_text(json.dumps(schedule))
    wrong = evo("replay", run_dir, "--schedule", shifted, check=False)
    assert wrong.returncode == 1, wrong.stdout[-3000:] + wrong.stderr[-3000:]
    assert replayed_differences(wrong.stdout)[-1] > 1e-6


def test_replay_of_a_run_without_a_schedule_is_one_line(tmp_path):
    shutil.copy(DEMO, tmp_path / "config.yaml")  # a run that has not finished
    result = evo("replay", tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.strip() == \
        f"error: no schedule at {tmp_path / SCHEDULE_FILE}: a run writes it when it finishes"
