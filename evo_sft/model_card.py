"""The model card of an export (`README.md`, the Hugging Face convention): YAML front matter a hub
reads (`base_model`, `library_name`, `tags`, `datasets`) and a page a person reads: what was
fine-tuned on what, the scores on the test set, the line's hyperparameters generation by
generation, the lineage, how to load it and how to reproduce it. Beside it, `evo-sft/config.yaml`
(the run's config) and `evo-sft/schedule.json` (the member's line) are what the reproduce
commands take."""
from dataclasses import dataclass
from pathlib import Path

import yaml

from evo_sft import build
from evo_sft.config import ExperimentConfig
from evo_sft.data.sources import is_hub_id
from evo_sft.evolution import Lineage
from evo_sft.hyperparameters import HYPERPARAMETERS, shown
from evo_sft.io.storage import save_json

CARD_FILE = "README.md"
SOURCES = "evo-sft"  # the folder of an export that holds the config and schedule it was made with
FORMS = ("adapter", "merged", "whole")  # a PEFT adapter; LoRA merged into the base; a run without LoRA
METRIC_MEANINGS = {
    "test_loss": "mean cross-entropy of the reference response tokens (lower is better)",
    "exact_match": "share of rows whose greedy response equals the reference, normalised",
    "accuracy": "share of rows whose greedy response answers with the row's label",
}


@dataclass
class ModelCard:
    """What the card of one exported member says. `evaluation` is the run's `evaluation.json`
    where it scores this member's population (None where the run did not end there);
    `tracking` holds the MLflow ids of the run (`tracking_uri`, `experiment_id`,
    `parent_run_id`, `member_run_id`, each possibly None)."""

    config: ExperimentConfig
    run_dir: Path
    member_id: int
    generation: int
    form: str
    schedule: dict
    ancestry: list[dict]
    evaluation: dict | None
    tracking: dict
    chat_template: bool = True
    registered_as: str | None = None

    # ------------------------------------------------------------------ facts
    @property
    def scores(self) -> dict | None:
        """This member's entry of the run's evaluation."""
        members = (self.evaluation or {}).get("members", [])
        return next((m for m in members if m["member_id"] == self.member_id), None)

    @property
    def base(self) -> str:
        return self.config.model.name

    def registry_tags(self) -> dict[str, str]:
        """The tags of its version in the MLflow Model Registry."""
        scores = self.scores or {}
        tags = {"evo_sft.member_id": str(self.member_id), "evo_sft.generation": str(self.generation),
                "evo_sft.form": self.form, "evo_sft.run_dir": str(self.run_dir),
                "evo_sft.parent_member_id": _text(self.ancestry[-1]["parent_id"]),
                "evo_sft.fitness": _text(scores.get("fitness", self.schedule["generations"][-1]["fitness"])),
                "evo_sft.metric": build.fitness(self.config).metric}
        if scores.get("test_loss") is not None:
            tags["evo_sft.test_loss"] = str(scores["test_loss"])
        for key in ("parent_run_id", "member_run_id"):
            if self.tracking.get(key):
                tags[f"evo_sft.{key}"] = self.tracking[key]
        return tags

    # ------------------------------------------------------------------ the card
    def front_matter(self) -> dict:
        matter = {}
        if is_hub_id(self.base):
            matter["base_model"] = self.base
            matter["base_model_relation"] = "adapter" if self.form == "adapter" else "finetune"
        matter["library_name"] = "peft" if self.form == "adapter" else "transformers"
        matter["pipeline_tag"] = "text-generation"
        matter["tags"] = ["evo-sft", "sft", "text-generation"] + (["lora"] if self.config.lora is not None else [])
        if is_hub_id(self.config.data.source):
            matter["datasets"] = [self.config.data.source]
        return matter

    def text(self) -> str:
        """README.md: the front matter, then the page."""
        return f"---\n{yaml.safe_dump(self.front_matter(), sort_keys=False)}---\n\n{self.body()}"

    def body(self) -> str:
        """The page alone (what the MLflow Model Registry shows as the version's description)."""
        sections = [self._summary(), self._results(), self._hyperparameters(), self._lineage(), self._loading(),
                    self._reproducing(), self._provenance()]
        return "\n\n".join(section for section in sections if section) + "\n"

    def _summary(self) -> str:
        config, evolution = self.config, self.config.evolution
        lora = config.lora
        rank = (f"rank {self.schedule['generations'][-1]['hyperparameters'].get('lora_r', lora.r)}, targets "
                + ", ".join(f"`{m}`" for m in _listed(lora.target_modules))) if lora is not None else ""
        what = {
            "adapter": f"a LoRA adapter ({rank}) for {_model(self.base)}.",
            "merged": f"{_model(self.base)} with a LoRA adapter ({rank}) merged into its weights, saved whole: it "
                      "loads with transformers alone.",
            "whole": f"{_model(self.base)}, fine-tuned whole (every weight, no LoRA).",
        }[self.form]
        best = (self.evaluation or {}).get("best_member") == self.member_id
        title = f"# {config.name}: member {self.member_id}" + (", the best of an evo-sft evolution" if best else
                                                              " of an evo-sft evolution")
        data = config.data
        test = (f"the `{data.test_split}` split" if data.test_split else
                f"{_share(data.test_size)} of the rows, held out at random (seed {config.seed})")
        return (f"{title}\n\n**What it is:** {what}\n\n"
                f"**What it learned:** supervised fine-tuning on {_dataset(config)}. The `{data.prompt_column}` "
                f"column is the prompt and `{data.response_column}` the response; only response tokens are trained "
                f"on, and rows are cut to {data.max_length} tokens. The test set is {test}.\n\n"
                f"**How its hyperparameters were found:** by evo-sft's evolutionary search. A population of "
                f"{config.population.size} members fine-tuned side by side, {self._interval()}; after each "
                f"generation every member was scored by "
                f"`{evolution.fitness}` on the same test rows, and the weaker ones were replaced by mutated copies of "
                f"stronger ones ({evolution.selection} selection). This member was exported after generation "
                f"{self.generation}.")

    def _interval(self) -> str:
        evolution = self.config.evolution
        if evolution.interval == "steps":
            return f"{evolution.steps_per_generation} optimizer steps each a generation"
        return (f"each on the same supervised tokens a generation (what {evolution.steps_per_generation} optimizer "
                f"steps of {self.config.agent.batch_size} rows hold on average, so a smaller batch took more steps)")

    def _results(self) -> str:
        scores, evaluation = self.scores, self.evaluation
        metric = build.fitness(self.config).metric
        if scores is None:
            last = self.schedule["generations"][-1]["fitness"]
            value = "not finite" if last is None else f"{build.fitness(self.config).shown(last):.4f}"
            return (f"## Results\n\n`{metric}` after generation {self.generation}: {value} (the fitness the run "
                    "kept in its checkpoint; the run did not end at this generation, so no other score was kept).")
        every = evaluation["test_rows"]
        rows = [(f"{metric} (the fitness)", scores["metric_value"], evaluation["scored_rows"])]
        if metric != "test_loss":
            rows.append(("test_loss", scores["test_loss"], every))
        table = ["| metric | value | test rows | what it measures |", "|---|---|---|---|"]
        for name, value, count in rows:
            base = name.split(" ")[0]
            table.append(f"| {name} | {_number(value)} | {count}{' (all)' if count == every else ''} | "
                         f"{METRIC_MEANINGS.get(base, f'`{self.config.evolution.fitness}`, higher is better')} |")
        text = (f"## Results\n\nScored by the run after generation {evaluation['generation']}"
                + (" on the whole test set" if evaluation["full_test"] else "") + ":\n\n" + "\n".join(table))
        if scores["samples"]:
            text += "\n\nIts greedy outputs on the first test prompts:\n\n| prompt | reference | output |\n|---|---|---|\n"
            text += "\n".join(f"| {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(s['output'])} |"
                              for s in scores["samples"])
        return text

    def _hyperparameters(self) -> str:
        entries = self.schedule["generations"]
        names = table_columns(self.schedule, list(self.config.evolution.hyperparameters))
        fitness = build.fitness(self.config)
        lines = ["| generation | member | steps | " + " | ".join(names) + f" | {fitness.metric} |",
                 "|---" * (len(names) + 4) + "|"]
        for entry in entries:
            value = "-" if entry["fitness"] is None else f"{fitness.shown(entry['fitness']):.4f}"
            lines.append(f"| {entry['generation']} | {entry['member_id']} | {_text(entry.get('batches'))} | "
                         + " | ".join(shown(entry["hyperparameters"][n]) for n in names) + f" | {value} |")
        held = {n: entries[0]["hyperparameters"][n] for n in _declared(self.schedule) if n not in names}
        text = ("## Hyperparameters, generation by generation\n\nThe member of its line that trained in each "
                "generation (an ancestor, until the generation its child was born in), the optimizer steps it took, "
                f"the hyperparameters it trained with, and its `{fitness.metric}` at the end of the generation "
                f"(`{SOURCES}/schedule.json`):\n\n" + "\n".join(lines))
        if held:
            text += "\n\nThe same in every generation: " + ", ".join(f"{n} {shown(v)}" for n, v in held.items()) + "."
        return text

    def _lineage(self) -> str:
        steps = []
        for member in self.ancestry:
            if member["parent_id"] is None:
                steps.append(f"1. member {member['id']}: a founder, in slot {member['slot']}")
            else:
                change = "not mutated" if member["mutation"] == "none" else f"mutated: {member['mutation']}"
                steps.append(f"1. member {member['id']}: a copy of member {member['parent_id']} made after "
                             f"generation {member['generation_born'] - 1}, {change}")
        return "## Lineage\n\nFrom its founder to this member:\n\n" + "\n".join(steps)

    def _loading(self) -> str:
        base = build.base_model_path(self.config, self.run_dir)
        if self.form == "adapter":
            code = ("import torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                    f"AutoTokenizer\n\nbase = AutoModelForCausalLM.from_pretrained({base!r}, "
                    f"dtype=torch.{self.config.model.dtype})\nmodel = PeftModel.from_pretrained(base, \"PATH\")  "
                    "# this folder\ntokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
            note = "PEFT applies the adapter to the base model"
            if not is_hub_id(self.base):
                note += f" (the base is a local folder, `{base}`)"
            note += "; `model.merge_and_unload()` makes it one plain model."
        else:
            code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                    "model = AutoModelForCausalLM.from_pretrained(\"PATH\")  # this folder\n"
                    "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
            note = "A plain transformers model: no PEFT needed."
        if self.chat_template:
            code += ("\n\nmessages = [{\"role\": \"user\", \"content\": \"PROMPT\"}]\n"
                     "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,\n"
                     "                                       return_tensors=\"pt\", return_dict=True)")
        else:
            code += "\n\ninputs = tokenizer(\"PROMPT\", return_tensors=\"pt\")"
        code += ("\noutput = model.generate(**inputs, do_sample=False, max_new_tokens="
                 f"{self.config.evolution.fitness_options.max_new_tokens})\n"
                 "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
        text = f"## How to load it\n\n{note}\n\n```python\n{code}\n```"
        if self.registered_as:
            text += (f"\n\nIt is registered in the MLflow Model Registry as `{self.registered_as}` (at "
                     f"`{self.tracking.get('tracking_uri')}`), where it loads as a pyfunc model that answers a list "
                     "of prompts with greedy responses:\n\n```python\nimport mlflow\n\n"
                     f"model = mlflow.pyfunc.load_model(\"models:/{self.registered_as}/VERSION\")\n"
                     "model.predict([\"...\"])\n```")
        return text

    def _reproducing(self) -> str:
        config = self.config
        return (f"## How to reproduce it\n\n```bash\n"
                f"# the whole evolution again, from the config it ran with (seed {config.seed})\n"
                f"evo-sft run {SOURCES}/config.yaml --run-dir runs/{config.name}-again\n"
                f"# this member's line retrained alone, in the run's folder; fitness compared generation by generation\n"
                f"evo-sft replay {self.run_dir} --schedule {SOURCES}/schedule.json\n```\n\n"
                f"On the same hardware the evolution decides alike (every decision comes from seeded generators) "
                "and the replay matches the run's fitness (exactly on the CPU).")

    def _provenance(self) -> str:
        tracking = self.tracking
        lines = [f"- run folder: `{self.run_dir}`, checkpoint of generation {self.generation}"]
        if tracking.get("parent_run_id"):
            lines.append(f"- MLflow: `{tracking['tracking_uri']}`, experiment {tracking.get('experiment_id')}, "
                         f"evolution run `{tracking['parent_run_id']}`, member run `{tracking.get('member_run_id')}`")
        elif tracking.get("tracking_uri"):
            lines.append(f"- MLflow: `{tracking['tracking_uri']}` (unreachable while the run went on: its records "
                         "were queued, so its run ids were not known yet)")
        return "## Where it came from\n\n" + "\n".join(lines)


def card_for(config: ExperimentConfig, run_dir: Path, lineage: Lineage, schedule: dict, generation: int, form: str,
             evaluation: dict | None, tracking: dict, chat_template: bool, registered_as: str | None = None) -> ModelCard:
    """The card of the member whose line `schedule` is (evo_sft.evolution.schedule), exported after
    `generation`; `tracking` is the tracker's state (`MLflowTracker.state_dict()`)."""
    member_id = schedule["member_id"]
    ancestry = [lineage.members[m].to_dict() for m in reversed(lineage.ancestry(member_id))]
    ids = {"tracking_uri": tracking.get("tracking_uri"), "experiment_id": tracking.get("experiment_id"),
           "parent_run_id": tracking.get("parent_run_id"),
           "member_run_id": tracking.get("member_runs", {}).get(str(member_id))}
    return ModelCard(config, Path(run_dir), member_id, generation, form, schedule, ancestry, evaluation, ids,
                     chat_template, registered_as)


def write_card(folder: Path, card: ModelCard) -> None:
    """README.md, `evo-sft/config.yaml` and `evo-sft/schedule.json` into the export `folder`."""
    (folder / CARD_FILE).write_text(card.text(), encoding="utf-8")
    (folder / SOURCES).mkdir(exist_ok=True)
    (folder / SOURCES / "config.yaml").write_text(yaml.safe_dump(card.config.to_dict(), sort_keys=False))
    save_json(folder / SOURCES / "schedule.json", card.schedule)


def table_columns(schedule: dict, searched: list[str]) -> list[str]:
    """The hyperparameters the table shows: those searched (in the search space's order), then any
    other that changed along the line."""
    entries = schedule["generations"]
    names = _declared(schedule)
    changed = [n for n in names if n not in searched and len({repr(e["hyperparameters"][n]) for e in entries}) > 1]
    return [n for n in searched if n in names] + changed


def _declared(schedule: dict) -> list[str]:
    """The line's hyperparameters in the order evo_sft.hyperparameters declares them (the card reads
    the same whether the lineage is the live one or one loaded from a checkpoint)."""
    return [n for n in HYPERPARAMETERS if n in schedule["generations"][0]["hyperparameters"]]


def _model(name: str) -> str:
    if name == "demo":
        return "evo-sft's built-in demo model (a tiny Llama-shaped model built from a config)"
    return f"[`{name}`](https://huggingface.co/{name})" if is_hub_id(name) else f"the model in `{name}`"


def _dataset(config: ExperimentConfig) -> str:
    source = config.data.source
    if source == "demo":
        return f"evo-sft's built-in demo task (reverse a word; {config.data.num_rows} rows)"
    if is_hub_id(source):
        return f"[`{source}`](https://huggingface.co/datasets/{source}) (split `{config.data.train_split}`)"
    return f"`{source}`"


def _listed(modules) -> list[str]:
    return [modules] if isinstance(modules, str) else list(modules)


def _share(test_size) -> str:
    return f"{test_size:.0%}" if isinstance(test_size, float) else f"{test_size} rows"


def _number(value) -> str:
    return "not finite" if value is None else f"{value:.4f}"


def _text(value) -> str:
    return "" if value is None else str(value)


def _cell(text: str) -> str:
    """Text in a markdown table cell: one line, pipes escaped, in code so spaces show."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")
    return f"`{text}`" if text and "`" not in text else text or "(empty)"
