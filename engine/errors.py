"""Typed errors of the engine: every one names the shard, the sample key, the stage and the reason.

The error policy follows webdataset's handler protocol: library calls raise by
default; the engine's jobs isolate a bad sample, count it and write it to the
shard's error ledger (`SampleError.to_row()`), and never print-and-continue.
"""

from __future__ import annotations

from data_specs import ErrorRow

SHARD_KEY = "<shard>"  # the key of errors that concern a shard as a whole


class SampleError(Exception):
    """A sample (or a whole shard) that could not go through a stage.

    Attributes:
        url: the shard URL.
        key: the sample key, or ``SHARD_KEY`` for the shard as a whole.
        stage: 'read', 'parse', 'decode', 'caption' or 'write'.
        reason: a short stable category (ledger rows are counted by it).
        detail: a human-readable explanation.
    """

    stage = "read"

    def __init__(self, reason: str, detail: str = "", *, url: str | None = None,
                 key: str | None = None, stage: str | None = None):
        self.reason, self.detail, self.url, self.key = reason, detail, url, key
        if stage is not None:
            self.stage = stage
        super().__init__(self._message())

    def _message(self) -> str:
        where = ", ".join(p for p in (f"shard {self.url}" if self.url else "",
                                      f"key {self.key!r}" if self.key else "") if p)
        return f"{self.stage} failed{' (' + where + ')' if where else ''}: {self.reason}" + (
            f": {self.detail}" if self.detail else "")

    def located(self, *, url: str | None = None, key: str | None = None) -> "SampleError":
        """Fills in the shard URL and key where a lower layer did not know them."""
        self.url = self.url or url
        self.key = self.key or key
        self.args = (self._message(),)
        return self

    def to_row(self) -> ErrorRow:
        return ErrorRow(key=self.key or SHARD_KEY, stage=self.stage, reason=self.reason,
                        detail=self._message(), url=self.url)

    def __reduce__(self):  # survive pickling across decode worker processes
        return (_rebuild, (type(self), self.reason, self.detail, self.url, self.key, self.stage))


def _rebuild(cls, reason, detail, url, key, stage):
    return cls(reason, detail, url=url, key=key, stage=stage)


class ShardReadError(SampleError):
    """The shard itself could not be opened or read to its end (missing, truncated, empty)."""

    stage = "read"


class MemberError(SampleError):
    """A sample's members are unusable: no video, unsafe name, bad UTF-8 or JSON."""

    stage = "parse"


class DecodeError(SampleError):
    """Video bytes that do not decode to frames within the limits."""

    stage = "decode"


class DecodeTimeout(DecodeError):
    """A decode that did not finish within its wall-clock budget (the worker was killed)."""


class BackendUnavailable(ImportError):
    """A decode backend was asked for by name and is not installed."""
