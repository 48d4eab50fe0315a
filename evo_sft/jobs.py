"""Submit the controller to a Ray cluster as a Ray Job, so a sweep outlives the laptop that
launched it. The job runs `evo-sft run` on the cluster with the project as its working directory."""
import shlex
import time
from pathlib import Path

from evo_sft.config import load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# experiments/ (benchmarks and their recorded results) is not needed to run a config.
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", ".whl", "**/__pycache__", "*.egg-info", "experiments"]


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(config_path: str, address: str, overrides: list[str], run_dir: str | None, wait: bool) -> int:
    """Validate the config here, then submit it; the run folder must be reachable from every node."""
    config = load_config(config_path, overrides)
    run_dir = str(Path(run_dir or config.resolved_run_dir()).resolve())
    staged = Path(run_dir) / "submitted_config.yaml"
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.write_text(Path(config_path).read_text())
    sets = " ".join(f"--set {shlex.quote(s)}" for s in overrides)
    entrypoint = (f"python -m evo_sft.cli run {shlex.quote(str(staged))} {sets} "
                  f"--run-dir {shlex.quote(run_dir)} --set ray.address=auto")
    runtime_env = {"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}}
    if (PROJECT_ROOT / "pyproject.toml").exists():
        runtime_env.update(working_dir=str(PROJECT_ROOT), excludes=WORKING_DIR_EXCLUDES)
    job_id = _client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted job {job_id}; run folder {run_dir}")
    print(f"follow: evo-sft logs {job_id} --address {address}   stop: evo-sft stop {job_id} --address {address}")
    return follow_logs(address, job_id) if wait else 0


def follow_logs(address: str, job_id: str) -> int:
    """Print the job's logs until it ends; exit 0 only if it succeeded."""
    from ray.job_submission import JobStatus

    client, printed = _client(address), 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status.is_terminal():
            print(f"job {job_id}: {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(1.0)


def stop(address: str, job_id: str) -> int:
    stopped = _client(address).stop_job(job_id)
    print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
