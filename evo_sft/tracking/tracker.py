"""MLflow tracking of an evolution: one parent run, one child run per member, and a local queue
that keeps every record while the tracking server is unreachable.

What is logged
- The experiment is tagged `mlflow.experimentKind=custom_model_development`, so MLflow 3 opens it
  on its runs (model training) rather than on GenAI's overview.
- Parent run (tag `evo_sft.role=evolution`, a description in `mlflow.note.content`): the
  flattened config as params; at step = generation `best_fitness`, `mean_fitness`,
  `worst_fitness`, `nonfinite_members` and the best member's searched hyperparameters (those the
  search mutates) as `best_lr`, `best_batch_size`; artifacts `elite/generation_XXXXX/` (the elite's PEFT adapter),
  `samples/generation_XXXXX.json` (the elite's outputs on the first test prompts, beside the
  references), `lineage.json`, `schedule.json`, `family_tree.png`, `fitness_curves.png`,
  `schedule.png` (drawn for the elite's line at most every 30 s, and at the end for the winner's); with
  `evolution.fitness_options.full_test_at_end`, the best member scored on the whole test set at
  the end: metrics `final_<metric>` and `final_test_loss`, artifact `samples/final.json`. At the
  end (`log_schedule`), the winning line's schedule at step = generation: `lineage_<hyperparameter>`
  for every numeric searched hyperparameter, `lineage_fitness` and `lineage_member` (which member of the
  line trained in that generation). A resumed run logs them again at its end; MLflow keeps both
  points of a step.
- Member runs (tag `mlflow.parentRunId`; `evo_sft.member_id`, `evo_sft.parent_member_id`,
  `evo_sft.parent_run_id`, `evo_sft.generation_born`, `evo_sft.mutation`, `evo_sft.slot`,
  `evo_sft.status` alive|retired, a description): params `initial.<hyperparameter>`; at step =
  the member's global optimizer step `train_loss` at every step, and at the end of each
  generation `test_loss` (whatever the fitness), the fitness metric (`exact_match`, ...;
  `test_loss` itself by default), `fitness`, `tokens_per_second` and every numeric searched
  hyperparameter (`lr`, `batch_size`, `lora_r`, ...) as metrics, since params are write-once (one
  the search never changes would only draw a flat line: its value is the param); a categorical
  one (`scheduler`) as the tag `hp.<name>`, its current value (its history is in the lineage). A clone's run starts with a copy of every point of its parent's run before its own
  first step (the parent's run holds its ancestors' points in turn), so each member's charts are
  its whole line from the first step.
- With `tracking.register_model: NAME` (`register_model`), the best member at the end of the run
  becomes a new version of NAME in the Model Registry: its files (`best_adapter/`, its model card,
  a local base model) under the parent run's `registered_models/`, the version tagged with the
  member, its parent member, the generation, fitness, metric and test loss, the evolution's and
  the member's run ids, and described by the model card (evo_sft.tracking.registry). Like every
  record it waits in the queue while the server is unreachable.

Non-finite values are never logged (MLflow stores -inf as -1.8e308, which ruins every plot): a
member whose loss diverged has no `fitness` point at that step, the parent run counts such
members in `nonfinite_members`, and `best/mean/worst_fitness` are over the finite members.

Outages
Every MLflow call goes through `evo_sft.tracking.outbox`, which queues records while the server is
unreachable and sends them, in order, at the start of the next generation and in `close()`.

Starting again
A tracker made without `state` in a queue folder where an earlier tracker made runs (a run killed
before its first checkpoint, started again in the same folder) deletes those runs, ending any
still RUNNING as KILLED, and drops that tracker's queued records, with a warning.

Resume
A tracker made from a checkpoint's `state` reopens the parent and member runs it names. Member
runs of the parent that the state does not name were made after that checkpoint by a run that
died; the resumed run makes them again, so they are deleted (MLflow's soft delete: `mlflow gc`
purges them, `MlflowClient.restore_run` brings one back), with a warning that names them. Points
that the dead run logged to the runs the state names, after the checkpoint, stay: MLflow cannot
delete a metric point, so those steps hold the dead run's value beside the resumed run's.
"""
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import quote

from evo_sft.config import flatten_config
from evo_sft.evolution import elite
from evo_sft.fitness import Fitness, NegativeTestLoss
from evo_sft.tracking.outbox import DESCRIPTION_TAG, METRICS_PER_BATCH, Outbox, TrackingWarning
from evo_sft.tracking.plots import plot_family_tree, plot_fitness_curves, plot_schedule
from evo_sft.tracking.registry import ARTIFACTS as REGISTERED, save_mlflow_model
from evo_sft.tracking.store import artifact_root

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
ARTIFACT_INTERVAL_S = 30.0  # how stale the pictures may be while a run goes on
# MLflow 3 opens an experiment of this kind on its runs (model training), not on GenAI's traces
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
MODEL_TRAINING = "workflowType=machine_learning"
# MLflow 3.17's runs list opens, on a first visit, the parent of every run tagged so
MEMBER_RUN_TAGS = {"mlflow.runType": "evaluation"}


def mlflow_page(server: str, experiment_id: str, run_id: str | None = None, tab: str = "") -> str:
    """An address in the MLflow UI at `server` (e.g. "http://127.0.0.1:5000/"; "" for one relative to
    the page that shows it): the experiment's runs, or a run's page (or its `tab`, "/artifacts").
    MLflow 3.17's UI picks GenAI or model-training views from a switch of its own (`workflowType`
    in the address, else the browser's last choice, GenAI at first), not from the experiment's
    kind: every address evo-sft prints or writes carries it."""
    run = f"/runs/{run_id}{tab}" if run_id else ""
    return f"{server}#/experiments/{experiment_id}{run}?{MODEL_TRAINING}"


def mlflow_models_page(server: str, name: str) -> str:
    """The registered model `name`'s page in the MLflow UI at `server` (as for `mlflow_page`)."""
    return f"{server}#/models/{quote(name, safe='')}"


# Run descriptions: the outbox fills in {experiment} and the ids of the runs they link to
PARENT_DESCRIPTION = f"""\
**An evo-sft evolution**: its pictures and files are in its \
[artifacts]({mlflow_page("", "{experiment}", "{self}", "/artifacts")}), its members are its child runs in \
the [runs list]({mlflow_page("", "{experiment}")}).

- Here: best, mean and worst fitness per generation (step = generation); `lineage_*`, the
  hyperparameters, fitness and member of the winning line in each generation (logged when the run
  ends); in the artifacts, `fitness_curves.png`, `family_tree.png`, `schedule.png`, `lineage.json`,
  `schedule.json` (what `evo-sft replay` retrains) and each generation's elite adapter.
- In a member's run (step = its optimizer step): `train_loss` at every step, and `fitness`,
  `test_loss`, the hyperparameters the search mutates and throughput at the end of each generation
  it trained in. A clone's run starts with a copy of its ancestors' points up to its birth, so
  each chart is its whole line from the first step.
"""
# Short HTTP retries and timeouts so an outage costs seconds per generation, not minutes
# (MLflow 3's defaults: 7 retries with backoff factor 2, 120 s timeout). MLflow reads them at
# each request; the tracker sets them for the process only where they are not set already.
HTTP_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def short_http_retries() -> None:
    """`HTTP_ENVIRONMENT` for this process, where it does not set those variables itself."""
    for name, value in HTTP_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def member_key(member_id: int) -> str:
    return f"member:{member_id}"


class MLflowTracker:
    """Controller observer: `tracker(controller, record)` after each generation.

    `searched` names the hyperparameters the search mutates: only those are logged as metrics.
    `state` (from `state_dict()`) resumes the same parent and member runs. `queue_dir` holds
    the records waiting for the server; a tracker started on the same folder sends them first.
    Lineage and pictures are refreshed after a generation at most every `artifact_interval_s`
    seconds (drawing them takes longer than a generation of a small run), and at the end.
    """

    def __init__(self, tracking_uri: str, experiment: str, config: dict, run_name: str | None = None,
                 state: dict | None = None, *, searched: list[str], queue_dir: Path,
                 artifact_interval_s: float = ARTIFACT_INTERVAL_S,
                 fitness: Fitness | None = None):
        short_http_retries()
        self.tracking_uri, self.experiment, self.searched = tracking_uri, experiment, list(searched)
        self.fitness = fitness or NegativeTestLoss()
        self.artifact_interval_s = artifact_interval_s
        self._controller = None
        self._refreshed_at, self._refreshed_time = None, -math.inf  # the generation they show; when drawn
        self._live: set[int] = set()
        state = state or {}
        run_ids = {member_key(int(m)): run_id for m, run_id in state.get("member_runs", {}).items()}
        if state.get("parent_run_id"):
            run_ids["parent"] = state["parent_run_id"]
        self.outbox = Outbox(tracking_uri, queue_dir, state.get("experiment_id"), run_ids)
        if not state:
            self._delete_earlier_attempt()
        self.member_slots = {int(m): slot for m, slot in state.get("member_slots", {}).items()}
        self._known_runs = self.outbox.keys_created()
        if "parent" in self._known_runs:
            self.outbox.submit({"kind": "update_run", "key": "parent", "status": "RUNNING"})
            self.outbox.submit({"kind": "delete_lost_member_runs", "key": "parent"})
        else:
            self._start_parent(flatten_config(config), run_name)

    # ----------------------------------------------------------------- public
    def __call__(self, controller, record) -> None:
        self._controller = controller
        self.flush()
        for member_id in record.retired_ids:
            self._retire(member_id, record.generation)
        for slot, member_id in enumerate(record.member_ids):
            self._ensure_member(controller.lineage, member_id, slot, record.hyperparameters[slot],
                                first_step(record.train[slot]))
            self._log_member(member_id, record, slot)
        self._log_generation(record)
        if record.evaluations and record.evaluations[record.elite_slot].samples:
            self._log_samples(f"generation_{record.generation:05d}", record.generation, record.elite_id,
                              record.evaluations[record.elite_slot])
        if record.elite_adapter is not None:
            self.outbox.submit({"kind": "artifact", "key": "parent", "local_path": str(record.elite_adapter),
                                "artifact_path": f"elite/generation_{record.generation:05d}"})
        if time.monotonic() - self._refreshed_time >= self.artifact_interval_s:
            self._refresh_artifacts(controller, controller.schedule(record.elite_id))

    def log_final(self, generation: int, member_id: int, evaluation) -> None:
        """The best member as scored on the whole test set after `generation` generations
        (multi-fidelity): parent metrics `final_<metric>` and `final_test_loss` at that step, and
        `samples/final.json`."""
        self._log_metrics("parent", {f"final_{self.fitness.metric}": self.fitness.shown(evaluation.fitness),
                                     "final_test_loss": evaluation.test_loss}, generation)
        if evaluation.samples:
            self._log_samples("final", generation, member_id, evaluation)

    def log_schedule(self, schedule: dict) -> None:
        """The winning line's schedule (`evo_sft.evolution.schedule`): parent metrics
        `lineage_<hyperparameter>`, `lineage_fitness` and `lineage_member` at step = generation,
        `schedule.json`, and the pictures drawn for that line."""
        points = []
        for entry in schedule["generations"]:
            values = {**{f"lineage_{name}": v for name, v in self._numbers(entry["hyperparameters"]).items()},
                      "lineage_member": entry["member_id"]}
            if entry["fitness"] is not None:
                values["lineage_fitness"] = entry["fitness"]
            points += [(name, value, entry["generation"]) for name, value in values.items()]
        self._log_points("parent", points)
        if self._controller is not None:
            self._refresh_artifacts(self._controller, schedule)

    def register_model(self, name: str, export_dir: Path, base_dir: Path | None, artifact_path: str, card,
                       model_config: dict) -> None:
        """The export in `export_dir` (its model card `card`, `evo_sft.model_card.ModelCard`) as a new
        version of the registered model `name` (`evo_sft.tracking.registry`), its files in the
        parent run at `registered_models/<artifact_path>`; tagged with the card's registry tags and
        the parent and member run ids, described by the card."""
        with tempfile.TemporaryDirectory() as folder:
            model = Path(folder) / artifact_path
            save_mlflow_model(export_dir, base_dir, model_config, model)
            self.outbox.submit({"kind": "register_model", "key": "parent", "name": name, "local_path": str(model),
                                "artifact_path": f"{REGISTERED}/{artifact_path}", "tags": card.registry_tags(),
                                "run_tags": {"evo_sft.parent_run_id": "parent",
                                             "evo_sft.member_run_id": member_key(card.member_id)},
                                "description": card.body()})

    def flush(self) -> bool:
        """Send the queued records in order; stop at the first failure. True when the queue is empty."""
        return self.outbox.flush()

    def close(self, status: str = "FINISHED") -> None:
        """Flush, refresh the artifacts (unless `log_schedule` or the last generation did), end
        every open run with `status`."""
        self.flush()
        controller = self._controller
        if controller is not None and self._refreshed_at != controller.generation:
            best = controller.slot_ids[controller.best_slot()]
            self._refresh_artifacts(controller, controller.schedule(best))
        for member_id in sorted(self._live):
            self.outbox.submit({"kind": "terminate", "key": member_key(member_id), "status": status})
        self._live.clear()
        self.outbox.submit({"kind": "terminate", "key": "parent", "status": status})
        for record in self.outbox.pending:
            if record["kind"] == "register_model":
                warnings.warn(f"the registration of member {record['tags']['evo_sft.member_id']} as a version of "
                              f"{record['name']!r} waits in {self.outbox.queue_file} for MLflow at {self.tracking_uri}",
                              TrackingWarning, stacklevel=2)
        if self.outbox.pending:
            warnings.warn(f"{len(self.outbox.pending)} MLflow records are still queued in {self.outbox.queue_file}; "
                          "a tracker resumed on this folder sends them", TrackingWarning, stacklevel=2)

    def state_dict(self) -> dict:
        run_ids = self.outbox.run_ids
        members = {key.split(":")[1]: run_id for key, run_id in run_ids.items() if key != "parent"}
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.outbox.experiment_id,
            "parent_run_id": run_ids.get("parent"),
            "member_runs": members,
            "member_slots": {str(m): slot for m, slot in self.member_slots.items()},
        }

    # ----------------------------------------------------------------- what is logged
    def _delete_earlier_attempt(self) -> None:
        """A tracker started afresh where an earlier one worked (a run stopped before its first
        checkpoint, started again in the same folder): the earlier runs are deleted and its
        queued records dropped, so the folder ends with one parent run."""
        made, dropped = self.outbox.forget_earlier_attempt()
        done = []
        if made:
            self.outbox.submit({"kind": "delete_runs", "run_ids": list(made.values())})
            done.append(f"its {len(made)} MLflow runs are deleted (parent run {made.get('parent')})")
        if dropped:
            done.append(f"its {dropped} queued MLflow records are dropped")
        if done:
            warnings.warn(f"an earlier attempt in this folder stopped before its first checkpoint: {' and '.join(done)}",
                          TrackingWarning, stacklevel=3)

    def _start_parent(self, params: dict, run_name: str | None) -> None:
        if self.outbox.experiment_id is None:
            self.outbox.submit({"kind": "experiment", "name": self.experiment,
                                "artifact_location": artifact_root(self.tracking_uri), "tags": EXPERIMENT_TAGS})
        self._create_run("parent", run_name, {"evo_sft.role": "evolution"}, {}, PARENT_DESCRIPTION)
        items = sorted(params.items())
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.outbox.submit({"kind": "log", "key": "parent", "params": dict(items[start:start + PARAMS_PER_BATCH])})

    def _ensure_member(self, lineage, member_id: int, slot: int, hyperparameters: dict, born_at: int | None) -> None:
        """Create the member's run on first sight, with a copy of its parent's points before step
        `born_at` (its first step; the parent's run holds its own ancestors' points); reopen a run
        from a previous tracker."""
        self.member_slots[member_id] = slot
        if member_id in self._live:
            return
        self._live.add(member_id)
        key = member_key(member_id)
        if key in self._known_runs:
            self.outbox.submit({"kind": "update_run", "key": key, "status": "RUNNING"})
            self.outbox.submit({"kind": "log", "key": key, "tags": {"evo_sft.status": "alive"}})
            return
        info = lineage.members[member_id]
        parent = "" if info.parent_id is None else str(info.parent_id)
        tags = {
            **MEMBER_RUN_TAGS, "evo_sft.role": "member", "evo_sft.status": "alive", "evo_sft.member_id": str(member_id),
            "evo_sft.parent_member_id": parent, "evo_sft.generation_born": str(info.generation_born),
            "evo_sft.mutation": info.mutation, "evo_sft.slot": str(slot),
        }
        run_tags = {"mlflow.parentRunId": "parent"}
        if info.parent_id is not None:
            run_tags["evo_sft.parent_run_id"] = member_key(info.parent_id)
        else:
            tags["evo_sft.parent_run_id"] = ""
        self._create_run(key, f"member-{member_id}", tags, run_tags, member_description(info, born_at))
        params = {f"initial.{name}": json.dumps(value) for name, value in hyperparameters.items()}
        self.outbox.submit({"kind": "log", "key": key, "params": params})
        if info.parent_id is not None and born_at is not None:
            self.outbox.submit({"kind": "copy_metrics", "key": key, "source": member_key(info.parent_id),
                                "before_step": born_at})

    def _log_member(self, member_id: int, record, slot: int) -> None:
        train, fitness = record.train[slot], record.fitness[slot]
        if train.optimizer_step is None:  # a member lost with its worker: it reached no step
            return
        hyperparameters = record.hyperparameters[slot]
        values = {"test_loss": record.evaluations[slot].test_loss,
                  self.fitness.metric: self.fitness.shown(fitness), "fitness": fitness,
                  "tokens_per_second": train.tokens_per_second, **self._numbers(hyperparameters)}
        losses = train.step_losses or ((train.optimizer_step, train.train_loss),)
        self._log_points(member_key(member_id), [("train_loss", loss, step) for step, loss in losses]
                         + [(name, value, train.optimizer_step) for name, value in values.items()])
        choices = {f"hp.{name}": value for name, value in hyperparameters.items() if isinstance(value, str)}
        if choices:  # a categorical hyperparameter (the scheduler): its current value, as a tag
            self.outbox.submit({"kind": "log", "key": member_key(member_id), "tags": choices})

    def _log_generation(self, record) -> None:
        finite = [slot for slot, f in enumerate(record.fitness) if math.isfinite(f)]
        values = {"nonfinite_members": len(record.fitness) - len(finite)}
        if finite:
            fitness = [record.fitness[slot] for slot in finite]
            best = elite(record.fitness)
            values.update(best_fitness=max(fitness), mean_fitness=sum(fitness) / len(fitness),
                          worst_fitness=min(fitness))
            values.update({f"best_{name}": v for name, v in self._numbers(record.hyperparameters[best]).items()})
        self._log_metrics("parent", values, record.generation)

    def _log_samples(self, name: str, generation: int, member_id: int, evaluation) -> None:
        """A member's outputs on the first test prompts, beside the references, as `samples/<name>.json`."""
        shown = self.fitness.shown(evaluation.fitness)
        samples = {"generation": generation, "member_id": member_id,
                   self.fitness.metric: shown if math.isfinite(shown) else None, "samples": list(evaluation.samples)}
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.json"
            path.write_text(json.dumps(samples, indent=1, ensure_ascii=False), encoding="utf-8")
            self.outbox.submit({"kind": "artifact", "key": "parent", "local_path": str(path), "artifact_path": "samples"})

    def _retire(self, member_id: int, generation: int) -> None:
        key = member_key(member_id)
        self.outbox.submit({"kind": "log", "key": key,
                            "tags": {"evo_sft.status": "retired", "evo_sft.generation_retired": str(generation)}})
        self.outbox.submit({"kind": "terminate", "key": key, "status": "FINISHED"})
        self._live.discard(member_id)

    def _refresh_artifacts(self, controller, schedule: dict) -> None:
        """lineage.json, and schedule.json with the pictures for the line of `schedule`."""
        line = [entry["member_id"] for entry in schedule["generations"]]
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "lineage.json").write_text(json.dumps(controller.lineage.to_dict(), indent=1))
            (folder / "schedule.json").write_text(json.dumps(schedule, indent=1))
            plot_family_tree(controller.lineage, controller.fitness, self.member_slots, line, folder / "family_tree.png")
            plot_fitness_curves(controller.lineage, controller.fitness, line, self.fitness.metric,
                                folder / "fitness_curves.png")
            plot_schedule(schedule, folder / "schedule.png")
            self.outbox.submit({"kind": "artifact", "key": "parent", "local_path": str(folder), "artifact_path": None})
        self._refreshed_at, self._refreshed_time = controller.generation, time.monotonic()

    def _numbers(self, hyperparameters: dict) -> dict:
        """The numeric hyperparameters the search mutates: the ones worth a chart."""
        return {name: value for name, value in hyperparameters.items() if name in self.searched
                and isinstance(value, (int, float)) and not isinstance(value, bool)}

    def _log_metrics(self, key: str, values: dict, step: int) -> None:
        self._log_points(key, [(name, value, step) for name, value in values.items()])

    def _log_points(self, key: str, points: list) -> None:
        """(name, value, step) points, the finite ones, in records of at most METRICS_PER_BATCH."""
        metrics = [[name, float(v), step] for name, v, step in points if math.isfinite(v)]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.outbox.submit({"kind": "log", "key": key, "metrics": metrics[start:start + METRICS_PER_BATCH]})

    def _create_run(self, key: str, run_name: str | None, tags: dict, run_tags: dict, description: str) -> None:
        """`run_tags` map a tag to the local key of a run whose id is its value once known; the
        outbox fills in the links of `description` once the run is made (see `Outbox`)."""
        self._known_runs.add(key)
        self.outbox.submit({"kind": "create_run", "key": key, "run_name": run_name, "tags": tags, "run_tags": run_tags})
        self.outbox.submit({"kind": "log", "key": key, "tags": {DESCRIPTION_TAG: description}})


def first_step(train) -> int | None:
    """The first optimizer step of a generation's training (None for a member that took none)."""
    return train.step_losses[0][0] if train.step_losses else train.optimizer_step


def member_description(info, born_at: int | None) -> str:
    """A member run's description, linked to the evolution's run and, for a clone, its parent member's."""
    evolution = f"A member of [the evolution]({mlflow_page('', '{experiment}', '{parent}')}). "
    if info.parent_id is None:
        return evolution + f"Member {info.id}, a founder: its charts start at its first optimizer step."
    parent = f"[member {info.parent_id}]({mlflow_page('', '{experiment}', '{member:' + str(info.parent_id) + '}')})"
    return (evolution + f"Member {info.id}: a clone of {parent} (mutation: {info.mutation}) born in generation "
            f"{info.generation_born}. Its points before step {born_at} are its ancestors', copied from member "
            f"{info.parent_id}'s run, so its charts show its whole line.")
