"""Every MLflow call of the tracker as a JSON record, sent at once or, while the tracking server
is unreachable, kept in a local queue and sent in order when it is back.

A record has a `kind`, the local `key` of its run ("parent", "member:7"), values and a
`timestamp`. A run's description (the tag `mlflow.note.content`, markdown) names the runs it
links to by their local keys, `{parent}`, `{member:7}`, `{self}`, and the experiment as
`{experiment}`: they are filled in with MLflow's ids when it is sent. A record that fails is
appended to `queue_dir/mlflow_queue.jsonl` (the files of a queued artifact or model registration
are copied under `queue_dir/files/` and named relative to `queue_dir`, so the queue moves with its
folder) with one warning per outage, and so is every later record until `flush()` empties the
queue: an outage costs one failed request per flush. Runs are created when their `create_run`
record is sent, so the MLflow ids of local keys are known only here (`run_ids`); they are also
kept in `queue_dir/mlflow_runs.json` as each run is made, where a tracker that starts afresh after
an earlier one stopped before any checkpoint named its runs finds them (`forget_earlier_attempt`).
The only records dropped are those the store refuses as invalid (HTTP 400, or 404 for a run that
does not exist), which no retry could fix; each costs a warning.
"""
import json
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from evo_sft.tracking.registry import register

QUEUE_FILE = "mlflow_queue.jsonl"
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
RUNS_FILE = "mlflow_runs.json"
DESCRIPTION_TAG = "mlflow.note.content"  # what MLflow's UI shows as a run's description
PLACEHOLDER = re.compile(r"\{(experiment|self|parent|member:\d+)\}")


class TrackingWarning(UserWarning):
    """Tracking trouble that training goes on through."""


def now_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
    """The records for one tracking store, with the queue in `queue_dir`; `run_ids` maps local
    keys to MLflow run ids (given for runs made before, filled as `create_run` records are sent)."""

    def __init__(self, tracking_uri: str, queue_dir: Path, experiment_id: str | None, run_ids: dict[str, str]):
        self.tracking_uri = tracking_uri
        self.queue_dir = Path(queue_dir)
        self.queue_file = self.queue_dir / QUEUE_FILE
        self.runs_file = self.queue_dir / RUNS_FILE
        self.experiment_id, self.run_ids = experiment_id, dict(run_ids)
        self._client = None
        self._in_outage = False
        self.pending = self._read_queue()

    def keys_created(self) -> set[str]:
        """Local keys of the runs that exist or whose creation is queued."""
        return set(self.run_ids) | {r["key"] for r in self.pending if r["kind"] == "create_run"}

    def forget_earlier_attempt(self) -> tuple[dict[str, str], int]:
        """For a tracker that starts afresh in a folder an earlier tracker used: drop that
        tracker's queued records and return the runs it made (local key -> run id) and how many
        records were dropped. The runs file stays until this tracker makes its first run, so a
        start that dies before then finds the earlier runs again."""
        dropped = len(self.pending)
        for record in self.pending:
            self._remove_snapshot(record)
        self.pending = []
        self._write_queue()
        made = json.loads(self.runs_file.read_text(encoding="utf-8")) if self.runs_file.exists() else {}
        return made, dropped

    def submit(self, record: dict) -> None:
        record.setdefault("timestamp", now_ms())
        if not self.pending:
            try:
                self._send(record)
                return
            except Exception as error:  # noqa: BLE001 - training never fails because of tracking
                if _rejected(error):
                    _warn_rejected(record, error)
                    return
                self._start_outage(error)
        self._enqueue(record)

    def flush(self) -> bool:
        """Send the queued records in order; stop at the first failure. True when the queue is empty."""
        sent = 0
        while self.pending:
            record = self.pending[0]
            try:
                self._send(record)
            except Exception as error:  # noqa: BLE001 - any failure keeps the record queued
                if not _rejected(error):
                    self._start_outage(error)
                    self._write_queue()
                    return False
                _warn_rejected(record, error)
            self.pending.pop(0)
            self._remove_snapshot(record)
            sent += 1
            if record["kind"] in ("experiment", "create_run"):
                self._write_queue()  # a crash must not create the same run twice
        if sent:
            self._write_queue()
        if self._in_outage:
            warnings.warn(f"MLflow at {self.tracking_uri} is reachable again; sent {sent} queued records",
                          TrackingWarning, stacklevel=3)
            self._in_outage = False
        return True

    # ----------------------------------------------------------------- the queue
    def _enqueue(self, record: dict) -> None:
        if "local_path" in record:
            record = self._snapshot(record)
            if record is None:
                return
        self.pending.append(record)
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
            warnings.warn(f"could not keep artifact {source} for MLflow: {error}", TrackingWarning, stacklevel=4)
            return None
        return {**record, "local_path": str(target.relative_to(self.queue_dir)), "snapshot": True}

    def _local_path(self, record: dict) -> Path:
        """An artifact's files: a snapshot's path is relative to the queue folder, any other absolute."""
        return self.queue_dir / record["local_path"] if record.get("snapshot") else Path(record["local_path"])

    def _remove_snapshot(self, record: dict) -> None:
        if record.get("snapshot"):
            shutil.rmtree(self._local_path(record).parent, ignore_errors=True)

    def _write_runs(self) -> None:
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        partial = self.runs_file.with_suffix(".tmp")
        partial.write_text(json.dumps(self.run_ids), encoding="utf-8")
        partial.replace(self.runs_file)

    def _read_queue(self) -> list[dict]:
        if not self.queue_file.exists():
            return []
        lines = self.queue_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _write_queue(self) -> None:
        if not self.pending:
            self.queue_file.unlink(missing_ok=True)
            return
        partial = self.queue_file.with_suffix(".tmp")
        partial.write_text("".join(json.dumps(r) + "\n" for r in self.pending), encoding="utf-8")
        partial.replace(self.queue_file)

    def _start_outage(self, error: Exception) -> None:
        if not self._in_outage:
            warnings.warn(f"MLflow at {self.tracking_uri} is unreachable ({first_line(error)}); training goes on, "
                          f"records queue in {self.queue_file} and are sent when it returns",
                          TrackingWarning, stacklevel=5)
            self._in_outage = True

    # ----------------------------------------------------------------- MLflow calls
    def _client_for_send(self) -> MlflowClient:
        """Made on first use; a store that cannot be opened counts as an outage, never as a refusal."""
        if self._client is None:
            try:
                self._client = MlflowClient(self.tracking_uri)
            except Exception as error:  # noqa: BLE001
                raise ConnectionError(f"cannot open the MLflow store: {first_line(error)}") from error
        return self._client

    def _run_id(self, key: str) -> str:
        if key not in self.run_ids:
            raise MlflowException(f"no MLflow run was created for {key}", error_code=RESOURCE_DOES_NOT_EXIST)
        return self.run_ids[key]

    def _send(self, record: dict) -> None:
        client, kind = self._client_for_send(), record["kind"]
        if kind == "experiment":
            self.experiment_id = experiment_id(client, record["name"], record["artifact_location"])
            for name, value in record.get("tags", {}).items():
                client.set_experiment_tag(self.experiment_id, name, value)
        elif kind == "create_run":
            tags = {**record["tags"], **{tag: self.run_ids.get(key, "") for tag, key in record["run_tags"].items()}}
            run = client.create_run(self.experiment_id, start_time=record["timestamp"], tags=tags,
                                    run_name=record["run_name"])
            self.run_ids[record["key"]] = run.info.run_id
            self._write_runs()
        elif kind == "log":
            metrics = [Metric(name, value, record["timestamp"], step) for name, value, step in record.get("metrics", [])]
            params = [Param(name, value) for name, value in record.get("params", {}).items()]
            tags = [RunTag(name, self._filled_in(value, record["key"]) if name == DESCRIPTION_TAG else value)
                    for name, value in record.get("tags", {}).items()]
            client.log_batch(self._run_id(record["key"]), metrics=metrics, params=params, tags=tags, synchronous=True)
        elif kind == "artifact":
            local_path = self._local_path(record)
            log = client.log_artifacts if local_path.is_dir() else client.log_artifact
            log(self._run_id(record["key"]), str(local_path), record["artifact_path"])
        elif kind == "register_model":
            tags = {**record["tags"], **{tag: self.run_ids.get(key, "") for tag, key in record["run_tags"].items()}}
            register(client, self._run_id(record["key"]), record["name"], self._local_path(record),
                     record["artifact_path"], tags, record["description"])
        elif kind == "update_run":
            client.update_run(self._run_id(record["key"]), status=record["status"])
        elif kind == "terminate":
            client.set_terminated(self._run_id(record["key"]), status=record["status"], end_time=record["timestamp"])
        elif kind == "copy_metrics":
            self._copy_metrics(client, self._run_id(record["source"]), self._run_id(record["key"]),
                               record["before_step"])
        elif kind == "delete_lost_member_runs":
            self._delete_lost_member_runs(client)
        elif kind == "delete_runs":
            self._delete_runs(client, record["run_ids"], record["timestamp"])
        else:
            raise ValueError(f"unknown MLflow record kind {kind!r}")

    def _filled_in(self, description: str, key: str) -> str:
        ids = {**self.run_ids, "self": self.run_ids[key], "experiment": self.experiment_id}
        return PLACEHOLDER.sub(lambda match: ids.get(match.group(1), ""), description)

    @staticmethod
    def _copy_metrics(client: MlflowClient, source: str, target: str, before_step: int) -> None:
        """Every point of every metric of run `source` at a step before `before_step`, into run `target`."""
        points = [point for name in client.get_run(source).data.metrics
                  for point in client.get_metric_history(source, name) if point.step < before_step]
        for start in range(0, len(points), METRICS_PER_BATCH):
            client.log_batch(target, metrics=points[start:start + METRICS_PER_BATCH], synchronous=True)

    @staticmethod
    def _delete_runs(client: MlflowClient, run_ids: list[str], end_time: int) -> None:
        """Soft-delete the runs; one still RUNNING (its process was killed) ends KILLED first."""
        for run_id in run_ids:
            info = client.get_run(run_id).info
            if info.lifecycle_stage != "active":
                continue
            if info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED", end_time=end_time)
            client.delete_run(run_id)

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


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
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


def _rejected(error: Exception) -> bool:
    """The store refused the record itself (400 invalid, 404 no such run): retrying cannot help.
    Everything else, 401/403/429 included, may pass later and keeps the record queued."""
    return isinstance(error, MlflowException) and error.get_http_status_code() in (400, 404)


def _warn_rejected(record: dict, error: Exception) -> None:
    warnings.warn(f"MLflow refused a {record['kind']} record for {record.get('key', record.get('name'))}: "
                  f"{first_line(error)}", TrackingWarning, stacklevel=4)


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
