"""`evo-sft ui RUN`: the MLflow UI on a run's own store, a real `mlflow server` on 127.0.0.1 at a
free port, until Ctrl-C; it prints the addresses of the run's experiment and its evolution run. A
run tracked on a server of its own needs nothing started: its addresses are printed."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from evo_sft.tracking.tracker import mlflow_page
from evo_sft.tracking.store import sqlite_path

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(run_dir: Path, mlflow: dict, port: int | None = None) -> int:
    """`mlflow` is the run's tracking store as `evo-sft status --json` shows it."""
    uri, experiment, parent = mlflow["tracking_uri"], mlflow["experiment_id"], mlflow["parent_run_id"]
    if sqlite_path(uri) is None:
        _print_addresses(f"{run_dir} is tracked on {uri}", uri.rstrip("/") + "/", experiment, parent)
        return 0
    port = port or free_port()
    address = f"http://127.0.0.1:{port}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # the server is stopped then too
    # Ctrl-C stops it even where it was started with SIGINT ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, start_new_session=True,  # Ctrl-C reaches only us
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            if not _answers(address, server):
                log.seek(0)
                print(f"error: the MLflow server did not start on {address}:\n"
                      + log.read().decode(errors="replace")[-3000:], file=sys.stderr)
                return 1
            _print_addresses(f"MLflow UI of {run_dir} on {address} (Ctrl-C stops it)", address + "/", experiment,
                             parent)
            server.wait()
            print(f"error: the MLflow server on {address} stopped by itself (exit code {server.returncode})",
                  file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nMLflow UI stopped")
            return 0
        finally:
            _stop(server)


def _print_addresses(heading: str, server: str, experiment: str, parent: str | None) -> None:
    print(heading)
    print(f"  runs:      {mlflow_page(server, experiment)}")
    if parent:
        print(f"  evolution: {mlflow_page(server, experiment, parent)}", flush=True)


def _answers(address: str, server: subprocess.Popen) -> bool:
    """Whether the server answers /health before it exits or START_TIMEOUT_S pass."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def _stop(server: subprocess.Popen) -> None:
    """The server and what it started (its own process group): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue
