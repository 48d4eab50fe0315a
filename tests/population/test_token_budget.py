"""A token budget for the evolution: batch-size mutation changes the tokens of a step, so members
are capped by supervised tokens (their share of what is left), measured, and the run ends when the
budget is spent; members stepped together stop exactly where members on their own do."""
import math
import warnings

from evo_sft import build
from evo_sft.config import config_from_dict
from evo_sft.population.local import LocalPopulation
from tests.helpers.evolution_run import assert_same_run, experiment, make_controller, pieces

BUDGET = 700


def run_with_budget(tmp_path, members_per_actor: int):
    d = experiment("local", tmp_path / f"run{members_per_actor}", members_per_actor=members_per_actor,
                   step_together=True)
    d["evolution"].update(token_budget=BUDGET, generations=50, hyperparameters={"batch_size": {"min": 4, "max": 8}})
    config = config_from_dict(d)
    model_path, prepared, founders = pieces(config, tmp_path)
    population = LocalPopulation(build.local_hosts(config, model_path, prepared, founders))
    controller = make_controller(config, population)
    trained = []
    controller.observers.append(lambda c, record: trained.append([result.tokens for result in record.train]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.run(config.evolution.generations)
    return controller, trained, prepared


def test_the_budget_ends_the_run_within_one_batch_per_member_and_tokens_are_measured(tmp_path):
    alone, trained, prepared = run_with_budget(tmp_path, members_per_actor=1)
    together, together_trained, _ = run_with_budget(tmp_path, members_per_actor=3)
    train = prepared["train"]
    largest_batch = 8 * max(len(ids) - p for ids, p in zip(train["input_ids"], train["prompt_lengths"]))
    assert 1 < alone.generation < 50  # the budget, not the generations, ended it
    assert BUDGET <= alone.tokens_trained <= BUDGET + alone.population.size * largest_batch
    assert alone.tokens == [sum(sum(g) for g in trained[:i + 1]) for i in range(len(trained))]  # measured, summed
    full = [sum(g) for g in trained[:-1]]
    assert sum(trained[-1]) < min(full)  # the last generation was cut short by the budget
    assert any(e["mutation"] == "batch_size" for e in alone.lineage.events if e["kind"] in ("clone", "mutate"))
    assert together_trained == trained  # stepped together, each member stops where it stops alone
    assert_same_run(together.state_dict(), alone.state_dict(), rel=1e-5)


def test_with_token_intervals_every_member_trains_the_same_tokens_whatever_its_batch_size(tmp_path):
    """evolution.interval: tokens. A generation gives each member the supervised tokens of
    steps_per_generation steps of agent.batch_size rows (at the training rows' mean): a member at
    batch 4 takes about twice the steps of one at batch 8, and both stop within one batch of it."""
    d = experiment("local", tmp_path / "run")
    d["evolution"].update(interval="tokens", founders="spread", generations=2,
                          hyperparameters={"batch_size": {"min": 4, "max": 8}})
    config = config_from_dict(d)
    model_path, prepared, founders = pieces(config, tmp_path)
    assert sorted({f["batch_size"] for f in founders}) == [4, 8]  # spread founders differ in batch size
    population = LocalPopulation(build.local_hosts(config, model_path, prepared, founders))
    controller = make_controller(config, population)
    records = []
    controller.observers.append(lambda c, record: records.append(record))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.run(2)
    train = prepared["train"]
    per_row = sum(len(ids) - p for ids, p in zip(train["input_ids"], train["prompt_lengths"])) / len(train["input_ids"])
    share = controller.generation_tokens
    assert share == math.ceil(6 * 4 * per_row)  # 6 steps of agent.batch_size 4, by hand
    longest = max(len(ids) - p for ids, p in zip(train["input_ids"], train["prompt_lengths"]))
    for record in records:
        for result, hyperparameters in zip(record.train, record.hyperparameters):
            assert share <= result.tokens < share + hyperparameters["batch_size"] * longest
    first = {hp["batch_size"]: len(result.step_losses) for hp, result in zip(records[0].hyperparameters, records[0].train)}
    assert 1.6 < first[4] / first[8] < 2.5  # half the batch, about twice the steps
    assert controller.batches == [[len(r.step_losses) for r in record.train] for record in records]
    assert controller.schedule(controller.slot_ids[0])["generations"][0]["batches"] == controller.batches[0][0]
