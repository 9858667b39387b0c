"""Deterministic crash points for the kill-and-resume tests: ``PSEUDOCAP_CRASH_AT=NAME[@N]`` kills the process.

A test sets, e.g., ``PSEUDOCAP_CRASH_AT=commit:after-rename@2`` in a subprocess's
environment; the second time the code passes ``crash_point("commit:after-rename")``
the process sends itself SIGKILL: no cleanup, no atexit, no flushed buffers, just
like a machine that loses power. Unset (every real run), a crash point costs one
dictionary lookup. With ``PSEUDOCAP_CRASH_ONCE=FILE`` too, only the first process
to get there dies (it creates FILE first): how a test kills one Ray actor once and
watches its replacement finish the shard.
"""

from __future__ import annotations

import os
import signal

_ENV = "PSEUDOCAP_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get(_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        once = os.environ.get("PSEUDOCAP_CRASH_ONCE")
        if once:
            try:
                with open(once, "x"):
                    pass
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
