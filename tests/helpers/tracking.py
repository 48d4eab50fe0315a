"""What the MLflow tracking tests share: a tiny real evolution in this process (three members, each
on a tiny model of its own, three steps a generation), a tracker on a given store, and what MLflow
must hold afterwards, read back through MlflowClient."""
import copy
import json

import pytest
from peft import LoraConfig

from evo_sft import SFT, HyperparameterConfig, Mutations, RLParameter, SFTGym, TournamentSelection
from evo_sft.config import flatten_config
from evo_sft.controller import Controller
from evo_sft.data.demo import build_model, build_tokenizer, demo_dataset
from evo_sft.tracking.tracker import HTTP_ENVIRONMENT, MLflowTracker
from tests.helpers.evolution_run import controller_over

CONFIG = {"name": "tracking-test", "seed": 1, "agent": {"lr": 1e-3, "batch_size": 8}, "lora": {"r": 4}}
# the hyperparameters the search mutates (hp_config below), logged as metrics; the others never
# change, so they are only params (`initial.<name>`), and the categorical one (scheduler) is a tag
SEARCHED = ("lr", "batch_size")
MEMBER_METRICS = ("train_loss", "test_loss", "fitness", "tokens_per_second", *SEARCHED)
GENERATION_METRICS = ("best_fitness", "mean_fitness", "worst_fitness", "nonfinite_members",
                      *(f"best_{name}" for name in SEARCHED))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_http_settings(monkeypatch):
    """The tracker sets MLflow's HTTP settings for the process; undo that after each test."""
    for name in HTTP_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------- a tiny evolution
def make_agents_and_gym() -> tuple[list[SFT], SFTGym]:
    tokenizer = build_tokenizer()
    split = demo_dataset(150, seed=0).train_test_split(test_size=0.1, seed=0)
    gym = SFTGym(split["train"], split["test"], tokenizer, data_batch_size_per_gpu=8, max_length=48)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    agents = [SFT(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=build_model(len(tokenizer), hidden_size=32),
                  lora_config=copy.deepcopy(lora), lr=lr, batch_size=8, hp_config=hp_config(), index=slot,
                  gradient_checkpointing=False)
              for slot, lr in enumerate([1e-4, 1e-3, 1e-2])]
    return agents, gym


def hp_config() -> HyperparameterConfig:
    return HyperparameterConfig(lr=RLParameter(min=1e-5, max=1e-1), batch_size=RLParameter(min=4, max=16, dtype=int))


def make_controller(tmp_path, observers) -> Controller:
    """Three members (lr 1e-4, 1e-3, 1e-2) of 3 steps a generation; each generation's elite saved under
    tmp_path/elite. Data streams from seed 0, evolution decisions from seed 1."""
    agents, gym = make_agents_and_gym()
    return controller_over(agents, gym, 3, TournamentSelection(2, True, 3), Mutations(no_mutation=0.3, rl_hp=0.7),
                           observers=observers, seed=1, member_seed=0,
                           save_elite=lambda c, slot: c.population.export_adapter(slot, tmp_path / "elite" / f"g{c.generation}"))


def make_tracker(uri, tmp_path, **kwargs) -> MLflowTracker:
    return MLflowTracker(uri, "evolution", CONFIG, run_name="tiny", searched=list(SEARCHED), queue_dir=tmp_path / "queue",
                         **kwargs)


class Recorder:
    """An observer that keeps every GenerationRecord: what the tracker was given."""

    def __init__(self):
        self.records = []

    def __call__(self, controller, record):
        self.records.append(record)


# ----------------------------------------------------------------------- what should be in MLflow
def expected_member_metrics(records, lineage) -> dict:
    """{member id: {metric: [(step, value), ...]}} computed from the records: `train_loss` at every
    optimizer step, the others at the end of each generation; a clone's run begins with its
    parent's points before its first step."""
    own, born_at = {}, {}
    for record in records:
        for slot, member_id in enumerate(record.member_ids):
            train, fitness = record.train[slot], record.fitness[slot]
            born_at.setdefault(member_id, train.step_losses[0][0])
            points = own.setdefault(member_id, {})
            points.setdefault("train_loss", []).extend(train.step_losses)
            values = {"test_loss": record.evaluations[slot].test_loss, "fitness": fitness,
                      "tokens_per_second": train.tokens_per_second,
                      **{name: record.hyperparameters[slot][name] for name in SEARCHED}}
            for name, value in values.items():
                points.setdefault(name, []).append((train.optimizer_step, value))
    expected = {}
    for member_id in sorted(own):  # parents before their clones
        parent = lineage.members[member_id].parent_id
        copied = {} if parent is None else {name: [p for p in points if p[0] < born_at[member_id]]
                                            for name, points in expected[parent].items()}
        expected[member_id] = {name: sorted(copied.get(name, []) + own[member_id].get(name, []))
                               for name in MEMBER_METRICS}
    return expected


def expected_generation_metrics(records) -> dict:
    expected = {name: [] for name in GENERATION_METRICS}
    for record in records:
        best = max(range(len(record.fitness)), key=lambda slot: record.fitness[slot])
        values = {"best_fitness": max(record.fitness), "worst_fitness": min(record.fitness),
                  "mean_fitness": sum(record.fitness) / len(record.fitness), "nonfinite_members": 0,
                  **{f"best_{name}": record.hyperparameters[best][name] for name in SEARCHED}}
        for name, value in values.items():
            expected[name].append((record.generation, value))
    return expected


def logged_metrics(client, run_id, names, repeated: bool = False) -> dict:
    """{metric: [(step, value), ...]}; with `repeated` (a resumed run logged some steps again),
    the last point logged at each step."""
    logged = {}
    for name in names:
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
        if repeated:
            history = list({m.step: m for m in history}.values())
        logged[name] = sorted((m.step, m.value) for m in history)
    return logged


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


def assert_everything_logged(client, controller, records, repeated: bool = False) -> None:
    """One finished parent run with every generation's metrics; one child per member with
    its tags, parent links and every metric step (`repeated`: points may have been logged twice)."""
    parent, members = parent_and_members(client, "evolution")
    assert parent.info.status == "FINISHED"
    assert client.get_experiment_by_name("evolution").tags["mlflow.experimentKind"] == "custom_model_development"
    assert "its members are its child runs" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params == flatten_config(CONFIG)
    assert_metrics_equal(logged_metrics(client, parent.info.run_id, GENERATION_METRICS, repeated),
                         expected_generation_metrics(records))
    assert set(parent.data.metrics) <= {*GENERATION_METRICS, "lineage_member", "lineage_fitness",
                                        *(f"lineage_{name}" for name in SEARCHED)}, "a flat line charted"
    assert members.keys() == controller.lineage.members.keys()
    expected = expected_member_metrics(records, controller.lineage)
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
        # every member in the records trained and was scored: no run is empty
        assert_metrics_equal(logged_metrics(client, run.info.run_id, MEMBER_METRICS, repeated), expected[member_id])
        assert set(run.data.metrics) == set(MEMBER_METRICS), "only what the search mutates is charted"
        assert {"initial.lora_r", "initial.lora_alpha", "initial.max_grad_norm"} <= set(run.data.params)
        assert tags["mlflow.runType"] == "evaluation"  # MLflow's runs list opens its parent's row
        assert tags["hp.scheduler"] == "constant"


def assert_artifacts(client, run_id, controller, tmp_path) -> None:
    folder = tmp_path / "downloaded"
    client.download_artifacts(run_id, "", str(folder))
    assert json.loads((folder / "lineage.json").read_text()) == controller.lineage.to_dict()
    schedule = json.loads((folder / "schedule.json").read_text())
    assert [entry["generation"] for entry in schedule["generations"]] == list(range(1, controller.generation + 1))
    assert schedule["member_id"] in controller.lineage.members
    for picture in ("family_tree.png", "fitness_curves.png", "schedule.png"):
        data = (folder / picture).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), picture
    for generation in range(1, controller.generation + 1):
        elite = folder / "elite" / f"generation_{generation:05d}"
        assert (elite / "adapter_model.safetensors").stat().st_size > 0
        assert json.loads((elite / "adapter_config.json").read_text())["r"] == 4


def has_clones(controller) -> bool:
    return any(m.parent_id is not None for m in controller.lineage.members.values())


