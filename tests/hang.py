"""Decode functions that misbehave, for DecodePool tests (importable by spawned workers)."""

import os
import re


def hold_gil_forever(data, sampling, backend, limits):
    """Catastrophic regex backtracking: C code that never releases the GIL, like a stuck decord."""
    re.match(r"(a+)+$", "a" * 64 + "b")
    raise AssertionError("unreachable in any test's lifetime")


def crash(data, sampling, backend, limits):
    os._exit(3)


def echo_len(data, sampling, backend, limits):
    return len(data)


HANG_MARKER = b"PSEUDOCAP-HANG"


def hang_on_marker(data, sampling, backend, limits):
    """Decodes normally, except bytes that end with HANG_MARKER: those hang in C code forever."""
    if data.endswith(HANG_MARKER):
        hold_gil_forever(data, sampling, backend, limits)
    return _decode_unmarked(data, sampling, backend, limits)


def _decode_unmarked(data, sampling, backend, limits):
    from engine.decode import decode_video

    if data.endswith(HANG_MARKER):
        data = data[:-len(HANG_MARKER)]
    return decode_video(data, sampling, backend, limits)


def fail_while_flagged(data, sampling, backend, limits):
    """Fails clips whose bytes end with HANG_MARKER while the file named by $PSEUDOCAP_TEST_FLAG exists."""
    from engine.errors import DecodeError

    if data.endswith(HANG_MARKER) and os.path.exists(os.environ.get("PSEUDOCAP_TEST_FLAG", "")):
        raise DecodeError("flaky-storage", "the test's flag file says this read fails")
    return _decode_unmarked(data, sampling, backend, limits)
