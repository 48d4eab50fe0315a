"""Evolution checkpoints and resume, through the `evo-sft` command line as a user runs it (issue 5),
on the shared small demo runs of tests/helpers/demo_runs.py:
  - a run of 4 generations, and a run of 2 generations resumed to 4, end identical
    (fitness to 1e-6, hyperparameters, lineage, random state, adapters, MLflow histories);
  - a controller killed with SIGKILL in the middle of generation 2 resumes to the end and
    matches the uninterrupted run;
  - a checkpoint damaged on purpose is reported by file name and resume falls back to the
    newest intact one, again matching the uninterrupted run;
  - `status --json` has exactly the documented shape; `export` writes a PEFT folder whose
    logits are those of the member's adapter in the checkpoint (loaded two other ways).
"""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evo_sft.run_folder import status_dict
from tests.helpers.demo_runs import GENERATIONS, UMASK, Runs, checkpoint, evo, tree_state
from tests.helpers.paths import REPO


def status_json(run_dir: Path) -> dict:
    return json.loads(evo("status", run_dir, "--json").stdout)


def controller_state(run_dir: Path, generation: int) -> dict:
    return json.loads((checkpoint(run_dir, generation) / "controller.json").read_text())["controller"]


def assert_same_status(a: dict, b: dict) -> None:
    assert a["generation"] == b["generation"]
    assert a["best_member"] == b["best_member"]
    assert [m["id"] for m in a["members"]] == [m["id"] for m in b["members"]]
    for x, y in zip(a["members"], b["members"]):
        assert (x["parent_id"], x["generation_born"]) == (y["parent_id"], y["generation_born"]), x["id"]
        assert x["hyperparameters"] == y["hyperparameters"], x["id"]
        assert x["fitness"] == pytest.approx(y["fitness"], abs=1e-6, rel=0), x["id"]


def assert_same_controller(a: dict, b: dict) -> None:
    """Generation, random generator state, lineage (members and every event) and fitness."""
    assert a["generation"] == b["generation"]
    assert a["slot_ids"] == b["slot_ids"]
    assert a["rng"] == b["rng"]
    assert a["lineage"] == b["lineage"]
    fa, fb = dict((m, h) for m, h in a["fitness"]), dict((m, h) for m, h in b["fitness"])
    assert fa.keys() == fb.keys()
    for member_id in fa:
        assert fa[member_id] == pytest.approx(fb[member_id], abs=1e-6, rel=0), member_id


def assert_same_adapters(a: Path, b: Path) -> None:
    """The members' adapters and optimizer states of two checkpoints agree to 1e-6."""
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in (a / "members").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in (b / "members").rglob("*.safetensors"))
    assert any(f.name == "adapter_model.safetensors" for f in files)
    for relative in files:
        ta, tb = load_file(a / relative), load_file(b / relative)
        assert ta.keys() == tb.keys(), relative
        for name in ta:
            assert torch.allclose(ta[name].float(), tb[name].float(), atol=1e-6, rtol=0), f"{relative}: {name}"


# ----------------------------------------------------------------------- runs shared by the tests
@pytest.fixture(scope="module")
def runs(demo_runs) -> Runs:
    return demo_runs


@pytest.fixture(scope="module")
def full_run(runs) -> Path:
    return runs.full


@pytest.fixture(scope="module")
def full_status(full_run) -> dict:
    return status_json(full_run)


@pytest.fixture(scope="module")
def split_status(runs) -> dict:
    return status_json(runs.split)


# ----------------------------------------------------------------------- resume equivalence
def test_two_then_resumed_to_four_equals_four_in_one_go(runs, full_run, full_status, split_status):
    split, resumed = runs.split, runs.split_resume
    assert "from generation_00002" in resumed.stdout
    assert "=== evo-sft summary ===" in resumed.stdout

    assert split_status["generation"] == GENERATIONS
    assert_same_status(split_status, full_status)
    # the evolution did something worth comparing: clones with parents, changed hyperparameters
    assert any(m["parent_id"] is not None for m in full_status["members"])
    assert len({json.dumps(m["hyperparameters"], sort_keys=True) for m in full_status["members"]}) > 1

    for generation in (3, GENERATIONS):  # keep=3: generations 2..4 are on disk in both runs
        assert_same_controller(controller_state(split, generation), controller_state(full_run, generation))
    assert_same_adapters(checkpoint(split, GENERATIONS), checkpoint(full_run, GENERATIONS))
    # checkpoint.keep (default 3): the oldest one was removed
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir() if not p.name.startswith(".")) == \
        ["generation_00002", "generation_00003", "generation_00004"]


def test_resume_reuses_the_parent_run_and_member_steps_continue(runs, full_run, full_status, split_status):
    from mlflow.tracking import MlflowClient

    split, status = runs.split, split_status
    split_runs, full_runs = _mlflow_runs(split), _mlflow_runs(full_run)
    client = MlflowClient(status["mlflow"]["tracking_uri"])

    parents = [r for r in split_runs if r.data.tags.get("evo_sft.role") == "evolution"]
    assert [p.info.run_id for p in parents] == [status["mlflow"]["parent_run_id"]], "resume must not start a new parent run"
    parent_id = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    history = client.get_metric_history(parent_id, "best_fitness")
    assert sorted(m.step for m in history) == list(range(1, GENERATIONS + 1))
    full_parent = next(r for r in full_runs if r.data.tags.get("evo_sft.role") == "evolution")
    assert_same_history(_history(client, parent_id, "best_fitness"),
                        _history(MlflowClient(full_status["mlflow"]["tracking_uri"]), full_parent.info.run_id, "best_fitness"))

    members = {r.data.tags["evo_sft.member_id"]: r for r in split_runs if r.data.tags.get("evo_sft.role") == "member"}
    full_members = {r.data.tags["evo_sft.member_id"]: r for r in full_runs if r.data.tags.get("evo_sft.role") == "member"}
    assert len(members) == len([r for r in split_runs if r.data.tags.get("evo_sft.role") == "member"]), \
        "a member has two MLflow runs"
    assert members.keys() == full_members.keys()
    full_client = MlflowClient(full_status["mlflow"]["tracking_uri"])
    spanning = 0
    for member_id, run in members.items():
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        parent_member = run.data.tags["evo_sft.parent_member_id"]
        if parent_member:
            assert run.data.tags["evo_sft.parent_run_id"] == members[parent_member].info.run_id
        steps = [step for step, _ in _history(client, run.info.run_id, "fitness")]
        assert steps == sorted(set(steps)), f"member {member_id}: repeated or unordered steps {steps}"
        assert_same_history(_history(client, run.info.run_id, "fitness"),
                            _history(full_client, full_members[member_id].info.run_id, "fitness"))
        born = int(run.data.tags["evo_sft.generation_born"])
        if born == 1 and len(steps) > 2:  # a founder scored before and after the resume, in one run
            spanning += 1
    assert spanning >= 1, "no member run carries its metric steps across the resume"


def _mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_same_history(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [step for step, _ in a] == [step for step, _ in b]
    assert [value for _, value in a] == pytest.approx([value for _, value in b], abs=1e-6, rel=0)


# ----------------------------------------------------------------------- killed controller
def test_controller_killed_mid_generation_resumes_to_the_end(runs, full_run):
    run_dir = runs.killed
    assert runs.killed_midway, "the controller was not killed in the middle of generation 2"
    assert runs.killed_run.returncode == -signal.SIGKILL

    resumed = runs.killed_resume
    assert "from generation_00001" in resumed.stdout
    assert "=== evo-sft summary ===" in resumed.stdout
    assert status_dict(run_dir)["generation"] == 3
    # exactly what the uninterrupted run had at generation 3
    assert_same_controller(controller_state(run_dir, 3), controller_state(full_run, 3))
    assert_same_adapters(checkpoint(run_dir, 3), checkpoint(full_run, 3))
    runs_ = _mlflow_runs(run_dir)
    assert len([r for r in runs_ if r.data.tags.get("evo_sft.role") == "evolution"]) == 1
    assert {r.info.status for r in runs_} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs_]
    members = [r.data.tags["evo_sft.member_id"] for r in runs_ if r.data.tags.get("evo_sft.role") == "member"]
    assert len(members) == len(set(members)), f"a member has two MLflow runs: {sorted(members)}"


def test_a_run_killed_before_its_first_checkpoint_says_how_to_start_again_and_does(runs):
    """Issue 20, item 3: killed after its first generation (checkpoint.every=2), a run has MLflow
    runs but no checkpoint. `resume` names the command that starts it again; that command takes
    the folder over: the earlier attempt's runs deleted (the RUNNING ones ended KILLED), one parent."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    run_dir, earlier = runs.stopped, runs.stopped_runs
    assert not runs.stopped_had_checkpoint, "the run was killed after its first checkpoint"
    resumed = runs.stopped_resume
    assert (resumed.returncode, resumed.stdout) == (1, "")
    command = f"evo-sft run {run_dir / 'config.yaml'} --run-dir {run_dir}"
    assert resumed.stderr == (f"error: no checkpoint yet in {run_dir}: the run stopped before its first one, "
                              f"written after 2 generations; start it again with `{command}`\n")

    again = runs.stopped_again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{run_dir} holds a run that stopped before its first checkpoint: starting it again" in again.stdout
    assert f"its {len(earlier)} MLflow runs are deleted (parent run {earlier['parent']})" in again.stderr
    assert status_dict(run_dir)["generation"] == 2
    runs_ = _mlflow_runs(run_dir)
    assert len([r for r in runs_ if r.data.tags.get("evo_sft.role") == "evolution"]) == 1
    assert {r.info.status for r in runs_} == {"FINISHED"}
    assert not set(earlier.values()) & {r.info.run_id for r in runs_}
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    deleted = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                                 run_view_type=ViewType.DELETED_ONLY, max_results=1000)
    assert {r.info.run_id for r in deleted} == set(earlier.values())
    assert client.get_run(earlier["parent"]).info.status == "KILLED"


def test_a_finished_run_that_kept_no_checkpoint_is_neither_taken_over_nor_resumed(runs):
    """One generation with checkpoint.every=2: the run finishes without a checkpoint. Starting
    it again in its folder must not take it over (deleting its MLflow runs)."""
    run_dir, again, resumed = runs.kept_none, runs.kept_none_again, runs.kept_none_resume
    assert (again.returncode, again.stdout) == (1, "")
    assert again.stderr == f"error: {run_dir} holds a finished run that kept no checkpoint; choose another --run-dir\n"
    assert (resumed.returncode, resumed.stdout) == (1, "")
    assert resumed.stderr == (f"error: {run_dir} holds a finished run that kept no checkpoint (checkpoint.every 2 "
                              "is more than its generations), so it cannot be resumed\n")
    assert runs.kept_none_untouched


# ----------------------------------------------------------------------- damaged checkpoint
def test_damaged_checkpoint_is_named_and_resume_falls_back(runs, full_run, full_status):
    status = runs.damaged_status
    assert json.loads(status.stdout)["generation"] == GENERATIONS - 1
    assert "generation_00004" in status.stderr and runs.damaged_file in status.stderr
    assert "falling back" in status.stderr

    resumed = runs.damaged_resume
    output = resumed.stdout + resumed.stderr
    assert runs.damaged_file in output and "falling back" in output
    assert "from generation_00003" in resumed.stdout
    assert_same_status(status_dict(runs.damaged), full_status)
    assert_same_controller(controller_state(runs.damaged, GENERATIONS), controller_state(full_run, GENERATIONS))


def test_no_intact_checkpoint_is_an_error_naming_the_files(tmp_path, full_run):
    run_dir = tmp_path / "all_damaged"
    shutil.copytree(full_run, run_dir, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "elites"))
    for path in (run_dir / "checkpoints").iterdir():
        (path / "controller.json").write_text("{}")
    result = evo("status", run_dir, "--json", check=False)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no intact checkpoint under ")
    for generation in (2, 3, 4):
        assert f"generation_{generation:05d}" in result.stderr
    assert "controller.json" in result.stderr and "no intact checkpoint" in result.stderr


# ----------------------------------------------------------------------- a run folder moves
def test_a_copied_or_moved_run_resumes_where_it_is_and_leaves_the_original_alone(tmp_path, full_run):
    """Issue 20, item 1: the MLflow store inside the run folder holds absolute artifact locations
    and config.yaml an absolute run_dir; a copy, then the copy renamed, resume in their own folder."""
    from mlflow.tracking import MlflowClient

    original = tree_state(full_run)
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy, symlinks=True)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    assert status_json(copy)["mlflow"]["tracking_uri"] == uri
    assert f"MLflow: {uri} " in evo("status", copy).stdout
    resumed = evo("resume", copy, "--generations", GENERATIONS + 1)
    assert tree_state(full_run) == original, "resuming the copy changed the original run folder"
    assert str(full_run) not in resumed.stdout + resumed.stderr

    moved = tmp_path / "moved"
    copy.rename(moved)  # nothing is at the copy's old path now: a write there would make it again
    evo("resume", moved, "--generations", GENERATIONS + 2)
    assert not copy.exists()
    assert tree_state(full_run) == original

    status = status_json(moved)
    assert status["generation"] == GENERATIONS + 2
    assert status["mlflow"]["tracking_uri"] == f"sqlite:///{moved / 'mlflow.db'}"
    client = MlflowClient(status["mlflow"]["tracking_uri"])
    root = (moved / "mlartifacts").as_uri()
    experiment = client.get_experiment(status["mlflow"]["experiment_id"])
    assert experiment.artifact_location == root
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert runs and all(run.info.artifact_uri.startswith(root + "/") for run in runs)
    parent = status["mlflow"]["parent_run_id"]
    assert [a.path for a in client.list_artifacts(parent, "elite")] == \
        [f"elite/generation_{g:05d}" for g in range(1, GENERATIONS + 3)]
    lineage = Path(client.download_artifacts(parent, "lineage.json", str(tmp_path)))
    assert json.loads(lineage.read_text()) == controller_state(moved, GENERATIONS + 2)["lineage"]


def test_resume_to_no_more_generations_says_so_and_starts_nothing(full_run):
    """Issue 20, item 15: `resume --generations N` with N at or below the run's generation started
    Ray, rewrote the run's outputs and exited 0 without a word. Now: one line, exit code 0 (the
    run has what was asked for), nothing written; the Ray backend shows no cluster was started."""
    from concurrent.futures import ThreadPoolExecutor

    before = tree_state(full_run)
    cases = [(["--generations", GENERATIONS], GENERATIONS, "--generations"),
             (["--generations", 2, "--set", "population.backend=ray"], 2, "--generations"),
             ([], GENERATIONS, "evolution.generations in its config")]
    with ThreadPoolExecutor(len(cases)) as pool:  # each spends seconds importing
        results = list(pool.map(lambda case: evo("resume", full_run, *case[0]), cases))
    for (args, wanted, source), result in zip(cases, results):
        assert result.stdout == (f"nothing to do: {full_run} is at generation {GENERATIONS}, and {wanted} generations "
                                 f"are asked for ({source}); to go on, ask for more, e.g. "
                                 f"`evo-sft resume {full_run} --generations {GENERATIONS + 1}`\n"), args
        assert "Traceback" not in result.stderr
    assert tree_state(full_run) == before


# ----------------------------------------------------------------------- status
def test_status_and_a_folder_that_holds_no_run_answer_without_torch_or_mlflow(full_run, tmp_path):
    """`evo-sft status` reads JSON and checks a manifest: it imports none of torch, transformers,
    MLflow or Ray (each second of import is paid on every call), and neither does a command given
    a folder that holds no run before it says so."""
    heavy = ("torch", "transformers", "peft", "mlflow", "ray")
    check = ("import sys; from evo_sft.cli import main; code = main(sys.argv[1:]); "
             f"print(sorted(set({heavy!r}) & set(sys.modules)), code)")
    for argv in (["status", full_run, "--json"], ["status", full_run], ["resume", tmp_path],
                 ["export", tmp_path, tmp_path / "out"], ["replay", tmp_path], ["ui", tmp_path]):
        result = subprocess.run([sys.executable, "-c", check, *map(str, argv)], capture_output=True, text=True,
                                cwd=REPO, timeout=60)
        assert result.stdout.splitlines()[-1] == f"[] {0 if argv[0] == 'status' else 2}", (argv, result.stdout[-500:],
                                                                                            result.stderr[-2000:])


def test_status_json_shape(full_run, full_status):
    from mlflow.tracking import MlflowClient

    status = full_status
    assert set(status) == {"generation", "best_member", "members", "mlflow"}
    assert type(status["generation"]) is int and status["generation"] == GENERATIONS
    assert len(status["members"]) == 4
    for member in status["members"]:
        assert set(member) == {"id", "parent_id", "generation_born", "hyperparameters", "fitness"}
        assert type(member["id"]) is int
        assert member["parent_id"] is None or type(member["parent_id"]) is int
        assert type(member["generation_born"]) is int
        assert set(member["hyperparameters"]) == {"lr", "batch_size", "max_grad_norm", "weight_decay", "warmup_steps",
                                                  "scheduler", "lora_r", "lora_alpha", "lora_dropout"}
        assert type(member["hyperparameters"]["lr"]) is float and type(member["hyperparameters"]["batch_size"]) is int
        assert len(member["fitness"]) == GENERATIONS and all(type(f) is float for f in member["fitness"])
    by_id = {m["id"]: m for m in status["members"]}
    assert status["best_member"] in by_id
    assert by_id[status["best_member"]]["fitness"][-1] == max(m["fitness"][-1] for m in status["members"])

    mlflow = status["mlflow"]
    assert set(mlflow) == {"tracking_uri", "experiment_id", "parent_run_id"}
    assert mlflow["tracking_uri"] == f"sqlite:///{full_run.resolve() / 'mlflow.db'}"
    client = MlflowClient(mlflow["tracking_uri"])
    assert client.get_experiment_by_name("demo").experiment_id == mlflow["experiment_id"]
    assert client.get_run(mlflow["parent_run_id"]).info.experiment_id == mlflow["experiment_id"]

    text = evo("status", full_run).stdout
    assert f"generation {GENERATIONS}" in text and f"best member {status['best_member']}" in text
    for member in status["members"]:
        assert any(line.split()[:1] == [str(member["id"])] for line in text.splitlines()), member["id"]
    assert mlflow["parent_run_id"] in text


# ----------------------------------------------------------------------- export
PROBE = "<|im_start|>user\nreverse: abcde<|im_end|>\n<|im_start|>assistant\nedcba<|im_end|>\n"


def _logits(model, input_ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _base(run_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "base_model", dtype=torch.float32)


@pytest.mark.parametrize("which", ["best", "other"])
def test_export_loads_with_peft_and_matches_the_checkpoint(tmp_path, full_run, full_status, which):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from evo_sft import SFT

    ids = [m["id"] for m in full_status["members"]]
    if which == "best":
        member, args = full_status["best_member"], []
    else:
        member = next(i for i in reversed(ids) if i != full_status["best_member"])
        args = ["--member", member]
    out = tmp_path / "exported"
    result = evo("export", full_run, out, *args)
    assert str(out) in result.stdout
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(out)
    input_ids = torch.tensor([tokenizer.encode(PROBE)])
    assert input_ids.tolist() == [AutoTokenizer.from_pretrained(full_run / "base_model").encode(PROBE)]
    exported = _logits(PeftModel.from_pretrained(_base(full_run), out), input_ids)

    slot_dir = checkpoint(full_run, GENERATIONS) / "members" / f"slot_{ids.index(member)}"
    from_checkpoint = _logits(PeftModel.from_pretrained(_base(full_run), slot_dir / "actor"), input_ids)
    agent = SFT.load(slot_dir)
    from_agent = _logits(agent.actor, input_ids)
    base = _logits(_base(full_run), input_ids)

    assert torch.allclose(exported, from_checkpoint, atol=1e-5, rtol=0)
    assert torch.allclose(exported, from_agent, atol=1e-5, rtol=0)
    assert (exported - base).abs().max() > 1e-2, "the exported adapter changes nothing"


def test_export_of_a_member_not_in_the_checkpoint_fails(tmp_path, full_run, full_status):
    missing = max(m["id"] for m in full_status["members"]) + 100
    result = evo("export", full_run, tmp_path / "nothing", "--member", missing, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"member {missing} is not in the latest checkpoint" in result.stderr
    assert not (tmp_path / "nothing").exists()


def test_export_refuses_a_folder_with_files_and_replaces_it_whole_with_force(tmp_path, full_run):
    """Issue 20, item 2: export wrote over whatever OUT held, old files staying beside the new."""
    def files(folder: Path) -> dict:
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    fresh = tmp_path / "fresh"
    fresh.mkdir()  # an empty folder is fine
    evo("export", full_run, fresh)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = evo("export", full_run, out, check=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == f"error: {out} is not empty; pass --force to replace it, or choose a new folder\n"
    assert files(out) == {"notes.txt": b"mine"}

    (out / "adapter_model.safetensors").write_bytes(b"an older export")
    forced = evo("export", full_run, out, "--force")
    assert str(out) in forced.stdout
    assert files(out) == files(fresh), "old files left beside the new ones"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"], "a staging folder was left"

    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    for args in ([], ["--force"]):
        result = evo("export", full_run, a_file, *args, check=False)
        assert (result.returncode, result.stderr) == (2, f"error: {a_file} is a file; export into a folder\n")
    assert a_file.read_text() == "mine"


def _modes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): oct(path.stat().st_mode & 0o777) for path in folder.rglob("*")
            if path.is_file()}


def test_every_file_of_a_run_and_of_an_export_has_the_mode_the_umask_gives(tmp_path, full_run):
    """Issue 30, item 4: safetensors files (adapters, optimizer states, the base model, MLflow's
    copies of the elites) were written 0o600 whatever the umask, so no one else could read them."""
    written = _modes(full_run)
    for folder in ("checkpoints/", "best_adapter/", "elites/", "base_model/", "mlartifacts/"):
        assert any(name.startswith(folder) and name.endswith(".safetensors") for name in written), folder
    assert {name: mode for name, mode in written.items() if mode != oct(0o666 & ~UMASK)} == {}
    for umask in (UMASK, 0o027):
        out = tmp_path / f"umask-{umask:o}"
        evo("export", full_run, out, umask=umask)
        exported = _modes(out)
        assert "adapter_model.safetensors" in exported
        assert set(exported.values()) == {oct(0o666 & ~umask)}, exported


def test_the_clones_and_the_best_members_hyperparameters_read_plainly(runs, full_run):
    """Issue 30, item 11: a clone that was not mutated read `(none)`, and the summary printed the
    best member's hyperparameters with binary noise (`'lr': 0.0014399999999999999`). Each line is
    compared whole with one built from the checkpoint's lineage."""
    import ast
    import re

    from evo_sft.evolution import Lineage

    stdout = runs.full_run.stdout
    lineage = Lineage.from_dict(controller_state(full_run, GENERATIONS)["lineage"])
    for generation in range(1, GENERATIONS + 1):  # each generation's table ends with the clones that opened it
        born = sorted((m for m in lineage.members.values() if m.parent_id is not None and m.generation_born == generation),
                      key=lambda m: m.slot)
        expected = "  clones: " + ", ".join(
            f"slot {m.slot} <- member {m.parent_id} ({'not mutated' if m.mutation == 'none' else m.mutation})"
            for m in born)
        end = f"generation {generation + 1}  " if generation < GENERATIONS else "=== evo-sft summary ==="
        table = stdout[stdout.index(f"generation {generation}  "):stdout.index(end)]
        assert [line for line in table.splitlines() if line.startswith("  clones: ")] == ([expected] if born else [])
    assert "(none)" not in stdout  # a clone that was not mutated (AgileRL's tournament): tests/population/test_progress.py

    line = next(line for line in stdout.splitlines() if line.startswith("best member: "))
    best, shown = re.fullmatch(r"best member: (\d+)  test_loss \d\.\d{4} on \d+ held-out test rows  "
                               r"hyperparameters (\{.*\})", line).groups()
    scored_with = lineage.hyperparameters_at(int(best), GENERATIONS)
    plain = {name: float(f"{value:.6g}") if isinstance(value, float) else value for name, value in scored_with.items()}
    assert ast.literal_eval(shown) == plain and not re.search(r"\d{12}", shown), shown  # no 0.0014399999999999999
    assert {name: value for name, value in ast.literal_eval(shown).items() if isinstance(value, float)} == \
        pytest.approx({name: value for name, value in scored_with.items() if isinstance(value, float)}, rel=1e-5)


def test_demo_tokenizer_round_trips_through_the_run_folder(full_run):
    from transformers import AutoTokenizer

    from evo_sft.data.sources import load_tokenizer

    for tokenizer in (load_tokenizer(str(full_run / "base_model")), AutoTokenizer.from_pretrained(full_run / "base_model")):
        assert tokenizer.decode(tokenizer.encode(PROBE)) == PROBE


def test_the_last_population_is_the_scored_one(full_run, full_status):
    """Every member `status` shows was trained and scored in the last generation with the
    hyperparameters it shows: its MLflow run has that fitness and lr at the last optimizer step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(full_status["mlflow"]["tracking_uri"])
    runs = {r.data.tags["evo_sft.member_id"]: r for r in _mlflow_runs(full_run) if r.data.tags.get("evo_sft.role") == "member"}
    for member in full_status["members"]:
        run_id = runs[str(member["id"])].info.run_id
        fitness = dict(_history(client, run_id, "fitness"))  # a point per generation, its ancestors' included
        assert len(fitness) == GENERATIONS
        last_step = max(fitness)  # each member's own: a generation trains members on the same tokens
        assert fitness[last_step] == pytest.approx(member["fitness"][-1], abs=1e-6)
        assert dict(_history(client, run_id, "lr"))[last_step] == pytest.approx(member["hyperparameters"]["lr"])
    best = max(full_status["members"], key=lambda m: m["fitness"][-1])
    assert full_status["best_member"] == best["id"]
