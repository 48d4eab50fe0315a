"""The product as a user runs it: the `evo-sft` command line end to end, resume through it, real
Ray clusters and Ray jobs, an `mlflow server`, the MLflow UI in a browser, the docker files.
Every test in this folder is marked `integration` (by tests/conftest.py): `pytest -m "not integration"`
leaves them out."""
