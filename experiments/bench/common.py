"""One evo_sft module as it was at a git revision, loaded beside this tree's, so that a benchmark
compares against a named baseline in the same run. Where the copy has no git (the device
machines), pass the file that `git show REV:PATH > FILE` wrote."""
import importlib.util
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_from_source(source: str, name: str):
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_at(path: str, rev: str, file: str | None = None):
    """The module at `path` (relative to the repository) at `rev`, or as saved in `file`."""
    source = Path(file).read_text() if file else subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    return module_from_source(source, f"{Path(path).stem}_baseline")
