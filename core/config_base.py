"""The base of every section of the experiment config (core/config.py,
core/config_tracking.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config section: an unknown key is an error (a typo is never
    silently ignored), and so is a wrong value assigned after loading."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
