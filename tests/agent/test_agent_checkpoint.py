"""Agent checkpoints: PEFT layout, no pickle, exact round trips, damage and config mismatches."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch.testing import assert_close

from evo_sft import SFT, LRSchedule, save_llm_checkpoint
from evo_sft.io.storage import CheckpointError

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture
def train(demo_gym):
    """`train(agent, steps)`: a few optimizer steps on the demo task, so that the adapter,
    the optimizer moments and the schedule are all non-trivial."""

    def run(agent, steps: int = 3):
        for _ in range(steps):
            agent.learn(demo_gym.step())
        return agent

    return run


@pytest.fixture
def base_dir(tmp_path, make_model):
    """The tiny base model (seed 0) saved with save_pretrained, for `model_name`."""
    path = tmp_path / "base"
    make_model(0).save_pretrained(path)
    return path


def assert_same_optimizer(a: SFT, b: SFT, assert_same):
    assert_same(a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"])
    assert [g["lr"] for g in a.optimizer.param_groups] == [g["lr"] for g in b.optimizer.param_groups]
    assert a.lr_scheduler.last_epoch == b.lr_scheduler.last_epoch
    assert a.lr_scheduler.base_lrs == b.lr_scheduler.base_lrs


def assert_same_next_step(a: SFT, b: SFT, batch, snapshot, assert_same):
    result_a, result_b = a.learn(batch), b.learn(batch)
    assert result_a["mean_loss"] == result_b["mean_loss"]
    assert_same(snapshot.params(a), snapshot.params(b))
    assert_same(snapshot.optimizer(a), snapshot.optimizer(b))


def test_layout_is_peft_and_pickle_free(make_agent, make_model, train, tmp_path, logits_of, probe_ids):
    agent = train(make_agent(use_separate_reference_adapter=True))
    path = tmp_path / "ckpt"
    agent.save_checkpoint(path)
    assert (path / "actor" / "adapter_model.safetensors").is_file()
    assert (path / "actor" / "adapter_config.json").is_file()
    assert (path / "reference" / "adapter_model.safetensors").is_file()
    files = [f for f in path.rglob("*") if f.is_file()]
    for file in files:
        assert file.suffix not in PICKLE_SUFFIXES, file
        # every file is JSON or safetensors: nothing that a loader would unpickle
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            assert file.suffix == ".safetensors", file
            with safe_open(str(file), framework="pt") as f:
                list(f.keys())
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))

    # the adapter loads with plain PEFT onto a fresh copy of the base model, to the same logits
    peft_model = PeftModel.from_pretrained(make_model(0), path / "actor")
    assert_close(logits_of(peft_model, probe_ids), logits_of(agent, probe_ids), atol=1e-6, rtol=0)
    assert not torch.allclose(logits_of(make_model(0), probe_ids), logits_of(agent, probe_ids), atol=1e-4)


def test_save_llm_checkpoint_writes_the_adapter_without_optimizer(make_agent, make_model, train, tmp_path,
                                                                    logits_of, probe_ids):
    agent = train(make_agent())
    save_llm_checkpoint(agent, tmp_path / "llm")
    assert not (tmp_path / "llm" / "optimizer.safetensors").exists()
    peft_model = PeftModel.from_pretrained(make_model(0), tmp_path / "llm" / "actor")
    assert_close(logits_of(peft_model, probe_ids), logits_of(agent, probe_ids), atol=1e-6, rtol=0)


def test_load_from_model_name_gives_identical_logits_state_and_next_step(
        make_agent, base_dir, train, tmp_path, demo_gym, logits_of, probe_ids, snapshot, assert_same):
    agent = make_agent(model_name=str(base_dir), lr=2e-3, batch_size=4,
                       lr_schedule=LRSchedule(total_steps=10, warmup_steps=2, min_lr_ratio=0.1))
    train(agent)
    agent.fitness.append(-1.25)
    path = tmp_path / "ckpt"
    agent.save_checkpoint(path)

    loaded = SFT.load(path)
    assert torch.equal(logits_of(loaded, probe_ids), logits_of(agent, probe_ids))
    assert loaded.lr == 2e-3 and loaded.batch_size == 4 and loaded.fitness == [-1.25]
    assert loaded.lr_schedule == agent.lr_schedule
    assert_same_optimizer(loaded, agent, assert_same)
    assert_same_next_step(agent, loaded, demo_gym.step(), snapshot, assert_same)


def test_load_checkpoint_on_a_fresh_agent(make_agent, train, tmp_path, demo_gym, logits_of, probe_ids,
                                          snapshot, assert_same):
    agent = train(make_agent(lr=2e-3))
    path = tmp_path / "ckpt"
    agent.save_checkpoint(path)

    fresh = make_agent(lr=1e-4)
    fresh.load_checkpoint(path)
    assert torch.equal(logits_of(fresh, probe_ids), logits_of(agent, probe_ids))
    assert fresh.lr == 2e-3 and fresh.optimizer.param_groups[0]["lr"] == 2e-3
    assert fresh.optimizer.state_dict()["state"] == {}  # load_optimizer=False

    with_optimizer = make_agent(lr=1e-4)
    with_optimizer.load_checkpoint(path, load_optimizer=True)
    assert torch.equal(logits_of(with_optimizer, probe_ids), logits_of(agent, probe_ids))
    assert_same_optimizer(with_optimizer, agent, assert_same)
    assert_same_next_step(agent, with_optimizer, demo_gym.step(), snapshot, assert_same)


def test_a_snapshot_holds_the_state_of_when_it_was_taken(make_agent, train, tmp_path, demo_gym, logits_of, probe_ids,
                                                        snapshot, assert_same):
    """A population checkpoint copies each member and writes it while others are copied (or
    trained): what is written must be the member as it was when copied."""
    agent = train(make_agent(lr=2e-3))
    taken = agent.checkpoint_snapshot()
    logits, optimizer = logits_of(agent, probe_ids), snapshot.optimizer(agent)
    train(agent, steps=2)
    assert not torch.equal(logits_of(agent, probe_ids), logits)
    taken.write_atomic(tmp_path / "ckpt")

    loaded = make_agent(lr=1e-4)
    loaded.load_checkpoint(tmp_path / "ckpt", load_optimizer=True)
    assert torch.equal(logits_of(loaded, probe_ids), logits)
    assert_same(snapshot.optimizer(loaded), optimizer)
    assert loaded.optimizer_steps == agent.optimizer_steps - 2


def saved_adapter_is_pefts(agent: SFT, path) -> dict:
    """Save `agent` to `path`, check that its adapter file equals PEFT's own
    `get_peft_model_state_dict` of the agent's model now, and return the file's tensors."""
    from peft import get_peft_model_state_dict

    agent.save_checkpoint(path)
    saved = load_file(path / "actor" / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(agent.actor, adapter_name="actor")
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    return saved


def test_each_checkpoint_saves_the_adapter_peft_names_at_that_time(make_agent, train, tmp_path):
    """The adapter of every checkpoint is PEFT's state dict of the model when it is saved: the
    first time, after more steps (the agent reads the parameters it bound on the first save), and
    for a clone that trains on while its original does not (each saves its own weights)."""
    agent = train(make_agent(lr=2e-3))
    first = saved_adapter_is_pefts(agent, tmp_path / "first")
    train(agent, steps=2)
    later = saved_adapter_is_pefts(agent, tmp_path / "later")
    assert any(not torch.equal(first[key], later[key]) for key in first)

    clone = agent.clone()
    train(clone, steps=2)
    cloned = saved_adapter_is_pefts(clone, tmp_path / "clone")
    original = saved_adapter_is_pefts(agent, tmp_path / "original")
    assert all(torch.equal(original[key], t) for key, t in later.items())
    assert any(not torch.equal(cloned[key], t) for key, t in later.items())


def test_full_weights_round_trip(make_agent, train, tmp_path, demo_gym, logits_of, probe_ids, snapshot, assert_same):
    agent = train(make_agent())
    path = tmp_path / "full"
    agent.save_checkpoint(path, lora_only=False)
    assert (path / "model.safetensors").is_file() and (path / "actor" / "adapter_model.safetensors").is_file()

    loaded = SFT.load(path)
    assert torch.equal(logits_of(loaded, probe_ids), logits_of(agent, probe_ids))
    # onto an agent whose base weights differ: the saved base weights are restored too
    other_base = make_agent(model_seed=1)
    assert not torch.allclose(logits_of(other_base, probe_ids), logits_of(agent, probe_ids), atol=1e-3)
    other_base.load_checkpoint(path, load_optimizer=True)
    assert torch.equal(logits_of(other_base, probe_ids), logits_of(agent, probe_ids))
    assert_same_next_step(agent, loaded, demo_gym.step(), snapshot, assert_same)

    # a LoRA-only checkpoint of an agent built from a network object cannot rebuild its base
    agent.save_checkpoint(tmp_path / "lora_only")
    with pytest.raises(ValueError, match="load_checkpoint"):
        SFT.load(tmp_path / "lora_only")


def test_full_fine_tuning_round_trip(make_agent, train, tmp_path, demo_gym, logits_of, probe_ids, snapshot,
                                     assert_same):
    agent = train(make_agent(lora_config=None))
    agent.save_checkpoint(tmp_path / "ft")
    assert not (tmp_path / "ft" / "actor").exists()
    loaded = SFT.load(tmp_path / "ft")
    assert loaded.lora_config is None
    assert torch.equal(logits_of(loaded, probe_ids), logits_of(agent, probe_ids))
    assert_same_next_step(agent, loaded, demo_gym.step(), snapshot, assert_same)


@pytest.mark.parametrize("damaged", ["actor/adapter_model.safetensors", "optimizer.safetensors", "attributes.json"])
def test_flipped_byte_is_an_error_naming_the_file(damaged, make_agent, train, tmp_path):
    agent = train(make_agent(), steps=1)
    path = tmp_path / "ckpt"
    agent.save_checkpoint(path)
    file = path / damaged
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=damaged.split("/")[-1]) as error:
        make_agent().load_checkpoint(path, load_optimizer=True)
    assert str(file.resolve()) in str(error.value) or str(file.absolute()) in str(error.value)
    with pytest.raises(CheckpointError, match=damaged.split("/")[-1]):
        SFT.load(path)


def test_reference_adapter_round_trip(make_agent, train, tmp_path, logits_of, probe_ids, make_model):
    agent = train(make_agent(use_separate_reference_adapter=True))  # reference = the initial adapter
    path = tmp_path / "ckpt"
    agent.save_checkpoint(path)
    base_logits = logits_of(make_model(0), probe_ids)

    loaded = train(make_agent(use_separate_reference_adapter=True), steps=1)
    loaded.set_reference_policy()  # make its reference differ from the saved one
    loaded.load_checkpoint(path)
    with loaded.select_adapter("reference"):
        assert_close(logits_of(loaded, probe_ids), base_logits, atol=1e-6, rtol=0)
    assert torch.equal(logits_of(loaded, probe_ids), logits_of(agent, probe_ids))

    overwritten = make_agent(use_separate_reference_adapter=True)
    overwritten.load_checkpoint(path, overwrite_reference_adapter=True)
    with overwritten.select_adapter("reference"):
        assert torch.equal(logits_of(overwritten, probe_ids), logits_of(agent, probe_ids))
    assert overwritten.actor.active_adapter == "actor"


# ----------------------------------------------------------------------- LoRA config changes
def lora(r, alpha, targets):
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)


def test_lora_target_modules_mismatch_is_a_clear_error(make_agent, train, tmp_path):
    """Another rank or alpha is the checkpoint's to give (tests/agent/test_lora_rank.py); other
    target modules need merge_lora_configs."""
    agent = train(make_agent(), steps=1)
    agent.save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="LoRA config.*merge_lora_configs"):
        make_agent(lora_config=lora(4, 8, ["q_proj", "v_proj"])).load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("saved_config,loader_config", [
    (lora(4, 8, ["q_proj", "k_proj"]), lora(8, 16, ["v_proj", "o_proj"])),   # same scaling alpha/r
    (lora(4, 8, ["q_proj", "k_proj"]), lora(8, 8, ["k_proj", "o_proj"])),    # different scaling
    (lora(8, 16, ["q_proj", "k_proj"]), lora(4, 4, ["v_proj"])),             # the saved one is larger
], ids=["same-scaling", "different-scaling", "saved-larger"])
def test_merge_lora_configs(saved_config, loader_config, make_agent, train, tmp_path, logits_of, probe_ids):
    saved_agent = train(make_agent(lora_config=saved_config, lr=1e-2))
    path = tmp_path / "ckpt"
    saved_agent.save_checkpoint(path)
    saved_weights = load_file(str(path / "actor" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved_weights.items())

    agent = train(make_agent(lora_config=loader_config), steps=1)
    saved_adapter_is_pefts(agent, tmp_path / "before-merge")
    agent.load_checkpoint(path, merge_lora_configs=True)
    config = agent.actor.peft_config["actor"]
    rank = max(saved_config.r, loader_config.r)
    assert config.r == rank
    assert set(config.target_modules) == set(saved_config.target_modules) | set(loader_config.target_modules)

    params = dict(agent.actor.named_parameters())
    lora_params = {n.replace(".actor.", "."): p for n, p in params.items() if ".actor." in n}
    assert {n.split(".")[-3] for n in lora_params} == set(config.target_modules)
    for name, p in lora_params.items():
        if "lora_A" in name:
            assert p.shape[0] == rank
        else:
            assert p.shape[1] == rank
        if name in saved_weights:  # the saved matrix is the top-left slice
            saved = saved_weights[name]
            assert torch.equal(p[: saved.shape[0], : saved.shape[1]].detach(), saved)
            if "lora_B" in name:
                assert (p[:, saved.shape[1]:] == 0).all()
        elif "lora_B" in name:  # modules the saved adapter did not target add nothing
            assert (p == 0).all()
    assert_close(logits_of(agent, probe_ids), logits_of(saved_agent, probe_ids), atol=1e-6, rtol=0)

    # the merged adapter trains, and a checkpoint saves it (not the adapter it replaced)
    before = logits_of(agent, probe_ids)
    train(agent, steps=1)
    assert not torch.equal(logits_of(agent, probe_ids), before)
    saved_adapter_is_pefts(agent, tmp_path / "after-merge")


def test_full_weights_that_do_not_fit_the_model_are_an_error_naming_the_file(make_agent, tmp_path):
    """A full fine-tuning checkpoint loaded into a LoRA agent: every base weight has another name."""
    make_agent(lora_config=None).save_checkpoint(tmp_path / "ft")
    lora_agent = make_agent()
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit this agent's model"):
        lora_agent.load_checkpoint(tmp_path / "ft")
