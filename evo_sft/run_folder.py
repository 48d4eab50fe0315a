"""What a run folder holds, read without torch, transformers or MLflow (so that `evo-sft
status`, `ui` and a command given a folder that holds no run answer at once): its config, its
newest intact checkpoint's population and best member, its final evaluation, its tracking store."""
from pathlib import Path

import yaml

from evo_sft.config import ExperimentConfig, config_from_dict
from evo_sft.evolution import Lineage, elite, score
from evo_sft.io.checkpoint import latest_intact
from evo_sft.io.storage import load_json
from evo_sft.tracking.store import moved

CONFIG_FILE = "config.yaml"
# The last population as the run scored it at its end (each member's fitness, metric, test loss
# and samples; the best member): what `status`, `export` and the model card read.
EVALUATION_FILE = "evaluation.json"
SCHEDULE_FILE = "schedule.json"  # the winning line's schedule, what `evo-sft replay` retrains


class NotARun(Exception):
    """A folder given as a run's is missing or holds no evo-sft run (a mistake in what a command
    is given: one line, exit code 2)."""


def run_folder(path: str | Path) -> Path:
    """`path`, absolute, once it is known to hold an evo-sft run (its config.yaml)."""
    path = Path(path).resolve()
    if not path.exists():
        raise NotARun(f"{path} is missing: there is no such folder")
    if not (path / CONFIG_FILE).is_file():
        raise NotARun(f"{path} holds no evo-sft run (no {CONFIG_FILE}); start one with `evo-sft run`")
    return path


def saved_tracking_uri(saved: dict, run_dir: Path) -> str | None:
    """The tracking URI of the checkpoint `saved`, now that its run folder is `run_dir`: a sqlite
    store inside the folder moved with it."""
    uri = (saved.get("tracking") or {}).get("tracking_uri")
    return uri and moved(uri, Path(saved.get("run_dir", run_dir)), run_dir)


def final_evaluation(run_dir: Path, generation: int) -> dict | None:
    """The run's `EVALUATION_FILE` where it scores the population of `generation` (the run ended
    there), else None."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    evaluation = load_json(path)
    return evaluation if evaluation["generation"] == generation else None


def status_dict(run_dir: Path) -> dict:
    """The newest checkpoint's population: the members as they were last scored, with the
    hyperparameters they were scored with, and the best of them (`best_member`)."""
    _, saved = latest_intact(run_dir)
    state = saved["controller"]
    lineage = Lineage.from_dict(state["lineage"])
    fitness = dict((member_id, history) for member_id, history in state["fitness"])
    members = []
    for member_id in state["slot_ids"]:
        info = lineage.members[member_id]
        members.append({"id": member_id, "parent_id": info.parent_id, "generation_born": info.generation_born,
                         "hyperparameters": info.hyperparameters, "fitness": fitness[member_id]})
    tracking = saved.get("tracking") or {}
    return {
        "generation": state["generation"],
        "best_member": best_member(run_dir, saved),
        "members": members,
        "mlflow": {"tracking_uri": saved_tracking_uri(saved, Path(run_dir).resolve()),
                   **{key: tracking.get(key) for key in ("experiment_id", "parent_run_id")}},
    }


def best_member(run_dir: Path, saved: dict) -> int:
    """The best member of the checkpoint `saved`: the run's where the run ended at that checkpoint
    (scored on the whole test set with `full_test_at_end`), else the best by its fitness."""
    state = saved["controller"]
    ended = final_evaluation(run_dir, state["generation"])
    if ended is not None and ended["best_member"] in state["slot_ids"]:
        return ended["best_member"]
    fitness = dict((member_id, history) for member_id, history in state["fitness"])
    eval_loop = config_of(run_dir).evolution.eval_loop
    return state["slot_ids"][elite([score(fitness[member_id], eval_loop) for member_id in state["slot_ids"]])]


def config_of(run_dir: Path) -> ExperimentConfig:
    return config_from_dict(yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()))
