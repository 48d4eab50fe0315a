"""An agent's state as files and as tensors: checkpoints in PEFT's adapter layout plus
safetensors and JSON (never pickle), and the exported state a clone is made from."""
import copy
from pathlib import Path

import torch

from evo_sft.io import storage
from evo_sft.sft import lora
from evo_sft.sft.lora import ACTOR, REFERENCE


def scheduler_state(scheduler) -> dict:
    """The scheduler's state without its schedule callables, which are rebuilt from attributes."""
    state = scheduler.state_dict()
    state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def _unflatten(tensors: dict[str, torch.Tensor], prefix: str, structure, device) -> dict:
    own = {k[len(prefix):]: v.to(device, copy=True) for k, v in tensors.items() if k.startswith(prefix)}
    return storage.unflatten_state(own, structure, device=device)


# --------------------------------------------------------------------- member state for clones
def export_state(agent, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a clone needs, as independent tensors plus JSON: trainable weights,
    optimizer and scheduler state, attributes."""
    tensors = {f"param/{name}": p.detach().to(device, copy=True) for name, p in agent.trainable_parameters().items()}
    optimizer_tensors, optimizer_structure = storage.flatten_state(agent.optimizer.state_dict())
    scheduler_tensors, scheduler_structure = storage.flatten_state(scheduler_state(agent.lr_scheduler))
    tensors.update({f"optimizer/{k}": v.to(device, copy=True) for k, v in optimizer_tensors.items()})
    tensors.update({f"scheduler/{k}": v.to(device, copy=True) for k, v in scheduler_tensors.items()})
    meta = {"attributes": agent.inspect_attributes(), "optimizer": optimizer_structure,
            "scheduler": scheduler_structure}
    return tensors, meta


def import_state(agent, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Make `agent` a copy of the exported member. Every tensor is copied, never aliased. A
    parameter of another shape (a donor of another LoRA rank) takes the donor's shape."""
    params = agent.trainable_parameters()
    missing = set(params) - {k[len("param/"):] for k in tensors if k.startswith("param/")}
    if missing:
        raise ValueError(f"member state lacks trainable parameters: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            source = tensors[f"param/{name}"]
            if param.shape != source.shape:
                param.data = param.new_empty(source.shape)
            param.copy_(source)
    agent.optimizer.load_state_dict(_unflatten(tensors, "optimizer/", meta["optimizer"], agent.device))
    agent.lr_scheduler.load_state_dict(_unflatten(tensors, "scheduler/", meta["scheduler"], agent.device))
    agent.set_attributes(meta["attributes"])


# --------------------------------------------------------------------- checkpoints
def checkpoint_snapshot(agent, lora_only: bool = True, save_optimizer: bool = True) -> storage.Snapshot:
    """What `save_checkpoint` writes, copied now, so that it can be written while training goes on."""
    snapshot = storage.Snapshot()
    if agent.is_lora:
        for adapter in [ACTOR] + ([REFERENCE] if agent.use_separate_reference_adapter else []):
            _snapshot_adapter(agent, snapshot, adapter)
    if not lora_only or not agent.is_lora:
        model = agent.actor.get_base_model() if agent.is_lora else agent.actor
        snapshot.tensors("model.safetensors", model.state_dict())
        snapshot.writer("config.json", copy.deepcopy(model.config).to_json_file)
    if save_optimizer:
        snapshot.state("optimizer", agent.optimizer.state_dict())
        snapshot.state("scheduler", scheduler_state(agent.lr_scheduler))
    snapshot.json("attributes.json", {
        "algo": agent.algo, "attributes": agent.inspect_attributes(),
        "lora_config": lora.config_kwargs(agent.lora_config.to_dict()) if agent.is_lora else None,
    })
    return snapshot


def _snapshot_adapter(agent, snapshot: storage.Snapshot, adapter: str) -> None:
    """`adapter` as PEFT's `save_pretrained` writes it (`<adapter>/adapter_model.safetensors`
    and `adapter_config.json`), loadable with `PeftModel.from_pretrained`."""
    snapshot.tensors(f"{adapter}/adapter_model.safetensors", adapter_state(agent, adapter), metadata={"format": "pt"})
    config = copy.deepcopy(agent.actor.peft_config[adapter])
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = agent.actor.base_model.model.__dict__.get("name_or_path") or None
    auto_mapping = None
    if config.task_type is None:
        base_class = agent.actor._get_base_model_class(is_prompt_tuning=False)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    snapshot.writer(f"{adapter}/adapter_config.json",
                    lambda path: config.save_pretrained(path.parent, auto_mapping_dict=auto_mapping))


def adapter_state(agent, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's `get_peft_model_state_dict(agent.actor, adapter_name=adapter)`, asked once per model
    and adapter: each key is then bound to the parameter whose storage PEFT returned, and later
    calls read those parameters (PEFT walks every module and the whole state dict each time, 56
    of the 145 ms of a 3B member's checkpoint copy on an H200). A key that names no parameter
    keeps PEFT asked on every call."""
    from peft import get_peft_model_state_dict

    model, bound = agent.adapter_parameters
    if model is not agent.actor:  # a new agent, or a clone (copy.copy shares this tuple)
        bound = {}
        agent.adapter_parameters = (agent.actor, bound)
    if bound.get(adapter) is not None:
        return {key: p.detach() for key, p in bound[adapter].items()}
    state = get_peft_model_state_dict(agent.actor, adapter_name=adapter)
    if adapter not in bound:
        by_storage = {(p.data_ptr(), p.shape, p.stride(), p.dtype): p for p in agent.actor.parameters()}
        found = {key: by_storage.get((t.data_ptr(), t.shape, t.stride(), t.dtype)) for key, t in state.items()}
        bound[adapter] = found if all(p is not None for p in found.values()) else None
    return state


def load_checkpoint(agent, path: Path, load_optimizer: bool, overwrite_reference_adapter: bool,
                    merge_lora_configs: bool) -> None:
    storage.verify_directory(path)
    saved = storage.load_json(path / "attributes.json")
    if (path / "model.safetensors").exists():
        model = agent.actor.get_base_model() if agent.is_lora else agent.actor
        weights = path / "model.safetensors"
        try:
            model.load_state_dict(storage.load_tensors(weights, agent.device))
        except RuntimeError as error:  # missing, unexpected or misshapen tensors
            raise storage.CheckpointError(f"{weights} does not fit this agent's model: {error}") from error
    if agent.is_lora:
        _load_adapter(agent, path, merge_lora_configs, overwrite_reference_adapter)
    if load_optimizer and (path / "optimizer.safetensors").exists():
        agent.optimizer.load_state_dict(storage.load_state(path, "optimizer", agent.device))
        agent.lr_scheduler.load_state_dict(storage.load_state(path, "scheduler", agent.device))
    attributes = saved["attributes"]
    if agent.is_lora:  # the adapter as loaded (the checkpoint's, or merged with this agent's)
        config = agent.actor.peft_config[ACTOR]
        attributes = {**attributes, "lora_r": config.r, "lora_alpha": config.lora_alpha,
                      "lora_dropout": config.lora_dropout}
    agent.set_attributes(attributes)


def _load_adapter(agent, path: Path, merge_lora_configs: bool, overwrite_reference_adapter: bool) -> None:
    from peft import LoraConfig, set_peft_model_state_dict

    adapter_dir = path / ACTOR
    saved_config = LoraConfig.from_pretrained(adapter_dir)
    current = agent.actor.peft_config[ACTOR]
    weights = storage.load_tensors(adapter_dir / "adapter_model.safetensors", agent.device)
    if merge_lora_configs and lora.signature(saved_config) != lora.signature(current):
        _rebuild_adapter(agent, lora.merged_config(current, saved_config))
        weights = lora.pad_weights(weights, agent.actor)
    elif lora.signature(saved_config)["target_modules"] != lora.signature(current)["target_modules"]:
        raise ValueError(
            f"LoRA config of {adapter_dir} {lora.signature(saved_config)} does not match this agent's "
            f"{lora.signature(current)}; pass merge_lora_configs=True to reconcile them"
        )
    else:  # the checkpoint's rank and alpha (hyperparameters that mutate)
        agent.take_lora_rank(saved_config.r, saved_config.lora_alpha, saved_config.lora_dropout)
    set_peft_model_state_dict(agent.actor, weights, adapter_name=ACTOR)
    if agent.use_separate_reference_adapter:
        if overwrite_reference_adapter:
            lora.copy_adapter(agent.actor, ACTOR, REFERENCE)
        elif (path / REFERENCE).exists():
            reference = storage.load_tensors(path / REFERENCE / "adapter_model.safetensors", agent.device)
            set_peft_model_state_dict(agent.actor, reference, adapter_name=REFERENCE)
        agent.actor.set_adapter(ACTOR)


def _rebuild_adapter(agent, config) -> None:
    agent.actor.delete_adapter(ACTOR)
    agent.actor.add_adapter(ACTOR, config)
    agent.actor.set_adapter(ACTOR)
    agent.adapter_parameters = (None, {})  # new parameter objects
    agent.lora_config = config
    agent.lora_r, agent.lora_alpha, agent.lora_dropout = config.r, config.lora_alpha, config.lora_dropout
    agent.reinit_optimizers()


def saved_init(path: Path) -> tuple[dict, dict | None]:
    """The attributes and LoRA config a checkpoint was saved with (verified first)."""
    storage.verify_directory(path)
    saved = storage.load_json(path / "attributes.json")
    return saved["attributes"], saved["lora_config"]
