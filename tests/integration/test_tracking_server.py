"""MLflowTracker against a real `mlflow server` that is down at the start and stopped mid-run,
driven by the tiny evolution of tests/helpers/tracking.py. No mocks: every check reads MLflow
through MlflowClient."""
import warnings

from mlflow.tracking import MlflowClient

from evo_sft.tracking.outbox import QUEUE_FILE, TrackingWarning
from tests.helpers.mlflow_server import MLflowServer
from tests.helpers.tracking import (  # noqa: F401 (restore_http_settings: autouse)
    Recorder, assert_artifacts, assert_everything_logged, make_controller, make_tracker, parent_and_members,
    restore_http_settings,
)


def test_outage_queues_records_and_loses_nothing(tmp_path, monkeypatch):
    """The server is still starting when the evolution starts and answers from generation 1 or
    2 on; it is stopped after generation 2 and is back only after the run, when close() sends
    the rest. Either way: two outages, two warnings, every record on the server."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # fail fast; retries stay on
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    (tmp_path / "server").mkdir()
    server = MLflowServer(tmp_path / "server")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TrackingWarning)
            tracker, recorder = make_tracker(server.uri, tmp_path), Recorder()
            server.launch()
            switch = {1: server.wait_healthy, 2: server.stop}
            script = lambda controller, record: switch.get(record.generation, lambda: None)()  # noqa: E731
            controller = make_controller(tmp_path, [tracker, recorder, script])
            controller.run(3)
            assert (tmp_path / "queue" / QUEUE_FILE).exists()
            server.start()
            tracker.close()
        messages = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
        assert sum("unreachable" in m for m in messages) == 2, messages
        assert sum("reachable again" in m for m in messages) == 2, messages
        assert not (tmp_path / "queue" / QUEUE_FILE).exists()
        assert not any((tmp_path / "queue" / "files").iterdir())
        client = MlflowClient(server.uri)
        assert_everything_logged(client, controller, recorder.records)
        parent, _ = parent_and_members(client, "evolution")
        assert_artifacts(client, parent.info.run_id, controller, tmp_path)
    finally:
        server.stop()
