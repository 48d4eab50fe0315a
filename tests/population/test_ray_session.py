"""The local Ray session a run starts (evo_sft/population/ray_session.py), as a terminal shows it."""
import shutil
import tempfile

import pytest

from tests.helpers.console import on_a_terminal

pytestmark = pytest.mark.integration  # a local Ray cluster


def test_a_ray_session_leaves_nothing_on_the_terminal_after_the_last_line():
    """Issue 30, item 11: colorama, which Ray's CLI logger starts, wrote ESC[0m to the terminal at
    exit, after the run's summary."""
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths stay short
    code = ("from pathlib import Path\n"
            "from evo_sft.population.ray_session import init_ray, shutdown_ray\n"
            f"init_ray(None, Path({temp_dir!r}), {{'num_cpus': 1}})\n"
            "shutdown_ray()\n"
            "print('the last line')\n")
    try:
        assert on_a_terminal(code, timeout=300) == b"the last line\r\n"  # the whole terminal: nothing else
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
