"""The small demo runs that tests/integration share (the session-scoped `demo_runs` fixture of
tests/integration/conftest.py): the demo config shrunk to seconds on the in-process ("local")
backend, scored by test loss, each `evo-sft` a process of its own as a user runs it, the venv not
active and the umask 022. They are started together and overlapped (each process spends much of
its time importing and writing files), so that all of them take a couple of minutes on 2 cores:

  - `full`: 4 generations in one go (resume, export, status, replay and the browser read it);
  - `split`: 2 generations, then `evo-sft resume RUN --generations 4`;
  - `killed`: 3 generations, SIGKILLed in generation 2, then `evo-sft resume RUN`;
  - `damaged`: a copy of `full` with a file of generation 4 damaged, then `evo-sft resume RUN`;
  - `stopped`: SIGKILLed after its first generation, before its first checkpoint (every 2), then
    `evo-sft resume RUN` and the command that resume names to start it again;
  - `kept_none`: 1 generation with a checkpoint every 2 (it finishes with none), then
    `evo-sft run` and `evo-sft resume` in its folder.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.paths import DEMO, EVO_SFT, REPO
from tests.helpers.processes import path_without_the_venv, subprocess_env

GENERATIONS = 4
SMALL = ["population.backend=local", "data.num_rows=160", "evolution.steps_per_generation=2",
         "evolution.fitness=test_loss", "evolution.fitness_options={}"]
CLI_TIMEOUT_S = 300
UMASK = 0o022  # every evo-sft here runs under it: its files must end 0o644 (issue 30, item 4)


def env() -> dict:
    # One intra-op thread per process: the runs overlap on 2 cores, and oversubscribed OpenMP threads
    # double the CPU time. Every run here uses the same setting, so their numbers stay comparable.
    return subprocess_env(MKL_NUM_THREADS="1", PATH=path_without_the_venv())


def evo(*args, check: bool = True, umask: int = UMASK) -> subprocess.CompletedProcess:
    """`evo-sft ARGS` as a user types it; on failure the assertion shows its output."""
    result = subprocess.run([str(EVO_SFT), *map(str, args)], capture_output=True, text=True, env=env(),
                            timeout=CLI_TIMEOUT_S, cwd=REPO, umask=umask)
    if check:
        assert result.returncode == 0, f"evo-sft {' '.join(map(str, args))} -> {result.returncode}\n" \
                                       f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    return result


def run_args(run_dir: Path, generations: int, *more: str) -> list:
    sets = [*SMALL, f"evolution.generations={generations}", *more]
    return ["run", DEMO, "--run-dir", run_dir, *[x for s in sets for x in ("--set", s)]]


def checkpoint(run_dir: Path, generation: int) -> Path:
    return run_dir / "checkpoints" / f"generation_{generation:05d}"


def tree_state(folder: Path) -> dict:
    """Every path under `folder`, the folder itself included, with its modification time and,
    for a file, the sha256 of its content."""
    return {str(path.relative_to(folder)): (path.lstat().st_mtime_ns,
                                            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
            for path in [folder, *sorted(folder.rglob("*"))]}


class Job:
    """`evo-sft ARGS` in the background (its own process group), output to files."""

    def __init__(self, root: Path, name: str, *args):
        self.name, self.args = name, args
        self.stdout_path, self.stderr_path = root / f"{name}.stdout", root / f"{name}.stderr"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen([str(EVO_SFT), *map(str, args)], stdout=out, stderr=err, env=env(),
                                            cwd=REPO, start_new_session=True, umask=UMASK)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def wait(self, check: bool = True) -> subprocess.CompletedProcess:
        try:
            self.process.wait(CLI_TIMEOUT_S)
        finally:
            self.kill()
        result = subprocess.CompletedProcess(self.args, self.process.returncode, self.stdout_path.read_text(),
                                             self.stderr_path.read_text())
        if check:
            assert result.returncode == 0, f"{self.name}: evo-sft {' '.join(map(str, self.args))} -> " \
                f"{result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        return result


@dataclass
class Runs:
    full: Path
    full_run: subprocess.CompletedProcess
    split: Path
    split_resume: subprocess.CompletedProcess
    killed: Path
    killed_run: subprocess.CompletedProcess
    killed_midway: bool  # at the kill: generation 1's checkpoint present, generation 2's not
    killed_resume: subprocess.CompletedProcess
    damaged: Path
    damaged_file: str
    damaged_status: subprocess.CompletedProcess
    damaged_resume: subprocess.CompletedProcess
    stopped: Path
    stopped_runs: dict  # the MLflow runs the stopped run made (mlflow_runs.json), at the kill
    stopped_had_checkpoint: bool
    stopped_resume: subprocess.CompletedProcess
    stopped_again: subprocess.CompletedProcess
    kept_none: Path
    kept_none_again: subprocess.CompletedProcess
    kept_none_resume: subprocess.CompletedProcess
    kept_none_untouched: bool  # its folder as it was after `again` and `resume`


def make_runs(root: Path) -> Runs:
    from evo_sft.io.checkpoint import checkpoint_dirs

    full, split, killed, damaged = root / "full", root / "split", root / "killed", root / "damaged"
    stopped, kept_none = root / "stopped", root / "kept_none"
    stopped_runs_file = stopped / "tracking_queue" / "mlflow_runs.json"
    jobs = {}
    try:
        for name, args in (("full", run_args(full, GENERATIONS)), ("split", run_args(split, 2)),
                           ("killed", run_args(killed, 3)),
                           ("stopped", run_args(stopped, 2, "evolution.steps_per_generation=8", "checkpoint.every=2")),
                           ("kept_none", run_args(kept_none, 1, "checkpoint.every=2"))):
            jobs[name] = Job(root, name, *args)

        # Kill `killed` once its first checkpoint is in (checkpoints are committed while the next
        # generation trains: generation 2 is under way, its checkpoint a generation's training
        # away), and `stopped` once its first generation made its members' MLflow runs.
        deadline, killed_midway, stopped_runs = time.monotonic() + CLI_TIMEOUT_S, None, None
        while killed_midway is None or stopped_runs is None:
            assert time.monotonic() < deadline, "a run was not killed in time"
            if killed_midway is None:
                assert jobs["killed"].process.poll() is None, jobs["killed"].wait(check=False)
                if checkpoint(killed, 1).exists():
                    killed_midway = jobs["killed"].process.poll() is None and not checkpoint(killed, 2).exists()
                    jobs["killed"].kill()
            if stopped_runs is None:
                assert jobs["stopped"].process.poll() is None, jobs["stopped"].wait(check=False)
                if stopped_runs_file.exists() and "member:" in stopped_runs_file.read_text():
                    jobs["stopped"].kill()
                    stopped_runs = json.loads(stopped_runs_file.read_text())
            time.sleep(0.05)
        killed_run = jobs["killed"].wait(check=False)
        jobs["killed_resume"] = Job(root, "killed_resume", "resume", killed)  # to the config's 3 generations
        jobs["stopped"].wait(check=False)
        stopped_had_checkpoint = bool(checkpoint_dirs(stopped))
        stopped_resume = evo("resume", stopped, check=False)
        jobs["stopped_again"] = Job(root, "stopped_again", "run", stopped / "config.yaml", "--run-dir", stopped)

        jobs["kept_none"].wait()
        before = tree_state(kept_none)
        kept_none_again = evo(*run_args(kept_none, 1, "checkpoint.every=2"), check=False)
        kept_none_resume = evo("resume", kept_none, check=False)
        kept_none_untouched = tree_state(kept_none) == before

        jobs["split"].wait()
        jobs["split_resume"] = Job(root, "split_resume", "resume", split, "--generations", GENERATIONS)

        full_run = jobs["full"].wait()
        shutil.copytree(full, damaged)
        damaged_file = "members/slot_1/actor/adapter_model.safetensors"
        target = checkpoint(damaged, GENERATIONS) / damaged_file
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different content
        target.write_bytes(bytes(data))
        damaged_status = evo("status", damaged, "--json")
        jobs["damaged_resume"] = Job(root, "damaged_resume", "resume", damaged)  # to 4: generation 4 again, from 3

        return Runs(full=full, full_run=full_run, split=split, split_resume=jobs["split_resume"].wait(),
                    killed=killed, killed_run=killed_run, killed_midway=killed_midway,
                    killed_resume=jobs["killed_resume"].wait(), damaged=damaged, damaged_file=damaged_file,
                    damaged_status=damaged_status, damaged_resume=jobs["damaged_resume"].wait(),
                    stopped=stopped, stopped_runs=stopped_runs, stopped_had_checkpoint=stopped_had_checkpoint,
                    stopped_resume=stopped_resume, stopped_again=jobs["stopped_again"].wait(check=False),
                    kept_none=kept_none, kept_none_again=kept_none_again, kept_none_resume=kept_none_resume,
                    kept_none_untouched=kept_none_untouched)
    finally:
        for job in jobs.values():
            job.kill()
