"""What a run prints besides its own lines. Libraries are quietened at the source, in the driver
and in every Ray actor (`quiet_libraries` runs in both): no weight-loading or shard-writing
progress bars, no INFO logs from MLflow's store or Ray's start-up, and no warnings libraries
raise about their own internals (a deprecation inside transformers, peft's note on saving
embedding layers). Everything else a library warns about, and every warning of evo-sft, is
printed in one line: `Category: message`. A command that runs other programs' loops (`evo-sft
compare` runs Ray Tune) sends everything the process writes to a log file (`output_to_log`) and
prints its own lines to the screen."""
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

# (category, message regex, module regex): library warnings no user can act on
LIBRARY_NOISE = (
    (FutureWarning, "", r"(transformers|peft)\."),  # deprecations of library internals that a library calls
    (DeprecationWarning, "", r"(transformers|peft|torch)\."),
    (UserWarning, r"Setting `save_embedding_layers` to `True`", r"peft\."),  # an adapter on the output head
)
ENVIRONMENT = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # read when mlflow is imported
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no bar while a registered model's files are copied
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "warning",
}


def one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


def quiet_libraries() -> None:
    """Quieten the libraries for this process (call before they are used; safe to call again)."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for category, message, module in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    warnings.formatwarning = one_line
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # where mlflow was imported before
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


@contextmanager
def output_to_log(path: Path):
    """Send all that this process writes to stdout and stderr (Python's and libraries' lines, the
    C++ logs of Ray's core, what Ray forwards from its workers) to the file `path`, appended;
    yield a stream to the screen (the stdout it replaced) for the command's own lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(path, "ab") as log:
        for fd in saved:
            os.dup2(log.fileno(), fd)
    screen = os.fdopen(os.dup(saved[1]), "w", encoding="utf-8", buffering=1)
    try:
        yield screen
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        screen.close()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
