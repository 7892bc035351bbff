"""The run config's `publish:` section."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, field_validator


class PublishConfig(BaseModel):
    """Where and how to publish one artifact (see `compress publish --help` for DEST forms)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    to: str
    revision: str = "main"
    private: bool = False
    commit_message: Optional[str] = None
    overwrite: bool = False
    card: bool = True
    force: bool = False  # publish even when the run flagged the original's perplexity as absurd

    @field_validator("to")
    @classmethod
    def _to_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("publish.to: must name a destination (file:///path/org/name, hf://org/name or org/name)")
        return value

    @field_validator("revision")
    @classmethod
    def _revision_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("publish.revision: must not be empty")
        return value
