"""The `evo-sft` command line: run, compare, resume, status, export, submit, logs, stop."""
import argparse
import json
import sys
from pathlib import Path

import yaml

from evo_sft.compare.strategies import STRATEGIES
from evo_sft.config import ConfigError, load_config
from evo_sft.data.sources import DataError, check_paths

EXIT_CONFIG_ERROR = 2


class UsageError(Exception):
    """A command asked for something it cannot do as asked; one line, exit code 2."""


def _resources(config) -> str:
    p = config.population
    actors = -(-p.size // p.members_per_actor) * p.gpus_per_member
    spans = f", each on {p.gpus_per_member} processes of one node" if p.gpus_per_member > 1 else ""
    return (f"population: {p.size} members on the '{p.backend}' backend, {p.members_per_actor} per base model{spans}; "
            f"{actors} actors, each {p.num_cpus:g} CPU and {p.num_gpus:g} GPU -> {actors * p.num_cpus:g} CPUs, "
            f"{actors * p.num_gpus:g} GPUs in all; "
            f"{config.evolution.generations} generations x {config.evolution.steps_per_generation} steps; "
            f"ray: {config.ray.address or 'local cluster'}")


def cmd_run(args) -> int:
    config = load_config(args.config, args.set)
    if args.run_dir:
        config.run_dir = args.run_dir
    check_paths({"model.name": config.model.name, "tokenizer": config.tokenizer, "data.source": config.data.source})
    if args.dry_run:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        print(_resources(config))
        return 0
    from evo_sft.run import start

    return 130 if start(config).interrupted else 0


def cmd_compare(args) -> int:
    from evo_sft.compare import runner

    config = load_config(args.config, args.set)
    check_paths({"model.name": config.model.name, "tokenizer": config.tokenizer, "data.source": config.data.source})
    try:
        comparison = runner.plan(config, args.strategies, args.seeds, args.budget,
                                 Path(args.out or Path("runs") / f"{config.name}-compare"),
                                 budget_seconds=args.budget_seconds)
    except ValueError as error:
        raise UsageError(str(error)) from None
    runner.run(comparison)
    return 0


def _run_dir(text: str) -> Path:
    """The run folder a command is given, checked before the command imports torch: a missing
    one, or one that holds no run, is a mistake in what the command is given."""
    from evo_sft.run_folder import NotARun, run_folder

    try:
        return run_folder(text)
    except NotARun as error:
        raise UsageError(str(error)) from None


def cmd_resume(args) -> int:
    run_dir = _run_dir(args.run_dir)
    from evo_sft.run import resume

    result = resume(run_dir, args.generations, args.set)
    return 130 if result is not None and result.interrupted else 0


def cmd_status(args) -> int:
    from evo_sft.hyperparameters import shown
    from evo_sft.run_folder import config_of, status_dict

    run_dir = _run_dir(args.run_dir)
    status = status_dict(run_dir)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    names = list(config_of(run_dir).evolution.hyperparameters)  # the run's search space
    widths = [max(len(name), 10) for name in names]
    print(f"generation {status['generation']}; best member {status['best_member']}")
    print(f"{'id':>5} {'parent':>6} {'born':>4} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))
          + f" {'fitness':>9}")
    for m in status["members"]:
        hp = m["hyperparameters"]
        parent = "-" if m["parent_id"] is None else m["parent_id"]
        last = m["fitness"][-1] if m["fitness"] else float("nan")
        print(f"{m['id']:>5} {parent:>6} {m['generation_born']:>4} "
              + " ".join(f"{shown(hp[n]):>{w}}" for n, w in zip(names, widths)) + f" {last:>9.4f}")
    mlflow = status["mlflow"]
    if mlflow.get("tracking_uri"):
        print(f"MLflow: {mlflow['tracking_uri']} experiment {mlflow['experiment_id']} run {mlflow['parent_run_id']}")
    return 0


def cmd_export(args) -> int:
    run_dir = _run_dir(args.run_dir)
    from evo_sft.export import ExportError, export

    try:
        done = export(run_dir, Path(args.out_dir), args.member, args.merged, args.force, args.register)
    except ExportError as error:
        raise UsageError(str(error)) from None
    load = {"adapter": f"PeftModel.from_pretrained(base_model, '{done.out_dir}')"}.get(
        done.form, f"AutoModelForCausalLM.from_pretrained('{done.out_dir}')")
    print(f"member {done.member_id} (generation {done.generation}) exported to {done.out_dir} as "
          f"{'a PEFT adapter' if done.form == 'adapter' else 'a whole model'}, with its model card "
          f"{done.out_dir / 'README.md'} (load with {load})")
    if done.registered_version is not None:
        print(f"registered in MLflow as {args.register!r} version {done.registered_version} "
              f"(mlflow.pyfunc.load_model('models:/{args.register}/{done.registered_version}'))")
    return 0


def cmd_ui(args) -> int:
    from evo_sft.run_folder import status_dict

    run_dir = _run_dir(args.run_dir)
    from evo_sft.ui import serve

    return serve(run_dir, status_dict(run_dir)["mlflow"], args.port)


def cmd_submit(args) -> int:
    from evo_sft.jobs import submit

    return submit(args.config, args.address, args.set, args.run_dir, args.wait)


def cmd_logs(args) -> int:
    from evo_sft.jobs import follow_logs

    return follow_logs(args.address, args.job_id)


def cmd_replay(args) -> int:
    from evo_sft.run_folder import SCHEDULE_FILE

    run_dir = _run_dir(args.run_dir)
    schedule = Path(args.schedule) if args.schedule else run_dir / SCHEDULE_FILE
    if not schedule.is_file():
        raise UsageError(f"no schedule at {schedule}: a run writes it when it finishes")
    from evo_sft.replay import TOLERANCE, replay

    results, exact = replay(run_dir, schedule)
    worst = max((r.difference for r in results if r.run_fitness is not None), default=0.0)
    final = results[-1]
    print(f"replayed fitness {final.fitness:.6f}, the run's {final.run_fitness}: largest difference {worst:.2e}"
          + ("" if exact else " (not expected to be exact: the line has LoRA dropout or grows its rank)"))
    return 0 if worst <= TOLERANCE or not exact else 1


def cmd_stop(args) -> int:
    from evo_sft.jobs import stop

    return stop(args.address, args.job_id)


class _Parser(argparse.ArgumentParser):
    """An argument mistake is one line like every other error: `error: ...`, exit code 2."""

    def error(self, message):
        self.exit(EXIT_CONFIG_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def _member(text: str) -> int | str:
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a member id (an integer) or 'best', got {text!r}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"evo-sft {version('evo-sft')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "evo-sft (version unknown: not installed)"


def parser() -> argparse.ArgumentParser:
    """Every argument has a description; every option says its default (or that it is required)."""
    p = _Parser(prog="evo-sft", description="Evolutionary hyperparameter search for LoRA SFT.")
    p.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of the commands below; `evo-sft COMMAND --help` describes it")

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        cmd.set_defaults(func=func)
        return cmd

    def overrides(cmd: argparse.ArgumentParser, what: str, example: str = "evolution.generations=5") -> None:
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help=f"override a key of {what}, e.g. {example}; repeatable (default: no overrides)")

    run = command("run", cmd_run, "start an evolution from a YAML config")
    run.add_argument("config", metavar="CONFIG", help="the experiment's YAML file; an empty file runs the defaults")
    overrides(run, "the config")
    run.add_argument("--run-dir", metavar="DIR",
                     help="the run folder (default: the config's run_dir, else runs/NAME in this folder)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config and resources, then exit (default: off)")

    compare = command("compare", cmd_compare, "run the experiment under each search strategy at one budget "
                                              "and compare them")
    compare.add_argument("config", metavar="CONFIG", help="the experiment's YAML file")
    overrides(compare, "the config")
    compare.add_argument("--strategies", default=",".join(STRATEGIES), metavar="NAMES",
                         help=f"comma-separated, of {', '.join(STRATEGIES)} (default: all {len(STRATEGIES)})")
    compare.add_argument("--seeds", type=int, default=1, metavar="N",
                         help="seeds per strategy: the config's seed and the N-1 after it (default: 1)")
    compare.add_argument("--budget", type=int, metavar="TOKENS",
                         help="supervised training tokens per strategy and seed; at least one generation's "
                              "(default: what the config's generations train on at the founders' batch size, "
                              "unless --budget-seconds is the only budget)")
    compare.add_argument("--budget-seconds", type=float, metavar="S",
                         help="wall-clock seconds per strategy and seed, start-up included; with --budget, "
                              "whichever ends first (default: none)")
    compare.add_argument("--out", metavar="DIR",
                         help="the folder for the runs, the table and the plot (default: runs/NAME-compare)")

    resume = command("resume", cmd_resume, "continue a run from its newest intact checkpoint")
    resume.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, wherever it is now")
    resume.add_argument("--generations", type=int, metavar="N",
                        help="run until N generations are complete in all; at or below the run's generation "
                             "there is nothing to do, which is said and exits 0 "
                             "(default: the config's evolution.generations)")
    overrides(resume, "the run's saved config for this session", "ray.address=HEAD:6379")

    status = command("status", cmd_status, "generation, members and best member of a run")
    status.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table (default: off)")

    export = command("export", cmd_export, "write a member as a folder to ship: its PEFT adapter (or, merged, a "
                                           "whole transformers model) with the tokenizer and a model card "
                                           "(README.md); optionally register it in the MLflow Model Registry")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write; new or empty unless --force")
    export.add_argument("--member", type=_member, default="best", metavar="ID",
                        help="a member id of the latest checkpoint, or 'best': the run's best (default: best)")
    export.add_argument("--merged", action="store_true",
                        help="merge the adapter into the base model's weights and write the whole model, which "
                             "loads with AutoModelForCausalLM.from_pretrained(OUT_DIR) and no PEFT; not for a run "
                             "without LoRA, whose members are whole already (default: off, the adapter)")
    export.add_argument("--register", metavar="NAME",
                        help="also register the export as a new version of NAME in the MLflow Model Registry "
                             "of the run's tracking store, tagged with its member, generation and fitness and "
                             "described by its model card (default: not registered)")
    export.add_argument("--force", action="store_true",
                        help="replace OUT_DIR whole if it holds files (default: off, refuse)")

    replay = command("replay", cmd_replay, "retrain the winning line's schedule as one member and compare its "
                                           "fitness with the run's in every generation; exit code 1 where they "
                                           "differ by more than 1e-6")
    replay.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder")
    replay.add_argument("--schedule", metavar="FILE", help="the schedule to replay (default: RUN_DIR/schedule.json)")

    ui = command("ui", cmd_ui, "start the MLflow UI on a run's own store (on 127.0.0.1) and print its addresses; "
                               "Ctrl-C stops it")
    ui.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    ui.add_argument("--port", type=int, metavar="N", help="the port to serve on (default: a free one)")

    submit = command("submit", cmd_submit, "submit the controller to a Ray cluster as a Ray Job")
    submit.add_argument("config", metavar="CONFIG", help="the experiment's YAML file")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265 (required)")
    overrides(submit, "the config")
    submit.add_argument("--run-dir", metavar="DIR",
                        help="the run folder, on storage every node reaches "
                             "(default: the config's run_dir, else runs/NAME in this folder)")
    submit.add_argument("--wait", action="store_true", help="stream the logs until the job ends (default: off)")

    for name, func, help_text in (("logs", cmd_logs, "follow a submitted job's logs"),
                                  ("stop", cmd_stop, "stop a submitted job")):
        cmd = command(name, func, help_text)
        cmd.add_argument("job_id", metavar="JOB_ID", help="the id `evo-sft submit` printed")
        cmd.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265 (required)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception as error:  # noqa: BLE001 - only the user's mistakes become one line, the rest re-raises
        if not _user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


def _user_error(error: Exception) -> bool:
    """A run that cannot do what is asked (no checkpoint to resume, none intact), or a run already in the folder.
    Checked without importing evo_sft.io.storage (torch), so validation alone stays quick."""
    storage = sys.modules.get("evo_sft.io.storage")
    return isinstance(error, FileExistsError) or (storage is not None and isinstance(error, storage.CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
