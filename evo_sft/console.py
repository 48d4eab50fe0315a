"""What a run prints besides its own lines. Libraries are quietened at the source, in the driver
and in every Ray actor (`quiet_libraries` runs in both): no weight-loading or shard-writing
progress bars, no INFO logs from MLflow's store or Ray's start-up, and no warnings libraries
raise about their own internals (a deprecation inside transformers, peft's note on saving
embedding layers). Everything else a library warns about, and every warning of evo-sft, is
printed in one line: `Category: message`."""
import logging
import os
import warnings

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
