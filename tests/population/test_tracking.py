"""MLflowTracker against real MLflow stores in this process, driven by the tiny evolution of
tests/helpers/tracking.py: an embedded sqlite store, a resumed tracker, records queued before a
crash (an unreachable server) and records the store refuses. No mocks: every check reads MLflow
through MlflowClient. The tracker against a real `mlflow server` that goes down and comes back
is in tests/integration/test_tracking_server.py."""
import json
import math
import os

import pytest
from mlflow.tracking import MlflowClient

from evo_sft.controller import GenerationRecord
from evo_sft.fitness import Evaluation
from evo_sft.population.protocol import TrainResult
from evo_sft.tracking import HTTP_ENVIRONMENT, QUEUE_FILE, TrackingWarning, mlflow_ui_command
from tests.helpers.processes import free_port
from tests.helpers.tracking import (  # noqa: F401 (restore_http_settings: autouse)
    Recorder, assert_artifacts, assert_everything_logged, has_clones, make_controller, make_tracker,
    parent_and_members, restore_http_settings,
)


# ----------------------------------------------------------------------- tests
def test_evolution_is_logged_to_an_embedded_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker, recorder = make_tracker(uri, tmp_path), Recorder()
    controller = make_controller(tmp_path, [tracker, recorder])
    controller.run(3)
    tracker.close()
    assert has_clones(controller)
    client = MlflowClient(uri)
    assert_everything_logged(client, controller, recorder.records)
    parent, members = parent_and_members(client, "evolution")
    assert parent.info.run_name == "tiny"
    assert parent.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert_artifacts(client, parent.info.run_id, controller, tmp_path)
    state = json.loads(json.dumps(tracker.state_dict()))
    assert state["tracking_uri"] == uri
    assert state["parent_run_id"] == parent.info.run_id
    assert state["member_runs"] == {str(m): run.info.run_id for m, run in members.items()}
    assert not (tmp_path / "queue" / QUEUE_FILE).exists()


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
    """The run dies one generation after its checkpoint, without close(): the clones it made
    in that generation have RUNNING runs the checkpoint's state does not name. The resumed
    tracker deletes them and makes one run per member again; every run ends FINISHED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, recorder, states = make_tracker(uri, tmp_path), Recorder(), []
    controller = make_controller(tmp_path, [first, recorder, lambda c, r: states.append(json.loads(json.dumps(first.state_dict())))])
    controller.run(3)
    checkpoint_state = states[1]
    client = MlflowClient(uri)
    parent, members = parent_and_members(client, "evolution")
    assert parent.info.run_id == checkpoint_state["parent_run_id"]
    made_later = [r for r in members.values() if r.info.run_id not in checkpoint_state["member_runs"].values()]
    assert made_later and {r.info.status for r in made_later} == {"RUNNING"}

    with pytest.warns(TrackingWarning, match=f"deleted {len(made_later)} MLflow member runs"):
        second = make_tracker(uri, tmp_path, state=checkpoint_state)
    controller.observers = [second, recorder]
    controller.run(4)
    second.close()
    assert {client.get_run(r.info.run_id).info.lifecycle_stage for r in made_later} == {"deleted"}
    assert_everything_logged(client, controller, recorder.records)


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


def test_nonfinite_fitness_is_not_logged_and_counted(tmp_path):
    """A generation where member 1 diverged, written by hand for a real controller."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    controller = make_controller(tmp_path, [])
    ids, hyperparameters = controller.slot_ids, controller.population.hyperparameters()
    train = [TrainResult(slot, loss, math.isfinite(loss), 30, 3.0, 10.0, 3)
             for slot, loss in enumerate((1.0, math.nan, 3.0))]
    record = GenerationRecord(0, ids, train, [-1.0, -math.inf, -3.0], hyperparameters, elite_slot=0, elite_id=ids[0],
                              next_member_ids=ids, next_hyperparameters=hyperparameters,
                              evaluations=[Evaluation(-1.0, 1.0), Evaluation(-math.inf, math.nan), Evaluation(-3.0, 3.0)])
    controller.fitness = {member_id: [f] for member_id, f in zip(ids, record.fitness)}
    controller.generation = 1
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


def test_mlflow_ui_command():
    assert mlflow_ui_command("sqlite:////runs/a b/mlflow.db") == "mlflow ui --backend-store-uri 'sqlite:////runs/a b/mlflow.db'"
    assert mlflow_ui_command("http://127.0.0.1:5000") == "open http://127.0.0.1:5000"
