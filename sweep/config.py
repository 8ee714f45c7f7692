"""Loading a user's experiment config: the schema (core/config.py) checked
against the loss registry (train/losses.py) at load time, so a bad loss name,
variant or hyperparameter exits 2 naming `losses.<name>.<key>` before any
stage starts. A run's saved config is read with core.config alone."""
from __future__ import annotations

from pathlib import Path

from ..core import config as schema
from ..core.config import ExperimentConfig
from ..train import losses as registry


def parse_config(data: dict | None, source: str = "<config>") -> ExperimentConfig:
    return schema.parse_config(data, source, losses=registry)


def load_config(path: str | Path) -> ExperimentConfig:
    return schema.load_config(path, losses=registry)
