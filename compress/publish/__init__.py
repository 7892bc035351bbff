"""Publish an artifact folder to a model hub (a directory hub or the Hugging Face Hub).

huggingface_hub is imported only when a Hub destination is used.
"""
from compress.publish.api import PublishResult, publish_artifact, publish_stage
from compress.publish.config import PublishConfig
from compress.publish.errors import PublishError, PublishInputError

__all__ = [
    "PublishConfig",
    "PublishError",
    "PublishInputError",
    "PublishResult",
    "publish_artifact",
    "publish_stage",
]
