"""Several members on one base model (issue 9), in this process: one frozen copy of the weights,
and members that behave exactly as they would on agents of their own."""
import torch
import torch._dynamo

from evo_sft import build
from evo_sft.config import config_from_dict
from tests.helpers.evolution_run import assert_same_run, experiment, pieces, run_local
from tests.helpers.torch_setup import reset_dynamo


def base_weights(host) -> set[int]:
    return {p.data_ptr() for name, p in host.agent.actor.named_parameters() if "lora_" not in name}


def test_members_on_one_base_decide_exactly_as_members_on_their_own(tmp_path):
    """3 members, LoRA dropout on: one agent each, or all three on one base model (which clones
    between them on the device), give the same lineage and fitness."""
    alone, reference = run_local(experiment("local", tmp_path / "k1", members_per_actor=1), tmp_path)
    shared, state = run_local(experiment("local", tmp_path / "k3", members_per_actor=3), tmp_path)
    assert_same_run(state, reference)

    assert len({id(host.agent) for host in shared.hosts}) == 1
    assert len({id(host.agent) for host in alone.hosts}) == 3
    assert base_weights(shared.hosts[0]) == base_weights(shared.hosts[2])
    assert not base_weights(alone.hosts[0]) & base_weights(alone.hosts[2])


def test_a_member_trains_the_same_whatever_trained_before_it_on_the_base(tmp_path):
    """Dropout masks come from the member's own generator: training slot 2 before or after
    slots 0 and 1 on the shared base changes nothing about it."""
    config = config_from_dict(experiment("local", tmp_path / "order", members_per_actor=3))
    model_path, prepared, founders = pieces(config, tmp_path)

    def train_in(order):
        hosts = build.local_hosts(config, model_path, prepared, founders)
        return {slot: hosts[slot].train(3).train_loss for slot in order}

    forward, backward = train_in([0, 1, 2]), train_in([2, 1, 0])
    assert forward == backward
    assert len(set(forward.values())) == 3, "members with different data and learning rates trained alike"


def test_compiled_members_on_one_base_decide_as_eager_members_on_their_own(tmp_path):
    """Compiled decoder layers, with the members on one base trained one after another (each
    swapped into the same compiled layers), cloned and scored: the same decisions and fitness as
    eager members on agents of their own."""
    _, reference = run_local(experiment("local", tmp_path / "eager", members_per_actor=1, step_together=True), tmp_path)
    compiled = experiment("local", tmp_path / "compiled", members_per_actor=3, step_together=True)
    compiled["population"]["step_together"] = False
    compiled["agent"]["compile_layers"] = True
    reset_dynamo()
    _, state = run_local(compiled, tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert_same_run(state, reference, rel=1e-5)
