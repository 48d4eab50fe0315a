"""A sqlite tracking store keeps its artifacts next to the database (`mlartifacts/`). MLflow
writes the absolute location of those artifacts into the database, so a store that moved with
its run folder (copied or renamed) still points at the old place until `move_artifact_root`
points it at the new one."""
import sqlite3
from contextlib import closing
from pathlib import Path

SQLITE = "sqlite:///"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite store; None for any other store."""
    return Path(tracking_uri[len(SQLITE):]) if tracking_uri.startswith(SQLITE) else None


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store go next to the database, not into the working directory."""
    database = sqlite_path(tracking_uri)
    return None if database is None else (database.parent / "mlartifacts").absolute().as_uri()


def moved(tracking_uri: str, old_folder: Path, new_folder: Path) -> str:
    """The URI of a sqlite store inside `old_folder` once that folder is at `new_folder`; any
    other store's URI as it is."""
    database = sqlite_path(tracking_uri)
    if database is None or not database.is_relative_to(old_folder):
        return tracking_uri
    return SQLITE + str(new_folder / database.relative_to(old_folder))


def move_artifact_root(tracking_uri: str, old_uri: str) -> None:
    """The sqlite store at `tracking_uri` was at `old_uri`: point its experiments and runs whose
    artifacts were next to the old database at the artifacts next to it now. MLflow has no API
    that changes an artifact location, so this updates the database's rows; only for a store
    that lives inside the run folder, which no other run shares."""
    old_root, new_root = artifact_root(old_uri), artifact_root(tracking_uri)
    with closing(sqlite3.connect(sqlite_path(tracking_uri))) as database, database:
        database.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?",
                         (new_root, old_root))
        database.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                         "WHERE substr(artifact_uri, 1, ?) = ?",
                         (new_root, len(old_root) + 1, len(old_root) + 1, old_root + "/"))
