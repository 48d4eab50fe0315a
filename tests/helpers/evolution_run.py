"""A tiny evolution run shared by the population tests: its config, its pieces, the controller
as `run.start` builds it, and what two runs must agree on; and the controller as
`finetune_llm_sft` builds it over agents made by hand."""
import json
import warnings
from pathlib import Path

import pytest

from evo_sft import build
from evo_sft.data.sources import load_tokenizer
from evo_sft.io.checkpoint import EvolutionCheckpointer, checkpoint_dirs
from evo_sft.config import config_from_dict
from evo_sft.controller import Controller
from evo_sft.evolution import HyperparameterConfig
from evo_sft.population.local import LocalPopulation
from evo_sft.population.member import MemberHost

GENERATIONS = 3


def experiment(backend: str, run_dir: Path, tracking_uri: str | None = None, members_per_actor: int = 1,
               step_together: bool = False) -> dict:
    """A tiny experiment: 3 members of the demo model, 3 generations of 6 steps. LoRA dropout is
    on, so runs agree only if every member draws from its own random generator. With
    `step_together`, members on one base model can share each forward and backward: no dropout,
    no adapter on the output head, packed batches."""
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    agent = {"lr": 1.0e-3, "batch_size": 4, "micro_batch_size_per_gpu": 4, "max_grad_norm": 1.0}
    if step_together:
        lora.update(lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        agent.update(packing=True)
    return {
        "name": "raytest",
        "seed": 3,
        "run_dir": str(run_dir),
        "model": {"name": "demo"},
        "data": {"source": "demo", "num_rows": 60, "test_size": 12, "max_length": 64},
        "lora": lora,
        "agent": agent,
        "population": {"size": 3, "backend": backend, "num_cpus": 0.5, "members_per_actor": members_per_actor},
        "evolution": {
            "generations": GENERATIONS, "steps_per_generation": 6, "tournament_size": 2,
            "mutation": {"no_mutation": 0.2, "rl_hp": 0.8},
            "hyperparameters": {"lr": {"min": 1.0e-4, "max": 3.0e-2}, "batch_size": {"min": 4, "max": 8}},
        },
        "tracking": {"uri": tracking_uri, "experiment": "raytest"},
        "checkpoint": {"every": 1, "keep": 5},
    }


def last_controller_state(run_dir: Path) -> dict:
    return json.loads((checkpoint_dirs(run_dir)[0] / "controller.json").read_text())["controller"]


def pieces(config, run_dir: Path) -> tuple[str, dict, list[dict]]:
    """(model path, tokenised data, founders' hyperparameters), as `run.start` prepares them."""
    model_path = build.resolve_model_path(config, run_dir)
    prepared = build.prepare_data(config, load_tokenizer(config.tokenizer or model_path))
    return model_path, prepared, build.founder_hyperparameters(config)


def make_controller(config, population, run_dir: Path | None = None) -> Controller:
    """The controller exactly as `run.start` builds it (less tracking and elite export)."""
    checkpointer = EvolutionCheckpointer(run_dir, config.checkpoint.every, config.checkpoint.keep) if run_dir else None
    prepared = pieces(config, run_dir or config.resolved_run_dir())[1]
    return build.controller(config, population, prepared, checkpointer=checkpointer)


def controller_over(agents, gym, steps, selection=None, mutations=None, observers=(), save_elite=None, seed=0,
                    member_seed=None) -> Controller:
    """The controller exactly as `finetune_llm_sft` builds it (a test compares the two), over a
    LocalPopulation of `agents` on one `gym`: every member's data stream seeded from `member_seed`
    (`seed` unless given), the controller from `mutations.rand_seed` if set, else from `seed`."""
    member_seed = seed if member_seed is None else member_seed
    population = LocalPopulation([MemberHost(slot, agent, gym, member_seed) for slot, agent in enumerate(agents)])
    return Controller(
        population, agents[0].hp_config or HyperparameterConfig(), steps,
        seed=mutations.rand_seed if mutations is not None and mutations.rand_seed is not None else seed,
        selection=selection, mutations=mutations, micro_batch_size=agents[0].micro_batch_size_per_gpu,
        observers=observers, save_elite=save_elite,
    )


def run_local(config_dict: dict, run_dir: Path):
    """The experiment run in this process for GENERATIONS generations (warnings silenced), as
    `run.start` would with backend=local: (population, controller state)."""
    config = config_from_dict(config_dict)
    model_path, prepared, founders = pieces(config, run_dir)
    population = LocalPopulation(build.local_hosts(config, model_path, prepared, founders))
    controller = make_controller(config, population)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controller.run(GENERATIONS)
    return population, controller.state_dict()


def decisions(state: dict) -> dict:
    """What a run decided, without the fitness values (compared to a tolerance) or restarts."""
    lineage = state["lineage"]
    return {
        "generation": state["generation"],
        "slot_ids": state["slot_ids"],
        "members": lineage["members"],
        "events": [e for e in lineage["events"] if e["kind"] != "restart"],
    }


def assert_same_run(state: dict, reference: dict, rel: float = 1e-6) -> None:
    assert decisions(state) == decisions(reference)
    fitness, expected = dict(map(tuple, state["fitness"])), dict(map(tuple, reference["fitness"]))
    assert fitness.keys() == expected.keys()
    for member_id, history in expected.items():
        assert fitness[member_id] == pytest.approx(history, abs=rel, rel=rel), member_id
    assert any(e["kind"] == "clone" for e in state["lineage"]["events"])  # there were decisions to compare
