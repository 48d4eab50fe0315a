"""The pure layer where torch is not installed: a throwaway venv (no pip, no system site-packages)
that sees only numpy, PyYAML, pytest (and what they require, as installed here) and this
repository. `import evo_sft.evolution, evo_sft.config` works there without torch, and so does
every other test in tests/unit."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.paths import REPO

PURE_MODULES = ("numpy", "yaml")  # what evo_sft.evolution and evo_sft.config import beyond the standard library
TEST_MODULES = ("pytest",)


def distributions_with_requirements(modules) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that provide `modules` (top-level import names), and the ones
    they require here (extras left out), by name."""
    providers = importlib.metadata.packages_distributions()
    found, todo = {}, [name for module in modules for name in providers[module]]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = canonicalize_name(dist.metadata["Name"])
        if name in found:
            continue
        found[name] = dist
        for requirement in map(Requirement, dist.requires or ()):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def link_distributions(dists, folder: Path) -> list[str]:
    """Symlink each distribution's top-level files and folders (`numpy`, `numpy.libs`, `yaml`,
    `_yaml`, ...) into `folder`; returns their names."""
    folder.mkdir()
    names = set()
    for dist in dists.values():
        for top in {file.parts[0] for file in dist.files}:
            if top in ("..", "__pycache__") or top.endswith(".dist-info") or top in names:
                continue
            (folder / top).symlink_to(Path(dist.locate_file(top)).resolve())
            names.add(top)
    return sorted(names)


@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory):
    """`run(*args)`: the throwaway venv's python with PYTHONPATH = the linked packages and this
    repository, in the repository, with a clean environment; returns the CompletedProcess."""
    root = tmp_path_factory.mktemp("no-torch")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True,
                   capture_output=True, text=True)
    packages = root / "packages"
    linked = link_distributions(distributions_with_requirements(PURE_MODULES + TEST_MODULES), packages)
    assert {"numpy", "yaml", "pytest", "_pytest"} <= set(linked) and not {"torch", "transformers"} & set(linked)
    python = root / "venv" / "bin" / "python"
    # nothing of this process's environment but PATH; no bytecode written into the linked packages
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(packages), str(REPO)]),
           "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO,
                              timeout=120)

    return run


def test_evolution_and_config_import_without_torch(torch_free_python):
    result = torch_free_python("-c", "import evo_sft.evolution, evo_sft.config, sys; assert 'torch' not in sys.modules")
    assert result.returncode == 0, result.stderr
    # ... and torch is really absent there (so importing it anywhere on the way would have failed)
    result = torch_free_python("-c", "import torch")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr, result.stderr
    # the package imported is this repository's
    result = torch_free_python("-c", "import evo_sft; print(evo_sft.__file__)")
    assert Path(result.stdout.strip()) == REPO / "evo_sft" / "__init__.py", result.stdout + result.stderr


def test_the_unit_tests_pass_without_torch(torch_free_python):
    """Conftests, helpers and every other module of tests/unit collect and pass with no torch."""
    this = Path(__file__).relative_to(REPO)
    result = torch_free_python("-m", "pytest", "-q", "-p", "no:cacheprovider", f"--ignore={this}", this.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
