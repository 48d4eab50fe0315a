"""Populations of members trained together in this process (LocalPopulation, one base model
shared, members stepped together, checkpoint writes, tracking into an embedded store) and on a
local Ray session (marked `integration`). The tiny runs they share are in
tests/helpers/evolution_run.py and tests/helpers/tracking.py."""
import os
import shutil
import tempfile

import pytest

from tests.helpers.torch_setup import one_torch_thread  # noqa: F401 (autouse: seed 0, one thread)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray cluster for the tests of a module (started once: each start costs seconds),
    ended with it, so that a later module in the same process (tests/integration/test_ray_cluster.py)
    starts a Ray session of its own; its temp folder is under a short /tmp path (Ray's socket paths
    must stay under ~107 characters)."""
    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    import ray

    ray.init(num_cpus=4, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False)
    yield temp_dir
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    if previous is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = previous
