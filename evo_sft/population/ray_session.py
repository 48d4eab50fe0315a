"""The Ray session of a run (or a comparison): a local cluster started here, or one joined at an
address. A local cluster runs without the dashboard (nothing here uses it), and a watchdog process
ends whatever the cluster leaves behind once this process is gone, so that a killed run leaves no
Ray process running."""
import atexit
import logging
import os
import subprocess
import sys
from pathlib import Path

import ray

from evo_sft.population import ray_watchdog

_watchdog: subprocess.Popen | None = None  # the watchdog of the local cluster this process started


def init_ray(address: str | None, temp_dir: Path, options: dict) -> None:
    """`ray.init` with the config's `ray.init` `options`; a local cluster (no `address`) keeps its
    files under `temp_dir`."""
    global _watchdog
    options = dict(options)
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        options.setdefault("_temp_dir", str(temp_dir))
        options.setdefault("include_dashboard", False)
    options.setdefault("logging_level", logging.WARNING)  # not Ray's start-up INFO lines
    try:
        ray.init(address=address, **options)
    finally:
        _no_colour_reset_at_exit()
    if address is None:
        _watchdog = subprocess.Popen([sys.executable, ray_watchdog.__file__, str(os.getpid())],
                                     stdin=subprocess.DEVNULL, start_new_session=True)


def shutdown_ray() -> None:
    global _watchdog
    ray.shutdown()
    if _watchdog is not None:
        _watchdog.terminate()
        _watchdog.wait()
        _watchdog = None


def _no_colour_reset_at_exit() -> None:
    """Ray's CLI logger calls colorama.init, whose exit handler writes ESC[0m to a terminal: a
    stray code after the run's last line."""
    import colorama.initialise  # the colorama Ray imported

    atexit.unregister(colorama.initialise.reset_all)
