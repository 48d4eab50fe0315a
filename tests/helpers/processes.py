"""Helpers for tests that start processes: free ports and the environment a child runs in."""
import os
import socket

from tests.helpers.paths import BIN


def free_ports(count: int) -> list[int]:
    """`count` distinct ports on 127.0.0.1 that were free a moment ago (all held open at once, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def subprocess_env(drop: tuple[str, ...] = (), **extra: str) -> dict:
    """This process's environment for a child `evo-sft`, `mlflow` or `ray`: unbuffered output,
    offline Hugging Face, one OpenMP thread, no tracking URI from the caller's shell (a run uses
    its own store); plus `extra`, less the names in `drop`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", **extra}
    for name in ("MLFLOW_TRACKING_URI", *drop):
        env.pop(name, None)
    return env


def path_without_the_venv() -> str:
    """PATH less the venv's bin/: a shell where the venv is not active, as after `make demo`."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and os.path.realpath(p) !=
                           os.path.realpath(BIN))
