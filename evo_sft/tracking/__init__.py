"""MLflow tracking of an evolution: `tracker` (what is logged), `outbox` (every MLflow call as a
record, queued while the server is unreachable), `plots` (the family tree and fitness curves) and
`store` (a sqlite store that moved with its run folder). Importing the package imports no MLflow."""
