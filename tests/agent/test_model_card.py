"""The model card of an export (issue 31), rendered from a lineage built by hand: the front matter
parses as YAML with the fields a hub reads, the hyperparameter table is the line's hyperparameters
as the lineage has them generation by generation, the results and lineage say what happened, table
cells survive prompts with pipes and newlines, and the reproduce files load back."""
import re

import pytest
import yaml

from evo_sft.config import config_from_dict, load_config
from evo_sft.evolution import Lineage
from evo_sft.evolution.schedule import line_schedule
from evo_sft.io.storage import load_json
from evo_sft.model_card import SOURCES, card_for, write_card

HUB_CONFIG = {
    "name": "qwen-sweep", "seed": 7,
    "model": {"name": "Qwen/Qwen2.5-0.5B", "dtype": "bfloat16"},
    "data": {"source": "HumanLLMs/Human-Like-DPO-Dataset", "response_column": "chosen", "max_length": 512},
    "lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]},
    "population": {"size": 2},
    "evolution": {"generations": 3, "steps_per_generation": 20, "fitness": "test_loss",
                  "hyperparameters": {"lr": {"min": 1.0e-6, "max": 1.0e-2}, "batch_size": {"min": 4, "max": 64}}},
}
FOUNDER = {"lr": 1e-4, "batch_size": 16, "max_grad_norm": 1.0, "weight_decay": 0.01, "warmup_steps": 0,
           "scheduler": "constant", "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0}
# member 2: a copy of member 0 after generation 1 with a new lr, its batch size mutated after generation 2
FITNESS = {0: [-2.0, -1.8, -1.7], 1: [-2.5], 2: [-2.0, -1.75, -1.6]}
BATCHES = [[18, 20], [20, 14], [20, 14]]  # optimizer steps per slot and generation (member 2 lives in slot 1)
EVALUATION = {"generation": 3, "metric": "test_loss", "full_test": False, "scored_rows": 50, "test_rows": 50,
              "best_member": 2, "members": [
                  {"member_id": 2, "fitness": -1.6, "metric_value": 1.6, "test_loss": 1.6,
                   "samples": [{"prompt": "a | b\nc", "reference": "yes", "output": ""}]}]}
TRACKING = {"tracking_uri": "http://mlflow:5000", "experiment_id": "3", "parent_run_id": "abc",
            "member_runs": {"2": "def"}}


def lineage() -> Lineage:
    tree = Lineage()
    tree.found(dict(FOUNDER), slot=0)
    tree.found({**FOUNDER, "lr": 3e-4}, slot=1)
    clone = tree.clone(0, 2, {**FOUNDER, "lr": 1.2e-4}, "lr", slot=1)
    tree.mutate(clone, 3, {**FOUNDER, "lr": 1.2e-4, "batch_size": 24}, "batch_size")
    return tree


def card(form="adapter", config=HUB_CONFIG, evaluation=EVALUATION, **kwargs):
    tree = lineage()
    schedule = line_schedule(tree, 2, FITNESS[2], BATCHES, 20)
    return card_for(config_from_dict(config), "/runs/qwen-sweep", tree, schedule, 3, form, evaluation, TRACKING,
                    chat_template=True, **kwargs)


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


def table_after(text: str, header_start: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with `header_start`, as cells."""
    lines = text[text.index(header_start):].split("\n\n")[0].splitlines()
    assert re.fullmatch(r"(\|---)+\|", lines[1]), lines[1]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in [lines[0], *lines[2:]]]


@pytest.mark.parametrize("form, library, relation", [("adapter", "peft", "adapter"), ("merged", "transformers", "finetune")])
def test_front_matter_names_base_model_library_tags_and_dataset(form, library, relation):
    assert front_matter(card(form).text()) == {
        "base_model": "Qwen/Qwen2.5-0.5B", "base_model_relation": relation, "library_name": library,
        "pipeline_tag": "text-generation", "tags": ["evo-sft", "sft", "text-generation", "lora"],
        "datasets": ["HumanLLMs/Human-Like-DPO-Dataset"],
    }


def test_a_local_base_and_dataset_are_not_named_as_hub_ids():
    config = {**HUB_CONFIG, "model": {"name": "demo"}, "data": {"source": "demo"}}
    matter = front_matter(card("merged", config).text())
    assert "base_model" not in matter and "datasets" not in matter
    assert matter["library_name"] == "transformers" and "evo-sft" in matter["tags"]


def test_hyperparameter_table_is_the_lines_hyperparameters_generation_by_generation():
    text = card().text()
    header, *rows = table_after(text, "| generation |")
    assert header == ["generation", "member", "steps", "lr", "batch_size", "test_loss"]
    tree = lineage()
    expected = []
    for generation, member in ((1, 0), (2, 2), (3, 2)):  # member 2 trains from generation 2, when it was born
        hp = tree.hyperparameters_at(member, generation)
        expected.append([str(generation), str(member), str(BATCHES[generation - 1][tree.members[member].slot]), f"{hp['lr']:.3g}",
                         str(hp["batch_size"]),
                         f"{-FITNESS[2][generation - 1]:.4f}"])
    assert rows == expected
    assert [row[3] for row in rows] == ["0.0001", "0.00012", "0.00012"] and [row[4] for row in rows] == ["16", "16", "24"]
    assert ("The same in every generation: max_grad_norm 1, weight_decay 0.01, warmup_steps 0, scheduler constant, "
            "lora_r 16, lora_alpha 32, lora_dropout 0.") in text


def test_results_lineage_loading_and_reproducing():
    text = card(registered_as="qwen-chat").text()
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# qwen-sweep: member 2, the best of an evo-sft evolution"
    header, *rows = table_after(text, "| metric |")
    assert rows == [["test_loss (the fitness)", "1.6000", "50 (all)",
                     "mean cross-entropy of the reference response tokens (lower is better)"]]
    header, *samples = table_after(text, "| prompt |")
    assert samples == [["`a \\| b⏎c`", "`yes`", "(empty)"]]
    assert "1. member 0: a founder, in slot 0\n1. member 2: a copy of member 0 made after generation 1, mutated: lr" in text
    assert "base = AutoModelForCausalLM.from_pretrained('Qwen/Qwen2.5-0.5B', dtype=torch.bfloat16)" in text
    assert 'mlflow.pyfunc.load_model("models:/qwen-chat/VERSION")' in text
    assert f"evo-sft run {SOURCES}/config.yaml --run-dir runs/qwen-sweep-again" in text
    assert f"evo-sft replay /runs/qwen-sweep --schedule {SOURCES}/schedule.json" in text
    assert "evolution run `abc`, member run `def`" in text


def test_without_the_runs_evaluation_the_card_shows_the_checkpoints_fitness():
    text = card(evaluation=None).text()
    assert "# qwen-sweep: member 2 of an evo-sft evolution" in text
    assert "`test_loss` after generation 3: 1.6000 (the fitness the run kept in its checkpoint" in text


def test_registry_tags():
    assert card().registry_tags() == {
        "evo_sft.member_id": "2", "evo_sft.generation": "3", "evo_sft.form": "adapter",
        "evo_sft.run_dir": "/runs/qwen-sweep", "evo_sft.parent_member_id": "0", "evo_sft.fitness": "-1.6",
        "evo_sft.metric": "test_loss", "evo_sft.test_loss": "1.6", "evo_sft.parent_run_id": "abc",
        "evo_sft.member_run_id": "def"}


def test_the_reproduce_files_load_back(tmp_path):
    made = card()
    write_card(tmp_path, made)
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == made.text()
    assert load_config(tmp_path / SOURCES / "config.yaml").to_dict() == config_from_dict(HUB_CONFIG).to_dict()
    assert load_json(tmp_path / SOURCES / "schedule.json") == made.schedule
