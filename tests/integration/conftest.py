"""The product as a user runs it: the `evo-sft` command line end to end, resume through it, real
Ray clusters and Ray jobs, an `mlflow server`, the MLflow UI in a browser, the docker files.
Every test in this folder is marked `integration` (by tests/conftest.py): `pytest -m "not integration"`
leaves them out."""
import pytest

from tests.helpers.demo_runs import Runs, make_runs


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> Runs:
    """The small demo runs that resume, export, status, replay and the browser tests read
    (tests/helpers/demo_runs.py), made once for the session, overlapped."""
    return make_runs(tmp_path_factory.mktemp("demo-runs"))
