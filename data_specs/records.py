"""The data contract between stages: input samples, captions with provenance, shard stats, the error ledger.

See DESIGN.md ("The data contract"). Every record here is what one stage writes
and the next one reads; changing a field is a contract change.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from data_specs.base import Spec

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
"""Member extensions that hold a video, in the order a sample's video is looked up."""

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
"""Member extensions that hold a single frame (the toy world's pretrain split)."""

Stage = Literal["read", "parse", "decode", "caption", "write"]


class InputSample(Spec):
    """One sample of an input shard, as the reader hands it on (member bytes excluded)."""

    key: str = Field(description="the sample's __key__: the member path up to the first dot")
    url: str = Field(description="the shard the sample was read from")
    members: list[str] = Field(description="member extensions present, e.g. ['json', 'mp4', 'txt']")
    video_member: str | None = Field(None, description="which member holds the video or frame")
    alt_text: str | None = Field(None, description="the 'txt' member, decoded as UTF-8")

    @field_validator("key")
    @classmethod
    def _key_is_plain(cls, v: str) -> str:
        if not v or "." in v.rsplit("/", 1)[-1]:
            raise ValueError("a key is non-empty and has no dot in its last path component")
        return v


class GenerationParams(Spec):
    """Decoding parameters of a caption; part of the provenance hash."""

    max_new_tokens: int = 64
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class Provenance(Spec):
    """Everything that determined a caption, so that a changed job can tell what to redo."""

    model_id: str
    model_revision: str | None = None
    weights_hash: str | None = Field(None, description="sha256 over the safetensors files")
    backend: Literal["hf", "vllm"] | None = None
    prompt_id: str | None = None
    prompt_hash: str | None = None
    sampling: str | None = Field(None, description="the frame sampling rule asked for, e.g. 'uniform-8@v2'")
    frame_indices: list[int] = Field(default_factory=list)
    frame_timestamps: list[float] = Field(default_factory=list)
    decoder: str | None = Field(None, description="the backend that decoded the frames")
    generation: GenerationParams = Field(default_factory=GenerationParams)
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: Literal["stop", "length", "error"] | None = None
    latency_s: float | None = None
    budget_note: str | None = Field(None, description="what the token budget changed (fewer frames, lower resolution)")
    engine_version: str


class CaptionRecord(Spec):
    """The ``caption.json`` member an output shard adds to every sample."""

    text: str
    kind: Literal["pseudo", "frame", "alt", "gt"]
    provenance: Provenance


class ErrorRow(Spec):
    """One row of ``NNNNN.errors.jsonl``: a key that did not make it into the output, and why."""

    key: str = Field(description="the sample key; '<shard>' for a failure of the shard as a whole")
    stage: Stage
    reason: str = Field(description="a short, stable category, e.g. 'truncated-tar', 'no-video-member'")
    detail: str = Field("", description="the full message, with the shard URL")
    url: str | None = None


class ShardStats(Spec):
    """``NNNNN_stats.json``: written last, after the shard's rename; it is the shard's commit marker."""

    shard: str = Field(description="output shard file name")
    source: str | None = Field(None, description="input shard URL (engine caption) or generator (synth)")
    n_input: int = Field(ge=0, description="samples seen, good and bad")
    n_ok: int = Field(ge=0)
    n_failed: int = Field(ge=0)
    n_reused: int = Field(0, ge=0, description="outputs carried over unchanged from an earlier run of the shard")
    failures_by_reason: dict[str, int] = Field(default_factory=dict)
    seconds: dict[str, float] = Field(default_factory=dict, description="wall time by stage")
    clips_per_s: float | None = None
    config_hash: str = Field(description="hash of the job configuration that produced the shard")
    tool: str = Field(description="the command and package version that wrote the shard")
