"""MLflow tracking of an evolution: one parent run, one child run per member, and a local queue
that keeps every record while the tracking server is unreachable.

What is logged
- Parent run (tag `evo_sft.role=evolution`): the flattened config as params; at step =
  generation `best_fitness`, `mean_fitness`, `worst_fitness`, `nonfinite_members` and the best
  member's hyperparameters as `best_lr`, `best_batch_size`; artifacts `elite/generation_XXXXX/`
  (the elite's PEFT adapter), `lineage.json`, `family_tree.png`, `fitness_curves.png`.
- Member runs (tag `mlflow.parentRunId`; `evo_sft.member_id`, `evo_sft.parent_member_id`,
  `evo_sft.parent_run_id`, `evo_sft.generation_born`, `evo_sft.mutation`, `evo_sft.slot`,
  `evo_sft.status` alive|retired): params `initial.<hyperparameter>`; at step = the member's
  global optimizer step `train_loss`, `test_loss`, `fitness`, `tokens_per_second` and every
  numeric hyperparameter (`lr`, `batch_size`) as metrics, since params are write-once.

Non-finite values are never logged (MLflow stores -inf as -1.8e308, which ruins every plot): a
member whose loss diverged has no `fitness` point at that step, the parent run counts such
members in `nonfinite_members`, and `best/mean/worst_fitness` are over the finite members.

Outages
Every MLflow call is a JSON record (`kind`, the run's local `key`, values, `timestamp`) sent
through `MLflowTracker._submit`. A record that fails is appended to
`queue_dir/mlflow_queue.jsonl` (queued artifacts are copied under `queue_dir/files/`) with one
warning per outage, and so is every later record until the queue is flushed, in order, at the
start of the next generation and in `close()`: an outage costs one failed request per
generation. Runs are referred to by local keys ("parent", "member:7") and created when their
record is sent. The only records dropped are those the store refuses as invalid (HTTP 400, or
404 for a run that does not exist), which no retry could fix; each costs a warning.

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
import shlex
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from evo_sft.config import flatten_config

QUEUE_FILE = "mlflow_queue.jsonl"
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
# Short HTTP retries and timeouts so an outage costs seconds per generation, not minutes
# (MLflow 3's defaults: 7 retries with backoff factor 2, 120 s timeout). MLflow reads them at
# each request; the tracker sets them for the process only where they are not set already.
HTTP_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingWarning(UserWarning):
    """Tracking trouble that training goes on through."""


def mlflow_ui_command(tracking_uri: str) -> str:
    """How to look at the runs: the server's address, or the `mlflow ui` command for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def member_key(member_id: int) -> str:
    return f"member:{member_id}"


def now_ms() -> int:
    return int(time.time() * 1000)


class MLflowTracker:
    """Controller observer: `tracker(controller, record)` after each generation.

    `state` (from `state_dict()`) resumes the same parent and member runs. `queue_dir` holds
    the records waiting for the server; a tracker started on the same folder sends them first.
    Lineage and pictures are refreshed every `artifact_every` generations and at `close()`.
    """

    def __init__(self, tracking_uri: str, experiment: str, config: dict, run_name: str | None = None,
                 state: dict | None = None, *, queue_dir: Path, artifact_every: int = 1):
        for name, value in HTTP_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.artifact_every = artifact_every
        self.queue_dir = Path(queue_dir)
        self.queue_file = self.queue_dir / QUEUE_FILE
        self._client = None
        self._in_outage = False
        self._controller = None
        self._refreshed_at = None
        self._live: set[int] = set()
        state = state or {}
        self.experiment_id = state.get("experiment_id")
        self.run_ids = {member_key(int(m)): run_id for m, run_id in state.get("member_runs", {}).items()}
        if state.get("parent_run_id"):
            self.run_ids["parent"] = state["parent_run_id"]
        self.member_slots = {int(m): slot for m, slot in state.get("member_slots", {}).items()}
        self._pending = self._read_queue()
        self._known_runs = set(self.run_ids) | {r["key"] for r in self._pending if r["kind"] == "create_run"}
        if "parent" in self._known_runs:
            self._submit({"kind": "update_run", "key": "parent", "status": "RUNNING"})
            self._submit({"kind": "delete_lost_member_runs", "key": "parent"})
        else:
            self._start_parent(flatten_config(config), run_name)

    # ----------------------------------------------------------------- public
    def __call__(self, controller, record) -> None:
        self._controller = controller
        self.flush()
        for slot, member_id in enumerate(record.member_ids):
            self._ensure_member(controller.lineage, member_id, slot, record.hyperparameters[slot])
            self._log_member(member_id, record, slot)
        self._log_generation(record)
        for slot, member_id in enumerate(record.next_member_ids):
            self._ensure_member(controller.lineage, member_id, slot, record.next_hyperparameters[slot])
        for member_id in sorted(set(record.member_ids) - set(record.next_member_ids)):
            self._retire(member_id, record.generation)
        if record.elite_adapter is not None:
            self._submit({"kind": "artifact", "key": "parent", "local_path": str(record.elite_adapter),
                          "artifact_path": f"elite/generation_{record.generation:05d}"})
        if (record.generation + 1) % self.artifact_every == 0:
            self._refresh_artifacts(controller)

    def flush(self) -> bool:
        """Send the queued records in order; stop at the first failure. True when the queue is empty."""
        sent = 0
        while self._pending:
            record = self._pending[0]
            try:
                self._send(record)
            except Exception as error:  # noqa: BLE001 - any failure keeps the record queued
                if not _rejected(error):
                    self._start_outage(error)
                    self._write_queue()
                    return False
                _warn_rejected(record, error)
            self._pending.pop(0)
            _remove_snapshot(record)
            sent += 1
            if record["kind"] in ("experiment", "create_run"):
                self._write_queue()  # a crash must not create the same run twice
        if sent:
            self._write_queue()
        if self._in_outage:
            warnings.warn(f"MLflow at {self.tracking_uri} is reachable again; sent {sent} queued records",
                          TrackingWarning, stacklevel=2)
            self._in_outage = False
        return True

    def close(self, status: str = "FINISHED") -> None:
        """Flush, refresh the artifacts, end every open run with `status`."""
        self.flush()
        if self._controller is not None and self._refreshed_at != self._controller.generation:
            self._refresh_artifacts(self._controller)
        for member_id in sorted(self._live):
            self._submit({"kind": "terminate", "key": member_key(member_id), "status": status})
        self._live.clear()
        self._submit({"kind": "terminate", "key": "parent", "status": status})
        if self._pending:
            warnings.warn(f"{len(self._pending)} MLflow records are still queued in {self.queue_file}; a tracker "
                          "resumed on this folder sends them", TrackingWarning, stacklevel=2)

    def state_dict(self) -> dict:
        members = {key.split(":")[1]: run_id for key, run_id in self.run_ids.items() if key != "parent"}
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.run_ids.get("parent"),
            "member_runs": members,
            "member_slots": {str(m): slot for m, slot in self.member_slots.items()},
        }

    # ----------------------------------------------------------------- what is logged
    def _start_parent(self, params: dict, run_name: str | None) -> None:
        if self.experiment_id is None:
            self._submit({"kind": "experiment", "name": self.experiment, "artifact_location": self._artifact_root()})
        self._create_run("parent", run_name, {"evo_sft.role": "evolution"}, {})
        items = sorted(params.items())
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._submit({"kind": "log", "key": "parent", "params": dict(items[start:start + PARAMS_PER_BATCH])})

    def _ensure_member(self, lineage, member_id: int, slot: int, hyperparameters: dict) -> None:
        """Create the member's run on first sight; reopen a run from a previous tracker."""
        self.member_slots[member_id] = slot
        if member_id in self._live:
            return
        self._live.add(member_id)
        key = member_key(member_id)
        if key in self._known_runs:
            self._submit({"kind": "update_run", "key": key, "status": "RUNNING"})
            self._submit({"kind": "log", "key": key, "tags": {"evo_sft.status": "alive"}})
            return
        info = lineage.members[member_id]
        parent = "" if info.parent_id is None else str(info.parent_id)
        tags = {
            "evo_sft.role": "member", "evo_sft.status": "alive", "evo_sft.member_id": str(member_id),
            "evo_sft.parent_member_id": parent, "evo_sft.generation_born": str(info.generation_born),
            "evo_sft.mutation": info.mutation, "evo_sft.slot": str(slot),
        }
        run_tags = {"mlflow.parentRunId": "parent"}
        if info.parent_id is not None:
            run_tags["evo_sft.parent_run_id"] = member_key(info.parent_id)
        else:
            tags["evo_sft.parent_run_id"] = ""
        self._create_run(key, f"member-{member_id}", tags, run_tags)
        params = {f"initial.{name}": json.dumps(value) for name, value in hyperparameters.items()}
        self._submit({"kind": "log", "key": key, "params": params})

    def _log_member(self, member_id: int, record, slot: int) -> None:
        train, fitness = record.train[slot], record.fitness[slot]
        if train["optimizer_step"] is None:  # a member lost with its worker: it reached no step
            return
        values = {"train_loss": train["train_loss"], "test_loss": -fitness, "fitness": fitness,
                  "tokens_per_second": train["tokens_per_second"], **_numbers(record.hyperparameters[slot])}
        self._log_metrics(member_key(member_id), values, train["optimizer_step"])

    def _log_generation(self, record) -> None:
        finite = [slot for slot, f in enumerate(record.fitness) if math.isfinite(f)]
        values = {"nonfinite_members": len(record.fitness) - len(finite)}
        if finite:
            fitness = [record.fitness[slot] for slot in finite]
            best = max(finite, key=lambda slot: record.fitness[slot])
            values.update(best_fitness=max(fitness), mean_fitness=sum(fitness) / len(fitness),
                          worst_fitness=min(fitness))
            values.update({f"best_{name}": v for name, v in _numbers(record.hyperparameters[best]).items()})
        self._log_metrics("parent", values, record.generation)

    def _retire(self, member_id: int, generation: int) -> None:
        key = member_key(member_id)
        self._submit({"kind": "log", "key": key,
                      "tags": {"evo_sft.status": "retired", "evo_sft.generation_retired": str(generation)}})
        self._submit({"kind": "terminate", "key": key, "status": "FINISHED"})
        self._live.discard(member_id)

    def _refresh_artifacts(self, controller) -> None:
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            (folder / "lineage.json").write_text(json.dumps(controller.lineage.to_dict(), indent=1))
            plot_family_tree(controller.lineage, controller.fitness, self.member_slots, folder / "family_tree.png")
            plot_fitness_curves(controller.lineage, controller.fitness, folder / "fitness_curves.png")
            self._submit({"kind": "artifact", "key": "parent", "local_path": str(folder), "artifact_path": None})
        self._refreshed_at = controller.generation

    def _log_metrics(self, key: str, values: dict, step: int) -> None:
        metrics = [[name, float(v), step] for name, v in values.items() if math.isfinite(v)]
        self._submit({"kind": "log", "key": key, "metrics": metrics})

    def _create_run(self, key: str, run_name: str | None, tags: dict, run_tags: dict) -> None:
        """`run_tags` map a tag to the local key of a run whose id is its value once known."""
        self._known_runs.add(key)
        self._submit({"kind": "create_run", "key": key, "run_name": run_name, "tags": tags, "run_tags": run_tags})

    def _artifact_root(self) -> str | None:
        """Artifacts of a local sqlite store go next to the database, not into the working directory."""
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        database = Path(self.tracking_uri[len("sqlite:///"):])
        return (database.parent / "mlartifacts").absolute().as_uri()

    # ----------------------------------------------------------------- the queue
    def _submit(self, record: dict) -> None:
        record.setdefault("timestamp", now_ms())
        if not self._pending:
            try:
                self._send(record)
                return
            except Exception as error:  # noqa: BLE001 - training never fails because of tracking
                if _rejected(error):
                    _warn_rejected(record, error)
                    return
                self._start_outage(error)
        self._enqueue(record)

    def _enqueue(self, record: dict) -> None:
        if record["kind"] == "artifact":
            record = self._snapshot(record)
            if record is None:
                return
        self._pending.append(record)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        with self.queue_file.open("a", encoding="utf-8") as queue:
            queue.write(json.dumps(record) + "\n")

    def _snapshot(self, record: dict) -> dict | None:
        """A queued artifact is copied into the queue folder, so later changes to it do not matter."""
        source = Path(record["local_path"])
        target = self.queue_dir / "files" / uuid.uuid4().hex / source.name
        try:
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                target.parent.mkdir(parents=True)
                shutil.copy2(source, target)
        except OSError as error:
            warnings.warn(f"could not keep artifact {source} for MLflow: {error}", TrackingWarning, stacklevel=3)
            return None
        return {**record, "local_path": str(target), "snapshot": True}

    def _read_queue(self) -> list[dict]:
        if not self.queue_file.exists():
            return []
        lines = self.queue_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _write_queue(self) -> None:
        if not self._pending:
            self.queue_file.unlink(missing_ok=True)
            return
        partial = self.queue_file.with_suffix(".tmp")
        partial.write_text("".join(json.dumps(r) + "\n" for r in self._pending), encoding="utf-8")
        partial.replace(self.queue_file)

    def _start_outage(self, error: Exception) -> None:
        if not self._in_outage:
            warnings.warn(f"MLflow at {self.tracking_uri} is unreachable ({_first_line(error)}); training goes on, "
                          f"records queue in {self.queue_file} and are sent when it returns",
                          TrackingWarning, stacklevel=4)
            self._in_outage = True

    # ----------------------------------------------------------------- MLflow calls
    def _client_for_send(self) -> MlflowClient:
        """Made on first use; a store that cannot be opened counts as an outage, never as a refusal."""
        if self._client is None:
            try:
                self._client = MlflowClient(self.tracking_uri)
            except Exception as error:  # noqa: BLE001
                raise ConnectionError(f"cannot open the MLflow store: {_first_line(error)}") from error
        return self._client

    def _run_id(self, key: str) -> str:
        if key not in self.run_ids:
            raise MlflowException(f"no MLflow run was created for {key}", error_code=RESOURCE_DOES_NOT_EXIST)
        return self.run_ids[key]

    def _send(self, record: dict) -> None:
        client, kind = self._client_for_send(), record["kind"]
        if kind == "experiment":
            self.experiment_id = _experiment_id(client, record["name"], record["artifact_location"])
        elif kind == "create_run":
            tags = {**record["tags"], **{tag: self.run_ids.get(key, "") for tag, key in record["run_tags"].items()}}
            run = client.create_run(self.experiment_id, start_time=record["timestamp"], tags=tags,
                                    run_name=record["run_name"])
            self.run_ids[record["key"]] = run.info.run_id
        elif kind == "log":
            metrics = [Metric(name, value, record["timestamp"], step) for name, value, step in record.get("metrics", [])]
            params = [Param(name, value) for name, value in record.get("params", {}).items()]
            tags = [RunTag(name, value) for name, value in record.get("tags", {}).items()]
            client.log_batch(self._run_id(record["key"]), metrics=metrics, params=params, tags=tags, synchronous=True)
        elif kind == "artifact":
            log = client.log_artifacts if Path(record["local_path"]).is_dir() else client.log_artifact
            log(self._run_id(record["key"]), record["local_path"], record["artifact_path"])
        elif kind == "update_run":
            client.update_run(self._run_id(record["key"]), status=record["status"])
        elif kind == "terminate":
            client.set_terminated(self._run_id(record["key"]), status=record["status"], end_time=record["timestamp"])
        elif kind == "delete_lost_member_runs":
            self._delete_lost_member_runs(client)
        else:
            raise ValueError(f"unknown MLflow record kind {kind!r}")

    def _delete_lost_member_runs(self, client: MlflowClient) -> None:
        known = set(self.run_ids.values())
        lost = [run for run in _child_runs(client, self.experiment_id, self._run_id("parent"))
                if run.info.run_id not in known]
        for run in lost:
            client.delete_run(run.info.run_id)
        if lost:
            names = ", ".join(sorted(run.info.run_name for run in lost))
            warnings.warn(f"deleted {len(lost)} MLflow member runs made after the checkpoint this run resumes from "
                          f"({names}); the resumed run makes them again", TrackingWarning, stacklevel=2)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    page = client.search_runs([experiment_id], query, max_results=1000)
    runs = list(page)
    while page.token:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=page.token)
        runs += page
    return runs


def _numbers(hyperparameters: dict) -> dict:
    return {name: value for name, value in hyperparameters.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _rejected(error: Exception) -> bool:
    """The store refused the record itself (400 invalid, 404 no such run): retrying cannot help.
    Everything else, 401/403/429 included, may pass later and keeps the record queued."""
    return isinstance(error, MlflowException) and error.get_http_status_code() in (400, 404)


def _warn_rejected(record: dict, error: Exception) -> None:
    warnings.warn(f"MLflow refused a {record['kind']} record for {record.get('key', record.get('name'))}: "
                  f"{_first_line(error)}", TrackingWarning, stacklevel=4)


def _remove_snapshot(record: dict) -> None:
    if record.get("snapshot"):
        shutil.rmtree(Path(record["local_path"]).parent, ignore_errors=True)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# --------------------------------------------------------------------- pictures
def plot_family_tree(lineage, fitness: dict, member_slots: dict, path: Path) -> None:
    """x = generation, y = slot: a member's life is a horizontal line labelled with its id at
    its start; a thin line joins a parent to each clone it had."""
    generations = max((len(h) for h in fitness.values()), default=1)
    slots = max(member_slots.values(), default=0) + 1
    figure = Figure(figsize=(min(40, 2 + 0.5 * generations), min(40, 1.5 + 0.5 * slots)))
    axes = figure.subplots()
    for member in lineage.members.values():
        slot = member_slots.get(member.id)
        if slot is None:
            continue
        start = 0 if member.parent_id is None else member.generation_born + 1
        end = max(start, len(fitness.get(member.id, [])) - 1)
        axes.plot([start, end], [slot, slot], "o-", color=f"C{slot % 10}", markersize=4)
        axes.annotate(str(member.id), (start, slot), textcoords="offset points", xytext=(0, 6), ha="center")
        parent_slot = member_slots.get(member.parent_id)
        if parent_slot is not None:
            axes.plot([member.generation_born, start], [parent_slot, slot], "-", color="gray", linewidth=0.8)
    axes.set(xlabel="generation", ylabel="slot")
    axes.set_title("family tree (labels: member ids)", pad=12)
    axes.set_yticks(range(slots))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.margins(0.1, 0.15)
    axes.invert_yaxis()
    figure.savefig(path, dpi=100, bbox_inches="tight")


def plot_fitness_curves(lineage, fitness: dict, path: Path) -> None:
    """Fitness per member over generations; each curve ends with the member's id. A clone's
    history starts as a copy of its parent's, so its curve starts at the parent's point of the
    generation it was born in."""
    figure = Figure(figsize=(8, 5))
    axes = figure.subplots()
    for member in lineage.members.values():
        history = fitness.get(member.id, [])
        generations = range(0 if member.parent_id is None else member.generation_born, len(history))
        if not generations:
            continue
        values = [history[g] if math.isfinite(history[g]) else math.nan for g in generations]
        axes.plot(list(generations), values, "o-", markersize=3)
        if math.isfinite(values[-1]):
            axes.annotate(str(member.id), (generations[-1], values[-1]), textcoords="offset points",
                          xytext=(4, 0))
    axes.set(xlabel="generation", ylabel="fitness (-test loss)", title="fitness per member")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.savefig(path, dpi=100, bbox_inches="tight")
