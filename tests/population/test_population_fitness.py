"""Fitness on what the model says, for populations (issue 23): exact match ranks members
otherwise than the test loss and selection follows it; a member on a shared base generates
exactly what it generates alone; a user function that fails costs its members, not the run; and
a whole run (`run.start`, in this process) logs the test loss beside the fitness, the elite's
samples each generation, and scores its last population on the whole test set at the end."""
import json
import math
import warnings

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from evo_sft import SFTGym, build, run
from evo_sft.config import config_from_dict
from evo_sft.controller import Controller
from evo_sft.data.demo import build_tokenizer
from evo_sft.data.sources import load_splits, load_tokenizer
from evo_sft.evolution import (
    HyperparameterConfig, MemberState, Mutations, RLParameter, TournamentSelection, plan_generation,
)
from evo_sft.fitness import make_fitness
from evo_sft.population.hosting import build_agent
from evo_sft.population.local import LocalPopulation
from evo_sft.population.member import MemberHost
from tests.helpers.bigram import bigram_agent
from tests.helpers.evolution_run import experiment, pieces
from tests.helpers.reference import hf_greedy

MODULE = "tests.helpers.fitness_functions"
# Says "ab" (right), but never sure of anything: a high test loss.
RIGHT_BUT_UNSURE = {"\n": {"a": 4.0}, "a": {"b": 4.0}, "b": {"<|im_end|>": 4.0}, "<|im_end|>": {"\n": 4.0}}
# Nearly even between "a" and "c" for the first token, says "c" (wrong), sure of the rest: a low test loss.
WRONG_BUT_CLOSE = {"\n": {"a": 8.0, "c": 8.2}, "a": {"b": 12.0}, "b": {"<|im_end|>": 12.0}, "<|im_end|>": {"\n": 12.0}}


def bigram_population(transitions: list[dict], fitness: str) -> LocalPopulation:
    """One member per bigram model, every test response "ab"."""
    from datasets import Dataset

    tokenizer = build_tokenizer()
    data = Dataset.from_dict({"prompt": [f"row {i}" for i in range(6)], "response": ["ab"] * 6})
    gym = SFTGym(data, data, tokenizer, data_batch_size_per_gpu=2)
    agents = [bigram_agent(tokenizer, t, index=slot, lr=1e-6, batch_size=2) for slot, t in enumerate(transitions)]
    return LocalPopulation([MemberHost(slot, agent, gym, seed=0, fitness=make_fitness(fitness))
                            for slot, agent in enumerate(agents)])


def outputs(population) -> list[str]:
    host = population.hosts[0]
    return [host.gym.decode(ids[0]) for ids in
            (h.agent.generate(host.gym.test_prompts(1), 4, host.gym.stop_token_ids) for h in population.hosts)]


@pytest.mark.parametrize("fitness, winner", [("test_loss", 1), ("exact_match", 0)])
def test_exact_match_ranks_otherwise_than_the_loss_and_selection_follows_it(fitness, winner):
    """Member 0 says the right answer without conviction; member 1 is surer of every token and
    says the wrong first letter. The loss prefers member 1, exact match member 0; a tournament of
    both then fills the other slot with a clone of the winner, which says what the winner says."""
    population = bigram_population([RIGHT_BUT_UNSURE, WRONG_BUT_CLOSE], fitness)
    assert outputs(population) == ["ab", "c"]
    evaluations = population.evaluate()
    losses = [e.test_loss for e in evaluations]
    assert losses[1] < losses[0]  # as constructed, and whatever the fitness, the loss comes along
    scores = [e.fitness for e in evaluations]
    assert scores == ([-losses[0], -losses[1]] if fitness == "test_loss" else [1.0, 0.0])

    hp_config = HyperparameterConfig(lr=RLParameter(min=1e-7, max=1e-5))
    members = [MemberState(slot, population.hyperparameters()[slot], scores[slot]) for slot in range(2)]
    decisions = plan_generation(members, TournamentSelection(2, True, 2), Mutations(no_mutation=1.0, rl_hp=0.0),
                                hp_config, np.random.default_rng(0))
    loser = 1 - winner
    assert [(d.slot, d.parent_id, d.clone) for d in decisions] == [(winner, winner, False) if d.slot == winner
                                                                   else (loser, winner, True) for d in decisions]
    population.clone([(d.slot, d.parent_id) for d in decisions if d.clone])
    assert outputs(population) == [["ab", "c"][winner]] * 2


def test_a_member_on_a_shared_base_generates_exactly_what_it_generates_alone(tmp_path):
    """Three members on one base model, trained apart: each, made live in any order, generates
    token for token what an agent of its own with the same state generates, and scores the same."""
    config = config_from_dict({**experiment("local", tmp_path / "run", members_per_actor=3),
                               "evolution": {**experiment("local", tmp_path)["evolution"], "fitness": "exact_match",
                                             "fitness_options": {"eval_rows": 6, "max_new_tokens": 8}}})
    model_path, prepared, founders = pieces(config, tmp_path)
    hosts = build.local_hosts(config, model_path, prepared, founders)
    assert len({id(host.agent) for host in hosts}) == 1
    hosts[0].train_group(4)
    gym, recipe = hosts[0].gym, build.member_recipe(config, model_path)
    prompts = gym.test_prompts(len(gym.test))
    alone = {}
    for slot, host in enumerate(hosts):
        agent = build_agent(recipe, gym.tokenizer, slot, founders[slot])
        agent.import_state(*host.export_state())
        alone[slot] = MemberHost(slot, agent, gym, config.seed, build.fitness(config))
    expected = {slot: alone[slot].agent.generate(prompts, 8, gym.stop_token_ids) for slot in alone}
    assert len({str(out) for out in expected.values()}) == 3, "the members say the same: nothing to tell apart"
    for slot in (2, 0, 1, 2, 0):
        assert hosts[slot].agent.generate(prompts, 8, gym.stop_token_ids) == expected[slot]
    for slot in (1, 2, 0):
        shared, own = hosts[slot].evaluate(), alone[slot].evaluate()
        assert shared.samples == own.samples and shared.fitness == own.fitness
        assert shared.test_loss == pytest.approx(own.test_loss, rel=1e-6)


@pytest.mark.parametrize("name", ["raises", "returns_nan", "returns_text"])
def test_a_failing_user_function_costs_its_members_not_the_run(name):
    population = bigram_population([RIGHT_BUT_UNSURE, WRONG_BUT_CLOSE], f"{MODULE}:{name}")
    controller = Controller(population, HyperparameterConfig(lr=RLParameter(min=1e-7, max=1e-5)), 2, seed=0,
                            selection=TournamentSelection(2, True, 2), mutations=Mutations(no_mutation=1.0, rl_hp=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        controller.run(2)
    assert controller.generation == 2
    assert all(controller.fitness[member_id] == [-math.inf] * 2 for member_id in controller.slot_ids)
    named = [str(w.message) for w in caught if f"fitness function {MODULE}:{name}" in str(w.message)]
    assert len(named) == 4 and all(message.endswith("it scores -inf") for message in named)  # 2 members, 2 generations
    assert sum(e["kind"] == "nonfinite" for e in controller.lineage.to_dict()["events"]) == 4


def learnable_rows(path):
    """Prompts 'q0'..'q59', every response 'ab': a task the demo model learns in a few steps."""
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "ab"}) + "\n" for i in range(60)))
    return str(path)


@pytest.mark.parametrize("full_test_at_end", [True, False], ids=["full-test-at-end", "eval-rows-only"])
def test_a_run_logs_the_test_loss_beside_the_fitness_and_the_elites_samples_and_ends_on_the_whole_test_set(
        full_test_at_end, tmp_path, capsys):
    """Scored on 4 of the 12 test rows each generation; with `full_test_at_end`, on all 12 at the
    end. The exported best, scored again here with transformers' generate on those rows, has the
    rate the summary states."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = experiment("local", tmp_path / "run", tracking_uri=uri)
    raw["data"] = {"source": learnable_rows(tmp_path / "rows.jsonl"), "test_size": 12, "max_length": 32}
    raw["agent"]["lr"] = 1e-2
    raw["evolution"]["fitness"] = "exact_match"
    raw["evolution"]["fitness_options"] = {"eval_rows": 4, "full_test_at_end": full_test_at_end, "max_new_tokens": 6,
                                           "samples": 2}
    config = config_from_dict(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run.start(config)
    summary = capsys.readouterr().out

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(result.best_adapter))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base_model"),
                                      result.best_adapter).eval()
    _, test = load_splits(config.data, config.seed)
    said = []
    for prompt in test["prompt"]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)["input_ids"]
        new = hf_greedy(model, ids, 6)
        said.append(tokenizer.decode(new[:new.index(2)] if 2 in new else new))  # 2: <|im_end|>
    rows = 12 if full_test_at_end else 4
    rate = sum(s.strip().lower() == r for s, r in zip(said[:rows], test["response"][:rows])) / rows
    assert result.best_fitness == pytest.approx(rate) and rate > 0
    assert result.scored_rows == rows
    assert f"exact_match {rate:.4f} on {rows} held-out test rows" in summary
    assert result.evaluation.samples[0]["prompt"] == test["prompt"][0]
    assert f"prompt {test['prompt'][0]!r}  reference 'ab'  output {said[0]!r}" in summary

    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("raytest").experiment_id],
                                   "tags.`evo_sft.role` = 'evolution'")
    assert parent.data.metrics.get("final_exact_match") == (pytest.approx(rate) if full_test_at_end else None)
    folder = tmp_path / "artifacts"
    client.download_artifacts(parent.info.run_id, "samples", str(folder))
    files = sorted(p.name for p in (folder / "samples").iterdir())
    assert files == ["final.json"] * full_test_at_end + [f"generation_0000{g}.json" for g in (1, 2, 3)]
    first = json.loads((folder / "samples" / "generation_00001.json").read_text())
    assert set(first) == {"generation", "member_id", "exact_match", "samples"}
    assert [(s["prompt"], s["reference"]) for s in first["samples"]] == [(p, "ab") for p in test["prompt"][:2]]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trained = [child for child in children if "train_loss" in child.data.metrics]
    assert trained and all({"test_loss", "exact_match", "fitness"} <= set(c.data.metrics) for c in trained)
    for child in trained:  # scored on 4 rows during the run
        history = client.get_metric_history(child.info.run_id, "exact_match")
        assert all(round(point.value * 4) == point.value * 4 for point in history)
