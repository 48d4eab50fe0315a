"""Populations of members trained together in this process (LocalPopulation, one base model
shared, members stepped together, checkpoint writes, tracking into an embedded store) and on a
local Ray session (marked `integration`). The tiny runs they share are in
tests/helpers/evolution_run.py and tests/helpers/tracking.py."""
from tests.helpers.torch_setup import one_torch_thread  # noqa: F401 (autouse: seed 0, one thread)
