"""The Ray Tune trial of `evo-sft compare`'s baselines: where PBT (or PB2) exploits, the trial
continues from the donor's checkpoint as it was saved (adapter and optimizer state), then takes its
own explored hyperparameters; its own checkpoint brings back its data stream too."""
import warnings

import torch
from ray.tune import Checkpoint
from safetensors.torch import load_file

from evo_sft import build
from evo_sft.compare.trial import restore, save
from evo_sft.config import config_from_dict
from evo_sft.population.hosting import build_hosts
from tests.helpers.evolution_run import experiment, pieces


def hosts(tmp_path, lrs):
    config = config_from_dict(experiment("local", tmp_path / "run"))
    model_path, prepared, founders = pieces(config, tmp_path / "run")
    return {slot: build_hosts(build.member_recipe(config, model_path), prepared,
                              {slot: {**founders[slot], "lr": lr}})[slot] for slot, lr in enumerate(lrs)}


def adapter(host) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in host.agent.trainable_parameters().items()}


def test_an_exploiting_trial_continues_from_the_donors_checkpoint_with_its_own_hyperparameters(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        members = hosts(tmp_path, [3e-3, 1e-4])
        donor, exploiter = members[0], members[1]
        donor.train(3)
        save(donor, "trial_00000", tmp_path / "donor")
        saved = load_file(tmp_path / "donor" / "slot_0" / "actor" / "adapter_model.safetensors")
        explored = {**exploiter.hyperparameters(), "lr": 2.4e-3}

        assert restore(exploiter, Checkpoint.from_directory(tmp_path / "donor"), "trial_00001", explored) == "trial_00000"
        weights = adapter(exploiter)
        assert len(weights) > 0
        for name, tensor in weights.items():  # the donor's file, where PEFT leaves out the adapter's name
            assert torch.equal(tensor, saved[name.replace(".actor.", ".")]), name
        donor_moments = [s["exp_avg"] for s in donor.agent.optimizer.state.values()]
        exploiter_moments = [s["exp_avg"] for s in exploiter.agent.optimizer.state.values()]
        assert len(donor_moments) == len(exploiter_moments) > 0
        assert all(torch.equal(a, b) for a, b in zip(donor_moments, exploiter_moments))
        assert {g["lr"] for g in exploiter.agent.optimizer.param_groups} == {2.4e-3}  # its explored rate
        assert exploiter.stream.state_dict() != donor.stream.state_dict()  # its own data stream goes on

        donor.train(2)  # the copy shares no storage with the donor
        assert all(torch.equal(weights[name], p) for name, p in exploiter.agent.trainable_parameters().items())

        own = hosts(tmp_path, [3e-3])[0]  # a trial resumed from its own checkpoint: stream included
        assert restore(own, Checkpoint.from_directory(tmp_path / "donor"), "trial_00000",
                       own.hyperparameters()) is None
        assert own.stream.state_dict() == load_stream(tmp_path / "donor")


def load_stream(directory):
    from evo_sft.io import storage

    return storage.load_json(directory / "slot_0.stream.json")
