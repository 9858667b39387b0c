"""Caption prompt templates as data: each has a stable id and a content hash that goes into provenance."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from data_specs.base import Spec


class PromptTemplate(Spec):
    id: str = Field(description="stable id, e.g. 'caption-video-v1'; bump the version when the text changes")
    media: Literal["video", "image"] = Field(description="what the placeholder stands for")
    text: str = Field(description="the user instruction that follows the media placeholder")
    system: str | None = Field(None, description="an optional system message")

    @property
    def content_hash(self) -> str:
        """sha256 over the template's content (not its id): a caption's provenance names both."""
        body = json.dumps({"media": self.media, "text": self.text, "system": self.system}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


PROMPTS: dict[str, PromptTemplate] = {p.id: p for p in (
    PromptTemplate(id="caption-video-v1", media="video", text="Describe what happens in the video."),
    PromptTemplate(id="caption-frame-v1", media="image", text="Describe the image."),
    PromptTemplate(id="caption-video-detailed-v1", media="video",
                   text="Describe what happens in the video in one sentence, in the order it happens."),
)}
DEFAULT_PROMPT = "caption-video-v1"


def get_prompt(prompt_id: str) -> PromptTemplate:
    """The template with this id.

    Raises:
        KeyError: naming the valid ids.
    """
    try:
        return PROMPTS[prompt_id]
    except KeyError:
        raise KeyError(f"unknown prompt {prompt_id!r}; valid: {', '.join(PROMPTS)}") from None
