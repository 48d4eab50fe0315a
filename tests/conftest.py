"""The whole suite: marks and order. Imports nothing heavy (no torch, no evo_sft), so that
tests/unit runs where torch is not installed.

  tests/unit/         pure logic, no torch
  tests/agent/        one SFT agent: data, packing and kernels, its checkpoints, finetune in-process
  tests/population/   members trained together, in this process or on a local Ray session
  tests/bench/        the benchmark scripts of experiments/bench/ in their tiny CPU mode
  tests/integration/  the product as a user runs it: CLI, clusters, servers, browser, docker files

`integration` marks what starts clusters, servers, browsers or whole runs through the command
line: every test in tests/integration/, and modules elsewhere that set `pytestmark`.
`pytest -m "not integration" -n 2` runs the rest in about 1.5 minutes on two cores.
"""
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "agent", "population", "bench", "integration")  # the order the layers run in


def _layer(item: pytest.Item) -> str | None:
    """The folder under tests/ that holds the item's module: "unit", "agent", ..."""
    try:
        return Path(item.path).resolve().relative_to(TESTS).parts[0]
    except ValueError:  # not under tests/
        return None


# Under xdist (`make test`: two workers) a module's tests run on one worker, so that its
# module-scoped fixtures are set up once; so do the modules that read the demo runs, made once per
# process (tests/integration/conftest.py); the smoke runs of the benchmarks share nothing and go one by one.
DEMO_RUNS_MODULES = ("tests/integration/test_browser.py", "tests/integration/test_replay.py",
                     "tests/integration/test_resume.py")
ONE_BY_ONE_MODULES = ("tests/bench/test_bench_scripts.py",)


def _worker_scope(nodeid: str) -> str:
    """The tests that run on one worker, one after another: those with the same scope."""
    module = nodeid.split("::")[0]
    if module in DEMO_RUNS_MODULES:
        return "demo_runs"
    return nodeid if module in ONE_BY_ONE_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _worker_scope(nodeid)

    return ByWorkerScope(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    layers = {item.nodeid: _layer(item) for item in items}
    for item in items:
        if layers[item.nodeid] == "integration":
            item.add_marker(pytest.mark.integration)
        if "demo_runs" in item.fixturenames and _worker_scope(item.nodeid) != "demo_runs":
            raise pytest.UsageError(f"{item.nodeid} reads the demo runs: add its module to DEMO_RUNS_MODULES "
                                    "in tests/conftest.py")
    # One process: the cheap layers first, so that a broken unit shows before the clusters start.
    # Several (xdist): the dear layers first, so that the workers end together. A stable sort: each
    # module's tests stay together and in their order.
    order = {layer: index for index, layer in enumerate(LAYERS)}
    direction = -1 if hasattr(config, "workerinput") else 1
    items.sort(key=lambda item: order.get(layers[item.nodeid], len(LAYERS)) * direction)
