"""search_report.py on the recorded rows of issue 33's benchmark, as the RESULTS.md tables were
made: each task's table and plot, with the means computed here from the rows themselves."""
import json
import re
import subprocess
import sys

import numpy as np

from tests.helpers.paths import REPO
from tests.helpers.processes import subprocess_env

ROWS = REPO / "experiments" / "results" / "bench_search" / "issue33" / "results.jsonl"


def test_the_report_shows_each_searchs_mean_over_its_seeds(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "bench" / "search_report.py"), str(ROWS),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    for task in ("demo", "stdlib", "unicode"):
        table = (tmp_path / f"{task}.md").read_text()
        assert f"## {task}\n\n{table}" in done.stdout
        assert (tmp_path / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for name in ("evolution", "pbt", "pb2", "random", "grid"):
            losses = [-row["best_final"] for row in rows if row["task"] == task and row["name"] == name]
            line = re.search(rf"^\| {name} \| (\d+) \| ([\d.]+) ± ([\d.]+) \|", table, re.M)
            assert line, table
            assert int(line.group(1)) == len(losses) == 5
            assert float(line.group(2)) == round(float(np.mean(losses)), 4)
            assert float(line.group(3)) == round(float(np.std(losses, ddof=1)), 4)
