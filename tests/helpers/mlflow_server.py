"""A real `mlflow server` on 127.0.0.1 for tests: started, health-checked, stopped and
restarted on the same port and store."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers.processes import free_port

STARTUP_TIMEOUT_S = 60.0


class MLflowServer:
    """`mlflow server` over a sqlite store in `directory`, with artifacts served from there too."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MLflowServer":
        self.launch()
        self.wait_healthy()
        return self

    def launch(self) -> None:
        """Start the server process without waiting for it to answer."""
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow), "server",
            "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
            "--artifacts-destination", str(self.directory / "mlartifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.directory / "server.log", "ab")
        self.process = subprocess.Popen(command, cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()

    def stop(self) -> None:
        """SIGTERM to the server's process group; SIGKILL to whatever is left after 10 s."""
        if self.process is None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see "
                                   f"{self.directory / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {STARTUP_TIMEOUT_S} s")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
