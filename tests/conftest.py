"""The whole suite: marks and order. Imports nothing heavy (no torch, no evo_sft), so that
tests/unit runs where torch is not installed.

  tests/unit/         pure logic, no torch
  tests/agent/        one SFT agent: data, packing and kernels, its checkpoints, finetune in-process
  tests/population/   members trained together, in this process or on a local Ray session
  tests/bench/        the benchmark scripts of experiments/bench/ in their tiny CPU mode
  tests/integration/  the product as a user runs it: CLI, clusters, servers, browser, docker files

`integration` marks what starts clusters, servers, browsers or whole runs through the command
line: every test in tests/integration/, and modules elsewhere that set `pytestmark`.
`pytest -m "not integration"` runs the rest in under a minute on two cores.
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    layers = {item.nodeid: _layer(item) for item in items}
    for item in items:
        if layers[item.nodeid] == "integration":
            item.add_marker(pytest.mark.integration)
    # The cheap layers first, so that a broken unit shows before the clusters start. A stable sort:
    # each module's tests stay together and in their order (module-scoped fixtures set up once).
    order = {layer: index for index, layer in enumerate(LAYERS)}
    items.sort(key=lambda item: order.get(layers[item.nodeid], len(LAYERS)))
