"""MLflow tracking of an evolution: `tracker` (what is logged), `outbox` (every MLflow call as a
record, queued while the server is unreachable) and `plots` (the family tree and fitness curves)."""
from evo_sft.tracking.outbox import QUEUE_FILE, TrackingWarning
from evo_sft.tracking.tracker import HTTP_ENVIRONMENT, MLflowTracker, mlflow_models_page, mlflow_page

__all__ = ["HTTP_ENVIRONMENT", "QUEUE_FILE", "MLflowTracker", "TrackingWarning", "mlflow_models_page", "mlflow_page"]
