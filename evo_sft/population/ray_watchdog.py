"""Run as a script by `ray_session.init_ray` (`python ray_watchdog.py DRIVER_PID`): once the driver
that started a local Ray cluster is gone, however it ended (SIGKILL included), end every process it
left behind. Ray ties its GCS and raylet to the driver, but the raylet's agents (DashboardAgent,
RuntimeEnvAgent, ~210 MB) outlive them by a minute or more, trying to report to the GCS that died.
Imports psutil alone (a dependency of Ray), so it starts in a moment."""
import os
import sys
import time

import psutil

POLL_S = 1.0  # how often the driver's descendants are listed


def main(driver_pid: int) -> None:
    driver, me = psutil.Process(driver_pid), os.getpid()
    seen: dict[int, psutil.Process] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            seen.update((p.pid, p) for p in driver.children(recursive=True) if p.pid != me)
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    for process in seen.values():
        try:
            if process.is_running():  # the same process: psutil checks its start time
                process.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
