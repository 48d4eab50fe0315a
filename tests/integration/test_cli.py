"""The `evo-sft` command line as a user meets it, through a subprocess (issue 6):
`--dry-run`, every validation error (exit code 2, one line naming the key, nothing started),
every config in configs/, `--version`, help that describes every argument, argument mistakes in
one line, an empty config, and the demo end to end on a local Ray cluster."""
import argparse
import ast
import json
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.console import foreign_lines, on_a_terminal
from tests.helpers.paths import CONFIGS, DEMO, EVO_SFT, REPO
from tests.helpers.processes import path_without_the_venv, subprocess_env

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))
QUICK_TIMEOUT_S = 120


def evo(args, cwd: Path, timeout: float = QUICK_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(EVO_SFT), *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(RAY_AUTH_MODE="disabled"), cwd=cwd, timeout=timeout)


def _demo_with(old: str, new: str) -> str:
    text = DEMO.read_text()
    assert old in text
    return text.replace(old, new, 1)


# (case, config text or None for demo.yaml, extra args, key named, message fragment)
VALIDATION_ERRORS = [
    ("unknown-key-in-set", None, ["--set", "evolution.generatons=3"],
     "evolution.generatons", "did you mean 'evolution.generations'?"),
    ("unknown-key-in-file", _demo_with("population:", "populaton:"), [], "populaton", "did you mean 'population'?"),
    ("unknown-nested-key-in-file", _demo_with("lora_alpha: 32", "lora_alpah: 32"), [],
     "lora.lora_alpah", "did you mean 'lora.lora_alpha'?"),
    ("wrong-type-int", None, ["--set", "population.size=four"], "population.size", "expected int, got str 'four'"),
    ("wrong-type-float", None, ["--set", "agent.lr=fast"], "agent.lr", "expected float"),
    ("several-processes-on-a-shared-base", None,
     ["--set", "population.gpus_per_member=2", "--set", "population.members_per_actor=2"],
     "population.gpus_per_member", "cannot share a base model with other members"),
    ("wrong-type-choice", None, ["--set", "population.backend=rayy"], "population.backend", "did you mean 'ray'?"),
    ("impossible-lr-bounds", None, ["--set", "evolution.hyperparameters.lr.min=0.1"], "evolution.hyperparameters.lr", "min 0.1 > max 0.03"),
    ("impossible-batch-size-bounds", None, ["--set", "evolution.hyperparameters.batch_size.min=40"],
     "evolution.hyperparameters.batch_size", "min 40 > max 32"),
    ("bounds-without-a-micro-batch-multiple", None,
     ["--set", "evolution.hyperparameters.batch_size.min=9", "--set", "evolution.hyperparameters.batch_size.max=15"],
     "evolution.hyperparameters.batch_size", "no multiple of agent.micro_batch_size_per_gpu 8"),
    ("start-lr-outside-bounds", None, ["--set", "agent.lr=0.5"], "agent.lr", "outside evolution.hyperparameters.lr"),
    ("zero-generations", None, ["--set", "evolution.generations=0"], "evolution.generations", "must be >= 1, got 0"),
    ("tournament-larger-than-population", None, ["--set", "evolution.tournament_size=5"],
     "evolution.tournament_size", "5 exceeds population.size 4"),
    ("batch-size-not-divisible-by-micro-batch", None, ["--set", "agent.batch_size=12"],
     "agent.batch_size", "12 is not divisible by agent.micro_batch_size_per_gpu 8"),
    ("malformed-set", None, ["--set", "population.size"], "population.size", "expected dotted.key=value"),
    ("hyperparameter-without-bounds-or-choices", None, ["--set", "evolution.hyperparameters.lora_alpha={}"],
     "evolution.hyperparameters.lora_alpha.min", "give min and max, or choices"),
    ("rank-the-model-cannot-take", None, ["--set", "evolution.hyperparameters.lora_r.choices=[0, 16]"],
     "evolution.hyperparameters.lora_r.choices[0]", "must be >= 1, got 0"),
    ("lora-setting-with-full-fine-tuning", None,
     ["--set", "lora=null", "--set", "evolution.hyperparameters.lora_r.choices=[8, 16]"],
     "evolution.hyperparameters.lora_r", "lora is null (full fine-tuning)"),
    ("lora-dropout-stepped-together", None,
     ["--set", "population.step_together=true", "--set", "evolution.hyperparameters.lora_dropout={min: 0.0, max: 0.1}"],
     "evolution.hyperparameters.lora_dropout", "members stepped together"),
    ("scheduler-without-choices", None, ["--set", "evolution.hyperparameters.scheduler={min: 0, max: 1}"],
     "evolution.hyperparameters.scheduler", "give choices"),
    ("unloadable-fitness-function", None, ["--set", "evolution.fitness=no_such_module_here:score"],
     "evolution.fitness", "cannot load fitness function 'no_such_module_here:score'"),
    ("missing-config-file", "", [], "missing.yaml", "cannot read the config"),
    ("registered-model-name-mlflow-refuses", None, ["--set", "tracking.register_model=team/model"],
     "tracking.register_model", "MLflow refuses 'team/model' as a registered model name: Invalid model name "
                                "'team/model'. Names cannot contain '/' or ':'."),
]

DRY_RUN_OVERRIDES = ["--set", "population.size=8", "--set", "evolution.generations=3",
                     "--set", "evolution.hyperparameters.lr.max=0.05"]


NOT_A_RUN_COMMANDS = [("resume",), ("status",), ("export", "exported"), ("replay",)]


def _quick_commands(root: Path) -> dict:
    """name -> (argv, cwd): every short command of this module. Each runs in its own empty
    folder, so "nothing started" can be checked as "nothing written"."""
    commands = {}
    for case, text, extra, _, _ in VALIDATION_ERRORS:
        cwd = root / case
        cwd.mkdir()
        config = DEMO
        if case == "missing-config-file":
            config = cwd / "missing.yaml"
        elif text is not None:
            config = cwd / "experiment.yaml"
            config.write_text(text)
        commands[case] = (["run", config, "--run-dir", cwd / "run", *extra], cwd)
    cwd = root / "submit-validates-first"
    cwd.mkdir()
    commands[cwd.name] = (["submit", DEMO, "--address", "http://127.0.0.1:9", "--run-dir", cwd / "run",
                           "--set", "evolution.tournament_size=5"], cwd)
    for name, args in (("dry-run", ["--run-dir", root / "dry-run" / "run", *DRY_RUN_OVERRIDES]),
                       ("dry-run-default-run-dir", [])):
        (root / name).mkdir()
        commands[name] = (["run", DEMO, "--dry-run", *args], root / name)
    for config in CONFIG_FILES:
        cwd = root / f"config-{config.stem}"
        cwd.mkdir()
        commands[cwd.name] = (["run", config, "--dry-run"], cwd)
    for name, argv in (("help", ["--help"]),
                       ("member-not-a-number", ["export", "run", "out", "--member", "abc"]),
                       ("no-config", ["run"]), ("empty-config", ["run", "empty.yaml", "--dry-run"])):
        (root / name).mkdir()
        commands[name] = (argv, root / name)
    (root / "empty-config" / "empty.yaml").write_text("# nothing set yet\n")
    for command in NOT_A_RUN_COMMANDS:
        for what in ("missing", "not-a-run"):
            cwd = root / f"{command[0]}-{what}"
            (cwd / "folder").mkdir(parents=True)
            (cwd / "folder" / "notes.txt").write_text("not a run")
            commands[cwd.name] = ([command[0], cwd / ("nowhere" if what == "missing" else "folder"), *command[1:]],
                                  cwd)
    return commands


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """Run the module's short commands three at a time (each spends ~2 s importing)."""
    root = tmp_path_factory.mktemp("cli")
    commands = _quick_commands(root)
    before = {name: sorted(p.name for p in cwd.iterdir()) for name, (_, cwd) in commands.items()}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(evo, argv, cwd) for name, (argv, cwd) in commands.items()}
        results = {name: future.result() for name, future in futures.items()}
    return {name: (results[name], commands[name][1], before[name]) for name in commands}


# ----------------------------------------------------------------------- validation
@pytest.mark.parametrize("case, key, fragment", [(c, k, f) for c, _, _, k, f in VALIDATION_ERRORS] +
                         [("submit-validates-first", "evolution.tournament_size", "5 exceeds population.size 4")],
                         ids=[c for c, *_ in VALIDATION_ERRORS] + ["submit-validates-first"])
def test_validation_error_is_one_line_naming_the_key_with_exit_code_2(quick, case, key, fragment):
    result, cwd, before = quick[case]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and key in lines[0] and fragment in lines[0], lines[0]
    # nothing started: no run folder, nothing written where the command ran
    assert not (cwd / "run").exists()
    assert sorted(p.name for p in cwd.iterdir()) == before


# ----------------------------------------------------------------------- the command line itself (issue 20, item 16)
def test_version():
    from importlib.metadata import version

    result = evo(["--version"], cwd=REPO)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"evo-sft {version('evo-sft')}\n", "")


@pytest.mark.parametrize("case, message", [
    ("member-not-a-number", "error: argument --member: expected a member id (an integer) or 'best', got 'abc' "
                            "(see `evo-sft export --help`)"),
    ("no-config", "error: the following arguments are required: CONFIG (see `evo-sft run --help`)"),
])
def test_argument_mistakes_are_one_line_with_exit_code_2(quick, case, message):
    result, cwd, before = quick[case]
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")
    assert sorted(p.name for p in cwd.iterdir()) == before


@pytest.mark.parametrize("command", [c[0] for c in NOT_A_RUN_COMMANDS])
def test_a_run_folder_that_is_missing_or_holds_no_run_is_a_mistake_with_exit_code_2(quick, command):
    """Issue 30, item 9: `resume` of a folder that holds no run exited 1, and called a folder
    that does not exist one that holds no run."""
    for what, message in (("missing", "{folder} is missing: there is no such folder"),
                          ("not-a-run", "{folder} holds no evo-sft run (no config.yaml); start one with `evo-sft run`")):
        result, cwd, before = quick[f"{command}-{what}"]
        folder = cwd / ("nowhere" if what == "missing" else "folder")
        assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {message.format(folder=folder)}\n")
        assert sorted(p.name for p in cwd.iterdir()) == before
        assert [p.name for p in (cwd / "folder").iterdir()] == ["notes.txt"]


def test_every_argument_is_described_and_every_option_says_its_default(quick):
    from evo_sft.cli import parser

    def commands(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for cmd in action.choices.values():
                    yield from commands(cmd)

    undescribed = []
    for cmd in commands(parser()):
        assert cmd.description, cmd.prog
        for action in cmd._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            says_default = "(default: " in (action.help or "") or action.required and "(required)" in action.help
            if not action.help or (action.option_strings and not says_default):
                undescribed.append(f"{cmd.prog} {'/'.join(action.option_strings) or action.dest}")
    assert undescribed == []
    result, _, _ = quick["help"]
    assert result.returncode == 0 and "--version" in result.stdout
    for name in ("run", "resume", "status", "export", "ui", "submit", "logs", "stop"):
        assert re.search(rf"^\s+{name}\s+\S", result.stdout, re.M), name


def test_an_empty_config_runs_the_defaults_and_says_so(quick):
    from evo_sft.config import ExperimentConfig

    result, cwd, _ = quick["empty-config"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == "empty.yaml is empty: running the defaults (experiment 'evo-sft')\n"
    assert _split_dry_run(result.stdout)[0] == ExperimentConfig().to_dict()


# ----------------------------------------------------------------------- dry run
def _split_dry_run(stdout: str) -> tuple[dict, str]:
    *config_lines, resources = stdout.rstrip("\n").split("\n")
    return yaml.safe_load("\n".join(config_lines)), resources


def test_dry_run_prints_the_resolved_config_and_resources_and_starts_nothing(quick):
    from evo_sft.config import load_config

    result, cwd, before = quick["dry-run"]
    assert result.returncode == 0, result.stderr
    printed, resources = _split_dry_run(result.stdout)
    expected = load_config(DEMO, [s for s in DRY_RUN_OVERRIDES if s != "--set"])
    expected.run_dir = str(cwd / "run")
    assert printed == expected.to_dict()
    assert printed["population"]["size"] == 8 and printed["evolution"]["generations"] == 3
    assert printed["evolution"]["hyperparameters"]["lr"]["max"] == 0.05
    assert printed["lora"]["target_modules"] == yaml.safe_load(DEMO.read_text())["lora"]["target_modules"]
    assert resources == ("population: 8 members on the 'ray' backend, 2 per base model; 4 actors, each 0.5 CPU "
                         "and 0 GPU -> 2 CPUs, 0 GPUs in all; 3 generations x 150 steps; ray: local cluster")
    assert not (cwd / "run").exists() and sorted(p.name for p in cwd.iterdir()) == before


def test_dry_run_without_run_dir_creates_no_runs_folder(quick):
    result, cwd, before = quick["dry-run-default-run-dir"]
    assert result.returncode == 0, result.stderr
    printed, _ = _split_dry_run(result.stdout)
    assert printed["name"] == "demo" and printed["run_dir"] is None
    assert sorted(p.name for p in cwd.iterdir()) == before == []


@pytest.mark.parametrize("config", CONFIG_FILES, ids=[c.name for c in CONFIG_FILES])
def test_every_experiment_config_validates_with_dry_run(quick, config):
    result, cwd, before = quick[f"config-{config.stem}"]
    assert result.returncode == 0, result.stderr
    printed, resources = _split_dry_run(result.stdout)
    assert printed["name"] and resources.startswith(f"population: {printed['population']['size']} members")
    assert sorted(p.name for p in cwd.iterdir()) == before


def test_experiments_include_the_documented_qwen_setups():
    from evo_sft.config import load_config

    for stem, model in (("qwen2.5-3b", "Qwen/Qwen2.5-3B"), ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B")):
        config = load_config(CONFIGS / f"{stem}.yaml")
        assert config.model.name == model and config.model.dtype == "bfloat16"
        assert config.data.source == "HumanLLMs/Human-Like-DPO-Dataset"
        assert (config.data.prompt_column, config.data.response_column) == ("prompt", "chosen")
        assert (config.lora.r, config.lora.lora_alpha) == (16, 64)
        assert sorted(config.lora.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert config.population.size == 4 and config.population.backend == "ray"
        assert config.population.num_gpus > 0
    assert load_config(CONFIGS / "qwen2.5-3b.yaml").population.num_gpus == 1


def test_the_config_the_kuberay_job_runs_fits_its_gpu_worker():
    """docker/kuberay-rayjob.yaml runs configs/qwen2.5-0.5b.yaml on one worker group: every
    member must fit at once, or the sweep waits forever for actors that cannot be placed."""
    from evo_sft.config import load_config

    manifest = REPO / "docker" / "kuberay-rayjob.yaml"
    job = next(d for d in yaml.safe_load_all(manifest.read_text()) if d and d.get("kind") == "RayJob")
    config_path = re.search(r"/app/(configs/\S+\.yaml)", job["spec"]["entrypoint"]).group(1)
    population = load_config(REPO / config_path).population
    gpus = cpus = 0.0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
        cpus += group["replicas"] * float(limits["cpu"])
    actors = -(-population.size // population.members_per_actor)
    assert actors * population.num_gpus <= gpus
    assert actors * population.num_cpus <= cpus


# ----------------------------------------------------------------------- `make demo`, twice
def _fresh_clone(root: Path) -> Path:
    """What `make demo` reads in a fresh clone (the Makefile, pyproject.toml, configs/demo.yaml),
    its venv set up already: `.venv/.installed` newer than pyproject.toml, and `.venv/bin/evo-sft`
    this venv's (which runs this tree's evo_sft)."""
    clone = root / "clone"
    (clone / "configs").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "configs/demo.yaml"):
        shutil.copy2(REPO / name, clone / name)
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "evo-sft").symlink_to(EVO_SFT)
    (clone / ".venv" / ".installed").touch()
    return clone


def _make_demo(clone: Path, overrides: list[str], timeout: float, terminal: bool = False) -> tuple[Path, str, str]:
    """`make demo ARGS="OVERRIDES"` (on a pseudo-terminal with `terminal`): the run folder its
    summary names, what evo-sft printed on stdout (make's echo of the command checked and left
    out; on a terminal, every byte it wrote, with the terminal's line ends) and on stderr."""
    argv = ["make", "demo", *([f"ARGS={' '.join(overrides)}"] if overrides else [])]
    # as typed in a shell: not a sub-make of `make test` (which would announce its directories)
    env = subprocess_env(drop=("RAY_AUTH_MODE", "ARGS", "MAKELEVEL", "MAKEFLAGS", "MFLAGS"), PATH=path_without_the_venv())
    if terminal:
        stdout, stderr = on_a_terminal(argv, timeout=timeout, env=env, cwd=clone).decode(), ""
    else:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=clone, timeout=timeout, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        stdout, stderr = result.stdout, result.stderr
    echo, stdout = re.split(r"\r?\n", stdout, maxsplit=1)
    run_dir = Path(re.search(r"^run folder: +(\S+?)\r?$", stdout, re.M).group(1))
    assert run_dir.parent == clone / "runs", run_dir
    assert echo == " ".join([".venv/bin/evo-sft run configs/demo.yaml --run-dir", f"runs/{run_dir.name}", *overrides])
    return run_dir, stdout, stderr


def test_make_demo_runs_the_demo_in_a_new_folder_each_time():
    """Issue 30, item 1: the README's first command failed the second time it was typed (the
    folder held a run). `make demo` in a fresh clone, twice (the second time shrunk through ARGS,
    on a terminal): each run has its own folder, which its summary names, and the first is left as
    it was; the venv not active, the summary prints commands that can be typed as they are.

    The first is the demo as `make demo` runs it, on a local Ray cluster: it learns its task. The
    best member reverses most held-out words exactly (scored on all of them at the end), far more
    than any founder after the first generation; the summary prints its outputs beside the
    references. Every line of its output is evo-sft's own: no library warnings, progress bars or
    INFO logs."""
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo_sft.config import load_config

    generations = load_config(DEMO).evolution.generations
    root = Path(tempfile.mkdtemp(prefix="md", dir="/tmp"))  # Ray's socket paths stay short
    try:
        clone = _fresh_clone(root)
        run_dir, stdout, stderr = _make_demo(clone, [], timeout=900)
        output = stdout + stderr
        assert foreign_lines(output) == [], "library noise in the demo's output"
        assert any("MemberActor" in log.read_text(errors="replace") for log in (run_dir / "ray").rglob("worker-*.out")), \
            "the members did not run as Ray actors"
        summary = stdout[stdout.index("=== evo-sft summary ==="):]
        best = int(re.search(r"best member: (\d+)", summary).group(1))
        rate, rows = re.search(r"exact_match (\S+) on (\d+) held-out test rows", summary).groups()
        assert float(rate) >= 0.8 and int(rows) == 200, summary
        founders = re.search(r"founders' exact_match after the first generation: (.*)", summary).group(1).split()
        assert len(founders) == 4 and max(map(float, founders)) <= float(rate) - 0.5, summary
        samples = re.findall(r"prompt 'reverse: (\w+)'  reference '(\w+)'  output '(\w*)'", summary)
        assert len(samples) == 4 and all(reference == word[::-1] for word, reference, _ in samples)
        assert sum(output == reference for _, reference, output in samples) >= 3, summary
        assert re.search(r"^lineage: \d+", summary, re.M)
        last_table = stdout[stdout.index(f"generation {generations} "):stdout.index("=== evo-sft summary ===")]
        row = re.search(rf"^ [* ]\s*{best} +(\S+) +(\d+) ", last_table, re.M)
        scored_with = ast.literal_eval(re.search(r"hyperparameters (\{.*\})", summary).group(1))
        assert scored_with["batch_size"] == int(row.group(2)), "the summary shows other hyperparameters than were scored"
        assert scored_with["lr"] == pytest.approx(float(row.group(1)), rel=5e-3)
        assert len(re.search(r"fitness per generation.*: (.*)", summary).group(1).split()) == generations
        uri = f"sqlite:///{run_dir / 'mlflow.db'}"
        # the venv is not active: the commands are printed as they can be typed
        assert f"MLflow UI:       {EVO_SFT} ui {run_dir}  (serves this run's store, prints its address)" in summary
        assert str(run_dir / "best_adapter") in summary

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("demo")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if r.data.tags.get("evo_sft.role") == "evolution"]
        members = [r for r in runs if r.data.tags.get("evo_sft.role") == "member"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(members) >= 4
        assert {r.data.tags["mlflow.parentRunId"] for r in members} == {parents[0].info.run_id}
        best_fitness = sorted((m.step, m.value) for m in client.get_metric_history(parents[0].info.run_id, "best_fitness"))
        assert [step for step, _ in best_fitness] == list(range(1, generations + 1))
        assert best_fitness[-1][1] > best_fitness[0][1], "the best member did not improve"
        assert parents[0].data.metrics["final_exact_match"] == pytest.approx(float(rate), abs=1e-4)
        assert {f.path for f in client.list_artifacts(parents[0].info.run_id, "samples")} == \
            {f"samples/generation_{g:05d}.json" for g in range(1, generations + 1)} | {"samples/final.json"}
        founders = [r for r in members if r.data.tags["evo_sft.parent_member_id"] == ""]
        assert len(founders) == 4
        for founder in founders:
            assert {"fitness", "train_loss", "test_loss", "exact_match", "lr", "batch_size", "tokens_per_second"} <= \
                set(founder.data.metrics)

        # best_adapter: a PEFT folder with the tokenizer, equal to the best member's adapter in the checkpoint
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "best_adapter")
        input_ids = torch.tensor([tokenizer.encode("<|im_start|>user\nreverse: abcd<|im_end|>\n")])

        def logits(adapter: Path | None) -> torch.Tensor:
            model = AutoModelForCausalLM.from_pretrained(run_dir / "base_model", dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter)
            model.eval()
            with torch.no_grad():
                return model(input_ids=input_ids).logits

        last_checkpoint = run_dir / "checkpoints" / f"generation_{generations:05d}"
        slot_ids = json.loads((last_checkpoint / "controller.json").read_text())["controller"]["slot_ids"]
        in_checkpoint = last_checkpoint / "members" / f"slot_{slot_ids.index(best)}" / "actor"
        exported = logits(run_dir / "best_adapter")
        assert torch.allclose(exported, logits(in_checkpoint), atol=1e-5, rtol=0)
        assert (exported - logits(None)).abs().max() > 1e-2

        # the second `make demo`, shrunk, on a terminal: a new folder, the first one as it was, and
        # nothing on the terminal after the summary's last line (Ray's colorama wrote ESC[0m at exit)
        before = {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if "ray" not in p.parts}
        small = ["--set population.size=2", "--set evolution.tournament_size=2", "--set data.num_rows=60",
                 "--set evolution.generations=1", "--set evolution.steps_per_generation=1",
                 "--set evolution.fitness=test_loss", "--set evolution.fitness_options={}"]
        second, terminal, _ = _make_demo(clone, small, timeout=600, terminal=True)
        assert (run_dir.name, second.name) == ("demo-1", "demo-2")
        assert sorted(p.name for p in (clone / "runs").iterdir()) == ["demo-1", "demo-2"]
        assert (second / "best_adapter" / "adapter_model.safetensors").is_file()
        assert terminal.endswith(f"\r\nresume/extend:   {EVO_SFT} resume {second} --generations N\r\n"), terminal[-300:]
        assert {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
                if "ray" not in p.parts} == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------- a wider search
WIDE_SEARCH = ("evolution.hyperparameters={lr: {min: 1.0e-4, max: 3.0e-2}, lora_r: {choices: [8, 16, 32]}, "
               "lora_alpha: {min: 16, max: 64}, scheduler: {choices: [constant, cosine, linear]}, "
               "warmup_steps: {min: 0, max: 4}}")


def test_a_wide_search_runs_resumes_and_status_shows_each_of_its_hyperparameters(tmp_path):
    """The demo with LoRA rank and alpha, the schedule and its warm-up mutating (AgileRL's
    tournament: every member but the elite is a mutated clone each generation), in this process: two generations, resumed to four. Each member's
    checkpointed adapter states its own rank and alpha (PeftModel.from_pretrained reads them), and
    `status` prints a column for every hyperparameter of the search space."""
    run_dir = tmp_path / "run"
    settings = ["--set", "seed=1", "--set", "population.backend=local", "--set", "data.num_rows=120", "--set", "evolution.generations=2",
                "--set", "evolution.steps_per_generation=2", "--set", "evolution.mutation.no_mutation=0",
                "--set", "evolution.mutation.rl_hp=1", "--set", "evolution.selection=tournament", "--set", WIDE_SEARCH]
    result = evo(["run", DEMO, "--run-dir", run_dir, *settings], cwd=tmp_path, timeout=480)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    result = evo(["resume", run_dir, "--generations", "4"], cwd=tmp_path, timeout=480)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]

    status = json.loads(evo(["status", run_dir, "--json"], cwd=tmp_path).stdout)
    assert status["generation"] == 4
    checkpoint = run_dir / "checkpoints" / "generation_00004"
    slot_ids = json.loads((checkpoint / "controller.json").read_text())["controller"]["slot_ids"]
    ranks = set()
    for member in status["members"]:
        hp = member["hyperparameters"]
        adapter = json.loads((checkpoint / "members" / f"slot_{slot_ids.index(member['id'])}" / "actor" /
                              "adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"]) == (hp["lora_r"], hp["lora_alpha"])
        ranks.add(hp["lora_r"])
    events = [e["mutation"] for e in json.loads((checkpoint / "controller.json").read_text())["controller"]["lineage"][
        "events"]]
    assert {"lora_r", "lora_alpha", "scheduler", "warmup_steps"} <= set(events), events

    table = evo(["status", run_dir], cwd=tmp_path).stdout.splitlines()
    assert table[1].split() == ["id", "parent", "born", "lr", "lora_r", "lora_alpha", "scheduler", "warmup_steps",
                                "fitness"]
    rows = {int(line.split()[0]): line.split() for line in table[2:2 + len(status["members"])]}
    for member in status["members"]:
        hp = member["hyperparameters"]
        assert rows[member["id"]][4:8] == [str(hp["lora_r"]), f"{hp['lora_alpha']:.3g}", hp["scheduler"],
                                           str(hp["warmup_steps"])]


# ----------------------------------------------------------------------- a killed driver (issue 30, item 10)
def test_a_sigkilled_run_leaves_no_ray_process_behind():
    """SIGKILL the driver of a run on a local Ray cluster once its members train: every process it
    started (GCS, raylet, the raylet's DashboardAgent and RuntimeEnvAgent, the members' actors) is
    gone within seconds. Ray's agents used to outlive the driver by a minute or more (~210 MB)."""
    import os
    import signal
    import time

    import psutil

    sets = ["population.size=2", "data.num_rows=60", "evolution.generations=50", "evolution.steps_per_generation=2",
            "evolution.tournament_size=2", "agent.batch_size=8"]
    run_dir = Path(tempfile.mkdtemp(prefix="kill", dir="/tmp")) / "run"  # Ray's socket paths stay short
    try:
        driver = subprocess.Popen([str(EVO_SFT), "run", str(DEMO), "--run-dir", str(run_dir),
                                   *[x for s in sets for x in ("--set", s)]],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=subprocess_env(RAY_AUTH_MODE="disabled"), cwd=run_dir.parent)
        deadline, started = time.monotonic() + QUICK_TIMEOUT_S * 3, {}
        wanted = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::MemberActor")
        while not all(any(p.startswith(name) for p in started.values()) for name in wanted):
            assert driver.poll() is None, f"the run ended with {driver.returncode} before its members trained"
            assert time.monotonic() < deadline, f"no {wanted} among the run's processes: {sorted(started.values())}"
            for process in psutil.Process(driver.pid).children(recursive=True):
                try:
                    started[process] = " ".join(process.cmdline())
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 20
        while (alive := sorted(cmd[:80] for p, cmd in started.items() if p.is_running())) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive == [], "processes the killed run left behind"
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
