"""The winner, ready to ship (issue 31), through the command line as a user runs it, against a real
`mlflow server` on 127.0.0.1:

- a small demo run that tracks to the server with `tracking.register_model` set; its best member is
  a version of that registered model at the end, tagged and described by its model card, and loads
  back through `mlflow.pyfunc.load_model` to the run's greedy outputs (samples/final.json) and to
  base + adapter's logits; the registered files hold no pickle;
- `export --merged`: loads with AutoModelForCausalLM in a process where peft cannot be imported,
  computes base + adapter's logits (float32, 1e-5) and the run's greedy outputs, and so does the
  card's own "How to load it" code;
- every export's card: front matter a hub reads, the run's scores, the schedule table as
  RUN/schedule.json has it;
- `export --register` of an existing run, once (the same export registered twice is one version);
- a run without LoRA exports its whole model; `--merged` there, an OUT that is not empty, a name
  MLflow refuses and a server that is down are one line each, exit code 2, nothing left behind;
- a registration made while the server is down waits in the run's queue and is sent on resume;
- the Models page and the version's page in headless Chromium, screenshots under tests/artifacts/.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.browser import assert_real_screenshot, browser_page, fresh_screenshots
from tests.helpers.mlflow_server import MLflowServer
from tests.helpers.paths import DEMO, EVO_SFT, REPO
from tests.helpers.processes import subprocess_env

NAME = "demo-reverser"
# two members, two generations of 15 steps, both founders at a high learning rate: outputs that are not empty
RUN_SETTINGS = ["population.backend=local", "population.size=2", "data.num_rows=200", "evolution.generations=2",
                "evolution.steps_per_generation=15", "agent.lr=0.01", "evolution.founders=config"]
TINY_SETTINGS = ["population.backend=local", "population.size=2", "data.num_rows=100", "evolution.generations=1",
                 "evolution.steps_per_generation=2"]
PROBE = "<|im_start|>user\nreverse: abcde<|im_end|>\n<|im_start|>assistant\nedcba<|im_end|>\n"
RUN_TIMEOUT_S = 600


def evo(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVO_SFT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env(RAY_AUTH_MODE="disabled", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0"),
                          timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    return result


def settings(*pairs: str) -> list[str]:
    return [x for pair in pairs for x in ("--set", pair)]


# ----------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    server = MLflowServer(folder).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run(tmp_path_factory, server) -> dict:
    """The run, its summary's best member, its samples (samples/final.json) and its MLflow parent run."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = ok(evo("run", DEMO, "--run-dir", run_dir,
                    *settings(*RUN_SETTINGS, f"tracking.uri={server.uri}", f"tracking.register_model={NAME}"),
                    timeout=RUN_TIMEOUT_S))
    best = int(re.search(r"^best member: (\d+)", result.stdout, re.M).group(1))
    assert f"MLflow model:    '{NAME}', a new version from member {best} ({server.uri}/#/models/{NAME})" in result.stdout
    status = json.loads(ok(evo("status", run_dir, "--json")).stdout)
    parent_run_id = status["mlflow"]["parent_run_id"]
    samples = json.loads(Path(MlflowClient(server.uri).download_artifacts(
        parent_run_id, "samples/final.json", str(run_dir.parent))).read_text())
    assert samples["member_id"] == best == status["best_member"]
    assert any(sample["output"] for sample in samples["samples"]), "the test needs outputs that say something"
    return {"dir": run_dir, "best": best, "samples": samples["samples"], "parent_run_id": parent_run_id,
            "stdout": result.stdout}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A run without LoRA (lora: null): its members are whole models."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    ok(evo("run", DEMO, "--run-dir", run_dir, *settings(*TINY_SETTINGS, "lora=null"), timeout=RUN_TIMEOUT_S))
    return run_dir


def _base(run_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "base_model", dtype=torch.float32)


def _logits(model, input_ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _probe_ids(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return torch.tensor([AutoTokenizer.from_pretrained(folder).encode(PROBE)])


def base_plus_adapter_logits(run: dict) -> torch.Tensor:
    from peft import PeftModel

    adapter = run["dir"] / "best_adapter"
    return _logits(PeftModel.from_pretrained(_base(run["dir"]), adapter), _probe_ids(adapter))


def card_parts(readme: Path) -> tuple[dict, str]:
    match = re.fullmatch(r"---\n(.*?)\n---\n\n(.*)", readme.read_text(encoding="utf-8"), re.S)
    assert match, readme
    return yaml.safe_load(match.group(1)), match.group(2)


def loading_code(body: str, folder: Path, prompt: str) -> str:
    """The card's "How to load it" code, pointed at `folder` and asked `prompt`."""
    code = re.search(r"## How to load it\n.*?```python\n(.*?)```", body, re.S).group(1)
    return code.replace('"PATH"', repr(str(folder))).replace('"PROMPT"', repr(prompt))


# ----------------------------------------------------------------------- merged
WITHOUT_PEFT = '''
import json, sys
sys.modules["peft"] = None  # importing peft raises ImportError from here on
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, probe, prompts, max_new_tokens, card_code = json.loads(sys.argv[1])
try:
    import peft
    raise SystemExit("peft could be imported")
except ImportError:
    pass
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
model.eval()
stops = model.generation_config.eos_token_id
outputs = []
with torch.no_grad():
    logits = model(input_ids=torch.tensor([tokenizer.encode(probe)])).logits
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)[0, len(ids):].tolist()
        new = new[:next((i for i, token in enumerate(new) if token in stops), len(new))]
        outputs.append(tokenizer.decode(new, skip_special_tokens=False))
print(json.dumps({"dtype": str(model.dtype), "logits": logits.tolist(), "outputs": outputs}))
exec(card_code)
'''


def test_a_merged_export_loads_without_peft_and_computes_what_base_and_adapter_compute(run, tmp_path):
    out = tmp_path / "merged"
    result = ok(evo("export", run["dir"], out, "--merged"))
    assert f"member {run['best']} (generation 2) exported to {out} as a whole model" in result.stdout
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "evo-sft/config.yaml", "evo-sft/schedule.json"} <= files
    assert not any(name.startswith("adapter_") or name.endswith((".bin", ".pt", ".pkl")) for name in files), files
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [0, 2]  # eos, end of turn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "a staging folder was left"

    prompts = [sample["prompt"] for sample in run["samples"]]
    matter, body = card_parts(out / "README.md")
    code = loading_code(body, out, prompts[0])
    child = subprocess.run([sys.executable, "-c", WITHOUT_PEFT, json.dumps([str(out), PROBE, prompts, 10, code])],
                           capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    measured, card_output = child.stdout.split("\n", 1)
    measured = json.loads(measured)
    assert measured["dtype"] == "torch.float32"
    merged = torch.tensor(measured["logits"])
    expected = base_plus_adapter_logits(run)
    # float32 to 1e-5, relative where logits are large: merging rounds W + BA once per weight
    assert torch.allclose(merged, expected, atol=1e-5, rtol=1e-5)
    assert (merged - _logits(_base(run["dir"]), _probe_ids(out))).abs().max() > 1e-2, "the merge changed nothing"
    assert measured["outputs"] == [sample["output"] for sample in run["samples"]]
    assert card_output == run["samples"][0]["output"] + "\n"  # the card's own code, without PEFT, prints it
    assert matter["library_name"] == "transformers" and "evo-sft" in matter["tags"]


# ----------------------------------------------------------------------- the card
def test_every_export_has_a_card_with_the_runs_scores_and_schedule(run, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "adapter"
    ok(evo("export", run["dir"], out))
    matter, body = card_parts(out / "README.md")
    assert matter == {"library_name": "peft", "pipeline_tag": "text-generation",
                      "tags": ["evo-sft", "sft", "text-generation", "lora"]}  # the demo's base and data are no hub ids
    assert body.startswith(f"# demo: member {run['best']}, the best of an evo-sft evolution\n")

    metrics = MlflowClient(_server_uri(run)).get_run(run["parent_run_id"]).data.metrics
    results = _table(body, "| metric |")  # the run's scores of its best member on all 20 test rows
    assert [row[:3] for row in results] == [
        ["exact_match (the fitness)", f"{metrics['final_exact_match']:.4f}", "20 (all)"],
        ["test_loss", f"{metrics['final_test_loss']:.4f}", "20 (all)"]]
    shown = {"\n": "⏎", "|": "\\|"}  # a cell is one line
    assert _table(body, "| prompt |") == [[f"`{s[key].translate(str.maketrans(shown))}`" if s[key] else "(empty)"
                                           for key in ("prompt", "reference", "output")] for s in run["samples"]]

    schedule = json.loads((run["dir"] / "schedule.json").read_text())
    rows = _table(body, "| generation |")
    assert [row[:3] for row in rows] == [[str(e["generation"]), str(e["member_id"]), str(e["batches"])]
                                         for e in schedule["generations"]]
    assert [[float(row[3]), int(row[4]), float(row[5])] for row in rows] == [
        [pytest.approx(e["hyperparameters"]["lr"], rel=5e-3), e["hyperparameters"]["batch_size"],
         pytest.approx(e["fitness"], abs=5e-5)] for e in schedule["generations"]]
    assert json.loads((out / "evo-sft" / "schedule.json").read_text()) == schedule

    code = loading_code(body, out, run["samples"][0]["prompt"])
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                           timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    assert child.stdout == run["samples"][0]["output"] + "\n"


def _server_uri(run: dict) -> str:
    return yaml.safe_load((run["dir"] / "config.yaml").read_text())["tracking"]["uri"]


def _table(body: str, header_start: str) -> list[list[str]]:
    lines = body[body.index(header_start):].split("\n\n")[0].splitlines()[2:]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


# ----------------------------------------------------------------------- the registry
LOAD_FROM_MLFLOW = '''
import json, sys
import mlflow.pyfunc
import torch

model_uri, prompts, probe = json.loads(sys.argv[1])
model = mlflow.pyfunc.load_model(model_uri)
loaded = model.unwrap_python_model()
with torch.no_grad():
    logits = loaded.model(input_ids=torch.tensor([loaded.tokenizer.encode(probe)])).logits
print(json.dumps({"loader_module": model.metadata.flavors["python_function"]["loader_module"],
                  "outputs": model.predict(prompts), "logits": logits.tolist()}))
'''


def load_from_mlflow(server_uri: str, model_uri: str, prompts: list[str]) -> dict:
    """`mlflow.pyfunc.load_model(model_uri)` in a process of its own whose tracking URI is the
    server's: its greedy outputs for `prompts`, its logits on PROBE and its loader."""
    env = subprocess_env()
    env["MLFLOW_TRACKING_URI"] = server_uri
    child = subprocess.run([sys.executable, "-c", LOAD_FROM_MLFLOW, json.dumps([model_uri, prompts, PROBE])],
                           capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.splitlines()[-1])


def _version_files(uri: str, name: str, version: str, folder: Path) -> dict[str, bytes]:
    """The first two bytes of every file of the version, by path."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    source = MlflowClient(uri).get_model_version_download_uri(name, version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=uri))
    return {str(p.relative_to(local)): p.read_bytes()[:2] for p in local.rglob("*") if p.is_file()}


def assert_no_pickle(files: dict[str, bytes]) -> None:
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin", ".joblib"))], sorted(files)
    assert not [f for f, start in files.items() if start in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")]


def test_the_best_member_is_registered_at_the_end_of_the_run_and_loads_back(run, server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    (version,) = client.search_model_versions(f"name='{NAME}'")
    evaluation = json.loads((run["dir"] / "evaluation.json").read_text())
    best = next(m for m in evaluation["members"] if m["member_id"] == run["best"])
    member_run = next(r for r in client.search_runs([client.get_run(run["parent_run_id"]).info.experiment_id])
                      if r.data.tags.get("evo_sft.member_id") == str(run["best"]))
    assert version.version == "1" and version.run_id == run["parent_run_id"]
    assert version.source == (f"runs:/{run['parent_run_id']}/registered_models/"
                              f"member_{run['best']:05d}-generation_00002-adapter")
    assert {k: v for k, v in version.tags.items() if k.startswith("evo_sft.")} == {
        "evo_sft.member_id": str(run["best"]), "evo_sft.generation": "2", "evo_sft.form": "adapter",
        "evo_sft.run_dir": str(run["dir"]), "evo_sft.parent_member_id": member_run.data.tags["evo_sft.parent_member_id"],
        "evo_sft.fitness": str(best["fitness"]), "evo_sft.metric": "exact_match",
        "evo_sft.test_loss": str(best["test_loss"]), "evo_sft.parent_run_id": run["parent_run_id"],
        "evo_sft.member_run_id": member_run.info.run_id}
    assert version.description == card_parts(run["dir"] / "best_adapter" / "README.md")[1]

    files = _version_files(server.uri, NAME, "1", tmp_path)
    assert {"MLmodel", "mlflow_model.py", "artifacts/best_adapter/adapter_model.safetensors",
            "artifacts/best_adapter/README.md", "artifacts/base_model/model.safetensors"} <= set(files)
    assert_no_pickle(files)
    loaded = load_from_mlflow(server.uri, f"models:/{NAME}/1", [s["prompt"] for s in run["samples"]])
    assert loaded["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # our loader's source, not a pickle
    assert loaded["outputs"] == [s["output"] for s in run["samples"]]
    assert torch.allclose(torch.tensor(loaded["logits"]), base_plus_adapter_logits(run), atol=1e-5, rtol=0)


def test_export_registers_an_existing_runs_member_once(run, server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    result = ok(evo("export", run["dir"], tmp_path / "merged", "--merged", "--register", "demo-reverser-merged"))
    assert "registered in MLflow as 'demo-reverser-merged' version 1" in result.stdout
    (version,) = client.search_model_versions("name='demo-reverser-merged'")
    assert version.tags["evo_sft.form"] == "merged" and version.tags["evo_sft.member_id"] == str(run["best"])
    assert version.description == card_parts(tmp_path / "merged" / "README.md")[1]
    assert 'mlflow.pyfunc.load_model("models:/demo-reverser-merged/VERSION")' in version.description
    files = _version_files(server.uri, "demo-reverser-merged", "1", tmp_path / "download")
    assert "artifacts/merged/model.safetensors" in files and not any("base_model" in f for f in files)
    assert_no_pickle(files)
    loaded = load_from_mlflow(server.uri, "models:/demo-reverser-merged/1", [s["prompt"] for s in run["samples"]])
    assert loaded["outputs"] == [s["output"] for s in run["samples"]]
    assert torch.allclose(torch.tensor(loaded["logits"]), base_plus_adapter_logits(run), atol=1e-5, rtol=1e-5)

    # the export the run registered at its end (the same member, generation and form): no second version
    again = ok(evo("export", run["dir"], tmp_path / "adapter", "--register", NAME))
    assert f"registered in MLflow as '{NAME}' version 1" in again.stdout
    assert [v.version for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    # the card made from the checkpoint reads as the one the run wrote at its end
    assert (tmp_path / "adapter" / "README.md").read_text() == (run["dir"] / "best_adapter" / "README.md").read_text()


def test_a_run_without_lora_exports_its_whole_model(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from evo_sft import SFT

    out = tmp_path / "whole"
    result = ok(evo("export", full_run, out))
    member = int(re.search(r"member (\d+)", result.stdout).group(1))
    assert "as a whole model" in result.stdout and not (out / "adapter_config.json").exists()
    matter, body = card_parts(out / "README.md")
    assert matter["library_name"] == "transformers" and "lora" not in matter["tags"]
    assert "fine-tuned whole (every weight, no LoRA)" in body
    input_ids = _probe_ids(out)
    exported = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), input_ids)
    checkpoint = full_run / "checkpoints" / "generation_00001"
    slot_ids = json.loads((checkpoint / "controller.json").read_text())["controller"]["slot_ids"]
    agent = SFT.load(checkpoint / "members" / f"slot_{slot_ids.index(member)}")
    assert torch.allclose(exported, _logits(agent.actor, input_ids), atol=1e-5, rtol=0)
    assert (exported - _logits(_base(full_run), input_ids)).abs().max() > 1e-3
    # the run's own export of its best is the whole model too (it held only the tokenizer before)
    best = _logits(AutoModelForCausalLM.from_pretrained(full_run / "best_adapter", dtype=torch.float32), input_ids)
    assert torch.allclose(best, exported, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------- bad input
def _refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_merged_is_refused_for_a_run_without_lora(full_run, tmp_path):
    _refused(evo("export", full_run, tmp_path / "out", "--merged"),
             "--merged: ", "fine-tuned whole models (lora: null), so there is no adapter to merge")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_files_and_a_name_mlflow_refuses_are_refused_before_anything_is_written(run, server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    before = {m.name: len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()}
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(evo("export", run["dir"], out, "--merged"), f"{out} is not empty; pass --force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    _refused(evo("export", run["dir"], tmp_path / "new", "--register", "team/model"),
             "--register: MLflow refuses 'team/model' as a registered model name", "Names cannot contain '/' or ':'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {m.name: len(client.search_model_versions(f"name='{m.name}'"))
            for m in client.search_registered_models()} == before


def test_a_tracking_server_that_is_down_is_one_line_and_nothing_is_registered(run, server, tmp_path):
    from mlflow.tracking import MlflowClient

    server.stop()
    try:
        result = evo("export", run["dir"], tmp_path / "out", "--register", "while-down")
    finally:
        server.start()
    _refused(result, f"--register: MLflow at {server.uri} did not register 'while-down': ")
    assert list(tmp_path.iterdir()) == [], "OUT or a staging folder was left"
    assert MlflowClient(server.uri).search_registered_models(filter_string="name = 'while-down'") == []


def test_a_registration_made_while_mlflow_is_down_waits_in_the_queue_and_is_sent_on_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    from evo_sft.tracking.outbox import QUEUE_FILE

    (tmp_path / "server").mkdir()
    server = MLflowServer(tmp_path / "server")  # its port, nothing listening yet
    run_dir = tmp_path / "run"
    result = ok(evo("run", DEMO, "--run-dir", run_dir,
                    *settings(*TINY_SETTINGS, f"tracking.uri={server.uri}", "tracking.register_model=queued"),
                    timeout=RUN_TIMEOUT_S))
    best = int(re.search(r"^best member: (\d+)", result.stdout, re.M).group(1))
    assert f"MLflow model:    'queued', a new version from member {best} (queued until MLflow is reachable)" in \
        result.stdout
    assert f"the registration of member {best} as a version of 'queued' waits in" in result.stderr
    queue = [json.loads(line) for line in (run_dir / "tracking_queue" / QUEUE_FILE).read_text().splitlines()]
    (registration,) = [r for r in queue if r["kind"] == "register_model"]
    kept = run_dir / "tracking_queue" / registration["local_path"]
    assert (kept / "MLmodel").is_file() and (kept / "artifacts" / "best_adapter" / "adapter_model.safetensors").is_file()

    server.start()
    try:
        ok(evo("resume", run_dir, "--generations", "2", timeout=RUN_TIMEOUT_S))
        client = MlflowClient(server.uri)
        parent = json.loads(ok(evo("status", run_dir, "--json")).stdout)["mlflow"]["parent_run_id"]
        versions = sorted(client.search_model_versions("name='queued'"), key=lambda v: int(v.version))
        assert [(v.tags["evo_sft.generation"], v.run_id, v.tags["evo_sft.parent_run_id"]) for v in versions] == [
            ("1", parent, parent), ("2", parent, parent)]
        assert versions[0].tags["evo_sft.member_id"] == str(best)
        assert versions[0].tags["evo_sft.member_run_id"] != ""  # filled in when the record was sent
        assert not (run_dir / "tracking_queue" / QUEUE_FILE).exists()
    finally:
        server.stop()


# ----------------------------------------------------------------------- the browser
def test_the_models_page_and_the_versions_page_show_the_registered_member(run, server):
    from playwright.sync_api import expect

    from evo_sft.tracking.tracker import mlflow_models_page

    models_png, version_png, tags_png = fresh_screenshots("mlflow_registered_models.png", "mlflow_model_version.png",
                                                          "mlflow_model_version_tags.png")
    with browser_page() as page:
        page.goto(f"{server.uri}/#/models")
        # MLflow 3.17 shows its new registry UI's announcement over the page once
        promotion = page.get_by_role("dialog").filter(has_text="new Model Registry UI")
        page.add_locator_handler(promotion, lambda dialog: dialog.get_by_role("button", name="Close").click())
        link = page.get_by_role("link", name=NAME, exact=True)
        expect(link).to_be_visible()
        link.hover()
        expect(promotion).to_be_hidden()
        page.get_by_role("button", name="Close").click()  # the assistant's side panel, the one left to close
        expect(page.get_by_role("link", name="Version 1", exact=True).first).to_be_visible()
        page.screenshot(path=str(models_png), full_page=True)

        link.click()  # the registered model's page (the address the summary prints), then its version
        expect(page).to_have_url(re.compile(re.escape(mlflow_models_page(server.uri, NAME).split("#")[1]) + "$"))
        page.get_by_role("link", name="Version 1", exact=True).first.click()
        expect(page.get_by_role("heading", name=f"demo: member {run['best']}, the best of an evo-sft evolution")) \
            .to_be_visible()
        expect(page.get_by_role("link", name="run", exact=True)).to_be_visible()  # the source run, by its name
        page.screenshot(path=str(version_png))
        page.get_by_role("button", name="Tags").scroll_into_view_if_needed()
        for name, value in (("evo_sft.member_id", str(run["best"])), ("evo_sft.generation", "2"),
                            ("evo_sft.parent_run_id", run["parent_run_id"])):
            expect(page.get_by_role("row").filter(has_text=name)).to_contain_text(value)
        page.wait_for_timeout(500)
        page.screenshot(path=str(tags_png))
    for png in (models_png, version_png, tags_png):
        assert_real_screenshot(png)
