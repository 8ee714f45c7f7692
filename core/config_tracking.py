"""`tracking:` of the experiment config: where a run's metrics are mirrored
(MLflow, TensorBoard, Weights & Biases; docs/tracking.md, core/tracking.py
drives them). Not part of the config hash (core.config.config_hash): where
results are mirrored does not change them. Imported from core.config too."""
from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import Field, field_validator

from .config_base import Strict

# MLflow's SQL stores (sqlite:///…, postgresql://…) need these; wsg installs them
# at its pins (pyproject.toml), mlflow-skinny alone does not.
SQL_STORE_NEEDS = "pip install SQLAlchemy==2.1.9 alembic==1.20.1"
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def mlflow_store_kind(uri: str) -> str:
    """"server" (http[s], databricks, …), "sql" (a database URI) or "file" (MLflow's file store)."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme.split("+", 1)[0] in _SQL_SCHEMES:
        return "sql"
    return "file" if scheme in ("", "file") else "server"


class MlflowCfg(Strict):
    # A tracking server (http://host:5000), MLflow's local SQLite store
    # (sqlite:///<folder>/mlflow.db) or another MLflow tracking URI.
    uri: str
    # Experiment name; None = the config's `name`.
    experiment: Optional[str] = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        """Refuse at load a URI MLflow cannot use (it would only fail later, in a cell's log)."""
        v = v.strip()
        if not v:
            raise ValueError("tracking.mlflow.uri is empty: give a store, e.g. sqlite:///runs/mlflow.db, or a "
                             "server, e.g. http://127.0.0.1:5000")
        kind = mlflow_store_kind(v)
        if kind == "file":
            raise ValueError(f"tracking.mlflow.uri {v!r} is MLflow's file store, which MLflow 3 refuses "
                             "(maintenance mode): use its local SQLite store, sqlite:///<folder>/mlflow.db, or a "
                             "tracking server, http://host:5000")
        if kind != "sql":
            return v
        try:
            import alembic  # noqa: F401
            import sqlalchemy  # noqa: F401
        except ImportError as err:
            raise ValueError(f"tracking.mlflow.uri {v!r} is an SQL store, which needs SQLAlchemy and alembic "
                             f"({err.name} is not installed): {SQL_STORE_NEEDS}") from None
        if v.lower().startswith("sqlite:"):
            path = v.split("://", 1)[1][1:]  # sqlite:///rel.db -> rel.db; sqlite:////abs.db -> /abs.db
            if not path or path == ":memory:":
                raise ValueError(f"tracking.mlflow.uri {v!r} is an in-memory SQLite store, which every process "
                                 "(each cell) would see empty: give a file, sqlite:///<folder>/mlflow.db")
            # Cells run in Ray workers whose working directory is not the caller's.
            v = "sqlite:///" + os.path.abspath(os.path.expanduser(path))
        return v


class WandbCfg(Strict):
    project: str = Field(min_length=1)
    mode: Literal["online", "offline"] = "online"
    entity: Optional[str] = None


class TrackingCfg(Strict):
    """`tracking:` of the experiment config; every tracker is off by default."""

    mlflow: Optional[MlflowCfg] = None
    tensorboard: bool = False
    wandb: Optional[WandbCfg] = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard or self.wandb is not None
