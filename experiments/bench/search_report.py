#!/usr/bin/env python3
"""The tables and plots of bench_search's rows: per task, every search over its seeds (the
summary of `evo-sft compare`, paired against the default evolution), how many tokens each took
to reach the lr grid's best final fitness as a share of the budget, and the plot of the best
fitness against tokens.

A row's search is its `name` (bench_search_parallel's variant; else its strategy): the default
evolution is `evolution`, other evolution variants keep their own names.

    python experiments/bench/search_report.py experiments/results/bench_search/issue33.jsonl --out DIR
"""
import argparse
import json
from dataclasses import fields
from pathlib import Path

from evo_sft.compare import report
from evo_sft.fitness import NegativeTestLoss

RUN_FIELDS = {f.name for f in fields(report.StrategyRun)}
TASK_ORDER = ("demo", "stdlib", "unicode")


def runs_by_task(rows: list[dict]) -> dict[str, list[report.StrategyRun]]:
    tasks = {}
    for row in rows:
        run = report.StrategyRun(**{k: v for k, v in row.items() if k in RUN_FIELDS})
        run.strategy = row.get("name") or row["strategy"]
        tasks.setdefault(row["task"], []).append(run)
    return dict(sorted(tasks.items(), key=lambda item: TASK_ORDER.index(item[0]) if item[0] in TASK_ORDER else 99))


def task_report(task: str, runs: list[report.StrategyRun], budget: int, out: Path) -> str:
    fitness = NegativeTestLoss()
    runs = sorted(runs, key=lambda run: (run.strategy != "evolution", run.strategy, run.seed))
    targets = report.grid_targets(runs)
    rows = report.summary(runs, fitness, targets)
    shares = {row["strategy"]: row["tokens_to_target"] / budget for row in rows if row["tokens_to_target"]}
    text = report.summary_table(rows, fitness) + "\n\nTokens to the grid's best final fitness, as a share of the " \
        f"budget ({budget:,} tokens), mean over the seeds that reached it: " + ", ".join(
            f"{name} {share:.0%}" for name, share in shares.items()) + "\n"
    report.plot(runs, fitness, out / f"{task}.png", title=f"{task}: best test loss against training tokens")
    (out / f"{task}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=Path, help="bench_search rows (JSON lines)")
    parser.add_argument("--out", type=Path, required=True, help="where TASK.md and TASK.png go")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    budgets = {row["task"]: row["budget"] for row in rows}
    for task, runs in runs_by_task(rows).items():
        print(f"## {task}\n\n{task_report(task, runs, budgets[task], args.out)}")


if __name__ == "__main__":
    main()
