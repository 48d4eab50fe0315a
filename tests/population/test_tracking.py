"""MLflowTracker against real MLflow stores in this process, driven by the tiny evolution of
tests/helpers/tracking.py: an embedded sqlite store, a resumed tracker, records queued before a
crash (an unreachable server) and records the store refuses. No mocks: every check reads MLflow
through MlflowClient. The tracker against a real `mlflow server` that goes down and comes back
is in tests/integration/test_tracking_server.py."""
import json
import math
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evo_sft.controller import GenerationRecord
from evo_sft.fitness import Evaluation
from evo_sft.population.protocol import TrainResult
from evo_sft.tracking.outbox import QUEUE_FILE, TrackingWarning
from evo_sft.tracking.tracker import HTTP_ENVIRONMENT, mlflow_page
from tests.helpers.processes import free_port
from tests.helpers.tracking import (  # noqa: F401 (restore_http_settings: autouse)
    Recorder, assert_artifacts, assert_everything_logged, has_clones, logged_metrics, make_controller, make_tracker,
    parent_and_members, restore_http_settings,
)


def assert_winning_line_logged(client, controller, winner) -> None:
    """The parent's lineage_* metrics are the winner's line, generation by generation, and the
    winner's own run holds that line's fitness at every generation (its ancestors' points copied)."""
    parent, members = parent_and_members(client, "evolution")
    line = controller.lineage.line(winner, controller.generation)
    assert len(set(line)) > 1
    logged = logged_metrics(client, parent.info.run_id, ("lineage_member", "lineage_lr", "lineage_batch_size",
                                                         "lineage_fitness"))
    generations = range(1, controller.generation + 1)
    assert logged["lineage_member"] == [(g, m) for g, m in zip(generations, line)]
    for name in ("lr", "batch_size"):
        assert logged[f"lineage_{name}"] == [(g, controller.lineage.hyperparameters_at(m, g)[name])
                                             for g, m in zip(generations, line)]
    assert [v for _, v in logged["lineage_fitness"]] == controller.fitness[winner]
    winner_fitness = logged_metrics(client, members[winner].info.run_id, ("fitness",))["fitness"]
    assert [v for _, v in winner_fitness] == controller.fitness[winner]
    assert [s for s, _ in winner_fitness] == [3 * g for g in generations]


# ----------------------------------------------------------------------- tests
def test_evolution_is_logged_to_an_embedded_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, recorder = make_tracker(uri, tmp_path), Recorder()
    controller = make_controller(tmp_path, [tracker, recorder])
    controller.run(3)
    winner = max(m for m in controller.slot_ids if controller.lineage.members[m].parent_id is not None)  # a clone's line
    tracker.log_schedule(controller.schedule(winner))
    tracker.close()
    assert has_clones(controller)
    client = MlflowClient(uri)
    assert_everything_logged(client, controller, recorder.records)
    assert_winning_line_logged(client, controller, winner)
    parent, members = parent_and_members(client, "evolution")
    assert parent.info.run_name == "tiny"
    assert parent.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert_artifacts(client, parent.info.run_id, controller, tmp_path)
    state = json.loads(json.dumps(tracker.state_dict()))
    assert state["tracking_uri"] == uri
    assert state["parent_run_id"] == parent.info.run_id
    assert state["member_runs"] == {str(m): run.info.run_id for m, run in members.items()}
    assert not (tmp_path / "queue" / QUEUE_FILE).exists()


@pytest.mark.parametrize("interval_s, drawn", [(0.0, [1, 2, 3]), (None, [1, 1, 1])], ids=["every-generation", "default"])
def test_pictures_are_redrawn_at_most_every_interval_and_at_the_end(tmp_path, interval_s, drawn):
    """Drawing the pictures takes longer than a generation of a small run: by default they are
    redrawn at most every 30 s (this run takes a few), and always at the end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = make_tracker(uri, tmp_path, **({} if interval_s is None else {"artifact_interval_s": interval_s}))
    client, shown = MlflowClient(uri), []

    def generations_in_the_artifacts() -> int:
        path = client.download_artifacts(tracker.state_dict()["parent_run_id"], "schedule.json", str(tmp_path / "seen"))
        return len(json.loads(Path(path).read_text())["generations"])

    controller = make_controller(tmp_path, [tracker, lambda c, record: shown.append(generations_in_the_artifacts())])
    controller.run(3)
    tracker.close()
    assert shown == drawn
    assert generations_in_the_artifacts() == 3


def test_resumed_tracker_continues_the_same_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, recorder = make_tracker(uri, tmp_path), Recorder()
    controller = make_controller(tmp_path, [first, recorder])
    controller.run(2)
    first.close()
    state = json.loads(json.dumps(first.state_dict()))
    second = make_tracker(uri, tmp_path, state=state)
    controller.observers = [second, recorder]
    controller.run(3)
    second.close()
    assert second.state_dict()["parent_run_id"] == state["parent_run_id"]
    assert all(second.state_dict()["member_runs"][m] == run_id for m, run_id in state["member_runs"].items())
    assert_everything_logged(MlflowClient(uri), controller, recorder.records)


def test_member_runs_made_after_the_checkpoint_are_deleted_on_resume(tmp_path):
    """The run dies one generation after its checkpoint, without close(): the clones that opened
    that generation have RUNNING runs the checkpoint's state does not name. Resumed from the
    checkpoint (controller, members and tracker state), the tracker deletes those runs and makes
    one run per member again; every run ends FINISHED. The resumed generation repeats the dead
    one exactly, so the points the dead run left in the runs the state names are duplicates."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, recorder, saved = make_tracker(uri, tmp_path), Recorder(), {}

    def checkpoint(controller, record):
        if record.generation == 2:
            saved.update(tracker=json.loads(json.dumps(first.state_dict())),
                         controller=json.loads(json.dumps(controller.state_dict())))
            controller.population.save(tmp_path / "members").wait()

    controller = make_controller(tmp_path, [first, recorder, checkpoint])
    controller.run(3)
    assert recorder.records[2].decisions and any(d.clone for d in recorder.records[2].decisions)
    client = MlflowClient(uri)
    parent, members = parent_and_members(client, "evolution")
    assert parent.info.run_id == saved["tracker"]["parent_run_id"]
    made_later = [r for r in members.values() if r.info.run_id not in saved["tracker"]["member_runs"].values()]
    assert made_later and {r.info.status for r in made_later} == {"RUNNING"}

    with pytest.warns(TrackingWarning, match=f"deleted {len(made_later)} MLflow member runs"):
        second = make_tracker(uri, tmp_path, state=saved["tracker"])
    controller.load_state_dict(saved["controller"])
    controller.population.load(tmp_path / "members")
    records = recorder.records[:2]
    controller.observers = [second, lambda c, r: records.append(r)]
    controller.run(3)
    second.close()
    assert [r.member_ids for r in records] == [r.member_ids for r in recorder.records]
    assert {client.get_run(r.info.run_id).info.lifecycle_stage for r in made_later} == {"deleted"}
    assert_everything_logged(client, controller, records, repeated=True)


def test_records_queued_before_a_crash_are_sent_by_the_resumed_tracker(tmp_path, monkeypatch):
    """Generation 0 is tracked while no server answers (even the parent run exists only in the
    queue); the process then 'dies' without close(). A tracker resumed from its state and queue
    folder, with a store that answers, sends everything into one parent run."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    with pytest.warns(TrackingWarning, match="unreachable"):
        offline, recorder = make_tracker(f"http://127.0.0.1:{free_port()}", tmp_path), Recorder()
    controller = make_controller(tmp_path, [offline, recorder])
    controller.run(1)
    state = json.loads(json.dumps(offline.state_dict()))
    assert state["parent_run_id"] is None and state["member_runs"] == {}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resumed = make_tracker(uri, tmp_path, state=state)
    controller.observers = [resumed, recorder]
    controller.run(2)
    resumed.close()
    assert_everything_logged(MlflowClient(uri), controller, recorder.records)
    assert not (tmp_path / "queue" / QUEUE_FILE).exists()


def test_a_queue_moved_with_its_folder_is_sent_from_where_it_is(tmp_path, monkeypatch):
    """Records queued while no server answers, artifacts among them, in a folder that is then
    renamed: the resumed tracker sends them from the new place and leaves nothing at the old one."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    before, after = tmp_path / "before", tmp_path / "after"
    with pytest.warns(TrackingWarning, match="unreachable"):
        offline, recorder = make_tracker(f"http://127.0.0.1:{free_port()}", before), Recorder()
    controller = make_controller(tmp_path, [offline, recorder])
    controller.run(1)
    queue = [json.loads(line) for line in (before / "queue" / QUEUE_FILE).read_text().splitlines()]
    assert any(record["kind"] == "artifact" for record in queue)
    state = json.loads(json.dumps(offline.state_dict()))
    before.rename(after)
    uri = f"sqlite:///{after / 'mlflow.db'}"
    resumed = make_tracker(uri, after, state=state)
    controller.observers = [resumed, recorder]
    controller.run(2)
    resumed.close()
    assert not before.exists()
    assert not (after / "queue" / QUEUE_FILE).exists() and not any((after / "queue" / "files").iterdir())
    assert_everything_logged(MlflowClient(uri), controller, recorder.records)
    parent, _ = parent_and_members(MlflowClient(uri), "evolution")
    assert_artifacts(MlflowClient(uri), parent.info.run_id, controller, tmp_path)


def test_a_tracker_started_afresh_deletes_the_runs_of_an_earlier_attempt(tmp_path, monkeypatch):
    """Issue 20, item 3. Attempt 1 makes a parent and member runs and dies before any checkpoint;
    attempt 2 starts afresh while no server answers (its deletions and runs only queued) and dies
    too; attempt 3 deletes attempt 1's runs, drops attempt 2's queue and ends with one parent."""
    from mlflow.entities import ViewType

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = make_tracker(uri, tmp_path)
    make_controller(tmp_path, [first]).run(1)
    client = MlflowClient(uri)
    first_runs = {run.info.run_id: run.info.status
                  for run in client.search_runs([client.get_experiment_by_name("evolution").experiment_id])}
    assert len(first_runs) > 1 and "RUNNING" in first_runs.values()

    with pytest.warns(TrackingWarning, match=rf"earlier attempt .* its {len(first_runs)} MLflow runs are deleted"):
        offline = make_tracker(f"http://127.0.0.1:{free_port()}", tmp_path)
    make_controller(tmp_path, [offline]).run(1)
    assert (tmp_path / "queue" / QUEUE_FILE).exists()

    with pytest.warns(TrackingWarning, match=rf"its {len(first_runs)} MLflow runs are deleted .* and its \d+ queued"):
        third, recorder = make_tracker(uri, tmp_path), Recorder()
    controller = make_controller(tmp_path, [third, recorder])
    controller.run(2)
    third.close()
    assert_everything_logged(client, controller, recorder.records)  # one active parent: the third attempt's
    for run_id, status in first_runs.items():  # a run left RUNNING ends KILLED; a retired member stays FINISHED
        info = client.get_run(run_id).info
        assert (info.lifecycle_stage, info.status) == ("deleted", "KILLED" if status == "RUNNING" else status)
    experiment = client.get_experiment_by_name("evolution").experiment_id
    assert len(client.search_runs([experiment], run_view_type=ViewType.ALL)) == len(first_runs) + \
        len(controller.lineage.members) + 1, "the second attempt's queued runs were made"


def test_nonfinite_fitness_is_not_logged_and_counted(tmp_path):
    """A generation where member 1 diverged, written by hand for a real controller."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    controller = make_controller(tmp_path, [])
    ids, hyperparameters = controller.slot_ids, controller.population.hyperparameters()
    train = [TrainResult(slot, loss, math.isfinite(loss), 30, 3.0, 10.0, 3)
             for slot, loss in enumerate((1.0, math.nan, 3.0))]
    record = GenerationRecord(1, ids, train, [-1.0, -math.inf, -3.0], hyperparameters, elite_slot=0, elite_id=ids[0],
                              evaluations=[Evaluation(-1.0, 1.0), Evaluation(-math.inf, math.nan), Evaluation(-3.0, 3.0)])
    controller.fitness = {member_id: [f] for member_id, f in zip(ids, record.fitness)}
    controller.generation, controller.batches = 1, [[3, 3, 3]]
    tracker = make_tracker(uri, tmp_path)
    tracker(controller, record)
    tracker.close()
    parent, members = parent_and_members(MlflowClient(uri), "evolution")
    assert parent.data.metrics["best_fitness"] == -1.0 and parent.data.metrics["worst_fitness"] == -3.0
    assert parent.data.metrics["mean_fitness"] == -2.0 and parent.data.metrics["nonfinite_members"] == 1
    assert {"fitness", "test_loss", "train_loss"}.isdisjoint(members[ids[1]].data.metrics)
    assert members[ids[1]].data.metrics["lr"] == hyperparameters[1]["lr"]


def test_records_the_store_refuses_are_dropped_not_queued(tmp_path):
    """A state naming a run the store does not have: each record is refused (404) with a warning
    and dropped, so the queue never blocks behind it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    state = {"tracking_uri": uri, "experiment_id": "0", "parent_run_id": "0" * 32, "member_runs": {}}
    with pytest.warns(TrackingWarning, match="refused") as caught:
        tracker = make_tracker(uri, tmp_path, state=state)
        tracker.close()
    assert [str(w.message).split(":")[0] for w in caught if w.category is TrackingWarning] == ["MLflow refused a update_run record for parent",
                                                              "MLflow refused a terminate record for parent"]
    assert not (tmp_path / "queue" / QUEUE_FILE).exists()


def test_http_settings_are_set_only_where_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with pytest.warns(TrackingWarning, match="unreachable"):
        make_tracker(f"http://127.0.0.1:{free_port()}", tmp_path)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_ENVIRONMENT["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_every_mlflow_address_opens_the_model_training_layout():
    """Issue 30, item 8: MLflow 3.17 opens an address without `workflowType` in GenAI's layout."""
    assert mlflow_page("http://mlflow:5000/", "7") == "http://mlflow:5000/#/experiments/7?workflowType=machine_learning"
    assert mlflow_page("http://127.0.0.1:5000/", "1", "abc") == \
        "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    assert mlflow_page("", "1", "abc", "/artifacts") == "#/experiments/1/runs/abc/artifacts?workflowType=machine_learning"


def test_run_descriptions_link_the_evolution_its_artifacts_and_a_clones_parent_in_the_model_training_layout(tmp_path):
    import re

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = make_tracker(uri, tmp_path)
    controller = make_controller(tmp_path, [tracker])
    controller.run(2)
    tracker.close()
    client = MlflowClient(uri)
    parent, members = parent_and_members(client, "evolution")
    experiment = parent.info.experiment_id

    def links(run) -> list[tuple[str, str]]:
        return re.findall(r"\[([^\]]+)\]\(([^)]*)\)", run.data.tags["mlflow.note.content"])

    assert links(parent) == [
        ("artifacts", f"#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts?workflowType=machine_learning"),
        ("runs list", f"#/experiments/{experiment}?workflowType=machine_learning")]
    assert has_clones(controller)
    for member_id, run in members.items():
        expected = [("the evolution", f"#/experiments/{experiment}/runs/{parent.info.run_id}?workflowType=machine_learning")]
        donor = controller.lineage.members[member_id].parent_id
        if donor is not None:
            expected.append((f"member {donor}", f"#/experiments/{experiment}/runs/{members[donor].info.run_id}"
                                                "?workflowType=machine_learning"))
        assert links(run) == expected, member_id
