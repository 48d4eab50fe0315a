"""An evo-sft export as a new version of a registered model in the MLflow Model Registry.

How it is logged: as a pyfunc "model from code" (`evo_sft/tracking/mlflow_model.py`) whose
artifacts are the export folder itself (adapter or whole model in safetensors, tokenizer, model
card) and, for an adapter whose base is not on the hub, the base model's folder. MLflow writes
`MLmodel`, the environment files and the loader's source beside them: no pickle, and
`mlflow.pyfunc.load_model("models:/NAME/VERSION")` builds the model from those files. Not
`mlflow.transformers`, which loads the whole model into the logging process (the driver of a run
never holds one), asks the hub for a base model's card, licence and commit while logging, and
would not carry the card and the files `evo-sft export` writes.

The files are logged into the evolution's parent run under `registered_models/<name of the
export>`; the version points at them (`runs:/RUN_ID/registered_models/...`), so the run page
links to the version and the version to the run. Registering the same export of the same run
again finds the version already made and makes no other (a queued registration sent after the
same export was registered by hand, say).
"""
from contextlib import suppress
from importlib.metadata import version
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

LOADER = Path(__file__).with_name("mlflow_model.py")
ARTIFACTS = "registered_models"


def save_mlflow_model(export_dir: Path, base_dir: Path | None, model_config: dict, target: Path) -> None:
    """The export folder as an MLflow model in `target` (a new folder)."""
    import mlflow.pyfunc

    artifacts = {"model": str(export_dir)}
    packages = ["torch", "transformers", "safetensors"]
    if (Path(export_dir) / "adapter_config.json").is_file():
        packages.append("peft")
        if base_dir is not None:
            artifacts["base_model"] = str(base_dir)
    mlflow.pyfunc.save_model(str(target), python_model=str(LOADER), artifacts=artifacts, model_config=model_config,
                             pip_requirements=[f"{name}=={version(name).split('+')[0]}" for name in packages])


def register(client: MlflowClient, run_id: str, name: str, local_path: Path, artifact_path: str, tags: dict,
             description: str):
    """The MLflow model in `local_path` as a new version of `name`, its files logged into run
    `run_id` at `artifact_path`; the version already made where this run registered the same
    files before. A registered model this call made is deleted again where a later step fails."""
    source = f"runs:/{run_id}/{artifact_path}"
    created = _ensure_registered_model(client, name)
    try:
        made = [v for v in client.search_model_versions(f"run_id = '{run_id}'", max_results=1000)
                if v.name == name and v.source == source]
        if made:
            return made[0]
        client.log_artifacts(run_id, str(local_path), artifact_path)
        return client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
    except BaseException:
        if created:
            with suppress(Exception):  # the error to report is the one that stopped the registration
                client.delete_registered_model(name)
        raise


def _ensure_registered_model(client: MlflowClient, name: str) -> bool:
    """Whether `name` was made now (False: it was there)."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return False
    return True
