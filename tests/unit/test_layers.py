"""The import graph of evo_sft runs downwards only and has no cycle: every import (at module
level or inside a function) goes to a module of the same or a lower layer."""
import ast
from pathlib import Path

import evo_sft

PACKAGE = Path(evo_sft.__file__).parent
# Layers from the bottom up; a module may import its own layer and those below it.
LAYERS = [
    ("evo_sft.hyperparameters", "evo_sft.config", "evo_sft.fitness", "evo_sft.evolution", "evo_sft.io",
     "evo_sft.console", "evo_sft.time_budget"),
    ("evo_sft.data",),
    ("evo_sft.kernels",),
    ("evo_sft.sft",),
    ("evo_sft.population",),
    ("evo_sft.controller", "evo_sft.tracking", "evo_sft.progress", "evo_sft.run_folder"),
    ("evo_sft.build", "evo_sft.run", "evo_sft.finetune", "evo_sft.jobs", "evo_sft.model_card", "evo_sft.ui"),
    ("evo_sft.compare", "evo_sft.replay", "evo_sft.export"),
    ("evo_sft.cli",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return -1  # the package root: lazy re-exports only


def imports_of(module: str) -> set[str]:
    """The evo_sft modules `module` imports; `from pkg import name` counts as pkg.name where that is a module."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES and name != module}


def test_every_module_belongs_to_a_layer():
    assert [m for m in MODULES if layer(m) < 0] == ["evo_sft"]


def test_imports_never_point_up():
    upward = [(m, i) for m in MODULES for i in imports_of(m) if layer(i) > layer(m)]
    assert upward == []


def test_the_evolution_layer_is_pure():
    """Selection, mutation and lineage use the standard library and numpy, nothing of torch or Ray."""
    for module, path in MODULES.items():
        if module.startswith("evo_sft.evolution"):
            tree = ast.parse(path.read_text())
            names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
            names |= {node.module.split(".")[0] for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) and node.module}
            assert names <= {"copy", "json", "math", "numbers", "collections", "dataclasses", "numpy", "evo_sft",
                             "typing"}, (module, names)
            assert all(i.startswith("evo_sft.evolution") for i in imports_of(module)), module


def test_no_import_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(path + [module])
        state[module] = "open"
        for target in sorted(graph[module]):
            visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
