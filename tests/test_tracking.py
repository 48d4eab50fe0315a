"""MLflowTracker against real MLflow stores, driven by a real (tiny) evolution: an embedded
sqlite store, a resumed tracker, records queued before a crash, and an `mlflow server` that
is down at the start and stopped mid-run. No mocks: every check reads MLflow through MlflowClient."""
import copy
import json
import math
import os
import warnings

import pytest
from mlflow.tracking import MlflowClient
from peft import LoraConfig

from evo_sft import SFT, HyperparameterConfig, Mutations, RLParameter, SFTGym, TournamentSelection
from evo_sft.config import flatten_config
from evo_sft.controller import Controller, GenerationRecord
from evo_sft.data.demo import build_model, build_tokenizer, demo_dataset
from evo_sft.population.local import LocalPopulation
from evo_sft.population.member import MemberHost
from evo_sft.population.protocol import TrainResult
from evo_sft.tracking import HTTP_ENVIRONMENT, QUEUE_FILE, MLflowTracker, TrackingWarning, mlflow_ui_command
from mlflow_server import MLflowServer, free_port

CONFIG = {"name": "tracking-test", "seed": 1, "agent": {"lr": 1e-3, "batch_size": 8}, "lora": {"r": 4}}
HYPERPARAMETER_NAMES = ("lr", "batch_size", "max_grad_norm", "weight_decay")
MEMBER_METRICS = ("train_loss", "test_loss", "fitness", "tokens_per_second", *HYPERPARAMETER_NAMES)
GENERATION_METRICS = ("best_fitness", "mean_fitness", "worst_fitness", "nonfinite_members",
                      *(f"best_{name}" for name in HYPERPARAMETER_NAMES))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _restore_http_settings(monkeypatch):
    """The tracker sets MLflow's HTTP settings for the process; undo that after each test."""
    for name in HTTP_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------- a tiny evolution
def make_population() -> LocalPopulation:
    tokenizer = build_tokenizer()
    split = demo_dataset(150, seed=0).train_test_split(test_size=0.1, seed=0)
    gym = SFTGym(split["train"], split["test"], tokenizer, data_batch_size_per_gpu=8, max_length=48)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    agents = [SFT(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=build_model(len(tokenizer), hidden_size=32),
                  lora_config=copy.deepcopy(lora), lr=lr, batch_size=8, hp_config=hp_config(), index=slot,
                  gradient_checkpointing=False)
              for slot, lr in enumerate([1e-4, 1e-3, 1e-2])]
    return LocalPopulation([MemberHost(slot, agent, gym, seed=0) for slot, agent in enumerate(agents)])


def hp_config() -> HyperparameterConfig:
    return HyperparameterConfig(lr=RLParameter(min=1e-5, max=1e-1), batch_size=RLParameter(min=4, max=16, dtype=int))


def make_controller(tmp_path, observers) -> Controller:
    return Controller(make_population(), hp_config(), steps_per_generation=3, seed=1,
                      selection=TournamentSelection(2, True, 3), mutations=Mutations(no_mutation=0.3, rl_hp=0.7),
                      observers=observers,
                      save_elite=lambda c, slot: c.population.export_adapter(slot, tmp_path / "elite" / f"g{c.generation}"))


def make_tracker(uri, tmp_path, **kwargs) -> MLflowTracker:
    return MLflowTracker(uri, "evolution", CONFIG, run_name="tiny", queue_dir=tmp_path / "queue", **kwargs)


class Recorder:
    """An observer that keeps every GenerationRecord: what the tracker was given."""

    def __init__(self):
        self.records = []

    def __call__(self, controller, record):
        self.records.append(record)


# ----------------------------------------------------------------------- what should be in MLflow
def expected_member_metrics(records) -> dict:
    """{member id: {metric: [(step, value), ...]}} computed from the records."""
    expected = {}
    for record in records:
        for slot, member_id in enumerate(record.member_ids):
            train, fitness = record.train[slot], record.fitness[slot]
            values = {"train_loss": train.train_loss, "test_loss": -fitness, "fitness": fitness,
                      "tokens_per_second": train.tokens_per_second, **record.hyperparameters[slot]}
            for name, value in values.items():
                expected.setdefault(member_id, {}).setdefault(name, []).append((train.optimizer_step, value))
    return expected


def expected_generation_metrics(records) -> dict:
    expected = {name: [] for name in GENERATION_METRICS}
    for record in records:
        best = max(range(len(record.fitness)), key=lambda slot: record.fitness[slot])
        values = {"best_fitness": max(record.fitness), "worst_fitness": min(record.fitness),
                  "mean_fitness": sum(record.fitness) / len(record.fitness), "nonfinite_members": 0,
                  **{f"best_{name}": record.hyperparameters[best][name] for name in HYPERPARAMETER_NAMES}}
        for name, value in values.items():
            expected[name].append((record.generation, value))
    return expected


def logged_metrics(client, run_id, names) -> dict:
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in names}


def assert_metrics_equal(logged: dict, expected: dict) -> None:
    assert logged.keys() == expected.keys()
    for name, points in expected.items():
        assert [step for step, _ in logged[name]] == [step for step, _ in points], name
        assert [value for _, value in logged[name]] == pytest.approx([value for _, value in points], rel=1e-12), name


def parent_and_members(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`evo_sft.role` = 'evolution'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    members = {int(run.data.tags["evo_sft.member_id"]): run for run in children}
    assert len(members) == len(children), "a member has two MLflow runs"
    return parent, members


def assert_everything_logged(client, controller, records) -> None:
    """One finished parent run with every generation's metrics; one child per member with
    its tags, parent links and every metric step."""
    parent, members = parent_and_members(client, "evolution")
    assert parent.info.status == "FINISHED"
    assert parent.data.params == flatten_config(CONFIG)
    assert_metrics_equal(logged_metrics(client, parent.info.run_id, GENERATION_METRICS),
                         expected_generation_metrics(records))
    assert members.keys() == controller.lineage.members.keys()
    expected = expected_member_metrics(records)
    for member_id, run in members.items():
        info, tags = controller.lineage.members[member_id], run.data.tags
        assert run.info.run_name == f"member-{member_id}"
        assert tags["evo_sft.generation_born"] == str(info.generation_born)
        assert tags["evo_sft.mutation"] == info.mutation
        if info.parent_id is None:
            assert tags["evo_sft.parent_member_id"] == "" and tags["evo_sft.parent_run_id"] == ""
        else:
            assert tags["evo_sft.parent_member_id"] == str(info.parent_id)
            assert tags["evo_sft.parent_run_id"] == members[info.parent_id].info.run_id
        alive = member_id in controller.slot_ids
        assert tags["evo_sft.status"] == ("alive" if alive else "retired")
        assert run.info.status == "FINISHED"
        if member_id in expected:
            assert_metrics_equal(logged_metrics(client, run.info.run_id, MEMBER_METRICS), expected[member_id])
        else:  # born in the last generation: not trained yet
            assert not run.data.metrics


def assert_artifacts(client, run_id, controller, tmp_path) -> None:
    folder = tmp_path / "downloaded"
    client.download_artifacts(run_id, "", str(folder))
    assert json.loads((folder / "lineage.json").read_text()) == controller.lineage.to_dict()
    for picture in ("family_tree.png", "fitness_curves.png"):
        data = (folder / picture).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), picture
    for generation in range(controller.generation):
        elite = folder / "elite" / f"generation_{generation:05d}"
        assert (elite / "adapter_model.safetensors").stat().st_size > 0
        assert json.loads((elite / "adapter_config.json").read_text())["r"] == 4


def has_clones(controller) -> bool:
    return any(m.parent_id is not None for m in controller.lineage.members.values())


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
                              next_member_ids=ids, next_hyperparameters=hyperparameters)
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


def test_outage_queues_records_and_loses_nothing(tmp_path, monkeypatch):
    """The server is still starting when the evolution starts and answers from generation 0 or
    1 on; it is stopped after generation 1 and is back only after the run, when close() sends
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
            switch = {0: server.wait_healthy, 1: server.stop}
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
