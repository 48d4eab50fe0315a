"""`evo-sft export`: a member of a run's newest checkpoint as a folder to ship, with its model card.

Three forms: its LoRA adapter (a PEFT folder); the adapter merged into the base model's weights
(`--merged`: a plain transformers model); or, for a run without LoRA, its whole model. Each comes
with the tokenizer, `README.md` (evo_sft.model_card) and the config and schedule it was made with;
a whole or merged model also with its generation config, whose end-of-sequence tokens are those
the run stopped its responses at. `--register NAME` also makes it a new version of NAME in the
MLflow Model Registry (evo_sft.tracking.registry), in the run's tracking store.

The export is written beside OUT and put in its place only once complete (and registered): a
refusal or failure leaves OUT as it was and nothing half-written beside it.
"""
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from evo_sft import build
from evo_sft.config import ExperimentConfig, model_name_problem
from evo_sft.console import quiet_libraries
from evo_sft.controller import saved_schedule
from evo_sft.data.sources import load_tokenizer
from evo_sft.evolution import Lineage
from evo_sft.io.checkpoint import latest_intact
from evo_sft.io.storage import replace_directory, umask_modes
from evo_sft.model_card import ModelCard, card_for, write_card
from evo_sft.run_folder import best_member, config_of, final_evaluation, saved_tracking_uri


class ExportError(Exception):
    """An export that cannot be made as asked; one line."""


@dataclass
class Exported:
    member_id: int
    generation: int
    form: str  # evo_sft.model_card.FORMS
    out_dir: Path
    registered_version: str | None = None


def export(run_dir: Path, out_dir: Path, member: int | str = "best", merged: bool = False, force: bool = False,
           register: str | None = None) -> Exported:
    """Export `member` (an id of the newest checkpoint, or "best": the run's best) of the run in
    `run_dir` into `out_dir`, which must be new or empty unless `force` (then it is replaced whole)."""
    quiet_libraries()
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; export into a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} is not empty; pass --force to replace it, or choose a new folder")
    config = config_of(run_dir)
    if merged and config.lora is None:
        raise ExportError(f"--merged: {run_dir} fine-tuned whole models (lora: null), so there is no adapter to "
                          "merge; export without --merged to get the member's whole model")
    problem = register is not None and model_name_problem(register)
    if problem:
        raise ExportError(f"--register: {problem}")
    checkpoint, saved = latest_intact(run_dir)
    state = saved["controller"]
    member_id = best_member(run_dir, saved) if member == "best" else member
    if member_id not in state["slot_ids"]:
        raise ExportError(f"member {member_id} is not in the latest checkpoint (members: {state['slot_ids']})")
    slot_dir = checkpoint / "members" / f"slot_{state['slot_ids'].index(member_id)}"
    form = "whole" if config.lora is None else "merged" if merged else "adapter"
    tokenizer = load_tokenizer(config.tokenizer or build.base_model_path(config, run_dir),
                               config.model.trust_remote_code)
    tracking = {**(saved.get("tracking") or {}), "tracking_uri": saved_tracking_uri(saved, run_dir)}
    card = card_for(config, run_dir, Lineage.from_dict(state["lineage"]),
                    saved_schedule(state, member_id, config.evolution.steps_per_generation), state["generation"], form,
                    final_evaluation(run_dir, state["generation"]), tracking, bool(tokenizer.chat_template),
                    registered_as=register)
    # beside OUT, under OUT's own name (what a registered model calls its files)
    staging = out_dir.parent / f".tmp-{out_dir.name}-{secrets.token_hex(4)}" / out_dir.name
    try:
        if form == "adapter":
            shutil.copytree(slot_dir / "actor", staging)
        else:
            whole_model(config, run_dir, slot_dir, tokenizer).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_card(staging, card)
        umask_modes(staging)  # a copied adapter keeps the checkpoint's modes, which an earlier umask gave
        version = _register(register, staging, card, config, run_dir, tokenizer) if register else None
        replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    return Exported(member_id, state["generation"], form, out_dir, version)


def whole_model(config: ExperimentConfig, run_dir: Path, slot_dir: Path, tokenizer):
    """The member in `slot_dir` as one plain transformers model in the run's dtype: its adapter
    merged into the base model's weights (merged in float32), or, without LoRA, its own weights;
    its generation config stops where the run's responses stopped."""
    import torch
    from transformers import AutoModelForCausalLM

    from evo_sft.io.storage import load_tensors

    model = AutoModelForCausalLM.from_pretrained(build.base_model_path(config, run_dir), dtype=torch.float32,
                                                 trust_remote_code=config.model.trust_remote_code)
    if config.lora is None:
        model.load_state_dict(load_tensors(slot_dir / "model.safetensors"))
    else:
        model = merge_adapter(model, slot_dir / "actor")
    settings = build.generation_settings(config, tokenizer)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    model.generation_config.eos_token_id = sorted(set(eos) | set(settings["stop_token_ids"]))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(getattr(torch, config.model.dtype))


def merge_adapter(base, adapter_dir: Path):
    """`base` with the PEFT adapter in `adapter_dir` merged into its weights. Where the base ties its
    output head to its input embedding, merging an adapter of either would change both, so they are
    untied first (and tied again where the merge left them equal)."""
    import torch
    from peft import PeftModel

    head, embedding = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if tied:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        base.config.tie_word_embeddings = False
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if tied and torch.equal(head.weight, embedding.weight):
        head.weight = embedding.weight
        model.config.tie_word_embeddings = True
    return model


def _register(name: str, folder: Path, card: ModelCard, config: ExperimentConfig, run_dir: Path, tokenizer) -> str:
    """Register the export in `folder` as a new version of `name` in the run's parent MLflow run."""
    from mlflow.tracking import MlflowClient

    from evo_sft.tracking.outbox import first_line
    from evo_sft.tracking.tracker import short_http_retries
    from evo_sft.tracking.registry import ARTIFACTS, register, save_mlflow_model

    uri, run_id = card.tracking["tracking_uri"], card.tracking["parent_run_id"]
    if not run_id:
        raise ExportError(f"--register: {run_dir} has no MLflow run yet (its records wait in its tracking queue); "
                          "register once they are sent")
    short_http_retries()
    artifact = f"member_{card.member_id:05d}-generation_{card.generation:05d}-{card.form}"
    base = build.local_base_model(config, run_dir) if card.form == "adapter" else None
    with tempfile.TemporaryDirectory() as temporary:
        model = Path(temporary) / artifact
        save_mlflow_model(folder, base, build.generation_settings(config, tokenizer), model)
        try:
            version = register(MlflowClient(uri), run_id, name, model, f"{ARTIFACTS}/{artifact}",
                               card.registry_tags(), card.body())
        except Exception as error:  # noqa: BLE001 - unreachable or refusing: one line, nothing registered
            raise ExportError(f"--register: MLflow at {uri} did not register {name!r}: {first_line(error)}") from None
    return version.version
