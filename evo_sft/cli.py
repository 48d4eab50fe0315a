"""The `evo-sft` command line: run, resume, status, export, submit, logs, stop."""
import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from evo_sft.config import ConfigError, load_config
from evo_sft.data.sources import DataError, check_paths

EXIT_CONFIG_ERROR = 2


def _resources(config) -> str:
    p = config.population
    actors = -(-p.size // p.members_per_actor)
    return (f"population: {p.size} members on the '{p.backend}' backend, {p.members_per_actor} per base model; "
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


def cmd_resume(args) -> int:
    from evo_sft.run import resume

    return 130 if resume(Path(args.run_dir), args.generations, args.set).interrupted else 0


def _latest(run_dir: Path):
    from evo_sft.io.checkpoint import latest_intact

    return latest_intact(run_dir)


def status_dict(run_dir: Path) -> dict:
    from evo_sft.evolution import Lineage

    _, saved = _latest(run_dir)
    state = saved["controller"]
    lineage = Lineage.from_dict(state["lineage"])
    fitness = dict((member_id, history) for member_id, history in state["fitness"])
    members = []
    for member_id in state["slot_ids"]:
        info = lineage.members[member_id]
        members.append({"id": member_id, "parent_id": info.parent_id, "generation_born": info.generation_born,
                         "hyperparameters": info.hyperparameters, "fitness": fitness[member_id]})
    from evo_sft.run import best_slot

    best = members[best_slot(state["slot_ids"], fitness, lineage, state["generation"])]
    tracking = saved.get("tracking") or {}
    return {
        "generation": state["generation"],
        "best_member": best["id"],
        "members": members,
        "mlflow": {key: tracking.get(key) for key in ("tracking_uri", "experiment_id", "parent_run_id")},
    }


def cmd_status(args) -> int:
    from evo_sft.hyperparameters import shown
    from evo_sft.run import config_of

    run_dir = Path(args.run_dir)
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
    from evo_sft.data.sources import load_tokenizer
    from evo_sft.run import config_of

    run_dir, out_dir = Path(args.run_dir), Path(args.out_dir)
    checkpoint, saved = _latest(run_dir)
    slot_ids = saved["controller"]["slot_ids"]
    member = status_dict(run_dir)["best_member"] if args.member == "best" else int(args.member)
    if member not in slot_ids:
        print(f"error: member {member} is not in the latest checkpoint (members: {slot_ids})", file=sys.stderr)
        return 1
    adapter = checkpoint / "members" / f"slot_{slot_ids.index(member)}" / "actor"
    shutil.copytree(adapter, out_dir, dirs_exist_ok=True)
    config = config_of(run_dir)
    tokenizer_name = config.tokenizer or (str(run_dir / "base_model") if config.model.name == "demo" else config.model.name)
    load_tokenizer(tokenizer_name, config.model.trust_remote_code).save_pretrained(out_dir)
    print(f"member {member} exported to {out_dir} (load with PeftModel.from_pretrained(base_model, '{out_dir}'))")
    return 0


def cmd_submit(args) -> int:
    from evo_sft.jobs import submit

    return submit(args.config, args.address, args.set, args.run_dir, args.wait)


def cmd_logs(args) -> int:
    from evo_sft.jobs import follow_logs

    return follow_logs(args.address, args.job_id)


def cmd_stop(args) -> int:
    from evo_sft.jobs import stop

    return stop(args.address, args.job_id)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evo-sft", description="Evolutionary hyperparameter search for LoRA SFT.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start an evolution from a YAML config")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--run-dir")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and resources, then exit")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue a run from its newest intact checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--generations", type=int, help="run until this many generations in total")
    resume.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run's saved config for this session, e.g. ray.address=HEAD:6379")
    resume.set_defaults(func=cmd_resume)

    status = sub.add_parser("status", help="generation, members and best member of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    export = sub.add_parser("export", help="write a member's adapter as a PEFT folder with the tokenizer")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--member", default="best", help="member id or 'best'")
    export.set_defaults(func=cmd_export)

    submit = sub.add_parser("submit", help="submit the controller to a Ray cluster as a Ray Job")
    submit.add_argument("config")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--run-dir")
    submit.add_argument("--wait", action="store_true", help="stream the logs until the job ends")
    submit.set_defaults(func=cmd_submit)

    for name, func, help_text in (("logs", cmd_logs, "follow a submitted job's logs"),
                                  ("stop", cmd_stop, "stop a submitted job")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("job_id")
        cmd.add_argument("--address", required=True)
        cmd.set_defaults(func=func)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception as error:  # noqa: BLE001 - only the user's mistakes become one line, the rest re-raises
        if not _user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


def _user_error(error: Exception) -> bool:
    """No run to resume or inspect (no config, no intact checkpoint), or a run already in the folder.
    Checked without importing evo_sft.io.storage (torch), so validation alone stays quick."""
    storage = sys.modules.get("evo_sft.io.storage")
    return isinstance(error, FileExistsError) or (storage is not None and isinstance(error, storage.CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
