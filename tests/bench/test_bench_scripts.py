"""Every benchmark of experiments/bench/ (bench_*.py) and every driver of a device session
(gpu_*.py) in its tiny CPU mode, as a subprocess writing into a temporary folder: it exits 0,
prints a markdown table with a line per row it measured (bench_search_parallel gathers rows and
prints none), and appends those rows to results.jsonl with a finite, positive measurement in
each. Those that start Ray or several processes, or run other benchmarks, are marked
`integration` (tens of seconds to minutes each on two cores)."""
import json
import math
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.helpers.paths import REPO
from tests.helpers.processes import subprocess_env

BENCH = REPO / "experiments" / "bench"


def this_tree(path: str) -> list[str]:
    """The baseline of a benchmark that compares with a git revision: this tree's own module, so
    that the run needs no git and its baseline rows equal this tree's."""
    return ["--baseline-rev", "HEAD", "--baseline-file", str(REPO / path)]


TINY = ["--tiny", "--device", "cpu"]
# script: (its arguments but --out, the key of a measured row and its measurement, rows expected)
SCRIPTS = {
    "bench_sft_step": (TINY, "tok_s", 4),  # evo and evo_eager, GC off and on
    "bench_population": (TINY, "tok_s", 4),  # alone; 2 together, shared, copies
    "bench_loss": ([*TINY, *this_tree("evo_sft/kernels/loss.py")], "ms", 4),
    "bench_checkpoint_copy": ([*TINY, *this_tree("evo_sft/io/storage.py")], "copy_s", 2),
    "bench_checkpoint_save": (["--tiny", *this_tree("evo_sft/io/storage.py")], "save_s", 2),
    "bench_adapter_state": (TINY, "ms", 4),
    "bench_member_copy": (TINY, "s", 2),
    "bench_clone_transfer": (["--tiny"], "s", 2),
    "bench_member_gpus": (TINY, "tokens_per_s", 1),
    "bench_search": ([*TINY, "--tasks", "demo", "--strategies", "evolution,pbt", "--set", "population.backend=local"],
                     "wall_s", 2),
    "bench_search_parallel": (["--variant", "tiny=--tiny --device cpu --strategies evolution --set population.backend=local",
                               "--tasks", "demo",
                               "--seeds", "1", "--jobs", "1", "--seconds", "500"], "wall_s", 1),
    "gpu_session": (["--tiny"], "seconds", 2),  # its two benchmarks' rows are in their own folders
    "gpu_search": (["--tiny"], "wall_s", 2),  # evolution and pbt, one seed
}
RESULTS = {"gpu_session": "gpu_session/results.jsonl"}  # where --out is the root of several benchmarks' folders
NO_TABLE = {"bench_search_parallel"}
SLOW = {"bench_clone_transfer": "starts Ray", "bench_member_gpus": "spawns two gloo processes",
        "bench_search": "starts Ray Tune and runs two strategies", "bench_search_parallel": "runs bench_search",
        "gpu_session": "runs two benchmarks", "gpu_search": "starts Ray Tune and runs two strategies for 10 s each"}


def test_every_benchmark_has_a_smoke_run():
    scripts = {path.stem for pattern in ("bench_*.py", "gpu_*.py") for path in BENCH.glob(pattern)}
    assert scripts == set(SCRIPTS)


@pytest.mark.parametrize("script", [pytest.param(name, marks=pytest.mark.integration) if name in SLOW else name
                                    for name in SCRIPTS])
def test_tiny_run_prints_its_table_and_writes_its_rows(script, tmp_path):
    arguments, measured, count = SCRIPTS[script]
    out = tmp_path / "out"
    work = tempfile.mkdtemp(prefix="bench", dir="/tmp")  # a short path: Ray's socket paths inside stay short
    if script == "bench_search_parallel":
        arguments = [*arguments, "--work", work]
    try:
        done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *arguments, "--out", str(out)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=subprocess_env(drop=("OUT",), PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    if script not in NO_TABLE:
        lines = done.stdout.splitlines()
        separators = [i for i, line in enumerate(lines) if line.startswith("|---")]
        assert separators, done.stdout[-3000:]
        table = [line for line in lines[separators[0] + 1:] if line.startswith("| ")]
        assert len(table) >= count
    rows = [json.loads(line) for line in (out / RESULTS.get(script, "results.jsonl")).read_text().splitlines()]
    rows = [row for row in rows if measured in row]
    assert len(rows) == count
    assert all(isinstance(row[measured], float) and math.isfinite(row[measured]) and row[measured] > 0
               for row in rows)
