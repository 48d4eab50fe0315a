"""MLflow tracking of an evolution: `tracker` (what is logged, and the queue that keeps records
through an outage) and `plots` (the family tree and fitness curves)."""
from evo_sft.tracking.tracker import HTTP_ENVIRONMENT, QUEUE_FILE, MLflowTracker, TrackingWarning, mlflow_ui_command

__all__ = ["HTTP_ENVIRONMENT", "QUEUE_FILE", "MLflowTracker", "TrackingWarning", "mlflow_ui_command"]
